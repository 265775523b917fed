"""The socket side of vhost-user: a unix stream socket with SCM_RIGHTS, nothing more.

:class:`Connection` wraps a connected, non-blocking socket and a
:class:`~pyhv.engine.vhost_user.message.Decoder`.  :meth:`Connection.read` is
called when the socket is readable: it reads at most what the decoder wants (the
rest of one header or one payload, so descriptors are never attributed to the
wrong message) with at most :data:`MAX_FDS` descriptors, and returns the messages
now complete.  A truncated control message (more descriptors than that) is a
protocol error.  Replies are tiny; one the socket cannot take at once means a
frontend that does not read its replies, and ends the connection.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Sequence

from pyhv.engine.vhost_user.message import (
    MAX_FDS,
    Decoder,
    Message,
    ProtocolError,
)

#: reads per readable event before yielding to the loop (bounded work per wakeup)
READS_PER_EVENT = 64


class Disconnected(Exception):
    """The peer hung up (``clean``: between two messages)."""

    def __init__(self, clean: bool) -> None:
        super().__init__("the peer hung up" + ("" if clean else " in the middle of a message"))
        self.clean = clean


class Connection:
    def __init__(self, sock: socket.socket, max_payload: Optional[int] = None) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = Decoder() if max_payload is None else Decoder(max_payload)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Message]:
        """The messages completed by what the socket holds now.  Raises
        :class:`Disconnected` at end of file, :class:`ProtocolError` on bad input."""
        out: list[Message] = []
        for _ in range(READS_PER_EVENT):
            want = self.decoder.wanted()
            try:
                data, fds, flags, _addr = socket.recv_fds(self.sock, want, MAX_FDS,
                                                          socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError as e:
                raise Disconnected(self.decoder.idle) from e
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                self.decoder.close()
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            if not data:
                for fd in fds:
                    os.close(fd)
                raise Disconnected(self.decoder.idle)
            self.decoder.receive(data, fds)
            while (m := self.decoder.next_message()) is not None:
                out.append(m)
        return out

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message (with ``fds``); :class:`ProtocolError` when the
        socket cannot take it now."""
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
            else:
                sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError) as e:
            raise ProtocolError("the frontend does not read its replies") from e
        except OSError as e:
            raise Disconnected(False) from e
        if sent != len(data):
            raise ProtocolError("the frontend does not read its replies")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.decoder.close()
        self.sock.close()
