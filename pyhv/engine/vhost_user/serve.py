"""Serving one device over vhost-user until SIGTERM or SIGINT (the ``pyhv
vhost-user-*`` commands): the engine's loop, the listening socket, signals."""

from __future__ import annotations

import signal
import sys
from typing import Optional

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.signals import signal_pipe
from pyhv.engine.vhost_user.backend import POLL_US, Backend, Server
from pyhv.engine.virtio.device import VirtioDevice


def serve(socket_path: str, device: VirtioDevice, *, quiet: bool = False,
          poll_us: int = POLL_US) -> int:
    """Serve ``device`` at ``socket_path`` until SIGTERM/SIGINT; the exit status
    (``poll_us``: how long a ring is watched after a batch, see :class:`Backend`)."""
    with signal_pipe(signal.SIGTERM, signal.SIGINT) as sig:
        loop = EventLoop()
        server: Optional[Server] = None
        try:
            if hasattr(device, "schedule"):  # timers (virtio-rng's rate limit) on the loop
                device.schedule = lambda delay, work: loop.call_later(delay, work)
            backend = Backend(device, loop, poll_us=poll_us)
            server = Server(socket_path, backend)
            start = getattr(device, "start", None)
            if start is not None:  # host ends the device reads (a tap) on the loop
                start(loop)
            def on_signal(fd: int) -> None:
                sig.drain()
                if sig.caught:
                    loop.stop()
            loop.add_reader(sig.fd, on_signal, "signals")
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
    return 0
