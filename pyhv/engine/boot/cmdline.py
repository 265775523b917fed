"""The kernel command line as a validated value."""

from __future__ import annotations

from pyhv.engine.boot.errors import CmdlineError


class Cmdline:
    """A kernel command line: printable ASCII, no NUL, bounded length.

    ``limit`` is the longest line accepted, not counting the terminating NUL.
    """

    __slots__ = ("limit", "text")

    def __init__(self, text: str | bytes, limit: int) -> None:
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError as e:
                raise CmdlineError(
                    f"kernel command line has a non-ASCII byte at offset {e.start}") from e
        for i, ch in enumerate(text):
            if not " " <= ch <= "~":
                raise CmdlineError(
                    f"kernel command line has a non-printable character {ch!r} at offset {i}")
        if len(text) > limit:
            raise CmdlineError(f"kernel command line is {len(text)} bytes, limit {limit}")
        self.text = text
        self.limit = limit

    def __len__(self) -> int:
        return len(self.text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Cmdline({self.text!r}, limit={self.limit})"

    def to_bytes(self) -> bytes:
        """The line as the guest reads it: ASCII, NUL-terminated."""
        return self.text.encode("ascii") + b"\0"
