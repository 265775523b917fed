"""``pyhv vhost-user-console``: the engine's virtio-serial served over vhost-user, driven
by the test frontend (tests/vhost_user_frontend.py) as a guest's virtio_console driver
drives the device: the MULTIPORT handshake on the control queues, then bytes both ways
on the console (port 0) and a named port, each on a unix socket the backend listens on.

No QEMU front drives it here: Debian's QEMU 7.2 has none for a vhost-user console, and
10.0's generic one (vhost-user-device-pci) is not user-creatable.  The device itself is
the one Linux's driver is tested against under pyhv (test_virtio_console*.py).
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_vhost_user_blk_qemu import wait_for_socket
from vhost_user_frontend import REGION1_GUEST, Frontend

from pyhv.engine.memory import memory_fence
from pyhv.engine.vhost_user.message import ConfigSpace, Request
from pyhv.engine.virtio.console import (
    CONSOLE_PORT,
    DEVICE_ADD,
    DEVICE_READY,
    F_MULTIPORT,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
)

CONTROL = struct.Struct("<IHH")
NAME = "org.pyhv.test0"


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class Guest:
    """The driver's side: six rings (port 0's pair, the control pair, port 1's pair)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.rings = [fe.add_ring(i, size=16) for i in range(6)]
        for i, d in enumerate(self.rings):  # six rings' buffers inside region 1
            d.heap = REGION1_GUEST + 0x100000 + i * 0x40000
        self.buffers: dict[tuple[int, int], tuple[int, int]] = {}

    def give(self, ring: int, n: int, size: int = 128) -> None:
        for _ in range(n):
            head, outs = self.rings[ring].add([], [size])
            self.buffers[(ring, head)] = outs[0]
        self.fe.kick(ring)

    def send(self, ring: int, data: bytes) -> None:
        self.rings[ring].add([data], [])
        self.fe.kick(ring)

    def received(self, ring: int, timeout: float = 5.0) -> list[bytes]:
        """What the device put in ``ring``'s buffers since the last look, waiting for
        its call when there is nothing yet.  As a driver does, the used ring is read
        again after asking for the next interrupt (used_event, then a fence): what
        the device published before it could see the request raises no call."""
        d = self.rings[ring]
        deadline = time.monotonic() + timeout
        while True:
            used = d.take_used()
            d.set_used_event(d.last_used)
            memory_fence()
            used += d.take_used()
            if used:
                break
            left = deadline - time.monotonic()
            assert left > 0 and self.fe.wait_call(ring, left), f"no call on ring {ring}"
        got = []
        for head, length in used:
            addr, _size = self.buffers.pop((ring, head))
            got.append(self.fe.memory.read(addr, length))
            d.free.append(head)
        return got

    def control(self, count: int, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
        """The next ``count`` control messages (the device sends them one by one)."""
        got: list[tuple[int, int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += [(*CONTROL.unpack_from(m), m[CONTROL.size:])
                    for m in self.received(2, max(0.0, deadline - time.monotonic()))]
        return got


@pytest.fixture
def backend(tmp_path):
    paths = {k: tmp_path / f"{k}.sock" for k in ("vu", "console", "port")}
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-console",
                             "--socket", str(paths["vu"]),
                             "--console", f"unix:{paths['console']}",
                             "--port", f"{NAME}=unix:{paths['port']}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for p in paths.values():
            wait_for_socket(p, proc)
        yield proc, paths
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_handshake_and_bytes_both_ways_on_the_console_and_a_named_port(backend):
    proc, paths = backend
    console, port = connect(paths["console"]), connect(paths["port"])
    fe = Frontend(connect(paths["vu"]))
    try:
        offered = fe.negotiate()
        assert offered & F_MULTIPORT
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 6
        cfg = fe.get(Request.GET_CONFIG, ConfigSpace(0, 12, 0, bytes(12)))
        # cols, rows, max_nr_ports, emerg_wr (after the 12-byte ConfigSpace header)
        assert struct.unpack_from("<HHII", cfg, 12) == (0, 0, 2, 0)
        assert fe.set_mem_table() == 0
        g = Guest(fe)
        g.give(2, 8)
        g.give(0, 2)
        g.give(4, 2)

        g.send(3, CONTROL.pack(0, DEVICE_READY, 1))
        assert sorted(g.control(2)) == [(0, DEVICE_ADD, 1, b""), (1, DEVICE_ADD, 1, b"")]
        g.give(2, 8)
        g.send(3, CONTROL.pack(0, PORT_READY, 1))
        g.send(3, CONTROL.pack(1, PORT_READY, 1))
        got = g.control(4)
        # both host ends have a client: each port is told it is open on the host side
        assert sorted(got) == [(0, CONSOLE_PORT, 1, b""), (0, PORT_OPEN, 1, b""),
                               (1, PORT_OPEN, 1, b""), (1, PORT_NAME, 1, NAME.encode())]
        g.send(3, CONTROL.pack(0, PORT_OPEN, 1))
        g.send(3, CONTROL.pack(1, PORT_OPEN, 1))

        g.send(1, b"hello console\n")
        g.send(5, b"hello port\n")
        assert recv_exactly(console, 14) == b"hello console\n"
        assert recv_exactly(port, 11) == b"hello port\n"

        port.sendall(b"from the host")
        assert b"".join(g.received(4)) == b"from the host"
        console.sendall(b"keys")
        assert b"".join(g.received(0)) == b"keys"

        # the host end going away is told to the guest
        port.close()
        assert g.control(1) == [(1, PORT_OPEN, 0, b"")]
    finally:
        fe.close()
        console.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    assert not paths["vu"].exists()


@pytest.mark.parametrize("argv,needle", [
    (["--console", "tcp:1"], "--console tcp:1: expected"),
    (["--port", "bad name=null"], "--port bad name=null: expected NAME=END"),
    (["--port", "a=null", "--port", "a=null"], "given twice"),
    (["--port", "a=file:/nonexistent/dir/out"], "/nonexistent/dir/out"),
])
def test_bad_options_are_one_line(tmp_path, argv, needle):
    done = subprocess.run([sys.executable, "-m", "pyhv", "vhost-user-console", "--socket",
                           str(tmp_path / "s.sock"), *argv], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "s.sock").exists()
