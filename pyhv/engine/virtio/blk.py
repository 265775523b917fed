"""virtio-blk (virtio 1.x, section 5.2): a disk on a host block backend.

A request is a descriptor chain: a 16-byte header (type, reserved, sector) in
device-readable buffers, then data (readable for writes, discard and
write-zeroes segments; writable for reads and GET_ID), and a status byte, the
last device-writable byte of the chain.  :func:`parse_request` turns a chain
into a :class:`BlkRequest` without touching the backend (a pure function of the
chain, guest memory and the disk's :class:`BlkLimits`): every check the guest
can fail is made there, and a failed check becomes the request's status
(IOERR or UNSUPP), never an exception.  :class:`VirtioBlk` executes what is
left on its :class:`~pyhv.engine.block.BlockBackend` and completes the chain:

* the used length counts the bytes written into device-writable buffers: the
  data read (IN), the identifier (GET_ID), and the status byte;
* a chain without a writable status byte (or one outside RAM) cannot be
  answered: it goes back on the used ring with length 0, and so does a chain the
  queue could not even walk; the queue goes on either way;
* nothing outside the disk's sectors is ever read or written (the backend checks
  again), and a read-only disk refuses writes, discards and write-zeroes with
  IOERR before the backend sees them.

Writes are made stable by FLUSH; a driver that did not accept VIRTIO_BLK_F_FLUSH
gets every write flushed before it completes (the spec's rule for that case).

A request the host fails is handled by the disk's error policy, QEMU's
``rerror``/``werror`` (libvirt's ``rerror_policy``/``error_policy``): ``report``
completes it with IOERR, ``ignore`` with OK, ``stop`` holds it (its queues
stand still) and asks the machine to pause; :meth:`VirtioBlk.retry` runs it
again when the machine resumes.  ``enospc`` stops on ENOSPC and reports
anything else (QEMU's default for writes; reads default to ``report``).  Each
failure is told to ``on_io_error`` (QMP's BLOCK_IO_ERROR).
Requests are served on the thread that calls :meth:`VirtioBlk.queue_notify`
(the engine's loop), synchronously, a batch at a time: every chain available is
taken in one read of the ring, and their used elements are published with one
index store.  Plain reads and writes (header, one data buffer, status byte) are
read straight from the descriptor table; everything else is walked and parsed.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence

from pyhv.engine.block import SECTOR_SIZE, BlockBackend, BlockError, open_disk
from pyhv.engine.memory import GuestMemoryError
from pyhv.engine.virtio.device import TYPE_BLOCK, Interrupts, VirtioDevice
from pyhv.engine.virtio.queue import (
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    DESCRIPTOR,
    ChainError,
    Descriptor,
    DescriptorChain,
    SplitQueue,
)

if TYPE_CHECKING:
    from pyhv.config import DiskConfig
    from pyhv.engine.memory import GuestMemory

# feature bits (5.2.3)
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_GEOMETRY = 1 << 4
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

# request types (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

# status values
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

#: the flags of a discard / write-zeroes segment
SEG_F_UNMAP = 1
#: GET_ID answers this many bytes (the serial, zero padded)
ID_BYTES = 20

HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
#: struct virtio_blk_config up to write_zeroes_may_unmap and its padding:
#: capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size,
#: topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
#: writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
#: discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
#: write_zeroes_may_unmap, unused1[3]
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

QUEUE_SIZE = 256
#: QEMU's limit per discard / write-zeroes segment (BDRV_REQUEST_MAX_SECTORS)
MAX_RANGE_SECTORS = 0x3FFFFF
MAX_DISCARD_SEG = 16
MAX_WRITE_ZEROES_SEG = 16
#: discard granularity the driver is told (8 sectors: a 4 KiB filesystem block)
DISCARD_SECTOR_ALIGNMENT = 8
#: the most request queues (one MSI-X vector each, plus the configuration vector, fit
#: the transport's table)
MAX_QUEUES = 64

TYPE_NAMES = {T_IN: "IN", T_OUT: "OUT", T_FLUSH: "FLUSH", T_GET_ID: "GET_ID",
              T_GET_LIFETIME: "GET_LIFETIME", T_DISCARD: "DISCARD",
              T_WRITE_ZEROES: "WRITE_ZEROES", T_SECURE_ERASE: "SECURE_ERASE"}

Extent = tuple[int, int]


@dataclass(frozen=True)
class BlkLimits:
    """What a request is checked against."""

    #: the disk's size in 512-byte sectors
    capacity: int
    readonly: bool = False
    #: DISCARD was offered (discard='unmap')
    discard: bool = False
    write_zeroes: bool = True
    max_discard_sectors: int = MAX_RANGE_SECTORS
    max_discard_seg: int = MAX_DISCARD_SEG
    max_write_zeroes_sectors: int = MAX_RANGE_SECTORS
    max_write_zeroes_seg: int = MAX_WRITE_ZEROES_SEG


class BlkRequest(NamedTuple):
    """One parsed request: what to do, or the status it already failed with (a named
    tuple: one is made per request)."""

    type: int
    sector: int
    #: data buffers in guest memory, (address, length) in order: device-readable for
    #: OUT, device-writable for IN and GET_ID, empty otherwise
    data: tuple[Extent, ...] = ()
    data_len: int = 0
    #: DISCARD / WRITE_ZEROES: (sector, sectors, unmap) per segment
    ranges: tuple[tuple[int, int, bool], ...] = ()
    #: where the status byte goes; None: the chain has none the device can write
    status_addr: Optional[int] = None
    #: set when parsing already decided the outcome (IOERR or UNSUPP)
    status: Optional[int] = None
    #: why, in words (for tracing and tests)
    reason: str = ""

    @property
    def reportable(self) -> bool:
        return self.status_addr is not None


def _extents(descs: Sequence[Descriptor]) -> list[Extent]:
    return [(d.addr, d.length) for d in descs if d.length]


def _skip(extents: list[Extent], n: int) -> list[Extent]:
    """The extents less their first ``n`` bytes."""
    out = []
    for addr, length in extents:
        if n >= length:
            n -= length
            continue
        out.append((addr + n, length - n))
        n = 0
    return out


def _read(memory: "GuestMemory", extents: list[Extent], n: int) -> bytes:
    """The first ``n`` bytes of the extents (GuestMemoryError if outside RAM)."""
    out = bytearray()
    for addr, length in extents:
        if len(out) == n:
            break
        out += memory.read(addr, min(length, n - len(out)))
    return bytes(out)


def _in_range(sector: int, sectors: int, capacity: int) -> bool:
    return sector <= capacity and sectors <= capacity - sector


def parse_request(chain: DescriptorChain, limits: BlkLimits) -> BlkRequest:
    """Check one chain against the spec and the disk; never raises for what the driver
    wrote (the result carries the status instead)."""
    memory = chain.memory
    writable = _extents(chain.writable)
    if not writable:
        return BlkRequest(-1, 0, reason="no device-writable status byte")
    last_addr, last_len = writable[-1]
    status_addr = last_addr + last_len - 1
    try:
        memory.view(status_addr, 1)
    except GuestMemoryError:
        return BlkRequest(-1, 0, reason=f"status byte {status_addr:#x} is not guest RAM")
    data_in = writable[:-1] + ([(last_addr, last_len - 1)] if last_len > 1 else [])
    in_len = sum(n for _, n in data_in)

    def fail(status: int, why: str, rtype: int = -1, sector: int = 0) -> BlkRequest:
        return BlkRequest(rtype, sector, status_addr=status_addr, status=status, reason=why)

    readable = _extents(chain.readable)
    if readable and readable[0][1] == HEADER.size:  # the usual layout: a header of its own
        try:
            rtype, _reserved, sector = memory.read_struct(HEADER, readable[0][0])
        except GuestMemoryError:
            return fail(S_IOERR, "request header is not guest RAM")
        data_out = readable[1:]
    else:
        if sum(n for _, n in readable) < HEADER.size:
            return fail(S_IOERR, "request header shorter than 16 bytes")
        try:
            rtype, _reserved, sector = HEADER.unpack(_read(memory, readable, HEADER.size))
        except GuestMemoryError:
            return fail(S_IOERR, "request header is not guest RAM")
        data_out = _skip(readable, HEADER.size)
    out_len = sum(n for _, n in data_out)
    name = TYPE_NAMES.get(rtype) or f"type {rtype}"

    if rtype in (T_IN, T_OUT):
        data, length = (data_in, in_len) if rtype == T_IN else (data_out, out_len)
        if rtype == T_OUT and limits.readonly:
            return fail(S_IOERR, "write to a read-only disk", rtype, sector)
        if length % SECTOR_SIZE:
            return fail(S_IOERR, f"{name} of {length} bytes, not whole sectors", rtype, sector)
        if not _in_range(sector, length // SECTOR_SIZE, limits.capacity):
            return fail(S_IOERR, f"{name} of {length // SECTOR_SIZE} sectors at {sector} is "
                        f"beyond the disk's {limits.capacity}", rtype, sector)
        return BlkRequest(rtype, sector, tuple(data), length, status_addr=status_addr)
    if rtype == T_FLUSH:
        return BlkRequest(rtype, sector, status_addr=status_addr)
    if rtype == T_GET_ID:
        return BlkRequest(rtype, sector, tuple(data_in), in_len, status_addr=status_addr)
    if rtype in (T_DISCARD, T_WRITE_ZEROES):
        discard = rtype == T_DISCARD
        if limits.readonly:
            return fail(S_IOERR, f"{name} on a read-only disk", rtype, sector)
        if not (limits.discard if discard else limits.write_zeroes):
            return fail(S_UNSUPP, f"{name} was not offered", rtype, sector)
        if not out_len or out_len % SEGMENT.size:
            return fail(S_IOERR, f"{name} payload of {out_len} bytes is not whole segments",
                        rtype, sector)
        count = out_len // SEGMENT.size
        max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
        max_sectors = limits.max_discard_sectors if discard else \
            limits.max_write_zeroes_sectors
        if count > max_seg:
            return fail(S_UNSUPP, f"{name} with {count} segments, more than {max_seg}",
                        rtype, sector)
        try:
            raw = _read(memory, data_out, out_len)
        except GuestMemoryError:
            return fail(S_IOERR, f"{name} segments are not guest RAM", rtype, sector)
        ranges = []
        for start, sectors, flags in SEGMENT.iter_unpack(raw):
            if flags & ~SEG_F_UNMAP or (discard and flags & SEG_F_UNMAP):
                return fail(S_UNSUPP, f"{name} segment flags {flags:#x}", rtype, sector)
            if sectors > max_sectors:
                return fail(S_IOERR, f"{name} of {sectors} sectors, more than {max_sectors}",
                            rtype, sector)
            if not _in_range(start, sectors, limits.capacity):
                return fail(S_IOERR, f"{name} of {sectors} sectors at {start} is beyond the "
                            f"disk's {limits.capacity}", rtype, sector)
            ranges.append((start, sectors, bool(flags & SEG_F_UNMAP)))
        return BlkRequest(rtype, sector, ranges=tuple(ranges), status_addr=status_addr)
    return fail(S_UNSUPP, f"unsupported request {name}", rtype, sector)


def _is_zero(views: Sequence[memoryview]) -> bool:
    """Whether the buffers hold only zero bytes (detect_zeroes)."""
    chunk = 1 << 20
    for v in views:
        if v[:16].tobytes() != bytes(min(16, len(v))):
            return False  # the common case, decided cheaply
        for i in range(0, len(v), chunk):
            piece = v[i:i + chunk]
            if piece.tobytes() != bytes(len(piece)):
                return False
    return True


@dataclass
class BlkStats:
    """What QMP's query-blockstats reports (completed requests only)."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    wr_highest_offset: int = 0

    def count(self, kind: int, length: int, offset: int, ns: int) -> None:
        if kind == T_IN:
            self.rd_bytes += length
            self.rd_operations += 1
            self.rd_total_time_ns += ns
        elif kind == T_OUT:
            self.wr_bytes += length
            self.wr_operations += 1
            self.wr_total_time_ns += ns
            self.wr_highest_offset = max(self.wr_highest_offset, offset + length)
        elif kind == T_FLUSH:
            self.flush_operations += 1
            self.flush_total_time_ns += ns


#: what a failed request does (QEMU's BlockdevOnError less ``auto``)
ERROR_POLICIES = ("report", "ignore", "stop", "enospc")


@dataclass(frozen=True)
class BlkIoError:
    """One request the host failed, as QMP's BLOCK_IO_ERROR tells it."""

    operation: str          # "read" or "write" (flush, discard and write-zeroes: write)
    action: str             # "report", "ignore" or "stop"
    nospace: bool
    reason: str


class _Held(Exception):
    """The request stopped on an error: it stays unanswered until :meth:`retry`."""


class VirtioBlk(VirtioDevice):
    device_type = TYPE_BLOCK
    kind = "virtio-blk"

    def __init__(self, backend: BlockBackend, serial: Optional[str] = None,
                 num_queues: int = 1, queue_size: int = QUEUE_SIZE, discard: bool = False,
                 detect_zeroes: str = "off", werror: str = "enospc",
                 rerror: str = "report") -> None:
        super().__init__()
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-blk: {num_queues} queues, not 1 to {MAX_QUEUES}")
        if detect_zeroes not in ("off", "on", "unmap"):
            raise ValueError(f"virtio-blk: detect_zeroes {detect_zeroes!r}")
        for name, policy in (("werror", werror), ("rerror", rerror)):
            if policy not in ERROR_POLICIES:
                raise ValueError(f"virtio-blk: {name} {policy!r}")
        self.werror, self.rerror = werror, rerror
        #: told of every failed request (the machine pauses on action "stop")
        self.on_io_error: Callable[[BlkIoError], None] = lambda err: None
        #: QMP's io-status: "ok", "failed" or "nospace" (the last stop's cause)
        self.io_status = "ok"
        #: the request held by the error policy: (queue, its chain, heads taken after it)
        self._held: Optional[tuple[int, DescriptorChain, list[int]]] = None
        #: QMP block-set-write-threshold: the first write reaching past this byte
        #: offset is told to ``on_threshold`` (bytes past it, the threshold), and the
        #: threshold is disarmed; 0: off
        self.write_threshold = 0
        self.on_threshold: Callable[[int, int], None] = lambda exceeded, threshold: None
        self.backend = backend
        self.stats = BlkStats()
        self.serial = serial
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.queue_sizes = (queue_size,) * num_queues
        self.detect_zeroes = detect_zeroes
        self.limits = BlkLimits(capacity=backend.size // SECTOR_SIZE,
                                readonly=backend.readonly, discard=discard)
        features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_WRITE_ZEROES
        if discard:
            features |= F_DISCARD
        if backend.readonly:
            features |= F_RO
        if num_queues > 1:
            features |= F_MQ
        self.features = features
        #: the driver did not accept FLUSH: every write is made stable before completing
        self.writethrough = False

    @classmethod
    def from_config(cls, disk: "DiskConfig", num_queues: int = 1) -> "VirtioBlk":
        """The device for a configured disk, its backend opened (and locked)."""
        werror, rerror = disk.error_policies()
        return cls(open_disk(disk), serial=disk.serial, num_queues=num_queues,
                   discard=disk.discard == "unmap", detect_zeroes=disk.detect_zeroes or "off",
                   werror=werror, rerror=rerror)

    @property
    def can_stop(self) -> bool:
        """An error may stop the machine (QEMU then reports ``io-status``)."""
        return bool({"stop", "enospc"} & {self.werror, self.rerror})

    # ---- configuration space -------------------------------------------------------
    def config_bytes(self) -> bytes:
        align = getattr(self.backend, "request_alignment", 1)
        exp = max(align // SECTOR_SIZE, 1).bit_length() - 1
        return CONFIG.pack(
            self.limits.capacity,
            0,                                   # size_max (not offered)
            self.queue_size - 2,                 # seg_max: the chain less header, status
            0, 0, 0,                             # geometry (not offered)
            SECTOR_SIZE,                         # blk_size
            exp, 0, (1 << exp) if exp else 0, 0,  # topology
            0, 0,                                # writeback (no CONFIG_WCE), unused0
            self.num_queues,
            self.limits.max_discard_sectors, self.limits.max_discard_seg,
            DISCARD_SECTOR_ALIGNMENT,
            self.limits.max_write_zeroes_sectors, self.limits.max_write_zeroes_seg,
            int(self.backend.can_unmap))

    # ---- lifecycle -----------------------------------------------------------------
    def activate(self, memory: "GuestMemory", queues: list[SplitQueue],
                 interrupts: Interrupts, features: int) -> None:
        super().activate(memory, queues, interrupts, features)
        self.writethrough = not features & F_FLUSH

    def reset(self) -> None:
        super().reset()
        self.writethrough = False
        self._held = None
        self.io_status = "ok"

    def close(self) -> None:
        self.backend.close()

    def resize(self, size: int) -> None:
        """Resize the disk to ``size`` bytes (QMP block_resize): the backend first,
        then the capacity requests are checked against, then the driver is told by a
        configuration interrupt (Linux rereads the capacity and logs the change)."""
        self.backend.resize(size)
        self.limits = replace(self.limits, capacity=self.backend.size // SECTOR_SIZE)
        interrupts = self.interrupts
        if interrupts is not None:
            interrupts.config()

    # ---- requests --------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index >= len(self.queues) or self._held is not None:
            return  # stopped on an error: nothing moves until retry()
        q = self.queues[index]
        memory = self.memory
        assert memory is not None
        while heads := q.take(memory):
            if not self._serve(index, q, memory, heads):
                break  # held on an error
        self._complete(index)

    def _complete(self, index: int) -> None:
        """Publish what was served (the batch at once) and interrupt the driver if it
        asked to be."""
        q, memory, interrupts = self.queues[index], self.memory, self.interrupts
        assert memory is not None and interrupts is not None
        q.flush(memory)
        if q.needs_notification(memory):
            interrupts.queue(index)

    def _serve(self, index: int, q: SplitQueue, memory: "GuestMemory",
               heads: list[int]) -> bool:
        """Serve the chains ``heads`` (taken from queue ``index``) and fill their used
        elements; False when one was held by the error policy (it and the heads after
        it wait for :meth:`retry`).

        The layout Linux, QEMU and the firmware use for reads and writes (a 16-byte
        header, one data buffer, a 1-byte status, three direct descriptors) is read
        here straight from the descriptor table: such a chain passes every check of
        the queue's walk by its shape, and what :func:`parse_request` checks of a
        read or write is checked inline.  Anything else, and any buffer outside
        RAM, takes the general path (:meth:`handle`), which decides the outcome;
        both paths give the same result for the same chain."""
        table = q.table(memory)
        backend, stats = self.backend, self.stats
        plain_out = (not self.limits.readonly and self.detect_zeroes == "off"
                     and not self.writethrough)
        now = time.perf_counter_ns
        for i, head in enumerate(heads):
            plain = self._plain(table, q.size, memory, head, plain_out)
            if plain is not None:
                rtype, offset, data, status = plain
                start = now()
                try:
                    if rtype == T_IN:
                        backend.read_into(offset, (data,))
                    else:
                        if self.write_threshold:
                            self._check_threshold(offset + len(data))
                        backend.write_from(offset, (data,))
                except BlockError as e:
                    try:
                        result, written = self._failed(rtype, e)
                    except _Held:
                        if self._hold(index, q, memory, head, heads[i + 1:]):
                            return False
                        continue  # it could not be held: answered empty
                else:
                    result, written = S_OK, len(data) if rtype == T_IN else 0
                    stats.count(rtype, len(data), offset, now() - start)
                status[0] = result
                q.fill(memory, head, written + 1)
                continue
            try:
                chain = q.chain(memory, head)
            except ChainError:
                q.fill(memory, head, 0)  # cannot be answered: back with nothing written
                continue
            try:
                used = self.handle(chain)
            except _Held:
                self._held = (index, chain, heads[i + 1:])
                return False
            q.fill(memory, head, used)
        return True

    def _plain(self, table: memoryview, size: int, memory: "GuestMemory", head: int,
               plain_out: bool) -> Optional[tuple[int, int, memoryview, memoryview]]:
        """(type, byte offset, data view, status view) of chain ``head`` when it is
        a plain read or write that passes every check (``plain_out``: writes may be
        served so); None sends it down the general path."""
        unpack = DESCRIPTOR.unpack_from
        addr, length, flags, nxt = unpack(table, DESC_SIZE * head)
        if flags != DESC_F_NEXT or length != HEADER.size or nxt >= size:
            return None
        data_addr, data_len, data_flags, nxt = unpack(table, DESC_SIZE * nxt)
        if data_flags & ~DESC_F_WRITE != DESC_F_NEXT or not data_len or nxt >= size:
            return None
        status_addr, status_len, status_flags, _ = unpack(table, DESC_SIZE * nxt)
        if status_flags != DESC_F_WRITE or status_len != 1:
            return None
        try:
            rtype, _reserved, sector = HEADER.unpack_from(memory.view(addr, length))
            status = memory.view(status_addr, 1)
            data = memory.view(data_addr, data_len)
        except GuestMemoryError:
            return None  # the general path answers it
        into = data_flags & DESC_F_WRITE
        if not (rtype == T_IN and into or rtype == T_OUT and plain_out and not into):
            return None
        if data_len % SECTOR_SIZE or \
                not _in_range(sector, data_len // SECTOR_SIZE, self.limits.capacity):
            return None
        return rtype, sector * SECTOR_SIZE, data, status

    def _hold(self, index: int, q: SplitQueue, memory: "GuestMemory", head: int,
              rest: list[int]) -> bool:
        """Hold request ``head`` (served inline) and the heads after it for
        :meth:`retry`; False when its chain cannot be walked any more (the driver
        rewrote it meanwhile): it is answered empty instead."""
        try:
            self._held = (index, q.chain(memory, head), rest)
        except ChainError:
            q.fill(memory, head, 0)
            return False
        return True

    @property
    def stopped(self) -> bool:
        """A request waits for :meth:`retry` (the machine paused on its error)."""
        return self._held is not None

    def retry(self) -> None:
        """The machine resumed: run the held request again (it may stop again), then
        serve whatever the driver queued meanwhile."""
        held, self._held = self._held, None
        if held is None or self.memory is None:
            return
        index, chain, rest = held
        self.io_status = "ok"
        try:
            used = self.handle(chain)
        except _Held:
            self._held = held
            return
        self.queues[index].fill(self.memory, chain.head, used)
        self.retry_rest(index, rest)

    def retry_rest(self, index: int, rest: list[int]) -> None:
        """Serve the heads taken after a held one, then every queue."""
        assert self.memory is not None
        if rest and not self._serve(index, self.queues[index], self.memory, rest):
            self._complete(index)
            return
        for i in range(len(self.queues)):
            self.queue_notify(i)

    def handle(self, chain: DescriptorChain) -> int:
        """Serve one request; the used length to report."""
        req = parse_request(chain, self.limits)
        if req.status_addr is None:
            return 0
        status, written = (req.status, 0) if req.status is not None else self._execute(req)
        try:
            chain.memory.write_u8(req.status_addr, status)
        except GuestMemoryError:
            return 0
        return written + 1

    def _execute(self, req: BlkRequest) -> tuple[int, int]:
        """(status, bytes written into the data buffers) of a request that parsed;
        raises :class:`_Held` when the error policy stops on its failure."""
        start = time.perf_counter_ns()
        if self.write_threshold and req.type in (T_OUT, T_WRITE_ZEROES, T_DISCARD):
            self._check_threshold(self._request_end(req))
        try:
            status, written = self._run(req)
        except BlockError as e:
            return self._failed(req.type, e)
        if status == S_OK:
            self.stats.count(req.type, req.data_len, req.sector * SECTOR_SIZE,
                             time.perf_counter_ns() - start)
        return status, written

    def _failed(self, rtype: int, e: BlockError) -> tuple[int, int]:
        """(status, bytes written) of a request the host failed, by the error policy;
        raises :class:`_Held` when the policy stops on it."""
        read = rtype == T_IN
        policy = self.rerror if read else self.werror
        nospace = e.errno == errno.ENOSPC
        action = ("stop" if nospace else "report") if policy == "enospc" else policy
        if action == "stop":
            self.io_status = "nospace" if nospace else "failed"
        reason = os.strerror(e.errno) if e.errno else str(e)
        self.on_io_error(BlkIoError("read" if read else "write", action, nospace, reason))
        if action == "stop":
            raise _Held() from e
        # failures are not counted in the statistics, ignored or not
        return (S_OK, 0) if action == "ignore" else (S_IOERR, 0)

    def _request_end(self, req: BlkRequest) -> int:
        if req.type == T_OUT:
            return req.sector * SECTOR_SIZE + req.data_len
        return max(((s + n) * SECTOR_SIZE for s, n, _u in req.ranges), default=0)

    def _check_threshold(self, end: int) -> None:
        """As QEMU: checked before the write is made (whether it then succeeds or not);
        ``end`` is one past the last byte the write reaches."""
        threshold = self.write_threshold
        if end > threshold:
            self.write_threshold = 0
            self.on_threshold(end - threshold, threshold)

    def _run(self, req: BlkRequest) -> tuple[int, int]:
        assert self.memory is not None
        b = self.backend
        try:
            views = [self.memory.view(a, n) for a, n in req.data]
        except GuestMemoryError:
            return S_IOERR, 0
        offset = req.sector * SECTOR_SIZE
        if req.type == T_IN:
            b.read_into(offset, views)
            return S_OK, req.data_len
        if req.type == T_OUT:
            if self.detect_zeroes != "off" and req.data_len and _is_zero(views):
                b.write_zeroes(offset, req.data_len, unmap=self.detect_zeroes == "unmap")
            else:
                b.write_from(offset, views)
            if self.writethrough:
                b.flush()
            return S_OK, 0
        if req.type == T_FLUSH:
            b.flush()
            return S_OK, 0
        if req.type == T_GET_ID:
            ident = (self.serial or "").encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
            n = min(req.data_len, ID_BYTES)
            pos = 0
            for v in views:
                take = min(len(v), n - pos)
                v[:take] = ident[pos:pos + take]
                pos += take
                if pos == n:
                    break
            return S_OK, n
        for start, sectors, unmap in req.ranges:
            if req.type == T_DISCARD:
                b.discard(start * SECTOR_SIZE, sectors * SECTOR_SIZE)
            else:
                b.write_zeroes(start * SECTOR_SIZE, sectors * SECTOR_SIZE, unmap=unmap)
        if self.writethrough:
            b.flush()
        return S_OK, 0
