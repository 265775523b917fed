"""Tests for the i8042 model, following Linux's i8042 and atkbd probes."""

from __future__ import annotations

import random

from pyhv.engine.devices import RecordingLine
from pyhv.engine.devices.i8042 import DEFAULT_CTR, I8042

DATA = 0
CMD = STATUS = 4
OBF = 0x01
AUXDATA = 0x20


class Kbc:
    """Linux's i8042_command()/i8042_kbd_write() over the model."""

    def __init__(self) -> None:
        self.line = RecordingLine()
        self.resets = 0
        self.dev = I8042(self.line, reset=self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def command(self, cmd: int, params: bytes = b"", replies: int = 0) -> list[int]:
        assert not self.dev.read(STATUS, 1) & 0x02  # input buffer empty
        self.dev.write(CMD, 1, cmd)
        for p in params:
            self.dev.write(DATA, 1, p)
        out = []
        for _ in range(replies):
            assert self.dev.read(STATUS, 1) & OBF, "controller timed out"
            out.append(self.dev.read(DATA, 1))
        return out

    def drain(self) -> list[int]:
        out = []
        while self.dev.read(STATUS, 1) & OBF:
            out.append(self.dev.read(DATA, 1))
        return out


def test_initial_status_and_flush() -> None:
    kbc = Kbc()
    status = kbc.dev.read(STATUS, 1)
    assert status != 0xFF
    assert status & 0x10  # keylock: unlocked
    assert not status & OBF
    assert kbc.drain() == []
    assert kbc.dev.command_byte == DEFAULT_CTR


def test_linux_controller_init() -> None:
    kbc = Kbc()
    assert kbc.command(0xAA, replies=1) == [0x55]  # self-test
    assert kbc.dev.read(STATUS, 1) & 0x04  # system flag
    ctr = [kbc.command(0x20, replies=1)[0] for _ in range(2)]
    assert ctr[0] == ctr[1] == DEFAULT_CTR
    assert ctr[0] & 0x40  # translated: atkbd sees SERIO_8042_XL
    new = (ctr[0] | 0x10) & ~0x01  # disable kbd interface and interrupt
    kbc.command(0x60, bytes([new]))
    assert kbc.command(0x20, replies=1) == [new]
    assert kbc.drain() == []
    assert kbc.command(0xAB, replies=1) == [0x00]
    assert not kbc.line.level  # interrupts off: polled replies only


def test_no_aux_port_is_reported_quickly() -> None:
    kbc = Kbc()
    kbc.dev.write(CMD, 1, 0xD3)  # AUX loopback
    kbc.dev.write(DATA, 1, 0x5A)
    status = kbc.dev.read(STATUS, 1)
    assert status & OBF and not status & AUXDATA  # Linux: auxerr
    assert kbc.dev.read(DATA, 1) == 0x5A
    reply = kbc.command(0xA9, replies=1)[0]  # AUX interface test
    assert reply not in (0x00, 0xFA, 0xFF)  # Linux gives up on AUX
    kbc.command(0xA8)
    assert not kbc.dev.command_byte & 0x20
    kbc.command(0xA7)
    assert kbc.dev.command_byte & 0x20
    kbc.command(0xD4, b"\xff")  # to the (absent) mouse: lost
    assert kbc.drain() == []


def test_keyboard_reset_raises_one_edge_per_byte() -> None:
    kbc = Kbc()
    kbc.command(0x60, bytes([0x45]))  # kbd interrupt on, translation on
    kbc.dev.write(DATA, 1, 0xFF)
    assert kbc.line.level
    assert kbc.dev.read(DATA, 1) == 0xFA
    assert kbc.line.level
    assert kbc.dev.read(DATA, 1) == 0xAA
    assert not kbc.line.level
    assert kbc.line.events == ["high", "low", "high", "low"]


def test_keyboard_identify_and_parameters() -> None:
    kbc = Kbc()
    kbc.dev.write(DATA, 1, 0xF5)  # atkbd: reset-disable
    assert kbc.drain() == [0xFA]
    kbc.dev.write(DATA, 1, 0xF2)
    assert kbc.drain() == [0xFA, 0xAB, 0x41]
    kbc.dev.write(DATA, 1, 0xED)  # set LEDs
    assert kbc.drain() == [0xFA]
    kbc.dev.write(DATA, 1, 0x00)
    assert kbc.drain() == [0xFA]
    kbc.dev.write(DATA, 1, 0xF3)  # typematic rate
    kbc.dev.write(DATA, 1, 0x20)
    assert kbc.drain() == [0xFA, 0xFA]
    kbc.dev.write(DATA, 1, 0xF0)  # get scan-code set (translated)
    kbc.dev.write(DATA, 1, 0x00)
    assert kbc.drain() == [0xFA, 0xFA, 0x41]
    kbc.dev.write(DATA, 1, 0xF4)
    kbc.dev.write(DATA, 1, 0xEE)
    kbc.dev.write(DATA, 1, 0x12)  # not a command
    assert kbc.drain() == [0xFA, 0xEE, 0xFE]
    # untranslated: raw IDs
    kbc.command(0x60, bytes([0x04]))
    kbc.dev.write(DATA, 1, 0xF2)
    assert kbc.drain() == [0xFA, 0xAB, 0x83]
    kbc.dev.write(DATA, 1, 0xF0)
    kbc.dev.write(DATA, 1, 0x03)
    kbc.dev.write(DATA, 1, 0xF0)
    kbc.dev.write(DATA, 1, 0x00)
    assert kbc.drain() == [0xFA, 0xFA, 0xFA, 0xFA, 0x03]


def test_reset_requests() -> None:
    kbc = Kbc()
    kbc.command(0xFE)
    assert kbc.resets == 1
    kbc.command(0xFF)  # pulses nothing
    kbc.command(0xD1, b"\x03")  # A20 on, reset line high
    assert kbc.resets == 1
    assert kbc.command(0xD0, replies=1) == [0x03]
    kbc.command(0xD1, b"\x02")  # reset line low
    assert kbc.resets == 2
    I8042(RecordingLine()).write(CMD, 1, 0xFE)  # no callback: harmless


def test_harmless_commands() -> None:
    kbc = Kbc()
    mode = kbc.command(0xCA, replies=1)[0]
    kbc.command(0xCB, bytes([mode]))
    assert kbc.command(0xCA, replies=1) == [mode]
    kbc.command(0xAD)
    assert kbc.dev.command_byte & 0x10
    kbc.command(0xAE)
    assert not kbc.dev.command_byte & 0x10
    kbc.command(0xD2, b"\x99")
    assert kbc.drain() == [0x99]
    kbc.command(0x61, b"\x77")  # internal RAM byte 1
    assert kbc.command(0x21, replies=1) == [0x77]
    kbc.command(0xC0, replies=1)
    kbc.command(0xE0, replies=1)
    kbc.command(0x01)  # unknown
    assert kbc.drain() == []
    assert kbc.dev.read(STATUS, 1) & 0x08  # last write was a command
    kbc.dev.write(DATA, 1, 0xF4)
    assert not kbc.dev.read(STATUS, 1) & 0x08


def test_queue_is_bounded_and_empty_read() -> None:
    kbc = Kbc()
    for _ in range(40):
        kbc.dev.write(DATA, 1, 0xF4)
    assert len(kbc.drain()) == 16
    assert kbc.dev.read(DATA, 1) == 0


def test_garbage_never_raises() -> None:
    rng = random.Random(8042)
    values = [0, 1, 0x20, 0x60, 0xAA, 0xD1, 0xFE, 0xFF, 0x100, 0xFFFF,
              0xDEADBEEF, 0xFFFFFFFF] + [rng.randrange(1 << 32) for _ in range(60)]
    kbc = Kbc()
    for offset in range(8):
        for size in (1, 2, 4):
            for value in values:
                kbc.dev.write(offset, size, value)
                assert 0 <= kbc.dev.read(offset, size) < 1 << (8 * size)
    for cmd in range(256):
        kbc.dev.write(CMD, 1, cmd)
        kbc.dev.write(DATA, 1, rng.randrange(256))
    assert kbc.dev.read(1, 1) == 0xFF
    assert kbc.dev.read(2, 2) == 0xFFFF
