"""The ELF kernel loader (``pyhv.engine.boot.elf.load_elf``): headers, PT_LOAD, PVH notes.

Input: the vmlinux, read through a file object.  Accepted: the loaded kernel,
or a :class:`BootError` (``KernelError``) with a one-line message.
"""

from __future__ import annotations

import io

from fuzz import kernels
from fuzz.common import Finding, one_line, unique
from pyhv.engine.boot.elf import load_elf
from pyhv.engine.boot.errors import BootError

MAX_LEN = kernels.MAX_LEN
PATH = "fuzz-vmlinux"


def TARGET(data: bytes) -> None:
    mem = kernels.memory()
    try:
        k = load_elf(mem, io.BytesIO(data), PATH)
    except BootError as e:
        one_line(e)
        return
    if not mem.contains(k.load_start) or k.load_end <= k.load_start:
        raise Finding(f"loaded range 0x{k.load_start:x}-0x{k.load_end:x} is not in RAM")


def seeds() -> list[bytes]:
    return unique(kernels.elf_seeds())


def dictionary() -> list[bytes]:
    return [b"\x7fELF", b"\x02\x01\x01", b"Xen\x00", b"\x12\x00\x00\x00", b"\x01\x00\x00\x00",
            b"\x04\x00\x00\x00", b">\x00", b"\x00\x00\x10\x00", b"\xff\xff\xff\xff"]
