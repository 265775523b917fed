"""What a machine opens on the host for its devices, and keeps across guest resets.

A guest reset rebuilds the platform (every device model starts over), but the
host side stays: a virtio console's pty keeps its path, a channel's socket its
client, a NIC its tap (libvirt passes tap descriptors once, at start).  The
:class:`HostResources` are opened when the machine starts (so a bad socket path
or a missing bridge fails the start with one line) and closed when it ends.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from pyhv.config import DiskConfig, NetConfig, SerialConfig, VmConfig
from pyhv.engine.chardev import HostEnd, open_end
from pyhv.engine.fds import close_fds
from pyhv.engine.net.tap import Tap, TapError


@dataclass
class HostResources:
    #: virtio consoles' and channels' host ends, by (controller index, port number)
    ports: dict[tuple[int, int], HostEnd] = field(default_factory=dict)
    #: virtio-net taps, by NIC id
    taps: dict[str, Tap] = field(default_factory=dict)
    #: COM2-COM4's host ends, by COM index (1 = COM2; COM1 has its own, ``HostSerial``)
    serials: dict[int, HostEnd] = field(default_factory=dict)
    #: vhost-user backends' connections, by device id (disks and NICs)
    vhost_user: dict[str, Any] = field(default_factory=dict)
    #: the kernel's vhost-net descriptors, by NIC id (NICs without: userspace)
    vhost_net: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: VmConfig) -> "HostResources":
        """Open everything a placed config's devices need (all or nothing)."""
        res = cls()
        try:
            wanted: list[tuple[int, Optional[int], SerialConfig, str]] = [
                (p.controller, p.port, p.chardev, f"console hvc{p.index}")
                for p in cfg.extra_serials if p.target == "virtio"]
            wanted += [(c.controller, c.port, c.chardev, f"channel {c.name}")
                       for c in cfg.channels]
            for controller, port, chardev, what in wanted:
                assert port is not None, "place the config first"
                res.ports[(controller, port)] = open_end(chardev, what)
            for p in cfg.extra_serials:
                if p.target == "isa-serial":
                    res.serials[p.index] = open_end(p.chardev, f"serial COM{p.index + 1}")
            for d in cfg.disks:
                res.open_disk(d)
            for n in cfg.nets:
                res.open_nic(n)
        except BaseException:
            res.close()
            raise
        return res

    def open_disk(self, d: DiskConfig) -> None:
        """What a placed disk needs on the host (a vhost-user backend's connection)."""
        if d.source_type == "vhostuser":
            assert d.id is not None, "place the config first"
            self.vhost_user[d.id] = _vhost_user(d.path, False, f"disk {d.target or d.id}")

    def open_nic(self, n: NetConfig) -> None:
        """What a placed NIC needs on the host: its tap or vhost-user connection."""
        assert n.id is not None, "place the config first"
        if n.backend == "vhost-user":
            assert n.socket is not None
            self.vhost_user[n.id] = _vhost_user(n.socket, n.server, f"interface {n.id}")
        elif n.backend == "tap":
            if n.fds:
                self.taps[n.id] = Tap.adopt(n.fds)
            else:
                self.taps[n.id] = Tap.open(n.ifname or "tap%d", n.queues, n.bridge, n.mtu)
            self._open_vhost_net(n)

    def _open_vhost_net(self, n: NetConfig) -> None:
        """The NIC's vhost-net descriptors, libvirt's or ``/dev/vhost-net`` opened;
        where the kernel has none to give (or refuses), one line says so and pyhv's
        userspace data path serves the NIC."""
        from pyhv.engine.net.vhost_net import DEVICE, VhostNetBackend, VhostNetError

        assert n.id is not None
        what = f"interface {n.id}"
        tap = self.taps[n.id]
        try:
            if n.vhost_fds:
                if len(n.vhost_fds) != len(tap.fds):
                    raise VhostNetError(f"{what}: {len(n.vhost_fds)} vhost-net "
                                        f"descriptors for {len(tap.fds)} queue pairs")
                self.vhost_net[n.id] = VhostNetBackend(n.vhost_fds, what)
            elif n.vhost or (n.vhost is None and os.path.exists(DEVICE)):
                self.vhost_net[n.id] = VhostNetBackend.open(len(tap.fds), what)
        except VhostNetError as e:
            close_fds(n.vhost_fds)  # inherited, and not used
            if n.vhost is not None or n.vhost_fds:  # asked for: say why it is not used
                print(f"pyhv: {e}; using pyhv's userspace virtio-net data path",
                      file=sys.stderr, flush=True)

    def release(self, ident: str) -> None:
        """Close what device ``ident`` had (it was unplugged)."""
        tap = self.taps.pop(ident, None)
        if tap is not None:
            tap.close()
        client = self.vhost_user.pop(ident, None)
        if client is not None:
            client.close()
        vhost = self.vhost_net.pop(ident, None)
        if vhost is not None:
            vhost.close()

    def close(self) -> None:
        for end in self.ports.values():
            end.close()
        for tap in self.taps.values():
            tap.close()
        for end in self.serials.values():
            end.close()
        for client in self.vhost_user.values():
            client.close()
        for vhost in self.vhost_net.values():
            vhost.close()
        self.ports, self.taps, self.serials, self.vhost_user = {}, {}, {}, {}
        self.vhost_net = {}


#: how long pyhv waits for a vhost-user backend: to answer (pyhv connects) or to
#: connect (pyhv listens, as QEMU's server=on without wait=off)
VHOST_USER_CONNECT_WAIT = 2.0
VHOST_USER_ACCEPT_WAIT = 30.0


def _vhost_user(path: str, server: bool, what: str) -> Any:
    from pyhv.engine.vhost_user.frontend import VhostUserClient

    client = VhostUserClient(path, what, server=server)
    try:
        client.connect(VHOST_USER_ACCEPT_WAIT if server else VHOST_USER_CONNECT_WAIT)
    except BaseException:
        client.close()
        raise
    return client


__all__ = ["HostResources", "TapError"]
