"""virtio-net driven through the virtio-pci transport as Linux's virtio_net driver
drives it (bytearray guest memory, real rings).  The host end is a packet socket
pair standing in for a tap's descriptor (same read/write-a-frame semantics), and,
inside a network namespace this test creates, a real tap."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
from test_virtio_pci import PciDriver
from virtio_driver import Driver, memory

from pyhv.engine.devices import RecordingLine
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.net.tap import Tap
from pyhv.engine.virtio.device import F_VERSION_1
from pyhv.engine.virtio.net import (
    CTRL_MAC,
    CTRL_MQ,
    CTRL_RX,
    CTRL_VLAN,
    ERR,
    F_CSUM,
    F_CTRL_RX,
    F_CTRL_RX_EXTRA,
    F_CTRL_VLAN,
    F_CTRL_VQ,
    F_GUEST_CSUM,
    F_HOST_TSO4,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    MAC_TABLE_SET,
    OK,
    RX_NOBCAST,
    RX_PROMISC,
    S_LINK_UP,
    VLAN_ADD,
    RxFilter,
    VirtioNet,
)
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VirtioPciFunction,
)

ROOT = Path(__file__).resolve().parent.parent
MAC = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("525400abcdef")
HDR = bytes(12)
RX, TX = 0, 1


def frame(dst: bytes, payload: bytes = b"x" * 46, ethertype: bytes = b"\x88\xb5") -> bytes:
    return dst + OTHER + ethertype + payload


class Nic:
    """A virtio_net driver on one queue pair (and the control queue) over a packet
    socket pair: ``peer`` is the host side of the 'tap'."""

    def __init__(self, want: int = F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_CTRL_RX |
                 F_CTRL_RX_EXTRA | F_CTRL_VLAN, pairs: int = 1, mtu: int | None = None,
                 can_offload: bool = False) -> None:
        self.socks = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                      for _ in range(pairs)]
        for ours, peer in self.socks:
            ours.setblocking(False)
            peer.setblocking(False)
        self.peer = self.socks[0][1]
        tap = Tap("test0", [s[0].fileno() for s in self.socks], vnet_hdr=True, owned=False,
                  can_offload=can_offload)
        self.mem = memory(8 << 20)
        self.dev = VirtioNet(tap, MAC, pairs, mtu)
        self.fn = VirtioPciFunction(self.dev, self.mem, "net0")
        self.fn.intx = RecordingLine()
        self.drv = PciDriver(self.fn)
        self.offered = self.drv.negotiate(F_VERSION_1 | want)
        self.rings: list[Driver] = []
        for i in range(2 * pairs + 1):
            ring = Driver(self.mem, size=16, base=0x10000 + 0x2000 * i,
                          heap=0x100000 + 0x80000 * i)
            self.drv.setup_queue(i, ring)
            self.rings.append(ring)
        self.ctrl = 2 * pairs
        self.drv.w(0x14, 1, self.drv.status() | STATUS_DRIVER_OK)
        assert self.drv.status() & STATUS_DRIVER_OK
        self._rx: dict[int, tuple[int, int]] = {}
        self.filter_changes = 0
        self.dev.on_filter_changed = self._changed

    def _changed(self) -> None:
        self.filter_changes += 1

    def give(self, n: int = 4, size: int = 2048, q: int = RX) -> None:
        for _ in range(n):
            head, outs = self.rings[q].add([], [size])
            self._rx[head] = outs[0]
        self.drv.kick(q)

    def received(self, q: int = RX) -> list[bytes]:
        return [self.mem.read(self._rx.pop(head)[0], length)
                for head, length in self.rings[q].take_used()]

    def send(self, data: bytes, q: int = TX) -> int:
        head, _ = self.rings[q].add([data], [])
        self.drv.kick(q)
        return head

    def command(self, cls: int, cmd: int, data: bytes) -> int:
        head, outs = self.rings[self.ctrl].add([bytes([cls, cmd]) + data], [1])
        self.drv.kick(self.ctrl)
        used = dict(self.rings[self.ctrl].take_used())
        assert used[head] == 1
        return self.mem.read(outs[0][0], 1)[0]

    def peer_frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for a, b in self.socks:
            a.close()
            b.close()


def serve(nic: Nic, loop: EventLoop, until: Callable[[], bool], seconds: float = 2) -> None:
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        loop.run(timeout=0.01)
    assert until()


# ---- features and configuration ---------------------------------------------------------

def test_features_follow_the_tap_and_the_config() -> None:
    nic = Nic(pairs=2, mtu=9000)
    try:
        assert nic.offered & (F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_MQ | F_MTU)
        assert nic.offered & F_CSUM and nic.offered & F_HOST_TSO4  # a vnet-header tap
        assert not nic.offered & F_GUEST_CSUM  # this 'tap' takes no TUNSETOFFLOAD
        cfg = nic.fn.bar_read(MODERN_BAR, nic.drv.caps[4][1], 4) | \
            nic.fn.bar_read(MODERN_BAR, nic.drv.caps[4][1] + 4, 4) << 32
        assert cfg.to_bytes(8, "little")[:6] == MAC
        status, pairs, mtu = struct.unpack("<HHH", bytes(
            nic.fn.bar_read(MODERN_BAR, nic.drv.caps[4][1] + 6 + i, 1) for i in range(6)))
        assert (status, pairs, mtu) == (S_LINK_UP, 2, 9000)
    finally:
        nic.close()


# ---- transmit ----------------------------------------------------------------------------

def test_transmit_passes_header_and_frame_to_the_tap() -> None:
    nic = Nic()
    try:
        data = HDR + frame(b"\xff" * 6)
        head = nic.send(data)
        assert nic.peer_frames() == [data]
        assert nic.rings[TX].take_used() == [(head, 0)]
        assert nic.dev.stats["tx_frames"] == 1
    finally:
        nic.close()


@pytest.mark.parametrize("data", [b"", HDR, HDR + b"\xff" * 13, HDR + b"\xff" * 70000],
                         ids=["empty", "header-only", "runt", "oversized"])
def test_bad_frames_are_dropped_and_the_queue_goes_on(data: bytes) -> None:
    nic = Nic()
    try:
        head = nic.send(data)
        assert nic.peer_frames() == []
        assert nic.rings[TX].take_used() == [(head, 0)]
        good = HDR + frame(MAC)
        nic.send(good)
        assert nic.peer_frames() == [good]
        assert not nic.drv.status() & STATUS_NEEDS_RESET
    finally:
        nic.close()


def test_a_descriptor_loop_fails_alone() -> None:
    nic = Nic()
    try:
        ring = nic.rings[TX]
        a, b = ring.free.pop(0), ring.free.pop(0)
        buf, _ = ring.alloc(64)
        ring.write_desc(ring.desc, a, buf, 64, 1, b)  # NEXT -> b
        ring.write_desc(ring.desc, b, buf, 64, 1, a)  # NEXT -> a: a loop
        ring.publish(a)
        nic.drv.kick(TX)
        assert ring.take_used() == [(a, 0)]
        nic.send(HDR + frame(MAC))
        assert len(nic.peer_frames()) == 1
    finally:
        nic.close()


def fill_the_tap(nic: Nic) -> tuple[int, int]:
    """Send 60 kB frames until one stays in the ring (the tap's socket is full): its
    head, and how many went out before it."""
    big = HDR + frame(MAC, b"y" * 60000)
    sent = 0
    while True:
        head = nic.send(big)
        if not nic.rings[TX].take_used():
            return head, sent
        sent += 1
        assert sent < 1000


def test_a_full_tap_holds_the_frame_until_it_drains() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        head, sent = fill_the_tap(nic)
        got = 0

        def drain() -> bool:
            nonlocal got
            got += len(nic.peer_frames())
            return bool(nic.rings[TX].memory.read_u16(nic.rings[TX].used + 2) == sent + 1)
        serve(nic, loop, drain)
        assert nic.rings[TX].take_used() == [(head, 0)]
        got += len(nic.peer_frames())
        assert got == sent + 1  # every frame arrived, the held one too
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


def test_frames_queued_behind_a_full_tap_go_out_in_order() -> None:
    """A batch whose first frame finds the tap full is served, in ring order, once
    it drains: nothing is sent twice, skipped or reordered."""
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        held, sent = fill_the_tap(nic)
        tagged = [HDR + frame(MAC, bytes([0x41 + i]) * 100) for i in range(3)]
        ring = nic.rings[TX]
        heads = []
        for data in tagged:  # published together, one notification
            head, _ = ring.add([data], [])
            heads.append(head)
        nic.drv.kick(TX)
        assert ring.take_used() == []
        frames: list[bytes] = []

        def drain() -> bool:
            frames.extend(nic.peer_frames())
            return bool(ring.memory.read_u16(ring.used + 2) == sent + 4)
        serve(nic, loop, drain)
        frames.extend(nic.peer_frames())
        assert ring.take_used() == [(h, 0) for h in [held, *heads]]
        assert len(frames) == sent + 4
        assert [f[-1] for f in frames[-3:]] == [0x41, 0x42, 0x43]
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


# ---- receive -----------------------------------------------------------------------------

def test_receive_one_frame_per_buffer_with_num_buffers() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        nic.give(2)
        data = frame(MAC, b"hello guest" + bytes(35))
        nic.peer.send(HDR + data)
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 1)
        (got,) = nic.received()
        assert got[12:] == data and struct.unpack_from("<H", got, 10)[0] == 1
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


def test_mergeable_buffers_take_a_big_frame() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        nic.give(8, size=256)
        data = frame(MAC, bytes(range(256)) * 3)  # 782 bytes + header: 4 buffers
        nic.peer.send(HDR + data)
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 1)
        parts = nic.received()
        assert len(parts) == 4 and struct.unpack_from("<H", parts[0], 10)[0] == 4
        assert b"".join(parts)[12:] == data
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


def test_without_mergeable_buffers_a_small_buffer_drops_the_frame() -> None:
    nic = Nic(want=F_MAC | F_STATUS)
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        nic.give(1, size=64)
        nic.peer.send(HDR + frame(MAC, bytes(200)))
        serve(nic, loop, lambda: nic.dev.stats["rx_dropped"] == 1)
        assert nic.rings[RX].take_used()[0][1] == 0
        nic.give(1, size=2048)
        nic.peer.send(HDR + frame(MAC))
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 1)
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


def test_no_buffers_no_reading_until_the_driver_adds_some() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        nic.peer.send(HDR + frame(MAC))
        loop.run(timeout=0.05)
        assert nic.dev.stats["rx_frames"] == 0
        assert nic.peer.fileno() >= 0 and not loop.watching(nic.socks[0][0].fileno())
        nic.give(1)  # the notification: the tap is read again
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 1)
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


# ---- the receive filter and the control queue --------------------------------------------

def test_rx_filter_rules() -> None:
    f = RxFilter(MAC, promisc=False)
    b = memoryview
    assert f.accepts(b(frame(MAC))) and f.accepts(b(frame(b"\xff" * 6)))
    assert not f.accepts(b(frame(OTHER)))
    assert not f.accepts(b(frame(bytes.fromhex("01005e000001"))))
    f.multi = [bytes.fromhex("01005e000001")]
    assert f.accepts(b(frame(bytes.fromhex("01005e000001"))))
    f.nobcast = True
    assert not f.accepts(b(frame(b"\xff" * 6)))
    f.uni_overflow = True
    assert f.accepts(b(frame(OTHER)))
    f.vlans = {5}
    tagged = MAC + OTHER + b"\x81\x00" + struct.pack(">H", 7) + b"\x08\x00" + bytes(46)
    assert not f.accepts(b(tagged))
    f.vlans.add(7)
    assert f.accepts(b(tagged))
    assert not f.accepts(b(b"short"))


def test_control_queue_sets_the_filter_and_acks() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        assert nic.command(CTRL_RX, RX_PROMISC, b"\x00") == OK
        table = struct.pack("<I", 1) + OTHER + struct.pack("<I", 0)
        assert nic.command(CTRL_MAC, MAC_TABLE_SET, table) == OK
        assert nic.command(CTRL_RX, RX_NOBCAST, b"\x01") == OK
        assert nic.command(CTRL_VLAN, VLAN_ADD, struct.pack("<H", 9)) == OK
        assert nic.filter_changes == 4
        # malformed or not negotiated: ERR, nothing changes
        assert nic.command(CTRL_MAC, MAC_TABLE_SET, struct.pack("<I", 5) + OTHER) == ERR
        assert nic.command(CTRL_MQ, 0, struct.pack("<H", 2)) == ERR  # no MQ
        assert nic.command(77, 0, b"") == ERR
        assert nic.filter_changes == 4
        info = nic.dev.filter.describe()
        assert info["promiscuous"] is False and info["unicast-table"] == ["52:54:00:ab:cd:ef"]
        assert info["broadcast-allowed"] is False and info["vlan-table"] == [9]
        nic.give(4)
        for dst in (b"\xff" * 6, bytes.fromhex("525400999999"), OTHER, MAC):
            nic.peer.send(HDR + frame(dst))
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 2)
        assert [p[12:18] for p in nic.received()] == [OTHER, MAC]
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


def test_multiqueue_pairs_and_vq_pairs_set() -> None:
    nic = Nic(want=F_MAC | F_STATUS | F_MRG_RXBUF | F_CTRL_VQ | F_MQ, pairs=2)
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        data = HDR + frame(MAC)
        nic.send(data, q=3)  # pair 1 is not active yet: nothing moves
        assert nic.rings[3].take_used() == []
        assert nic.command(CTRL_MQ, 0, struct.pack("<H", 2)) == OK
        nic.drv.kick(3)
        assert nic.socks[1][1].recv(100) == data
        assert nic.command(CTRL_MQ, 0, struct.pack("<H", 3)) == ERR  # more than it has
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


# ---- link --------------------------------------------------------------------------------

def test_link_down_drops_both_ways_and_tells_the_guest() -> None:
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        isr_before = nic.fn.isr
        nic.fn.host_work(lambda: nic.dev.set_link(False))
        assert nic.dev.config_bytes()[6] & S_LINK_UP == 0
        assert nic.fn.isr & 2 and not isr_before & 2  # a configuration interrupt
        nic.send(HDR + frame(MAC))
        assert nic.peer_frames() == [] and nic.dev.stats["tx_dropped"] == 1
        nic.give(1)
        nic.peer.send(HDR + frame(MAC))
        loop.run(timeout=0.05)
        assert nic.dev.stats["rx_frames"] == 0
        nic.fn.host_work(lambda: nic.dev.set_link(True))
        serve(nic, loop, lambda: nic.dev.stats["rx_frames"] == 1)
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()


# ---- a real tap, in a network namespace this test makes ---------------------------------

TAP_SCRIPT = textwrap.dedent("""
    import os, socket, struct, sys, time
    from pyhv.engine.net.tap import Tap, TapError
    tap = Tap.open("pyhvtest%d", queues=2)
    assert tap.name.startswith("pyhvtest") and tap.vnet_hdr, tap.name
    # the kernel's side: a packet socket on the interface
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.bind((tap.name, 0))
    s.settimeout(5)
    frame = b"\\xff" * 6 + bytes.fromhex("525400123456") + b"\\x88\\xb5" + b"from-guest" * 5
    os.write(tap.fds[0], bytes(12) + frame)           # what virtio-net writes
    assert s.recv(2000) == frame
    back = bytes.fromhex("525400123456") + bytes.fromhex("525400abcdef") + b"\\x88\\xb5" + \\
        b"to-guest" * 6
    s.send(back)
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        for fd in tap.fds:
            try:
                data = os.read(fd, 2000)
            except BlockingIOError:
                continue
            if data[24:26] == b"\\x88\\xb5":  # the kernel's own IPv6 chatter aside
                got = data
                break
        time.sleep(0.01)
    assert got is not None and got[12:] == back and len(got) == 12 + len(back), got
    tap.set_offload(0x7)
    tap.enable_queues(1)
    adopted = Tap.adopt((os.dup(tap.fds[0]),))
    assert adopted.name == tap.name and adopted.vnet_hdr
    try:
        Tap.open("pyhvother0", bridge="nosuchbr0")
    except TapError as e:
        print("BRIDGE", e)
    try:
        Tap.adopt((s.fileno(),))
    except TapError as e:
        print("ADOPT", e)
    print("OK", tap.name)
""")


def test_real_tap_in_a_namespace() -> None:
    p = subprocess.run(["unshare", "-n", sys.executable, "-c", TAP_SCRIPT],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert lines["OK"].startswith("pyhvtest")
    assert "cannot join bridge nosuchbr0" in lines["BRIDGE"]
    assert lines["ADOPT"].startswith("tap fd ") and "not a tap" in lines["ADOPT"]


def test_a_vanished_tap_is_not_read_again() -> None:
    """A tap whose interface goes away keeps failing reads: the device stops watching
    it instead of spinning the loop."""
    nic = Nic()
    loop = EventLoop()
    try:
        nic.dev.start(loop)
        nic.give(1)
        fd = nic.socks[0][0].fileno()
        assert loop.watching(fd)
        r, w = os.pipe()
        os.close(r)
        nic.dev.stop()
        nic.dev.tap.fds[0] = w  # reading a pipe's write end fails (EBADF), as a gone tap
        nic.dev.start(loop)
        assert loop.watching(w)
        loop.run(timeout=0.05)  # writable-ended pipe: readable (error) at once
        nic.dev._rx(0)
        assert w in nic.dev._broken and not loop.watching(w)
        nic.dev.tap.fds[0] = fd
        os.close(w)
    finally:
        nic.dev.stop()
        loop.close()
        nic.close()
