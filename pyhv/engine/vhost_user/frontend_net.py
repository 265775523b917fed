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
    CTRL_ANNOUNCE,
    CTRL_MAC,
    CTRL_MQ,
    ERR,
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
    MAC_ADDR_SET,
    MAX_CONTROL,
    OK,
    QUEUE_SIZE,
    S_ANNOUNCE,
    S_LINK_UP,
    RxFilter,
    filter_command,
)
from pyhv.engine.virtio.queue import ChainError, SplitQueue

#: what the backend's data path may provide (offloads, merged receive buffers)
BACKEND_FEATURES = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | \
    F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_MRG_RXBUF
#: what pyhv's front provides whatever the backend
FRONT_FEATURES = F_MAC | F_STATUS | F_CTRL_VQ | F_CTRL_RX | F_CTRL_RX_EXTRA | \
    F_CTRL_VLAN | F_CTRL_MAC_ADDR | F_GUEST_ANNOUNCE


class VhostUserNet(VhostUserDevice):
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

    # ---- link ----------------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        if up == self.link_up:
            return
        self.link_up = up
        self.status = (self.status & ~S_LINK_UP) | (S_LINK_UP if up else 0)
        if self.interrupts is not None and self.acked_features & F_STATUS:
            self.interrupts.config()

    def announce(self) -> None:
        if self.acked_features & F_GUEST_ANNOUNCE and self.interrupts is not None:
            self.status |= S_ANNOUNCE
            self.interrupts.config()

    # ---- the control queue ---------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index != 2 * self.pairs or self.memory is None:
            return
        q = self.queues[index]
        while (chain := q.pop_valid(self.memory)) is not None:
            r, w = chain.reader(), chain.writer()
            try:
                command = r.read(min(r.available, MAX_CONTROL))
            except ChainError:
                command = b""
            ack = self._command(command) if len(command) >= 2 else ERR
            try:
                w.write(bytes([ack]))
            except ChainError:
                pass
            q.add_used(self.memory, chain.head, w.written)
        if q.needs_notification(self.memory) and self.interrupts is not None:
            self.interrupts.queue(index)

    def _command(self, command: bytes) -> int:
        cls, cmd, data = command[0], command[1], command[2:]
        f = self.acked_features
        before = self.filter.describe()
        ack = filter_command(self.filter, f, cls, cmd, data)
        if ack is not None:
            if ack == OK and cls == CTRL_MAC and cmd == MAC_ADDR_SET:
                self.mac = self.filter.mac
            if ack == OK and self.filter.describe() != before and \
                    self.on_filter_changed is not None:
                self.on_filter_changed()
            return ack
        if cls == CTRL_ANNOUNCE and cmd == 0 and f & F_GUEST_ANNOUNCE:
            self.status &= ~S_ANNOUNCE
            return OK
        if cls == CTRL_MQ and cmd == 0 and f & F_MQ and len(data) >= 2:
            pairs = struct.unpack_from("<H", data)[0]
            if not 1 <= pairs <= self.pairs:
                return ERR
            self.active_pairs = pairs
            self._enable_pairs(pairs)
            return OK
        return ERR
