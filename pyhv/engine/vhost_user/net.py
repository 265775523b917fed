"""``pyhv vhost-user-net``: a tap served over vhost-user until SIGTERM or SIGINT.

The device is the engine's :class:`~pyhv.engine.virtio.net.VirtioNet` on a tap
pyhv opens by name (created if missing, brought up; one queue per pair): frames
move between the frontend's rings and the tap as in a pyhv machine.  The
frontend (QEMU's ``-netdev vhost-user``) keeps the control queue, the MAC and
the link state to itself; the backend serves the receive and transmit rings.
"""

from __future__ import annotations

from pyhv.engine.net.tap import Tap
from pyhv.engine.vhost_user.serve import serve
from pyhv.engine.virtio.net import VirtioNet

#: the MAC the device model is given (the frontend tells the guest its own)
PLACEHOLDER_MAC = bytes.fromhex("525400000000")


def run(socket_path: str, ifname: str, queues: int = 1) -> int:
    """Open tap ``ifname`` and serve it at ``socket_path``; the exit status."""
    if not 1 <= queues <= 16:
        from pyhv.config import ConfigError

        raise ConfigError(f"vhost-user-net: {queues} queue pairs (1-16)")
    tap = Tap.open(ifname, queues)
    try:
        return serve(socket_path, VirtioNet(tap, PLACEHOLDER_MAC, queues))
    finally:
        tap.close()
