"""``pyhv vhost-user-blk``: a disk served over vhost-user until SIGTERM or SIGINT.

The device is the engine's :class:`~pyhv.engine.virtio.blk.VirtioBlk` on the
engine's block backends (raw or qcow2, QEMU's cache modes and image locking),
with its error policy ``report`` (there is no machine here to pause).
"""

from __future__ import annotations

from typing import Optional

from pyhv.engine.vhost_user.serve import serve
from pyhv.engine.virtio.blk import VirtioBlk

__all__ = ["make_device", "serve"]

#: the largest ring a frontend may ask for (QEMU's vhost-user-blk allows up to 1024)
QUEUE_SIZE = 1024


def make_device(path: str, *, readonly: bool = False, cache: Optional[str] = None,
                queues: int = 1, fmt: str = "raw", serial: Optional[str] = None,
                discard: str = "ignore") -> VirtioBlk:
    """The device for a disk file; :class:`~pyhv.errors.PyhvError` (one line) when the
    options or the file are bad.  ``discard='unmap'`` offers DISCARD (QEMU's
    ``discard=unmap``)."""
    from pyhv.config import DiskConfig
    from pyhv.engine.block import open_disk

    disk = DiskConfig(path, format=fmt, readonly=readonly, cache=cache,  # type: ignore[arg-type]
                      queues=queues, serial=serial, discard=discard)  # type: ignore[arg-type]
    backend = open_disk(disk)
    try:
        return VirtioBlk(backend, serial=serial, num_queues=queues, queue_size=QUEUE_SIZE,
                         discard=discard == "unmap", werror="report", rerror="report")
    except ValueError:
        backend.close()
        raise
