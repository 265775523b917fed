"""Signals as a readable descriptor, for the foreground commands (``pyhv run``, the
``vhost-user-*`` and ``9p-serve`` servers).

A handler may not do the work a signal asks for (it runs between any two bytecodes
of the main thread); :func:`signal_pipe` records the signal and lets the kernel
write its number on a non-blocking pipe (``signal.set_wakeup_fd``), so the command's
event loop or selector wakes up and acts on :attr:`SignalPipe.caught` in its own
time.  Leaving the context restores the previous handlers and wake-up descriptor.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator, Optional

#: the pipes of the signal_pipe contexts now open, innermost last
_active: list["SignalPipe"] = []


def pending() -> Optional[int]:
    """The first handled signal not yet acted on, if any: for the bounded waits
    of a command's set-up (before its loop runs), so that SIGTERM/SIGINT end a
    wait for a peer at once rather than when it times out."""
    for pipe in reversed(_active):
        if pipe.caught:
            return pipe.caught[0]
    return None


class SignalPipe:
    def __init__(self) -> None:
        #: the read end: readable once a handled signal arrived
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: the handled signals received, oldest first (the owner clears what it did)
        self.caught: list[int] = []

    def drain(self) -> None:
        """Empty the pipe (call when :attr:`fd` was readable)."""
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._w)


@contextmanager
def signal_pipe(*signums: int) -> Iterator[SignalPipe]:
    """Handle ``signums`` by recording them on a :class:`SignalPipe`."""
    pipe = SignalPipe()
    old_wakeup = signal.set_wakeup_fd(pipe._w)

    def on_signal(signum: int, frame: object) -> None:
        pipe.caught.append(signum)

    old = {s: signal.signal(s, on_signal) for s in signums}
    _active.append(pipe)
    try:
        yield pipe
    finally:
        _active.remove(pipe)
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old.items():
            signal.signal(s, handler)
        pipe.close()
