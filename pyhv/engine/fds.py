"""Closing descriptors that are ours, whatever state they are in."""

from __future__ import annotations

import os
from typing import Iterable, Optional


def close_fds(fds: Iterable[Optional[int]]) -> None:
    """Close each descriptor (None skipped); one already closed or never valid is
    not an error here: the point is that none stays open."""
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["close_fds"]
