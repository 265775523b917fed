"""What loading a kernel and an initrd produces: plain data, no guest access."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KernelFormat = Literal["bzimage", "elf"]
BootProtocol = Literal["linux64", "pvh"]


@dataclass(frozen=True)
class KernelImage:
    """A kernel loaded into guest memory, ready for :func:`configure_boot`."""

    #: the file the kernel was loaded from
    path: str
    format: KernelFormat
    protocol: BootProtocol
    #: guest-physical entry point (64-bit for linux64, 32-bit for pvh)
    entry: int
    #: first guest-physical byte the kernel occupies
    load_start: int
    #: one past the last byte the kernel claims (for a bzImage: including the
    #: ``init_size`` area it decompresses into)
    load_end: int
    #: the bzImage setup header as in the file (offset 0x1f1 onwards); None for ELF
    setup_header: bytes | None
    #: boot protocol version of a bzImage (e.g. 0x020f); None for ELF
    protocol_version: int | None
    #: longest command line the kernel accepts, not counting the NUL
    cmdline_max: int
    #: highest address the initrd may occupy (inclusive)
    initrd_addr_max: int


@dataclass(frozen=True)
class Initrd:
    """An initial ramdisk loaded into guest memory."""

    path: str
    addr: int
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size
