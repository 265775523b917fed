"""The split virtqueue (virtio 1.x, section 2.7), device side.

A :class:`SplitQueue` knows where the driver put the descriptor table and the
two rings, and nothing about notifications' transport: the device pops the
next available chain, serves it and puts its head on the used ring, and asks
:meth:`SplitQueue.needs_notification` whether to interrupt the driver.

Everything the driver wrote is untrusted.  A chain is walked with a
time-to-live of queue-size steps (a loop ends the walk with an error), indirect
tables get the same checks, readable descriptors must come before writable
ones, and every buffer is checked against guest memory when it is accessed
(:class:`ChainReader` / :class:`ChainWriter`).  A broken chain raises
:class:`ChainError` (the request fails); a broken queue (indexes, ring
addresses) raises :class:`QueueError` (the device needs a reset).
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple, Optional

from pyhv.engine.errors import EngineError
from pyhv.engine.memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
#: the longest indirect table accepted (the spec bounds it by the queue size)
MAX_QUEUE_SIZE = 32768


class VirtioError(EngineError):
    """Something the driver wrote cannot be served."""


class QueueError(VirtioError):
    """The queue itself is broken (rings, indexes): the device needs a reset."""


class ChainError(VirtioError):
    """One descriptor chain is malformed or points outside guest RAM: the request
    fails, the queue goes on."""

    #: the chain's head, when :meth:`SplitQueue.pop` took it (to answer it empty)
    head: Optional[int] = None


class Descriptor(NamedTuple):
    """One buffer of a chain (a named tuple: made for every descriptor walked)."""

    addr: int
    length: int
    writable: bool


class DescriptorChain:
    """The descriptors of one request, in order, checked as they are walked."""

    def __init__(self, memory: GuestMemory, head: int, descriptors: list[Descriptor]) -> None:
        self.memory = memory
        self.head = head
        self.descriptors = descriptors

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.writable]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.writable]

    def reader(self) -> "ChainReader":
        return ChainReader(self.memory, self.readable)

    def writer(self) -> "ChainWriter":
        return ChainWriter(self.memory, self.writable)


class ChainReader:
    """Reads the device-readable buffers of a chain as one byte stream."""

    def __init__(self, memory: GuestMemory, buffers: list[Descriptor]) -> None:
        self.memory = memory
        self.buffers = buffers
        self._i = 0
        self._off = 0
        self.available = sum(d.length for d in buffers)

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`ChainError` if the chain is shorter."""
        return b"".join(self.views(n))

    def views(self, n: int) -> Iterator[memoryview]:
        """The next ``n`` bytes as views into guest memory (zero copy)."""
        if n > self.available:
            raise ChainError(f"request needs {n} more bytes, the driver gave {self.available}")
        left = n
        while left:
            d = self.buffers[self._i]
            take = min(left, d.length - self._off)
            try:
                view = self.memory.view(d.addr + self._off, take)
            except GuestMemoryError as e:
                raise ChainError(f"buffer {d.addr:#x}+{d.length:#x} is not guest RAM") from e
            self._off += take
            left -= take
            self.available -= take
            if self._off == d.length:
                self._i, self._off = self._i + 1, 0
            yield view


class ChainWriter:
    """Writes the device-writable buffers of a chain as one byte stream."""

    def __init__(self, memory: GuestMemory, buffers: list[Descriptor]) -> None:
        self.memory = memory
        self.buffers = buffers
        self._i = 0
        self._off = 0
        self.available = sum(d.length for d in buffers)
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        """All of ``data``, or :class:`ChainError` if the buffers are too short."""
        if len(data) > self.available:
            raise ChainError(f"reply of {len(data)} bytes, the driver left room for "
                             f"{self.available}")
        src = memoryview(data)
        while src:
            d = self.buffers[self._i]
            take = min(len(src), d.length - self._off)
            try:
                self.memory.view(d.addr + self._off, take)[:] = src[:take]
            except GuestMemoryError as e:
                raise ChainError(f"buffer {d.addr:#x}+{d.length:#x} is not guest RAM") from e
            src = src[take:]
            self._off += take
            self.written += take
            self.available -= take
            if self._off == d.length:
                self._i, self._off = self._i + 1, 0


class SplitQueue:
    """One virtqueue as the driver configured it through the transport."""

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        #: VIRTIO_F_RING_EVENT_IDX and VIRTIO_F_RING_INDIRECT_DESC were negotiated
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        #: the used index when the driver was last notified (event-idx suppression)
        self._signalled_used: Optional[int] = None
        #: something was used since the last :meth:`needs_notification`
        self._used_since = False

    # ---- checks when the driver enables the queue -------------------------------
    def validate(self, memory: GuestMemory) -> None:
        """Raise :class:`QueueError` unless the rings lie in RAM, aligned."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of two up to {self.max_size}")
        for name, addr, align, length in (
                ("descriptor table", self.desc_addr, 16, DESC_SIZE * n),
                ("available ring", self.avail_addr, 2, 6 + 2 * n),
                ("used ring", self.used_addr, 4, 6 + 8 * n)):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"{name} at {addr:#x}+{length:#x} is not guest RAM")

    # ---- the device side ------------------------------------------------------------
    def _avail_idx(self, memory: GuestMemory) -> int:
        try:
            return memory.read_u16(self.avail_addr + 2)
        except GuestMemoryError as e:
            raise QueueError("the available ring is not guest RAM") from e

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver made available and the device has not taken."""
        ahead = (self._avail_idx(memory) - self.next_avail) & 0xFFFF
        if ahead > self.size:
            raise QueueError(f"available index is {ahead} ahead of the device, more than "
                             f"the queue size {self.size}")
        return ahead

    def pop(self, memory: GuestMemory) -> Optional[DescriptorChain]:
        """The next available chain (``None``: nothing new).  A malformed chain raises
        :class:`ChainError` after the device took it: complete it with
        :meth:`add_used` (length 0) and go on."""
        if not self.ready or not self.pending(memory):
            return None
        slot = self.avail_addr + 4 + 2 * (self.next_avail % self.size)
        try:
            head = memory.read_u16(slot)
        except GuestMemoryError as e:
            raise QueueError("the available ring is not guest RAM") from e
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if self.event_idx:  # tell the driver we have seen everything up to here
            self._write_u16(memory, self.used_addr + 4 + 8 * self.size, self.next_avail)
        if head >= self.size:
            raise QueueError(f"available ring names descriptor {head} of a queue of "
                             f"{self.size}")
        try:
            return DescriptorChain(memory, head, self._walk(memory, head))
        except ChainError as e:
            e.head = head
            raise

    def pop_valid(self, memory: GuestMemory) -> Optional[DescriptorChain]:
        """The next chain that can be walked (``None``: nothing new); chains that
        cannot are answered empty (used length 0) on the way, so the driver gets its
        buffers back and the queue goes on.  :meth:`needs_notification` covers them."""
        while True:
            try:
                return self.pop(memory)
            except ChainError as e:
                if e.head is not None:
                    self.add_used(memory, e.head, 0)

    def rewind(self, memory: GuestMemory, count: int) -> None:
        """Give back the last ``count`` chains popped and not used: they are popped
        again next time (a device that found it cannot serve them yet)."""
        self.next_avail = (self.next_avail - count) & 0xFFFF
        if self.event_idx:
            self._write_u16(memory, self.used_addr + 4 + 8 * self.size, self.next_avail)

    def _walk(self, memory: GuestMemory, head: int) -> list[Descriptor]:
        out: list[Descriptor] = []
        table, table_size, index = self.desc_addr, self.size, head
        ttl = self.size
        in_indirect = False
        while True:
            if ttl <= 0:
                raise ChainError(f"descriptor chain from {head} loops or is longer than "
                                 f"the queue")
            ttl -= 1
            try:
                addr, length, flags, nxt = memory.read_struct(_DESC, table + DESC_SIZE * index)
            except GuestMemoryError as e:
                raise ChainError(f"descriptor {index} is not in guest RAM") from e
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise ChainError("an indirect table names another indirect table")
                if not self.indirect:
                    raise ChainError("indirect descriptor without RING_INDIRECT_DESC")
                if flags & DESC_F_NEXT or out:
                    raise ChainError("an indirect descriptor must be a chain's only one")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table of {length} bytes")
                if not memory.contains(addr, length):
                    raise ChainError(f"indirect table {addr:#x}+{length:#x} is not guest RAM")
                table, table_size, index = addr, length // DESC_SIZE, 0
                ttl = table_size
                in_indirect = True
                continue
            writable = bool(flags & DESC_F_WRITE)
            if not writable and out and out[-1].writable:
                raise ChainError("a device-readable descriptor follows a writable one")
            if addr + length > 1 << 64:
                raise ChainError(f"buffer {addr:#x}+{length:#x} wraps around")
            out.append(Descriptor(addr, length, writable))
            if not flags & DESC_F_NEXT:
                return out
            if nxt >= table_size:
                raise ChainError(f"descriptor {index} links to {nxt}, beyond the table")
            index = nxt

    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` to the driver with ``length`` bytes written."""
        elem = self.used_addr + 4 + 8 * (self.next_used % self.size)
        try:
            memory.write(elem, _USED_ELEM.pack(head, length))
        except GuestMemoryError as e:
            raise QueueError("the used ring is not guest RAM") from e
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._used_since = True
        # the element is written before the index that publishes it
        self._write_u16(memory, self.used_addr + 2, self.next_used)

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last
        one (the used-event index, or the NO_INTERRUPT flag without event idx)."""
        if not self._used_since:
            return False  # nothing used since the last check: nothing to tell
        self._used_since = False
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        try:
            if self.event_idx:
                if old is None:
                    return True
                event = memory.read_u16(self.avail_addr + 4 + 2 * self.size)
                return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
            return not memory.read_u16(self.avail_addr) & AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise QueueError("the available ring is not guest RAM") from e

    def _write_u16(self, memory: GuestMemory, addr: int, value: int) -> None:
        try:
            memory.write_u16(addr, value)
        except GuestMemoryError as e:
            raise QueueError("the used ring is not guest RAM") from e
