"""``load_initrd``: place an initial ramdisk as high as the kernel allows."""

from __future__ import annotations

import os

from pyhv.engine.boot.errors import InitrdError, os_error_message, size_text
from pyhv.engine.boot.image import Initrd, KernelImage
from pyhv.engine.boot.source import open_image
from pyhv.engine.layout import MMIO_HOLE_END
from pyhv.engine.memory import GuestMemory

PAGE_SIZE = 0x1000


def place_initrd(memory: GuestMemory, size: int, kernel: KernelImage) -> int | None:
    """The highest page-aligned address for ``size`` bytes, or None.

    The initrd stays in one RAM region, at or below ``kernel.initrd_addr_max``,
    below 4 GiB and above the kernel's ``load_end``.
    """
    limit = min(kernel.initrd_addr_max + 1, MMIO_HOLE_END)
    for region in reversed(memory.regions):
        top = min(region.end, limit)
        addr = (top - size) & ~(PAGE_SIZE - 1)
        if addr >= max(region.guest_addr, kernel.load_end) and addr + size <= top:
            return addr
    return None


def load_initrd(memory: GuestMemory, path: str | os.PathLike[str],
                kernel: KernelImage) -> Initrd:
    """Read the initrd at ``path`` straight into guest RAM."""
    name = os.fspath(path)
    f, size = open_image(name, "initrd", memory.size, InitrdError)
    try:
        with f:
            if size == 0:
                raise InitrdError(f"{name}: empty initrd")
            addr = place_initrd(memory, size, kernel)
            if addr is None:
                raise InitrdError(
                    f"{name}: {size_text(size)} does not fit below "
                    f"0x{kernel.initrd_addr_max:x} in {size_text(memory.size)} of RAM")
            view = memory.view(addr, size)
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise InitrdError(f"{name}: file shrank while reading "
                                      f"({done} of {size} bytes)")
                done += n
    except OSError as e:
        raise InitrdError(os_error_message(name, e)) from e
    return Initrd(path=name, addr=addr, size=size)
