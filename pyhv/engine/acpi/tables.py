"""ACPI tables of a pyhv machine: RSDP, XSDT/RSDT, FADT, FACS, MADT, MCFG, DSDT,
and for guest NUMA, SRAT and SLIT.

The machine is a legacy PC as ACPI sees it (not hardware-reduced): fixed PM1a
event/control blocks and PM timer in port I/O, ACPI always enabled (no SMI
command port), a fixed-feature power button, an 8259-compatible I/O APIC, and
reset through the i8042 (``0xFE`` to port ``0x64``).  Field layouts follow the
ACPI 6.0 specification, chapter 5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from pyhv.engine import layout
from pyhv.engine.acpi import aml
from pyhv.engine.acpi.aml import AcpiError
from pyhv.engine.memory import GuestMemory

CREATOR_ID = b"PYHV"
CREATOR_REVISION = 1
HEADER_LEN = 36
RSDP_LEN = 36
FACS_LEN = 64
FADT_LEN = 276
#: the highest LAPIC id usable for a CPU (0xFF is the xAPIC broadcast id)
MAX_CPUS = 255
TABLE_ALIGN = 16
#: CMOS index of the RTC's century register (the FADT's CENTURY field)
RTC_CENTURY_INDEX = 0x32

# FADT Flags (ACPI 6.0 table 5-35)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FADT_FIX_RTC = 1 << 6  # set: no RTC wake status in the fixed registers
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags (ACPI 6.0 table 5-36)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
BOOT_MSI_NOT_SUPPORTED = 1 << 3
BOOT_CMOS_RTC_NOT_PRESENT = 1 << 5
# Generic Address Structure address spaces and access sizes
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3
# MADT
MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
MPS_CONFORM = 0
MPS_ACTIVE_HIGH = 0x1
MPS_EDGE = 0x4
MPS_LEVEL = 0xC
# SRAT (ACPI 6.0 section 5.2.16)
SRAT_LAPIC, SRAT_MEMORY = 0, 1
SRAT_ENABLED = 1
#: SLIT distances a node has to itself and, by default, to every other node
LOCAL_DISTANCE, REMOTE_DISTANCE = 10, 20

PCI_HOST_BRIDGE_OSC_UUID = "33DB4D5B-1FF7-401C-9657-7441C03DD766"


@dataclass(frozen=True)
class AcpiPlatform:
    """What the ACPI tables describe; defaults are the :mod:`layout` machine.

    CPUs get LAPIC ids and ACPI processor UIDs ``0..cpus-1``.  The I/O APIC id
    defaults to 0, the reset value of the (KVM) I/O APIC's 4-bit id register;
    64-bit Linux only requires it to be unique among I/O APICs.
    """

    cpus: int = 1
    #: the LAPIC id of each CPU (from the CPU topology); empty means ``0..cpus-1``
    apic_ids: tuple[int, ...] = ()
    ioapic_id: int = 0
    ioapic_addr: int = layout.IOAPIC_ADDR
    ioapic_pins: int = layout.IOAPIC_PINS
    lapic_addr: int = layout.LAPIC_ADDR
    sci_irq: int = layout.SCI_IRQ
    pm1a_evt_port: int = layout.PM1A_EVT_PORT
    pm1a_cnt_port: int = layout.PM1A_CNT_PORT
    pm_tmr_port: int = layout.PM_TMR_PORT
    s5_slp_typ: int = layout.S5_SLP_TYP
    reset_port: int = layout.I8042_CMD_PORT
    reset_value: int = layout.I8042_RESET_VALUE
    #: (I/O port, ISA IRQ) of each 16550 UART, described as PNP0501 devices
    serial_ports: tuple[tuple[int, int], ...] = ((layout.COM1_PORT, layout.COM1_IRQ),)
    #: an i8042 keyboard controller is present (FADT boot flag)
    i8042: bool = True
    #: a CMOS RTC is present (FADT boot flag and a PNP0B00 device)
    rtc: bool = True
    rtc_port: int = layout.RTC_PORT
    rtc_irq: int = layout.RTC_IRQ
    #: CMOS index of the century register, 0 when the RTC has none
    rtc_century: int = RTC_CENTURY_INDEX
    #: describe a PCI host bridge \\_SB.PCI0 with ECAM (MCFG)
    pci_root: bool = False
    #: GSIs for PCI INTx: slot s pin p routes to ``gsis[(s + p) % len]`` (empty: no _PRT)
    pci_intx_gsis: tuple[int, ...] = ()
    #: the root-bus slots _PRT lists (None: all 32); a guest reads every byte of the
    #: DSDT, so listing only populated slots keeps boot short
    pci_prt_slots: Optional[tuple[int, ...]] = None
    pci_mmio32_start: int = layout.PCI_MMIO32_START
    pci_mmio32_end: int = layout.PCI_MMIO32_END
    pcie_ecam_start: int = layout.PCIE_ECAM_START
    pcie_ecam_size: int = layout.PCIE_ECAM_SIZE
    #: a PCI Express host (q35: PNP0A08 with ECAM and MCFG); False: conventional PCI
    #: (pc: PNP0A03, configuration through port 0xCF8 only)
    pci_express: bool = True
    #: the 64-bit MMIO window [start, end) for 64-bit BARs (None: none)
    pci_mmio64: Optional[tuple[int, int]] = None
    #: guest NUMA nodes in proximity-domain order: (CPU indexes, RAM (address, size)
    #: runs); empty: no SRAT
    numa_nodes: tuple[tuple[tuple[int, ...], tuple[tuple[int, int], ...]], ...] = ()
    #: node × node distances for the SLIT (empty: no SLIT, as QEMU without -numa dist)
    numa_distances: tuple[tuple[int, ...], ...] = ()
    oem_id: str = "PYHV  "
    oem_table_id: str = "PYHVMACH"
    oem_revision: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise AcpiError(f"ACPI tables support 1..{MAX_CPUS} CPUs, not {self.cpus}")
        if self.apic_ids and (len(self.apic_ids) != self.cpus
                              or len(set(self.apic_ids)) != self.cpus
                              or not all(0 <= a <= 0xFE for a in self.apic_ids)):
            raise AcpiError(f"APIC ids {self.apic_ids}: need {self.cpus} distinct ids "
                            "of at most 254 (x2APIC entries are not built)")
        if not 0 <= self.ioapic_id <= 0xFE:
            raise AcpiError(f"invalid I/O APIC id {self.ioapic_id}")
        if len(self.oem_id) > 6 or len(self.oem_table_id) > 8:
            raise AcpiError("ACPI OEM id is at most 6 and OEM table id 8 characters")
        for port, irq in self.serial_ports:
            if not (0 <= port <= 0xFFF8 and 0 <= irq <= 15):
                raise AcpiError(f"invalid serial port 0x{port:x} IRQ {irq}")
        if any(not 0 <= g < self.ioapic_pins for g in (self.sci_irq, *self.pci_intx_gsis)):
            raise AcpiError("an ACPI interrupt is beyond the I/O APIC's pins")
        buses = self.pcie_ecam_size >> 20
        if self.pci_root and (not 1 <= buses <= 256 or self.pcie_ecam_size % (1 << 20)):
            raise AcpiError(f"invalid PCIe ECAM size 0x{self.pcie_ecam_size:x}")
        if self.pci_root and not 0 <= self.pci_mmio32_start < self.pci_mmio32_end <= 1 << 32:
            raise AcpiError("invalid 32-bit PCI MMIO window")
        if not 0 <= self.rtc_century <= 0x7F:
            raise AcpiError(f"invalid CMOS century index 0x{self.rtc_century:x}")
        if self.numa_nodes:
            cpus = sorted(c for node, _ranges in self.numa_nodes for c in node)
            if cpus != list(range(self.cpus)):
                raise AcpiError("the NUMA nodes must list every CPU exactly once")
        n = len(self.numa_nodes)
        if self.numa_distances and (len(self.numa_distances) != n or any(
                len(row) != n or not all(10 <= d <= 255 for d in row)
                for row in self.numa_distances)):
            raise AcpiError(f"NUMA distances must be a {n}×{n} matrix of 10..255")


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out in guest memory, ready to be written."""

    rsdp_addr: int
    #: (guest address, bytes) of every structure, in address order
    blobs: tuple[tuple[int, bytes], ...]
    #: guest address of each structure by signature ("RSD PTR ", "FACP", ...)
    addresses: dict[str, int] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """The first address past the last table."""
        addr, blob = self.blobs[-1]
        return addr + len(blob)


# ---- helpers ----------------------------------------------------------------
def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus itself sum to zero (mod 256)."""
    return -sum(data) & 0xFF


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii").ljust(size, b" ")[:size]


def sdt(signature: str, revision: int, body: bytes, platform: AcpiPlatform) -> bytes:
    """A system description table: the 36-byte header, ``body``, checksummed."""
    length = HEADER_LEN + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature.encode("ascii"), length, revision, 0,
        _ascii(platform.oem_id, 6), _ascii(platform.oem_table_id, 8),
        platform.oem_revision, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(space: int, bit_width: int, address: int, access: int = 0,
        bit_offset: int = 0) -> bytes:
    """A 12-byte Generic Address Structure."""
    return struct.pack("<BBBBQ", space, bit_width, bit_offset, access, address)


def _io_gas(port: int, length: int, access: int) -> bytes:
    return gas(GAS_SYSTEM_IO, 8 * length, port, access)


def _align(addr: int, alignment: int) -> int:
    return (addr + alignment - 1) & -alignment


# ---- fixed tables -----------------------------------------------------------
def build_rsdp(platform: AcpiPlatform, xsdt_addr: int, rsdt_addr: int) -> bytes:
    """The ACPI 2.0+ Root System Description Pointer (both checksums set)."""
    rsdp = bytearray(struct.pack(
        "<8sB6sBIIQB3x", b"RSD PTR ", 0, _ascii(platform.oem_id, 6), 2, rsdt_addr,
        RSDP_LEN, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_facs() -> bytes:
    """The Firmware ACPI Control Structure (no waking vector, no global lock owner)."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LEN, 0, 0, 0, 0, 0, 2, 0)


def build_fadt(platform: AcpiPlatform, facs_addr: int, dsdt_addr: int) -> bytes:
    """The Fixed ACPI Description Table, revision 6.0."""
    p = platform
    flags = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP
    boot = BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT
    boot |= BOOT_8042 if p.i8042 else 0
    boot |= 0 if p.rtc else BOOT_CMOS_RTC_NOT_PRESENT
    evt_len, cnt_len, tmr_len = layout.PM1A_EVT_LEN, layout.PM1A_CNT_LEN, layout.PM_TMR_LEN
    body = b"".join([
        struct.pack("<IIBBHIBBBB", facs_addr, dsdt_addr, 0, 0, p.sci_irq,
                    0, 0, 0, 0, 0),  # SMI_CMD 0: ACPI is always enabled
        struct.pack("<IIIIIIII", p.pm1a_evt_port, 0, p.pm1a_cnt_port, 0, 0,
                    p.pm_tmr_port, 0, 0),
        struct.pack("<BBBBBBBB", evt_len, cnt_len, 0, tmr_len, 0, 0, 0, 0),
        # P_LVL2_LAT > 100 and P_LVL3_LAT > 1000: no C2/C3; no cache flush info
        struct.pack("<HHHHBB", 101, 1001, 0, 0, 0, 0),
        struct.pack("<BBBHBI", 0, 0, p.rtc_century, boot, 0, flags),
        gas(GAS_SYSTEM_IO, 8, p.reset_port, ACCESS_BYTE),
        struct.pack("<BHB", p.reset_value, 0, 0),  # ARM boot arch, minor version 0
        struct.pack("<QQ", 0, dsdt_addr),  # X_FIRMWARE_CTRL 0: FIRMWARE_CTRL is used
        _io_gas(p.pm1a_evt_port, evt_len, ACCESS_WORD),
        bytes(12),
        _io_gas(p.pm1a_cnt_port, cnt_len, ACCESS_WORD),
        bytes(12 * 2),
        _io_gas(p.pm_tmr_port, tmr_len, ACCESS_DWORD),
        bytes(12 * 4),  # GPE0, GPE1, sleep control and status registers
        bytes(8),  # hypervisor vendor identity
    ])
    table = sdt("FACP", 6, body, platform)
    assert len(table) == FADT_LEN
    return table


def build_madt(platform: AcpiPlatform) -> bytes:
    """The Multiple APIC Description Table, revision 4."""
    p = platform
    body = [struct.pack("<II", p.lapic_addr, MADT_PCAT_COMPAT)]
    apic_ids = p.apic_ids or tuple(range(p.cpus))
    for cpu in range(p.cpus):
        body.append(struct.pack("<BBBBI", MADT_LAPIC, 8, cpu, apic_ids[cpu], 1))
    body.append(struct.pack("<BBBxII", MADT_IOAPIC, 12, p.ioapic_id, p.ioapic_addr, 0))
    # ISA IRQ 0 (PIT) is wired to pin 2 like on PCs; the SCI is level, active high
    body.append(struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, 2, MPS_CONFORM))
    body.append(struct.pack("<BBBBIH", MADT_ISO, 10, 0, p.sci_irq, p.sci_irq,
                            MPS_LEVEL | MPS_ACTIVE_HIGH))
    body.append(struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, MPS_CONFORM, 1))
    return sdt("APIC", 4, b"".join(body), platform)


def build_srat(platform: AcpiPlatform) -> bytes:
    """The System Resource Affinity Table, revision 3: each CPU's and each RAM run's
    proximity domain (the node's index).  CPUs get local APIC affinity entries (the
    MADT has xAPIC entries only, so every APIC id is at most 254; x2APIC affinity,
    type 2, would be needed beyond)."""
    p = platform
    apic_ids = p.apic_ids or tuple(range(p.cpus))
    body = [struct.pack("<I8x", 1)]  # reserved, 1 for compatibility
    for domain, (cpus, _ranges) in enumerate(p.numa_nodes):
        for cpu in cpus:
            body.append(struct.pack("<BBBBIB3sI", SRAT_LAPIC, 16, domain & 0xFF,
                                    apic_ids[cpu], SRAT_ENABLED, 0,
                                    (domain >> 8).to_bytes(3, "little"), 0))
    for domain, (_cpus, ranges) in enumerate(p.numa_nodes):
        for addr, size in ranges:
            body.append(struct.pack("<BBIxxQQ4xI8x", SRAT_MEMORY, 40, domain, addr, size,
                                    SRAT_ENABLED))
    return sdt("SRAT", 3, b"".join(body), platform)


def build_slit(platform: AcpiPlatform) -> bytes:
    """The System Locality Information Table: the node-to-node distance matrix."""
    rows = platform.numa_distances
    body = struct.pack("<Q", len(rows)) + bytes(d for row in rows for d in row)
    return sdt("SLIT", 1, body, platform)


def build_mcfg(platform: AcpiPlatform) -> bytes:
    """The PCI Express memory-mapped configuration table (segment 0)."""
    last_bus = (platform.pcie_ecam_size >> 20) - 1
    body = bytes(8) + struct.pack("<QHBB4x", platform.pcie_ecam_start, 0, 0, last_bus)
    return sdt("MCFG", 1, body, platform)


def build_xsdt(platform: AcpiPlatform, tables: list[int]) -> bytes:
    """The Extended System Description Table (64-bit table pointers)."""
    return sdt("XSDT", 1, b"".join(struct.pack("<Q", a) for a in tables), platform)


def build_rsdt(platform: AcpiPlatform, tables: list[int]) -> bytes:
    """The Root System Description Table, for ACPI 1.0 guests."""
    return sdt("RSDT", 1, b"".join(struct.pack("<I", a) for a in tables), platform)


# ---- DSDT -------------------------------------------------------------------
def _pci_osc() -> bytes:
    """``_OSC`` granting the OS every PCI/PCIe feature it asks to control."""
    cdw1 = "CDW1"
    return aml.method(
        "_OSC", 4,
        aml.create_dword_field(aml.arg(3), 0, cdw1),
        aml.if_(aml.lnot(aml.lequal(aml.arg(0), aml.uuid_buffer(PCI_HOST_BRIDGE_OSC_UUID))),
                aml.or_(aml.ref(cdw1), 0x04, aml.ref(cdw1))),  # unrecognized UUID
        aml.if_(aml.lnot(aml.lequal(aml.arg(1), 1)),
                aml.or_(aml.ref(cdw1), 0x08, aml.ref(cdw1))),  # unknown revision
        aml.return_(aml.arg(3)),
        serialized=True,  # it creates a named field
    )


def _pci_root(p: AcpiPlatform) -> bytes:
    crs = aml.resource_template(
        aml.word_bus_number(0, 0xFF),
        aml.io(layout.PCI_CONFIG_PORT, layout.PCI_CONFIG_PORT, 1, 8),
        aml.word_io(0x0000, layout.PCI_CONFIG_PORT - 1),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(p.pci_mmio32_start, p.pci_mmio32_end - 1),
        *([aml.qword_memory(p.pci_mmio64[0], p.pci_mmio64[1] - 1)] if p.pci_mmio64 else []),
    )
    ids = [aml.name("_HID", aml.integer(aml.eisa_id("PNP0A08"))),
           aml.name("_CID", aml.integer(aml.eisa_id("PNP0A03")))] if p.pci_express else \
        [aml.name("_HID", aml.integer(aml.eisa_id("PNP0A03")))]
    terms = [
        *ids,
        aml.name("_UID", 0),
        aml.name("_SEG", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", crs),
        _pci_osc(),
    ]
    if p.pci_intx_gsis:
        n = len(p.pci_intx_gsis)
        slots = range(32) if p.pci_prt_slots is None else sorted(set(p.pci_prt_slots))
        routes = [aml.package((slot << 16) | 0xFFFF, pin, 0, p.pci_intx_gsis[(slot + pin) % n])
                  for slot in slots for pin in range(4)]
        terms.append(aml.name("_PRT", aml.package(*routes)))
    return aml.device("PCI0", *terms)


def _ecam_reservation(p: AcpiPlatform) -> bytes:
    """A motherboard-resources device claiming the ECAM window (for MCFG checks)."""
    return aml.device(
        "MRES",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0C02"))),
        aml.name("_UID", 0),
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(p.pcie_ecam_start, p.pcie_ecam_size))))


def build_dsdt(platform: AcpiPlatform) -> bytes:
    """The Differentiated System Description Table (AML, revision 2: 64-bit integers)."""
    p = platform
    sb: list[bytes] = []
    for cpu in range(p.cpus):
        sb.append(aml.device(f"C{cpu:03X}", aml.name("_HID", "ACPI0007"),
                             aml.name("_UID", cpu)))
    for index, (port, irq) in enumerate(p.serial_ports, 1):
        sb.append(aml.device(
            f"COM{index}" if index < 10 else f"CO{index:02d}",
            aml.name("_HID", aml.integer(aml.eisa_id("PNP0501"))),
            aml.name("_UID", index),
            aml.name("_STA", 0x0F),
            aml.name("_CRS", aml.resource_template(
                aml.io(port, port, 1, 8), aml.irq_no_flags(irq)))))
    if p.rtc:
        sb.append(aml.device(
            "RTC",
            aml.name("_HID", aml.integer(aml.eisa_id("PNP0B00"))),
            aml.name("_CRS", aml.resource_template(
                aml.io(p.rtc_port, p.rtc_port, 1, 2), aml.irq_no_flags(p.rtc_irq)))))
    if p.pci_root:
        sb.append(_pci_root(p))
        if p.pci_express:
            sb.append(_ecam_reservation(p))
    body = (aml.name("\\_S5", aml.package(p.s5_slp_typ, p.s5_slp_typ, 0, 0))
            + aml.scope("\\_SB", *sb))
    return sdt("DSDT", 2, body, platform)


# ---- the whole set ----------------------------------------------------------
def build_acpi(platform: AcpiPlatform, base: int = layout.ACPI_ADDR,
               end: int = layout.ACPI_END) -> AcpiTables:
    """Lay out every table in ``[base, end)``, RSDP first; pure (writes nothing)."""
    if base % TABLE_ALIGN:
        raise AcpiError(f"ACPI base 0x{base:x} is not {TABLE_ALIGN}-byte aligned")
    cursor = base
    addresses: dict[str, int] = {}

    def place(sig: str, size: int, alignment: int = TABLE_ALIGN) -> int:
        nonlocal cursor
        addr = _align(cursor, alignment)
        cursor = addr + size
        addresses[sig] = addr
        return addr

    dsdt = build_dsdt(platform)
    madt = build_madt(platform)
    mcfg = build_mcfg(platform) if platform.pci_root and platform.pci_express else None
    srat = build_srat(platform) if platform.numa_nodes else None
    slit = build_slit(platform) if platform.numa_nodes and platform.numa_distances else None
    listed = ["FACP", "APIC"] + (["MCFG"] if mcfg else []) + (["SRAT"] if srat else []) \
        + (["SLIT"] if slit else [])
    rsdp_addr = place("RSD PTR ", RSDP_LEN)
    facs_addr = place("FACS", FACS_LEN, 64)
    dsdt_addr = place("DSDT", len(dsdt))
    place("FACP", FADT_LEN)
    place("APIC", len(madt))
    if mcfg:
        place("MCFG", len(mcfg))
    if srat:
        place("SRAT", len(srat))
    if slit:
        place("SLIT", len(slit))
    pointers = [addresses[s] for s in listed]
    xsdt = build_xsdt(platform, pointers)
    rsdt = build_rsdt(platform, pointers)
    xsdt_addr = place("XSDT", len(xsdt))
    rsdt_addr = place("RSDT", len(rsdt))
    if cursor > end:
        raise AcpiError(f"ACPI tables need 0x{cursor - base:x} bytes, "
                        f"only 0x{end - base:x} are reserved at 0x{base:x}")
    blobs = {
        "RSD PTR ": build_rsdp(platform, xsdt_addr, rsdt_addr),
        "FACS": build_facs(),
        "DSDT": dsdt,
        "FACP": build_fadt(platform, facs_addr, dsdt_addr),
        "APIC": madt,
        "XSDT": xsdt,
        "RSDT": rsdt,
    }
    if mcfg:
        blobs["MCFG"] = mcfg
    if srat:
        blobs["SRAT"] = srat
    if slit:
        blobs["SLIT"] = slit
    ordered = tuple(sorted(((addresses[s], b) for s, b in blobs.items()),
                           key=lambda item: item[0]))
    return AcpiTables(rsdp_addr=rsdp_addr, blobs=ordered, addresses=addresses)


def write_acpi(memory: GuestMemory, platform: AcpiPlatform,
               base: int = layout.ACPI_ADDR) -> int:
    """Write the tables into guest memory; returns the RSDP's address."""
    tables = build_acpi(platform, base)
    for addr, blob in tables.blobs:
        memory.write(addr, blob)
    return tables.rsdp_addr
