"""The engine's event loop: one epoll for the host side of a machine.

Subscribers register readers and writers on file descriptors and timers; the
engine attaches what it owns (machine events, console input) and front ends
attach theirs (QMP monitors, signals).  Other threads reach the loop only
through :meth:`EventLoop.call_soon_threadsafe` (never from inside a callback
that waits for the answer: that would deadlock).

A callback that raises is isolated: the error is logged with the subscriber's
name, that subscriber's fd (or timer) is dropped, and every other subscriber
goes on, as rust-vmm's event-manager does.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import sys
import threading
import time
from typing import Callable, Optional

FdCallback = Callable[[int], None]
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"pyhv: {message}", file=sys.stderr)


class Timer:
    """A pending :meth:`EventLoop.call_later`; :meth:`cancel` stops it."""

    __slots__ = ("when", "callback", "name", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None], name: str) -> None:
        self.when = when
        self.callback = callback
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, log: Log = _stderr) -> None:
        self.log = log
        self._ep = select.epoll()
        self._readers: dict[int, tuple[FdCallback, str]] = {}
        self._writers: dict[int, tuple[FdCallback, str]] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._ep.register(self._wake, select.EPOLLIN)

    # ---- subscriptions (the loop's own thread) ---------------------------------
    def add_reader(self, fd: int, callback: FdCallback, name: str = "") -> None:
        """Call ``callback(fd)`` whenever ``fd`` is readable (or hung up)."""
        self._readers[fd] = (callback, name or getattr(callback, "__qualname__", "reader"))
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: FdCallback, name: str = "") -> None:
        """Call ``callback(fd)`` whenever ``fd`` can take more output."""
        self._writers[fd] = (callback, name or getattr(callback, "__qualname__", "writer"))
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._masks

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | \
               (select.EPOLLOUT if fd in self._writers else 0)
        old = self._masks.get(fd, 0)
        if mask == old:
            return
        try:
            if not mask:
                del self._masks[fd]
                self._ep.unregister(fd)
            elif not old:
                self._ep.register(fd, mask)
                self._masks[fd] = mask
            else:
                self._ep.modify(fd, mask)
                self._masks[fd] = mask
        except (OSError, ValueError):
            if not mask:
                return  # the fd was closed already: epoll forgot it by itself
            # refused (a regular file, a closed fd): forget the subscription too
            self._readers.pop(fd, None)
            self._writers.pop(fd, None)
            self._masks.pop(fd, None)
            raise

    def call_later(self, delay: float, callback: Callable[[], None],
                   name: str = "") -> Timer:
        """Call ``callback()`` once, ``delay`` seconds from now."""
        t = Timer(time.monotonic() + max(0.0, delay), callback,
                  name or getattr(callback, "__qualname__", "timer"))
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    # ---- from any thread ---------------------------------------------------------
    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        self._stopped = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    # ---- running -----------------------------------------------------------------
    def run(self, timeout: Optional[float] = None) -> None:
        """Dispatch events until :meth:`stop` (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopped = False
        while not self._stopped:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            self._run_timers(now)
            if self._stopped:
                return
            wait = self._wait_time(deadline)
            for fd, events in self._ep.poll(wait):
                if fd == self._wake:
                    self._run_calls()
                else:
                    self._dispatch(fd, events)
                if self._stopped:
                    return

    def _wait_time(self, deadline: Optional[float]) -> float:
        ends = [t[0] for t in self._timers[:1]]
        if deadline is not None:
            ends.append(deadline)
        if not ends:
            return -1.0
        return max(0.0, min(ends) - time.monotonic())

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, t = heapq.heappop(self._timers)
            if not t.cancelled:
                t.cancelled = True
                self._guard(t.name, t.callback)

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            self._guard(getattr(fn, "__qualname__", "call"), fn)

    def _dispatch(self, fd: int, events: int) -> None:
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            sub = self._readers.get(fd)
            if sub is not None and not self._guard(sub[1], sub[0], fd):
                self.remove_reader(fd)
                self.remove_writer(fd)
                return
        if events & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
            sub = self._writers.get(fd)
            if sub is not None and not self._guard(sub[1], sub[0], fd):
                self.remove_reader(fd)
                self.remove_writer(fd)
                return

    def _guard(self, name: str, fn: Callable[..., None], *args: int) -> bool:
        """Run one callback; False (and a log line) when it raised."""
        try:
            fn(*args)
            return True
        except Exception as e:  # isolate the subscriber, keep the loop going
            self.log(f"event loop: {name} failed and was dropped: "
                     f"{type(e).__name__}: {e}")
            return False

    def close(self) -> None:
        self._ep.close()
        os.close(self._wake)
