"""``pyhv vhost-user-blk``: a disk served over vhost-user until SIGTERM or SIGINT.

The device is the engine's :class:`~pyhv.engine.virtio.blk.VirtioBlk` on the
engine's block backends (raw or qcow2, QEMU's cache modes and image locking),
with its error policy ``report`` (there is no machine here to pause).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.vhost_user.backend import Backend, Server
from pyhv.engine.virtio.blk import VirtioBlk

#: the largest ring a frontend may ask for (QEMU's vhost-user-blk allows up to 1024)
QUEUE_SIZE = 1024


def make_device(path: str, *, readonly: bool = False, cache: Optional[str] = None,
                queues: int = 1, fmt: str = "raw", serial: Optional[str] = None) -> VirtioBlk:
    """The device for a disk file; :class:`~pyhv.errors.PyhvError` (one line) when the
    options or the file are bad."""
    from pyhv.config import DiskConfig
    from pyhv.engine.block import open_disk

    disk = DiskConfig(path, format=fmt, readonly=readonly, cache=cache,  # type: ignore[arg-type]
                      queues=queues, serial=serial)
    backend = open_disk(disk)
    try:
        return VirtioBlk(backend, serial=serial, num_queues=queues, queue_size=QUEUE_SIZE,
                         werror="report", rerror="report")
    except ValueError:
        backend.close()
        raise


def serve(socket_path: str, device: VirtioBlk, *, quiet: bool = False) -> int:
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
        backend = Backend(device, loop)
        server = Server(socket_path, backend)
        loop.add_reader(wake_r, on_wakeup, "signals")
        if not quiet:
            print(f"pyhv: vhost-user-blk: serving {device.backend.path} at {socket_path}",
                  file=sys.stderr, flush=True)
        loop.run()
    finally:
        if server is not None:
            server.close()
        device.close()
        loop.close()
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old.items():
            signal.signal(s, h)
        os.close(wake_r)
        os.close(wake_w)
    return 0
