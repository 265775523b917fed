"""Allocators for what devices take from the machine: address ranges and GSIs.

Pure bookkeeping, no KVM: an :class:`AddressAllocator` hands out aligned
ranges of a window (port I/O, 32-bit MMIO, 64-bit MMIO) and takes them back;
a :class:`GsiAllocator` hands out interrupt numbers above the ones the
platform wires itself.
"""

from __future__ import annotations

import bisect

from pyhv.engine.errors import EngineError


class ResourceError(EngineError):
    """A window has no room left (or a range was freed twice)."""


class AddressAllocator:
    """Aligned ranges from ``[start, end)``, first fit, in address order."""

    def __init__(self, name: str, start: int, end: int) -> None:
        if end <= start:
            raise ResourceError(f"{name}: empty window {start:#x}-{end:#x}")
        self.name = name
        self.start = start
        self.end = end
        self._used: list[tuple[int, int]] = []  # (base, end), sorted

    def allocate(self, size: int, align: int = 1) -> int:
        """The base of a free range of ``size`` bytes aligned to ``align``."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ResourceError(f"{self.name}: bad request size {size:#x} align {align:#x}")
        cursor = self.start
        for base, end in self._used + [(self.end, self.end)]:
            cand = (cursor + align - 1) & ~(align - 1)
            if cand + size <= base:
                self._insert(cand, cand + size)
                return cand
            cursor = max(cursor, end)
        raise ResourceError(f"{self.name}: no room for {size:#x} bytes (aligned to "
                            f"{align:#x}) in {self.start:#x}-{self.end - 1:#x}")

    def reserve(self, base: int, size: int) -> None:
        """Take exactly ``[base, base + size)`` (fails if any of it is taken)."""
        if base < self.start or base + size > self.end or size <= 0:
            raise ResourceError(f"{self.name}: {base:#x}+{size:#x} is outside the window")
        for b, e in self._used:
            if b < base + size and base < e:
                raise ResourceError(f"{self.name}: {base:#x}+{size:#x} overlaps {b:#x}-"
                                    f"{e - 1:#x}")
        self._insert(base, base + size)

    def free(self, base: int) -> None:
        for i, (b, _e) in enumerate(self._used):
            if b == base:
                del self._used[i]
                return
        raise ResourceError(f"{self.name}: nothing allocated at {base:#x}")

    def _insert(self, base: int, end: int) -> None:
        bisect.insort(self._used, (base, end))

    def used(self) -> list[tuple[int, int]]:
        return list(self._used)


class GsiAllocator:
    """Interrupt numbers (GSIs) from ``first`` up to ``limit`` (exclusive)."""

    def __init__(self, first: int, limit: int) -> None:
        self.next = first
        self.limit = limit

    def allocate(self) -> int:
        if self.next >= self.limit:
            raise ResourceError(f"no GSI left below {self.limit}")
        self.next += 1
        return self.next - 1
