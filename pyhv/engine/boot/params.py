"""The Linux zero page (``struct boot_params``) of the 64-bit boot protocol."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyhv.engine.boot.bzimage import (
    BOOT_FLAG,
    HDRS_MAGIC,
    SETUP_HEADER_LIMIT,
    SETUP_HEADER_OFFSET,
)
from pyhv.engine.boot.errors import BootError
from pyhv.engine.boot.image import Initrd, KernelImage
from pyhv.engine.layout import CMDLINE_ADDR, ZERO_PAGE_ADDR, E820Entry
from pyhv.engine.memory import GuestMemory

ZERO_PAGE_SIZE = 0x1000

# struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h)
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
BOOT_FLAG_OFFSET = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
CMDLINE_SIZE = 0x238
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
#: "undefined" boot loader id
LOADER_UNDEFINED = 0xFF
HEAP_END = 0xFE00
#: what a synthesized header claims: protocol 2.15, 16 MiB alignment
SYNTH_VERSION = 0x020F
SYNTH_KERNEL_ALIGNMENT = 0x1000000


def synthesized_setup_header(kernel: KernelImage) -> bytes:
    """A setup header for a kernel loaded from ELF (as Firecracker writes one)."""
    page = bytearray(SETUP_HEADER_LIMIT)
    struct.pack_into("<H", page, BOOT_FLAG_OFFSET, BOOT_FLAG)
    page[JUMP:JUMP + 2] = bytes([0xEB, 0x6A])  # header ends at 0x26c, as in 2.15
    page[HEADER:HEADER + 4] = HDRS_MAGIC
    struct.pack_into("<H", page, VERSION, SYNTH_VERSION)
    struct.pack_into("<I", page, INITRD_ADDR_MAX, kernel.initrd_addr_max)
    struct.pack_into("<I", page, KERNEL_ALIGNMENT, SYNTH_KERNEL_ALIGNMENT)
    struct.pack_into("<I", page, CMDLINE_SIZE, kernel.cmdline_max)
    return bytes(page[SETUP_HEADER_OFFSET:0x202 + page[JUMP + 1]])


def write_zero_page(memory: GuestMemory, kernel: KernelImage,
                    initrd: Initrd | None, e820: Sequence[E820Entry],
                    rsdp_addr: int | None) -> None:
    """Fill the zero page at ``ZERO_PAGE_ADDR`` for the 64-bit boot protocol."""
    if len(e820) > E820_MAX_ENTRIES:
        raise BootError(f"memory map has {len(e820)} entries, limit {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    header = kernel.setup_header
    if header is None:
        header = synthesized_setup_header(kernel)
    header = header[:SETUP_HEADER_LIMIT - SETUP_HEADER_OFFSET]
    page[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(header)] = header
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    struct.pack_into("<I", page, CMD_LINE_PTR, CMDLINE_ADDR & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    addr, size = (initrd.addr, initrd.size) if initrd is not None else (0, 0)
    struct.pack_into("<I", page, RAMDISK_IMAGE, addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, RAMDISK_SIZE, size & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, addr >> 32)
    struct.pack_into("<I", page, EXT_RAMDISK_SIZE, size >> 32)
    page[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(page, E820_TABLE + i * E820_ENTRY.size,
                             entry.addr, entry.size, entry.type)
    if rsdp_addr is not None:
        struct.pack_into("<Q", page, ACPI_RSDP_ADDR, rsdp_addr)
    memory.write(ZERO_PAGE_ADDR, page)
