#!/usr/bin/env python3
"""virtio-blk request path against its ceiling and against QEMU's block layer.

    .venv/bin/python bench/blk.py [--size 64] [--seconds 2] [--cache writeback|none]
                                  [--dir /var/tmp] [--json FILE]

pyhv's virtio-blk device (``VirtioBlk`` over ``RawBackend``) is driven from the host
by a driver harness: rings and buffers in memfd guest memory, as a guest's would be,
requests published on the available ring and the queue notified by a direct call (no
guest CPU, no ioeventfd wake-up: the device's own cost).  Each case runs the same
offsets three ways:

* **pyhv**: requests through the virtqueue, the device and the backend;
* **direct**: ``os.preadv``/``os.pwritev`` of the same sizes at the same offsets
  into the same memfd memory, in a plain loop (the ceiling: what Python and the
  kernel cost with no device at all);
* **qemu-img bench** (sequential cases only; it has no random pattern): QEMU's block
  layer on the same image with the same cache mode, request size and depth.

Cases: 4 KiB random reads at QD1 and QD32, 4 KiB sequential reads at QD1 and QD32,
1 MiB sequential reads and writes at QD1.  pyhv serves a notification's requests one
after another on the calling thread, so QD32 measures batching (one notification,
32 requests, one pass over the used ring), not parallel I/O.  Each figure is the
median of ``--repeat`` runs of ``--seconds`` each; CPU time per request is the
process's CPU time over the run divided by the requests.  With the default
writeback cache the image is read once first, so reads come from the page cache:
the figures are per-request overheads, not the disk's.

No timing is asserted anywhere; tests/test_virtio_blk.py checks the same path's
behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchstats import percentile  # noqa: E402

from pyhv.engine.block.raw import RawBackend  # noqa: E402
from pyhv.engine.memory import GuestMemory  # noqa: E402
from pyhv.engine.virtio.blk import F_FLUSH, S_OK, T_IN, T_OUT, VirtioBlk  # noqa: E402
from pyhv.engine.virtio.device import F_VERSION_1  # noqa: E402
from pyhv.engine.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, SplitQueue  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
QUEUE = 256
RING = 0x10000            # descriptor table, available and used rings
SLOTS = 0x100000          # per request slot: header, status
DATA = 4 * MiB            # data buffers, 1 MiB apart
MEMORY = DATA + 32 * MiB + 4 * MiB


class _NoIrq:
    def queue(self, index: int) -> None:
        pass

    def config(self) -> None:
        pass


@dataclass
class Case:
    name: str
    write: bool
    size: int
    depth: int
    sequential: bool


CASES = [
    Case("4k-randread-qd1", False, 4 * KiB, 1, False),
    Case("4k-randread-qd32", False, 4 * KiB, 32, False),
    Case("4k-seqread-qd1", False, 4 * KiB, 1, True),
    Case("4k-seqread-qd32", False, 4 * KiB, 32, True),
    Case("1m-seqread-qd1", False, 1 * MiB, 1, True),
    Case("1m-seqwrite-qd1", True, 1 * MiB, 1, True),
]


class Harness:
    """A driver for one virtqueue of a VirtioBlk: ``depth`` fixed request slots of
    three descriptors (header, data, status) each, reused for every request."""

    def __init__(self, image: str, cache: str) -> None:
        self.mem = GuestMemory.shared_fd([(0, MEMORY)])
        self.dev = VirtioBlk(RawBackend(image, cache=cache), queue_size=QUEUE)
        self.desc = RING
        self.avail = self.desc + 16 * QUEUE
        self.used = (self.avail + 6 + 2 * QUEUE + 3) & ~3
        q = SplitQueue(QUEUE)
        q.size = QUEUE
        q.desc_addr, q.avail_addr, q.used_addr = self.desc, self.avail, self.used
        q.validate(self.mem)
        q.ready = True
        self.queue = q
        self.dev.activate(self.mem, [q], _NoIrq(), F_FLUSH | F_VERSION_1)
        self.avail_idx = 0
        self.last_used = 0

    def slot(self, i: int) -> tuple[int, int, int]:
        """(header, data, status) addresses of slot ``i``."""
        return SLOTS + 32 * i, DATA + MiB * i, SLOTS + 32 * i + 16

    def data_view(self, i: int, size: int) -> memoryview:
        return self.mem.view(self.slot(i)[1], size)

    def prepare(self, depth: int, size: int, write: bool) -> None:
        for i in range(depth):
            hdr, data, status = self.slot(i)
            d = 3 * i
            for k, (addr, n, flags) in enumerate((
                    (hdr, 16, DESC_F_NEXT),
                    (data, size, DESC_F_NEXT | (0 if write else DESC_F_WRITE)),
                    (status, 1, DESC_F_WRITE))):
                self.mem.write(self.desc + 16 * (d + k),
                               struct.pack("<QIHH", addr, n, flags, d + k + 1))

    def submit(self, offsets: list[int], write: bool) -> None:
        """One notification's worth: a request per offset, then the used ring."""
        mem = self.mem
        kind = T_OUT if write else T_IN
        for i, off in enumerate(offsets):
            hdr, _data, _status = self.slot(i)
            mem.write(hdr, struct.pack("<IIQ", kind, 0, off // 512))
            mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % QUEUE), 3 * i)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write_u16(self.avail + 2, self.avail_idx)
        self.dev.queue_notify(0)
        idx = mem.read_u16(self.used + 2)
        done = (idx - self.last_used) & 0xFFFF
        if done != len(offsets):
            raise SystemExit(f"bench: {done} of {len(offsets)} requests completed")
        self.last_used = idx
        for i in range(len(offsets)):
            if mem.read_u8(self.slot(i)[2]) != S_OK:
                raise SystemExit(f"bench: request {i} failed")

    def close(self) -> None:
        self.dev.close()


def offsets_for(case: Case, image_size: int, seed: int) -> Callable[[], list[int]]:
    """A generator of the next ``case.depth`` offsets."""
    rng = random.Random(seed)
    blocks = image_size // case.size
    pos = [0]

    def nxt() -> list[int]:
        if case.sequential:
            out = [((pos[0] + i) % blocks) * case.size for i in range(case.depth)]
            pos[0] = (pos[0] + case.depth) % blocks
            return out
        return [rng.randrange(blocks) * case.size for _ in range(case.depth)]
    return nxt


def timed(step: Callable[[], int], seconds: float) -> tuple[float, float, int]:
    """Run ``step`` (returns requests done) for about ``seconds``: (wall, cpu, requests)."""
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while True:
        n += step()
        t = time.perf_counter()
        if t >= deadline:
            return t - t0, time.process_time() - c0, n


def run_pyhv(h: Harness, case: Case, image_size: int, seconds: float) -> tuple[float, float, int]:
    h.prepare(case.depth, case.size, case.write)
    nxt = offsets_for(case, image_size, 1)

    def step() -> int:
        offs = nxt()
        h.submit(offs, case.write)
        return len(offs)
    return timed(step, seconds)


def run_direct(h: Harness, fd: int, case: Case, image_size: int,
               seconds: float) -> tuple[float, float, int]:
    nxt = offsets_for(case, image_size, 1)
    views = [h.data_view(i, case.size) for i in range(case.depth)]
    io = os.pwritev if case.write else os.preadv

    def step() -> int:
        offs = nxt()
        for v, off in zip(views, offs):
            if io(fd, [v], off) != case.size:
                raise SystemExit("bench: short direct I/O")
        return len(offs)
    return timed(step, seconds)


def run_qemu_img(image: str, case: Case, cache: str, image_size: int,
                 seconds_hint: float, rate: float) -> Optional[tuple[float, float, int]]:
    """qemu-img bench with about as many requests as pyhv did in ``seconds_hint``."""
    if not case.sequential or not shutil.which("qemu-img"):
        return None
    count = max(int(rate * seconds_hint), case.depth)
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", cache, "-c", str(count),
           "-d", str(case.depth), "-s", str(case.size), "-S", str(case.size)]
    if case.write:
        cmd += ["-w", "--pattern=90"]
    r0 = os.times()
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, image], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    r1 = os.times()
    if p.returncode != 0:
        print(f"bench: qemu-img bench failed: {p.stderr.strip()}", file=sys.stderr)
        return None
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    run = float(m.group(1)) if m else wall
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return run, cpu, count


def median_of(runs: list[tuple[float, float, int]]) -> dict[str, float]:
    rates = [n / wall for wall, _cpu, n in runs]
    cpus = [cpu / n * 1e6 for _wall, cpu, n in runs]
    return {"rate": percentile(rates, 50), "cpu_us": percentile(cpus, 50)}


def fmt_rate(case: Case, rate: float) -> str:
    if case.size >= MiB:
        return f"{rate * case.size / MiB:8.0f} MiB/s"
    return f"{rate:8.0f} IOPS "


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image size in MiB")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    ap.add_argument("--dir", default="/var/tmp", help="where the image is made")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    image_size = args.size * MiB
    workdir = tempfile.mkdtemp(prefix="pyhv-bench-blk-", dir=args.dir)
    image = os.path.join(workdir, "disk.img")
    chunk = os.urandom(MiB)
    with open(image, "wb") as f:
        for _ in range(args.size):
            f.write(chunk)
    results: dict[str, dict[str, object]] = {}
    try:
        fd = os.open(image, os.O_RDWR | (os.O_DIRECT if args.cache == "none" else 0))
        try:
            with open(image, "rb") as f:             # warm the page cache
                while f.read(MiB):
                    pass
            print(f"image {image_size // MiB} MiB in {args.dir}, cache={args.cache}, "
                  f"{args.repeat} x {args.seconds:g} s per figure (median)")
            print(f"{'case':18} {'pyhv':>14} {'direct':>14} {'pyhv/direct':>11} "
                  f"{'qemu-img':>14} {'pyhv/qemu':>9} {'cpu us/req pyhv':>15} "
                  f"{'direct':>7} {'qemu':>7}")
            for case in CASES:
                # the device holds QEMU's image locks: closed before qemu-img runs
                h = Harness(image, args.cache)
                try:
                    mine = median_of([run_pyhv(h, case, image_size, args.seconds)
                                      for _ in range(args.repeat)])
                    ceil = median_of([run_direct(h, fd, case, image_size, args.seconds)
                                      for _ in range(args.repeat)])
                finally:
                    h.close()
                peer_runs = [r for r in (run_qemu_img(image, case, args.cache, image_size,
                                                      args.seconds, mine["rate"])
                                         for _ in range(args.repeat)) if r is not None]
                peer = median_of(peer_runs) if peer_runs else None
                results[case.name] = {"pyhv": mine, "direct": ceil, "qemu-img": peer}
                peer_rate = fmt_rate(case, peer["rate"]) if peer else f"{'-':>14}"
                peer_ratio = f"{mine['rate'] / peer['rate']:9.2f}" if peer else f"{'-':>9}"
                peer_cpu = f"{peer['cpu_us']:7.1f}" if peer else f"{'-':>7}"
                print(f"{case.name:18} {fmt_rate(case, mine['rate'])} "
                      f"{fmt_rate(case, ceil['rate'])} {mine['rate'] / ceil['rate']:11.2f} "
                      f"{peer_rate} {peer_ratio} {mine['cpu_us']:15.1f} "
                      f"{ceil['cpu_us']:7.1f} {peer_cpu}")
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
