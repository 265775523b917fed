"""virtio-9p: a host directory for the guest's ``mount -t 9p -o trans=virtio TAG``.

The transport of 9P over virtio (Linux's ``9pnet_virtio``) is one request queue:
each chain holds one T-message in its device-readable buffers and room for the
R-message in its device-writable ones.  Large reads and writes keep their
payload in separate buffers (the driver's zero-copy path), which changes
nothing here: both directions are read and written as one byte stream across
the chain's buffers.  The device configuration is the mount tag (feature
MOUNT_TAG: ``tag_len`` then the tag's bytes).

The 9P2000.L server is :mod:`pyhv.engine.p9` (a :class:`~pyhv.engine.p9.server.Session`
per device: msize negotiation, fids, confinement beneath the export root, the
access modes); this module only moves messages.  A chain whose readable bytes
are not exactly one message (the size field lies) is returned empty; a request
the protocol cannot take (a reused tag, a size past msize) breaks the session,
and the device asks for a reset (NEEDS_RESET), after which a new session starts.
Requests are answered in order on the engine's loop.
"""

from __future__ import annotations

import struct
from typing import Optional

from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.server import Export, Session
from pyhv.engine.virtio.device import TYPE_9P, VirtioDevice
from pyhv.engine.virtio.queue import ChainError, DescriptorChain, QueueError

F_MOUNT_TAG = 1 << 0

#: the largest message the device takes (the msize it offers the driver)
MAX_MSIZE = 512 * 1024
QUEUE_SIZE = 128


class Virtio9p(VirtioDevice):
    device_type = TYPE_9P
    queue_sizes = (QUEUE_SIZE,)
    features = F_MOUNT_TAG
    kind = "virtio-9p"

    def __init__(self, export: Export, tag: str, max_msize: int = MAX_MSIZE) -> None:
        super().__init__()
        self.export = export
        self.tag = tag.encode(errors="surrogateescape")
        if not 0 < len(self.tag) <= 255:
            raise ValueError("a mount tag is 1-255 bytes")
        self.max_msize = max_msize
        self._session: Optional[Session] = None
        #: requests answered, and those that failed before reaching the server
        self.answered = 0
        self.refused = 0

    def config_bytes(self) -> bytes:
        return struct.pack("<H", len(self.tag)) + self.tag

    def _server(self) -> Session:
        if self._session is None:
            self._session = Session(self.export, self.max_msize)
        return self._session

    def queue_notify(self, index: int) -> None:
        assert self.memory is not None and self.interrupts is not None
        q = self.queues[0]
        while (chain := q.pop_valid(self.memory)) is not None:
            q.add_used(self.memory, chain.head, self._serve(chain))
        if q.needs_notification(self.memory):
            self.interrupts.queue(0)

    def _serve(self, chain: DescriptorChain) -> int:
        """Answer one request; the bytes written."""
        r, w = chain.reader(), chain.writer()
        try:
            head = r.read(min(r.available, 4))
        except ChainError:
            head = b""
        size = struct.unpack("<I", head)[0] if len(head) == 4 else 0
        if size != r.available + 4 or size > self.max_msize:
            self.refused += 1  # not exactly one message: this request fails alone
            return 0
        try:
            request = head + r.read(size - 4)
        except ChainError:
            self.refused += 1
            return 0
        session = self._server()
        try:
            session.receive_data(request)
            reply = session.pending_output(limit=self.max_msize)
        except p.P9Error as e:
            raise QueueError(f"9P: {e}") from e  # the session is broken: NEEDS_RESET
        if len(reply) > w.available:
            self.refused += 1  # no room for the answer (a driver bug): nothing written
            return 0
        try:
            w.write(reply)
        except ChainError:
            self.refused += 1
            return 0
        self.answered += 1
        return w.written

    def reset(self) -> None:
        super().reset()
        if self._session is not None:
            self._session.close()  # every fid the guest held is released
            self._session = None

    def close(self) -> None:
        self.reset()
