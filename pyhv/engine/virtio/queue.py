"""The split virtqueue (virtio 1.x, section 2.7), device side.

A :class:`SplitQueue` knows where the driver put the descriptor table and the
two rings, and nothing about notifications' transport: the device pops the
next available chain, serves it and puts its head on the used ring, and asks
:meth:`SplitQueue.needs_notification` whether to interrupt the driver.  A device
serving batches takes every available head at once (:meth:`SplitQueue.take`),
fills each used element and publishes them with one index store
(:meth:`SplitQueue.flush`).  The available ring's index is read when the device
has taken everything it knew of; when it finds nothing more, with event idx, the
driver is told the device caught up and the index is read once more, so the
driver kicks for what it publishes next (and not for chains published while a
batch was being served).

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
from pyhv.engine.memory import GuestMemory, GuestMemoryError, memory_fence

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
#: one descriptor: address, length, flags, next
DESCRIPTOR = struct.Struct("<QIHH")
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
        self.available = sum([d.length for d in buffers])

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
        self.available = sum([d.length for d in buffers])
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
        #: used elements written by :meth:`fill` and not yet published by :meth:`flush`
        self._filled = 0
        #: the used index when the driver was last notified (event-idx suppression)
        self._signalled_used: Optional[int] = None
        #: something was used since the last :meth:`needs_notification`
        self._used_since = False

    @property
    def next_avail(self) -> int:
        """The available ring's index of the next chain the device takes."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        self._next_avail = value & 0xFFFF
        #: chains known to be available past ``next_avail`` (read from the ring's
        #: index once, then taken without reading it again)
        self._known = 0

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
        """How many chains the driver made available and the device has not taken.
        None (the device caught up): with event idx the driver is first told that
        the device has seen everything up to here, so that it kicks for the next
        chain it publishes, and the index is read once more after that."""
        ahead = self._ahead(memory)
        if not ahead and self.event_idx:
            self._write_u16(memory, self.used_addr + 4 + 8 * self.size, self._next_avail)
            memory_fence()  # the store above before the index's load below
            ahead = self._ahead(memory)
        return ahead

    def has_available(self, memory: GuestMemory) -> bool:
        """Whether a chain is available: one taken from the last look counts without
        reading the ring again (:meth:`pending` otherwise)."""
        return bool(self._known) or bool(self.pending(memory))

    def _ahead(self, memory: GuestMemory) -> int:
        ahead = (self._avail_idx(memory) - self._next_avail) & 0xFFFF
        if ahead > self.size:
            raise QueueError(f"available index is {ahead} ahead of the device, more than "
                             f"the queue size {self.size}")
        self._known = ahead
        return ahead

    def take(self, memory: GuestMemory, limit: Optional[int] = None) -> list[int]:
        """The heads of the chains the driver made available (at most ``limit``),
        taken off the ring in one read (empty: the device has caught up).  Walk each with
        :meth:`chain`, and complete each with :meth:`fill` or :meth:`add_used`."""
        if not self.ready or not self._known and not self.pending(memory):
            return []
        n = self._known if limit is None else min(self._known, limit)
        if n <= 0:
            return []
        nxt, size = self._next_avail, self.size
        start = nxt % size
        first = min(n, size - start)
        try:
            ring = memory.view(self.avail_addr + 4, 2 * size)
        except GuestMemoryError as e:
            raise QueueError("the available ring is not guest RAM") from e
        heads = list(struct.unpack_from(f"<{first}H", ring, 2 * start))
        if first < n:  # the ring wraps
            heads += struct.unpack_from(f"<{n - first}H", ring, 0)
        self._next_avail = (nxt + n) & 0xFFFF
        self._known -= n
        top = max(heads)
        if top >= size:
            raise QueueError(f"available ring names descriptor {top} of a queue of {size}")
        return heads

    def chain(self, memory: GuestMemory, head: int) -> DescriptorChain:
        """The chain from ``head`` (one :meth:`take` returned), walked and checked;
        :class:`ChainError` (with its head) if it is malformed."""
        try:
            return DescriptorChain(memory, head, self._walk(memory, head))
        except ChainError as e:
            e.head = head
            raise

    def table(self, memory: GuestMemory) -> memoryview:
        """The descriptor table (a device reading plain chains itself)."""
        try:
            return memory.view(self.desc_addr, DESC_SIZE * self.size)
        except GuestMemoryError as e:
            raise QueueError("the descriptor table is not guest RAM") from e

    def pop(self, memory: GuestMemory) -> Optional[DescriptorChain]:
        """The next available chain (``None``: nothing new).  A malformed chain raises
        :class:`ChainError` after the device took it: complete it with
        :meth:`add_used` (length 0) and go on."""
        heads = self.take(memory, 1)
        return self.chain(memory, heads[0]) if heads else None

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
        self.next_avail = self._next_avail - count
        if self.event_idx:
            self._write_u16(memory, self.used_addr + 4 + 8 * self.size, self._next_avail)

    def _walk(self, memory: GuestMemory, head: int) -> list[Descriptor]:
        out: list[Descriptor] = []
        table_size, index = self.size, head
        try:
            table = memory.view(self.desc_addr, DESC_SIZE * table_size)
        except GuestMemoryError as e:
            raise QueueError("the descriptor table is not guest RAM") from e
        unpack = DESCRIPTOR.unpack_from
        ttl = table_size
        in_indirect = False
        while True:
            if ttl <= 0:
                raise ChainError(f"descriptor chain from {head} loops or is longer than "
                                 f"the queue")
            ttl -= 1
            addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise ChainError("an indirect table names another indirect table")
                if not self.indirect:
                    raise ChainError("indirect descriptor without RING_INDIRECT_DESC")
                if flags & DESC_F_NEXT or out:
                    raise ChainError("an indirect descriptor must be a chain's only one")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table of {length} bytes")
                try:
                    table = memory.view(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(f"indirect table {addr:#x}+{length:#x} is not guest "
                                     f"RAM") from e
                table_size, index = length // DESC_SIZE, 0
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
        self.fill(memory, head, length)
        self.flush(memory)

    def fill(self, memory: GuestMemory, head: int, length: int) -> None:
        """Write chain ``head``'s used element, not yet published: a device that
        completes a batch fills each element, then calls :meth:`flush` once (the
        driver sees the whole batch with one index store)."""
        elem = self.used_addr + 4 + 8 * ((self.next_used + self._filled) % self.size)
        try:
            memory.view(elem, 8)[:] = _USED_ELEM.pack(head, length)
        except GuestMemoryError as e:
            raise QueueError("the used ring is not guest RAM") from e
        self._filled += 1

    def flush(self, memory: GuestMemory) -> None:
        """Publish the filled elements: the used index moves past them."""
        if not self._filled:
            return
        self.next_used = (self.next_used + self._filled) & 0xFFFF
        self._filled = 0
        self._used_since = True
        # the elements are written before the index that publishes them
        self._write_u16(memory, self.used_addr + 2, self.next_used)

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was used since the last
        one (the used-event index, or the NO_INTERRUPT flag without event idx)."""
        self.flush(memory)
        if not self._used_since:
            return False  # nothing used since the last check: nothing to tell
        self._used_since = False
        memory_fence()  # the used index published before the driver's wishes are read
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
