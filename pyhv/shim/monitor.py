"""QMP over sockets: the thin I/O layer around :class:`pyhv.shim.commands.QmpSession`.

A :class:`MonitorServer` listens on a socket (one libvirt passed as an inherited
fd, or a unix path from ``-qmp unix:PATH,server=on``) and gives every accepted
connection its own session (protocol state) over the shared command handlers.
Bytes in go to the session, its replies go back out; events are broadcast to
every negotiated session.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from typing import Callable, Optional

from pyhv.engine.eventloop import EventLoop
from pyhv.shim.commands import QmpSession

#: makes the protocol session for a new connection
SessionFactory = Callable[[], QmpSession]


class MonitorSession:
    """One client connection: its protocol session and its output queue.

    Output is written as the socket takes it (the loop waits for write
    readiness; nothing blocks), commands are not read while more than
    :attr:`HIGH_WATER` bytes of replies wait, and a client that lets more than
    :attr:`MAX_QUEUED` bytes pile up (events it never reads) is disconnected.
    """

    HIGH_WATER = 1 << 20
    MAX_QUEUED = 16 << 20
    #: descriptors taken with one message (libvirt sends one per getfd)
    MAX_FDS = 16

    def __init__(self, server: "MonitorServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.session = server.new_session()
        self.out = bytearray()
        self.closed = False
        self._closing = False
        self._writing = False
        sock.setblocking(False)
        self.fd = sock.fileno()
        self._loop = server.loop
        self._loop.add_reader(self.fd, self._readable, "QMP client")
        self.send(self.session.start())

    def send(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.out += data
        if len(self.out) > self.MAX_QUEUED:
            self.close()  # the client stopped reading
            return
        self._flush()

    def _flush(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.out[:n]
        if self.out and not self._writing:
            self._loop.add_writer(self.fd, self._writable, "QMP client")
            self._writing = True
        elif not self.out and self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        if not self.out and self._closing:
            self.close()
            return
        reading = self._loop.watching(self.fd) and not self._closing
        if len(self.out) > self.HIGH_WATER and reading:
            self._loop.remove_reader(self.fd)
        elif len(self.out) <= self.HIGH_WATER and not self._closing:
            self._loop.add_reader(self.fd, self._readable, "QMP client")

    def _writable(self, fd: int) -> None:
        self._flush()

    def _readable(self, fd: int) -> None:
        conn = self.session.conn
        try:
            data, fds = self._receive()
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if fds:
            conn.receive_fds(fds)  # for the command they came with (getfd)
        self.send(self.session.feed(data))
        if not data:
            conn.drop_fds()
        if self.server.after_commands is not None:
            self.server.after_commands()
        if not data or self.session.done:
            # the last replies (quit's) still go out before the socket closes
            self._closing = True
            self._loop.remove_reader(self.fd)
            self._flush()

    def _receive(self) -> tuple[bytes, list[int]]:
        """Bytes, and the descriptors that came with them (at most
        :attr:`MAX_FDS`, close-on-exec; any beyond were closed by the kernel)."""
        if self.sock.family != socket.AF_UNIX:
            return self.sock.recv(65536), []
        data, ancdata, _flags, _addr = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(self.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += array.array("i", payload[:usable]).tolist()
        return data, fds

    def drain(self, timeout: float) -> None:
        """Before the process ends: give queued replies (quit's) a last chance."""
        if self.closed or not self.out:
            return
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(self.out)
        except OSError:
            pass
        self.out.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        self.session.conn.drop_fds()
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.sessions.discard(self)


class MonitorServer:
    """A listening QMP socket."""

    def __init__(self, loop: EventLoop, listener: socket.socket, new_session: SessionFactory,
                 path: Optional[str] = None) -> None:
        self.loop = loop
        self.listener = listener
        self.new_session = new_session
        self.path = path
        self.sessions: set[MonitorSession] = set()
        #: called after each batch of commands (the owner acts on their effects)
        self.after_commands: Optional[Callable[[], None]] = None
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    @classmethod
    def from_fd(cls, loop: EventLoop, fd: int, new_session: SessionFactory) -> "MonitorServer":
        """A listening socket inherited from the parent (libvirt's monitor fd)."""
        sock = socket.socket(fileno=fd)
        return cls(loop, sock, new_session)

    @classmethod
    def unix(cls, loop: EventLoop, path: str, new_session: SessionFactory) -> "MonitorServer":
        """Listen on a unix socket at ``path`` (an old socket file is replaced)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return cls(loop, sock, new_session, path)

    def _accept(self, fd: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            self.sessions.add(MonitorSession(self, sock))

    def broadcast(self, name: str, data: Optional[dict] = None) -> None:
        for s in list(self.sessions):
            s.send(s.session.event(name, data))

    def close(self) -> None:
        for s in list(self.sessions):
            s.drain(1.0)
            s.close()
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
