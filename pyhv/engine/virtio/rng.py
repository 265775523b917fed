"""virtio-rng: entropy from the host's random source, optionally rate limited.

One request queue; each chain is a writable buffer the device fills.  The
source is read only for what the guest asked (bounded by the buffers' total
and, with a rate, by what the current period still allows); a request that
cannot be filled now waits for the next period (a timer the owner arms through
``schedule``) rather than blocking the loop.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, Optional

from pyhv.engine.virtio.device import TYPE_RNG, VirtioDevice
from pyhv.engine.virtio.queue import ChainError, DescriptorChain

#: the most bytes one request gets (a guest's hwrng asks for far less)
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    device_type = TYPE_RNG
    queue_sizes = (256,)
    kind = "virtio-rng"

    def __init__(self, source: str = "/dev/urandom", rate_bytes: Optional[int] = None,
                 period_ms: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.source = source
        self.rate_bytes = rate_bytes
        self.period = (period_ms or 1000) / 1000
        self.clock = clock
        self._window_start = 0.0
        self._window_used = 0
        self._waiting: deque[DescriptorChain] = deque()
        #: arm a timer: call the given function after the given seconds (the engine's
        #: loop); None: retry on the next notification
        self.schedule: Optional[Callable[[float, Callable[[], None]], None]] = None
        self._fd: Optional[int] = None

    def _read(self, n: int) -> bytes:
        if self.source == "/dev/urandom":
            return os.urandom(n)  # getrandom(): never blocks once the pool is ready
        if self._fd is None:
            self._fd = os.open(self.source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return os.read(self._fd, n)
        except BlockingIOError:
            return b""

    def _budget(self) -> int:
        if self.rate_bytes is None:
            return MAX_REQUEST
        now = self.clock()
        if now - self._window_start >= self.period:
            self._window_start, self._window_used = now, 0
        return self.rate_bytes - self._window_used

    def queue_notify(self, index: int) -> None:
        q = self.queues[0]
        assert self.memory is not None and self.interrupts is not None
        while True:
            chain = q.pop(self.memory) if not self._waiting else self._waiting.popleft()
            if chain is None:
                break
            if not self._serve(chain):
                self._waiting.appendleft(chain)
                if self.schedule is not None:
                    left = self.period - (self.clock() - self._window_start)
                    self.schedule(max(left, 0.001), lambda: self.queue_notify(0))
                break
        if q.needs_notification(self.memory):
            self.interrupts.queue(0)

    def _serve(self, chain: DescriptorChain) -> bool:
        """Fill one request; False when the rate limit says wait."""
        assert self.memory is not None
        q = self.queues[0]
        w = chain.writer()
        want = min(w.available, MAX_REQUEST)
        budget = self._budget()
        if want and budget <= 0:
            return False
        data = self._read(min(want, budget))
        if self.rate_bytes is not None:
            self._window_used += len(data)
        try:
            w.write(data)
        except ChainError:
            q.add_used(self.memory, chain.head, 0)  # a bad buffer fails this request only
            return True
        q.add_used(self.memory, chain.head, w.written)
        return True

    def reset(self) -> None:
        super().reset()
        self._waiting.clear()
        self._window_start, self._window_used = 0.0, 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
