"""What the three USB host controller models share.

:class:`UsbHostController` is a :class:`~pyhv.engine.pci.device.PciFunction`
that

* splits every BAR access into aligned 32-bit register accesses with byte
  enables (``_reg_read(index, offset)`` / ``_reg_write(index, offset, value,
  mask)``), so a subclass handles each register once whatever size the guest
  used, and a partial write never touches the bytes it did not cover (a
  write-one-to-clear bit in another byte stays as it is);
* drives its INTx pin from ``_irq_pending()``: asserted while an enabled
  interrupt condition is pending, mirrored in the PCI status register's
  Interrupt Status bit and gated by the command register's Interrupt Disable;
* does its DMA through :meth:`_dma_read` / :meth:`_dma_write`, which refuse when
  bus mastering is off and turn :class:`~pyhv.engine.memory.GuestMemoryError`
  into :class:`DmaError`, which the controller turns into its host system
  error status (never an exception out of a register write);
* reads the time from an injected monotonic ``clock`` (seconds) when a register
  that depends on it is read: no threads, no timers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from pyhv.engine.errors import EngineError
from pyhv.engine.memory import GuestMemory, GuestMemoryError
from pyhv.engine.pci.config import (
    CMD_MASTER,
    ConfigSpace,
)
from pyhv.engine.pci.device import PciFunction

if TYPE_CHECKING:
    pass

Clock = Callable[[], float]

#: config offset of the Serial Bus Release Number (all three interfaces)
SBRN = 0x60
#: config offset of the Frame Length Adjustment register (EHCI and xHCI)
FLADJ = 0x61


class UsbError(EngineError):
    """The root of the USB host controllers' errors (none leaves a register access)."""


class DmaError(UsbError):
    """A controller's access to guest memory failed (not RAM, or bus mastering off)."""


class UsbHostController(PciFunction):
    """A PCI USB host controller: register access, INTx and DMA plumbing."""

    kind = "usb-controller"

    def __init__(self, config: ConfigSpace, memory: GuestMemory, name: str,
                 clock: Clock, frame_period: float, frame_mask: int) -> None:
        super().__init__(config, name)
        self.memory = memory
        self.clock = clock
        #: the (micro)frame counter: UHCI FRNUM, EHCI FRINDEX, xHCI MFINDEX
        self._frame = FrameCounter(self._now, frame_period, frame_mask)
        self._power_on()

    @property
    def running(self) -> bool:
        """The schedule runs (Run/Stop set and the controller not halted)."""
        return self._frame.running

    # ---- subclass interface ------------------------------------------------------
    def _reg_read(self, index: int, offset: int) -> int:
        """The 32-bit register (group) at the aligned ``offset`` of BAR ``index``."""
        return 0

    def _reg_write(self, index: int, offset: int, value: int, mask: int) -> None:
        """A write to the aligned dword at ``offset``: only the bits of ``mask``
        were written (byte enables)."""

    def _irq_pending(self) -> bool:
        return False

    def _power_on(self) -> None:
        """Every register back to its power-on value."""

    # ---- PciFunction hooks ----------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        first = offset & ~3
        last = (offset + size - 1) & ~3
        raw = 0
        for i, dword in enumerate(range(first, last + 4, 4)):
            raw |= (self._reg_read(index, dword) & 0xFFFFFFFF) << (32 * i)
        return (raw >> (8 * (offset - first))) & ((1 << (8 * size)) - 1)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        first = offset & ~3
        last = (offset + size - 1) & ~3
        shift = 8 * (offset - first)
        data = (value & ((1 << (8 * size)) - 1)) << shift
        enables = ((1 << (8 * size)) - 1) << shift
        # ascending dwords: the low half of a 64-bit register first, as lo_hi_writeq
        for i, dword in enumerate(range(first, last + 4, 4)):
            mask = (enables >> (32 * i)) & 0xFFFFFFFF
            if mask:
                self._reg_write(index, dword, (data >> (32 * i)) & 0xFFFFFFFF, mask)
        self._update_irq()

    def reset(self) -> None:
        super().reset()
        self._power_on()
        self._update_irq()

    # ---- helpers -------------------------------------------------------------------
    def _update_irq(self) -> None:
        self.drive_intx(self._irq_pending())

    def _dma_check(self) -> None:
        if not self.config.command & CMD_MASTER:
            raise DmaError(f"{self.name}: DMA with bus mastering disabled")

    def _dma_read(self, addr: int, size: int) -> bytes:
        self._dma_check()
        try:
            return self.memory.read(addr, size)
        except GuestMemoryError as e:
            raise DmaError(f"{self.name}: {e}") from e

    def _dma_read32(self, addr: int) -> int:
        return int.from_bytes(self._dma_read(addr, 4), "little")

    def _dma_read64(self, addr: int) -> int:
        return int.from_bytes(self._dma_read(addr, 8), "little")

    def _dma_write(self, addr: int, data: bytes) -> None:
        self._dma_check()
        try:
            self.memory.write(addr, data)
        except GuestMemoryError as e:
            raise DmaError(f"{self.name}: {e}") from e

    def _now(self) -> float:
        return float(self.clock())


def merge(old: int, value: int, mask: int, writable: int) -> int:
    """``old`` with the ``writable`` bits that ``mask`` covers taken from ``value``."""
    m = mask & writable
    return (old & ~m) | (value & m)


class FrameCounter:
    """A (micro)frame index: it advances with the clock while the controller runs
    and holds its value while it is halted, when the driver may write it."""

    def __init__(self, clock: Callable[[], float], period: float, mask: int) -> None:
        self.clock = clock
        self.period = period
        self.mask = mask
        #: the value while halted; the value at the start while running
        self.base = 0
        self.started: Optional[float] = None

    @property
    def running(self) -> bool:
        return self.started is not None

    def elapsed(self) -> int:
        """Whole periods since the start (0 while halted)."""
        return 0 if self.started is None else ticks(self.started, self.clock(), self.period)

    @property
    def value(self) -> int:
        return (self.base + self.elapsed()) & self.mask

    def start(self) -> None:
        self.started = self.clock()

    def stop(self) -> None:
        self.base = self.value
        self.started = None

    def reset(self) -> None:
        self.base = 0
        self.started = None

    def write(self, value: int, mask: int) -> None:
        """A driver write (ignored while running, as the specifications say)."""
        if self.started is None:
            self.base = merge(self.base, value, mask, self.mask)


def ticks(start: float, now: float, period: float) -> int:
    """Whole ``period``s from ``start`` to ``now`` (0 if the clock went backwards).

    A hair of slack keeps an exact multiple (0.003 s of 1 ms frames) from
    rounding down to one tick less."""
    return max(0, int((now - start) / period + 1e-6))
