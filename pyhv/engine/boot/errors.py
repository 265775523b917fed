"""Errors of the boot loaders: one line each, naming the file at fault."""

from __future__ import annotations

import os

from pyhv.engine.errors import EngineError

MiB = 1 << 20


class BootError(EngineError):
    """A kernel, initrd or command line cannot be used to boot the guest."""


class KernelError(BootError):
    """The kernel image is missing, unreadable or not bootable."""


class InitrdError(BootError):
    """The initrd is missing, unreadable or does not fit in guest RAM."""


class CmdlineError(BootError):
    """The kernel command line is too long or has forbidden characters."""


class ExtractError(BootError):
    """No vmlinux could be extracted from a bzImage."""


def os_error_message(path: str | os.PathLike[str], err: OSError) -> str:
    """``"<path>: <strerror>"`` for an :class:`OSError` raised on ``path``."""
    reason = err.strerror or str(err)
    return f"{os.fspath(path)}: {reason}"


def size_text(size: int) -> str:
    """A human size: ``"300 MiB"``, ``"12 KiB"`` or ``"100 bytes"``."""
    if size >= MiB:
        mib = size / MiB
        return f"{mib:.0f} MiB" if size % MiB == 0 or mib >= 10 else f"{mib:.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.0f} KiB"
    return f"{size} bytes"
