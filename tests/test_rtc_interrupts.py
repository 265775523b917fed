"""The MC146818's interrupts (periodic, alarm, update) on IRQ 8, its clock offsets
(utc, localtime, variable, timezone) and RTC_CHANGE when the guest sets the time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Callable, Optional

import pytest
from test_dev_rtc import T0, Clock

from pyhv.config import ClockConfig, ConfigError
from pyhv.engine.devices import RecordingLine
from pyhv.engine.devices.rtc import CmosRtc, base_offset, periodic_hz


class Timer:
    def __init__(self, delay: float, work: Callable[[], None]) -> None:
        self.delay, self.work, self.cancelled = delay, work, False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """The engine loop's ``schedule`` as the RTC sees it, run by hand with the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.timers: list[Timer] = []

    def schedule(self, delay: float, work: Callable[[], None]) -> Timer:
        t = Timer(delay, work)
        self.timers.append(t)
        return t

    def pending(self) -> list[Timer]:
        return [t for t in self.timers if not t.cancelled]

    def run_next(self) -> Optional[float]:
        """Advance the clock to the next live timer and run it; its delay."""
        live = self.pending()
        if not live:
            return None
        t = min(live, key=lambda x: x.delay)
        self.timers.remove(t)
        self.clock.advance(t.delay)
        t.work()
        return t.delay


def rtc_with(clock: Clock, **kw: object) -> tuple[CmosRtc, RecordingLine, Loop]:
    line, loop = RecordingLine(), Loop(clock)
    rtc = CmosRtc(clock, irq=line, **kw)  # type: ignore[arg-type]
    rtc.schedule = loop.schedule
    return rtc, line, loop


def rd(rtc: CmosRtc, reg: int) -> int:
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def wr(rtc: CmosRtc, reg: int, value: int) -> None:
    rtc.write(0, 1, reg)
    rtc.write(1, 1, value)


# ---- no host work while nothing is enabled -------------------------------------------
def test_nothing_enabled_means_no_timer_and_no_irq() -> None:
    clock = Clock()
    rtc, line, loop = rtc_with(clock)
    assert loop.pending() == [] and not rtc.interrupts_enabled()
    clock.advance(5)
    assert rd(rtc, 0x0C) == 0x10  # UF is still set, but no IRQF and no line
    assert line.events == [] and loop.pending() == []
    wr(rtc, 0x0A, 0x2F)  # a periodic rate alone (PIE off) arms nothing either
    assert loop.pending() == []


def test_rate_select() -> None:
    assert [periodic_hz(0x20 | rs) for rs in (0, 1, 2, 3, 6, 15)] == [
        0, 256, 128, 8192, 1024, 2]


# ---- periodic --------------------------------------------------------------------------
def test_periodic_interrupt_flags_and_line() -> None:
    clock = Clock(T0.replace(microsecond=0))
    rtc, line, loop = rtc_with(clock)
    wr(rtc, 0x0A, 0x2F)  # 2 Hz
    wr(rtc, 0x0B, 0x42)  # PIE
    assert len(loop.pending()) == 1 and rtc.interrupts_enabled()
    assert loop.run_next() == pytest.approx(0.5, abs=1e-3)
    assert line.level and line.events == ["high"]
    # no further timer while IRQF waits for the guest (driftfix none)
    assert loop.pending() == []
    assert rd(rtc, 0x0C) == 0xC0  # IRQF | PF, cleared on read
    assert not line.level and rd(rtc, 0x0C) == 0x00
    for _ in range(4):
        loop.run_next()
        assert rd(rtc, 0x0C) & 0xC0 == 0xC0
    assert rtc.raised["periodic"] == 5
    assert line.events == ["high", "low"] * 5
    wr(rtc, 0x0B, 0x02)  # PIE off: the timer goes, the flag no longer comes
    assert loop.pending() == []
    clock.advance(3)
    assert rd(rtc, 0x0C) & 0x40 == 0


def test_periodic_stops_with_the_divider_and_rate_0() -> None:
    clock = Clock()
    rtc, _line, loop = rtc_with(clock)
    wr(rtc, 0x0B, 0x42)
    wr(rtc, 0x0A, 0x20)  # rate 0: off
    assert loop.pending() == []
    wr(rtc, 0x0A, 0x66)  # divider held in reset
    assert loop.pending() == []
    wr(rtc, 0x0A, 0x26)
    assert len(loop.pending()) == 1
    assert loop.pending()[0].delay < 1 / 1024 + 1e-5


def test_disabling_pie_lowers_a_pending_irq() -> None:
    clock = Clock()
    rtc, line, loop = rtc_with(clock)
    wr(rtc, 0x0A, 0x2F)
    wr(rtc, 0x0B, 0x42)
    loop.run_next()
    assert line.level
    wr(rtc, 0x0B, 0x02)
    assert not line.level  # IRQF follows the enables
    assert rd(rtc, 0x0C) == 0x40  # PF stays until read, without IRQF


def test_slew_reinjects_missed_ticks_and_reset_reinjection() -> None:
    clock = Clock(T0.replace(microsecond=0))
    rtc, line, loop = rtc_with(clock, lost_tick_policy="slew")
    wr(rtc, 0x0A, 0x2F)
    wr(rtc, 0x0B, 0x42)
    for _ in range(4):  # the guest does not acknowledge: 3 ticks are owed
        loop.run_next()
    assert rtc.coalesced == 3
    assert rd(rtc, 0x0C) == 0xD0  # IRQF | PF, and UF: two seconds went by
    delay = loop.run_next()  # an owed tick comes sooner than the next one
    assert delay is not None and delay < 0.5
    assert line.level and rtc.coalesced == 2
    rtc.reset_reinjection()
    assert rtc.coalesced == 0


# ---- alarm -------------------------------------------------------------------------------
def test_alarm_interrupt_in_bcd() -> None:
    clock = Clock(T0.replace(microsecond=500_000))  # 13:45:56.5
    rtc, line, loop = rtc_with(clock)
    wr(rtc, 0x01, 0x58)
    wr(rtc, 0x03, 0x45)
    wr(rtc, 0x05, 0x13)
    wr(rtc, 0x0B, 0x22)  # AIE
    loop.run_next()  # 13:45:57
    assert not line.level and rtc.raised["alarm"] == 0
    loop.run_next()  # 13:45:58: the alarm
    assert line.level
    assert rd(rtc, 0x0C) == 0xB0  # IRQF | AF | UF (UF comes each second)
    loop.run_next()
    assert not line.level and rd(rtc, 0x0C) == 0x10


def test_alarm_dont_care_bytes_and_binary_12h() -> None:
    clock = Clock(T0.replace(microsecond=500_000))
    rtc, line, loop = rtc_with(clock)
    wr(rtc, 0x0B, 0x04)  # binary, 12 h
    wr(rtc, 0x01, 0xFF)  # any second
    wr(rtc, 0x03, 46)
    wr(rtc, 0x05, 0x81)  # 1 PM
    wr(rtc, 0x0B, 0x24)  # AIE
    for _ in range(3):  # 13:45:57-59: minute 45 does not match
        loop.run_next()
        assert rd(rtc, 0x0C) & 0x20 == 0
    loop.run_next()  # 13:46:00, then every second of that minute
    assert line.level and rd(rtc, 0x0C) & 0xA0 == 0xA0
    loop.run_next()
    assert rd(rtc, 0x0C) & 0xA0 == 0xA0
    assert rtc.raised["alarm"] == 2


def test_alarm_seen_by_polling_without_a_loop() -> None:
    clock = Clock()
    rtc = CmosRtc(clock)
    wr(rtc, 0x01, 0xC0)
    wr(rtc, 0x03, 0xC0)
    wr(rtc, 0x05, 0xC0)
    clock.advance(1)
    assert rd(rtc, 0x0C) == 0x30  # AF and UF, no IRQF (AIE off)


# ---- update ended ---------------------------------------------------------------------------
def test_update_interrupt_once_a_second() -> None:
    clock = Clock()
    rtc, line, loop = rtc_with(clock)
    wr(rtc, 0x0B, 0x12)  # UIE
    assert loop.pending()[0].delay == pytest.approx(0.75, abs=1e-3)
    seen = []
    for _ in range(3):
        loop.run_next()
        seen.append(rd(rtc, 0x0C))
    assert seen == [0x90, 0x90, 0x90]
    assert rtc.raised["update"] == 3 and line.events == ["high", "low"] * 3
    wr(rtc, 0x0B, 0x82)  # SET clears UIE and stops updates
    assert loop.pending() == [] and rd(rtc, 0x0B) == 0x82


# ---- setting the clock, offsets ---------------------------------------------------------------
def test_guest_setting_the_time_reports_the_offset() -> None:
    clock = Clock()
    changes: list[int] = []
    rtc = CmosRtc(clock, offset_seconds=3600, on_change=changes.append)
    wr(rtc, 0x0B, 0x82)
    wr(rtc, 0x04, 0x16)  # 16:45:56 guest time, 14:45:56 before: +2 h
    wr(rtc, 0x0B, 0x02)
    assert changes == [7200]  # from the configured base (+1 h), as QEMU's RTC_CHANGE
    assert rtc.offset_seconds == pytest.approx(3 * 3600 - 0.25)
    wr(rtc, 0x00, 0x00)  # a write outside SET takes effect at once
    assert changes[-1] == 7200 - 56


def test_base_offsets() -> None:
    now = datetime(2024, 7, 1, 12, tzinfo=UTC)
    assert base_offset(ClockConfig(), now) == 0
    assert base_offset(ClockConfig("variable", -90), now) == -90
    assert base_offset(ClockConfig("timezone", timezone="Europe/Paris"), now) == 7200
    winter = datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert base_offset(ClockConfig("timezone", timezone="Europe/Paris"), winter) == 3600
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        ClockConfig("timezone", timezone="Mars/Olympus")


_CHILD = """
import json
from datetime import datetime, timezone
from pyhv.config import ClockConfig
from pyhv.engine.devices.rtc import CmosRtc, base_offset
now = datetime(2024, 7, 1, 12, tzinfo=timezone.utc)
out = {o: base_offset(c, now) for o, c in (
    ("utc", ClockConfig()), ("localtime", ClockConfig("localtime")),
    ("variable-localtime", ClockConfig("variable", 30, "localtime")))}
rtc = CmosRtc(lambda: now, offset_seconds=out["localtime"])
out["hour"] = rtc.guest_time().hour
print(json.dumps(out))
"""


@pytest.mark.parametrize("tz,expected", [("UTC", 0), ("Asia/Kolkata", 19800),
                                         ("America/New_York", -4 * 3600)])
def test_localtime_follows_the_host_tz(tz: str, expected: int) -> None:
    env = dict(os.environ, TZ=tz)
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    out = json.loads(run.stdout)
    assert out["utc"] == 0
    assert out["localtime"] == expected
    assert out["variable-localtime"] == expected + 30
    assert out["hour"] == (12 + expected // 3600) % 24
