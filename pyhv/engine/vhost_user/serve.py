"""Serving one device over vhost-user until SIGTERM or SIGINT (the ``pyhv
vhost-user-*`` commands): the engine's loop, the listening socket, signals."""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.vhost_user.backend import Backend, Server
from pyhv.engine.virtio.device import VirtioDevice


def serve(socket_path: str, device: VirtioDevice, *, quiet: bool = False) -> int:
    """Serve ``device`` at ``socket_path`` until SIGTERM/SIGINT; the exit status."""
    loop = EventLoop()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)

    def on_wakeup(fd: int) -> None:
        try:
            os.read(fd, 512)
        except BlockingIOError:
            pass
        if caught:
            loop.stop()

    old_wakeup = signal.set_wakeup_fd(wake_w)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server: Optional[Server] = None
    try:
        if hasattr(device, "schedule"):  # timers (virtio-rng's rate limit) on the loop
            device.schedule = lambda delay, work: loop.call_later(delay, work)
        backend = Backend(device, loop)
        server = Server(socket_path, backend)
        start = getattr(device, "start", None)
        if start is not None:  # host ends the device reads (a tap) on the loop
            start(loop)
        loop.add_reader(wake_r, on_wakeup, "signals")
        if not quiet:
            print(f"pyhv: vhost-user: serving {device.kind} at {socket_path}",
                  file=sys.stderr, flush=True)
        loop.run()
    finally:
        if server is not None:
            server.close()
        stop = getattr(device, "stop", None)
        if stop is not None:
            stop()
        close = getattr(device, "close", None)
        if close is not None:
            close()
        loop.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)
    return 0
