"""The Intel MP table: checksums, entries, size limit."""

from __future__ import annotations

import struct

import pytest

from pyhv.engine import layout
from pyhv.engine.acpi import MPTABLE_MAX_CPUS, AcpiError, build_mptable, write_mptable
from pyhv.engine.memory import GuestMemory

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def _parse(table: bytes, addr: int = layout.MPTABLE_ADDR) -> tuple[bytes, list[bytes]]:
    floating = table[:16]
    assert floating[:4] == b"_MP_" and sum(floating) % 256 == 0
    pointer, length, rev = struct.unpack_from("<IBB", floating, 4)
    assert (length, rev, floating[11]) == (1, 4, 0)
    config = table[pointer - addr:]
    assert config[:4] == b"PCMP"
    base_len, rev, _, _oem, _product, _, _, count, lapic = struct.unpack_from(
        "<HBB8s12sIHHI", config, 4)
    assert rev == 4 and lapic == layout.LAPIC_ADDR
    config = config[:base_len]
    assert sum(config) % 256 == 0
    entries, off = [], 44
    while off < base_len:
        size = ENTRY_SIZES[config[off]]
        entries.append(config[off:off + size])
        off += size
    assert off == base_len and len(entries) == count
    types = [e[0] for e in entries]
    assert types == sorted(types)
    return config, entries


@pytest.mark.parametrize("cpus", [1, 2, 4, 32, MPTABLE_MAX_CPUS])
def test_mptable_entries(cpus: int) -> None:
    table = build_mptable(cpus)
    assert len(table) <= 1024
    _, entries = _parse(table)
    procs = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in procs] == [(0, 3)] + [(i, 1) for i in range(1, cpus)]
    assert all(e[2] == 0x14 for e in procs)
    assert [e[2:8] for e in entries if e[0] == 1] == [b"ISA   "]
    ioapics = [struct.unpack_from("<BBBI", e, 1) for e in entries if e[0] == 2]
    assert ioapics == [(0, 0x11, 1, layout.IOAPIC_ADDR)]
    io_ints = [struct.unpack_from("<BHBBBB", e, 1) for e in entries if e[0] == 3]
    assert len(io_ints) == 15
    routes = {irq: pin for _, _, bus, irq, apic, pin in io_ints if bus == 0 and apic == 0}
    assert routes[0] == 2 and 2 not in routes
    assert all(routes[i] == i for i in range(1, 16) if i != 2)
    local = [struct.unpack_from("<BHBBBB", e, 1) for e in entries if e[0] == 4]
    assert [(t, dest, lint) for t, _, _, _, dest, lint in local] == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_mptable_limits() -> None:
    assert MPTABLE_MAX_CPUS >= 32
    for cpus in (0, MPTABLE_MAX_CPUS + 1):
        with pytest.raises(AcpiError):
            build_mptable(cpus)
    with pytest.raises(AcpiError):
        build_mptable(1, addr=layout.MPTABLE_ADDR + 4)
    with pytest.raises(AcpiError):
        build_mptable(1, ioapic_id=255)


def test_write_mptable() -> None:
    memory = GuestMemory.from_bytearrays([(0, 16 << 20)])
    addr = write_mptable(memory, 4, ioapic_id=4)
    assert addr == layout.MPTABLE_ADDR
    table = memory.read(addr, 1024)
    _, entries = _parse(table)
    assert [e[1] for e in entries if e[0] == 2] == [4]
    assert {e[6] for e in entries if e[0] == 3} == {4}
