"""ACPI fixed-hardware power-management registers (PM1a + PM timer).

One device covers the 12-byte port range at ``layout.PM1A_EVT_PORT``
(0x600); the FADT points its three blocks into it::

    +0   PM1_STS  16 bits  PM1a event block   (PM1A_EVT_PORT, 0x600)
    +2   PM1_EN   16 bits
    +4   PM1_CNT  16 bits  PM1a control block (PM1A_CNT_PORT, 0x604)
    +6   reserved, reads 0, writes ignored
    +8   PM_TMR   32 bits  PM timer block     (PM_TMR_PORT,   0x608)

Accesses of any size at any offset in the range are split into bytes, so a
byte write touches only that byte of a register (and only the written bytes
of PM1_STS are cleared).  Offsets beyond the range read 0xff.. and ignore
writes.

* PM1_STS bits are write-1-to-clear.  TMR_STS (bit 0) is set when bit 23 of
  the PM timer toggles, evaluated lazily when PM1_STS or PM1_EN is accessed
  (no host timer backs it, so a TMR_EN-driven SCI is only seen at such
  accesses); PWRBTN_STS (bit 8) is set by :meth:`AcpiPm.press_power_button`;
  WAK_STS (bit 15) is set after a sleep request other than S5 returns, i.e.
  such sleeps are modelled as an immediate wake.
* PM1_CNT: SCI_EN (bit 0) always reads 1 (there is no SMI_CMD port, the
  machine is always in ACPI mode); SLP_TYP (bits 10-12) is stored; SLP_EN
  (bit 13) is write-only and a write with it set calls ``on_sleep(slp_typ)``.
  The machine treats ``layout.S5_SLP_TYP`` as power-off.
* PM_TMR: a 24-bit counter at 3.579545 MHz from the injected monotonic
  clock (nanoseconds), counting from when the device was made; the upper 8
  bits read 0 (the FADT must leave TMR_VAL_EXT clear).
* SCI is a level: high while ``PM1_STS & PM1_EN`` has a status/enable pair
  (timer, global, power button, sleep button, RTC) set; re-evaluated on every
  change and driven only when it changes.

:meth:`press_power_button` may be called from a host thread while the guest
accesses the registers, so the model holds its own lock; ``on_sleep`` runs
outside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pyhv.engine.devices import InterruptLine
from pyhv.engine.layout import (
    PM1A_CNT_PORT,
    PM1A_EVT_PORT,
    PM_TMR_PORT,
    S5_SLP_TYP,
)

#: the size of the port range this device answers
PM_BLOCK_LEN = 12
PM1_STS_OFFSET = 0
PM1_EN_OFFSET = 2
PM1_CNT_OFFSET = PM1A_CNT_PORT - PM1A_EVT_PORT
PM_TMR_OFFSET = PM_TMR_PORT - PM1A_EVT_PORT

# PM1_STS / PM1_EN bits
TMR_STS = 1 << 0
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
#: status bits that raise an SCI when their enable bit is set
SCI_EVENTS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS
TMR_EN = TMR_STS
PWRBTN_EN = PWRBTN_STS

# PM1_CNT bits
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
#: PM1_CNT bits that are stored (SCI_EN, BM_RLD, SLP_TYP)
_CNT_STORED = 0x0002 | SLP_TYP_MASK

PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFFFFFF
_TIMER_MSB_SHIFT = 23


class AcpiPm:
    """PM1a event/control blocks and the PM timer as one 12-byte device."""

    def __init__(
        self,
        sci: InterruptLine,
        on_sleep: Callable[[int], None] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.sci = sci
        self.on_sleep = on_sleep
        self._clock_ns = clock_ns
        self._start_ns = clock_ns()
        self._lock = threading.Lock()
        self._sts = 0
        self._en = 0
        self._cnt = 0
        self._msb_epoch = 0  # timer ticks >> 23 last seen
        self._sci_level = False

    # ---- host side -------------------------------------------------------
    def press_power_button(self) -> None:
        """Set PWRBTN_STS; the SCI rises if the guest enabled PWRBTN_EN."""
        with self._lock:
            self._sts |= PWRBTN_STS
            self._update_sci()

    @property
    def sci_level(self) -> bool:
        """Whether the SCI is asserted."""
        return self._sci_level

    # ---- bus interface ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` (little-endian across registers)."""
        with self._lock:
            if offset < PM_TMR_OFFSET:
                self._poll_timer()
            image = self._image()
        value = 0
        for i in range(size):
            pos = offset + i
            byte = image[pos] if 0 <= pos < PM_BLOCK_LEN else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` with each register's semantics."""
        sleep_type: int | None = None
        with self._lock:
            self._poll_timer()
            for reg, width in ((PM1_STS_OFFSET, 2), (PM1_EN_OFFSET, 2),
                               (PM1_CNT_OFFSET, 2)):
                data, mask = _slice(offset, size, value, reg, width)
                if not mask:
                    continue
                if reg == PM1_STS_OFFSET:
                    self._sts &= ~(data & mask)
                elif reg == PM1_EN_OFFSET:
                    self._en = (self._en & ~mask) | (data & mask)
                else:
                    cnt = (self._cnt & ~mask) | (data & mask)
                    self._cnt = cnt & _CNT_STORED
                    if data & mask & SLP_EN:
                        sleep_type = (cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            self._update_sci()
        if sleep_type is not None:
            if self.on_sleep is not None:
                self.on_sleep(sleep_type)
            if sleep_type != S5_SLP_TYP:
                with self._lock:
                    self._sts |= WAK_STS

    # ---- internals (lock held) -------------------------------------------
    def _ticks(self) -> int:
        elapsed = max(self._clock_ns() - self._start_ns, 0)
        return elapsed * PM_TIMER_HZ // 1_000_000_000

    def _poll_timer(self) -> None:
        epoch = self._ticks() >> _TIMER_MSB_SHIFT
        if epoch != self._msb_epoch:
            self._msb_epoch = epoch
            self._sts |= TMR_STS
            self._update_sci()

    def _image(self) -> bytes:
        cnt = self._cnt | SCI_EN
        timer = self._ticks() & PM_TIMER_MASK
        return (self._sts.to_bytes(2, "little") + self._en.to_bytes(2, "little")
                + cnt.to_bytes(2, "little") + bytes(2)
                + timer.to_bytes(4, "little"))

    def _update_sci(self) -> None:
        level = bool(self._sts & self._en & SCI_EVENTS)
        if level != self._sci_level:
            self._sci_level = level
            self.sci.set_level(level)


def _slice(offset: int, size: int, value: int, reg: int,
           width: int) -> tuple[int, int]:
    """The part of a write that lands in register ``reg``: (data, bit mask)."""
    data = mask = 0
    for i in range(width):
        pos = reg + i - offset
        if 0 <= pos < size:
            data |= ((value >> (8 * pos)) & 0xFF) << (8 * i)
            mask |= 0xFF << (8 * i)
    return data, mask
