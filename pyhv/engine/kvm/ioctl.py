"""The one place that calls ioctl(2): numbers, the call, the error type."""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from pyhv.engine.errors import EngineError
from pyhv.engine.kvm import abi
from pyhv.engine.kvm._ffi import ffi

libc = ffi.dlopen(None)


def _numbers() -> dict[str, int]:
    makers = {"io": lambda nr, size: abi.io(nr), "ior": abi.ior, "iow": abi.iow,
              "iowr": abi.iowr}
    out = {}
    for name, kind, nr, ctype in abi.IOCTL_DEFS:
        size = ffi.sizeof(ctype) if ctype else 0
        out[name] = makers[kind](nr, size)
    return out


#: ioctl request numbers by name, derived from their _IO/_IOR/_IOW/_IOWR shape
NUMBERS = _numbers()


class KvmError(EngineError):
    """An ioctl failed; ``errno`` says why."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.what = what
        self.errno = err


class KvmUnavailable(KvmError):
    """/dev/kvm is absent, not permitted, or lacks something pyhv needs."""


def ioctl(fd: int, name: str, arg: Any = 0) -> int:
    """Call ioctl ``name`` on ``fd``; ``arg`` is a cdata pointer or an int."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret: int = libc.ioctl(fd, ffi.cast("unsigned long", NUMBERS[name]), arg)
    if ret < 0:
        raise KvmError(name, ffi.errno or _errno.EIO)
    return ret
