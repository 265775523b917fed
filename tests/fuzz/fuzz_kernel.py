"""``load_kernel``, what ``pyhv run --kernel`` calls: format detection, bzImage, ELF and PVH.

Input: the kernel file, written to a scratch file and loaded with each boot
protocol choice (``auto``, ``linux``, ``pvh``).  Accepted: a
:class:`KernelImage` of the protocol asked for, or a :class:`BootError` with a
one-line message.
"""

from __future__ import annotations

import os

from fuzz import kernels
from fuzz.common import Finding, one_line, scratch_dir, unique
from pyhv.engine.boot import BootError, load_kernel

MAX_LEN = kernels.MAX_LEN


def TARGET(data: bytes) -> None:
    path = os.path.join(scratch_dir(), "kernel")
    with open(path, "wb") as f:
        f.write(data)
    mem = kernels.memory()
    for protocol in ("auto", "linux", "pvh"):
        try:
            k = load_kernel(mem, path, protocol)
        except BootError as e:
            one_line(e)
            continue
        if protocol == "pvh" and k.protocol != "pvh":
            raise Finding(f"asked for PVH, got {k.protocol}")
        if protocol == "linux" and k.protocol != "linux64":
            raise Finding(f"asked for the Linux protocol, got {k.protocol}")


def seeds() -> list[bytes]:
    return unique(kernels.bzimage_seeds() + kernels.elf_seeds())


def dictionary() -> list[bytes]:
    return [b"\x7fELF", b"HdrS", b"\x55\xaa", b"Xen\x00", b"\x12\x00\x00\x00"]
