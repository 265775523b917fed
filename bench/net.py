#!/usr/bin/env python3
"""virtio-net's frame path against its ceiling: a tap read and written directly.

    .venv/bin/python bench/net.py [--seconds 2] [--repeat 3] [--json FILE]

Runs in a network namespace of its own (it re-executes itself under ``unshare -n``):
a tap ``pyhvbench0`` is made there, with a packet socket on it as the wire.  pyhv's
virtio-net device (``VirtioNet`` on the tap) is driven from the host by a driver
harness: rings and buffers in memfd guest memory as a guest's would be, frames
published on the available ring and the queue notified by a direct call (no guest
CPU, no ioeventfd: the device's own cost).  Each case runs two ways:

* **pyhv**: transmit: batches of 32 frames through the transmit queue, the device
  and the tap, drained from the packet socket; receive: batches of 32 frames sent on
  the packet socket, taken by the device from the tap into receive buffers (the
  harness gives them back);
* **direct**: the same frames written to (read from) the tap's descriptor with
  ``os.write``/``os.read`` in a plain loop, the packet socket as before: what Python
  and the kernel cost with no device (the ceiling).

Cases: 64-byte and 1500-byte frames, transmit and receive, with one queue pair and
with two (frames spread over both pairs' queues and tap queues).  Each figure is
the median of ``--repeat`` runs of ``--seconds`` each.  No timing is asserted
anywhere; tests/test_virtio_net.py checks the same path's behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyhv.engine.memory import GuestMemory  # noqa: E402
from pyhv.engine.net.tap import Tap  # noqa: E402
from pyhv.engine.virtio.device import F_VERSION_1  # noqa: E402
from pyhv.engine.virtio.net import F_MQ, F_MRG_RXBUF, VirtioNet  # noqa: E402
from pyhv.engine.virtio.queue import DESC_F_WRITE, SplitQueue  # noqa: E402

MiB = 1 << 20
QUEUE = 256
BATCH = 32
HDR = bytes(12)
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("525400abcdef")
ETHERTYPE = b"\x88\xb5"
TAP = "pyhvbench0"
MEMORY = 64 * MiB


class _NoIrq:
    def queue(self, index: int) -> None:
        pass

    def config(self) -> None:
        pass


@dataclass
class Ring:
    """The driver's side of one virtqueue at ``base`` in guest memory."""

    mem: GuestMemory
    base: int
    buffers: int  # where this queue's buffers start
    avail_idx: int = 0
    last_used: int = 0

    def __post_init__(self) -> None:
        self.desc = self.base
        self.avail = self.desc + 16 * QUEUE
        self.used = (self.avail + 6 + 2 * QUEUE + 3) & ~3
        self.mem.fill(self.base, self.used + 6 + 8 * QUEUE - self.base)

    def queue(self) -> SplitQueue:
        q = SplitQueue(QUEUE)
        q.size = QUEUE
        q.desc_addr, q.avail_addr, q.used_addr = self.desc, self.avail, self.used
        q.validate(self.mem)
        q.ready = True
        return q

    def set_desc(self, i: int, length: int, writable: bool) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack(
            "<QIHH", self.buffers + 2048 * i, length, DESC_F_WRITE if writable else 0, 0))

    def publish(self, heads: range) -> None:
        for h in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % QUEUE), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def reap(self) -> int:
        idx = self.mem.read_u16(self.used + 2)
        n = (idx - self.last_used) & 0xFFFF
        self.last_used = idx
        return n


class Harness:
    def __init__(self, tap: Tap, pairs: int) -> None:
        self.mem = GuestMemory.shared_fd([(0, MEMORY)])
        self.dev = VirtioNet(tap, MAC, pairs)
        self.rings = [Ring(self.mem, 0x10000 + 0x10000 * i, 8 * MiB + 2 * MiB * i)
                      for i in range(2 * pairs + 1)]
        features = F_VERSION_1 | F_MRG_RXBUF | (F_MQ if pairs > 1 else 0)
        self.dev.activate(self.mem, [r.queue() for r in self.rings], _NoIrq(), features)
        self.dev.active_pairs = pairs
        tap.enable_queues(pairs)
        self.pairs = pairs

    def transmit(self, pair: int, frame: bytes) -> int:
        ring = self.rings[2 * pair + 1]
        for i in range(BATCH):
            ring.set_desc(i, len(frame), False)
            self.mem.write(ring.buffers + 2048 * i, frame)
        ring.publish(range(BATCH))
        self.dev.queue_notify(2 * pair + 1)
        return ring.reap()

    def give_rx(self, pair: int, n: int) -> None:
        ring = self.rings[2 * pair]
        for i in range(n):
            ring.set_desc(i, 2048, True)
        ring.publish(range(n))

    def receive(self, pair: int) -> int:
        self.dev._rx(pair)
        return self.rings[2 * pair].reap()


def frame_of(size: int) -> bytes:
    return PEER + MAC + ETHERTYPE + bytes(size - 14)


def drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return n
        n += 1


def timed(step: Callable[[], int], seconds: float) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    while True:
        n += step()
        t = time.perf_counter() - t0
        if t >= seconds:
            return t, n


def run_case(tap: Tap, sock: socket.socket, pairs: int, size: int, direction: str,
             seconds: float, how: str) -> float:
    """Frames per second."""
    frame = frame_of(size)
    if how == "pyhv":
        h = Harness(tap, pairs)
        turn = [0]
        if direction == "tx":
            def step() -> int:
                p = turn[0] = (turn[0] + 1) % pairs
                done = h.transmit(p, HDR + frame)
                drain(sock)
                return done
        else:
            for p in range(pairs):
                h.give_rx(p, QUEUE)

            def step() -> int:
                for _ in range(BATCH):
                    sock.send(frame)
                got = 0
                for p in range(pairs):
                    n = h.receive(p)
                    h.give_rx(p, n)  # the buffers go straight back
                    got += n
                return got
        wall, n = timed(step, seconds)
        h.dev.reset()
        return n / wall
    fds = tap.fds
    if direction == "tx":
        def step() -> int:
            for i in range(BATCH):
                os.write(fds[i % pairs], HDR + frame)
            drain(sock)
            return BATCH
    else:
        def step() -> int:
            for _ in range(BATCH):
                sock.send(frame)
            got = 0
            for fd in fds:
                while True:
                    try:
                        os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    got += 1
            return got
    wall, n = timed(step, seconds)
    return n / wall


def in_namespace() -> None:
    """Re-run this script in a network namespace of its own."""
    if os.environ.get("PYHV_BENCH_NETNS") == "1":
        return
    env = {**os.environ, "PYHV_BENCH_NETNS": "1"}
    r = subprocess.run(["unshare", "-n", sys.executable, *sys.argv], env=env)
    raise SystemExit(r.returncode)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    in_namespace()
    Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").write_text("1")  # no chatter
    results = []
    print(f"{'case':<22}{'pyhv frames/s':>16}{'Gbit/s':>9}{'direct frames/s':>18}"
          f"{'Gbit/s':>9}{'ratio':>8}")
    for pairs in (1, 2):
        tap = Tap.open(TAP, queues=pairs)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        sock.bind((tap.name, 0))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        try:
            for size in (64, 1500):
                for direction in ("tx", "rx"):
                    figures = {}
                    for how in ("pyhv", "direct"):
                        runs = sorted(run_case(tap, sock, pairs, size, direction,
                                               args.seconds, how)
                                      for _ in range(args.repeat))
                        figures[how] = runs[len(runs) // 2]
                    name = f"{direction}-{size}B-{pairs}q"
                    gbit = {k: v * size * 8 / 1e9 for k, v in figures.items()}
                    ratio = figures["pyhv"] / figures["direct"]
                    print(f"{name:<22}{figures['pyhv']:>16,.0f}{gbit['pyhv']:>9.2f}"
                          f"{figures['direct']:>18,.0f}{gbit['direct']:>9.2f}{ratio:>8.2f}")
                    results.append({"case": name, "pyhv_fps": figures["pyhv"],
                                    "direct_fps": figures["direct"], "ratio": ratio})
        finally:
            sock.close()
            tap.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
