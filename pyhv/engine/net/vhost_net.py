"""The kernel's vhost-net data path for virtio-net (``/dev/vhost-net``).

One vhost-net descriptor serves one queue pair: the kernel reads the guest's
transmit ring and fills its receive ring itself, moving frames between the rings
and the pair's tap queue without a trip through pyhv.  The device's face (its
configuration space, the control queue, the link) stays pyhv's
(:class:`pyhv.engine.virtio.net.VhostNet`); this module is the kernel interface
(``linux/vhost.h``): ownership, features, the memory table (guest physical ranges
and where this process maps them), and per ring its size, base, addresses, kick
and call eventfds and the tap behind it.

Descriptors come from libvirt (``vhostfd=``/``vhostfds=``), or pyhv opens
``/dev/vhost-net`` itself for ``pyhv run``.  A host without it (or a descriptor
the kernel refuses) leaves the NIC on pyhv's userspace data path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Sequence

from pyhv.engine.errors import EngineError
from pyhv.engine.fds import close_fds

DEVICE = "/dev/vhost-net"

# ---- ioctl numbers (asm-generic/ioctl.h encoding; linux/vhost.h's requests) -----------
_IOC_WRITE, _IOC_READ = 1, 2
VHOST_VIRTIO = 0xAF


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | nr


U64 = struct.Struct("<Q")
#: struct vhost_vring_state {unsigned int index; unsigned int num;}
VRING_STATE = struct.Struct("<II")
#: struct vhost_vring_file {unsigned int index; int fd;}
VRING_FILE = struct.Struct("<Ii")
#: struct vhost_vring_addr {index, flags; desc, used, avail, log addresses}
VRING_ADDR = struct.Struct("<IIQQQQ")
#: struct vhost_memory {nregions; padding} and each vhost_memory_region
MEMORY = struct.Struct("<II")
MEMORY_REGION = struct.Struct("<QQQQ")

VHOST_GET_FEATURES = _ioc(_IOC_READ, 0x00, 8)
VHOST_SET_FEATURES = _ioc(_IOC_WRITE, 0x00, 8)
VHOST_SET_OWNER = _ioc(0, 0x01, 0)
VHOST_SET_MEM_TABLE = _ioc(_IOC_WRITE, 0x03, MEMORY.size)
VHOST_SET_VRING_NUM = _ioc(_IOC_WRITE, 0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = _ioc(_IOC_WRITE, 0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = _ioc(_IOC_WRITE, 0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _ioc(_IOC_READ | _IOC_WRITE, 0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = _ioc(_IOC_WRITE, 0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = _ioc(_IOC_WRITE, 0x21, VRING_FILE.size)
VHOST_NET_SET_BACKEND = _ioc(_IOC_WRITE, 0x30, VRING_FILE.size)

#: feature bits vhost-net adds of its own: it writes the virtio-net header itself
#: (for a tap without one); pyhv's taps carry the header, so it is never asked for
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
#: ``vhost_vring_addr.flags``: log writes to the used ring (migration; unused)
VHOST_VRING_F_LOG = 0


class VhostNetError(EngineError):
    """The kernel refused a vhost-net request."""


class VhostNetBackend:
    """The vhost-net descriptors of one NIC, one per queue pair (owned by the
    machine's host resources, as its taps are)."""

    def __init__(self, fds: Sequence[int], what: str) -> None:
        self.fds = list(fds)
        self.what = what
        self.features = 0
        try:
            for fd in self.fds:
                fcntl.ioctl(fd, VHOST_SET_OWNER)
            features = [U64.unpack(fcntl.ioctl(fd, VHOST_GET_FEATURES, bytes(8)))[0]
                        for fd in self.fds]
        except OSError as e:
            raise VhostNetError(f"{what}: vhost-net refused the descriptor: "
                                f"{os.strerror(e.errno or errno.EIO)}") from None
        self.features = _common(features)

    @classmethod
    def open(cls, pairs: int, what: str) -> "VhostNetBackend":
        """``/dev/vhost-net`` opened once per queue pair (:class:`VhostNetError`
        where the host has none or refuses)."""
        fds: list[int] = []
        try:
            for _ in range(pairs):
                fds.append(os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC))
            return cls(fds, what)
        except OSError as e:
            close_fds(fds)
            raise VhostNetError(f"{what}: {DEVICE}: {e.strerror}") from None
        except VhostNetError:
            close_fds(fds)
            raise

    # ---- requests -----------------------------------------------------------------
    def _ioctl(self, pair: int, request: int, arg: bytes, what: str) -> bytes:
        try:
            return fcntl.ioctl(self.fds[pair], request, arg)
        except OSError as e:
            raise VhostNetError(f"{self.what}: vhost-net {what}: "
                                f"{os.strerror(e.errno or errno.EIO)}") from None

    def set_features(self, features: int) -> None:
        for pair in range(len(self.fds)):
            self._ioctl(pair, VHOST_SET_FEATURES, U64.pack(features), "SET_FEATURES")

    def set_mem_table(self, regions: Sequence[tuple[int, int, int]]) -> None:
        """(guest physical address, size, this process's address) of each RAM range."""
        table = MEMORY.pack(len(regions), 0) + b"".join(
            MEMORY_REGION.pack(gpa, size, hva, 0) for gpa, size, hva in regions)
        for pair in range(len(self.fds)):
            self._ioctl(pair, VHOST_SET_MEM_TABLE, table, "SET_MEM_TABLE")

    def set_ring(self, pair: int, ring: int, size: int, desc: int, avail: int, used: int,
                 kick: int, call: int) -> None:
        """Ring ``ring`` of pair ``pair`` (0 receive, 1 transmit) at these host
        addresses, starting at index 0."""
        self._ioctl(pair, VHOST_SET_VRING_NUM, VRING_STATE.pack(ring, size), "SET_VRING_NUM")
        self._ioctl(pair, VHOST_SET_VRING_BASE, VRING_STATE.pack(ring, 0), "SET_VRING_BASE")
        self._ioctl(pair, VHOST_SET_VRING_ADDR,
                    VRING_ADDR.pack(ring, VHOST_VRING_F_LOG, desc, used, avail, 0),
                    "SET_VRING_ADDR")
        self._ioctl(pair, VHOST_SET_VRING_KICK, VRING_FILE.pack(ring, kick), "SET_VRING_KICK")
        self._ioctl(pair, VHOST_SET_VRING_CALL, VRING_FILE.pack(ring, call), "SET_VRING_CALL")

    def set_backend(self, pair: int, ring: int, tap_fd: int) -> None:
        """The tap queue behind a ring (-1: none, the ring stops)."""
        self._ioctl(pair, VHOST_NET_SET_BACKEND, VRING_FILE.pack(ring, tap_fd),
                    "NET_SET_BACKEND")

    def ring_base(self, pair: int, ring: int) -> int:
        """Stop ring ``ring`` of ``pair``; where the kernel got to."""
        out = self._ioctl(pair, VHOST_GET_VRING_BASE, VRING_STATE.pack(ring, 0),
                          "GET_VRING_BASE")
        return VRING_STATE.unpack(out)[1]

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []


def _common(features: list[int]) -> int:
    out = ~0
    for f in features:
        out &= f
    return out


__all__ = ["DEVICE", "VhostNetBackend", "VhostNetError"]
