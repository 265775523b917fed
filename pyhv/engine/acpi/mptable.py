"""The Intel MultiProcessor Specification 1.4 table, for guests booted without ACPI.

A 16-byte floating pointer (``_MP_``) at :data:`layout.MPTABLE_ADDR` (the first
KiB of the EBDA, where guests scan) is followed by the configuration table
(``PCMP``): processors, one ISA bus, the I/O APIC, ISA IRQ routing and the
local APIC LINT0/LINT1 wiring (ExtINT / NMI).
"""

from __future__ import annotations

import struct

from pyhv.engine import layout
from pyhv.engine.acpi.aml import AcpiError
from pyhv.engine.acpi.tables import checksum
from pyhv.engine.memory import GuestMemory

MP_SPEC_REV = 4  # 1.4
MPTABLE_SIZE = 1024
FLOATING_LEN = 16
HEADER_LEN = 44
PROCESSOR_LEN = 20
ENTRY_LEN = 8
LAPIC_VERSION = 0x14  # integrated xAPIC
IOAPIC_VERSION = 0x11  # 82093AA
#: CPU signature (family 6) and CPUID.1:EDX feature flags (FPU, APIC)
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)
ISA_BUS_ID = 0
ISA_IRQS = 16

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INT, ENTRY_LOCAL_INT = 0, 1, 2, 3, 4
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
CPU_ENABLED = 0x1
CPU_BSP = 0x2
IOAPIC_ENABLED = 0x1


def _io_irqs() -> list[tuple[int, int]]:
    """(ISA IRQ, I/O APIC pin): identity, except IRQ 0 on pin 2 (IRQ 2 is the cascade)."""
    return [(0, 2)] + [(irq, irq) for irq in range(1, ISA_IRQS) if irq != 2]


def _fixed_size() -> int:
    entries = 1 + 1 + len(_io_irqs()) + 2  # bus, I/O APIC, I/O ints, local ints
    return FLOATING_LEN + HEADER_LEN + ENTRY_LEN * entries


#: the most CPUs whose entries fit the 1 KiB table
MPTABLE_MAX_CPUS = (MPTABLE_SIZE - _fixed_size()) // PROCESSOR_LEN


def build_mptable(cpus: int, ioapic_id: int = 0, *, apic_ids: tuple[int, ...] = (),
                  addr: int = layout.MPTABLE_ADDR,
                  ioapic_addr: int = layout.IOAPIC_ADDR,
                  lapic_addr: int = layout.LAPIC_ADDR) -> bytes:
    """The floating pointer and configuration table to place at ``addr`` (16-aligned)."""
    if not 1 <= cpus <= MPTABLE_MAX_CPUS:
        raise AcpiError(f"the MP table holds 1..{MPTABLE_MAX_CPUS} CPUs, not {cpus}")
    if addr % 16:
        raise AcpiError(f"MP floating pointer address 0x{addr:x} is not 16-byte aligned")
    if not 0 <= ioapic_id <= 0xFE:
        raise AcpiError(f"invalid I/O APIC id {ioapic_id}")
    entries = []
    ids = apic_ids or tuple(range(cpus))
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", ENTRY_PROCESSOR, ids[cpu], LAPIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION,
                               IOAPIC_ENABLED, ioapic_addr))
    for irq, pin in _io_irqs():
        # flags 0: polarity and trigger conform to the ISA bus (edge, active high)
        entries.append(struct.pack("<BBHBBBB", ENTRY_IO_INT, INT_TYPE_INT, 0,
                                   ISA_BUS_ID, irq, ioapic_id, pin))
    for int_type, lint in ((INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)):
        entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INT, int_type, 0,
                                   ISA_BUS_ID, 0, 0xFF, lint))
    body = b"".join(entries)
    header = bytearray(struct.pack(
        "<4sHBB8s12sIHHIHBx", b"PCMP", HEADER_LEN + len(body), MP_SPEC_REV, 0,
        b"PYHV    ", b"PYHVMACH    ", 0, 0, len(entries), lapic_addr, 0, 0))
    config = header + body
    config[7] = checksum(config)
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", addr + FLOATING_LEN, 1,
                                     MP_SPEC_REV, 0))
    floating[10] = checksum(floating)
    table = bytes(floating + config)
    assert len(table) <= MPTABLE_SIZE
    return table


def write_mptable(memory: GuestMemory, cpus: int, ioapic_id: int = 0,
                  addr: int = layout.MPTABLE_ADDR, apic_ids: tuple[int, ...] = ()) -> int:
    """Write the MP table at ``addr``; returns the floating pointer's address."""
    memory.write(addr, build_mptable(cpus, ioapic_id, apic_ids=apic_ids, addr=addr))
    return addr
