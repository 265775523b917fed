"""COM2-COM4 (isa-serial index 1-3) on the chardev host ends, and the ISA lines they
share with COM1 (IRQ 4) and each other (IRQ 3).

Tier kvm: a real machine with COM2 on a file and COM3 on a listening unix socket; the
test plays the guest's side through the machine's port bus (the device cannot tell)
while the test-kit guest waits idle: bytes written to THR reach the file and the
socket's client; bytes the client sends arrive in COM3's receive FIFO (LSR data
ready, RBR).  COM3's IRQ 4 is COM1's too: the shared line is asserted while either
asserts it (unit test)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pyhv.config import KernelBoot, SerialConfig, SerialPortConfig, VmConfig
from pyhv.engine.builder import SharedLine
from pyhv.engine.devices import RecordingLine
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.machine import Machine

MiB = 1 << 20
COM2, COM3 = 0x2F8, 0x3E8
THR = RBR = 0
IER, LSR = 1, 5
LSR_DR = 0x01


class _Line(RecordingLine):
    def __init__(self) -> None:
        super().__init__()
        self.level = False

    def set_level(self, asserted: bool) -> None:
        super().set_level(asserted)
        self.level = asserted


def test_a_shared_line_is_asserted_while_any_source_asserts_it() -> None:
    line = _Line()
    shared = SharedLine(line)  # type: ignore[arg-type]
    com1, com3 = shared.source(), shared.source()
    com1.set_level(True)
    com3.set_level(True)
    com1.set_level(False)
    assert line.level  # COM3 still asserts it
    com3.set_level(False)
    assert not line.level
    com3.pulse()
    assert not line.level


@pytest.mark.kvm
def test_com2_and_com3_through_the_port_bus(guests, tmp_path: Path) -> None:
    out2 = tmp_path / "com2.txt"
    sock3 = tmp_path / "com3.sock"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="pyhv.wait=powerbutton"),
                   memory=64 * MiB, serial=SerialConfig("file", str(tmp_path / "com1.txt")),
                   extra_serials=(
                       SerialPortConfig(SerialConfig("file", str(out2)), "isa-serial", 1),
                       SerialPortConfig(SerialConfig("unix", str(sock3), server=True),
                                        "isa-serial", 2)))
    m = Machine(cfg)
    loop = EventLoop()
    client = socket.socket(socket.AF_UNIX)
    try:
        m.start()
        m.attach(loop)
        pio = m.platform.pio
        assert {"serial1", "serial2"} <= {r.id for r in m.platform.devices.records()}
        for byte in b"to COM2\n":
            pio.write(COM2 + THR, 1, byte)
        assert out2.read_bytes() == b"to COM2\n"
        client.connect(str(sock3))
        deadline = time.monotonic() + 5
        while not m.host.serials[2].connected and time.monotonic() < deadline:
            loop.run(timeout=0.02)
        for byte in b"to client":
            pio.write(COM3 + THR, 1, byte)
        client.settimeout(5)
        assert client.recv(100) == b"to client"
        client.sendall(b"hi")
        while not pio.read(COM3 + LSR, 1) & LSR_DR and time.monotonic() < deadline:
            loop.run(timeout=0.02)
        assert pio.read(COM3 + RBR, 1) == ord("h") and pio.read(COM3 + RBR, 1) == ord("i")
        assert not pio.read(COM3 + LSR, 1) & LSR_DR
    finally:
        client.close()
        m.close()
        loop.close()
    assert not sock3.exists()  # the end removed the socket it bound
