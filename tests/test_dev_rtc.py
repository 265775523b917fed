"""Tests for the MC146818 CMOS RTC model."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from pyhv.engine.devices.rtc import CmosRtc
from pyhv.engine.layout import GiB, MiB

INDEX, DATA = 0, 1
# a Thursday
T0 = datetime(2024, 2, 29, 13, 45, 56, 250_000, tzinfo=UTC)


class Clock:
    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def cmos_read(rtc: CmosRtc, reg: int) -> int:
    rtc.write(INDEX, 1, 0x80 | reg)  # Linux sets NMI-disable sometimes
    return rtc.read(DATA, 1)


def cmos_write(rtc: CmosRtc, reg: int, value: int) -> None:
    rtc.write(INDEX, 1, reg)
    rtc.write(DATA, 1, value)


def bcd2bin(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def linux_get_time(rtc: CmosRtc) -> datetime:
    """mc146818_get_time(): avoid UIP, read, revalidate, convert."""
    for _ in range(20):
        seconds = cmos_read(rtc, 0x00)
        if cmos_read(rtc, 0x0A) & 0x80:
            continue
        if seconds != cmos_read(rtc, 0x00):
            continue
        minute = cmos_read(rtc, 0x02)
        hour = cmos_read(rtc, 0x04)
        day = cmos_read(rtc, 0x07)
        mon = cmos_read(rtc, 0x08)
        year = cmos_read(rtc, 0x09)
        century = cmos_read(rtc, 0x32)
        ctrl = cmos_read(rtc, 0x0B)
        if cmos_read(rtc, 0x0A) & 0x80 or seconds != cmos_read(rtc, 0x00):
            continue
        break
    else:
        raise AssertionError("UIP never cleared")
    if not ctrl & 0x04:
        seconds, minute, hour, day, mon, year, century = (
            bcd2bin(v) for v in (seconds, minute, hour, day, mon, year, century))
    assert ctrl & 0x02
    return datetime(century * 100 + year, mon, day, hour, minute, seconds)


def test_reset_values_and_bcd_time() -> None:
    rtc = CmosRtc(Clock())
    assert cmos_read(rtc, 0x0A) == 0x26
    assert cmos_read(rtc, 0x0B) == 0x02
    assert cmos_read(rtc, 0x0D) == 0x80
    assert [cmos_read(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    assert rtc.read(INDEX, 1) == 0xFF
    assert linux_get_time(rtc) == datetime(2024, 2, 29, 13, 45, 56)


def test_binary_and_12_hour_modes() -> None:
    rtc = CmosRtc(Clock())
    cmos_write(rtc, 0x0B, 0x06)
    assert [cmos_read(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        56, 45, 13, 5, 29, 2, 24, 20]
    assert linux_get_time(rtc) == datetime(2024, 2, 29, 13, 45, 56)
    cmos_write(rtc, 0x0B, 0x00)  # BCD, 12 h
    assert cmos_read(rtc, 0x04) == 0x81
    cmos_write(rtc, 0x0B, 0x04)  # binary, 12 h
    assert cmos_read(rtc, 0x04) == 0x81
    rtc2 = CmosRtc(Clock(datetime(2024, 1, 7, 0, 5, tzinfo=UTC)))  # Sunday
    cmos_write(rtc2, 0x0B, 0x00)
    assert cmos_read(rtc2, 0x04) == 0x12  # 12 AM
    assert cmos_read(rtc2, 0x06) == 1
    cmos_write(rtc2, 0x0B, 0x02)
    assert cmos_read(rtc2, 0x04) == 0x00


def test_clock_runs_and_offset() -> None:
    clock = Clock()
    rtc = CmosRtc(clock, offset_seconds=3600)
    assert cmos_read(rtc, 0x04) == 0x14
    clock.advance(10)
    assert cmos_read(rtc, 0x00) == 0x06
    assert cmos_read(rtc, 0x02) == 0x46
    assert rtc.guest_time() == T0 + timedelta(seconds=3610)


def test_default_clock_is_host_utc() -> None:
    rtc = CmosRtc()
    now = datetime.now(UTC)
    assert abs((rtc.guest_time() - now).total_seconds()) < 5
    delta = linux_get_time(rtc) - now.replace(tzinfo=None)
    assert abs(delta.total_seconds()) < 5


def test_uip_window() -> None:
    clock = Clock(T0.replace(microsecond=999_900))
    rtc = CmosRtc(clock)
    assert cmos_read(rtc, 0x0A) == 0xA6
    clock.advance(0.001)
    assert cmos_read(rtc, 0x0A) == 0x26
    # with the divider stopped there are no updates
    clock.t = T0.replace(microsecond=999_900)
    cmos_write(rtc, 0x0A, 0x76)
    assert cmos_read(rtc, 0x0A) == 0x76
    cmos_write(rtc, 0x0A, 0xA6)  # UIP is read only
    clock.advance(0.001)
    assert cmos_read(rtc, 0x0A) == 0x26


def test_status_c_update_flag() -> None:
    clock = Clock()
    rtc = CmosRtc(clock)
    assert cmos_read(rtc, 0x0C) == 0
    clock.advance(1)
    assert cmos_read(rtc, 0x0C) == 0x10
    assert cmos_read(rtc, 0x0C) == 0
    cmos_write(rtc, 0x0C, 0xFF)
    cmos_write(rtc, 0x0D, 0x00)
    assert cmos_read(rtc, 0x0D) == 0x80


def test_guest_sets_clock_with_set_bit() -> None:
    clock = Clock()
    rtc = CmosRtc(clock)
    cmos_write(rtc, 0x0B, 0x82)  # SET, 24 h, BCD
    for reg, value in ((0, 0x30), (2, 0x15), (4, 0x09), (7, 0x31),
                       (8, 0x12), (9, 0x99), (0x32, 0x19)):
        cmos_write(rtc, reg, value)
    clock.advance(5)  # frozen while SET
    assert cmos_read(rtc, 0x00) == 0x30
    assert cmos_read(rtc, 0x0A) & 0x80 == 0
    cmos_write(rtc, 0x0B, 0x02)
    assert rtc.guest_time().replace(tzinfo=None) == datetime(1999, 12, 31, 9, 15, 30)
    clock.advance(31)
    assert linux_get_time(rtc) == datetime(1999, 12, 31, 9, 16, 1)
    assert cmos_read(rtc, 0x06) == 6  # Friday


def test_guest_sets_clock_in_binary_12h_mode_without_set() -> None:
    clock = Clock()
    rtc = CmosRtc(clock)
    cmos_write(rtc, 0x0B, 0x04)  # binary, 12 h
    cmos_write(rtc, 0x04, 0x80 | 11)  # 11 PM
    cmos_write(rtc, 0x02, 7)
    cmos_write(rtc, 0x06, 3)  # weekday follows the date: ignored
    t = rtc.guest_time()
    assert (t.hour, t.minute, t.second) == (23, 7, 56)
    assert rtc.offset_seconds == (t - T0).total_seconds()
    cmos_write(rtc, 0x04, 12)  # 12 AM
    assert rtc.guest_time().hour == 0


def test_invalid_dates_are_ignored() -> None:
    clock = Clock()
    rtc = CmosRtc(clock, offset_seconds=7)
    cmos_write(rtc, 0x0B, 0x82)
    cmos_write(rtc, 0x07, 0x31)  # 31 February
    cmos_write(rtc, 0x0B, 0x02)
    assert rtc.offset_seconds == 7
    cmos_write(rtc, 0x00, 0x99)  # second 99
    cmos_write(rtc, 0x08, 0x00)  # month 0
    assert rtc.offset_seconds == 7


def test_plain_ram_and_nmi_bit() -> None:
    rtc = CmosRtc(Clock())
    cmos_write(rtc, 0x40, 0xAB)
    rtc.write(INDEX, 1, 0xC0)
    assert rtc.read(DATA, 1) == 0xAB
    cmos_write(rtc, 0x01, 0x59)  # alarm seconds
    assert cmos_read(rtc, 0x01) == 0x59
    assert rtc.cmos(0x40) == 0xAB


def test_memory_size_bytes() -> None:
    rtc = CmosRtc(Clock(), ram_size=64 * MiB)
    assert (rtc.cmos(0x15), rtc.cmos(0x16)) == (0x80, 0x02)
    assert (rtc.cmos(0x17), rtc.cmos(0x18)) == (0x00, 0xFC)
    assert (rtc.cmos(0x30), rtc.cmos(0x31)) == (0x00, 0xFC)
    assert (rtc.cmos(0x34), rtc.cmos(0x35)) == (0x00, 0x03)
    assert [rtc.cmos(i) for i in (0x5B, 0x5C, 0x5D)] == [0, 0, 0]
    checksum = sum(rtc.cmos(i) for i in range(0x10, 0x2E))
    assert (rtc.cmos(0x2E) << 8) | rtc.cmos(0x2F) == checksum

    rtc = CmosRtc(Clock(), ram_size=8 * GiB)
    assert (rtc.cmos(0x17), rtc.cmos(0x18)) == (0xFF, 0xFF)
    above_16m = (3 * GiB - 16 * MiB) // (64 * 1024)
    assert rtc.cmos(0x34) | rtc.cmos(0x35) << 8 == above_16m
    above_4g = 5 * GiB // (64 * 1024)
    assert rtc.cmos(0x5B) | rtc.cmos(0x5C) << 8 | rtc.cmos(0x5D) << 16 == above_4g
    assert cmos_read(rtc, 0x5C) == rtc.cmos(0x5C)


def test_garbage_never_raises() -> None:
    rng = random.Random(146818)
    values = [0, 1, 0x7F, 0x80, 0x8B, 0xFF, 0x100, 0xFFFF, 0xDEADBEEF,
              0xFFFFFFFF] + [rng.randrange(1 << 32) for _ in range(30)]
    clock = Clock()
    rtc = CmosRtc(clock)
    for offset in range(4):
        for size in (1, 2, 4):
            for value in values:
                rtc.write(offset, size, value)
                assert 0 <= rtc.read(offset, size) < 1 << (8 * size)
    for reg in range(256):
        for value in (0x00, 0xFF, rng.randrange(256), 0x86, 0x02):
            cmos_write(rtc, reg, value)
            assert 0 <= rtc.read(DATA, 1) <= 0xFF
    assert rtc.read(2, 1) == 0xFF
