"""The device tree of one platform: every device by id, and what became of it.

Devices register under an id (libvirt's alias where there is one: ``serial0``,
``pci.1``, ``usb``); the manager resets them with the machine, hands their
state out (a place for migration to fill), and marks a device *broken* when its
model raised while serving the guest: the bus stops routing to it (reads float
to all-ones, writes are dropped, as with a device that fell off the bus) and
the machine and every other device go on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable


@runtime_checkable
class Resettable(Protocol):
    def reset(self) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    def state(self) -> dict[str, Any]: ...

    def from_state(self, state: dict[str, Any]) -> None: ...


@dataclass
class DeviceRecord:
    id: str
    kind: str
    device: object
    #: why the device stopped answering (None: it works)
    broken: Optional[str] = None
    #: where it answers, for ``pyhv domxml check`` and queries (``isa 0x3f8``, ``00:02.0``)
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class DeviceManager:
    def __init__(self, on_broken: Optional[Callable[[DeviceRecord], None]] = None) -> None:
        self._devices: dict[str, DeviceRecord] = {}
        self._lock = threading.Lock()
        self.on_broken = on_broken

    def add(self, ident: str, kind: str, device: object, where: str = "") -> DeviceRecord:
        if ident in self._devices:
            raise ValueError(f"device id {ident!r} is used twice")
        rec = DeviceRecord(ident, kind, device, where=where)
        self._devices[ident] = rec
        return rec

    def get(self, ident: str) -> Optional[DeviceRecord]:
        return self._devices.get(ident)

    def remove(self, ident: str) -> None:
        """A device unplugged while the machine runs."""
        with self._lock:
            self._devices.pop(ident, None)

    def find(self, device: object) -> Optional[DeviceRecord]:
        for rec in self._devices.values():
            if rec.device is device:
                return rec
        return None

    def records(self) -> list[DeviceRecord]:
        return list(self._devices.values())

    def mark_broken(self, device: object, reason: str) -> Optional[DeviceRecord]:
        """Called from a vCPU thread when ``device`` raised; the first reason sticks."""
        with self._lock:
            rec = self.find(device)
            if rec is None or rec.broken is not None:
                return rec
            rec.broken = reason
        if self.on_broken is not None:
            self.on_broken(rec)
        return rec

    def reset(self) -> None:
        for rec in self._devices.values():
            if isinstance(rec.device, Resettable):
                rec.device.reset()

    def state(self) -> dict[str, dict[str, Any]]:
        """Each stateful device's state by id (what a snapshot will carry)."""
        return {rec.id: rec.device.state() for rec in self._devices.values()
                if isinstance(rec.device, Stateful)}
