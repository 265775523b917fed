#!/usr/bin/env python3
"""Per-exit cost: a guest doing N port writes, pyhv against QEMU (microvm), in one run.

The guest is written here in assembly (built with gcc at run time): a PVH ELF
entered in 32-bit protected mode without paging, which writes N times to one
I/O port, then powers off (pyhv's ACPI PM1a_CNT at 0x604 with SLP_TYP 5 and
SLP_EN, then QEMU's isa-debug-exit at 0xf4; each VMM ignores the other's port).
Two ports, each its own case:

* ``unclaimed``: port 0x700, where no device sits in either VMM (the exit goes
  to the VMM and finds nothing);
* ``uart``: COM1's transmit register 0x3f8, the serial line to ``null``.

Each (VMM, case) runs with N = 0 and N = ``--writes`` (20,000 by default),
``--runs`` times each; the per-exit cost is (median(N) - median(0)) / N.  The
loop's own instructions (an ``out``, a ``dec``, a ``jnz``) run in KVM's
emulator on a PVM host like this one (~0.4 M instructions/s) and count in the
figure for both VMMs alike.  No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot_pvh import pyhv_argv, qemu_argv, skip, spawn_and_wait  # noqa: E402

PORTS = {"unclaimed": 0x700, "uart": 0x3F8}

GUEST_S = """
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18            /* name size, desc size, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start

    .text
    .code32
    .globl _start
_start:
    mov $%(writes)d, %%ecx
    mov $%(port)d, %%dx
    mov $0x41, %%al
    test %%ecx, %%ecx
    jz 2f
1:  outb %%al, %%dx
    dec %%ecx
    jnz 1b
2:  mov $0x604, %%dx          /* pyhv: ACPI PM1a_CNT, SLP_TYP=5 | SLP_EN */
    mov $0x3400, %%ax
    outw %%ax, %%dx
    mov $0xf4, %%dx           /* QEMU: isa-debug-exit */
    xor %%al, %%al
    outb %%al, %%dx
3:  hlt
    jmp 3b
"""


def build(outdir: Path, port: int, writes: int) -> Path:
    src = outdir / f"exits-{port:x}-{writes}.S"
    elf = src.with_suffix(".elf")
    src.write_text(GUEST_S % {"port": port, "writes": writes})
    done = subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x100000",
                           "-Wl,--build-id=none", "-o", str(elf), str(src)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        skip(f"cannot build the guest with gcc: {done.stderr.strip()[-300:]}")
    return elf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per figure")
    ap.add_argument("--pyhv", default=str(Path(sys.executable).with_name("pyhv")))
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not shutil.which("gcc"):
        skip("gcc is not installed")
    if not args.qemu:
        skip("qemu-system-x86_64 is not installed")
    results: dict[str, dict[str, dict[int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pyhv-exits-") as tmp:
        out = Path(tmp)
        for case, port in PORTS.items():
            for n in (0, args.writes):
                elf = build(out, port, n)
                for vmm in ("pyhv", "qemu"):
                    run = (pyhv_argv(args.pyhv, elf, 64, "null") if vmm == "pyhv"
                           else qemu_argv(args.qemu, elf, 64, "null"))
                    spawn_and_wait(run)  # warm-up (page cache, bytecode)
                    walls = []
                    for _ in range(args.runs):
                        r = spawn_and_wait(run)
                        if r.status not in (0, 1):  # QEMU's debug-exit with 0 exits 1
                            skip(f"{vmm} {case} N={n}: exit status {r.status} "
                                 f"({' '.join(run)})")
                        walls.append(r.wall)
                    results.setdefault(vmm, {}).setdefault(case, {})[n] = \
                        statistics.median(walls)
    print(f"{'case':10} {'vmm':5} {'N=0':>10} {f'N={args.writes}':>12} {'per exit':>10}")
    per: dict[str, dict[str, float]] = {}
    for case in PORTS:
        for vmm in ("pyhv", "qemu"):
            t0, tn = results[vmm][case][0], results[vmm][case][args.writes]
            per.setdefault(case, {})[vmm] = (tn - t0) / args.writes
            print(f"{case:10} {vmm:5} {t0 * 1e3:8.1f} ms {tn * 1e3:10.1f} ms "
                  f"{per[case][vmm] * 1e6:7.1f} µs")
    for case in PORTS:
        print(f"ratio {case}: pyhv/qemu per exit {per[case]['pyhv'] / per[case]['qemu']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"writes": args.writes, "runs": args.runs,
                                         "medians_s": results, "per_exit_s": per}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
