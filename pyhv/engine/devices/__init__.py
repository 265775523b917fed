"""Platform devices as pure register models.

A device here is only a register model, in the manner of rust-vmm's
vm-superio: ``read(offset, size)`` / ``write(offset, size, value)`` relative to
its own base, an injected :class:`InterruptLine` and injected host streams.  It
owns no threads, no file descriptors and no port base: the bus maps addresses
to it and serialises calls, so tests drive it with a recording line and
``io.BytesIO``.
"""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """A device's interrupt output (an ISA IRQ or a GSI)."""

    def set_level(self, asserted: bool) -> None:
        """Drive the line high (asserted) or low."""

    def pulse(self) -> None:
        """Assert and deassert the line: one edge-triggered interrupt."""


class Device(Protocol):
    """A register model mapped onto a port-I/O or MMIO bus."""

    def read(self, offset: int, size: int) -> int:
        """The value read at ``offset`` (``size`` bytes, 1/2/4/8)."""

    def write(self, offset: int, size: int, value: int) -> None:
        """Handle a write of ``value`` (``size`` bytes) at ``offset``."""


class RecordingLine:
    """An :class:`InterruptLine` that records what happens to it (for tests)."""

    def __init__(self) -> None:
        self.level = False
        self.events: list[str] = []

    def set_level(self, asserted: bool) -> None:
        if asserted != self.level:
            self.events.append("high" if asserted else "low")
        self.level = asserted

    def pulse(self) -> None:
        self.events.append("pulse")
