"""The engine's event loop, the serial input pump and the QMP monitor on it (no KVM)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from pyhv.engine.console import SerialInputPump
from pyhv.engine.eventloop import EventLoop
from pyhv.shim.commands import Commands, QmpSession
from pyhv.shim.monitor import MonitorServer


def test_readers_writers_and_timers():
    loop = EventLoop()
    r, w = os.pipe()
    got: list[object] = []
    try:
        loop.add_reader(r, lambda fd: got.append(os.read(fd, 100)))
        loop.add_writer(w, lambda fd: (os.write(fd, b"hi"), loop.remove_writer(fd)))
        loop.call_later(0.05, lambda: got.append("late"))
        early = loop.call_later(0.01, lambda: got.append("early"))
        cancelled = loop.call_later(0.02, lambda: got.append("never"))
        cancelled.cancel()
        loop.call_later(0.1, loop.stop)
        loop.run(timeout=5)
        assert got == [b"hi", "early", "late"]
        assert early.cancelled  # a timer that ran is spent
    finally:
        loop.close()
        os.close(r)
        os.close(w)


def test_a_failing_subscriber_is_isolated():
    lines: list[str] = []
    loop = EventLoop(log=lines.append)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    seen: list[bytes] = []

    def broken(fd: int) -> None:
        raise RuntimeError("device backend bug")

    def healthy(fd: int) -> None:
        seen.append(os.read(fd, 10))
        if len(seen) == 2:
            loop.stop()

    try:
        loop.add_reader(r1, broken, "broken backend")
        loop.add_reader(r2, healthy, "healthy backend")
        loop.call_later(0.5, lambda: 1 / 0, "bad timer")
        os.write(w1, b"x")
        os.write(w2, b"a")
        loop.call_later(0.6, lambda: os.write(w2, b"b"))
        loop.run(timeout=5)
        assert seen == [b"a", b"b"]
        assert not loop.watching(r1) and loop.watching(r2)
        assert any("broken backend failed" in x and "device backend bug" in x for x in lines)
        assert any("bad timer failed" in x and "ZeroDivisionError" in x for x in lines)
    finally:
        loop.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_call_soon_threadsafe_from_another_thread():
    loop = EventLoop()
    done: list[str] = []
    t = threading.Thread(target=lambda: [loop.call_soon_threadsafe(lambda: done.append("x")),
                                         loop.call_soon_threadsafe(loop.stop)])
    t.start()
    loop.run(timeout=5)
    t.join()
    loop.close()
    assert done == ["x"]


def test_serial_input_pump_flow_control():
    """Input waits in the host's pipe while the UART's FIFO is full; nothing is lost."""
    loop = EventLoop()
    r, w = os.pipe()
    os.set_blocking(r, False)
    fifo = bytearray()
    taken = bytearray()

    def offer(data: bytes) -> int:
        n = min(len(data), 16 - len(fifo))
        fifo.extend(data[:n])
        return n

    def guest_drains() -> None:
        taken.extend(fifo)
        fifo.clear()
        pump.space()
        if len(taken) < 1000:
            loop.call_later(0.001, guest_drains)
        else:
            loop.stop()

    pump = SerialInputPump(loop, r, offer)
    message = bytes(range(200)) * 5
    try:
        assert pump.start()
        os.write(w, message)
        loop.call_later(0.001, guest_drains)
        loop.run(timeout=10)
        assert bytes(taken) == message
        os.close(w)
        w = -1
        loop.run(timeout=0.2)  # end of input: the pump stops reading
        assert pump.ended and not loop.watching(r)
    finally:
        loop.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    return s


def _read_lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(1 << 20)
        assert chunk, "connection closed"
        buf += chunk
    return [json.loads(x) for x in buf.split(b"\n")[:n]]


def test_slow_qmp_client_does_not_block_the_loop(tmp_path):
    """A client that does not read its replies never stalls the loop (write readiness):
    another client is served meanwhile, and the slow one gets every reply later."""
    loop = EventLoop()
    path = tmp_path / "qmp.sock"
    server = MonitorServer.unix(loop, str(path), lambda: QmpSession(Commands()))
    thread = threading.Thread(target=loop.run, kwargs={"timeout": 60})
    thread.start()
    slow = _connect(path)
    try:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _read_lines(slow, 1)  # greeting
        count = 40  # each schema reply is tens of KiB: far more than the socket holds
        slow.sendall(b'{"execute":"qmp_capabilities"}\n' +
                     b'{"execute":"query-qmp-schema"}\n' * count)
        time.sleep(0.5)
        fast = _connect(path)
        t0 = time.monotonic()
        _read_lines(fast, 1)
        fast.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-version"}\n')
        replies = _read_lines(fast, 2)
        assert replies[1]["return"]["qemu"]["major"] == 7
        assert time.monotonic() - t0 < 5
        fast.close()
        replies = _read_lines(slow, count + 1)
        assert all("return" in r for r in replies)
        assert isinstance(replies[-1]["return"], list) and replies[-1]["return"]
    finally:
        slow.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.close()
        loop.close()
