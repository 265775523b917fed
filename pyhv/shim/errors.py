"""Errors of the QEMU-compatible front end (``pyhv-qemu``).

Every message is one line in QEMU's style, naming the option at fault::

    pyhv-qemu: -device virtio-gpu-pci: device is not supported by pyhv

libvirt shows the last line a failed emulator wrote to its log, so the option
and the reason must both be on it.  The exit status is 1, like QEMU's.
"""

from __future__ import annotations

from typing import Optional

from pyhv.errors import PyhvError

PROG = "pyhv-qemu"


class ShimError(PyhvError):
    """A command line pyhv-qemu cannot run; ``str()`` is the whole line."""

    exit_status = 1

    def __init__(self, detail: str, where: Optional[str] = None) -> None:
        #: the option (and a short form of its argument) at fault, e.g. ``-device foo``
        self.where = where
        #: the reason, without the program name or the option
        self.detail = " ".join(detail.split())
        # an option's argument may hold line breaks: the message stays one line
        head = f"{PROG}: {' '.join(where.split())}: " if where else f"{PROG}: "
        super().__init__(head + self.detail)


class ShimUsageError(ShimError):
    """The command line is malformed: unknown option, missing or bad value."""


class ShimUnsupportedError(ShimError):
    """Well-formed QEMU, but asks for something pyhv does not build."""
