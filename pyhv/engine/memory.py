"""Guest physical memory as a type.

Every access from loaders and devices goes through :class:`GuestMemory`: reads
and writes are bounds-checked at the moment of access and either complete
whole or raise :class:`InvalidGuestAddress` (no partial transfers, no raw
pointer arithmetic outside this module).  Device code depends only on this
interface, never on how the memory was mapped: the same class serves
``mmap``-backed RAM for KVM and ``bytearray`` RAM for tests without KVM.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

from pyhv.engine.errors import EngineError

if TYPE_CHECKING:
    from pyhv.config import MemoryBackingConfig

Buffer = Union[bytes, bytearray, memoryview]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


_FENCE = threading.Lock()


def memory_fence() -> None:
    """A full memory barrier: this thread's earlier stores to memory another CPU
    reads (a guest's, another process's) are visible before its later loads.  x86
    lets a load pass an earlier store to another address, so a device that
    publishes a ring index and then reads the driver's event index needs this, as
    the driver needs its own between the same two accesses the other way round
    (Linux's virtio_mb): without both, each side can miss the other's update and
    the driver waits for an interrupt that never comes.  An uncontended lock's
    acquire and release are locked instructions, which order both on x86."""
    _FENCE.acquire()
    _FENCE.release()


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
    #: punch the contents out of the backing file on close (``discard-data``)
    discard: bool = False

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
        self._fast_region()

    def _fast_region(self) -> None:
        """The lowest region, checked inline by the accessors before the general
        lookup (rings and buffers of small guests lie there), and the region the
        last other access hit (a big guest's memory above 4 GiB, a vhost-user
        frontend's second region): one tuple, swapped whole, so that threads
        racing on it each see a consistent (first, end, view)."""
        if self._views:
            self._lo_first, self._lo_end = self._bounds[0]
            self._lo_view: Optional[memoryview] = self._views[0]
            self._hit: tuple[int, int, Optional[memoryview]] = (*self._bounds[0],
                                                                self._views[0])
        else:  # closed or empty: no address passes the inline check
            self._lo_first, self._lo_end, self._lo_view = 1, 0, None
            self._hit = (1, 0, None)

    def _slow(self, addr: int, size: int) -> tuple[memoryview, int]:
        """The view of the region holding ``[addr, addr+size)`` and the offset in it
        (the last-hit cache updated), or raise."""
        i = self.region_index(addr, size)
        first, end = self._bounds[i]
        view = self._views[i]
        self._hit = (first, end, view)
        return view, addr - first

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
    def allocate(cls, ranges: Iterable[tuple[int, int]], backing: "MemoryBackingConfig",
                 shared: bool = False, settle: bool = True) -> "GuestMemory":
        """Guest RAM as ``<memoryBacking>`` / QEMU's memory backends describe it.

        anonymous: private anonymous pages (a memfd when shared); memfd: one memfd,
        shared or private; file: a file in ``backing.path`` (a directory gets an
        unlinked file, as QEMU makes one); hugepages: hugetlb pages of the size
        asked (memfd with MFD_HUGETLB, or a file on hugetlbfs), refused with one line
        when the host has too few free.  Then :meth:`settle` (unless ``settle`` is
        false: a caller that binds the RAM to host nodes first calls it after).
        """
        ranges = list(ranges)
        total = sum(s for _, s in ranges)
        page = 0
        if backing.hugepages:
            page = _hugepage_size(backing)
            for _addr, size in ranges:
                if size % page:
                    raise GuestMemoryError(
                        f"memory backing: guest RAM ({_fmt(total)}) is not a multiple of the "
                        f"{_fmt(page)} hugepage size")
            _check_free_hugepages(page, total // page)
        if backing.locked:
            _check_memlock(total)
        if backing.path is not None or (backing.source == "file" and not backing.hugepages):
            fd = _open_backing_file(backing.path, total, page)
        elif backing.hugepages or backing.source == "memfd" or shared:
            flags = os.MFD_CLOEXEC
            if page:
                flags |= _MFD_HUGETLB | (page.bit_length() - 1) << _MFD_HUGE_SHIFT
            try:
                fd = os.memfd_create("pyhv-guest-ram", flags)
                os.ftruncate(fd, total)
            except OSError as e:
                raise GuestMemoryError(f"memfd: cannot create guest memory: {e.strerror}") \
                    from e
        else:
            memory = cls.anonymous(ranges)
            if settle:
                memory.settle(backing)
            return memory
        regions: list[GuestRegion] = []
        offset = 0
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        try:
            for addr, size in ranges:
                try:
                    buf = mmap.mmap(fd, size, flags=flags,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                except OSError as e:
                    if page and e.errno == errno.ENOMEM:
                        raise GuestMemoryError(
                            f"memory backing: the host ran out of free {_fmt(page)} "
                            f"hugepages mapping {_fmt(size)} of guest RAM "
                            f"({_hugepage_dir(page)}/free_hugepages)") from e
                    raise GuestMemoryError(f"cannot map {_fmt(size)} of guest memory: "
                                           f"{e.strerror}") from e
                # a private mapping is this process's alone: no descriptor to share
                regions.append(GuestRegion(addr, size, buf, fd=fd if shared else -1,
                                           fd_offset=offset, discard=backing.discard))
                offset += size
        except GuestMemoryError:
            for r in regions:
                r.buffer.close()  # type: ignore[union-attr]
            os.close(fd)
            raise
        if not shared:
            os.close(fd)
        memory = cls(regions)
        if settle:
            try:
                memory.settle(backing)
            except GuestMemoryError:
                memory.close()
                raise
        return memory

    def settle(self, backing: "MemoryBackingConfig") -> None:
        """KSM advice (MADV_MERGEABLE unless ``merge`` is off), preallocation and
        mlock (``locked``) of every region, as QEMU does them."""
        for r in self.regions:
            buf = r.buffer
            assert isinstance(buf, mmap.mmap)
            # as QEMU: errors ignored (KSM skips shared and hugetlb mappings itself)
            try:
                buf.madvise(mmap.MADV_MERGEABLE if backing.merge else mmap.MADV_UNMERGEABLE)
            except OSError:
                pass
            if backing.prealloc and not backing.locked:  # mlock populates anyway
                _populate(buf, r.size)
            if backing.locked:
                _mlock(buf, r.size)

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

    def host_address(self, addr: int, size: int) -> int:
        """Where ``[addr, addr+size)`` (within one region) is in this process (for
        the kernel's vhost, which reads guest RAM through pyhv's mappings)."""
        r = self.regions[self.region_index(addr, size)]
        return ctypes.addressof(ctypes.c_char.from_buffer(r.buffer)) + addr - r.guest_addr

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
        first = self._lo_first
        if first <= addr and 0 <= size and addr + size <= self._lo_end:
            off = addr - first
            return self._lo_view[off:off + size]  # type: ignore[index]
        first, end, v = self._hit
        if first <= addr and 0 <= size and addr + size <= end:
            off = addr - first
            return v[off:off + size]  # type: ignore[index]
        v, off = self._slow(addr, size)
        return v[off:off + size]

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.view(addr, size))

    def write(self, addr: int, data: Buffer) -> None:
        src = memoryview(data).cast("B")
        self.view(addr, src.nbytes)[:] = src

    def fill(self, addr: int, size: int, byte: int = 0) -> None:
        v = self.view(addr, size)
        v[:] = bytes([byte]) * size

    def _unpack(self, s: struct.Struct, addr: int) -> int:
        first = self._lo_first
        if first <= addr and addr + s.size <= self._lo_end:
            return s.unpack_from(self._lo_view, addr - first)[0]  # type: ignore[arg-type,no-any-return]
        first, end, v = self._hit
        if first <= addr and addr + s.size <= end:
            return s.unpack_from(v, addr - first)[0]  # type: ignore[arg-type,no-any-return]
        v, off = self._slow(addr, s.size)
        return s.unpack_from(v, off)[0]  # type: ignore[no-any-return]

    def _pack(self, s: struct.Struct, addr: int, value: int) -> None:
        # never ``pack_into``: it zero-fills the destination before it stores, so
        # a guest CPU reading a ring index meanwhile could see 0; a slice assignment
        # copies the packed bytes in one go (one store for an aligned index)
        n = s.size
        first = self._lo_first
        if first <= addr and addr + n <= self._lo_end:
            off = addr - first
            self._lo_view[off:off + n] = s.pack(value)  # type: ignore[index]
            return
        first, end, v = self._hit
        if first <= addr and addr + n <= end:
            off = addr - first
            v[off:off + n] = s.pack(value)  # type: ignore[index]
            return
        v, off = self._slow(addr, n)
        v[off:off + n] = s.pack(value)

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
        first = self._lo_first
        if first <= addr and addr + s.size <= self._lo_end:
            return s.unpack_from(self._lo_view, addr - first)  # type: ignore[arg-type]
        first, end, v = self._hit
        if first <= addr and addr + s.size <= end:
            return s.unpack_from(v, addr - first)  # type: ignore[arg-type]
        v, off = self._slow(addr, s.size)
        return s.unpack_from(v, off)

    def write_struct(self, fmt: Union[str, struct.Struct], addr: int, *values: object) -> None:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
        n = s.size  # as _pack: packed, then copied (pack_into zero-fills first)
        first = self._lo_first
        if first <= addr and addr + n <= self._lo_end:
            off = addr - first
            self._lo_view[off:off + n] = s.pack(*values)  # type: ignore[index]
            return
        first, end, v = self._hit
        if first <= addr and addr + n <= end:
            off = addr - first
            v[off:off + n] = s.pack(*values)  # type: ignore[index]
            return
        v, off = self._slow(addr, n)
        v[off:off + n] = s.pack(*values)

    def close(self) -> None:
        """Release the host mappings (the guest must no longer run)."""
        for v in self._views:
            v.release()
        self._views = []
        self._bounds = ()
        self._fast_region()
        regions, self.regions = self.regions, ()
        busy = None
        for fd in {r.fd for r in regions if r.fd >= 0}:
            os.close(fd)
        for r in regions:
            if isinstance(r.buffer, mmap.mmap):
                if r.discard and not r.buffer.closed:
                    try:  # QEMU's discard-data: the file's contents go, not to disk
                        r.buffer.madvise(mmap.MADV_REMOVE)
                    except OSError:
                        pass
                try:
                    r.buffer.close()
                except BufferError as e:  # someone still holds a view: unmapped when freed
                    busy = e
        if busy is not None:
            raise GuestMemoryError(f"guest memory still in use: {busy}") from busy


# ---- host memory: hugepages, locking ---------------------------------------------

_MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 4)
_MFD_HUGE_SHIFT = 26
_HUGEPAGES = "/sys/kernel/mm/hugepages"
_HUGETLBFS_MAGIC = 0x958458F6
_CAP_IPC_LOCK = 14
_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)


def _fmt(n: int) -> str:
    from pyhv.config import format_size

    return format_size(n)


def _hugepage_dir(page: int) -> str:
    return f"{_HUGEPAGES}/hugepages-{page >> 10}kB"


def host_hugepage_sizes() -> list[int]:
    """The hugepage sizes this host's kernel offers, in bytes."""
    try:
        names = os.listdir(_HUGEPAGES)
    except OSError:
        return []
    return sorted(int(n[len("hugepages-"):-2]) << 10 for n in names
                  if n.startswith("hugepages-") and n.endswith("kB"))


def default_hugepage_size() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_hugepages(page: int) -> Optional[int]:
    """Hugepages of ``page`` bytes free and not reserved (None: no such size)."""
    d = _hugepage_dir(page)
    try:
        with open(f"{d}/free_hugepages") as f:
            free = int(f.read())
        with open(f"{d}/resv_hugepages") as f:
            resv = int(f.read())
    except (OSError, ValueError):
        return None
    return max(free - resv, 0)


def hugetlbfs_page_size(path: str) -> Optional[int]:
    """The page size of the hugetlbfs ``path`` lives on (None: not hugetlbfs)."""
    best = ""
    fstype = ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and \
                        len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        return None
    if fstype != "hugetlbfs":
        return None
    return os.statvfs(path).f_bsize


def _hugepage_size(backing: "MemoryBackingConfig") -> int:
    sizes = host_hugepage_sizes()
    listed = ", ".join(_fmt(s) for s in sizes) or "none"
    if backing.path is not None:
        where = backing.path if os.path.isdir(backing.path) else \
            os.path.dirname(backing.path) or "."
        try:
            fs_page = hugetlbfs_page_size(where)
        except OSError as e:
            raise GuestMemoryError(f"memory backing: {where}: {e.strerror}") from e
        if fs_page is None:
            raise GuestMemoryError(f"memory backing: {where} is not on hugetlbfs (mount "
                                   "one: mount -t hugetlbfs -o pagesize=2M none DIR)")
        if backing.hugepage_size is not None and backing.hugepage_size != fs_page:
            raise GuestMemoryError(
                f"memory backing: {where} has {_fmt(fs_page)} hugepages, not the "
                f"{_fmt(backing.hugepage_size)} asked for")
        return fs_page
    page = backing.hugepage_size or default_hugepage_size()
    if page is None or page not in sizes:
        what = _fmt(page) if page else "any size"
        raise GuestMemoryError(f"memory backing: this host has no hugepages of {what} "
                               f"(sizes it has: {listed})")
    return page


def _check_free_hugepages(page: int, need: int) -> None:
    free = free_hugepages(page)
    if free is None:
        raise GuestMemoryError(f"memory backing: this host has no {_fmt(page)} hugepages")
    if free < need:
        raise GuestMemoryError(
            f"memory backing: guest RAM needs {need} hugepages of {_fmt(page)}, the host has "
            f"{free} free (reserve more: echo N > {_hugepage_dir(page)}/nr_hugepages)")


def _open_backing_file(path: Optional[str], total: int, page: int) -> int:
    """A descriptor for file-backed RAM of ``total`` bytes: an unlinked new file in
    a directory (``path`` None: the temporary directory), or the file ``path``."""
    import tempfile

    where = path if path is not None else tempfile.gettempdir()
    try:
        if os.path.isdir(where):
            fd = os.open(where, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        else:
            fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, total)
    except OSError as e:
        if page and e.errno in (errno.ENOMEM, errno.ENOSPC):
            raise GuestMemoryError(f"memory backing: {where}: too few free {_fmt(page)} "
                                   "hugepages") from e
        raise GuestMemoryError(f"memory backing: {where}: cannot create guest memory: "
                               f"{e.strerror}") from e
    return fd


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _limit_text(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else _fmt(n) if n else "0 bytes"


def _check_memlock(total: int) -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < total and not _has_cap_ipc_lock():
        raise GuestMemoryError(
            f"memory backing: locked memory needs {_fmt(total)} but RLIMIT_MEMLOCK is "
            f"{_limit_text(soft)} (raise it: ulimit -l, prlimit --memlock; libvirt: "
            "<memtune><hard_limit>)")


def _address(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _mlock(buf: mmap.mmap, size: int) -> None:
    if _libc.mlock(ctypes.c_void_p(_address(buf)), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        raise GuestMemoryError(
            f"memory backing: cannot lock {_fmt(size)} of guest RAM: {os.strerror(err)} "
            f"(RLIMIT_MEMLOCK is {_limit_text(soft)}; raise it: ulimit -l, prlimit "
            "--memlock; libvirt: <memtune><hard_limit>)")


def _populate(buf: mmap.mmap, size: int) -> None:
    """Fault every page in now (QEMU's prealloc)."""
    try:
        buf.madvise(_MADV_POPULATE_WRITE)  # Linux 5.14
        return
    except OSError as e:
        if e.errno in (errno.ENOMEM, errno.EFAULT):
            raise GuestMemoryError(f"memory backing: cannot preallocate {_fmt(size)} of "
                                   f"guest RAM: {e.strerror}") from e
    step = mmap.PAGESIZE
    for off in range(0, size, step):
        buf[off] = buf[off]
