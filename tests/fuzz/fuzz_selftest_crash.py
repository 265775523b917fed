"""A planted bug: checks that the runner reports a crash (input in hex, traceback)."""

from __future__ import annotations

MAX_LEN = 64


def TARGET(data: bytes) -> None:
    if data.startswith(b"FUZ"):
        raise ValueError("planted bug")


def seeds() -> list[bytes]:
    return [b"FUZ!"]
