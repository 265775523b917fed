"""Address → device dispatch for port I/O and MMIO.

The bus owns the mapping from absolute addresses to devices (which only see
offsets) and one lock per device, so vCPU threads and host threads may call
into the same register model safely.  An access nobody claims is handled
quietly, like a PC's floating bus: reads return all-ones, writes are dropped;
an optional ``trace`` callback sees them (``pyhv run --trace-io``).
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Optional

from pyhv.engine.devices import Device
from pyhv.engine.errors import EngineError


class BusError(EngineError):
    """A device could not be placed on a bus."""


class _Mapping:
    __slots__ = ("base", "end", "device", "lock", "name")

    def __init__(self, base: int, length: int, device: Device, name: str) -> None:
        self.base = base
        self.end = base + length
        self.device = device
        self.lock = threading.Lock()
        self.name = name


Trace = Callable[[str, int, int, int], None]


class Bus:
    """Non-overlapping address ranges, each mapped to one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._maps: list[_Mapping] = []
        self.trace: Optional[Trace] = None

    def insert(self, base: int, length: int, device: Device, name: str = "") -> None:
        if length <= 0:
            raise BusError(f"{self.name}: empty range for {name or device!r}")
        i = bisect.bisect_right(self._bases, base)
        if (i > 0 and self._maps[i - 1].end > base) or \
                (i < len(self._maps) and self._maps[i].base < base + length):
            raise BusError(f"{self.name}: 0x{base:x}+0x{length:x} overlaps a device")
        m = _Mapping(base, length, device, name or type(device).__name__)
        self._bases.insert(i, base)
        self._maps.insert(i, m)

    def remove(self, base: int) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i < len(self._bases) and self._bases[i] == base:
            del self._bases[i]
            del self._maps[i]

    def find(self, addr: int) -> Optional[_Mapping]:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr < self._maps[i].end:
            return self._maps[i]
        return None

    def devices(self) -> list[tuple[int, int, str]]:
        """(base, length, name) of every mapping, in address order."""
        return [(m.base, m.end - m.base, m.name) for m in self._maps]

    def read(self, addr: int, size: int) -> int:
        m = self.find(addr)
        if m is None:
            if self.trace:
                self.trace("read", addr, size, -1)
            return (1 << (8 * size)) - 1
        with m.lock:
            return m.device.read(addr - m.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self.find(addr)
        if m is None:
            if self.trace:
                self.trace("write", addr, size, value)
            return
        with m.lock:
            m.device.write(addr - m.base, size, value)


class Sink:
    """A device that accepts everything quietly (port 0x80 POST codes)."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        return None
