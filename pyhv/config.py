"""``VmConfig``: the one description of a machine that every front end produces.

``pyhv/domxml`` builds it from libvirt domain XML, ``pyhv/shim`` from QEMU's
command line and the ``pyhv run`` options directly; the engine's builder is
its only consumer.  Frozen dataclasses with checked values: a ``VmConfig`` that
exists is internally consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pyhv.errors import PyhvError

MiB = 1 << 20

BootProtocol = Literal["auto", "linux", "pvh"]
SerialKind = Literal["stdio", "file", "pty", "null", "fd"]
Action = Literal["destroy", "restart", "preserve"]


class ConfigError(PyhvError):
    """A value that no machine can be built from."""


@dataclass(frozen=True)
class SerialConfig:
    """Where COM1's output goes and its input comes from."""

    kind: SerialKind = "stdio"
    #: file path for ``file``; unused otherwise
    path: Optional[str] = None
    #: append to ``path`` instead of truncating it
    append: bool = False
    #: an inherited file descriptor for ``fd`` (QEMU's /dev/fdset, libvirt's chardev fds)
    fd: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ConfigError("serial: file output needs a path")
        if self.kind == "fd" and (self.fd is None or self.fd < 0):
            raise ConfigError("serial: fd output needs a file descriptor")


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot."""

    kernel: str
    initrd: Optional[str] = None
    cmdline: str = ""
    #: ``auto``: PVH when an ELF kernel has the PVH note, else the Linux 64-bit protocol
    protocol: BootProtocol = "auto"


@dataclass(frozen=True)
class VmConfig:
    boot: KernelBoot
    name: str = "pyhv"
    uuid: Optional[str] = None
    memory: int = 256 * MiB
    vcpus: int = 1
    serial: SerialConfig = field(default_factory=SerialConfig)
    #: what happens when the guest asks for a reset: ``restart`` reboots it,
    #: ``destroy`` ends the machine as if powered off (QEMU's -no-reboot)
    on_reboot: Action = "restart"
    #: share guest RAM through a memfd (what vhost-user backends need)
    shared_memory: bool = False
    #: print unclaimed port and MMIO accesses to stderr
    trace_io: bool = False

    def __post_init__(self) -> None:
        from pyhv.engine.layout import MAX_RAM, MIN_RAM

        if self.memory < MIN_RAM:
            raise ConfigError(f"memory {_size(self.memory)} is too small "
                              f"(at least {_size(MIN_RAM)})")
        if self.memory > MAX_RAM:
            raise ConfigError(f"memory {_size(self.memory)} is too large "
                              f"(at most {_size(MAX_RAM)})")
        if self.memory % 4096:
            raise ConfigError(f"memory {self.memory} bytes is not a multiple of 4 KiB")
        if not 1 <= self.vcpus <= 255:
            raise ConfigError(f"vcpus {self.vcpus}: must be between 1 and 255")


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def parse_size(text: str, default_unit: str = "M", what: str = "memory") -> int:
    """``256M``, ``1G``, ``65536K``, ``1048576`` (in ``default_unit``) → bytes."""
    units = {"": default_unit, "B": "B", "K": "K", "M": "M", "G": "G", "T": "T"}
    shifts = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}
    t = text.strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    elif t.endswith("B") and len(t) > 1 and t[-2] in "KMGT":
        t = t[:-1]
    num, suffix = t, ""
    if t and t[-1] in "BKMGT":
        num, suffix = t[:-1], t[-1]
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: not a size (examples: 256M, 1G)") from None
    if value < 0:
        raise ConfigError(f"{what} {text!r}: negative size")
    return int(value * (1 << shifts[units[suffix]]))
