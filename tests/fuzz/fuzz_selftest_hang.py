"""A planted hang: checks that the runner reports an input that does not finish."""

from __future__ import annotations

MAX_LEN = 64


def TARGET(data: bytes) -> None:
    if data.startswith(b"HANG"):
        while True:
            pass


def seeds() -> list[bytes]:
    return [b"HANG"]
