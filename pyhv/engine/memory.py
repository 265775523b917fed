"""Guest physical memory as a type.

Every access from loaders and devices goes through :class:`GuestMemory`: reads
and writes are bounds-checked at the moment of access and either complete
whole or raise :class:`InvalidGuestAddress` (no partial transfers, no raw
pointer arithmetic outside this module).  Device code depends only on this
interface, never on how the memory was mapped: the same class serves
``mmap``-backed RAM for KVM and ``bytearray`` RAM for tests without KVM.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from pyhv.engine.errors import EngineError

Buffer = Union[bytes, bytearray, memoryview]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(EngineError):
    """Guest memory could not be created or accessed."""


class InvalidGuestAddress(GuestMemoryError):
    """An access touched guest-physical addresses that are not RAM."""

    def __init__(self, addr: int, size: int) -> None:
        super().__init__(f"guest address range 0x{addr:x}+0x{size:x} is not RAM")
        self.addr = addr
        self.size = size


@dataclass
class GuestRegion:
    """One contiguous run of guest RAM and the host buffer behind it."""

    guest_addr: int
    size: int
    buffer: Union[mmap.mmap, bytearray]
    #: file descriptor behind the mapping (memfd or file), -1 for anonymous
    fd: int = -1
    #: offset of this region within ``fd``
    fd_offset: int = 0

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """Guest RAM made of non-overlapping regions, sorted by address."""

    def __init__(self, regions: Sequence[GuestRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.guest_addr:
                raise GuestMemoryError(
                    f"guest memory regions overlap at 0x{b.guest_addr:x}")
        self.regions: tuple[GuestRegion, ...] = tuple(ordered)
        self._views = [memoryview(r.buffer) for r in ordered]
        #: (first, one past the last) guest address of each region: the hot lookup
        self._bounds: tuple[tuple[int, int], ...] = tuple((r.guest_addr, r.end)
                                                          for r in ordered)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_bytearrays(cls, ranges: Iterable[tuple[int, int]]) -> "GuestMemory":
        """RAM in plain bytearrays: for device and loader tests without KVM."""
        return cls([GuestRegion(a, s, bytearray(s)) for a, s in ranges])

    @classmethod
    def anonymous(cls, ranges: Iterable[tuple[int, int]]) -> "GuestMemory":
        """Private anonymous mappings, faulted in lazily by the host."""
        regions = []
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) \
            | getattr(mmap, "MAP_NORESERVE", 0x4000)
        for addr, size in ranges:
            try:
                buf = mmap.mmap(-1, size, flags=flags,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise GuestMemoryError(
                    f"cannot map {size >> 20} MiB of guest memory: {e.strerror}") from e
            regions.append(GuestRegion(addr, size, buf))
        return cls(regions)

    @classmethod
    def shared_fd(cls, ranges: Iterable[tuple[int, int]], *, path: str | None = None,
                  hugepages: bool = False) -> "GuestMemory":
        """Shared mappings of one memfd (or of the file at ``path``).

        Shared memory is what another process (a vhost-user backend) can map.
        """
        ranges = list(ranges)
        total = sum(s for _, s in ranges)
        try:
            if path is None:
                flags = os.MFD_CLOEXEC | (getattr(os, "MFD_HUGETLB", 4) if hugepages else 0)
                fd = os.memfd_create("pyhv-guest-ram", flags)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, total)
        except OSError as e:
            where = path or "memfd"
            raise GuestMemoryError(f"{where}: cannot create guest memory: {e.strerror}") from e
        regions = []
        offset = 0
        for addr, size in ranges:
            try:
                buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            except OSError as e:
                raise GuestMemoryError(
                    f"cannot map {size >> 20} MiB of shared guest memory: {e.strerror}") from e
            regions.append(GuestRegion(addr, size, buf, fd=fd, fd_offset=offset))
            offset += size
        return cls(regions)

    @classmethod
    def from_fds(cls, regions: Iterable[tuple[int, int, int, int]]) -> "GuestMemory":
        """Shared mappings of descriptors another process gave (a vhost-user frontend's
        memory table): ``(guest_addr, size, fd, offset)`` each, ``offset`` page-aligned.

        On success the memory owns the descriptors (:meth:`close` closes them); on
        failure nothing stays mapped and the descriptors are still the caller's.
        """
        out: list[GuestRegion] = []
        try:
            for addr, size, fd, offset in regions:
                try:
                    buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                except (OSError, ValueError, OverflowError) as e:
                    why = e.strerror if isinstance(e, OSError) else str(e)
                    raise GuestMemoryError(f"cannot map guest memory at 0x{addr:x}+0x{size:x} "
                                           f"(offset 0x{offset:x}): {why}") from e
                out.append(GuestRegion(addr, size, buf, fd=fd, fd_offset=offset))
            return cls(out)
        except GuestMemoryError:
            for r in out:
                assert isinstance(r.buffer, mmap.mmap)
                r.buffer.close()
            raise

    # ---- queries ------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest RAM address."""
        return self.regions[-1].end if self.regions else 0

    def region_index(self, addr: int, size: int) -> int:
        """Index of the region holding all of ``[addr, addr+size)``, or raise."""
        if size < 0 or addr < 0:
            raise InvalidGuestAddress(addr, size)
        end = addr + size
        for i, (first, last) in enumerate(self._bounds):
            if first <= addr and end <= last:
                return i
        raise InvalidGuestAddress(addr, size)

    def contains(self, addr: int, size: int = 1) -> bool:
        try:
            self.region_index(addr, size)
        except InvalidGuestAddress:
            return False
        return True

    # ---- access -------------------------------------------------------
    def view(self, addr: int, size: int) -> memoryview:
        """A writable view of ``size`` bytes at ``addr`` (for zero-copy I/O).

        The view is checked now; keep it only for the duration of one request.
        """
        i = self.region_index(addr, size)
        off = addr - self.regions[i].guest_addr
        return self._views[i][off:off + size]

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.view(addr, size))

    def write(self, addr: int, data: Buffer) -> None:
        src = memoryview(data).cast("B")
        self.view(addr, src.nbytes)[:] = src

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        v = self.view(addr, size)
        v[:] = bytes([byte]) * size

    def _unpack(self, s: struct.Struct, addr: int) -> int:
        i = self.region_index(addr, s.size)
        return s.unpack_from(self._views[i], addr - self.regions[i].guest_addr)[0]  # type: ignore[no-any-return]

    def _pack(self, s: struct.Struct, addr: int, value: int) -> None:
        i = self.region_index(addr, s.size)
        s.pack_into(self._views[i], addr - self.regions[i].guest_addr, value)

    def read_u8(self, addr: int) -> int:
        return self._unpack(_U8, addr)

    def read_u16(self, addr: int) -> int:
        return self._unpack(_U16, addr)

    def read_u32(self, addr: int) -> int:
        return self._unpack(_U32, addr)

    def read_u64(self, addr: int) -> int:
        return self._unpack(_U64, addr)

    def write_u8(self, addr: int, value: int) -> None:
        self._pack(_U8, addr, value)

    def write_u16(self, addr: int, value: int) -> None:
        self._pack(_U16, addr, value)

    def write_u32(self, addr: int, value: int) -> None:
        self._pack(_U32, addr, value)

    def write_u64(self, addr: int, value: int) -> None:
        self._pack(_U64, addr, value)

    def read_struct(self, fmt: Union[str, struct.Struct], addr: int) -> tuple:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        i = self.region_index(addr, s.size)
        return s.unpack_from(self._views[i], addr - self.regions[i].guest_addr)

    def write_struct(self, fmt: Union[str, struct.Struct], addr: int, *values: object) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        i = self.region_index(addr, s.size)
        s.pack_into(self._views[i], addr - self.regions[i].guest_addr, *values)

    def close(self) -> None:
        """Release the host mappings (the guest must no longer run)."""
        for v in self._views:
            v.release()
        self._views = []
        self._bounds = ()
        regions, self.regions = self.regions, ()
        busy = None
        for fd in {r.fd for r in regions if r.fd >= 0}:
            os.close(fd)
        for r in regions:
            if isinstance(r.buffer, mmap.mmap):
                try:
                    r.buffer.close()
                except BufferError as e:  # someone still holds a view: unmapped when freed
                    busy = e
        if busy is not None:
            raise GuestMemoryError(f"guest memory still in use: {busy}") from busy
