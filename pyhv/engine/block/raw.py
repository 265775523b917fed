"""Raw images: a regular file or a host block device, byte for byte.

Opening follows QEMU's ``file``/``host_device`` drivers:

* the cache mode picks the open flags: ``writeback`` (and ``default``) none,
  ``none`` O_DIRECT, ``writethrough`` O_DSYNC, ``directsync`` both, ``unsafe``
  none with flushes ignored.  A filesystem that refuses O_DIRECT is reported in
  one line naming the file and the cache modes that work instead;
* the size comes from fstat (regular files) or lseek(SEEK_END) (block devices);
* the image is locked as QEMU locks it (below), so pyhv, QEMU and qemu-img
  see each other's use of an image.

I/O goes straight between the file and guest memory (os.preadv/os.pwritev on
memoryviews).  With O_DIRECT the kernel wants offsets, lengths and buffer
addresses aligned: aligned requests still go straight through; others go
through a page-aligned bounce buffer, and a request that starts or ends inside
a logical block reads, patches and rewrites that block (the last block of a
file whose size is not a multiple of it goes through a second, buffered file
description so that the file never grows).

Discard punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE), write-zeroes uses
ZERO_RANGE (or a hole when unmapping is allowed) and falls back to writing
zeroes where the filesystem refuses.  A failed fdatasync fails every later
flush too (the page cache may have dropped the writes it could not store).

Image locking (QEMU's scheme, ``raw_apply_lock_bytes``/``raw_check_lock_bytes``
in block/file-posix.c): each block permission ``p`` (consistent read 0, write
1, write-unchanged 2, resize 3) has two bytes in the file, ``100 + p`` and
``200 + p``.  A user of the image holds a shared OFD lock on ``100 + p`` for
each permission it uses and on ``200 + p`` for each permission it does not
share with others; it then tests that nobody else holds ``200 + p`` for what it
uses nor ``100 + p`` for what it does not share.  Locks are taken before the
test, so two openers racing both fail rather than both succeed.  A disk holds
consistent read (+ write unless read-only) and shares everything but write
(unless ``shared``, libvirt's ``<shareable/>``, QEMU's share-rw=on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import Iterator, Optional, Sequence

from pyhv.engine.block import SECTOR_SIZE, BlockError, CheckedBackend, ImageLockedError

CACHE_MODES = ("default", "none", "writethrough", "writeback", "directsync", "unsafe")

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _IO(kind: int, nr: int) -> int:
    """<asm-generic/ioctl.h> _IO: no argument size, no direction."""
    return (kind << 8) | nr


# <linux/fs.h>
BLKROGET = _IO(0x12, 94)
BLKSSZGET = _IO(0x12, 104)

# QEMU's block permissions (include/block/block-common.h) and lock bytes
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

#: struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = struct.Struct("@hhqqi4x")

#: bounce buffers (O_DIRECT) and zero-writing are done in pieces of at most this
BOUNCE_MAX = 1 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
#: errors meaning "this filesystem or device does not do that"
_REFUSED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate64 = _libc.fallocate64
_fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate64.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate cannot punch holes)."""
    while _fallocate64(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def permissions(readonly: bool, shared: bool) -> tuple[int, int]:
    """(used, shared) permissions of a disk, as QEMU's block devices take them."""
    used = PERM_CONSISTENT_READ | (0 if readonly else PERM_WRITE)
    share = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE
    if shared:
        share |= PERM_WRITE
    return used, share


def _bits(mask: int) -> Iterator[tuple[int, int]]:
    """(index, bit) of each permission in ``mask``."""
    for i in range(PERM_ALL.bit_length()):
        if mask & (1 << i):
            yield i, 1 << i


def _setlk(fd: int, kind: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))


def _held_by_others(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte ``offset``."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET,
                                                         offset, 1, 0))
    return bool(_FLOCK.unpack(got)[0] != fcntl.F_UNLCK)


def lock_image(fd: int, path: str, used: int, shared: int) -> None:
    """Take QEMU's permission locks on ``fd`` and check nobody conflicts, or raise
    :class:`ImageLockedError` (the locks taken stay with ``fd``: close it)."""
    try:
        for i, _ in _bits(used):
            _setlk(fd, fcntl.F_RDLCK, LOCK_PERM_BASE + i)
        for i, _ in _bits(PERM_ALL & ~shared):
            _setlk(fd, fcntl.F_RDLCK, LOCK_SHARED_BASE + i)
        for i, bit in _bits(used):
            if _held_by_others(fd, LOCK_SHARED_BASE + i):
                raise ImageLockedError(f'{path}: failed to get "{PERM_NAMES[bit]}" lock: '
                                       f"is another process (pyhv, QEMU, qemu-img) using "
                                       f"the image?")
        for i, bit in _bits(PERM_ALL & ~shared):
            if _held_by_others(fd, LOCK_PERM_BASE + i):
                raise ImageLockedError(f'{path}: failed to get shared "{PERM_NAMES[bit]}" '
                                       f"lock: is another process (pyhv, QEMU, qemu-img) "
                                       f"using the image?")
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"{path}: the image is locked by another process (pyhv, "
                                   f"QEMU, qemu-img)") from e
        raise BlockError(f"{path}: cannot lock the image: {e.strerror}") from e


# ---- buffers -------------------------------------------------------------------------
def _round_down(n: int, a: int) -> int:
    return n - n % a


def _round_up(n: int, a: int) -> int:
    return _round_down(n + a - 1, a)


def _bytes_views(buffers: Sequence[memoryview]) -> list[memoryview]:
    out = []
    for b in buffers:
        if type(b) is not memoryview or b.format != "B" or b.ndim != 1:
            b = memoryview(b).cast("B")
        if len(b):
            out.append(b)
    return out


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` less their first ``n`` bytes."""
    i = 0
    while n and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def _slice(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """Bytes ``[start, start + length)`` of the stream the views make."""
    out = []
    for v in views:
        if length <= 0:
            break
        if start >= len(v):
            start -= len(v)
            continue
        piece = v[start:start + length]
        out.append(piece)
        length -= len(piece)
        start = 0
    return out


def _address(v: memoryview) -> Optional[int]:
    """Where a writable buffer lies in this process (None: not knowable)."""
    if v.readonly:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(v))
    except (TypeError, ValueError):
        return None


def _copy_out(src: memoryview, views: list[memoryview]) -> None:
    pos = 0
    for v in views:
        v[:] = src[pos:pos + len(v)]
        pos += len(v)


def _copy_in(views: list[memoryview], dst: memoryview) -> None:
    pos = 0
    for v in views:
        dst[pos:pos + len(v)] = v
        pos += len(v)


class RawBackend(CheckedBackend):
    """A raw image open for a disk (see the module's description)."""

    def __init__(self, path: str, readonly: bool = False, cache: str = "writeback",
                 kind: Optional[str] = None, shared: bool = False, unmap: bool = False,
                 locking: bool = True) -> None:
        if cache not in CACHE_MODES:
            raise BlockError(f"{path}: cache mode {cache!r} is not one of "
                             f"{', '.join(CACHE_MODES)}")
        self.path = path
        self.readonly = readonly
        self.cache = "writeback" if cache == "default" else cache
        self.direct = self.cache in ("none", "directsync")
        self.dsync = self.cache in ("writethrough", "directsync")
        self.can_unmap = unmap and not readonly
        self._flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | \
            (os.O_DIRECT if self.direct else 0) | (os.O_DSYNC if self.dsync else 0)
        self._buffered: Optional[int] = None
        self._flush_error: Optional[str] = None
        self.fd = -1
        try:
            fd = os.open(path, self._flags)
        except OSError as e:
            if self.direct and e.errno == errno.EINVAL:
                raise BlockError(f"{path}: the filesystem refuses O_DIRECT, which "
                                 f"cache={self.cache} needs (use cache=writeback or "
                                 f"cache=writethrough)") from e
            how = "read-only" if readonly else "read-write"
            raise BlockError(f"{path}: cannot open the image {how}: {e.strerror}") from e
        self.fd = fd
        try:
            self._setup(kind, shared, locking)
        except BaseException:
            self.close()
            raise

    def _setup(self, kind: Optional[str], shared: bool, locking: bool) -> None:
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        regular = stat.S_ISREG(st.st_mode)
        if kind == "file" and not regular:
            hint = " (it is a block device: use a disk of type 'block')" if self.is_block \
                else ""
            raise BlockError(f"{self.path}: a disk of type 'file' needs a regular file{hint}")
        if kind == "block" and not self.is_block:
            raise BlockError(f"{self.path}: a disk of type 'block' needs a block device")
        if not regular and not self.is_block:
            raise BlockError(f"{self.path}: neither a regular file nor a block device")
        if self.is_block and not self.readonly:
            try:
                ro = struct.unpack("i", fcntl.ioctl(self.fd, BLKROGET, bytes(4)))[0]
            except OSError:
                ro = 0  # writes will fail with EPERM and say so
            if ro:
                raise BlockError(f"{self.path}: the block device is read-only (blockdev "
                                 f"--getro); open the disk read-only")
        if self.is_block:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            self.size = st.st_size
        #: O_DIRECT: offsets and lengths are multiples of this, and buffer addresses of
        #: ``memory_alignment`` (what QEMU calls request_alignment and buf_align)
        self.request_alignment = 1
        self.memory_alignment = 1
        if self.direct:
            self.request_alignment = self._probe_alignment()
            self.memory_alignment = self.request_alignment
        if locking:
            used, share = permissions(self.readonly, shared)
            lock_image(self.fd, self.path, used, share)

    def _probe_alignment(self) -> int:
        if self.is_block:
            try:
                got = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
                if got > 0:
                    return int(got)
            except OSError:
                pass
        buf = memoryview(mmap.mmap(-1, 4096))
        for align in (512, 1024, 2048, 4096):
            try:
                os.preadv(self.fd, [buf[:align]], 0)
                return align
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return align
        return 4096

    # ---- the interface ------------------------------------------------------------
    @property
    def sectors(self) -> int:
        """The size in whole 512-byte sectors (a partial last sector is not exposed)."""
        return self.size // SECTOR_SIZE

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _bytes_views(buffers)
        total = sum(map(len, views))
        self._check_range(offset, total, "read")
        self.read_views(offset, views, total)

    def read_views(self, offset: int, views: list[memoryview], total: int) -> None:
        """:meth:`read_into` for a format driver stacked on this file (qcow2's data
        clusters): ``views`` are already byte views of ``total`` bytes and the range
        was checked against the format's own layout."""
        if self.direct:
            self._direct(offset, views, total, write=False)
        else:
            self._preadv(self.fd, offset, views, total)

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._check_writable()
        views = _bytes_views(buffers)
        total = sum(map(len, views))
        self._check_range(offset, total, "write")
        if self.direct:
            self._direct(offset, views, total, write=True)
        else:
            self._pwritev(self.fd, offset, views)

    def flush(self) -> None:
        if self.fd < 0:
            raise BlockError(f"{self.path}: the image is closed")
        if self.cache == "unsafe" or self.readonly:
            return
        if self._flush_error is not None:
            raise BlockError(f"{self.path}: flush failed earlier ({self._flush_error}); "
                             f"writes may have been lost")
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            if not self.direct:  # the page cache may have marked unwritten pages clean
                self._flush_error = e.strerror
            raise BlockError(f"{self.path}: flush failed: {e.strerror}") from e

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length, "discard")
        if not self.can_unmap or not length:
            return  # discard='ignore': a hint the host may ignore
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in _REFUSED:
                return
            raise BlockError(f"{self.path}: discard of {length} bytes at {offset} "
                             f"failed: {e.strerror}") from e
        self._sync_metadata()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length, "write-zeroes")
        if not length:
            return
        modes = [FALLOC_FL_ZERO_RANGE]
        if unmap and self.can_unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
            except OSError as e:
                if e.errno in _REFUSED:
                    continue
                raise BlockError(f"{self.path}: write-zeroes of {length} bytes at {offset} "
                                 f"failed: {e.strerror}") from e
            self._sync_metadata()
            return
        zeroes = memoryview(mmap.mmap(-1, min(length, BOUNCE_MAX)))  # page-aligned
        done = 0
        while done < length:
            n = min(len(zeroes), length - done)
            self.write_from(offset + done, [zeroes[:n]])
            done += n

    def resize(self, size: int) -> None:
        """Grow or shrink the disk to ``size`` bytes.  A regular file is truncated
        (growing leaves a hole that reads as zeroes); a block device cannot grow past
        what the kernel reports, but may show less of itself, as QEMU allows."""
        if self.fd < 0:
            raise BlockError(f"{self.path}: the image is closed")
        if size < 0:
            raise BlockError(f"{self.path}: a size of {size} bytes")
        if self.readonly:
            raise BlockError(f"{self.path}: the image is open read-only and cannot be "
                             f"resized")
        if self.is_block:
            device = os.lseek(self.fd, 0, os.SEEK_END)
            if size > device:
                raise BlockError(f"{self.path}: cannot grow a block device past its "
                                 f"{device} bytes")
        else:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                raise BlockError(f"{self.path}: cannot resize the image to {size} bytes: "
                                 f"{e.strerror}") from e
            self._sync_metadata()
        self.size = size

    def close(self) -> None:
        """Close the image; its locks go with the file description."""
        for fd in (self._buffered, self.fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._buffered, self.fd = None, -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def _sync_metadata(self) -> None:
        """fallocate is not covered by O_DSYNC: make it stable as a write would be."""
        if self.dsync:
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise BlockError(f"{self.path}: flush failed: {e.strerror}") from e

    # ---- plain vectored I/O -------------------------------------------------------------
    def _preadv(self, fd: int, offset: int, views: list[memoryview],
                total: Optional[int] = None) -> None:
        pos = offset
        left = sum(len(v) for v in views) if total is None else total
        while views:
            try:
                n = os.preadv(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], pos)
            except OSError as e:
                raise BlockError(f"{self.path}: read at {pos} failed: {e.strerror}") from e
            if n == left:  # all of it (the usual case)
                return
            if n == 0:  # the file shrank under us: what is not there reads as zeroes
                for v in views:
                    v[:] = bytes(len(v))
                return
            pos += n
            left -= n
            views = _advance(views, n)

    def _pwritev(self, fd: int, offset: int, views: list[memoryview]) -> None:
        pos = offset
        while views:
            try:
                n = os.pwritev(fd, views[:_IOV_MAX], pos)
            except OSError as e:
                raise BlockError(f"{self.path}: write at {pos} failed: {e.strerror}") from e
            if n == 0:
                raise BlockError(f"{self.path}: write at {pos} made no progress")
            pos += n
            views = _advance(views, n)

    # ---- O_DIRECT -------------------------------------------------------------------
    def _direct(self, offset: int, views: list[memoryview], total: int, write: bool) -> None:
        a = self.request_alignment
        end = offset + total
        head_end = min(_round_up(offset, a), end)
        tail_start = max(_round_down(end, a), head_end)
        if head_end > offset:
            self._partial_block(offset, _slice(views, 0, head_end - offset), write)
        if tail_start > head_end:
            self._aligned(head_end, _slice(views, head_end - offset, tail_start - head_end),
                          write)
        if end > tail_start:
            self._partial_block(tail_start, _slice(views, tail_start - offset,
                                                   end - tail_start), write)

    def _aligned(self, offset: int, views: list[memoryview], write: bool) -> None:
        """``offset`` and the total length are aligned; the buffers may not be."""
        a, m = self.request_alignment, self.memory_alignment
        if all(len(v) % a == 0 and (addr := _address(v)) is not None and addr % m == 0
               for v in views):
            (self._pwritev if write else self._preadv)(self.fd, offset, views)
            return
        total = sum(len(v) for v in views)
        # an anonymous mapping is page-aligned; it goes when the last view of it does
        buf = memoryview(mmap.mmap(-1, _round_up(min(total, BOUNCE_MAX), a)))
        done = 0
        while done < total:
            n = min(len(buf), total - done)
            part = _slice(views, done, n)
            if write:
                _copy_in(part, buf[:n])
                self._pwritev(self.fd, offset + done, [buf[:n]])
            else:
                self._preadv(self.fd, offset + done, [buf[:n]])
                _copy_out(buf[:n], part)
            done += n

    def _partial_block(self, offset: int, views: list[memoryview], write: bool) -> None:
        """Bytes inside one aligned block: read it whole (and patch and rewrite it)."""
        a = self.request_alignment
        start = _round_down(offset, a)
        if write and start + a > self.size:
            # the file's last, partial block: O_DIRECT cannot write it without growing
            # the file, a buffered description of the same file can
            self._pwritev(self._buffered_fd(), offset, views)
            return
        buf = memoryview(mmap.mmap(-1, a))
        self._preadv(self.fd, start, [buf])
        inner = buf[offset - start:offset - start + sum(len(v) for v in views)]
        if write:
            _copy_in(views, inner)
            self._pwritev(self.fd, start, [buf])
        else:
            _copy_out(inner, views)

    def _buffered_fd(self) -> int:
        if self._buffered is None:
            try:
                self._buffered = os.open(f"/proc/self/fd/{self.fd}",
                                         self._flags & ~os.O_DIRECT)
            except OSError as e:
                raise BlockError(f"{self.path}: cannot reopen the image without O_DIRECT: "
                                 f"{e.strerror}") from e
        return self._buffered
