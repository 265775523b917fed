"""The socket layer of ``pyhv 9p-serve``: one thread, one selector, several clients.

Each accepted client gets its own :class:`~pyhv.engine.p9.server.Session`
(fids are per connection, as for Linux's ``trans=tcp``/``trans=unix``).
Buffers are bounded: a client is read only while its session holds less than
one msize of input and less than :data:`OUTPUT_HIGH` bytes of replies wait for
it, so a client that sends without reading stalls itself, not the server.  A
client that breaks the protocol is disconnected with one log line; the others
go on.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import sys
from dataclasses import dataclass, field
from typing import Callable, Final, Optional, Sequence, Union

from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.server import DEFAULT_MAX_FIDS, Export, Log, Session
from pyhv.engine.signals import signal_pipe

OUTPUT_HIGH: Final = 1 << 20
DEFAULT_MAX_CLIENTS: Final = 64


def _stderr(message: str) -> None:
    print(f"pyhv: 9p-serve: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ListenAddress:
    family: int
    #: (host, port) for TCP, a path for unix
    address: Union[tuple[str, int], str]


def parse_listen(spec: str) -> ListenAddress:
    """``tcp:HOST:PORT`` or ``unix:PATH``; raises P9Error naming the option."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return ListenAddress(socket.AF_UNIX, rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and int(port) <= 0xFFFF:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return ListenAddress(family, (host, int(port)))
    raise p.P9Error(f"--listen {spec}: expected tcp:HOST:PORT or unix:PATH")


@dataclass
class _Client:
    sock: socket.socket
    session: Session
    name: str
    out: bytearray = field(default_factory=bytearray)
    events: int = 0


class Server:
    """Listens on one address and serves ``export`` to every client."""

    def __init__(self, export: Export, listen: ListenAddress,
                 max_msize: int = p.DEFAULT_MAX_MSIZE, max_fids: int = DEFAULT_MAX_FIDS,
                 max_clients: int = DEFAULT_MAX_CLIENTS, log: Log = _stderr) -> None:
        self.export = export
        self.listen = listen
        self.max_msize = max_msize
        self.max_fids = max_fids
        self.max_clients = max_clients
        self.log = log
        self._check_root()
        self._sel = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._listener = self._bind()
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._stop_fds: list[int] = []

    def _check_root(self) -> None:
        check_export(self.export)

    def _bind(self) -> socket.socket:
        la = self.listen
        sock = socket.socket(la.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if la.family == socket.AF_UNIX:
                assert isinstance(la.address, str)
                try:
                    if stat.S_ISSOCK(os.lstat(la.address).st_mode):
                        os.unlink(la.address)  # a stale socket of an earlier server
                except FileNotFoundError:
                    pass
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(la.address)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise p.P9Error(f"--listen {self.describe()}: {e.strerror}") from e
        return sock

    def describe(self) -> str:
        """The listening address as ``--listen`` spells it (the real port once bound)."""
        la = self.listen
        if la.family == socket.AF_UNIX:
            return f"unix:{la.address}"
        assert isinstance(la.address, tuple)
        host, port = la.address
        if getattr(self, "_listener", None) is not None:
            port = self._listener.getsockname()[1]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    def add_stop_fd(self, fd: int) -> None:
        """Readable ``fd`` ends :meth:`serve_forever` (a signal wake-up pipe)."""
        self._stop_fds.append(fd)
        self._sel.register(fd, selectors.EVENT_READ, "stop")

    def serve_forever(self) -> None:
        while True:
            for key, mask in self._sel.select():
                if key.data == "stop":
                    return
                if key.data is None:
                    self._accept()
                else:
                    self._service(key.data, mask)

    def serve_once(self, timeout: float) -> None:
        """One round of the loop (tests)."""
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data != "stop":
                self._service(key.data, mask)

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.log(f"accept: {e.strerror}")
            return
        name = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix client"
        if len(self._clients) >= self.max_clients:
            self.log(f"{name}: refused, {self.max_clients} clients already connected")
            sock.close()
            return
        try:
            session = Session(self.export, self.max_msize, self.max_fids,
                              log=lambda m: self.log(f"{name}: {m}"))
        except (OSError, p.P9Error) as e:
            self.log(f"{name}: {e}")
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, session, name)
        self._clients[sock.fileno()] = client
        self._sel.register(sock, selectors.EVENT_READ, client)
        client.events = selectors.EVENT_READ

    def _service(self, client: _Client, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and client.out:
                try:
                    n = client.sock.send(client.out)
                    del client.out[:n]
                except (BlockingIOError, InterruptedError):
                    pass
            if mask & selectors.EVENT_READ and client.session.wants_data \
                    and len(client.out) < OUTPUT_HIGH:
                try:
                    data = client.sock.recv(min(65536, client.session.conn.max_msize))
                except (BlockingIOError, InterruptedError):
                    data = None
                if data is not None:
                    client.session.receive_data(data)
            if len(client.out) < OUTPUT_HIGH:
                client.out += client.session.pending_output(OUTPUT_HIGH - len(client.out))
        except p.RemoteProtocolError as e:
            self.log(f"{client.name}: disconnected: {e}")
            self._drop(client)
            return
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                self.log(f"{client.name}: {e.strerror}")
            self._drop(client)
            return
        except Exception as e:  # a bug serving one client must not end the others
            self.log(f"{client.name}: disconnected on internal error: "
                     f"{type(e).__name__}: {e}")
            self._drop(client)
            return
        if client.session.closed and not client.out:
            self._drop(client)
            return
        want = 0
        if client.out:
            want |= selectors.EVENT_WRITE
        if client.session.wants_data and len(client.out) < OUTPUT_HIGH:
            want |= selectors.EVENT_READ
        if want == 0:
            # neither side can move: input is buffered, output is full; wait to write
            want = selectors.EVENT_WRITE if client.out else selectors.EVENT_READ
        if want != client.events:
            self._sel.modify(client.sock, want, client)
            client.events = want

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            self._sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.session.close()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        for fd in self._stop_fds:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._sel.unregister(self._listener)
        self._listener.close()
        self._sel.close()
        if self.listen.family == socket.AF_UNIX:
            assert isinstance(self.listen.address, str)
            try:
                os.unlink(self.listen.address)
            except OSError:
                pass


def check_export(export: Export, upper: bool = True) -> None:
    """Every directory of ``export`` exists and is one; P9Error naming the option
    (``upper``: the top layer was given as ``--upper``)."""
    upper = upper and bool(export.lower)
    for i, tree in enumerate(export.layers):
        option = "--upper" if upper and i == 0 else "--root"
        try:
            st = os.stat(tree)
        except OSError as e:
            raise p.P9Error(f"{option} {tree}: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise p.P9Error(f"{option} {tree}: not a directory")
    if len({os.path.realpath(t) for t in export.layers}) != len(export.layers):
        raise p.P9Error("--root/--upper: a directory is given twice")
    if upper:
        top = os.path.realpath(export.root)
        for tree in export.lower:
            real = os.path.realpath(tree)
            if top.startswith(real + "/") or real.startswith(top + "/"):
                raise p.P9Error(f"--upper {export.root}: nested with --root {tree}")


def run(root: Union[str, Sequence[str]], listen: str, readonly: bool, security_model: str,
        announce: Optional[Callable[[str], None]] = None, upper: Optional[str] = None) -> int:
    """``pyhv 9p-serve``: serve until SIGINT or SIGTERM; exit status 0.

    ``root`` is one tree or several (combined as :meth:`Export.combine`, with
    ``upper`` the writable top layer)."""
    import signal

    trees = [root] if isinstance(root, str) else list(root)
    export = Export.combine(trees, upper, readonly=readonly, security_model=security_model)
    check_export(export, upper is not None)
    max_fids = DEFAULT_MAX_FIDS
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        if soft != resource.RLIM_INFINITY:
            # each fid holds up to two descriptors; leave room for the clients
            max_fids = max(16, min(DEFAULT_MAX_FIDS, (soft - 256) // 2))
    except (ImportError, ValueError, OSError):
        pass
    server = Server(export, parse_listen(listen), max_fids=max_fids)
    with signal_pipe(signal.SIGINT, signal.SIGTERM) as sig:
        try:
            server.add_stop_fd(sig.fd)
            mode = f"{security_model}{', read-only' if readonly else ''}"
            what = " + ".join(trees) + (f" under {upper}" if upper else "")
            (announce or _stderr)(f"serving {what} ({mode}) on {server.describe()}")
            server.serve_forever()
            if sig.caught:
                _stderr(f"terminating on signal {sig.caught[0]}")
        finally:
            server.close()
    return 0
