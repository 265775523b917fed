"""Host block backends: what a disk's bytes are read from and written to.

A backend is the host side of a disk (virtio-blk, later vhost-user and other
front ends): it knows a file or block device and nothing about virtio.  Its
interface is small and byte-addressed:

* ``read_into(offset, buffers)`` fills the buffers (guest memory views, zero
  copy) from ``offset``; ``write_from(offset, buffers)`` writes them;
* ``flush()`` makes everything written so far stable;
* ``discard(offset, length)`` may deallocate a range (its contents become
  undefined, in practice zeroes), ``write_zeroes(offset, length, unmap)`` makes a
  range read as zeroes (deallocating it when ``unmap`` and the disk allows it);
* ``size`` (bytes), ``readonly``, ``close()``.

Backends: :mod:`~pyhv.engine.block.raw` (files and block devices byte for byte)
and :mod:`~pyhv.engine.block.qcow2` (qcow2 images and their backing chains, on
top of a raw backend for the image file).

Every call either completes or raises a :class:`BlockError` whose message is
one line naming the file.  Calls are synchronous and keep no per-request state
in the backend object, so a later worker thread (or io_uring) can run them off
the engine's loop without changing the interface.

:func:`open_disk` opens the backend a :class:`~pyhv.config.DiskConfig` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Sequence, TypeVar

from pyhv.engine.errors import EngineError

if TYPE_CHECKING:
    from pyhv.config import DiskConfig

_B = TypeVar("_B", bound="CheckedBackend")

#: the unit of virtio-blk addressing (and of every backend's size)
SECTOR_SIZE = 512


class BlockError(EngineError):
    """A disk image cannot be opened or an I/O on it failed (one line, names the file)."""

    @property
    def errno(self) -> Optional[int]:
        """The host's errno behind the failure (raised ``from`` an OSError), if any."""
        cause = self.__cause__
        return cause.errno if isinstance(cause, OSError) else None


class ImageLockedError(BlockError):
    """Another process (pyhv, QEMU, qemu-img) holds the image in a conflicting way."""


class UnsupportedFormatError(BlockError):
    """The image format has no backend (yet)."""


class BlockBackend(Protocol):
    path: str
    #: bytes the guest may address
    size: int
    readonly: bool
    #: discard may deallocate (the disk was configured with discard='unmap')
    can_unmap: bool

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order with the bytes from ``offset`` on."""

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write ``buffers`` in order to the bytes from ``offset`` on."""

    def flush(self) -> None:
        """Everything written so far reaches stable storage."""

    def discard(self, offset: int, length: int) -> None:
        """Deallocate ``length`` bytes at ``offset`` if the host can (else nothing)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """``length`` bytes at ``offset`` read back as zeroes afterwards."""

    def resize(self, size: int) -> None:
        """Make the disk ``size`` bytes long (QMP block_resize)."""

    def close(self) -> None:
        """Release the file and its locks."""


class CheckedBackend:
    """What every backend checks before an I/O, and its use as a context manager
    (subclasses have ``path``, ``size``, ``readonly``, ``closed`` and ``close``)."""

    path: str
    size: int
    readonly: bool

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        if self.readonly:
            raise BlockError(f"{self.path}: the image is open read-only")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if self.closed:
            raise BlockError(f"{self.path}: the image is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(f"{self.path}: {what} of {length} bytes at {offset} is beyond "
                             f"the image's {self.size} bytes")


def open_disk(disk: "DiskConfig") -> BlockBackend:
    """Open the backend of ``disk``: a raw file or block device, or a qcow2 image
    with its backing chain."""
    cache = disk.cache or "writeback"
    if disk.format == "qcow2":
        from pyhv.engine.block.qcow2 import Qcow2Backend

        return Qcow2Backend(disk.path, readonly=disk.readonly, cache=cache,
                            kind=disk.source_type, shared=disk.shareable,
                            unmap=disk.discard == "unmap", backing=disk.backing,
                            l2_cache_size=disk.l2_cache_size)
    if disk.format != "raw":
        raise UnsupportedFormatError(f"{disk.path}: image format {disk.format!r} is not "
                                     f"supported (raw and qcow2 are)")
    from pyhv.engine.block.raw import RawBackend

    return RawBackend(disk.path, readonly=disk.readonly, cache=cache,
                      kind=disk.source_type, shared=disk.shareable,
                      unmap=disk.discard == "unmap")
