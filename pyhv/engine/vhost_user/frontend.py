"""pyhv as a vhost-user frontend: a guest's virtio device served by another process.

:class:`VhostUserClient` is the socket: connect (or accept, when pyhv listens),
send a request with its descriptors, read a reply with bounded sizes, all with
a timeout, so a backend that stalls or hangs up costs one error, not a stuck
VMM.  :class:`VhostUserDevice` is the :class:`VirtioDevice` the transport sees:
its features and configuration space come from the backend (GET_FEATURES,
GET_PROTOCOL_FEATURES, GET_CONFIG); at DRIVER_OK it hands the backend the guest
memory (SET_MEM_TABLE with the memfd regions), each ready ring (NUM, ADDR, BASE,
KICK = the queue's notify eventfd that KVM signals, CALL = an eventfd pyhv turns
into the queue's interrupt) and enables the rings.  A reset stops the rings
(GET_VRING_BASE).  pyhv never touches the rings itself: the engine does not
watch the notify eventfds of these devices.

A vhost-user-blk backend that offers INFLIGHT_SHMFD gets an inflight region at
DRIVER_OK (GET_INFLIGHT_FD, then SET_INFLIGHT_FD), in which it marks the requests
it took until it completes them.  When the backend goes away, with ``reconnect``
seconds (libvirt's ``<reconnect enabled='yes' timeout='N'/>``) and such a region,
the rings are suspended, not failed: pyhv tries the socket every N seconds and
resumes a running device on the backend that answers (the region handed back,
each ring at its used index, kicked once), which runs again what the dead one
held; the guest sees a pause.  Otherwise the device reports NEEDS_RESET (the
guest's driver resets it), pyhv tries the socket again on every reset and every
N seconds, and the next DRIVER_OK runs on the new backend.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, Optional, Sequence

from pyhv.engine.errors import EngineError
from pyhv.engine.fds import close_fds
from pyhv.engine.memory import GuestMemory
from pyhv.engine.vhost_user.message import (
    F_PROTOCOL_FEATURES,
    HEADER,
    INFLIGHT,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD,
    PF_CONFIG,
    PF_INFLIGHT_SHMFD,
    PF_MQ,
    PF_REPLY_ACK,
    U64,
    VRING_STATE,
    Body,
    ConfigSpace,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Request,
    VringAddr,
    VringState,
    decode_reply,
    encode,
)
from pyhv.engine.virtio.calls import CallFds
from pyhv.engine.virtio.device import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    Interrupts,
    VirtioDevice,
)
from pyhv.engine.virtio.queue import SplitQueue, VirtioError

#: protocol features pyhv's frontend uses
OUR_PROTOCOL = PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD
#: a reply slower than this means the backend is stuck
REPLY_TIMEOUT = 10.0
#: user addresses pyhv gives the backend: guest address + this (any consistent
#: mapping will do: the backend only translates ring addresses with it)
USER_BASE = 0x7E00_0000_0000
#: the transport's own features; the backend must have them for the driver to see them
RING_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX


class VhostUserFrontendError(EngineError):
    """The backend cannot be reached, or broke the protocol."""


class VhostUserClient:
    """One connection to a backend; requests are synchronous, as QEMU's are."""

    def __init__(self, path: str, what: str, server: bool = False,
                 timeout: float = REPLY_TIMEOUT) -> None:
        self.path, self.what, self.server, self.timeout = path, what, server, timeout
        self.sock: Optional[socket.socket] = None
        self.listener: Optional[socket.socket] = None
        #: held for a request and its reply (the hang-up check must not read a reply)
        self.lock = threading.Lock()
        #: SET_OWNER sent on this connection (a device rebuilt by a guest reset
        #: reuses the connection)
        self.owned = False
        if server:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(path) and not os.path.isdir(path):
                    os.unlink(path)
                self.listener.bind(path)
                self.listener.listen(1)
            except OSError as e:
                self.listener.close()
                raise VhostUserFrontendError(f"{what}: cannot listen on {path}: "
                                             f"{e.strerror}") from e

    def connect(self, wait: float = 0.0) -> None:
        """Connect (or accept the backend, when listening), trying for ``wait``
        seconds; :class:`VhostUserFrontendError` when nobody answers."""
        from pyhv.engine import signals

        self.close_connection()
        deadline = time.monotonic() + wait
        while True:
            signum = signals.pending()
            if signum is not None:
                err = VhostUserFrontendError(f"{self.what}: signal {signum} while waiting "
                                             f"for the vhost-user backend at {self.path}")
                err.exit_status = 128 + signum  # as if the signal had ended the process
                raise err
            try:
                if self.listener is not None:
                    # in slices, so that a signal ends the wait at once
                    left = deadline - time.monotonic()
                    self.listener.settimeout(min(0.1, left) if left > 0 else 0.0)
                    self.sock, _ = self.listener.accept()
                else:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                    try:
                        s.connect(self.path)
                    except OSError:
                        s.close()
                        raise
                    self.sock = s
                self.sock.settimeout(self.timeout)
                return
            except (BlockingIOError, socket.timeout, OSError) as e:
                if time.monotonic() >= deadline:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else \
                        "no backend connected"
                    raise VhostUserFrontendError(f"{self.what}: cannot connect to the "
                                                 f"vhost-user backend at {self.path}: "
                                                 f"{why}") from e
                time.sleep(0.05)

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def request(self, request: Request, body: Body = None, fds: Sequence[int] = (),
                reply: bool = False, ack: bool = False) -> bytes:
        """Send one request; return the reply's payload when ``reply`` (or when
        ``ack``: REPLY_ACK asked, a non-zero status is an error)."""
        if self.sock is None:
            raise VhostUserFrontendError(f"{self.what}: the vhost-user backend is not "
                                         f"connected")
        data = encode(request, body, need_reply=ack)
        with self.lock:
            return self._request(request, data, fds, reply, ack)

    def hung_up(self) -> bool:
        """Whether the backend closed the connection (checked between requests: a
        backend sends nothing unasked, so pending bytes mean a broken one too)."""
        if self.sock is None:
            return True
        if not self.lock.acquire(blocking=False):
            return False  # a request is in flight: it will find out itself
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
            if not poller.poll(0):
                return False
            self.close_connection()
            return True
        finally:
            self.lock.release()

    def _request(self, request: Request, data: bytes, fds: Sequence[int], reply: bool,
                 ack: bool) -> bytes:
        assert self.sock is not None
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
            if not (reply or ack):
                return b""
            head = self._exactly(HEADER.size)
            req, _flags, size = HEADER.unpack(head)
            if size > MAX_PAYLOAD:
                raise VhostUserFrontendError(f"{self.what}: reply of {size} bytes to "
                                             f"{request.name}")
            got, _flags, payload = decode_reply(head + self._exactly(size))
        except (OSError, EOFError) as e:
            self.close_connection()
            raise VhostUserFrontendError(f"{self.what}: the vhost-user backend at "
                                         f"{self.path} went away ({request.name}: "
                                         f"{e})") from e
        except EngineError as e:
            self.close_connection()
            raise VhostUserFrontendError(f"{self.what}: {e}") from e
        if got != request:
            self.close_connection()
            raise VhostUserFrontendError(f"{self.what}: reply to {got} for {request.name}")
        if ack and not reply and (len(payload) != 8 or U64.unpack(payload)[0]):
            raise VhostUserFrontendError(f"{self.what}: the backend refused {request.name}")
        return payload

    def _exactly(self, n: int) -> bytes:
        assert self.sock is not None
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf

    def request_fd(self, request: Request, body: Body) -> tuple[bytes, int]:
        """A request whose reply carries one descriptor (GET_INFLIGHT_FD): the
        payload and the descriptor, now the caller's."""
        if self.sock is None:
            raise VhostUserFrontendError(f"{self.what}: the vhost-user backend is not "
                                         f"connected")
        with self.lock:
            fds: list[int] = []
            try:
                self.sock.sendall(encode(request, body))
                head, fds, _flags, _addr = socket.recv_fds(self.sock, HEADER.size, 4)
                if not head:
                    raise EOFError("connection closed")
                head += self._exactly(HEADER.size - len(head))
                req, _f, size = HEADER.unpack(head)
                if size > MAX_PAYLOAD:
                    raise VhostUserFrontendError(f"{self.what}: reply of {size} bytes to "
                                                 f"{request.name}")
                got, _f, payload = decode_reply(head + self._exactly(size))
                if got != request or len(fds) != 1:
                    raise VhostUserFrontendError(f"{self.what}: {request.name} reply with "
                                                 f"{len(fds)} descriptors")
            except (OSError, EOFError, EngineError) as e:
                close_fds(fds)
                self.close_connection()
                if isinstance(e, VhostUserFrontendError):
                    raise
                raise VhostUserFrontendError(f"{self.what}: {request.name}: {e}") from e
            return payload, fds[0]

    def u64(self, request: Request) -> int:
        payload = self.request(request, reply=True)
        if len(payload) != 8:
            raise VhostUserFrontendError(f"{self.what}: {request.name} reply of "
                                         f"{len(payload)} bytes")
        return int(U64.unpack(payload)[0])

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def close_connection(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.owned = False

    def close(self) -> None:
        self.close_connection()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


class VhostUserDevice(VirtioDevice):
    """A virtio device whose queues another process serves."""

    def __init__(self, client: Optional[VhostUserClient], device_type: int, kind: str,
                 queues: int, queue_size: int, device_features: int,
                 config_size: int = 0, reconnect: Optional[int] = None) -> None:
        super().__init__()
        self.client = client
        self.device_type = device_type
        self.kind = kind
        #: the feature bits the device may offer (the backend's, within these)
        self.device_features = device_features
        self.config_size = min(config_size, MAX_CONFIG_SIZE)
        self.reconnect = reconnect
        #: what GET_QUEUE_NUM must reach (queues; queue pairs for a NIC)
        self.wanted_queues = queues
        self.queue_size = queue_size
        self.queue_sizes = (queue_size,) * queues
        #: queues pyhv serves itself (a NIC's control queue); the engine watches them
        self.local_queues: frozenset[int] = frozenset()
        self.features = 0
        self.offer_mask = ~0
        self._config = bytes(self.config_size)
        self.protocol = 0
        #: set by the engine: the transport's notify eventfds (the rings' kicks)
        self.kick_fds: Sequence[int] = ()
        #: the backend's used-buffer signals (one eventfd per queue)
        self.calls = CallFds(kind)
        self._started: list[int] = []
        self._loop: Any = None
        self.broken: Optional[str] = None
        self._last_try = 0.0
        #: requests the backend held can be resumed by the next one (virtio-blk: a
        #: request runs again; a NIC's frames may not be sent twice)
        self.inflight_ok = device_type == 2
        #: the inflight region the backend keeps the requests it took in (a
        #: vhost-user-blk backend that offers it): (its description, the memfd)
        self._inflight: Optional[tuple[Inflight, int]] = None
        #: the backend went away while the rings ran; they resume on the next one
        self.suspended = False
        if client is not None and client.connected:
            self._handshake()

    # ---- connection ----------------------------------------------------------------
    def _handshake(self) -> None:
        """SET_OWNER and what the device offers: features, queues, configuration."""
        c = self.client
        assert c is not None
        if not c.owned:
            c.request(Request.SET_OWNER)
            c.owned = True
        backend = c.u64(Request.GET_FEATURES)
        self.backend_features = backend
        self.protocol = 0
        if backend & F_PROTOCOL_FEATURES:
            self.protocol = c.u64(Request.GET_PROTOCOL_FEATURES) & OUR_PROTOCOL
            c.request(Request.SET_PROTOCOL_FEATURES, self.protocol)
        if self.protocol & PF_MQ:
            n = c.u64(Request.GET_QUEUE_NUM)
            if n < self.wanted_queues:
                raise VhostUserFrontendError(f"{c.what}: the backend serves {n} queues, "
                                             f"{self.wanted_queues} wanted")
        elif self.wanted_queues > 1:
            raise VhostUserFrontendError(f"{c.what}: {self.wanted_queues} queues need a "
                                         f"backend with the MQ protocol feature")
        self.features = self.offered_features(backend)
        # the transport offers its ring features only where the backend has them
        self.offer_mask = ~(RING_FEATURES & ~backend)
        if self.config_size and self.protocol & PF_CONFIG:
            self._config = self._get_config()
        self.broken = None

    def offered_features(self, backend: int) -> int:
        """The device features the guest is offered, given the backend's."""
        return backend & self.device_features

    def _get_config(self) -> bytes:
        assert self.client is not None
        body = ConfigSpace(0, self.config_size, 0, bytes(self.config_size))
        payload = self.client.request(Request.GET_CONFIG, body, reply=True)
        if len(payload) != 12 + self.config_size:
            raise VhostUserFrontendError(f"{self.client.what}: GET_CONFIG reply of "
                                         f"{len(payload)} bytes")
        return payload[12:]

    def try_reconnect(self) -> bool:
        """One attempt at the socket (after the backend went away)."""
        c = self.client
        if c is None or c.connected:
            return c is not None
        self._last_try = time.monotonic()
        try:
            c.connect()
            self._handshake()
        except VhostUserFrontendError as e:
            c.close_connection()
            self.broken = str(e)
            return False
        return True

    def _resume(self) -> None:
        """The rings of a running device on the backend that came back (the loop)."""
        c, memory = self.client, self.memory
        self.suspended = False
        if c is None or memory is None:
            return
        try:
            self._start_rings(c, memory, self.queues, self.acked_features, resume=True)
        except VhostUserFrontendError as e:
            self._lost(str(e))

    def _lost(self, why: str) -> None:
        if self.client is not None:
            self.client.close_connection()
        self.broken = why
        raise VirtioError(why)

    # ---- the virtio device -------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self._config

    def write_config(self, offset: int, data: bytes) -> None:
        c = self.client
        if c is None or not c.connected or not self.protocol & PF_CONFIG:
            return
        if offset + len(data) > self.config_size:
            return
        try:
            c.request(Request.SET_CONFIG, ConfigSpace(offset, len(data), 0, data))
            self._config = self._get_config()
        except VhostUserFrontendError as e:
            self._lost(str(e))

    def activate(self, memory: GuestMemory, queues: list[SplitQueue],
                 interrupts: Interrupts, features: int) -> None:
        super().activate(memory, queues, interrupts, features)
        c = self.client
        if c is None or not c.connected:
            if not self.try_reconnect():
                raise VirtioError(self.broken or "the vhost-user backend is not connected")
        assert c is not None
        try:
            self._start_rings(c, memory, queues, features, resume=False)
        except VhostUserFrontendError as e:
            self._lost(str(e))

    def _start_rings(self, c: VhostUserClient, memory: GuestMemory,
                     queues: list[SplitQueue], features: int, resume: bool) -> None:
        """Features, memory, inflight region and each ready ring to the backend; on
        ``resume`` (a new backend after one went away) each ring starts at the used
        index, the inflight region tells the backend what the last one held, and
        every ring is kicked once (requests made meanwhile)."""
        extra = F_PROTOCOL_FEATURES if self.backend_features & F_PROTOCOL_FEATURES else 0
        # the backend gets the features it offered (not those pyhv itself serves)
        c.request(Request.SET_FEATURES, (features & self.backend_features) | extra)
        c.request(Request.SET_MEM_TABLE, MemoryTable(tuple(self._regions(memory))),
                  fds=[r.fd for r in memory.regions], ack=bool(self.protocol & PF_REPLY_ACK))
        if self.inflight_ok and self.protocol & PF_INFLIGHT_SHMFD:
            if self._inflight is None:
                payload, fd = c.request_fd(Request.GET_INFLIGHT_FD, Inflight(
                    0, 0, len(self.queue_sizes), self.queue_size))
                info = Inflight(*INFLIGHT.unpack(payload[:INFLIGHT.size]))
                self._inflight = (info, fd)
            info, fd = self._inflight
            c.request(Request.SET_INFLIGHT_FD, info, fds=[fd])
        for i, q in enumerate(queues):
            if not q.ready or i in self.local_queues:
                continue
            base = memory.read_u16(q.used_addr + 2) if resume else 0
            c.request(Request.SET_VRING_NUM, VringState(i, q.size))
            c.request(Request.SET_VRING_BASE, VringState(i, base))
            c.request(Request.SET_VRING_ADDR, VringAddr(
                i, 0, USER_BASE + q.desc_addr, USER_BASE + q.used_addr,
                USER_BASE + q.avail_addr))
            c.request(Request.SET_VRING_KICK, i, fds=[self.kick_fds[i]])
            c.request(Request.SET_VRING_CALL, i, fds=[self.call_fds[i]])
            if extra:
                c.request(Request.SET_VRING_ENABLE, VringState(i, 1))
            self._started.append(i)
            if resume:
                os.eventfd_write(self.kick_fds[i], 1)

    def _regions(self, memory: GuestMemory) -> list[MemoryRegion]:
        out = []
        for r in memory.regions:
            if r.fd < 0:
                raise VirtioError(f"{self.kind}: guest memory is not shared (vhost-user needs "
                                  f"<memoryBacking><access mode='shared'/>)")
            out.append(MemoryRegion(r.guest_addr, r.size, USER_BASE + r.guest_addr,
                                    r.fd_offset))
        return out

    def queue_notify(self, index: int) -> None:
        return None  # the backend reads the kick eventfd itself

    @property
    def call_fds(self) -> list[int]:
        return self.calls.fds

    def reset(self) -> None:
        self._stop_rings()
        self.calls.drain()
        self._drop_inflight()  # the guest's requests went with the reset
        self.suspended = False
        super().reset()
        c = self.client
        if c is not None and not c.connected and self.reconnect is not None:
            self.try_reconnect()

    def _stop_rings(self) -> None:
        """GET_VRING_BASE for every started ring: the backend stops serving it."""
        c = self.client
        if c is not None and c.connected:
            try:
                for i in self._started:
                    payload = c.request(Request.GET_VRING_BASE, VringState(i, 0), reply=True)
                    if len(payload) != VRING_STATE.size:
                        raise VhostUserFrontendError(f"{c.what}: GET_VRING_BASE reply of "
                                                     f"{len(payload)} bytes")
            except VhostUserFrontendError as e:
                c.close_connection()
                self.broken = str(e)
        self._started = []

    # ---- the engine's loop: interrupts, hang-ups, reconnection ---------------------------
    def open_calls(self) -> None:
        self.calls.open(len(self.queue_sizes))

    def start(self, loop: Any) -> None:
        self._loop = loop
        self.calls.start(loop, self._call)
        self._tick()

    def _tick(self) -> None:
        """Once a second: a backend that hung up sets NEEDS_RESET (the guest's driver
        resets the device); with ``reconnect``, a missing one is tried again every
        ``reconnect`` seconds."""
        if self._loop is None:
            return
        c = self.client
        if c is not None and c.connected and c.hung_up():
            why = f"{self.kind}: the vhost-user backend at {c.path} went away"
            if self.reconnect and self._inflight is not None and self._started:
                # what it held is in the inflight region: the next backend resumes
                # the rings where this one left them, and the guest sees nothing
                c.close_connection()
                self._started = []
                self.suspended = True
                self.broken = why
            else:
                self.broken = why

                def fail() -> None:
                    raise VirtioError(why)
                self.guard(fail)
        elif c is not None and not c.connected and self.reconnect and \
                time.monotonic() - self._last_try >= self.reconnect:
            if self.try_reconnect() and self.suspended:
                self.guard(self._resume)
        self._loop.call_later(1.0, self._tick, f"{self.kind} backend check")

    def _call(self, index: int) -> None:
        interrupts = self.interrupts
        if interrupts is not None:
            self.guard(lambda: interrupts.queue(index))

    def stop(self) -> None:
        self._loop = None
        self.calls.stop()

    def close(self) -> None:
        """The device model ends (the machine ends or a reset rebuilds it): its
        rings stop; the connection is the machine's (HostResources) and stays."""
        self.stop()
        self._stop_rings()
        self.calls.close()
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        if self._inflight is not None:
            close_fds((self._inflight[1],))
            self._inflight = None


#: virtio-blk's device-specific feature bits (0-23) and configuration size
#: (struct virtio_blk_config up to the write-zeroes fields, as QEMU 7.2 reads it)
BLK_DEVICE_FEATURES = (1 << 24) - 1
BLK_CONFIG_SIZE = 60
#: QEMU's vhost-user-blk queue size
BLK_QUEUE_SIZE = 128


def vhost_user_blk(client: Optional[VhostUserClient], queues: int,
                   reconnect: Optional[int] = None) -> VhostUserDevice:
    """A virtio-blk disk served by a vhost-user-blk backend (``client`` None: a
    description, nothing connected)."""
    return VhostUserDevice(client, 2, "vhost-user-blk", queues, BLK_QUEUE_SIZE,
                           BLK_DEVICE_FEATURES, BLK_CONFIG_SIZE, reconnect)
