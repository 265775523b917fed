"""The bzImage loader (``pyhv.engine.boot.bzimage.load_bzimage``): setup header and placement.

Input: the image.  Accepted: a :class:`KernelImage`, or a :class:`BootError`
(``KernelError``) with a one-line message.
"""

from __future__ import annotations

from fuzz import kernels
from fuzz.common import one_line, unique
from pyhv.engine.boot.bzimage import load_bzimage
from pyhv.engine.boot.errors import BootError

MAX_LEN = kernels.MAX_LEN
PATH = "fuzz-bzImage"


def TARGET(data: bytes) -> None:
    mem = kernels.memory()
    try:
        load_bzimage(mem, data, PATH)
    except BootError as e:
        one_line(e)


def seeds() -> list[bytes]:
    return unique(kernels.bzimage_seeds())


def dictionary() -> list[bytes]:
    return [b"HdrS", b"\x55\xaa", b"\x0f\x02", b"\x00\x00\x00\x01", b"\xff\xff\xff\xff",
            b"\x00\x00\x10\x00", b"\x00\x00\x20\x00"]
