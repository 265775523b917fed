"""``pyhv 9p-serve`` as a process, driven by a 9P client over TCP loopback and unix sockets."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from pyhv.engine.p9 import protocol as p

O_RDONLY, O_RDWR = 0, 2


class SocketClient:
    def __init__(self, sock: socket.socket, msize: int = 65536) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.conn = p.Connection(p.Role.CLIENT, max_msize=msize)
        self.tag = 0
        assert self.rpc(p.Tversion(msize, p.VERSION), p.NOTAG) == p.Rversion(msize, p.VERSION)

    def send(self, msg: p.Message, tag: Optional[int] = None) -> int:
        if tag is None:
            self.tag += 1
            tag = self.tag
        self.sock.sendall(self.conn.send(tag, msg))
        return tag

    def receive(self) -> p.Received:
        while True:
            ev = self.conn.next_event()
            if ev is not p.NEED_DATA:
                assert isinstance(ev, p.Received)
                return ev
            data = self.sock.recv(65536)
            self.conn.receive_data(data)

    def rpc(self, msg: p.Message, tag: Optional[int] = None) -> p.Message:
        tag = self.send(msg, tag)
        ev = self.receive()
        assert ev.tag == tag
        return ev.message


def start(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "9p-serve", *args],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], 20)
    if not ready:
        proc.kill()
        pytest.fail("9p-serve did not announce itself within 20 s")
    line = proc.stderr.readline().decode()
    assert " on " in line, line
    return proc, line.rsplit(" on ", 1)[1].strip()


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    return rc, proc.stderr.read().decode()


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello over a socket\n")
    return root


@pytest.fixture
def tcp_server(export: Path) -> Iterator[tuple[subprocess.Popen[bytes], tuple[str, int]]]:
    proc, where = start(["--root", str(export), "--listen", "tcp:127.0.0.1:0"])
    host, port = where.removeprefix("tcp:").rsplit(":", 1)
    assert host == "127.0.0.1"
    yield proc, (host, int(port))
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_tcp_clients_read_write_and_bad_client_is_dropped(
        tcp_server: tuple[subprocess.Popen[bytes], tuple[str, int]], export: Path) -> None:
    proc, addr = tcp_server
    a = SocketClient(socket.create_connection(addr))
    b = SocketClient(socket.create_connection(addr))
    assert isinstance(a.rpc(p.Tattach(1, p.NOFID, "u", "", p.NOFID)), p.Rattach)
    assert isinstance(b.rpc(p.Tattach(1, p.NOFID, "u", "", p.NOFID)), p.Rattach)
    # fids are per connection: both use fid 1 and 2
    a.rpc(p.Twalk(1, 2, ("hello.txt",)))
    assert isinstance(a.rpc(p.Tlopen(2, O_RDONLY)), p.Rlopen)
    assert a.rpc(p.Tread(2, 0, 4096)) == p.Rread(b"hello over a socket\n")
    r = b.rpc(p.Tlcreate(1, "from-b", O_RDWR, 0o644, p.NOFID))
    assert isinstance(r, p.Rlcreate)
    assert b.rpc(p.Twrite(1, 0, b"x" * 50000)) == p.Rwrite(50000)
    # several requests in flight on one connection, answered by tag
    tags = [a.send(p.Tgetattr(2, p.GETATTR_BASIC)) for _ in range(20)]
    got = sorted(a.receive().tag for _ in tags)
    assert got == sorted(tags)
    # a client that lies about a message's size is disconnected ...
    bad = socket.create_connection(addr)
    bad.settimeout(10)
    bad.sendall(struct.pack("<IBH", 0x7FFFFFFF, p.Twrite.TYPE, 1))
    assert bad.recv(100) == b""
    bad.close()
    # ... and an unknown type only gets an error
    assert a.rpc(p.Tclunk(999)) == p.Rlerror(errno.EBADF)
    a.sock.sendall(struct.pack("<IBH", 7, 200, 77))  # raw: the client end would refuse it
    assert a.sock.recv(11, socket.MSG_WAITALL) == \
        struct.pack("<IBHI", 11, p.Rlerror.TYPE, 77, errno.EOPNOTSUPP)
    assert a.rpc(p.Tread(2, 6, 4)) == p.Rread(b"over")
    assert (export / "from-b").stat().st_size == 50000
    a.sock.close()
    b.sock.close()
    rc, err = stop(proc)
    assert rc == 0, err
    assert "disconnected" in err and "exceeds msize" in err
    assert "Traceback" not in err


def test_unix_socket_and_clean_exit(tmp_path: Path, export: Path) -> None:
    path = tmp_path / "9p.sock"
    proc, where = start(["--root", str(export), "--listen", f"unix:{path}", "--readonly",
                         "--security-model", "squash"])
    try:
        assert where == f"unix:{path}"
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        c = SocketClient(s, msize=8192)
        c.rpc(p.Tattach(1, p.NOFID, "u", "", 0))
        assert c.rpc(p.Tmkdir(1, "d", 0o755, 0)) == p.Rlerror(errno.EROFS)
        c.rpc(p.Twalk(1, 2, ("hello.txt",)))
        c.rpc(p.Tlopen(2, O_RDONLY))
        assert c.rpc(p.Tread(2, 0, 100000)) == p.Rread(b"hello over a socket\n")
        # a client that never reads its replies stalls only itself
        hog = socket.socket(socket.AF_UNIX)
        hog.connect(str(path))
        hog.sendall(p.encode(p.NOTAG, p.Tversion(8192, p.VERSION)))
        hog.setblocking(False)
        req = p.encode(1, p.Tstatfs(0))
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < 4 << 20:
            try:
                sent += hog.send(req * 64)
            except BlockingIOError:
                break
        assert c.rpc(p.Tgetattr(2, p.GETATTR_BASIC)).__class__ is p.Rgetattr
        hog.close()
        s.close()
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert not path.exists()
    assert "terminating on signal 15" in err


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args, words in (
            (["--root", str(tmp_path / "nope"), "--listen", "tcp:127.0.0.1:0"], "--root"),
            (["--root", str(tmp_path), "--listen", "udp:1"], "--listen udp:1"),
            (["--root", str(tmp_path), "--listen", "tcp:127.0.0.1:99999"], "--listen")):
        r = subprocess.run([sys.executable, "-m", "pyhv", "9p-serve", *args],
                           capture_output=True, timeout=30)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert err.count("\n") == 1 and words in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pyhv", "9p-serve", "--root", str(tmp_path),
                            "--listen", f"tcp:127.0.0.1:{port}"], capture_output=True,
                           timeout=30)
    assert r.returncode == 2 and "in use" in r.stderr.decode()
    assert os.path.isdir(tmp_path)
