"""Size strings: ``pyhv.config.parse_size`` (``pyhv run --memory``) and the QEMU
``-m``/``size=`` parser ``pyhv.shim.argv.parse_size``.

Input: the text.  Accepted: a byte count (a non-negative integer, below 2**64
for QEMU sizes), or ``ConfigError``/``ShimError`` with a one-line message.
"""

from __future__ import annotations

from fuzz.common import Finding, one_line, text_from_bytes
from pyhv.config import ConfigError, parse_size
from pyhv.shim import argv
from pyhv.shim.errors import ShimError

MAX_LEN = 64


def TARGET(data: bytes) -> None:
    text = text_from_bytes(data)
    for unit in ("B", "K", "M", "G", "T"):
        try:
            size = parse_size(text, unit, "--memory")
        except ConfigError as e:
            one_line(e)
            continue
        if not isinstance(size, int) or size < 0:
            raise Finding(f"parse_size({text!r}, {unit!r}) gave {size!r}")
    for shift in (0, 20):
        try:
            size = argv.parse_size(text, "size", "-m", shift)
        except ShimError as e:
            one_line(e)
            continue
        if not isinstance(size, int) or not 0 <= size < 1 << 64:
            raise Finding(f"argv.parse_size({text!r}, shift {shift}) gave {size!r}")


def seeds() -> list[bytes]:
    return [s.encode() for s in (
        "256M", "1G", "65536K", "1048576", "64MiB", "2GB", "1.5G", " 512 ", "0", "-1M",
        "0x100000", "1T", "1e3", "lots", "size=219136k", "219136k", "8E", "16.0E", "1b",
    )]


def dictionary() -> list[bytes]:
    return [s.encode() for s in ("K", "M", "G", "T", "B", "IB", "iB", "0x", ".", "e", "E",
                                 "-", "+", "_", "inf", "nan", "1e400")]
