"""The MC146818 real-time clock and CMOS RAM (ports 0x70/0x71).

Offsets from the device base (port 0x70)::

    +0  index register, write only (bit 7, NMI disable, is ignored); reads 0xff
    +1  data: the CMOS byte selected by the index

CMOS bytes::

    0x00 seconds  0x02 minutes  0x04 hours  0x06 weekday (1 = Sunday)
    0x07 day      0x08 month    0x09 year (2 digits)    0x32 century
    0x01/0x03/0x05  alarm seconds/minutes/hours (plain RAM; no alarms fire)
    0x0a status A: divider bits as written (0x26 after reset); UIP (bit 7)
         reads 1 during the last 244 us of each second, as on the chip
    0x0b status B: SET (bit 7), DM (bit 2, 1 = binary) and 24/12 (bit 1)
         are honoured; other bits are stored.  Default 0x02: 24 h, BCD
    0x0c status C: UF (bit 4) when a second has passed since the last read;
         reading clears it.  No periodic, alarm or update interrupts are raised
    0x0d status D: 0x80 (valid RAM and time)
    0x0e..0x7f  plain RAM, with the PC BIOS memory-size bytes filled in

The time is the injected ``now()`` clock plus ``offset_seconds``; the
registers are computed from it on every read and formatted in the current
DM/24h mode.  Guest writes to the time registers *set the clock*: they move
the offset.  While status B's SET bit is 1 the time registers are frozen and
hold what the guest writes; clearing SET commits them.  A write outside SET
takes effect at once.  Writes that make an invalid date are ignored, and the
weekday always follows the date.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pyhv.engine.layout import HIMEM_START, KiB, MiB, ram_ranges

INDEX_OFFSET = 0
DATA_OFFSET = 1

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY,
             REG_MONTH, REG_YEAR, REG_CENTURY)

A_UIP = 0x80
A_DIVIDER_MASK = 0x70
A_DIVIDER_32K = 0x20
B_SET = 0x80
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_UF = 0x10
D_VRT = 0x80

DEFAULT_REG_A = 0x26
DEFAULT_REG_B = B_24H

#: the update cycle begins this long before each second ends (UIP is set)
_UIP_WINDOW_US = 244

CMOS_SIZE = 128


def _host_utc() -> datetime:
    return datetime.now(UTC)


class CmosRtc:
    """MC146818 RTC + 128 bytes of CMOS RAM."""

    def __init__(
        self,
        now: Callable[[], datetime] = _host_utc,
        *,
        offset_seconds: float = 0.0,
        ram_size: int = 0,
    ) -> None:
        self._now = now
        self.offset_seconds = float(offset_seconds)
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = DEFAULT_REG_A
        self._ram[REG_B] = DEFAULT_REG_B
        #: binary time fields held while SET is 1 (None: the clock runs)
        self._frozen: dict[int, int] | None = None
        self._last_tick = self._guest_now().replace(microsecond=0)
        if ram_size:
            self._fill_memory_size(ram_size)

    # ---- host side -------------------------------------------------------
    def guest_time(self) -> datetime:
        """The time the guest's clock shows now."""
        return self._guest_now()

    def cmos(self, index: int) -> int:
        """A CMOS RAM byte as stored (no time computation, no side effects)."""
        return self._ram[index & 0x7F]

    # ---- bus interface ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read the data port (offset 1); the index port reads 0xff."""
        if offset == DATA_OFFSET:
            return self._read_cmos(self._index)
        return (1 << (8 * size)) - 1 if size > 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Select a CMOS byte (offset 0) or write it (offset 1)."""
        value &= 0xFF
        if offset == INDEX_OFFSET:
            self._index = value & 0x7F
        elif offset == DATA_OFFSET:
            self._write_cmos(self._index, value)

    # ---- registers -------------------------------------------------------
    def _read_cmos(self, index: int) -> int:
        if index in TIME_REGS:
            if self._frozen is not None:
                return self._encode(index, self._frozen[index])
            return self._encode(index, self._fields(self._guest_now())[index])
        if index == REG_A:
            return self._ram[REG_A] | (A_UIP if self._in_update() else 0)
        if index == REG_C:
            return self._read_c()
        if index == REG_D:
            return D_VRT
        return self._ram[index]

    def _write_cmos(self, index: int, value: int) -> None:
        if index in TIME_REGS:
            self._write_time(index, self._decode(index, value))
        elif index == REG_A:
            self._ram[REG_A] = value & 0x7F
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            pass  # read only
        else:
            self._ram[index] = value

    def _read_c(self) -> int:
        if self._frozen is not None:
            return 0
        tick = self._guest_now().replace(microsecond=0)
        value = C_UF if tick != self._last_tick else 0
        self._last_tick = tick
        return value

    def _in_update(self) -> bool:
        if self._frozen is not None:
            return False
        if self._ram[REG_A] & A_DIVIDER_MASK != A_DIVIDER_32K:
            return False
        return self._guest_now().microsecond >= 1_000_000 - _UIP_WINDOW_US

    def _write_b(self, value: int) -> None:
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE
            if self._frozen is None:
                self._frozen = self._fields(self._guest_now())
        elif self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._set_clock(frozen, microsecond=0)
        self._ram[REG_B] = value

    def _write_time(self, index: int, binary: int) -> None:
        if self._frozen is not None:
            self._frozen[index] = binary
            return
        if index == REG_WEEKDAY:
            return
        now = self._guest_now()
        fields = self._fields(now)
        fields[index] = binary
        self._set_clock(fields, microsecond=now.microsecond)

    def _set_clock(self, fields: dict[int, int], microsecond: int) -> None:
        """Move the offset so the guest clock shows ``fields`` now."""
        base = self._now()
        try:
            target = base.replace(
                year=fields[REG_CENTURY] * 100 + fields[REG_YEAR],
                month=fields[REG_MONTH], day=fields[REG_DAY],
                hour=fields[REG_HOURS], minute=fields[REG_MINUTES],
                second=fields[REG_SECONDS], microsecond=microsecond)
        except (ValueError, OverflowError):
            return  # not a valid date: the clock keeps running as it was
        self.offset_seconds = (target - base).total_seconds()

    # ---- time and formats ------------------------------------------------
    def _guest_now(self) -> datetime:
        return self._now() + timedelta(seconds=self.offset_seconds)

    @staticmethod
    def _fields(t: datetime) -> dict[int, int]:
        return {
            REG_SECONDS: t.second,
            REG_MINUTES: t.minute,
            REG_HOURS: t.hour,
            REG_WEEKDAY: t.isoweekday() % 7 + 1,
            REG_DAY: t.day,
            REG_MONTH: t.month,
            REG_YEAR: t.year % 100,
            REG_CENTURY: t.year // 100,
        }

    def _encode(self, index: int, binary: int) -> int:
        b = self._ram[REG_B]
        pm = 0
        if index == REG_HOURS and not b & B_24H:
            pm = 0x80 if binary >= 12 else 0
            binary = binary % 12 or 12
        if not b & B_DM_BINARY:
            binary = (binary // 10 % 10) << 4 | binary % 10
        return (binary & 0xFF) | pm

    def _decode(self, index: int, value: int) -> int:
        b = self._ram[REG_B]
        pm = False
        if index == REG_HOURS and not b & B_24H:
            pm = bool(value & 0x80)
            value &= 0x7F
        if not b & B_DM_BINARY:
            value = (value >> 4) * 10 + (value & 0x0F)
        if index == REG_HOURS and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    # ---- PC BIOS memory-size bytes ---------------------------------------
    def _fill_memory_size(self, ram_size: int) -> None:
        low = ram_ranges(ram_size)[0][1]
        high = ram_size - low
        base_kib = 640
        ext_kib = min(max(low - HIMEM_START, 0) // KiB, 0xFFFF)
        above_16m = min(max(low - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        above_4g = min(high // (64 * KiB), 0xFFFFFF)
        ram = self._ram
        ram[0x15], ram[0x16] = base_kib & 0xFF, base_kib >> 8
        ram[0x17], ram[0x18] = ext_kib & 0xFF, ext_kib >> 8
        ram[0x30], ram[0x31] = ext_kib & 0xFF, ext_kib >> 8
        ram[0x34], ram[0x35] = above_16m & 0xFF, above_16m >> 8
        ram[0x5B] = above_4g & 0xFF
        ram[0x5C] = (above_4g >> 8) & 0xFF
        ram[0x5D] = above_4g >> 16
        checksum = sum(ram[0x10:0x2E]) & 0xFFFF
        ram[0x2E], ram[0x2F] = checksum >> 8, checksum & 0xFF
