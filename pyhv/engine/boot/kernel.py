"""``load_kernel``: detect the kernel format and load it into guest RAM."""

from __future__ import annotations

import os
from typing import BinaryIO, Literal

from pyhv.engine.boot.bzimage import is_bzimage, load_bzimage
from pyhv.engine.boot.elf import ELF_MAGIC, load_elf
from pyhv.engine.boot.errors import KernelError, os_error_message
from pyhv.engine.boot.image import BootProtocol, KernelImage
from pyhv.engine.boot.source import open_image
from pyhv.engine.layout import CMDLINE_MAX, MMIO_HOLE_START
from pyhv.engine.memory import GuestMemory

ProtocolChoice = Literal["auto", "linux", "pvh"]
PROTOCOLS = ("auto", "linux", "pvh")
#: longest command line of the 64-bit Linux protocol without a setup header
ELF_LINUX_CMDLINE_MAX = 2047


def low_ram_top(memory: GuestMemory) -> int:
    """The last byte of the RAM run that starts at address 0, below 4 GiB."""
    for region in memory.regions:
        if region.guest_addr == 0:
            return min(region.end, MMIO_HOLE_START) - 1
    return 0


def load_kernel(memory: GuestMemory, path: str | os.PathLike[str],
                protocol: ProtocolChoice | str = "auto") -> KernelImage:
    """Load the kernel at ``path`` (bzImage or ELF vmlinux) into ``memory``.

    ``protocol`` is ``"auto"`` (PVH when an ELF kernel has the PVH note,
    otherwise the 64-bit Linux boot protocol), ``"linux"`` or ``"pvh"``.
    """
    name = os.fspath(path)
    if protocol not in PROTOCOLS:
        raise KernelError(f"{name}: unknown boot protocol {protocol!r} "
                          f"(expected auto, linux or pvh)")
    f, size = open_image(name, "kernel", memory.size, KernelError)
    try:
        with f:
            magic = f.read(4)
            if magic == ELF_MAGIC:
                return _load_elf(memory, f, name, protocol)
            f.seek(0)
            data = f.read(size)
    except OSError as e:
        raise KernelError(os_error_message(name, e)) from e
    if not data:
        raise KernelError(f"{name}: empty file, not a Linux kernel")
    if not is_bzimage(data):
        raise KernelError(f"{name}: not a Linux kernel (no bzImage header, not ELF)")
    if protocol == "pvh":
        raise KernelError(f"{name}: PVH boot needs an ELF kernel (vmlinux) with a "
                          f"Xen PVH note, this is a bzImage")
    return load_bzimage(memory, data, name)


def _load_elf(memory: GuestMemory, f: BinaryIO, name: str, protocol: str) -> KernelImage:
    loaded = load_elf(memory, f, name)
    proto: BootProtocol
    if protocol == "pvh" or (protocol == "auto" and loaded.pvh_entry is not None):
        if loaded.pvh_entry is None:
            raise KernelError(f"{name}: ELF has no PVH entry note "
                              f"(Xen XEN_ELFNOTE_PHYS32_ENTRY)")
        proto, entry, cmdline_max = "pvh", loaded.pvh_entry, CMDLINE_MAX - 1
    else:
        proto, entry, cmdline_max = "linux64", loaded.entry, ELF_LINUX_CMDLINE_MAX
    return KernelImage(
        path=name,
        format="elf",
        protocol=proto,
        entry=entry,
        load_start=loaded.load_start,
        load_end=loaded.load_end,
        setup_header=None,
        protocol_version=None,
        cmdline_max=cmdline_max,
        initrd_addr_max=low_ram_top(memory),
    )
