"""The host end of the guest's serial port: where output goes, where input comes from.

The UART register model knows nothing of files; this module opens what the
configuration names (stdout/stdin, a file, a pseudo-terminal, nothing, or an
inherited descriptor) and hands the model a writer.  A pty whose reader has
gone away, or is too slow, loses output rather than stalling a vCPU, as with
QEMU; stdout and files take every byte.
"""

from __future__ import annotations

import errno
import fcntl
import os
import termios
import tty
from typing import TYPE_CHECKING, Callable, Optional, Union

from pyhv.config import SerialConfig
from pyhv.engine.errors import EngineError
from pyhv.engine.fds import close_fds

if TYPE_CHECKING:
    from pyhv.engine.eventloop import EventLoop


class ConsoleError(EngineError):
    """The serial backend could not be opened."""


class FdWriter:
    """Writes guest output to a file descriptor."""

    def __init__(self, fd: int, drop_when_full: bool = False) -> None:
        self.fd = fd
        self.drop_when_full = drop_when_full

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                if self.drop_when_full:
                    return
                raise
            except OSError as e:
                if e.errno in (errno.EIO, errno.EPIPE):
                    return  # reader gone: output is lost, the guest keeps running
                raise
            view = view[n:]

    def flush(self) -> None:
        return None


class TeeWriter:
    """Guest output to a log first (every byte), then to the backend."""

    def __init__(self, log: FdWriter, backend: "Writer") -> None:
        self.log = log
        self.backend = backend

    def write(self, data: bytes) -> None:
        self.log.write(data)
        self.backend.write(data)

    def flush(self) -> None:
        return None


class NullWriter:
    def write(self, data: bytes) -> None:
        return None

    def flush(self) -> None:
        return None


Writer = Union[FdWriter, NullWriter, TeeWriter]


class HostSerial:
    """An opened serial backend."""

    def __init__(self, writer: Writer, input_fd: Optional[int] = None,
                 pty_path: Optional[str] = None, owned: tuple[int, ...] = ()) -> None:
        self.writer = writer
        self.input_fd = input_fd
        self.pty_path = pty_path
        self._owned = owned

    def close(self) -> None:
        close_fds(self._owned)
        self._owned = ()


def open_output_file(path: str, append: bool, what: str) -> int:
    """Open (create) a file for guest output without ever blocking in open().

    A FIFO with no reader is refused rather than waited for (signals must keep
    working during start-up); the descriptor is blocking once open, so a slow
    reader of a FIFO slows the guest instead of losing output, like a file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= os.O_APPEND if append else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        reason = "a FIFO with no reader" if e.errno == errno.ENXIO else e.strerror
        raise ConsoleError(f"{path}: cannot open {what}: {reason}") from e
    os.set_blocking(fd, True)
    return fd


def open_pty() -> tuple[int, int, str]:
    """A raw pseudo-terminal for guest I/O: (master, non-blocking; slave; the slave's
    path, what ``virsh console`` opens); neither end is inherited by children."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    for fd in (master, slave):
        os.set_inheritable(fd, False)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def open_serial(cfg: SerialConfig) -> HostSerial:
    """Open the backend ``cfg`` names, and its log when it has one."""
    log_fd = _open_log(cfg)
    try:
        hs = _open_backend(cfg)
    except BaseException:
        if log_fd is not None:
            os.close(log_fd)
        raise
    if log_fd is not None:
        hs.writer = TeeWriter(FdWriter(log_fd), hs.writer)
        hs._owned += (log_fd,)
    return hs


def _open_log(cfg: SerialConfig) -> Optional[int]:
    if cfg.log_path is not None:
        return open_output_file(cfg.log_path, cfg.log_append, "serial log")
    if cfg.log_fd is not None:
        try:
            os.fstat(cfg.log_fd)
        except OSError as e:
            raise ConsoleError(f"serial log fd {cfg.log_fd}: {e.strerror}") from e
        if cfg.log_append:
            flags = fcntl.fcntl(cfg.log_fd, fcntl.F_GETFL)
            fcntl.fcntl(cfg.log_fd, fcntl.F_SETFL, flags | os.O_APPEND)
        return cfg.log_fd
    return None


def _open_backend(cfg: SerialConfig) -> HostSerial:
    if cfg.kind == "stdio":
        try:
            stdin_ok = os.isatty(0) or os.fstat(0) is not None
        except OSError:
            stdin_ok = False
        return HostSerial(FdWriter(1), 0 if stdin_ok else None)
    if cfg.kind == "null":
        return HostSerial(NullWriter())
    if cfg.kind == "file":
        assert cfg.path is not None
        fd = open_output_file(cfg.path, cfg.append, "serial output")
        return HostSerial(FdWriter(fd), owned=(fd,))
    if cfg.kind == "fd":
        assert cfg.fd is not None
        try:
            os.fstat(cfg.fd)
        except OSError as e:
            raise ConsoleError(f"serial fd {cfg.fd}: {e.strerror}") from e
        return HostSerial(FdWriter(cfg.fd), owned=(cfg.fd,))
    if cfg.kind == "pty":
        master, slave, path = open_pty()
        # keeping the slave open means the master never sees a hang-up
        return HostSerial(FdWriter(master, drop_when_full=True), master, path,
                          owned=(master, slave))
    raise ConsoleError(f"serial: unknown backend {cfg.kind!r}")


class SerialInputPump:
    """Host input (stdin, a pty's master) into the guest's UART, with flow control.

    Reads while the UART takes bytes; when its FIFO is full the pump stops
    reading (the host side's own buffer holds the rest, as a terminal's does)
    until :meth:`space` says the guest drained it.  End of input stops it.
    """

    CHUNK = 4096

    def __init__(self, loop: "EventLoop", fd: int, offer: Callable[[bytes], int]) -> None:
        self.loop = loop
        self.fd = fd
        self.offer = offer
        self.pending = b""
        self.ended = False

    def start(self) -> bool:
        """Start reading; False when the fd cannot be watched (a regular file)."""
        try:
            self.loop.add_reader(self.fd, self._readable, "serial input")
        except (OSError, ValueError):
            return False
        return True

    def stop(self) -> None:
        self.loop.remove_reader(self.fd)
        self.ended = True

    def space(self) -> None:
        """The UART can take more: hand over what waits, then read again."""
        if self.pending:
            n = self.offer(self.pending)
            self.pending = self.pending[n:]
        if not self.pending and not self.ended and not self.loop.watching(self.fd):
            self.start()

    def _readable(self, fd: int) -> None:
        try:
            data = os.read(fd, self.CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: a pty whose other side closed for now
        if not data:
            if os.isatty(fd):  # nobody on the terminal's other side for now: look later
                self.loop.remove_reader(fd)
                self.loop.call_later(0.25, self.space, "serial input retry")
            else:
                self.stop()  # end of input
            return
        n = self.offer(data)
        if n < len(data):  # the FIFO is full: wait for space before reading more
            self.pending = data[n:]
            self.loop.remove_reader(fd)
