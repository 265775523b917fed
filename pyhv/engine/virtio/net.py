"""virtio-net on a tap: frames between the guest's queues and the host's tap.

Queues (virtio 1.2, 5.1.2): receiveq and transmitq of each queue pair (2N and
2N+1), then the control queue.  Every frame carries the 12-byte
``virtio_net_hdr_mrg_rxbuf``; with a vnet-header tap (:mod:`pyhv.engine.net.tap`)
the header passes through untouched both ways and the kernel does the offloads
the guest negotiated: the transmit offloads (HOST_TSO4/6, CSUM) always, the
receive offloads (GUEST_CSUM, GUEST_TSO4/6) by TUNSETOFFLOAD once the driver
chose them.

Transmit: each chain's readable bytes go to the tap in one ``writev`` straight
from guest memory.  A frame shorter than the header or longer than a 64 KiB
GSO frame is dropped (the chain is returned empty); when the tap cannot take
more the chain is given back to the queue (:meth:`SplitQueue.rewind`) and
served when the tap drains.  Receive: a frame is read into one preallocated
buffer, checked against the receive filter (:class:`RxFilter`: the control
queue's rx modes, MAC tables and VLAN table), and copied into one chain, or
into as many as it needs with MRG_RXBUF (``num_buffers`` set in the first).
Without receive buffers the tap is not read (the kernel queues, then drops);
a frame too big for the guest's buffer is dropped.  The link can be taken
down (QMP ``set_link``): frames are dropped both ways and the guest sees
LINK_UP clear with a configuration interrupt.

Device work runs on the engine's loop (queue notifications, tap readiness),
never on a vCPU.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from pyhv.engine.memory import GuestMemory, GuestMemoryError
from pyhv.engine.net.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR_SIZE,
    Tap,
    TapError,
)
from pyhv.engine.net.vhost_net import VhostNetBackend, VhostNetError
from pyhv.engine.virtio.calls import CallFds
from pyhv.engine.virtio.device import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    TYPE_NET,
    Interrupts,
    VirtioDevice,
)
from pyhv.engine.virtio.queue import ChainError, DescriptorChain, SplitQueue, VirtioError

if TYPE_CHECKING:
    from pyhv.engine.eventloop import EventLoop

# feature bits (5.1.3)
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_CTRL_GUEST_OFFLOADS = 1 << 2
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_CTRL_VLAN = 1 << 19
F_CTRL_RX_EXTRA = 1 << 20
F_GUEST_ANNOUNCE = 1 << 21
F_MQ = 1 << 22
F_CTRL_MAC_ADDR = 1 << 23

S_LINK_UP = 1
S_ANNOUNCE = 2

# control queue (5.1.6.5)
CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ, CTRL_GUEST_OFFLOADS = range(6)
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
VLAN_ADD, VLAN_DEL = 0, 1
OK, ERR = 0, 1

#: the largest frame a guest may send or be given: a 64 KiB GSO frame and its header
MAX_FRAME = VNET_HDR_SIZE + 65535 + 14 + 4
#: MAC table entries kept per kind; more set the kind's overflow (accept all)
MAC_TABLE_ENTRIES = 64
#: the most bytes of a control command read
MAX_CONTROL = 2 + 2 * (4 + 6 * 256) + 8
#: frames moved per queue per wakeup, so that one busy queue cannot starve the loop
BATCH = 64
QUEUE_SIZE = 256

_GUEST_OFFLOADS = ((F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4),
                   (F_GUEST_TSO6, TUN_F_TSO6), (F_GUEST_ECN, TUN_F_TSO_ECN))
BROADCAST = b"\xff" * 6


@dataclass
class RxFilter:
    """Which frames the guest gets (the control queue's receive settings)."""

    mac: bytes
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    uni: list[bytes] = field(default_factory=list)
    multi: list[bytes] = field(default_factory=list)
    uni_overflow: bool = False
    multi_overflow: bool = False
    #: VLAN ids let through; None: every VLAN (CTRL_VLAN not negotiated)
    vlans: Optional[set[int]] = None

    def accepts(self, frame: memoryview) -> bool:
        """Whether the Ethernet frame ``frame`` (no virtio header) reaches the guest."""
        if len(frame) < 14:
            return False
        if self.vlans is not None and bytes(frame[12:14]) == b"\x81\x00" and \
                len(frame) >= 16:
            if (frame[14] << 8 | frame[15]) & 0xFFF not in self.vlans:
                return False
        if self.promisc:
            return True
        dst = bytes(frame[0:6])
        if dst == BROADCAST:
            return not self.nobcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multi
        if self.nouni:
            return False
        return self.alluni or self.uni_overflow or dst == self.mac or dst in self.uni

    def describe(self) -> dict[str, object]:
        """QMP's RxFilterInfo fields (without the name)."""
        def mode(none: bool, every: bool) -> str:
            return "none" if none else "all" if every else "normal"
        return {
            "promiscuous": self.promisc,
            "multicast": mode(self.nomulti, self.allmulti),
            "unicast": mode(self.nouni, self.alluni),
            "vlan": "all" if self.vlans is None else "normal",
            "broadcast-allowed": not self.nobcast,
            "multicast-overflow": self.multi_overflow,
            "unicast-overflow": self.uni_overflow,
            "main-mac": _mac_text(self.mac),
            "vlan-table": sorted(self.vlans or ()),
            "unicast-table": [_mac_text(m) for m in self.uni],
            "multicast-table": [_mac_text(m) for m in self.multi],
        }


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


class NetControl:
    """virtio-net's control queue (5.1.6.5), shared by the tap device and the
    vhost-user front: rx modes, MAC tables and address, VLANs, announce, queue pairs;
    a device adds its own commands in :meth:`_extra_command`."""

    filter: RxFilter
    mac: bytes
    status: int
    pairs: int
    acked_features: int
    memory: Optional[GuestMemory]
    queues: list[SplitQueue]
    interrupts: Optional[Interrupts]
    on_filter_changed: Optional[Callable[[], None]]
    link_up: bool

    def set_link(self, up: bool) -> None:
        """Plug (True) or pull (False) the virtual cable (on the loop)."""
        if up == self.link_up:
            return
        self.link_up = up
        self.status = (self.status & ~S_LINK_UP) | (S_LINK_UP if up else 0)
        if self.interrupts is not None and self.acked_features & F_STATUS:
            self.interrupts.config()
        self._link_changed()

    def _link_changed(self) -> None:
        """What the device itself does when the cable is plugged or pulled."""

    def announce(self) -> None:
        """Ask the guest to announce itself (gratuitous ARP; QMP announce-self)."""
        if self.acked_features & F_GUEST_ANNOUNCE and self.interrupts is not None:
            self.status |= S_ANNOUNCE
            self.interrupts.config()

    def serve_control(self) -> None:
        if self.memory is None:
            return
        index = 2 * self.pairs
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
                pass  # no room for the ack: the driver broke its own command
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
            return OK if self._set_pairs(pairs) else ERR
        extra = self._extra_command(cls, cmd, data)
        return ERR if extra is None else extra

    def _set_pairs(self, pairs: int) -> bool:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: the first ``pairs`` pairs carry traffic."""
        raise NotImplementedError

    def _extra_command(self, cls: int, cmd: int, data: bytes) -> Optional[int]:
        """A device's own commands: the ack, or None when it is not one."""
        return None


class VirtioNet(NetControl, VirtioDevice):
    device_type = TYPE_NET
    kind = "virtio-net"

    def __init__(self, tap: Tap, mac: bytes, pairs: int = 1, mtu: Optional[int] = None,
                 link_up: bool = True, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__()
        if len(tap.fds) != pairs:
            raise ValueError("one tap descriptor per queue pair")
        self.tap = tap
        self.mac = mac
        self.pairs = pairs
        self.mtu = mtu
        self.link_up = link_up
        self.queue_sizes = (queue_size,) * (2 * pairs) + (64,)
        features = F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX | \
            F_CTRL_RX_EXTRA | F_CTRL_VLAN | F_CTRL_MAC_ADDR | F_GUEST_ANNOUNCE
        if tap.vnet_hdr:
            features |= F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN
        if tap.can_offload:
            features |= F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | \
                F_CTRL_GUEST_OFFLOADS
        if pairs > 1:
            features |= F_MQ
        if mtu is not None:
            features |= F_MTU
        self.features = features
        self.status = S_LINK_UP if link_up else 0
        self.filter = RxFilter(mac)
        self.active_pairs = 1
        self._buf = bytearray(MAX_FRAME)
        self._view = memoryview(self._buf)
        self._loop: Optional["EventLoop"] = None
        self._reading: set[int] = set()
        #: tap queues that failed to read (the interface was deleted): not watched again
        self._broken: set[int] = set()
        self._tx_waiting: set[int] = set()
        #: frames dropped (guest and host side) and frames moved, for statistics
        self.stats = {"rx_frames": 0, "rx_bytes": 0, "rx_dropped": 0,
                      "tx_frames": 0, "tx_bytes": 0, "tx_dropped": 0}
        #: the receive filter changed (QMP's NIC_RX_FILTER_CHANGED); set by the owner
        self.on_filter_changed: Optional[Callable[[], None]] = None

    # ---- configuration ---------------------------------------------------------------
    def config_bytes(self) -> bytes:
        # mac, status, max_virtqueue_pairs, mtu, speed (unknown), duplex (unknown)
        return self.mac + struct.pack("<HHHIB", self.status, self.pairs, self.mtu or 0,
                                      0xFFFFFFFF, 0xFF)

    # ---- the loop ------------------------------------------------------------------------
    def start(self, loop: "EventLoop") -> None:
        self._loop = loop
        self._watch()

    def stop(self) -> None:
        if self._loop is not None:
            for fd in self._reading | self._tx_waiting:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self._reading, self._tx_waiting = set(), set()
        self._loop = None

    def _watch(self) -> None:
        """Read the taps of the active pairs while the guest can take frames."""
        if self._loop is None:
            return
        want = set()
        if self.memory is not None and self.link_up:
            want = {self.tap.fds[i] for i in range(self.active_pairs)} - self._broken
        for fd in self._reading - want:
            self._loop.remove_reader(fd)
        for fd in want - self._reading:
            pair = self.tap.fds.index(fd)
            self._loop.add_reader(fd, functools.partial(self._readable, pair),
                                  f"{self.kind} rx {pair}")
        self._reading = want

    def _readable(self, pair: int, _fd: int) -> None:
        self.guard(functools.partial(self._rx, pair))

    # ---- lifecycle -----------------------------------------------------------------------
    def activate(self, memory, queues, interrupts, features) -> None:  # type: ignore[no-untyped-def]
        super().activate(memory, queues, interrupts, features)
        self.filter.vlans = set() if features & F_CTRL_VLAN else None
        self._set_offloads(features)
        self._loop_call(self._watch)

    def reset(self) -> None:
        super().reset()
        self.filter = RxFilter(self.mac)
        self.active_pairs = 1
        try:
            self.tap.enable_queues(1)
        except TapError:
            pass  # the kernel keeps steering to every queue: frames wait there
        self.status = (self.status & S_LINK_UP)
        self._loop_call(self._watch)

    def _loop_call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop (activation and reset come from a vCPU)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self.guard(fn))

    def _set_offloads(self, features: int) -> None:
        flags = 0
        for bit, tun in _GUEST_OFFLOADS:
            if features & bit:
                flags |= tun
        try:
            self.tap.set_offload(flags)
        except TapError:
            pass  # the tap keeps handing plain frames: still correct, only slower

    # ---- link ----------------------------------------------------------------------------
    def _link_changed(self) -> None:
        self._watch()

    # ---- queues --------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index == 2 * self.pairs:
            self.serve_control()
        elif index % 2:
            self._tx(index // 2)
        else:
            self._rx(index // 2)

    def _notify(self, index: int) -> None:
        assert self.memory is not None and self.interrupts is not None
        if self.queues[index].needs_notification(self.memory):
            self.interrupts.queue(index)

    # ---- transmit ------------------------------------------------------------------------
    def _tx(self, pair: int) -> None:
        if pair >= self.active_pairs or self.memory is None:
            return
        q = self.queues[2 * pair + 1]
        memory = self.memory
        fd = self.tap.fds[pair]
        used = 0
        full = False
        while used < BATCH and not full and (heads := q.take(memory, BATCH - used)):
            for i, head in enumerate(heads):
                try:
                    chain = q.chain(memory, head)
                except ChainError:
                    q.fill(memory, head, 0)  # cannot be walked: back, nothing sent
                    used += 1
                    continue
                if self._send(fd, chain) is None:
                    # the tap is full: this chain and the rest are served when it drains
                    q.rewind(memory, len(heads) - i)
                    self._wait_writable(pair)
                    full = True
                    break
                q.fill(memory, head, 0)
                used += 1
        self._notify(2 * pair + 1)  # the batch is published at once
        if used == BATCH and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self.guard(lambda: self._tx(pair)))

    def _send(self, fd: int, chain: DescriptorChain) -> Optional[bool]:
        """One frame to the tap: True sent, False dropped, None the tap is full."""
        r = chain.reader()
        total = r.available
        if total < VNET_HDR_SIZE + 14 or total > MAX_FRAME or not self.link_up:
            self.stats["tx_dropped"] += 1
            return False
        try:
            views = list(r.views(total))
        except ChainError:
            self.stats["tx_dropped"] += 1
            return False
        if not self.tap.vnet_hdr:
            views = _skip(views, VNET_HDR_SIZE)
        try:
            os.writev(fd, views)
        except BlockingIOError:
            return None
        except OSError:
            self.stats["tx_dropped"] += 1  # the tap went down: the frame is lost
            return False
        self.stats["tx_frames"] += 1
        self.stats["tx_bytes"] += total - VNET_HDR_SIZE
        return True

    def _wait_writable(self, pair: int) -> None:
        fd = self.tap.fds[pair]
        if self._loop is None or fd in self._tx_waiting:
            return
        self._tx_waiting.add(fd)

        def ready(_fd: int) -> None:
            self._tx_waiting.discard(fd)
            if self._loop is not None:
                self._loop.remove_writer(fd)
            self.guard(lambda: self._tx(pair))
        self._loop.add_writer(fd, ready, f"{self.kind} tx {pair}")

    # ---- receive -------------------------------------------------------------------------
    def _rx(self, pair: int) -> None:
        """Frames from the tap into the guest's receive buffers, while there are both."""
        if self.memory is None or pair >= self.active_pairs or not self.link_up:
            return
        q = self.queues[2 * pair]
        if not q.ready:
            return
        fd = self.tap.fds[pair]
        starved = False
        for _ in range(BATCH):  # the reader is level-triggered: the rest comes next
            if not q.has_available(self.memory):
                starved = True
                break
            try:
                n = os.readv(fd, [self._view])
            except BlockingIOError:
                break
            except OSError:  # the tap went away under us: stop watching it for good
                self._broken.add(fd)
                self._watch()
                break
            frame = self._frame(n)
            if frame is None:
                continue
            if not self._deliver(q, frame):
                self.stats["rx_dropped"] += 1
        self._notify(2 * pair)
        # no buffers: stop reading until the driver adds some (its notification)
        if self._loop is not None:
            if starved and fd in self._reading:
                self._loop.remove_reader(fd)
                self._reading.discard(fd)
            elif not starved and fd not in self._reading:
                self._watch()

    def _frame(self, n: int) -> Optional[memoryview]:
        """The frame just read (with its virtio header), or None if filtered."""
        if self.tap.vnet_hdr:
            if n < VNET_HDR_SIZE + 14:
                return None
            frame = self._view[:n]
        else:
            # a tap without vnet header: make room for a zero header in front
            if n < 14 or n + VNET_HDR_SIZE > len(self._buf):
                return None
            self._buf[VNET_HDR_SIZE:VNET_HDR_SIZE + n] = self._buf[:n]
            self._buf[:VNET_HDR_SIZE] = bytes(VNET_HDR_SIZE)
            frame = self._view[:n + VNET_HDR_SIZE]
        if not self.filter.accepts(frame[VNET_HDR_SIZE:]):
            self.stats["rx_dropped"] += 1
            return None
        return frame

    def _deliver(self, q: SplitQueue, frame: memoryview) -> bool:
        """Copy one frame (header included) into the guest's buffers."""
        memory = self.memory
        assert memory is not None
        merge = bool(self.acked_features & F_MRG_RXBUF)
        chains: list[tuple[DescriptorChain, int]] = []
        offset = 0
        size = len(frame)
        while offset < size:
            chain = q.pop_valid(memory)
            if chain is None:
                break
            w = chain.writer()
            take = min(w.available, size - offset)
            if not merge and take < size:
                q.fill(memory, chain.head, 0)  # too small: the frame is dropped
                return False
            try:
                w.write(frame[offset:offset + take])
            except ChainError:
                q.fill(memory, chain.head, 0)
                for c, _n in chains:
                    q.fill(memory, c.head, 0)
                return False
            chains.append((chain, take))
            offset += take
            if not merge:
                break
        if offset < size:
            # not enough buffers for the rest: put them back, drop the frame
            q.rewind(memory, len(chains))
            return False
        if len(chains) > 1 or merge:
            # num_buffers in the first chain's header
            head = bytearray(frame[:VNET_HDR_SIZE])
            struct.pack_into("<H", head, 10, len(chains))
            chains[0][0].writer().write(bytes(head))
        for chain, n in chains:
            q.fill(memory, chain.head, n)
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += size - VNET_HDR_SIZE
        return True

    # ---- control (the shared part: NetControl) ------------------------------------------------
    def _set_pairs(self, pairs: int) -> bool:
        self.active_pairs = pairs
        try:
            self.tap.enable_queues(pairs)
        except TapError:
            return False
        self._watch()
        return True

    def _extra_command(self, cls: int, cmd: int, data: bytes) -> Optional[int]:
        if cls == CTRL_GUEST_OFFLOADS and cmd == 0 and \
                self.acked_features & F_CTRL_GUEST_OFFLOADS and len(data) >= 8:
            wanted = struct.unpack_from("<Q", data)[0]
            if wanted & ~self.acked_features & 0xFFFFFFFF:
                return ERR  # only offloads the driver negotiated may be turned on
            self._set_offloads(wanted)
            return OK
        return None

    def close(self) -> None:
        return None  # the tap is the machine's: it outlives this device


def filter_command(filt: RxFilter, features: int, cls: int, cmd: int,
                   data: bytes) -> Optional[int]:
    """A control command that changes the receive filter (rx modes, MAC tables, the
    MAC address, VLANs): its ack; None when the command is of another class."""
    f = features
    if cls == CTRL_RX:
        if f & F_CTRL_RX and len(data) >= 1 and \
                (cmd <= RX_ALLMULTI or (cmd <= RX_NOBCAST and f & F_CTRL_RX_EXTRA)):
            name = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")[cmd]
            setattr(filt, name, bool(data[0]))
            return OK
        return ERR
    if cls == CTRL_MAC:
        if cmd == MAC_TABLE_SET and f & F_CTRL_RX:
            return _mac_tables(filt, data)
        if cmd == MAC_ADDR_SET and f & F_CTRL_MAC_ADDR and len(data) >= 6:
            filt.mac = bytes(data[:6])
            return OK
        return ERR
    if cls == CTRL_VLAN:
        if f & F_CTRL_VLAN and cmd in (VLAN_ADD, VLAN_DEL) and len(data) >= 2:
            vid = struct.unpack_from("<H", data)[0]
            if vid < 4096 and filt.vlans is not None:
                if cmd == VLAN_ADD:
                    filt.vlans.add(vid)
                else:
                    filt.vlans.discard(vid)
                return OK
        return ERR
    return None


def _mac_tables(filt: RxFilter, data: bytes) -> int:
    tables: list[tuple[list[bytes], bool]] = []
    pos = 0
    for _kind in range(2):
        if pos + 4 > len(data):
            return ERR
        entries = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if pos + 6 * entries > len(data):
            return ERR
        macs = [bytes(data[pos + 6 * i:pos + 6 * i + 6])
                for i in range(min(entries, MAC_TABLE_ENTRIES))]
        pos += 6 * entries
        tables.append((macs, entries > MAC_TABLE_ENTRIES))
    (filt.uni, filt.uni_overflow), (filt.multi, filt.multi_overflow) = tables
    return OK


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


#: the ring-layout features the kernel must have for the guest to be offered them
_KERNEL_RING_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX


class VhostNet(VirtioNet):
    """virtio-net whose receive and transmit rings the kernel's vhost-net serves
    (one descriptor per queue pair, each on its pair's tap queue), as QEMU's
    ``vhost=on``.  pyhv keeps the configuration space, the control queue and the
    link: a link taken down, or a pair the guest turns off, detaches the tap from
    the kernel's rings.  The receive filter the guest programs is recorded (QMP
    ``query-rx-filter``) but not enforced: frames no longer pass through pyhv.  The
    kernel signals used buffers on eventfds the machine's loop turns into the
    queues' interrupts."""

    def __init__(self, tap: Tap, vhost: VhostNetBackend, mac: bytes, pairs: int = 1,
                 mtu: Optional[int] = None, link_up: bool = True) -> None:
        super().__init__(tap, mac, pairs, mtu, link_up)
        if len(vhost.fds) != pairs:
            raise ValueError("one vhost-net descriptor per queue pair")
        self.vhost = vhost
        # merged receive buffers only where the kernel merges them
        if not vhost.features & F_MRG_RXBUF:
            self.features &= ~F_MRG_RXBUF
        self.offer_mask = ~(_KERNEL_RING_FEATURES & ~vhost.features)
        #: set by the engine: the transport's notify eventfds (the kernel reads them)
        self.kick_fds: Sequence[int] = ()
        #: the kernel's used-buffer signals (one eventfd per queue)
        self.calls = CallFds(self.kind)
        self.local_queues = frozenset({2 * pairs})
        #: pairs whose rings the kernel was given, and those with their tap attached
        self._rings: set[int] = set()
        self._attached: set[int] = set()

    # ---- the engine: call eventfds on the loop -------------------------------------------
    @property
    def call_fds(self) -> list[int]:
        return self.calls.fds

    def open_calls(self) -> None:
        self.calls.open(len(self.queue_sizes))

    def start(self, loop: "EventLoop") -> None:
        self._loop = loop
        self.calls.start(loop, self._call, 2 * self.pairs)  # the control queue is ours

    def stop(self) -> None:
        self.calls.stop()
        self._loop = None

    def _call(self, index: int) -> None:
        interrupts = self.interrupts
        if interrupts is not None:
            self.guard(lambda: interrupts.queue(index))

    def _watch(self) -> None:
        return None  # the kernel reads the taps

    # ---- lifecycle -----------------------------------------------------------------------
    def activate(self, memory, queues, interrupts, features) -> None:  # type: ignore[no-untyped-def]
        super().activate(memory, queues, interrupts, features)
        try:
            self.vhost.set_features(features & self.vhost.features)
            self.vhost.set_mem_table([(r.guest_addr, r.size,
                                       memory.host_address(r.guest_addr, r.size))
                                      for r in memory.regions])
            for pair in range(self.pairs):
                rings = (queues[2 * pair], queues[2 * pair + 1])
                if not all(q.ready for q in rings):
                    continue
                for ring, q in enumerate(rings):
                    index = 2 * pair + ring
                    self.vhost.set_ring(
                        pair, ring, q.size,
                        memory.host_address(q.desc_addr, 16 * q.size),
                        memory.host_address(q.avail_addr, 6 + 2 * q.size),
                        memory.host_address(q.used_addr, 6 + 8 * q.size),
                        self.kick_fds[index], self.call_fds[index])
                self._rings.add(pair)
            self._attach()
        except (VhostNetError, GuestMemoryError) as e:
            raise VirtioError(f"{self.kind}: {e}") from None

    def _attach(self) -> None:
        """The tap queues behind the rings of the active pairs while the link is up."""
        want = {p for p in self._rings if p < self.active_pairs} if self.link_up else set()
        for pair in sorted(self._attached - want):
            for ring in (0, 1):
                self.vhost.set_backend(pair, ring, -1)
            self._attached.discard(pair)
        for pair in sorted(want - self._attached):
            for ring in (0, 1):
                self.vhost.set_backend(pair, ring, self.tap.fds[pair])
            self._attached.add(pair)

    def _stop_rings(self) -> None:
        try:
            for pair in sorted(self._attached):
                for ring in (0, 1):
                    self.vhost.set_backend(pair, ring, -1)
            for pair in sorted(self._rings):
                for ring in (0, 1):
                    self.vhost.ring_base(pair, ring)
        except VhostNetError:
            pass  # a descriptor the kernel no longer takes: nothing runs on it
        self._attached, self._rings = set(), set()

    def reset(self) -> None:
        self._stop_rings()
        self.calls.drain()
        super().reset()

    def _link_changed(self) -> None:
        try:
            self._attach()
        except VhostNetError as e:
            raise VirtioError(f"{self.kind}: {e}") from None

    def _set_pairs(self, pairs: int) -> bool:
        if not super()._set_pairs(pairs):
            return False
        try:
            self._attach()
        except VhostNetError:
            return False
        return True

    def close(self) -> None:
        """The device model ends: the kernel lets go of the rings (the descriptors
        and the taps are the machine's)."""
        self.stop()
        self._stop_rings()
        self.calls.close()
