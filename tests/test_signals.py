"""pyhv/engine/signals.py: handled signals recorded and readable on a pipe; the
previous handlers and wake-up descriptor back afterwards."""

from __future__ import annotations

import os
import select
import signal

from pyhv.engine.signals import signal_pipe


def test_a_signal_is_recorded_and_wakes_the_pipe() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with signal_pipe(signal.SIGUSR1) as sig:
        assert select.select([sig.fd], [], [], 0)[0] == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert select.select([sig.fd], [], [], 5)[0] == [sig.fd]
        sig.drain()
        assert sig.caught == [signal.SIGUSR1]
        assert select.select([sig.fd], [], [], 0)[0] == []
        fd = sig.fd
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signal.set_wakeup_fd(-1) == -1  # no wake-up descriptor left behind
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:
        raise AssertionError("the pipe stayed open")
