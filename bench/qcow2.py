#!/usr/bin/env python3
"""pyhv's qcow2 backend against its raw backend and QEMU's qcow2 driver.

    .venv/bin/python bench/qcow2.py [--size 256] [--seconds 1.5] [--dir /var/tmp]
                                    [--json FILE]

The backends are called directly (no virtio, no guest): the per-request cost of
the format layer.  One image of ``--size`` MiB of random data is made raw and
converted by ``qemu-img convert -O qcow2`` (64 KiB clusters, fully allocated);
each case runs for ``--seconds`` on:

* **raw**: ``RawBackend`` on the raw image (pyhv's ceiling for the format layer);
* **qcow2**: ``Qcow2Backend`` on the qcow2 image;
* **qemu-img bench** (sequential cases only; it has no random pattern): QEMU's
  qcow2 driver on the same image, same request size, depth 1.

Cases: 4 KiB random reads, 1 MiB sequential reads, 1 MiB sequential overwrites,
and first writes (64 KiB sequential writes into an empty image: cluster
allocation, refcount and L2 updates with their barriers).  Caches are the page
cache (writeback): figures are per-request overheads, not the disk's.  The
side-by-side against qemu-storage-daemon, through vhost-user, is
bench/vhost_user_blk.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyhv.engine.block.qcow2 import Qcow2Backend  # noqa: E402
from pyhv.engine.block.raw import RawBackend  # noqa: E402

MiB = 1 << 20


def run_for(seconds: float, step: Callable[[int], int]) -> float:
    """Bytes per second of ``step(i)`` (returns bytes done) called for ``seconds``."""
    done, i = 0, 0
    t0 = time.perf_counter()
    while True:
        done += step(i)
        i += 1
        if i % 16 == 0 and time.perf_counter() - t0 >= seconds:
            return done / (time.perf_counter() - t0)


def cases(backend: Any, size: int, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    rnd = random.Random(1)
    small = memoryview(bytearray(4096))
    big = memoryview(bytearray(MiB))
    offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(4096)]
    out["4k-randread-iops"] = run_for(seconds, lambda i: (
        backend.read_into(offsets[i % 4096], [small]), 4096)[1]) / 4096
    out["1m-seqread-MiBps"] = run_for(seconds, lambda i: (
        backend.read_into((i * MiB) % size, [big]), MiB)[1]) / MiB
    out["1m-seqwrite-MiBps"] = run_for(seconds, lambda i: (
        backend.write_from((i * MiB) % size, [big]), MiB)[1]) / MiB
    return out


def qemu_img_bench(image: str, fmt: str, write: bool, size: int, seconds: float) -> \
        Optional[float]:
    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    count = max(16, int(seconds * 400))
    argv = [exe, "bench", "-f", fmt, "-t", "writeback", "-d", "1", "-s", "1M", "-c",
            str(count), "-S", "1M"] + (["-w", "--pattern=0x5a"] if write else []) + [image]
    r = subprocess.run(argv, capture_output=True, text=True)
    m = re.search(r"Run completed in ([\d.]+) seconds", r.stdout)
    return count / float(m.group(1)) if m else None


def first_writes(path: str, size: int, seconds: float) -> float:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, str(size)], check=True,
                   stdout=subprocess.DEVNULL)
    data = memoryview(os.urandom(65536))
    with Qcow2Backend(path) as q:
        limit = size // 65536
        return run_for(seconds, lambda i: (
            q.write_from((i % limit) * 65536, [data]), 65536)[1]) / MiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image size in MiB")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json")
    args = ap.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw, qcow = os.path.join(d, "a.raw"), os.path.join(d, "a.qcow2")
        with open(raw, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow], check=True)
        results: dict[str, Any] = {}
        with RawBackend(raw) as r:
            results["raw"] = cases(r, size, args.seconds)
        with Qcow2Backend(qcow) as q:
            results["qcow2"] = cases(q, size, args.seconds)
        results["qemu-img-bench-qcow2"] = {
            "1m-seqread-MiBps": qemu_img_bench(qcow, "qcow2", False, size, args.seconds),
            "1m-seqwrite-MiBps": qemu_img_bench(qcow, "qcow2", True, size, args.seconds)}
        results["qcow2"]["64k-firstwrite-MiBps"] = first_writes(
            os.path.join(d, "fresh.qcow2"), size, args.seconds)
    for name, figures in results.items():
        for case, value in figures.items():
            print(f"{name:22s} {case:22s} {value:10.1f}" if value is not None
                  else f"{name:22s} {case:22s} {'-':>10s}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
