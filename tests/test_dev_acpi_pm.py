"""Tests for the ACPI PM1a/PM-timer model."""

from __future__ import annotations

import random

from pyhv.engine.devices import RecordingLine
from pyhv.engine.devices.acpi_pm import (
    PM_BLOCK_LEN,
    PM_TIMER_HZ,
    AcpiPm,
)
from pyhv.engine.layout import (
    PM1A_CNT_PORT,
    PM1A_EVT_LEN,
    PM1A_EVT_PORT,
    PM_TMR_LEN,
    PM_TMR_PORT,
    S5_SLP_TYP,
)

STS, EN, CNT, TMR = 0, 2, 4, 8
PWRBTN = 1 << 8
TMR_BIT = 1 << 0
WAK = 1 << 15
SLP_EN = 1 << 13


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance_ticks(self, ticks: int) -> None:
        # the smallest number of ns that covers ``ticks`` timer ticks
        self.ns += -(-ticks * 1_000_000_000 // PM_TIMER_HZ)


def make() -> tuple[AcpiPm, RecordingLine, list[int], FakeClock]:
    line = RecordingLine()
    sleeps: list[int] = []
    clock = FakeClock()
    return AcpiPm(line, sleeps.append, clock), line, sleeps, clock


def test_layout_matches_ports() -> None:
    assert PM1A_CNT_PORT - PM1A_EVT_PORT == CNT
    assert PM_TMR_PORT - PM1A_EVT_PORT == TMR
    assert PM_TMR_PORT + PM_TMR_LEN - PM1A_EVT_PORT == PM_BLOCK_LEN
    assert PM1A_EVT_LEN == 4


def test_reset_state() -> None:
    pm, line, _, _ = make()
    assert pm.read(STS, 2) == 0
    assert pm.read(EN, 2) == 0
    assert pm.read(CNT, 2) == 0x0001  # SCI_EN: always ACPI mode
    assert pm.read(6, 2) == 0
    assert not line.level


def test_power_button_sci() -> None:
    pm, line, _, _ = make()
    pm.write(EN, 2, PWRBTN)
    assert not line.level
    pm.press_power_button()
    assert line.level and pm.sci_level
    assert pm.read(STS, 2) & PWRBTN
    pm.write(STS, 2, 0)  # writing 0 clears nothing
    assert line.level
    pm.write(STS, 2, PWRBTN)  # write-1-to-clear
    assert not line.level
    assert pm.read(STS, 2) & PWRBTN == 0
    assert line.events == ["high", "low"]


def test_power_button_before_enable() -> None:
    pm, line, _, _ = make()
    pm.press_power_button()
    assert not line.level
    assert pm.read(STS, 2) & PWRBTN
    pm.write(EN, 2, PWRBTN)
    assert line.level
    pm.write(EN, 2, 0)
    assert not line.level
    # byte access to the high byte of PM1_STS (as ACPICA may do)
    pm.write(STS + 1, 1, 0x01)
    assert pm.read(STS, 2) == 0


def test_32bit_access_spans_sts_and_en() -> None:
    pm, line, _, _ = make()
    pm.write(STS, 4, PWRBTN << 16)  # PM1_EN via a dword write
    assert pm.read(EN, 2) == PWRBTN
    pm.press_power_button()
    assert pm.read(STS, 4) == PWRBTN | PWRBTN << 16
    pm.write(STS, 4, PWRBTN | PWRBTN << 16)  # clear STS, keep EN
    assert pm.read(STS, 4) == PWRBTN << 16
    assert not line.level


def test_sleep_s5() -> None:
    pm, _, sleeps, _ = make()
    pm.write(CNT, 2, S5_SLP_TYP << 10)  # ACPICA writes SLP_TYP first
    assert sleeps == []
    assert pm.read(CNT, 2) == (S5_SLP_TYP << 10) | 1
    pm.write(CNT, 2, (S5_SLP_TYP << 10) | SLP_EN)
    assert sleeps == [S5_SLP_TYP]
    assert pm.read(CNT, 2) & SLP_EN == 0  # write-only
    assert pm.read(STS, 2) & WAK == 0  # powered off: no wake


def test_sleep_other_states_wake_at_once() -> None:
    pm, _, sleeps, _ = make()
    pm.write(STS, 2, WAK)
    pm.write(CNT, 2, (3 << 10) | SLP_EN | 1)
    assert sleeps == [3]
    assert pm.read(STS, 2) & WAK
    pm.write(STS, 2, WAK)
    assert pm.read(STS, 2) & WAK == 0


def test_byte_writes_to_cnt() -> None:
    pm, _, sleeps, _ = make()
    pm.write(CNT, 1, 0xFF)  # low byte only: SLP_EN not written
    assert sleeps == []
    pm.write(CNT + 1, 1, (SLP_EN | 5 << 10) >> 8)
    assert sleeps == [5]
    AcpiPm(RecordingLine()).write(CNT, 2, SLP_EN)  # no callback: harmless


def test_pm_timer_counts_and_wraps() -> None:
    pm, line, _, clock = make()
    assert pm.read(TMR, 4) == 0
    clock.ns += 1_000_000_000
    assert pm.read(TMR, 4) == PM_TIMER_HZ
    last = pm.read(TMR, 4)
    for _ in range(50):
        clock.ns += 7_919_111
        now = pm.read(TMR, 4)
        assert now > last
        last = now
    clock.ns = 5_000_000_000
    clock.advance_ticks((1 << 24) + 10)
    value = pm.read(TMR, 4)
    assert 10 <= value < 20  # wrapped at 24 bits
    assert pm.read(TMR, 4) >> 24 == 0
    assert pm.read(TMR, 2) == value & 0xFFFF
    assert not line.level


def test_timer_status_on_bit23_toggle() -> None:
    pm, line, _, clock = make()
    clock.advance_ticks((1 << 23) - 100)
    assert pm.read(STS, 2) & TMR_BIT == 0
    clock.advance_ticks(200)
    assert pm.read(STS, 2) & TMR_BIT
    pm.write(STS, 2, TMR_BIT)
    assert pm.read(STS, 2) & TMR_BIT == 0
    pm.write(EN, 2, TMR_BIT)
    clock.advance_ticks(1 << 23)
    assert pm.read(STS, 2) & TMR_BIT
    assert line.level  # TMR_EN: SCI (seen lazily at the access)
    pm.write(STS, 2, TMR_BIT)
    assert not line.level


def test_garbage_never_raises() -> None:
    rng = random.Random(0x600)
    values = [0, 1, 0x2000, 0x3400, 0xFFFF, 0x10000, 0xDEADBEEF,
              0xFFFFFFFF] + [rng.randrange(1 << 32) for _ in range(40)]
    pm, _, _, clock = make()
    for offset in range(-2, 16):
        for size in (1, 2, 4):
            for value in values:
                pm.write(offset, size, value)
                clock.ns += rng.randrange(10**9)
                assert 0 <= pm.read(offset, size) < 1 << (8 * size)
    pm.press_power_button()
    assert pm.read(12, 1) == 0xFF
    assert pm.read(14, 4) == 0xFFFFFFFF
