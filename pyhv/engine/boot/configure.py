"""``configure_boot``: write what the guest reads at entry, return the vCPU state."""

from __future__ import annotations

from collections.abc import Sequence

from pyhv.engine.boot.cmdline import Cmdline
from pyhv.engine.boot.entry import EntryState, linux64_entry_state, pvh_entry_state
from pyhv.engine.boot.image import Initrd, KernelImage
from pyhv.engine.boot.params import write_zero_page
from pyhv.engine.boot.pvh import write_start_info
from pyhv.engine.layout import CMDLINE_ADDR, E820Entry, e820_map
from pyhv.engine.memory import GuestMemory


def configure_boot(memory: GuestMemory, kernel: KernelImage, cmdline: str | bytes | Cmdline,
                   initrd: Initrd | None = None, e820: Sequence[E820Entry] | None = None,
                   rsdp_addr: int | None = None, ram_size: int | None = None) -> EntryState:
    """Write command line, boot parameters, GDT and page tables for ``kernel``.

    ``e820`` defaults to :func:`layout.e820_map` of ``ram_size`` (itself
    defaulting to the size of ``memory``).  Returns the boot vCPU's state.
    """
    if not isinstance(cmdline, Cmdline) or cmdline.limit > kernel.cmdline_max:
        cmdline = Cmdline(str(cmdline) if isinstance(cmdline, Cmdline) else cmdline,
                          kernel.cmdline_max)
    if e820 is None:
        e820 = e820_map(memory.size if ram_size is None else ram_size)
    memory.write(CMDLINE_ADDR, cmdline.to_bytes())
    if kernel.protocol == "pvh":
        write_start_info(memory, initrd, e820, rsdp_addr)
        return pvh_entry_state(memory, kernel.entry)
    write_zero_page(memory, kernel, initrd, e820, rsdp_addr)
    return linux64_entry_state(memory, kernel.entry)
