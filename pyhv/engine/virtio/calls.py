"""Used-buffer notifications that come from outside pyhv: eventfds a vhost-user
backend or the kernel's vhost-net signals, turned into the queues' interrupts by
the machine's loop."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

from pyhv.engine.fds import close_fds


class CallFds:
    """One call eventfd per queue, watched on the machine's loop while started."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fds: list[int] = []
        self._loop: Any = None

    def open(self, count: int) -> None:
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]

    def start(self, loop: Any, on_call: Callable[[int], None],
              count: Optional[int] = None) -> None:
        """Call ``on_call(queue)`` on ``loop`` for each signal (the first ``count``
        queues; None: all)."""
        self._loop = loop
        for i, fd in enumerate(self.fds[:count]):
            loop.add_reader(fd, functools.partial(self._signalled, on_call, i),
                            f"{self.kind} call {i}")

    def _signalled(self, on_call: Callable[[int], None], index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        on_call(index)

    @property
    def started(self) -> bool:
        return self._loop is not None

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            for fd in self.fds:
                loop.remove_reader(fd)

    def drain(self) -> None:
        """Forget signals not yet seen (the device resets)."""
        for fd in self.fds:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def close(self) -> None:
        self.stop()
        close_fds(self.fds)
        self.fds = []


__all__ = ["CallFds"]
