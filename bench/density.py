#!/usr/bin/env python3
"""Density: K tiny guests started at once, pyhv against QEMU (microvm), in one run.

Each guest is the test kit's PVH guest (64 MiB, COM1 to ``null``): it prints its
report and powers off.  For each VMM the bench spawns K processes back to back
(``pyhv run`` / ``qemu-system-x86_64 -machine microvm``), reaps them with wait4,
and reports the wall time from the first spawn to the last exit, the slowest
guest, and the sum and the largest of the processes' peak RSS (ru_maxrss, which
counts what each process touched, shared pages included).  Every process must
exit cleanly.  The two VMMs run one after the other, in alternating order over
``--rounds`` rounds; figures are medians over the rounds.  No timing is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot_pvh import (  # noqa: E402
    DEFAULT_GUEST_DIR,
    build_guest,
    pyhv_argv,
    qemu_argv,
    skip,
)


def burst(argv: list[str], k: int) -> dict[str, float]:
    """Start ``k`` copies of argv at once; wall time to the last exit, peak RSS."""
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
    t0 = time.perf_counter()
    pids = {os.posix_spawn(argv[0], argv, os.environ, file_actions=actions): t0
            for _ in range(k)}
    rss, slowest = [], 0.0
    while pids:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pids:
            continue
        pids.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 1):  # QEMU's isa-debug-exit with 0 exits 1
            skip(f"a guest exited with status {code}: {' '.join(argv)}")
        slowest = max(slowest, time.perf_counter() - t0)
        rss.append(usage.ru_maxrss)
    return {"wall_s": time.perf_counter() - t0, "slowest_s": slowest,
            "rss_sum_kib": float(sum(rss)), "rss_max_kib": float(max(rss))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=16, help="guests started at once (K)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", type=int, default=64, metavar="MIB")
    ap.add_argument("--pyhv", default=str(Path(sys.executable).with_name("pyhv")))
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    ap.add_argument("--guest-dir", type=Path, default=DEFAULT_GUEST_DIR)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not args.qemu:
        skip("qemu-system-x86_64 is not installed")
    kernel = build_guest(args.guest_dir)
    runs = {"pyhv": pyhv_argv(args.pyhv, kernel, args.memory, "null"),
            "qemu": qemu_argv(args.qemu, kernel, args.memory, "null")}
    for run in runs.values():
        burst(run, 1)  # warm-up: page cache, bytecode
    got: dict[str, list[dict[str, float]]] = {"pyhv": [], "qemu": []}
    for r in range(args.rounds):
        for vmm in (("pyhv", "qemu") if r % 2 == 0 else ("qemu", "pyhv")):
            got[vmm].append(burst(runs[vmm], args.guests))
    med = {vmm: {key: statistics.median(x[key] for x in rounds) for key in rounds[0]}
           for vmm, rounds in got.items()}
    print(f"{args.guests} guests of {args.memory} MiB at once, {args.rounds} rounds "
          f"(medians), {os.cpu_count()} host CPUs")
    print(f"{'vmm':5} {'all done':>10} {'slowest':>10} {'RSS sum':>10} {'RSS max':>10}")
    for vmm, m in med.items():
        print(f"{vmm:5} {m['wall_s'] * 1e3:8.0f} ms {m['slowest_s'] * 1e3:8.0f} ms "
              f"{m['rss_sum_kib'] / 1024:6.0f} MiB {m['rss_max_kib'] / 1024:6.1f} MiB")
    p, q = med["pyhv"], med["qemu"]
    print(f"ratio pyhv/qemu: wall {p['wall_s'] / q['wall_s']:.2f}x, "
          f"RSS sum {p['rss_sum_kib'] / q['rss_sum_kib']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"guests": args.guests, "memory_mib": args.memory,
                                         "rounds": got, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
