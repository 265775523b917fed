"""The driver's side of a split virtqueue, for tests: real rings in guest memory.

:class:`Driver` lays out a descriptor table, an available and a used ring in a
:class:`GuestMemory` (a bytearray one, no KVM), adds requests as a guest driver
does (direct or indirect chains, readable then writable buffers), and reads
back what the device put on the used ring.  Tests also use it to write what a
misbehaving driver would: loops, bad addresses, a runaway available index.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    SplitQueue,
)

MiB = 1 << 20


@dataclass
class Driver:
    memory: GuestMemory
    size: int = 16
    base: int = 0x10000
    #: where request buffers are carved from
    heap: int = 0x100000
    event_idx: bool = False
    indirect: bool = False
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0

    def __post_init__(self) -> None:
        self.desc = self.base
        self.avail = self.desc + DESC_SIZE * self.size
        self.used = (self.avail + 6 + 2 * self.size + 3) & ~3
        self.memory.fill(self.base, self.used + 6 + 8 * self.size - self.base)
        self.free = list(range(self.size))

    def queue(self, max_size: Optional[int] = None) -> SplitQueue:
        """The device's view of this queue, as the transport would configure it."""
        q = SplitQueue(max_size or self.size)
        q.size = self.size
        q.desc_addr, q.avail_addr, q.used_addr = self.desc, self.avail, self.used
        q.event_idx, q.indirect = self.event_idx, self.indirect
        q.validate(self.memory)
        q.ready = True
        return q

    def alloc(self, data: bytes | int) -> tuple[int, int]:
        """A buffer holding ``data`` (bytes) or ``data`` zero bytes."""
        n = data if isinstance(data, int) else len(data)
        addr = self.heap
        self.heap += (n + 15) & ~15 or 16
        if not isinstance(data, int):
            self.memory.write(addr, data)
        return addr, n

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int,
                   nxt: int = 0) -> None:
        self.memory.write(table + DESC_SIZE * index, struct.pack("<QIHH", addr, length,
                                                                 flags, nxt))

    def add(self, readable: Sequence[bytes], writable: Sequence[int],
            indirect: bool = False) -> tuple[int, list[tuple[int, int]]]:
        """Make a request available; its head and the (addr, len) of its writable
        buffers (to read the device's answer from)."""
        bufs = [(*self.alloc(r), 0) for r in readable] + \
               [(*self.alloc(w), DESC_F_WRITE) for w in writable]
        outs = [(a, n) for a, n, f in bufs if f]
        if indirect:
            table, _ = self.alloc(DESC_SIZE * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(table, i, a, n, f | (0 if last else DESC_F_NEXT), i + 1)
            head = self.free.pop(0)
            self.write_desc(self.desc, head, table, DESC_SIZE * len(bufs), DESC_F_INDIRECT)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(self.desc, ids[i], a, n, f | (0 if last else DESC_F_NEXT),
                                0 if last else ids[i + 1])
            head = ids[0]
        self.publish(head)
        return head, outs

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, length) of every used element since the last call."""
        out = []
        idx = self.memory.read_u16(self.used + 2)
        while self.last_used != idx:
            elem = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.memory.read(elem, 8))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def suppress_interrupts(self, on: bool) -> None:
        self.memory.write_u16(self.avail, 1 if on else 0)


def memory(size: int = 4 * MiB) -> GuestMemory:
    return GuestMemory.from_bytearrays([(0, size)])
