"""Loading a guest kernel and preparing its entry, in the shape of rust-vmm's
linux-loader: :func:`load_kernel` and :func:`load_initrd` put images into guest
memory; :func:`configure_boot` writes what the kernel reads at entry (command
line, zero page or PVH start info, GDT, page tables) and returns the boot
vCPU's :class:`EntryState` as plain data.  Nothing here touches KVM.

Supported: bzImage (64-bit Linux boot protocol, 2.06+ with XLF_KERNEL_64) and
ELF vmlinux (64-bit Linux boot protocol, or PVH via its Xen note).
"""

from typing import Any

from pyhv.engine.boot.cmdline import Cmdline
from pyhv.engine.boot.configure import configure_boot
from pyhv.engine.boot.entry import EntryState, Segment
from pyhv.engine.boot.errors import (
    BootError,
    CmdlineError,
    ExtractError,
    InitrdError,
    KernelError,
)
from pyhv.engine.boot.image import Initrd, KernelImage
from pyhv.engine.boot.initrd import load_initrd
from pyhv.engine.boot.kernel import load_kernel

__all__ = [
    "BootError",
    "Cmdline",
    "CmdlineError",
    "EntryState",
    "ExtractError",
    "Initrd",
    "InitrdError",
    "KernelError",
    "KernelImage",
    "Segment",
    "configure_boot",
    "extract_vmlinux",
    "extract_vmlinux_file",
    "load_initrd",
    "load_kernel",
]


def __getattr__(name: str) -> Any:
    # the extractor pulls in every decompressor: import it only when asked,
    # so starting a VM does not pay for it
    if name in ("extract_vmlinux", "extract_vmlinux_file"):
        from pyhv.engine.boot import extract

        return getattr(extract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
