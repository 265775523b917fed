"""Host ends of character devices for virtio consoles and channels.

A :class:`HostEnd` is what a ``<console>``/``<channel>`` (QEMU's ``-chardev``) is
connected to on the host: nothing, a file, a pseudo-terminal, an inherited
descriptor, standard I/O, or a stream socket (unix or tcp, listening or
connecting).  It is opened when the machine is built, so that a bad path or a
port in use fails the start with one line and a pty's path is known before the
guest runs; it serves the engine's loop once :meth:`HostEnd.start` hands it one.

The device side is a :class:`PortSink`: ``receive`` takes host input and says how
much it took (less than offered: the end stops reading until ``resume``, so a
guest that does not read holds the host back instead of losing bytes), and
``host_open`` reports a client connecting or going away.  Output from the guest
goes through :meth:`HostEnd.write`, which never blocks: it returns what the end
took now, and ``wait_writable`` calls the sink's ``writable`` when it can take
more (sockets hold the guest back this way, as QEMU throttles a port).  A pty
nobody reads loses output rather than stalling the guest, as with QEMU; files
take every byte.

A listening socket serves one client at a time (later ones wait in the
backlog); when the client goes, the end listens again.  A connecting socket
that loses its peer stays closed, as QEMU's without ``reconnect``.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Optional, Protocol

from pyhv.config import SerialConfig
from pyhv.engine.console import ConsoleError, open_output_file, open_pty
from pyhv.engine.fds import close_fds

if TYPE_CHECKING:
    from pyhv.engine.eventloop import EventLoop

#: the most bytes read from a host end at once
CHUNK = 4096


class PortSink(Protocol):
    def receive(self, data: bytes) -> int:
        """Host input; returns how many bytes were taken (fewer: stop reading)."""

    def host_open(self, is_open: bool) -> None:
        """The host side connected (True) or went away (False)."""

    def writable(self) -> None:
        """The end can take more output (after :meth:`HostEnd.wait_writable`)."""


class HostEnd:
    """No host end (``null``): output is dropped, there is never input."""

    #: what QEMU's ``query-chardev`` calls the end (``pty:/dev/pts/3``)
    filename = "null"

    def __init__(self) -> None:
        self.loop: Optional["EventLoop"] = None
        self.sink: Optional[PortSink] = None
        #: whether a host side is there (a socket's client; always for the others)
        self.connected = True
        #: input read while the sink had no room, handed over on :meth:`resume`
        self.pending = b""

    # ---- the engine's loop ------------------------------------------------------------
    def start(self, loop: "EventLoop", sink: PortSink) -> None:
        self.loop, self.sink = loop, sink
        self._watch()

    def stop(self) -> None:
        self._unwatch()
        self.loop, self.sink = None, None

    def _input_fd(self) -> Optional[int]:
        return None

    def _watch(self) -> None:
        fd = self._input_fd()
        if self.loop is not None and fd is not None and not self.loop.watching(fd):
            try:
                self.loop.add_reader(fd, self._readable, f"chardev {self.filename}")
            except (OSError, ValueError):
                pass  # a regular file as input: nothing to wait for

    def _unwatch(self) -> None:
        fd = self._input_fd()
        if self.loop is not None and fd is not None:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended()
            return
        self._offer(data)

    def _offer(self, data: bytes) -> None:
        n = self.sink.receive(data) if self.sink is not None else 0
        if n < len(data):
            self.pending = data[n:]
            fd = self._input_fd()
            if fd is not None and self.loop is not None:
                self.loop.remove_reader(fd)  # read again once the guest took this

    def _ended(self) -> None:
        """End of input."""
        fd = self._input_fd()
        if self.loop is not None and fd is not None:
            self.loop.remove_reader(fd)

    def resume(self) -> None:
        """The sink has room again: hand over what waits, then read again."""
        if self.sink is None or self.loop is None:
            return
        if self.pending:
            data, self.pending = self.pending, b""
            self._offer(data)
        if not self.pending:
            self._watch()

    def resume_soon(self) -> None:
        """:meth:`resume` from another thread (a vCPU): on the loop, soon."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.resume)

    def write_soon(self, data: bytes) -> None:
        """:meth:`write` from another thread (a vCPU): on the loop, soon; at once when
        no loop serves the end yet."""
        def write() -> None:
            self.write(data)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(write)
        else:
            write()

    # ---- output ---------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        """Guest output; returns how many bytes the end took now (never blocks)."""
        return len(data)

    def output(self, data: bytes) -> None:
        """Guest output from any thread (a UART's, on a vCPU): never touches the loop;
        what the end cannot take now is lost, as on a UART with nobody listening."""
        self.write(data)

    def wait_writable(self) -> None:
        """Call the sink's ``writable`` once the end can take more output."""
        return None

    def close(self) -> None:
        self.stop()


class FdEnd(HostEnd):
    """Output to a descriptor (a file, an inherited fd, stdout), input from another
    (stdin) or none."""

    def __init__(self, out_fd: int, in_fd: Optional[int] = None, filename: str = "file",
                 owned: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.out_fd, self.in_fd = out_fd, in_fd
        self.filename = filename
        self._owned = owned

    def _input_fd(self) -> Optional[int]:
        return self.in_fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.out_fd, view):]
            except OSError as e:
                if e.errno in (errno.EIO, errno.EPIPE):
                    break  # the reader went away: output is lost, the guest goes on
                raise ConsoleError(f"chardev {self.filename}: {e.strerror}") from e
        return len(data)

    def close(self) -> None:
        super().close()
        close_fds(self._owned)
        self._owned = ()


class PtyEnd(FdEnd):
    """A pseudo-terminal: its slave's path is what ``virsh console`` opens.  The end
    keeps the slave open itself (the master never sees a hang-up), so a reader
    coming and going is no event; output nobody reads is lost once the terminal's
    buffer is full."""

    def __init__(self) -> None:
        master, slave, self.path = open_pty()
        super().__init__(master, master, f"pty:{self.path}", owned=(master, slave))

    def write(self, data: bytes) -> int:
        try:
            os.write(self.out_fd, data)
        except OSError:
            pass  # full (nobody reads) or gone: dropped, never a stalled guest
        return len(data)

    def _ended(self) -> None:
        # EIO from a master whose slave nobody has open (we hold it, but be safe):
        # look again later rather than spinning
        if self.loop is not None:
            self.loop.remove_reader(self.out_fd)
            self.loop.call_later(0.25, self._watch, "pty input retry")


class SocketEnd(HostEnd):
    """A stream socket: listening (one client at a time) or connected to a peer."""

    def __init__(self, listener: Optional[socket.socket], peer: Optional[socket.socket],
                 filename: str) -> None:
        super().__init__()
        self.listener = listener
        self.peer = peer
        self.filename = filename
        self.connected = peer is not None
        self._waiting_write = False
        #: the socket file this end bound (removed again when it closes, as QEMU does)
        self.bound_path: Optional[str] = None

    def _input_fd(self) -> Optional[int]:
        return self.peer.fileno() if self.peer is not None else None

    def start(self, loop: "EventLoop", sink: PortSink) -> None:
        super().start(loop, sink)
        if self.listener is not None and self.peer is None:
            loop.add_reader(self.listener.fileno(), self._accept, f"chardev {self.filename}")

    def stop(self) -> None:
        if self.loop is not None and self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        super().stop()

    def _accept(self, _fd: int) -> None:
        assert self.listener is not None and self.loop is not None
        try:
            peer, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # ECONNABORTED and the like: the next client is served
        peer.setblocking(False)
        self.peer, self.connected, self.pending = peer, True, b""
        self.loop.remove_reader(self.listener.fileno())  # one client at a time
        self._watch()
        if self.sink is not None:
            self.sink.host_open(True)

    def _ended(self) -> None:
        self._drop_peer()

    def _drop_peer(self) -> None:
        if self.peer is None:
            return
        self._unwatch()
        self.peer.close()
        self.peer, self.connected, self.pending = None, False, b""
        self._waiting_write = False
        if self.loop is not None and self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._accept,
                                 f"chardev {self.filename}")
        if self.sink is not None:
            self.sink.host_open(False)

    def write(self, data: bytes) -> int:
        if self.peer is None:
            return len(data)  # nobody connected: dropped, as QEMU does
        try:
            return self.peer.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self._drop_peer()
            return len(data)

    def output(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            return
        try:
            peer.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass  # full or gone: the loop's reader finds out and drops the peer

    def wait_writable(self) -> None:
        if self.peer is None or self.loop is None or self._waiting_write:
            return
        self._waiting_write = True
        self.loop.add_writer(self.peer.fileno(), self._writable, f"chardev {self.filename}")

    def _writable(self, fd: int) -> None:
        self._waiting_write = False
        if self.loop is not None:
            self.loop.remove_writer(fd)
        if self.sink is not None:
            self.sink.writable()

    def close(self) -> None:
        self.stop()
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.bound_path is not None:
            try:
                os.unlink(self.bound_path)
            except OSError:
                pass
            self.bound_path = None


def open_end(cfg: SerialConfig, what: str) -> HostEnd:
    """Open the host end ``cfg`` names for a console or channel (``what`` names it in
    errors).  A log (``<log file=>``) is not built for these ends."""
    if cfg.log_path is not None or cfg.log_fd is not None:
        raise ConsoleError(f"{what}: a log of a virtio console or channel is not built")
    if cfg.kind == "null":
        return HostEnd()
    if cfg.kind == "file":
        assert cfg.path is not None
        fd = open_output_file(cfg.path, cfg.append, f"{what} output")
        return FdEnd(fd, filename=f"file:{cfg.path}", owned=(fd,))
    if cfg.kind == "fd":
        assert cfg.fd is not None
        _check_fd(cfg.fd, what)
        return FdEnd(cfg.fd, filename=f"fd:{cfg.fd}", owned=(cfg.fd,))
    if cfg.kind == "stdio":
        return FdEnd(1, 0 if _has_fd(0) else None, filename="stdio")
    if cfg.kind == "pty":
        return PtyEnd()
    if cfg.kind == "unix":
        return _unix_end(cfg, what)
    if cfg.kind == "tcp":
        return _tcp_end(cfg, what)
    raise ConsoleError(f"{what}: unknown host end {cfg.kind!r}")


def _has_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _check_fd(fd: int, what: str) -> None:
    try:
        os.fstat(fd)
    except OSError as e:
        raise ConsoleError(f"{what}: fd {fd}: {e.strerror}") from e


def _unix_end(cfg: SerialConfig, what: str) -> SocketEnd:
    if cfg.fd is not None:
        # libvirt bound and listens already; the descriptor is ours now
        _check_fd(cfg.fd, what)
        try:
            sock = socket.socket(fileno=cfg.fd)
        except OSError as e:
            raise ConsoleError(f"{what}: fd {cfg.fd}: {e.strerror}") from e
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ConsoleError(f"{what}: fd {cfg.fd} is not a unix stream socket")
        sock.setblocking(False)
        sock.set_inheritable(False)
        if not cfg.server:
            return SocketEnd(None, sock, f"unix:fd:{cfg.fd}")
        return SocketEnd(sock, None, f"disconnected:unix:fd:{cfg.fd},server=on")
    path = cfg.path
    if not path:
        raise ConsoleError(f"{what}: a unix socket needs a path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if cfg.server:
            if os.path.exists(path) and _is_socket(path):
                os.unlink(path)  # a stale socket of an earlier run, as QEMU does
            sock.bind(path)
            sock.listen(1)
        else:
            sock.connect(path)
    except OSError as e:
        sock.close()
        verb = "listen on" if cfg.server else "connect to"
        raise ConsoleError(f"{what}: cannot {verb} {path}: {e.strerror}") from e
    sock.setblocking(False)
    if cfg.server:
        end = SocketEnd(sock, None, f"disconnected:unix:{path},server=on")
        end.bound_path = path
        return end
    return SocketEnd(None, sock, f"unix:{path}")


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _tcp_end(cfg: SerialConfig, what: str) -> SocketEnd:
    assert cfg.port is not None
    host = cfg.host or ("0.0.0.0" if cfg.server else "localhost")
    try:
        if cfg.server:
            sock = socket.create_server((host, cfg.port), backlog=1)
        else:
            sock = socket.create_connection((host, cfg.port), timeout=5)
    except OSError as e:
        verb = "listen on" if cfg.server else "connect to"
        raise ConsoleError(f"{what}: cannot {verb} {host}:{cfg.port}: "
                           f"{e.strerror or e}") from e
    sock.setblocking(False)
    sock.set_inheritable(False)
    where = f"tcp:{host}:{sock.getsockname()[1] if cfg.server else cfg.port}"
    if cfg.server:
        return SocketEnd(sock, None, f"disconnected:{where},server=on")
    return SocketEnd(None, sock, where)

