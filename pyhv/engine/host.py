"""What a machine opens on the host for its devices, and keeps across guest resets.

A guest reset rebuilds the platform (every device model starts over), but the
host side stays: a virtio console's pty keeps its path, a channel's socket its
client, a NIC its tap (libvirt passes tap descriptors once, at start).  The
:class:`HostResources` are opened when the machine starts (so a bad socket path
or a missing bridge fails the start with one line) and closed when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pyhv.config import SerialConfig, VmConfig
from pyhv.engine.chardev import HostEnd, open_end
from pyhv.engine.net.tap import Tap, TapError


@dataclass
class HostResources:
    #: virtio consoles' and channels' host ends, by (controller index, port number)
    ports: dict[tuple[int, int], HostEnd] = field(default_factory=dict)
    #: virtio-net taps, by NIC id
    taps: dict[str, Tap] = field(default_factory=dict)
    #: COM2-COM4's host ends, by COM index (1 = COM2; COM1 has its own, ``HostSerial``)
    serials: dict[int, HostEnd] = field(default_factory=dict)

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
            for n in cfg.nets:
                if n.backend != "tap":
                    continue
                assert n.id is not None, "place the config first"
                if n.fds:
                    res.taps[n.id] = Tap.adopt(n.fds)
                else:
                    res.taps[n.id] = Tap.open(n.ifname or "tap%d", n.queues, n.bridge,
                                              n.mtu)
        except BaseException:
            res.close()
            raise
        return res

    def close(self) -> None:
        for end in self.ports.values():
            end.close()
        for tap in self.taps.values():
            tap.close()
        for end in self.serials.values():
            end.close()
        self.ports, self.taps, self.serials = {}, {}, {}


__all__ = ["HostResources", "TapError"]
