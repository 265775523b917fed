"""The guest-physical address map of a pyhv machine (x86_64).

One place names every fixed address the engine, the boot loaders and the ACPI
builder agree on.  Low memory (below 1 MiB) holds the boot structures the VMM
writes; RAM above 1 MiB is the guest's; a hole below 4 GiB holds device MMIO
(PCI, IOAPIC, LAPIC) and RAM that does not fit below the hole continues at 4 GiB.

::

    0x0000_0500  GDT used for the boot entry state
    0x0000_0520  IDT (empty) used for the boot entry state
    0x0000_6000  PVH hvm_start_info, then its module list and memory map
    0x0000_7000  Linux zero page (struct boot_params)
    0x0000_8ff0  initial stack pointer
    0x0000_9000  identity page tables (PML4, PDPT, 4 page directories)
    0x0002_0000  kernel command line (up to 64 KiB)
    0x0009_fc00  EBDA: Intel MP table (reserved in e820)
    0x000e_0000  ACPI tables, RSDP first (reserved in e820, BIOS scan area)
    0x000f_8000  SMBIOS entry points (_SM3_, _SM_) and structure table (reserved)
    0x0010_0000  1 MiB: where non-relocatable kernels load
    0xc000_0000  start of the 32-bit MMIO hole (1 GiB)
    0xe000_0000  PCIe ECAM (MMCONFIG), 256 MiB
    0xfec0_0000  IOAPIC
    0xfee0_0000  LAPIC
    0x1_0000_0000  RAM above the hole
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MODLIST_ADDR = 0x6040
PVH_MEMMAP_ADDR = 0x6100
PVH_MEMMAP_MAX = (0x7000 - PVH_MEMMAP_ADDR) // 24
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PAGE_TABLES_ADDR = 0x9000
PAGE_TABLES_END = 0xF000  # PML4 + PDPT + 4 PDs (identity map of 4 GiB)
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
LOW_RAM_END = 0xA0000
ACPI_ADDR = 0xE0000
#: ACPI tables end where the SMBIOS tables begin (32 KiB below 1 MiB)
ACPI_END = 0xF8000
#: the legacy BIOS area guests scan for SMBIOS entry points (16-byte aligned)
SMBIOS_SCAN_START = 0xF0000
SMBIOS_SCAN_END = 0x100000
SMBIOS_ADDR = ACPI_END
SMBIOS_END = 0x100000
HIMEM_START = 0x100000

MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 4 * GiB
PCI_MMIO32_START = MMIO_HOLE_START
PCI_MMIO32_END = 0xE000_0000
PCIE_ECAM_START = 0xE000_0000
PCIE_ECAM_SIZE = 256 * MiB
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
HIGH_RAM_START = 4 * GiB

#: the smallest and largest guest RAM the engine accepts
MIN_RAM = 4 * MiB
MAX_RAM = 1 << 40

# e820 entry types (Linux boot protocol / ACPI address range types)
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def ram_ranges(ram_size: int) -> list[tuple[int, int]]:
    """The (guest address, size) runs of RAM for ``ram_size`` bytes of memory."""
    low = min(ram_size, MMIO_HOLE_START)
    ranges = [(0, low)]
    if ram_size > low:
        ranges.append((HIGH_RAM_START, ram_size - low))
    return ranges


def numa_ranges(sizes: list[int]) -> list[list[tuple[int, int]]]:
    """Guest-physical RAM of each NUMA node: consecutive runs of :func:`ram_ranges`
    in node order, skipping the MMIO hole (a node may straddle it: two runs)."""
    runs = ram_ranges(sum(sizes))
    out: list[list[tuple[int, int]]] = []
    run, used = 0, 0
    for size in sizes:
        mine: list[tuple[int, int]] = []
        while size:
            addr, length = runs[run]
            take = min(size, length - used)
            mine.append((addr + used, take))
            size -= take
            used += take
            if used == length:
                run, used = run + 1, 0
        out.append(mine)
    return out


def e820_map(ram_size: int) -> list[E820Entry]:
    """The memory map handed to the guest (Linux e820 and PVH memmap alike)."""
    low = min(ram_size, MMIO_HOLE_START)
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, LOW_RAM_END - EBDA_START, E820_RESERVED),
        E820Entry(ACPI_ADDR, SMBIOS_END - ACPI_ADDR, E820_RESERVED),
    ]
    if low > HIMEM_START:
        entries.append(E820Entry(HIMEM_START, low - HIMEM_START, E820_RAM))
    # the PCIe ECAM window is reserved so the guest never places anything there
    entries.append(E820Entry(PCIE_ECAM_START, PCIE_ECAM_SIZE, E820_RESERVED))
    if ram_size > low:
        entries.append(E820Entry(HIGH_RAM_START, ram_size - low, E820_RAM))
    return entries

# ---- port I/O map and ISA interrupts ----------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
#: (base port, ISA IRQ) of COM1-COM4, as PC firmware and QEMU's isa-serial place them
COM_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
I8042_RESET_VALUE = 0xFE
RTC_PORT = 0x70
RTC_IRQ = 8
POST_PORT = 0x80
#: ACPI PM1a event block (PM1_STS, PM1_EN: 2 bytes each)
PM1A_EVT_PORT = 0x600
PM1A_EVT_LEN = 4
#: ACPI PM1a control block (PM1_CNT: 2 bytes)
PM1A_CNT_PORT = 0x604
PM1A_CNT_LEN = 2
#: ACPI PM timer (24-bit, 3.579545 MHz)
PM_TMR_PORT = 0x608
PM_TMR_LEN = 4
SCI_IRQ = 9
#: SLP_TYP value of the \_S5 (soft-off) sleep state in the DSDT
S5_SLP_TYP = 5
PCI_CONFIG_PORT = 0xCF8
IOAPIC_PINS = 24
