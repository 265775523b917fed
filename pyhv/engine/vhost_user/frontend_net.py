"""A guest NIC whose rings a vhost-user-net backend serves (libvirt's
``<interface type='vhostuser'>``, QEMU's ``-netdev vhost-user``).

As QEMU does, pyhv keeps the device's face: the configuration space (MAC, link
status, queue pairs, MTU), the control queue (rx modes, MAC tables, VLANs,
announce, queue pairs) and the link (``set_link``); the backend gets the receive
and transmit rings and the offload features it offered.  The receive filter the
guest programs is recorded (QMP ``query-rx-filter``) but not enforced: frames
never pass through pyhv.  Queue pairs the guest turns off with
VIRTIO_NET_CTRL_MQ are disabled in the backend (SET_VRING_ENABLE 0).
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from pyhv.engine.memory import GuestMemory
from pyhv.engine.vhost_user.frontend import (
    VhostUserClient,
    VhostUserDevice,
    VhostUserFrontendError,
)
from pyhv.engine.vhost_user.message import F_PROTOCOL_FEATURES, Request, VringState
from pyhv.engine.virtio.device import TYPE_NET, Interrupts
from pyhv.engine.virtio.net import (
    F_CSUM,
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_RX_EXTRA,
    F_CTRL_VLAN,
    F_CTRL_VQ,
    F_GUEST_ANNOUNCE,
    F_GUEST_CSUM,
    F_GUEST_ECN,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_ECN,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    QUEUE_SIZE,
    S_LINK_UP,
    NetControl,
    RxFilter,
)
from pyhv.engine.virtio.queue import SplitQueue

#: what the backend's data path may provide (offloads, merged receive buffers)
BACKEND_FEATURES = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | \
    F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_MRG_RXBUF
#: what pyhv's front provides whatever the backend
FRONT_FEATURES = F_MAC | F_STATUS | F_CTRL_VQ | F_CTRL_RX | F_CTRL_RX_EXTRA | \
    F_CTRL_VLAN | F_CTRL_MAC_ADDR | F_GUEST_ANNOUNCE


class VhostUserNet(NetControl, VhostUserDevice):
    def __init__(self, client: Optional[VhostUserClient], mac: bytes, pairs: int = 1,
                 mtu: Optional[int] = None, link_up: bool = True,
                 reconnect: Optional[int] = None) -> None:
        self.mac = mac
        self.pairs = pairs
        self.mtu = mtu
        self.link_up = link_up
        self.status = S_LINK_UP if link_up else 0
        self.filter = RxFilter(mac)
        self.active_pairs = 1
        #: the receive filter changed (QMP's NIC_RX_FILTER_CHANGED); set by the owner
        self.on_filter_changed: Optional[Callable[[], None]] = None
        super().__init__(client, TYPE_NET, "vhost-user-net", pairs, QUEUE_SIZE,
                         BACKEND_FEATURES, 0, reconnect)
        self.queue_sizes = (QUEUE_SIZE,) * (2 * pairs) + (64,)
        self.local_queues = frozenset({2 * pairs})

    def offered_features(self, backend: int) -> int:
        f = (backend & BACKEND_FEATURES) | FRONT_FEATURES
        if self.pairs > 1:
            f |= F_MQ
        if self.mtu is not None:
            f |= F_MTU
        return f

    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HHHIB", self.status, self.pairs, self.mtu or 0,
                                      0xFFFFFFFF, 0xFF)

    def write_config(self, offset: int, data: bytes) -> None:
        return None

    def activate(self, memory: GuestMemory, queues: list[SplitQueue],
                 interrupts: Interrupts, features: int) -> None:
        self.filter.vlans = set() if features & F_CTRL_VLAN else None
        super().activate(memory, queues, interrupts, features)
        self.active_pairs = 1
        self._enable_pairs(1)

    def reset(self) -> None:
        super().reset()
        self.filter = RxFilter(self.mac)
        self.active_pairs = 1
        self.status &= S_LINK_UP

    def _enable_pairs(self, pairs: int) -> None:
        """Rings of the first ``pairs`` queue pairs on, the others off."""
        c = self.client
        if c is None or not c.connected or not self._started or \
                not self.backend_features & F_PROTOCOL_FEATURES:
            return
        try:
            for i in self._started:
                c.request(Request.SET_VRING_ENABLE, VringState(i, int(i // 2 < pairs)))
        except VhostUserFrontendError as e:
            self._lost(str(e))

    # ---- the control queue (net.NetControl) ----------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index == 2 * self.pairs:
            self.serve_control()

    def _set_pairs(self, pairs: int) -> bool:
        self.active_pairs = pairs
        self._enable_pairs(pairs)
        return True
