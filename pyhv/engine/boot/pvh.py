"""The PVH boot structures: ``hvm_start_info``, its module list and memory map.

Layouts from Xen's public/arch-x86/hvm/start_info.h (version 1).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyhv.engine.boot.errors import BootError
from pyhv.engine.boot.image import Initrd
from pyhv.engine.layout import (
    CMDLINE_ADDR,
    PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR,
    PVH_MEMMAP_MAX,
    PVH_MODLIST_ADDR,
    E820Entry,
)
from pyhv.engine.memory import GuestMemory

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
#: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
#: memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
#: paddr, size, cmdline_paddr, reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")
#: addr, size, type, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")


def write_start_info(memory: GuestMemory, initrd: Initrd | None,
                     memmap: Sequence[E820Entry], rsdp_addr: int | None) -> None:
    """Write hvm_start_info at PVH_INFO_ADDR and what it points to."""
    if len(memmap) > PVH_MEMMAP_MAX:
        raise BootError(f"memory map has {len(memmap)} entries, limit {PVH_MEMMAP_MAX}")
    nr_modules = 0
    if initrd is not None:
        memory.write_struct(MODLIST_ENTRY, PVH_MODLIST_ADDR, initrd.addr, initrd.size, 0, 0)
        nr_modules = 1
    table = bytearray(MEMMAP_ENTRY.size * len(memmap))
    for i, entry in enumerate(memmap):
        MEMMAP_ENTRY.pack_into(table, i * MEMMAP_ENTRY.size, entry.addr, entry.size,
                               entry.type, 0)
    memory.write(PVH_MEMMAP_ADDR, table)
    memory.write_struct(
        START_INFO, PVH_INFO_ADDR, HVM_START_MAGIC, HVM_START_VERSION, 0, nr_modules,
        PVH_MODLIST_ADDR if nr_modules else 0, CMDLINE_ADDR, rsdp_addr or 0,
        PVH_MEMMAP_ADDR, len(memmap), 0)
