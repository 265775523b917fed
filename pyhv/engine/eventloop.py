"""One epoll loop for the host side: console input, machine events, signals.

Subscribers register a file descriptor and a callback.  Other threads reach the
loop with :meth:`EventLoop.call_soon_threadsafe`, never by touching its state.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable, Optional


class EventLoop:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._ep.register(self._wake, select.EPOLLIN)

    def add_reader(self, fd: int, callback: Callable[[int], None]) -> None:
        self._handlers[fd] = callback
        self._ep.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        self._stopped = True
        os.eventfd_write(self._wake, 1)

    def run(self, timeout: Optional[float] = None) -> None:
        """Dispatch events until :meth:`stop` (or ``timeout`` seconds pass)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopped = False
        while not self._stopped:
            wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            if deadline is not None and wait == 0.0:
                return
            for fd, _ in self._ep.poll(wait):
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        calls, self._calls = self._calls, []
                    for fn in calls:
                        fn()
                else:
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        handler(fd)
                if self._stopped:
                    break

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake)
