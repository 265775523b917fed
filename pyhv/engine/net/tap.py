"""Tap devices: the host end of a virtio-net NIC.

A :class:`Tap` is one tap interface with one descriptor per queue pair.  It is
either opened by name through /dev/net/tun (``pyhv run``: created if missing,
``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, plus ``IFF_MULTI_QUEUE`` for several
pairs; brought up and, if asked, put on a bridge) or adopted from descriptors
libvirt opened (``-netdev tap,fd=N`` / ``fds=a:b``), which are checked to be
taps.  With a vnet header (the usual case) the tap and virtio-net share the
12-byte ``virtio_net_hdr_mrg_rxbuf`` layout, so frames pass in both directions
without being rewritten and the kernel does the checksum and segmentation
offloads the guest negotiated (``TUNSETOFFLOAD``).

Errors are one line naming the interface (or the descriptor) and the reason.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Optional

from pyhv.engine.errors import EngineError
from pyhv.engine.fds import close_fds

TUN_PATH = "/dev/net/tun"

# ioctls (linux/if_tun.h, linux/sockios.h)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2

IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: virtio_net_hdr_mrg_rxbuf: what the tap is told to read and write in front of frames
VNET_HDR_SIZE = 12
IFNAMSIZ = 16


class TapError(EngineError):
    """A tap could not be opened or set up (one line, names the interface)."""


def _ifreq(name: str, flags: int = 0) -> bytes:
    return struct.pack("16sH22x", os.fsencode(name), flags)


class Tap:
    """A tap interface's queue descriptors (non-blocking), and what it can do."""

    def __init__(self, name: str, fds: list[int], vnet_hdr: bool, owned: bool = True,
                 can_offload: Optional[bool] = None, multi_queue: bool = False) -> None:
        self.name = name
        self.fds = fds
        #: frames carry the 12-byte virtio-net header in both directions
        self.vnet_hdr = vnet_hdr
        #: whether the kernel takes TUNSETOFFLOAD (checksum and TSO towards the guest)
        self.can_offload = vnet_hdr and self._probe_offload() if can_offload is None \
            else can_offload
        self._owned = owned
        #: an IFF_MULTI_QUEUE tap (its queues can be attached and detached)
        self.multi_queue = multi_queue
        #: queue pairs the kernel steers received frames to
        self.enabled = len(fds)

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def unopened(cls, name: str, queues: int = 1) -> "Tap":
        """A tap's place in a description (``pyhv domxml check``): nothing opened."""
        return cls(name, [-1] * queues, vnet_hdr=True, owned=False, can_offload=True)

    @classmethod
    def open(cls, ifname: str, queues: int = 1, bridge: Optional[str] = None,
             mtu: Optional[int] = None) -> "Tap":
        """Open (create) tap ``ifname`` with a descriptor per queue pair, bring it up,
        and put it on ``bridge`` if given."""
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        fds: list[int] = []
        name = ifname
        try:
            for _ in range(queues):
                try:
                    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as e:
                    raise TapError(f"tap {ifname}: cannot open {TUN_PATH}: "
                                   f"{e.strerror}") from e
                fds.append(fd)
                try:
                    got = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
                except OSError as e:
                    why = "it exists and is not a tap of this kind (or it is busy)" \
                        if e.errno in (errno.EINVAL, errno.EBUSY) else e.strerror
                    raise TapError(f"tap {ifname}: cannot attach: {why}") from e
                name = got[:IFNAMSIZ].split(b"\0", 1)[0].decode()
                _set_vnet_hdr(fd, name)
            tap = cls(name, fds, vnet_hdr=True, multi_queue=queues > 1)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            if mtu is not None:
                _sock_ioctl(SIOCSIFMTU, struct.pack("16si20x", os.fsencode(name), mtu), name,
                            f"set MTU {mtu}")
            if bridge is not None:
                _add_to_bridge(name, bridge)
            _bring_up(name)
        except BaseException:
            tap.close()
            raise
        return tap

    @classmethod
    def adopt(cls, fds: tuple[int, ...]) -> "Tap":
        """Tap descriptors someone else opened (libvirt): checked, ours to close."""
        name = ""
        vnet = True
        for fd in fds:
            try:
                got = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
            except OSError as e:
                raise TapError(f"tap fd {fd}: not a tap ({e.strerror})") from e
            name, flags = struct.unpack_from("16sH", got)
            name = name.split(b"\0", 1)[0].decode()
            if not flags & IFF_TAP:
                raise TapError(f"tap fd {fd} ({name}): a tun device, not a tap")
            if not flags & IFF_NO_PI:
                raise TapError(f"tap fd {fd} ({name}): opened with packet information "
                               "(IFF_NO_PI is needed)")
            vnet = vnet and bool(flags & IFF_VNET_HDR)
            os.set_blocking(fd, False)
        if vnet:
            for fd in fds:
                _set_vnet_hdr(fd, name)
        return cls(name, list(fds), vnet_hdr=vnet, multi_queue=len(fds) > 1)

    # ---- use ------------------------------------------------------------------------------
    def _probe_offload(self) -> bool:
        try:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, 0)
        except OSError:
            return False
        return True

    def set_offload(self, flags: int) -> None:
        """What the tap may hand the guest: ``TUN_F_*`` (checksum, TSO ...)."""
        if not self.can_offload:
            return
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError as e:
                raise TapError(f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: "
                               f"{e.strerror}") from e

    def enable_queues(self, pairs: int) -> None:
        """Let the kernel steer received frames to the first ``pairs`` queues only."""
        if not self.multi_queue or pairs == self.enabled:
            return
        for i, fd in enumerate(self.fds):
            flag = IFF_ATTACH_QUEUE if i < pairs else IFF_DETACH_QUEUE
            try:
                fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", flag))
            except OSError as e:
                if e.errno != errno.EINVAL:  # already in that state
                    raise TapError(f"tap {self.name}: queue {i}: {e.strerror}") from e
        self.enabled = pairs

    def close(self) -> None:
        if self._owned:
            close_fds(self.fds)
        self.fds = []


def _set_vnet_hdr(fd: int, name: str) -> None:
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
    except OSError as e:
        raise TapError(f"tap {name}: cannot set the vnet header size: {e.strerror}") from e


def _sock_ioctl(request: int, arg: bytes, name: str, what: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return fcntl.ioctl(s.fileno(), request, arg)
        except OSError as e:
            raise TapError(f"tap {name}: cannot {what}: {e.strerror}") from e


def _bring_up(name: str) -> None:
    got = _sock_ioctl(SIOCGIFFLAGS, _ifreq(name), name, "read its flags")
    flags = struct.unpack_from("16sH", got)[1]
    if not flags & IFF_UP:
        _sock_ioctl(SIOCSIFFLAGS, _ifreq(name, flags | IFF_UP), name, "bring it up")


def _add_to_bridge(name: str, bridge: str) -> None:
    got = _sock_ioctl(SIOCGIFINDEX, struct.pack("16s24x", os.fsencode(name)), name,
                      "find its index")
    index = struct.unpack_from("16si", got)[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCBRADDIF, struct.pack("16si20x", os.fsencode(bridge),
                                                             index))
        except OSError as e:
            why = "no such bridge" if e.errno in (errno.ENODEV, errno.EOPNOTSUPP) \
                else e.strerror
            raise TapError(f"tap {name}: cannot join bridge {bridge}: {why}") from e
