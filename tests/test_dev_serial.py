"""Tests for the 16550A UART model, driven the way Linux's 8250 driver does."""

from __future__ import annotations

import io
import random

import pytest

from pyhv.engine.devices import RecordingLine
from pyhv.engine.devices.serial import Serial16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7


class CountingOut(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def make(**kwargs: object) -> tuple[Serial16550, RecordingLine, CountingOut]:
    line = RecordingLine()
    out = CountingOut()
    return Serial16550(line, out, **kwargs), line, out  # type: ignore[arg-type]


def test_reset_state() -> None:
    uart, line, _ = make()
    assert uart.read(IIR, 1) == 0x01
    assert uart.read(LSR, 1) == 0x60
    assert uart.read(MSR, 1) == 0xB0
    assert uart.read(LCR, 1) == 0
    assert uart.read(IER, 1) == 0
    assert uart.read(MCR, 1) == 0
    assert not line.level and line.events == []


def test_linux_autoconfig_probe() -> None:
    uart, line, out = make()
    # scratch test through IER
    saved_ier = uart.read(IER, 1)
    uart.write(IER, 1, 0)
    assert uart.read(IER, 1) & 0x0F == 0
    uart.write(IER, 1, 0x0F)
    assert uart.read(IER, 1) & 0x0F == 0x0F
    uart.write(IER, 1, saved_ier)
    # loopback test: RTS|OUT2 come back as CTS|DCD
    saved_mcr = uart.read(MCR, 1)
    uart.write(MCR, 1, 0x10 | 0x0A)
    assert uart.read(MSR, 1) & 0xF0 == 0x90
    uart.write(MCR, 1, saved_mcr)
    # no EFR: offset 2 under LCR=0xBF is IIR, not 0
    uart.write(LCR, 1, 0xBF)
    assert uart.read(2, 1) != 0
    uart.write(LCR, 1, 0)
    # FIFO detection: IIR bits 7:6 = 3 means 16550A
    uart.write(FCR, 1, 0x01)
    assert uart.read(IIR, 1) >> 6 == 3
    # no 64-byte FIFO (16750) in either DLAB state
    uart.write(FCR, 1, 0x21)
    assert uart.read(IIR, 1) & 0xE0 == 0xC0
    uart.write(LCR, 1, 0x80)
    uart.write(FCR, 1, 0x21)
    assert uart.read(IIR, 1) & 0xE0 == 0xC0
    uart.write(LCR, 1, 0)
    # IER upper bits (XScale UUE) do not stick
    uart.write(IER, 1, 0x40)
    assert uart.read(IER, 1) == 0
    # scratch register
    uart.write(SCR, 1, 0xA5)
    assert uart.read(SCR, 1) == 0xA5
    assert out.getvalue() == b""
    assert not line.level


def test_divisor_latch() -> None:
    uart, _, out = make()
    uart.write(IER, 1, 0x05)
    uart.write(LCR, 1, 0x83)
    uart.write(DLL, 1, 0x01)
    uart.write(DLM, 1, 0x00)
    assert uart.read(DLL, 1) == 0x01
    assert uart.read(DLM, 1) == 0x00
    uart.write(LCR, 1, 0x03)
    assert uart.read(IER, 1) == 0x05
    assert out.getvalue() == b""


def test_transmit_writes_and_flushes_each_byte() -> None:
    uart, _, out = make()
    for b in b"hello\n":
        uart.write(THR, 1, b)
    assert out.getvalue() == b"hello\n"
    assert out.flushes == 6
    assert uart.read(LSR, 1) & 0x60 == 0x60


def test_output_without_flush_and_broken_stream() -> None:
    class Plain:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> int:
            self.data += data
            return len(data)

    plain = Plain()
    uart = Serial16550(RecordingLine(), plain)
    uart.write(THR, 1, 0x41)
    assert plain.data == b"A"

    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError

    uart = Serial16550(RecordingLine(), Broken())
    uart.write(THR, 1, 0x41)  # dropped, no exception
    Serial16550(RecordingLine(), None).write(THR, 1, 0x41)


def test_thre_interrupt_and_linux_thre_retest() -> None:
    uart, line, _ = make()
    uart.write(FCR, 1, 0x07)
    uart.write(IER, 1, 0x02)
    assert line.level
    assert uart.read(LSR, 1) & 0x40
    assert uart.read(IIR, 1) == 0xC2
    # reading IIR while THRE is the source clears it
    assert uart.read(IIR, 1) == 0xC1
    assert not line.level
    uart.write(IER, 1, 0)
    uart.write(IER, 1, 0x02)  # a real 16550 re-asserts THRE here
    assert uart.read(IIR, 1) == 0xC2
    uart.read(IIR, 1)
    # a THR write clears THRE; the byte leaves at once and THRE is back
    uart.write(THR, 1, 0x58)
    assert line.level
    assert uart.read(IIR, 1) == 0xC2
    assert line.events == ["high", "low", "high", "low", "high", "low"]


def test_interrupt_ignores_out2() -> None:
    uart, line, _ = make()
    uart.write(MCR, 1, 0x00)
    uart.enqueue_input(b"x")
    assert not line.level
    uart.write(IER, 1, 0x01)
    assert line.level  # QEMU behaviour: OUT2 is not required
    uart.write(MCR, 1, 0x0B)
    assert line.level


def test_receive_priority_over_thre() -> None:
    uart, line, _ = make()
    uart.write(FCR, 1, 0x01)
    uart.write(IER, 1, 0x03)
    assert uart.enqueue_input(b"hi") == 2
    assert line.level
    assert uart.read(LSR, 1) == 0x61
    assert uart.read(IIR, 1) == 0xC4
    # reading IIR while RDA is the source does not clear THRE
    assert uart.read(RBR, 1) == ord("h")
    assert uart.read(IIR, 1) == 0xC4
    assert uart.read(RBR, 1) == ord("i")
    assert uart.read(LSR, 1) == 0x60
    assert uart.read(IIR, 1) == 0xC2
    assert uart.read(IIR, 1) == 0xC1
    assert not line.level
    assert uart.read(RBR, 1) == 0  # empty FIFO


def test_iir_without_fifo() -> None:
    uart, _, _ = make()
    uart.write(IER, 1, 0x01)
    uart.enqueue_input(b"a")
    assert uart.read(IIR, 1) == 0x04
    uart.write(FCR, 1, 0x01)  # enabling FIFOs resets them
    assert uart.read(IIR, 1) == 0xC1
    assert uart.pending_input == 0


def test_input_capacity_and_flow_control() -> None:
    calls: list[int] = []
    uart, _, _ = make(on_input_space=lambda: calls.append(1))
    assert uart.input_capacity == 64
    assert uart.has_input_space()
    assert uart.enqueue_input(bytes(range(100))) == 64
    assert not uart.has_input_space()
    assert uart.enqueue_input(b"more") == 0
    for i in range(63):
        assert uart.read(RBR, 1) == i
    assert calls == []
    assert uart.has_input_space()
    assert uart.read(RBR, 1) == 63
    assert calls == [1]
    assert uart.read(LSR, 1) & 1 == 0
    # no refusal, no callback
    uart.enqueue_input(b"ab")
    uart.read(RBR, 1)
    uart.read(RBR, 1)
    assert calls == [1]


def test_fifo_clear_frees_space() -> None:
    calls: list[int] = []
    uart, _, _ = make(on_input_space=lambda: calls.append(1), input_capacity=4)
    uart.write(FCR, 1, 0x01)
    assert uart.enqueue_input(b"abcdef") == 4
    uart.write(FCR, 1, 0x03)
    assert calls == [1]
    assert uart.pending_input == 0
    assert uart.read(IIR, 1) == 0xC1
    with pytest.raises(ValueError):
        Serial16550(RecordingLine(), None, input_capacity=0)


def test_loopback_echo() -> None:
    uart, line, out = make()
    uart.write(MCR, 1, 0x10)
    uart.write(IER, 1, 0x01)
    uart.write(THR, 1, 0x55)
    assert out.getvalue() == b""
    assert uart.read(LSR, 1) & 1
    assert line.level
    assert uart.read(RBR, 1) == 0x55
    assert not line.level
    uart.write(MCR, 1, 0x00)
    uart.write(THR, 1, 0x56)
    assert out.getvalue() == b"V"


def test_modem_status_deltas_and_interrupt() -> None:
    uart, line, _ = make()
    uart.write(IER, 1, 0x08)
    uart.write(MCR, 1, 0x10)  # loopback with all outputs low
    assert line.level
    assert uart.read(IIR, 1) == 0x00
    assert uart.read(MSR, 1) == 0x0B  # DCTS, DDSR, DDCD: all dropped
    assert not line.level
    uart.write(MCR, 1, 0x14)  # OUT1 -> RI
    assert uart.read(MSR, 1) == 0x40
    uart.write(MCR, 1, 0x10)  # RI trailing edge
    assert uart.read(MSR, 1) == 0x04
    uart.write(MCR, 1, 0x1F)
    assert uart.read(MSR, 1) & 0xF0 == 0xF0


def test_garbage_never_raises() -> None:
    rng = random.Random(8250)
    values = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xDEADBEEF,
              0xFFFFFFFF] + [rng.randrange(1 << 32) for _ in range(40)]
    uart, _, _ = make(on_input_space=lambda: None)
    uart.enqueue_input(b"abc")
    for offset in range(10):
        for size in (1, 2, 4):
            for value in values:
                uart.write(offset, size, value)
                assert 0 <= uart.read(offset, size) < 1 << (8 * size)
    assert uart.read(8, 1) == 0xFF
    assert uart.read(9, 4) == 0xFFFFFFFF
