"""Coalesced port writes: the ring KVM fills, drained in order onto the port bus
(pure), and a guest whose COM1 bytes and POST writes are coalesced while the UART
has no interrupt enabled and exit again while it has (tier kvm)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from test_cli import asm_guest

from pyhv.config import KernelBoot, SerialConfig, VmConfig
from pyhv.engine.bus import Bus
from pyhv.engine.coalesced import ENTRY_SIZE, MAX_ENTRIES, CoalescedPio
from pyhv.engine.machine import Machine

MiB = 1 << 20


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def ring_with(entries: list[tuple[int, bytes]], first: int = 0) -> memoryview:
    ring = bytearray(4096)
    i = first
    for port, data in entries:
        off = 8 + ENTRY_SIZE * i
        struct.pack_into("=QII", ring, off, port, len(data), 1)
        ring[off + 16:off + 16 + len(data)] = data
        i = (i + 1) % MAX_ENTRIES
    struct.pack_into("=II", ring, 0, first, i)
    return memoryview(ring)


def bus_with(rec: Recorder) -> Bus:
    bus = Bus("port I/O")
    bus.insert(0x3F8, 8, rec, "serial0")  # type: ignore[arg-type]
    return bus


def test_queued_writes_reach_the_bus_in_order_and_free_the_ring() -> None:
    rec = Recorder()
    ring = ring_with([(0x3F8, b"a"), (0x3F8, b"b"), (0x3F9, b"\x02"), (0x80, b"\x00")])
    co = CoalescedPio(ring, bus_with(rec))
    assert co.pending()
    co.drain()
    assert rec.writes == [(0, 1, ord("a")), (0, 1, ord("b")), (1, 1, 2)]
    assert struct.unpack_from("=II", ring, 0) == (4, 4) and not co.pending()
    co.drain()  # nothing new: nothing again
    assert len(rec.writes) == 3


def test_the_ring_wraps_around() -> None:
    rec = Recorder()
    ring = ring_with([(0x3F8, b"y"), (0x3F8, b"z")], first=MAX_ENTRIES - 1)
    CoalescedPio(ring, bus_with(rec)).drain()
    assert [chr(v) for _o, _s, v in rec.writes] == ["y", "z"]
    assert struct.unpack_from("=II", ring, 0) == (1, 1)


def test_a_first_index_outside_the_ring_is_not_followed() -> None:
    rec = Recorder()
    ring = ring_with([(0x3F8, b"a")])
    struct.pack_into("=II", ring, 0, 10_000, 1)
    co = CoalescedPio(ring, bus_with(rec))
    co.drain()
    assert rec.writes == [] and not co.pending()


GUEST = """
    mov $0x3f8, %dx
    mov $'a', %al
    out %al, %dx          /* coalesced: the UART has no interrupt enabled */
    mov $0x80, %dx
    out %al, %dx          /* the POST port: always coalesced */
    mov $0x3f9, %dx
    mov $0x02, %al
    out %al, %dx          /* IER: THRE interrupts on, the data port exits again */
    mov $0x3f8, %dx
    mov $'b', %al
    out %al, %dx
    mov $0x3f9, %dx
    xor %al, %al
    out %al, %dx          /* IER 0: coalesced again */
    mov $0x3f8, %dx
    mov $'c', %al
    out %al, %dx
    mov $'d', %al
    out %al, %dx
    mov $0x604, %dx       /* power off: the exit applies what is queued first */
    mov $0x3400, %ax
    out %ax, %dx
1:  hlt
    jmp 1b
"""


@pytest.mark.kvm
def test_a_guest_s_bytes_arrive_in_order_whatever_the_uart_s_interrupts(tmp_path: Path
                                                                          ) -> None:
    elf = asm_guest(tmp_path, "co", GUEST)
    out = tmp_path / "com1.txt"
    machine = Machine(VmConfig(KernelBoot(str(elf)), memory=16 * MiB,
                               serial=SerialConfig("file", str(out))))
    try:
        machine.start(paused=True)
        assert machine.platform is not None
        co = machine.platform.coalesced
        if co is None:
            pytest.skip("this KVM has no coalesced port I/O (KVM_CAP_COALESCED_PIO)")
        assert co.ports == {0x80, 0x3F8}
        machine.resume()
        ev = machine.run(timeout=30)
    finally:
        machine.close()
    assert ev.kind == "powered-off", ev
    assert out.read_bytes() == b"abcd"
