"""virtio-serial driven through the virtio-pci transport as Linux's virtio_console
driver drives it (bytearray guest memory, real rings), with real host ends: pipes,
a unix socket served by the engine's event loop, a pty."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Callable

import pytest
from test_virtio_pci import PciDriver
from virtio_driver import Driver, memory

from pyhv.config import (
    ChannelConfig,
    KernelBoot,
    SerialConfig,
    SerialPortConfig,
    VmConfig,
)
from pyhv.engine.chardev import FdEnd, PtyEnd, open_end
from pyhv.engine.console import ConsoleError
from pyhv.engine.devices import RecordingLine
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.host import HostResources
from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio.console import (
    CONSOLE_PORT,
    DEVICE_ADD,
    DEVICE_READY,
    F_EMERG_WRITE,
    F_MULTIPORT,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    Port,
    VirtioConsole,
    console_ports,
)
from pyhv.engine.virtio.device import F_VERSION_1
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VirtioPciFunction,
)
from pyhv.placement import place

NAME = "org.qemu.guest_agent.0"
CONTROL = struct.Struct("<IHH")
RX0, TX0, CRX, CTX, RX1, TX1 = range(6)


class Guest:
    """A virtio_console driver: the rings of the first six queues, the handshake."""

    def __init__(self, ports: list[Port], features: int = F_MULTIPORT,
                 max_ports: int = 2) -> None:
        self.mem: GuestMemory = memory(8 << 20)
        self.dev = VirtioConsole(ports, max_ports)
        self.fn = VirtioPciFunction(self.dev, self.mem, "virtio-serial0")
        self.fn.intx = RecordingLine()
        self.drv = PciDriver(self.fn)
        self.offered = self.drv.negotiate(F_VERSION_1 | features)
        self.rings: list[Driver] = []
        for i in range(6 if features & F_MULTIPORT else 2):
            ring = Driver(self.mem, size=16, base=0x10000 + 0x2000 * i,
                          heap=0x100000 + 0x80000 * i)
            self.drv.setup_queue(i, ring)
            self.rings.append(ring)
        self.drv.w(0x14, 1, self.drv.status() | STATUS_DRIVER_OK)
        assert self.drv.status() & STATUS_DRIVER_OK
        self.events: list[tuple[str, bool]] = []
        self.dev.on_port_open = lambda ident, is_open: self.events.append((ident, is_open))
        self._buffers: dict[int, dict[int, tuple[int, int]]] = {}

    def give(self, q: int, n: int = 4, size: int = 64) -> None:
        """Receive buffers on queue ``q`` (a control or port receive queue)."""
        for _ in range(n):
            head, outs = self.rings[q].add([], [size])
            self._buffers.setdefault(q, {})[head] = outs[0]
        self.drv.kick(q)

    def received(self, q: int) -> list[bytes]:
        out = []
        for head, length in self.rings[q].take_used():
            addr, _n = self._buffers[q].pop(head)
            out.append(self.mem.read(addr, length))
        return out

    def control(self, nr: int, event: int, value: int) -> None:
        self.rings[CTX].add([CONTROL.pack(nr, event, value)], [])
        self.drv.kick(CTX)

    def messages(self) -> list[tuple[int, int, int, bytes]]:
        out = []
        for m in self.received(CRX):
            nr, event, value = CONTROL.unpack_from(m)
            out.append((nr, event, value, m[CONTROL.size:]))
        return out

    def send(self, q: int, data: bytes) -> int:
        head, _ = self.rings[q].add([data], [])
        self.drv.kick(q)
        return head

    def handshake(self) -> list[tuple[int, int, int, bytes]]:
        self.give(CRX, 8)
        self.control(0, DEVICE_READY, 1)
        msgs = self.messages()
        for nr, event, _v, _x in list(msgs):
            if event == DEVICE_ADD:
                self.control(nr, PORT_READY, 1)
        return msgs + self.messages()


class Pipe(FdEnd):
    """A host end on a pipe pair: output readable at ``r``, input writable at ``w``."""

    def __init__(self) -> None:
        self.out_r, out_w = os.pipe()
        in_r, self.in_w = os.pipe()
        for fd in (self.out_r, in_r):
            os.set_blocking(fd, False)
        super().__init__(out_w, in_r, "pipe", owned=(out_w, in_r))

    def output(self) -> bytes:
        try:
            return os.read(self.out_r, 65536)
        except BlockingIOError:
            return b""


def ports_and_ends() -> tuple[list[Port], Pipe, Pipe]:
    con, chan = Pipe(), Pipe()
    return [Port(0, con, None, True, "console0"), Port(1, chan, NAME, False, "channel0")], \
        con, chan


def spin(loop: EventLoop, until: Callable[[], bool], seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        loop.run(timeout=0.01)
    assert until()


# ---- the handshake -----------------------------------------------------------------------

def test_offers_multiport_and_config() -> None:
    ports, _c, _ch = ports_and_ends()
    g = Guest(ports, max_ports=2)
    assert g.offered & F_MULTIPORT and g.offered & F_EMERG_WRITE
    cfg = g.fn.bar_read(MODERN_BAR, g.drv.caps[4][1] + 4, 4)
    assert cfg == 2  # max_nr_ports
    assert len(g.dev.queue_sizes) == 6


def test_handshake_announces_ports_console_name_and_open() -> None:
    ports, _c, _ch = ports_and_ends()
    g = Guest(ports)
    msgs = g.handshake()
    events = [(nr, ev, v) for nr, ev, v, _x in msgs]
    assert events[:2] == [(0, DEVICE_ADD, 1), (1, DEVICE_ADD, 1)]
    # port 0: a console whose host side is there; port 1: named, host side there
    assert (0, CONSOLE_PORT, 1) in events and (0, PORT_OPEN, 1) in events
    names = [x for nr, ev, _v, x in msgs if ev == PORT_NAME]
    assert names == [NAME.encode()]
    assert (1, PORT_OPEN, 1) in events
    assert events.index((0, CONSOLE_PORT, 1)) < events.index((0, PORT_OPEN, 1))


def test_control_messages_wait_for_receive_buffers() -> None:
    ports, _c, _ch = ports_and_ends()
    g = Guest(ports)
    g.control(0, DEVICE_READY, 1)  # no control receive buffers yet
    assert g.messages() == []
    g.give(CRX, 1)
    assert [m[:3] for m in g.messages()] == [(0, DEVICE_ADD, 1)]
    g.give(CRX, 4)
    assert [m[:3] for m in g.messages()] == [(1, DEVICE_ADD, 1)]


def test_guest_open_and_close_reach_the_owner() -> None:
    ports, _c, _ch = ports_and_ends()
    g = Guest(ports)
    g.handshake()
    g.control(1, PORT_OPEN, 1)
    g.control(1, PORT_OPEN, 1)  # no change: no second event
    g.control(1, PORT_OPEN, 0)
    assert g.events == [("channel0", True), ("channel0", False)]
    g.control(1, PORT_OPEN, 1)
    g.drv.w(0x14, 1, 0)  # a reset closes what the guest had open
    assert g.events[-2:] == [("channel0", True), ("channel0", False)]


# ---- data ------------------------------------------------------------------------------

def test_guest_output_reaches_the_host_end() -> None:
    ports, con, chan = ports_and_ends()
    g = Guest(ports)
    g.handshake()
    g.send(TX0, b"hello hvc0\n")
    head = g.send(TX1, b"agent says hi")
    assert con.output() == b"hello hvc0\n"
    assert chan.output() == b"agent says hi"
    assert (head, 0) in g.rings[TX1].take_used()


def test_host_input_waits_for_the_guest_to_open_the_port() -> None:
    ports, _con, chan = ports_and_ends()
    g = Guest(ports)
    loop = EventLoop()
    try:
        g.dev.start(loop)
        g.handshake()
        g.give(RX1, 1, size=4)
        os.write(chan.in_w, b"ping\n")
        loop.run(timeout=0.05)
        assert g.received(RX1) == []  # the guest has not opened port 1
        g.control(1, PORT_OPEN, 1)
        spin(loop, lambda: bool(g.rings[RX1].memory.read_u16(g.rings[RX1].used + 2)))
        # one 4-byte buffer holds "ping"; the newline waits for the next buffer
        assert g.received(RX1) == [b"ping"]
        g.give(RX1, 1, size=4)
        spin(loop, lambda: g.rings[RX1].memory.read_u16(g.rings[RX1].used + 2) == 2)
        assert g.received(RX1) == [b"\n"]
    finally:
        g.dev.stop()
        loop.close()


def test_single_port_device_without_multiport() -> None:
    con = Pipe()
    g = Guest([Port(0, con, None, True, "console0")], features=0)
    loop = EventLoop()
    try:
        g.dev.start(loop)
        g.send(TX0, b"early\n")
        assert con.output() == b"early\n"
        g.give(RX0, 1)
        os.write(con.in_w, b"typed")
        spin(loop, lambda: g.rings[RX0].memory.read_u16(g.rings[RX0].used + 2) == 1)
        assert g.received(RX0) == [b"typed"]
    finally:
        g.dev.stop()
        loop.close()


def test_emergency_write_goes_to_port_0() -> None:
    ports, con, _ch = ports_and_ends()
    g = Guest(ports, features=F_MULTIPORT | F_EMERG_WRITE)
    g.fn.bar_write(MODERN_BAR, g.drv.caps[4][1] + 8, 4, ord("!"))
    assert con.output() == b"!"


# ---- a unix socket: connect, disconnect, back-pressure ----------------------------------

def test_socket_client_connects_and_leaves(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    end = open_end(SerialConfig("unix", path, server=True), "channel agent")
    g = Guest([Port(1, end, NAME, False, "channel0")])
    loop = EventLoop()
    try:
        g.dev.start(loop)
        msgs = g.handshake()
        assert (1, PORT_OPEN, 1) not in [m[:3] for m in msgs]  # nobody connected yet
        g.control(1, PORT_OPEN, 1)
        g.send(TX1, b"lost")  # host side not connected: dropped, as QEMU does
        assert g.rings[TX1].take_used()
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        spin(loop, lambda: end.connected)
        assert [m[:3] for m in g.messages()] == [(1, PORT_OPEN, 1)]
        g.send(TX1, b"{\"return\": {}}\n")
        assert client.recv(100) == b"{\"return\": {}}\n"
        g.give(RX1, 2)
        client.sendall(b"{\"execute\":\"guest-ping\"}\n")
        spin(loop, lambda: g.rings[RX1].memory.read_u16(g.rings[RX1].used + 2) > 0)
        assert b"".join(g.received(RX1)) == b"{\"execute\":\"guest-ping\"}\n"
        client.close()
        spin(loop, lambda: not end.connected)
        assert [m[:3] for m in g.messages()] == [(1, PORT_OPEN, 0)]
        # the next client is served
        again = socket.socket(socket.AF_UNIX)
        again.connect(path)
        spin(loop, lambda: end.connected)
        assert [m[:3] for m in g.messages()] == [(1, PORT_OPEN, 1)]
        again.close()
    finally:
        g.dev.stop()
        end.close()
        loop.close()
    assert not os.path.exists(path)  # the end removed the socket it bound


def test_socket_back_pressure_holds_the_guest(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    end = open_end(SerialConfig("unix", path, server=True), "channel slow")
    g = Guest([Port(1, end, NAME, False, "channel0")])
    loop = EventLoop()
    client = socket.socket(socket.AF_UNIX)
    try:
        g.dev.start(loop)
        client.connect(path)
        spin(loop, lambda: end.connected)
        g.handshake()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = bytes(range(256)) * 1024  # 256 KiB: more than the socket holds
        head = g.send(TX1, big)
        assert g.rings[TX1].take_used() == []  # held until the socket drains
        got = bytearray()
        client.setblocking(False)

        def drain() -> bool:
            try:
                while True:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    got.extend(chunk)
            except BlockingIOError:
                pass
            loop.run(timeout=0.01)
            return len(got) == len(big)
        spin(loop, drain, seconds=5)
        assert bytes(got) == big
        assert g.rings[TX1].take_used() == [(head, 0)]
    finally:
        client.close()
        g.dev.stop()
        end.close()
        loop.close()


# ---- a misbehaving driver ---------------------------------------------------------------

def test_bad_control_messages_are_ignored() -> None:
    ports, _c, _ch = ports_and_ends()
    g = Guest(ports)
    g.give(CRX, 8)
    g.rings[CTX].add([b"\x01\x02"], [])  # too short
    g.drv.kick(CTX)
    g.control(7, PORT_READY, 1)  # no port 7
    g.control(1, 99, 1)  # no such event
    g.control(0, DEVICE_READY, 1)
    assert [m[:3] for m in g.messages()] == [(0, DEVICE_ADD, 1), (1, DEVICE_ADD, 1)]
    assert not g.drv.status() & STATUS_NEEDS_RESET


def test_a_bad_buffer_fails_alone() -> None:
    ports, _c, chan = ports_and_ends()
    g = Guest(ports)
    g.handshake()
    ring = g.rings[TX1]
    head = ring.free.pop(0)
    ring.write_desc(ring.desc, head, (1 << 64) - 8, 64, 0)  # wraps 2^64
    ring.publish(head)
    g.drv.kick(TX1)
    assert ring.take_used() == [(head, 0)]
    g.send(TX1, b"still here")
    assert chan.output() == b"still here"
    assert not g.drv.status() & STATUS_NEEDS_RESET


# ---- host ends --------------------------------------------------------------------------

def test_pty_end_has_a_path_and_drops_when_nobody_reads() -> None:
    end = PtyEnd()
    try:
        assert end.filename == f"pty:{end.path}" and os.path.exists(end.path)
        for _ in range(64):  # far more than a terminal buffers: never blocks
            assert end.write(b"x" * 4096) == 4096
    finally:
        end.close()


@pytest.mark.parametrize("cfg, words", [
    (SerialConfig("unix", "/nonexistent/dir/s.sock", server=True), "cannot listen on"),
    (SerialConfig("unix", "/nonexistent/s.sock", server=False), "cannot connect to"),
    (SerialConfig("fd", fd=987), "fd 987"),
    (SerialConfig("file", "/nonexistent/dir/out"), "cannot open"),
])
def test_bad_host_ends_fail_with_one_line(cfg: SerialConfig, words: str) -> None:
    with pytest.raises(ConsoleError) as e:
        open_end(cfg, "channel x")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "libvirt.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    fd = listener.detach()
    end = open_end(SerialConfig("unix", None, fd=fd, server=True), "channel agent")
    try:
        assert not end.connected and "fd:" in end.filename
    finally:
        end.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the end owned it


def test_host_ends_and_ports_from_a_config(tmp_path: Path) -> None:
    out = tmp_path / "hvc0.out"
    cfg = place(VmConfig(
        KernelBoot("/nonexistent/kernel"),
        extra_serials=(SerialPortConfig(SerialConfig("file", str(out)), "virtio", 0),),
        channels=(ChannelConfig(NAME, SerialConfig("null")),)))
    host = HostResources.open(cfg)
    ends = host.ports
    try:
        assert set(ends) == {(0, 0), (0, 1)}
        ports = console_ports(cfg, 0, ends)
        assert [(p.nr, p.name, p.console, p.id) for p in ports] == \
            [(0, None, True, "console0"), (1, NAME, False, "channel0")]
        assert ports[0].end.write(b"hi") == 2
    finally:
        host.close()
    assert out.read_bytes() == b"hi"


def test_a_failing_end_closes_the_others(tmp_path: Path) -> None:
    cfg = place(VmConfig(KernelBoot("/nonexistent/kernel"), channels=(
        ChannelConfig("a", SerialConfig("unix", str(tmp_path / "a.sock"), server=True)),
        ChannelConfig("b", SerialConfig("unix", "/nonexistent/b.sock", server=False)))))
    with pytest.raises(ConsoleError, match="channel b"):
        HostResources.open(cfg)
    # a.sock's listener was closed: nobody accepts there
    s = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        s.connect(str(tmp_path / "a.sock"))
    s.close()


