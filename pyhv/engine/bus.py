"""Address → device dispatch for port I/O and MMIO.

The bus owns the mapping from absolute addresses to devices (which only see
offsets from the start of their range).  Lookups run on vCPU threads without a
lock: the mappings are an immutable snapshot, and :meth:`Bus.insert`,
:meth:`Bus.remove` and :meth:`Bus.move` (a guest reprogramming a PCI BAR)
build a new one and swap it in with one assignment, so a vCPU sees either the
old layout or the new one, never half of each.

Every access to a device holds that device's lock; a device that answers on
several ranges (a PCI function's BARs and its configuration space) passes one
``lock`` for all of them, so vCPU threads and host threads never run inside
one device at once.  A device that needs to know which of its ranges was hit
maps a small region object per range (see :class:`Region`).

An access nobody claims is handled quietly, like a PC's floating bus: reads
return all-ones, writes are dropped; an optional ``trace`` callback sees them
(``pyhv run --trace-io``).
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Optional, Protocol

from pyhv.engine.devices import Device
from pyhv.engine.errors import EngineError


class BusError(EngineError):
    """A device could not be placed on a bus."""


class _Mapping:
    __slots__ = ("base", "end", "device", "lock", "name", "owner")

    def __init__(self, base: int, length: int, device: Device, name: str,
                 lock: "threading.Lock", owner: object) -> None:
        self.base = base
        self.end = base + length
        self.device = device
        self.lock = lock
        self.name = name
        #: the device model behind the range (a BAR's PCI function)
        self.owner = owner


class RegionOwner(Protocol):
    def region_read(self, region: int, offset: int, size: int) -> int: ...

    def region_write(self, region: int, offset: int, size: int, value: int) -> None: ...


class Region:
    """One of several ranges a device answers on (a PCI BAR): the bus calls it with
    offsets into this range, and it tells its owner which range it is."""

    __slots__ = ("owner", "index")

    def __init__(self, owner: RegionOwner, index: int) -> None:
        self.owner = owner
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.owner.region_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.owner.region_write(self.index, offset, size, value)


Trace = Callable[[str, int, int, int], None]
#: told when a device model raised while serving an access: (owner, range name, error)
OnError = Callable[[object, str, Exception], None]


class Bus:
    """Non-overlapping address ranges, each mapped to one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: (bases, mappings), both sorted by base; replaced, never changed in place
        self._snap: tuple[tuple[int, ...], tuple[_Mapping, ...]] = ((), ())
        self._update = threading.Lock()
        self.trace: Optional[Trace] = None
        self.on_error: Optional[OnError] = None

    # ---- changing the layout (any thread; serialised among themselves) ------------
    def insert(self, base: int, length: int, device: Device, name: str = "",
               lock: Optional["threading.Lock"] = None, owner: object = None) -> None:
        """Map ``device`` at ``base``; ``lock`` is shared with its other ranges, and
        ``owner`` (default ``device``) is the model a failure is blamed on."""
        if length <= 0:
            raise BusError(f"{self.name}: empty range for {name or device!r}")
        m = _Mapping(base, length, device, name or type(device).__name__,
                     lock if lock is not None else threading.Lock(),
                     device if owner is None else owner)
        with self._update:
            self._snap = self._with(self._snap[1], m)

    def _with(self, maps: tuple[_Mapping, ...],
              m: _Mapping) -> tuple[tuple[int, ...], tuple[_Mapping, ...]]:
        bases = [x.base for x in maps]
        i = bisect.bisect_right(bases, m.base)
        if (i > 0 and maps[i - 1].end > m.base) or (i < len(maps) and maps[i].base < m.end):
            raise BusError(f"{self.name}: 0x{m.base:x}+0x{m.end - m.base:x} ({m.name}) "
                           f"overlaps a device")
        new = maps[:i] + (m,) + maps[i:]
        return tuple(x.base for x in new), new

    def remove(self, base: int) -> None:
        with self._update:
            bases, maps = self._snap
            i = bisect.bisect_left(bases, base)
            if i < len(bases) and bases[i] == base:
                new = maps[:i] + maps[i + 1:]
                self._snap = (tuple(x.base for x in new), new)

    def move(self, base: int, new_base: int) -> None:
        """Relocate the range at ``base`` to ``new_base`` in one step (a BAR write).

        Raises :class:`BusError` (and changes nothing) when the new range
        overlaps another device."""
        with self._update:
            bases, maps = self._snap
            i = bisect.bisect_left(bases, base)
            if i >= len(bases) or bases[i] != base:
                raise BusError(f"{self.name}: nothing is mapped at 0x{base:x}")
            old = maps[i]
            m = _Mapping(new_base, old.end - old.base, old.device, old.name, old.lock,
                         old.owner)
            self._snap = self._with(maps[:i] + maps[i + 1:], m)

    def remove_owner(self, owner: object) -> None:
        """Unmap every range of ``owner`` (a device that broke)."""
        with self._update:
            new = tuple(m for m in self._snap[1] if m.owner is not owner)
            self._snap = (tuple(m.base for m in new), new)

    # ---- lookups (vCPU threads, lock-free) ----------------------------------------
    def find(self, addr: int) -> Optional[_Mapping]:
        bases, maps = self._snap
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0 and addr < maps[i].end:
            return maps[i]
        return None

    def devices(self) -> list[tuple[int, int, str]]:
        """(base, length, name) of every mapping, in address order."""
        return [(m.base, m.end - m.base, m.name) for m in self._snap[1]]

    def read(self, addr: int, size: int) -> int:
        m = self.find(addr)
        if m is None:
            if self.trace:
                self.trace("read", addr, size, -1)
            return (1 << (8 * size)) - 1
        with m.lock:
            try:
                return m.device.read(addr - m.base, size) & ((1 << (8 * size)) - 1)
            except Exception as e:  # the model's bug: isolate it, the VM goes on
                self._failed(m, e)
                return (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        m = self.find(addr)
        if m is None:
            if self.trace:
                self.trace("write", addr, size, value)
            return
        with m.lock:
            try:
                m.device.write(addr - m.base, size, value)
            except Exception as e:
                self._failed(m, e)

    def _failed(self, m: _Mapping, error: Exception) -> None:
        if self.on_error is None:
            raise error
        self.remove_owner(m.owner)
        self.on_error(m.owner, m.name, error)


class Sink:
    """A device that accepts everything quietly (port 0x80 POST codes)."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        return None
