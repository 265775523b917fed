"""The MC146818 real-time clock and CMOS RAM (ports 0x70/0x71).

Offsets from the device base (port 0x70)::

    +0  index register, write only (bit 7, NMI disable, is ignored); reads 0xff
    +1  data: the CMOS byte selected by the index

CMOS bytes::

    0x00 seconds  0x02 minutes  0x04 hours  0x06 weekday (1 = Sunday)
    0x07 day      0x08 month    0x09 year (2 digits)    0x32 century
    0x01/0x03/0x05  alarm seconds/minutes/hours, in the current format; a
         value 0xc0-0xff is "don't care" (matches every value)
    0x0a status A: divider (bits 6-4) and rate select (bits 3-0) as written
         (0x26 after reset); UIP (bit 7) reads 1 during the last 244 us of
         each second, as on the chip.  The clock, its updates and the
         periodic interrupt run only with the 32.768 kHz divider (010)
    0x0b status B: SET (bit 7), PIE (6), AIE (5), UIE (4), DM (bit 2,
         1 = binary) and 24/12 (bit 1) are honoured; SQWE and DSE are stored.
         Default 0x02: 24 h, BCD, no interrupt enabled
    0x0c status C: IRQF (bit 7), PF (6: a periodic tick), AF (5: the time
         matched the alarm), UF (4: an update cycle ended, once a second);
         AF and UF are set whether or not their interrupt is enabled, PF only
         while PIE is 1 (as QEMU does), IRQF when an enabled flag is set;
         reading clears all of them and lowers the IRQ line
    0x0d status D: 0x80 (valid RAM and time)

Interrupts go out on ``irq`` (ISA IRQ 8): the line rises when IRQF becomes 1
and falls when status C is read (or the enabling bit is cleared).  The flags
are computed from the clock when read, so the device needs no host work while
no interrupt is enabled; with one enabled, a timer on the engine's event loop
(``schedule``, set by the machine) raises it when due.  Periodic rates follow
register A's rate select: ``32768 >> (RS - 1)`` Hz (RS 1 and 2: 256 and
128 Hz, RS 0: off).  With ``lost_tick_policy='slew'`` (QEMU's driftfix=slew)
periodic ticks that come while IRQF is still set are counted and delivered
later, faster; :meth:`reset_reinjection` drops that count.
    0x0e..0x7f  plain RAM, with the PC BIOS memory-size bytes filled in

The time is the injected ``now()`` clock plus ``offset_seconds``; the
registers are computed from it on every read and formatted in the current
DM/24h mode.  Guest writes to the time registers *set the clock*: they move
the offset.  While status B's SET bit is 1 the time registers are frozen and
hold what the guest writes; clearing SET commits them.  A write outside SET
takes effect at once.  Writes that make an invalid date are ignored, and the
weekday always follows the date.  Each change of the clock by the guest calls
``on_change(seconds)`` with the new offset from the configured base (what QMP's
``RTC_CHANGE`` carries).  :func:`base_offset` turns a ``<clock>`` setting into
the starting offset.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pyhv.engine.layout import HIMEM_START, KiB, MiB, ram_ranges

if TYPE_CHECKING:
    from pyhv.config import ClockConfig
    from pyhv.engine.devices import InterruptLine

INDEX_OFFSET = 0
DATA_OFFSET = 1

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
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
A_RATE_MASK = 0x0F
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80
#: the flags of status C an enable bit of status B stands for (same bit)
_SOURCES = C_PF | C_AF | C_UF
#: the RTC's time base, in Hz
XTAL_HZ = 32768
#: alarm bytes at or above this value match any time
ALARM_DONT_CARE = 0xC0
#: the most late periodic ticks ``slew`` keeps for reinjection
MAX_COALESCED = 10_000

DEFAULT_REG_A = 0x26
DEFAULT_REG_B = B_24H

#: the update cycle begins this long before each second ends (UIP is set)
_UIP_WINDOW_US = 244

CMOS_SIZE = 128


def _host_utc() -> datetime:
    return datetime.now(UTC)


def _local_offset(now: datetime) -> float:
    offset = now.astimezone().utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def base_offset(clock: "ClockConfig", now: Optional[datetime] = None) -> float:
    """Seconds the guest's RTC runs ahead of UTC for a ``<clock>`` setting (pure
    but for the host's time zone, read from ``TZ``/``/etc/localtime`` at ``now``).

    ``utc`` 0; ``localtime`` the host's UTC offset; ``timezone`` that zone's UTC
    offset; ``variable`` the adjustment, plus the host's UTC offset with basis
    ``localtime``.  Offsets are taken once, at start, as QEMU does.
    """
    now = _host_utc() if now is None else now
    if clock.offset == "localtime":
        return _local_offset(now)
    if clock.offset == "timezone":
        try:
            zone = ZoneInfo(clock.timezone or "")
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"clock: unknown time zone {clock.timezone!r}") from e
        offset = now.astimezone(zone).utcoffset()
        return offset.total_seconds() if offset is not None else 0.0
    if clock.offset == "variable":
        basis = _local_offset(now) if clock.basis == "localtime" else 0.0
        return float(clock.adjustment) + basis
    return 0.0


def periodic_hz(reg_a: int) -> float:
    """The periodic interrupt rate register A selects (0: off)."""
    rate = reg_a & A_RATE_MASK
    if rate == 0:
        return 0.0
    if rate <= 2:
        rate += 7  # 256 and 128 Hz, as on the chip
    return XTAL_HZ / (1 << (rate - 1))


class CmosRtc:
    """MC146818 RTC + 128 bytes of CMOS RAM."""

    def __init__(
        self,
        now: Callable[[], datetime] = _host_utc,
        *,
        offset_seconds: float = 0.0,
        ram_size: int = 0,
        irq: Optional["InterruptLine"] = None,
        on_change: Optional[Callable[[int], None]] = None,
        lost_tick_policy: str = "discard",
    ) -> None:
        self._now = now
        self.offset_seconds = float(offset_seconds)
        #: the configured offset: ``on_change`` reports offsets from it
        self.base_offset = float(offset_seconds)
        self.irq = irq
        self.on_change = on_change
        self.lost_tick_policy = lost_tick_policy
        #: periodic ticks owed to the guest (``slew``)
        self.coalesced = 0
        #: interrupts raised on the line, by source (for tests and queries)
        self.raised = {"periodic": 0, "alarm": 0, "update": 0}
        self._lock = threading.RLock()
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = DEFAULT_REG_A
        self._ram[REG_B] = DEFAULT_REG_B
        #: binary time fields held while SET is 1 (None: the clock runs)
        self._frozen: dict[int, int] | None = None
        #: status C flags not yet read
        self._flags = 0
        #: the guest second and the periodic tick the flags were brought up to
        self._checked_second = self._guest_second()
        self._checked_tick = self._tick()
        self._schedule: Optional[Callable[[float, Callable[[], None]], Any]] = None
        self._timer: Any = None
        self._gen = 0
        if ram_size:
            self._fill_memory_size(ram_size)

    # ---- host side -------------------------------------------------------
    def guest_time(self) -> datetime:
        """The time the guest's clock shows now."""
        return self._guest_now()

    def cmos(self, index: int) -> int:
        """A CMOS RAM byte as stored (no time computation, no side effects)."""
        return self._ram[index & 0x7F]

    @property
    def schedule(self) -> Optional[Callable[[float, Callable[[], None]], Any]]:
        """``schedule(delay, work)``: runs ``work`` on the engine's loop later (the
        machine sets it; None: no loop, interrupts are only seen by polling)."""
        return self._schedule

    @schedule.setter
    def schedule(self, fn: Optional[Callable[[float, Callable[[], None]], Any]]) -> None:
        with self._lock:
            self._schedule = fn
            self._timer = None
            self._rearm()

    def set_offset(self, seconds: float) -> None:
        """Set the clock to run ``seconds`` ahead of the host (no ``on_change``)."""
        with self._lock:
            self.offset_seconds = float(seconds)
            self._checked_second = self._guest_second()
            self._rearm()

    def reset_reinjection(self) -> None:
        """Forget periodic ticks owed to the guest (QMP ``rtc-reset-reinjection``)."""
        with self._lock:
            self.coalesced = 0

    def interrupts_enabled(self) -> bool:
        """Whether an RTC interrupt source is enabled with the oscillator running."""
        with self._lock:
            return self._running() and bool(self._enabled())

    # ---- bus interface ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read the data port (offset 1); the index port reads 0xff."""
        if offset == DATA_OFFSET:
            with self._lock:
                return self._read_cmos(self._index)
        return (1 << (8 * size)) - 1 if size > 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Select a CMOS byte (offset 0) or write it (offset 1)."""
        value &= 0xFF
        if offset == INDEX_OFFSET:
            self._index = value & 0x7F
        elif offset == DATA_OFFSET:
            with self._lock:
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
            self._advance()
            self._ram[REG_A] = value & 0x7F
            self._checked_tick = self._tick()  # a new rate starts from now
            self._rearm()
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            pass  # read only
        else:
            self._ram[index] = value

    def _read_c(self) -> int:
        self._advance()
        value = self._flags
        if value & self._enabled():
            value |= C_IRQF
        self._flags = 0
        if self.irq is not None:
            self.irq.set_level(False)
        self._rearm()
        return value

    def _running(self) -> bool:
        return self._ram[REG_A] & A_DIVIDER_MASK == A_DIVIDER_32K

    def _in_update(self) -> bool:
        if self._frozen is not None or not self._running():
            return False
        return self._guest_now().microsecond >= 1_000_000 - _UIP_WINDOW_US

    def _write_b(self, value: int) -> None:
        self._advance()
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE
            if self._frozen is None:
                self._frozen = self._fields(self._guest_now())
        elif self._frozen is not None:
            frozen, self._frozen = self._frozen, None
            self._set_clock(frozen, microsecond=0)
        before = self._pending()
        self._ram[REG_B] = value
        after = self._pending()
        if self.irq is not None and before != after:
            self.irq.set_level(after)
        if after and not before:
            self._count_raised(self._flags & self._enabled())
        self._rearm()

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
        # the seconds the clock jumped over neither update nor match the alarm
        self._checked_second = self._guest_second()
        self._rearm()
        if self.on_change is not None:
            self.on_change(round(self.offset_seconds - self.base_offset))

    # ---- flags and interrupts --------------------------------------------
    def _enabled(self) -> int:
        return self._ram[REG_B] & _SOURCES

    def _pending(self) -> bool:
        return bool(self._flags & self._enabled())

    def _guest_second(self) -> int:
        return math.floor(self._guest_now().timestamp())

    def _tick(self) -> int:
        """The periodic tick count of the current rate (0 when off)."""
        hz = periodic_hz(self._ram[REG_A])
        if not hz:
            return 0
        return math.floor(self._now().timestamp() * hz)

    def _alarm_matches(self, second: int) -> bool:
        t = datetime.fromtimestamp(second, UTC)
        for reg, value in ((REG_SECONDS_ALARM, t.second), (REG_MINUTES_ALARM, t.minute),
                           (REG_HOURS_ALARM, t.hour)):
            raw = self._ram[reg]
            if raw >= ALARM_DONT_CARE:
                continue
            if self._decode(reg - 1, raw) != value:
                return False
        return True

    def _advance(self) -> int:
        """Bring the flags up to now; returns the new flags.  Raises the line
        when IRQF becomes 1."""
        new = 0
        if self._running():
            tick = self._tick()
            if (self._ram[REG_B] & B_PIE and periodic_hz(self._ram[REG_A])
                    and tick != self._checked_tick):
                new |= C_PF
                if self.lost_tick_policy == "slew":
                    # ticks merged into this one, and this one too while IRQF is 1
                    owed = max(tick - self._checked_tick - 1, 0)
                    owed += 1 if self._pending() else 0
                    self.coalesced = min(self.coalesced + owed, MAX_COALESCED)
            self._checked_tick = tick
            if self._frozen is None:
                second = self._guest_second()
                if second > self._checked_second:
                    new |= C_UF
                    first = max(self._checked_second + 1, second - 86400)
                    if any(self._alarm_matches(s) for s in range(first, second + 1)):
                        new |= C_AF
                self._checked_second = second
        else:
            self._checked_tick = self._tick()
            self._checked_second = self._guest_second()
        before = self._pending()
        self._flags |= new
        if not before and self._pending():
            self._count_raised(new & self._enabled())
            if self.irq is not None:
                self.irq.set_level(True)
        return new

    def _count_raised(self, sources: int) -> None:
        for bit, name in ((C_PF, "periodic"), (C_AF, "alarm"), (C_UF, "update")):
            if sources & bit:
                self.raised[name] += 1

    def _next_delay(self) -> Optional[float]:
        """Seconds until the next enabled event (None: nothing to wait for)."""
        if not self._running():
            return None
        enabled = self._enabled()
        if not enabled:
            return None
        if self._pending():
            # IRQF stays 1 until the guest reads C: only slew keeps counting
            if not (enabled & C_PF and self.lost_tick_policy == "slew"):
                return None
        elif self.coalesced and enabled & C_PF:
            hz = periodic_hz(self._ram[REG_A])
            return 1.0 / (2 * hz) if hz else None
        delays = []
        hz = periodic_hz(self._ram[REG_A])
        if enabled & C_PF and hz:
            now = self._now().timestamp()
            delays.append((math.floor(now * hz) + 1) / hz - now)
        if enabled & (C_AF | C_UF) and self._frozen is None:
            t = self._guest_now().timestamp()
            delays.append(math.floor(t) + 1 - t)
        if not delays:
            return None
        return max(min(delays), 0.0) + 1e-6

    def _rearm(self) -> None:
        """(Re)arm the loop timer for the next enabled event; none if nothing is
        enabled, so a guest without RTC interrupts costs no host work."""
        if self._timer is not None and hasattr(self._timer, "cancel"):
            self._timer.cancel()
        self._timer = None
        self._gen += 1
        if self._schedule is None:
            return
        delay = self._next_delay()
        if delay is None:
            return
        gen = self._gen
        self._timer = self._schedule(delay, lambda: self._fire(gen))

    def _fire(self, gen: int) -> None:
        with self._lock:
            if gen != self._gen:
                return  # a timer armed before the registers changed
            self._timer = None
            self._advance()
            if self.coalesced and not self._pending() and self._enabled() & C_PF:
                self.coalesced -= 1
                self._flags |= C_PF
                self._count_raised(C_PF)
                if self.irq is not None:
                    self.irq.set_level(True)
            self._rearm()

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
