"""Inflight I/O tracking (the specification's "Inflight I/O tracking", split rings).

The backend keeps, in memory it shares with the frontend (GET_INFLIGHT_FD /
SET_INFLIGHT_FD), one region per queue: a 16-byte header (features u64, version
u16, desc_num u16, last_batch_head u16, used_idx u16) and ``desc_num`` 16-byte
descriptor states (inflight u8, 5 bytes of padding, next u16, counter u64), the
region rounded up to 64 bytes.  A head is marked inflight, with an increasing
counter, when the backend takes it from the available ring.  A batch of completed
heads is linked, each to the one before, from ``last_batch_head``; then the used
ring's index is published (once for the batch), their marks are cleared and
``used_idx`` records the index.  The frontend keeps the memory when
the backend dies and hands it to the next one, which resubmits what is still
marked (in counter order) before new requests.

:class:`TrackedQueue` is a :class:`~pyhv.engine.virtio.queue.SplitQueue` that does
this bookkeeping as the device pops and completes chains, and serves the
resubmitted heads first.  Everything read from the region is the frontend's and
is bounds-checked before use.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from typing import Optional

from pyhv.engine.memory import GuestMemory
from pyhv.engine.vhost_user.message import RequestError
from pyhv.engine.virtio.queue import SplitQueue

HEADER = struct.Struct("=QHHHH")
DESC_STATE = struct.Struct("=B5xHQ")
ALIGN = 64
#: the largest queue a frontend may ask a region for (QEMU's vhost-user-blk's limit)
MAX_QUEUE_SIZE = 1024
VERSION = 1
_U64 = (1 << 64) - 1
# header field offsets
_VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 8, 10, 12, 14


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: header and states, rounded up to 64."""
    n = HEADER.size + DESC_STATE.size * queue_size
    return (n + ALIGN - 1) // ALIGN * ALIGN


class InflightRegion:
    """The shared memory for ``num_queues`` queues of ``queue_size`` states each."""

    def __init__(self, fd: int, offset: int, num_queues: int, queue_size: int) -> None:
        """Map ``fd`` (which this object now owns) at ``offset``; the caller checked
        that the file is large enough."""
        self.fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.size = num_queues * queue_region_size(queue_size)
        self.offset = offset
        try:
            self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as e:
            os.close(fd)
            raise RequestError(f"inflight memory: cannot map it: {e.strerror}") from e

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightRegion":
        """A new, zero-filled memfd sealed against shrinking."""
        fd = os.memfd_create("pyhv-vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, num_queues * queue_region_size(queue_size))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except OSError as e:
            os.close(fd)
            raise RequestError(f"inflight memory: {e.strerror}") from e
        return cls(fd, 0, num_queues, queue_size)

    @classmethod
    def adopt(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
              queue_size: int) -> "InflightRegion":
        """The frontend's memory (SET_INFLIGHT_FD): its size checked with fstat before
        it is mapped.  Closes ``fd`` when it is refused."""
        try:
            need = num_queues * queue_region_size(queue_size)
            if mmap_size < need:
                raise RequestError(f"inflight memory of {mmap_size} bytes is smaller than "
                                   f"{need} for {num_queues} queues of {queue_size}")
            if mmap_offset % mmap.PAGESIZE:
                raise RequestError(f"inflight memory offset {mmap_offset:#x} is not "
                                   f"page-aligned")
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise RequestError(f"inflight memory: {e.strerror}") from e
            if not stat.S_ISREG(st.st_mode) or st.st_size < mmap_offset + need:
                raise RequestError(f"inflight memory: the file holds {st.st_size} bytes, "
                                   f"not {mmap_offset}+{need}")
        except RequestError:
            os.close(fd)
            raise
        return cls(fd, mmap_offset, num_queues, queue_size)

    def queue(self, index: int) -> "QueueState":
        return QueueState(self.map, index * queue_region_size(self.queue_size),
                          self.queue_size)

    def close(self) -> None:
        self.map.close()
        try:
            os.close(self.fd)
        except OSError:
            pass


_H, _Q = struct.Struct("=H"), struct.Struct("=Q")


class QueueState:
    """One queue's region in the shared memory."""

    def __init__(self, mem: mmap.mmap, base: int, capacity: int) -> None:
        self.mem = mem
        self.base = base
        self.capacity = capacity
        self.counter = 0

    def _u16(self, off: int) -> int:
        return int(struct.unpack_from("=H", self.mem, self.base + off)[0])

    def _set_u16(self, off: int, value: int) -> None:
        # never pack_into: it zero-fills before it stores, and a backend killed in
        # between would leave a 0 for the next one to read
        at = self.base + off
        self.mem[at:at + 2] = _H.pack(value & 0xFFFF)

    @property
    def version(self) -> int:
        return self._u16(_VERSION)

    @property
    def used_idx(self) -> int:
        return self._u16(_USED_IDX)

    def _desc(self, head: int) -> int:
        return self.base + HEADER.size + DESC_STATE.size * head

    def state(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter) of ``head``."""
        inflight, nxt, counter = DESC_STATE.unpack_from(self.mem, self._desc(head))
        return int(inflight), int(nxt), int(counter)

    # ---- as the device takes and completes chains ----------------------------------
    def take(self, head: int) -> None:
        d = self._desc(head)
        self.mem[d + 8:d + 16] = _Q.pack(self.counter)
        self.counter = (self.counter + 1) & _U64
        self.mem[d] = 1

    def before_used(self, head: int) -> None:
        """The head joins the batch being completed, before its used entry is
        published: the batch's heads are linked from ``last_batch_head`` through their
        ``next`` fields, so a backend that finds the used index ahead of ``used_idx``
        knows which heads it covers."""
        at = self._desc(head) + 6
        self.mem[at:at + 2] = _H.pack(self._u16(_LAST_BATCH_HEAD))
        self._set_u16(_LAST_BATCH_HEAD, head)

    def after_used(self, heads: list[int], used_idx: int) -> None:
        """The batch ``heads`` was published with the used index ``used_idx``."""
        mem = self.mem
        for head in heads:
            mem[self._desc(head)] = 0
        self._set_u16(_USED_IDX, used_idx)

    # ---- a ring starts ----------------------------------------------------------------
    def resume(self, ring_size: int, used_idx: int) -> list[int]:
        """Bring the region in line with the used ring's index ``used_idx`` and return
        the heads to resubmit, in counter order (a fresh region is initialised)."""
        if ring_size > self.capacity:
            raise RequestError(f"the ring's {ring_size} descriptors do not fit the inflight "
                               f"region's {self.capacity}")
        if self.version == 0:
            self._set_u16(_DESC_NUM, self.capacity)
            self._set_u16(_LAST_BATCH_HEAD, 0)
            self._set_u16(_USED_IDX, used_idx)
            self._set_u16(_VERSION, VERSION)
            self.counter = 0
            return []
        if self.version != VERSION:
            raise RequestError(f"inflight region version {self.version} (pyhv knows "
                               f"{VERSION})")
        desc_num = self._u16(_DESC_NUM)
        if desc_num != self.capacity:
            raise RequestError(f"inflight region of {desc_num} descriptors, the frontend "
                               f"said {self.capacity}")
        batch = (used_idx - self.used_idx) & 0xFFFF
        if batch:
            # the last batch's used entries were published before the backend went:
            # those heads are done, not inflight
            if batch > self.capacity:
                raise RequestError(f"the used ring is {batch} entries past the inflight "
                                   f"region's")
            head = self._u16(_LAST_BATCH_HEAD)
            for _ in range(batch):
                if head >= self.capacity:
                    break
                self.mem[self._desc(head)] = 0
                head = self.state(head)[1]
            self._set_u16(_USED_IDX, used_idx)
        marked = []
        for head in range(self.capacity):
            inflight, _nxt, counter = self.state(head)
            if not inflight:
                continue
            if head >= ring_size:  # not a head of this ring: nothing to resubmit
                self.mem[self._desc(head)] = 0
                continue
            marked.append((counter, head))
        marked.sort()
        self.counter = (marked[-1][0] + 1) & _U64 if marked else 0
        return [head for _counter, head in marked]


class TrackedQueue(SplitQueue):
    """A split queue that records what it takes and completes in a
    :class:`QueueState` (when one is attached) and hands out resubmitted heads
    before new ones."""

    def reset(self) -> None:
        super().reset()
        self.track: Optional[QueueState] = None
        self.resubmit: list[int] = []
        #: heads filled into the used ring and not yet published
        self._completing: list[int] = []

    def pending(self, memory: GuestMemory) -> int:
        return len(self.resubmit) + super().pending(memory)

    def take(self, memory: GuestMemory, limit: Optional[int] = None) -> list[int]:
        if self.resubmit and self.ready:
            n = len(self.resubmit) if limit is None else limit
            heads = self.resubmit[:n]
            del self.resubmit[:n]
            return heads  # still marked from the backend that took them first
        heads = super().take(memory, limit)
        track = self.track
        if track is not None:
            for head in heads:
                track.take(head)
        return heads

    def fill(self, memory: GuestMemory, head: int, length: int) -> None:
        track = self.track
        if track is not None and head < track.capacity:
            track.before_used(head)  # linked into the batch before it can be published
            self._completing.append(head)
        super().fill(memory, head, length)

    def flush(self, memory: GuestMemory) -> None:
        super().flush(memory)
        done, track = self._completing, self.track
        if done and track is not None:
            track.after_used(done, self.next_used)
        done.clear()
