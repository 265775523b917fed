"""Virtqueue chains as a driver in the guest could write them: the device side of
``pyhv.engine.virtio.queue`` pops every available chain and reads and writes its
buffers.

Input: a queue size (the first byte picks 1..256), the available index and the
ring of heads, then raw descriptor-table bytes (addresses are folded into a
small guest RAM now and then so that chains reach real buffers, indirect
tables included).  Accepted: chains served, or ``ChainError`` (that request
fails) / ``QueueError`` (the queue is broken); anything else, or a walk that
does not end, is a finding.
"""

from __future__ import annotations

import struct

from fuzz.common import Finding
from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio.queue import ChainError, QueueError, SplitQueue

MAX_LEN = 4096
RAM = 1 << 16
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000


def _memory(data: bytes) -> tuple[GuestMemory, SplitQueue]:
    data = data.ljust(4, b"\0")
    size = 1 << (data[0] % 9)
    mem = GuestMemory.from_bytearrays([(0, RAM)])
    body = data[4:]
    table = bytearray(body[:16 * size].ljust(16 * size, b"\0"))
    for i in range(size):  # fold some addresses into RAM, keep others wild
        addr, length, flags, nxt = struct.unpack_from("<QIHH", table, 16 * i)
        if flags & 0x8000:
            addr %= RAM
            length %= 0x2000
        struct.pack_into("<QIHH", table, 16 * i, addr, length, flags & 0x7, nxt)
    mem.write(DESC, table)
    rest = body[16 * size:]
    mem.write(0x8000, rest[:0x4000])  # room for indirect tables and buffers
    avail_idx = int.from_bytes(data[1:3].ljust(2, b"\0"), "little")
    ring = bytes(rest[:2 * size]).ljust(2 * size, b"\0")
    mem.write(AVAIL, struct.pack("<HH", data[3], avail_idx) + ring)
    q = SplitQueue(256)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = DESC, AVAIL, USED
    q.indirect = bool(data[0] & 0x80)
    q.event_idx = bool(data[0] & 0x40)
    q.validate(mem)
    q.ready = True
    return mem, q


def TARGET(data: bytes) -> None:
    mem, q = _memory(data)
    served = 0
    while True:
        try:
            chain = q.pop(mem)
        except ChainError:
            served += 1
            continue
        except QueueError:
            return
        if chain is None:
            break
        served += 1
        if len(chain.descriptors) > q.size * 2:
            raise Finding(f"a chain of {len(chain.descriptors)} descriptors in a queue "
                          f"of {q.size}")
        try:
            r = chain.reader()
            r.read(min(r.available, 4096))
            w = chain.writer()
            w.write(b"\xaa" * min(w.available, 4096))
            q.add_used(mem, chain.head, w.written)
        except ChainError:
            q.add_used(mem, chain.head, 0)
        if served > q.size + 1:
            raise Finding(f"served {served} chains from a queue of {q.size}")
    q.needs_notification(mem)


def seeds() -> list[bytes]:
    out = []
    for size_bits in (0, 2, 4):
        size = 1 << size_bits
        table = b""
        for i in range(size):
            nxt = (i + 1) % size
            flags = 0x8000 | (1 if i % 2 == 0 else 0) | (2 if i % 4 == 1 else 0)
            table += struct.pack("<QIHH", 0x8000 + 64 * i, 32, flags, nxt)
        ring = b"".join(struct.pack("<H", i) for i in range(size))
        out.append(bytes([size_bits | 0x80, size, 0, 0]) + table + ring)
    # an indirect descriptor pointing at a table in the spare area
    table = struct.pack("<QIHH", 0x8000, 32, 0x8000 | 4, 0)
    indirect = struct.pack("<QIHH", 0x9000, 16, 1, 1) + struct.pack("<QIHH", 0x9100, 16, 2, 0)
    out.append(bytes([0x80, 1, 0, 0]) + table + b"\0\0" + indirect)
    out.append(bytes([3, 0xFF, 0xFF, 1]) + b"\xff" * 200)  # a runaway index
    return out


def dictionary() -> list[bytes]:
    return [struct.pack("<H", f) for f in (1, 2, 3, 4, 5, 0x8001, 0x8002, 0x8004)]
