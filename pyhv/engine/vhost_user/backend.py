"""A vhost-user backend: the engine's own virtio device served to another VMM.

:class:`Backend` owns one :class:`~pyhv.engine.virtio.device.VirtioDevice` (the
same class a pyhv machine uses, e.g. :class:`~pyhv.engine.virtio.blk.VirtioBlk`)
and serves it to one frontend at a time on the engine's
:class:`~pyhv.engine.eventloop.EventLoop`:

* the frontend's memory table is mapped shared (``MAP_SHARED`` of the descriptors
  it sent) into a :class:`~pyhv.engine.memory.GuestMemory` at the regions'
  guest-physical addresses, so descriptors (which carry guest addresses) are read
  as a pyhv device reads them; ring addresses come as the frontend's own (user)
  addresses and are translated through the table;
* each ring is a :class:`~pyhv.engine.virtio.queue.SplitQueue`: it starts when it
  has a size, addresses inside the table and a kick descriptor, and stops on
  GET_VRING_BASE (whose answer is the next available index to serve);
* a kick (the kick eventfd turns readable) calls the device's ``queue_notify``;
  the device's interrupts write the ring's call eventfd;
* a ring is served unless the frontend disabled it with SET_VRING_ENABLE.  (The
  specification starts rings disabled once protocol features are negotiated;
  frontends that never send SET_VRING_ENABLE, older QEMUs among them, still
  expect service, so pyhv waits only for an explicit 0, as libvhost-user.)

What the frontend gets wrong never reaches the device unchecked: a bad header,
payload or descriptor count ends the connection (:class:`ProtocolError`); a bad
request (an overlapping or oversized memory table, a ring address outside every
region, a ring index that does not exist) gets an error reply when the frontend
asked for one (NEED_REPLY, REPLY_ACK) and ends the connection otherwise; a ring
the driver broke (:class:`~pyhv.engine.virtio.queue.QueueError`) is stopped and
its error eventfd written.  When the frontend goes, everything it gave is undone
(rings stopped, descriptors closed, memory unmapped, the device reset) and the
next frontend is served.

Inflight tracking (INFLIGHT_SHMFD) is offered for devices whose requests can be
run again (virtio-blk): GET_INFLIGHT_FD creates a sealed, zero-filled memfd for
the queue count and size the frontend names (bounded by the device's), which the
frontend hands back with SET_INFLIGHT_FD after a reconnect; the rings are
:class:`~pyhv.engine.vhost_user.inflight.TrackedQueue` objects that record what
they take and complete there, and a ring that starts resubmits what is still
marked, in counter order, before new requests.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.fds import close_fds
from pyhv.engine.memory import GuestMemory, GuestMemoryError
from pyhv.engine.vhost_user.connection import Connection, Disconnected
from pyhv.engine.vhost_user.inflight import MAX_QUEUE_SIZE, InflightRegion, TrackedQueue
from pyhv.engine.vhost_user.message import (
    F_PROTOCOL_FEATURES,
    MAX_CONFIG_SIZE,
    PF_CONFIG,
    PF_INFLIGHT_SHMFD,
    PF_MQ,
    PF_REPLY_ACK,
    PF_RESET_DEVICE,
    VRING_IDX_MASK,
    VRING_NOFD,
    Body,
    ConfigSpace,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolError,
    Request,
    RequestError,
    VhostUserError,
    VringAddr,
    VringState,
    check_regions,
    encode_reply,
    user_to_guest,
)
from pyhv.engine.virtio.device import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    VirtioDevice,
)
from pyhv.engine.virtio.queue import DESC_SIZE, VirtioError

Log = Callable[[str], None]

#: what the backend offers on top of the device's own features
TRANSPORT_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_RESET_DEVICE
#: devices whose configuration space the frontend reads from the backend (GET_CONFIG):
#: net and rng fronts have none of the backend's (QEMU's warn when it is offered)
CONFIG_IN_BACKEND = frozenset({"virtio-blk", "virtio-serial"})
#: devices whose requests may run again after a backend restart (inflight tracking)
REPLAYABLE = frozenset({"virtio-blk"})

#: requests the specification answers with a payload of their own
_REPLIES = {Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
            Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_INFLIGHT_FD,
            Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.POSTCOPY_ADVISE,
            Request.POSTCOPY_END, Request.IOTLB_MSG, Request.CREATE_CRYPTO_SESSION,
            Request.ADD_MEM_REG, Request.REM_MEM_REG}
_ONE = (1).to_bytes(8, sys.byteorder)


def _stderr(message: str) -> None:
    print(f"pyhv: vhost-user: {message}", file=sys.stderr)



class _Unsupported(RequestError):
    """A request pyhv does not serve (unknown, or a feature it did not offer)."""


@dataclass
class Vring:
    """One ring as the frontend set it up."""

    queue: TrackedQueue
    addr: Optional[VringAddr] = None
    kick: Optional[int] = None
    call: Optional[int] = None
    err: Optional[int] = None
    #: None: never told (served); False: SET_VRING_ENABLE 0
    enabled: Optional[bool] = None
    started: bool = False

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            close_fds((getattr(self, name),))
            setattr(self, name, None)


class _CallInterrupts:
    """The device's interrupts: a write to the ring's call eventfd."""

    def __init__(self, backend: "Backend") -> None:
        self.backend = backend

    def queue(self, index: int) -> None:
        rings = self.backend.vrings
        fd = rings[index].call if index < len(rings) else None
        if fd is not None:
            try:
                os.write(fd, _ONE)
            except (BlockingIOError, InterruptedError):
                pass  # a pipe full of calls already wakes the frontend
            except OSError as e:
                self.backend.log(f"ring {index}: call descriptor: {e.strerror}")

    def config(self) -> None:
        # a configuration change needs the backend channel (SLAVE_REQ): not offered
        return None


#: how long a ring is watched for more requests after a batch (QEMU's iothreads:
#: poll-max-ns 32768), and the most one kick keeps the loop on one ring
POLL_US = 32
POLL_CAP_NS = 1_000_000


class Backend:
    """Serves ``device`` to one frontend at a time (see the module's description)."""

    def __init__(self, device: VirtioDevice, loop: EventLoop, log: Log = _stderr,
                 inflight: Optional[bool] = None, poll_us: int = POLL_US) -> None:
        """``inflight``: offer INFLIGHT_SHMFD (default: for devices in
        :data:`REPLAYABLE`); ``poll_us``: how long a ring is watched for new requests
        after a batch before the backend sleeps on its kick (0: never)."""
        self.device = device
        self.poll_ns = poll_us * 1000
        self.loop = loop
        self.log = log
        self.features = device.features | TRANSPORT_FEATURES
        if inflight is None:
            inflight = device.kind in REPLAYABLE
        self.protocol_features = PROTOCOL_FEATURES | (PF_INFLIGHT_SHMFD if inflight else 0) \
            | (PF_CONFIG if device.kind in CONFIG_IN_BACKEND else 0)
        self.vrings = [Vring(TrackedQueue(n)) for n in device.queue_sizes]
        self.conn: Optional[Connection] = None
        self.inflight: Optional[InflightRegion] = None
        #: descriptors to send with the next reply (GET_INFLIGHT_FD's memfd)
        self._reply_fds: list[int] = []
        self.on_disconnect: Callable[[], None] = lambda: None
        self._reset_session()

    def _reset_session(self) -> None:
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.memory: Optional[GuestMemory] = None
        self.regions: tuple[MemoryRegion, ...] = ()
        self.active = False
        for v in self.vrings:
            v.queue.reset()
            v.addr, v.enabled, v.started = None, None, False
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    # ---- the connection ------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        """Serve the frontend at the other end of ``sock`` (connected)."""
        if self.conn is not None:
            raise VhostUserError("a frontend is already served")
        self.conn = Connection(sock)
        self.loop.add_reader(self.conn.fileno(), self._on_readable, "vhost-user frontend")

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def _on_readable(self, fd: int) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            for msg in conn.read():
                reply = self.handle(msg)
                fds, self._reply_fds = self._reply_fds, []
                if reply is not None and self.conn is conn:
                    conn.send(reply, fds)
        except Disconnected as e:
            self.disconnect(None if e.clean else str(e))
        except ProtocolError as e:
            self.disconnect(str(e))

    def disconnect(self, reason: Optional[str] = None) -> None:
        """Forget the frontend: stop the rings, close what it gave, reset the device."""
        conn = self.conn
        if reason:
            self.log(f"frontend dropped: {reason}")
        for i in range(len(self.vrings)):
            self._stop(i)
            self.vrings[i].close_fds()
        self.device.reset()
        memory = self.memory
        self._reset_session()
        if memory is not None:
            self._unmap(memory)
        if conn is not None:
            self.loop.remove_reader(conn.fileno())
            conn.close()
            self.conn = None  # last: ``connected`` turns False once all is undone
            self.on_disconnect()

    def _unmap(self, memory: GuestMemory) -> None:
        try:
            memory.close()
        except GuestMemoryError as e:
            self.log(str(e))

    # ---- requests --------------------------------------------------------------------------
    def handle(self, msg: Message) -> Optional[bytes]:
        """Serve one request; the reply to send, if any.  Raises :class:`ProtocolError`
        when the connection must end."""
        req = msg.request
        try:
            try:
                handler = _HANDLERS.get(req) if isinstance(req, Request) else None
                if handler is None:
                    raise _Unsupported(f"{msg.name} is not supported")
                body = handler(self, msg)
            except RequestError as e:
                if req in _REPLIES:
                    if req == Request.GET_CONFIG:
                        self.log(str(e))
                        return encode_reply(req, None)  # an empty payload: the error
                    raise ProtocolError(str(e)) from e
                if msg.need_reply:
                    self.log(f"{msg.name}: {e}")
                    return encode_reply(req, 1)
                if isinstance(e, _Unsupported):
                    self.log(f"{e}: ignored")
                    return None
                raise ProtocolError(f"{msg.name}: {e}") from e
        finally:
            msg.close_fds()
        if req in _REPLIES:
            return encode_reply(req, body)
        if msg.need_reply:
            return encode_reply(req, 0)
        return None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"ring {index} does not exist (the device has "
                               f"{len(self.vrings)})")
        return self.vrings[index]

    def _stopped_vring(self, index: int) -> Vring:
        v = self._vring(index)
        if v.started:
            raise RequestError(f"ring {index} is running (GET_VRING_BASE stops it)")
        return v

    # features and ownership
    def _get_features(self, msg: Message) -> Body:
        return self.features

    def _set_features(self, msg: Message) -> Body:
        assert isinstance(msg.body, int)
        if msg.body & ~self.features:
            raise RequestError(f"features {msg.body & ~self.features:#x} were not offered")
        self.acked_features = msg.body
        self._activate()
        return None

    def _get_protocol_features(self, msg: Message) -> Body:
        return self.protocol_features

    def _set_protocol_features(self, msg: Message) -> Body:
        assert isinstance(msg.body, int)
        if msg.body & ~self.protocol_features:
            raise RequestError(f"protocol features {msg.body & ~self.protocol_features:#x} "
                               f"were not offered")
        self.acked_protocol_features = msg.body
        return None

    def _set_owner(self, msg: Message) -> Body:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message) -> Body:
        # deprecated; the specification recommends disabling the rings
        for i in range(len(self.vrings)):
            self._stop(i)
        return None

    def _reset_device(self, msg: Message) -> Body:
        for i in range(len(self.vrings)):
            self._stop(i)
            self.vrings[i].close_fds()
        self.device.reset()
        memory = self.memory
        owner = self.owner
        self._reset_session()
        self.owner = owner
        if memory is not None:
            self._unmap(memory)
        return None

    def _get_queue_num(self, msg: Message) -> Body:
        return len(self.vrings)

    # memory
    def _set_mem_table(self, msg: Message) -> Body:
        assert isinstance(msg.body, MemoryTable)
        regions = msg.body.regions
        sizes = []
        for fd in msg.fds:
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise RequestError(f"memory descriptor: {e.strerror}") from e
            sizes.append(st.st_size if stat.S_ISREG(st.st_mode) else 0)
        check_regions(regions, sizes, os.sysconf("SC_PAGE_SIZE"))
        try:
            memory = GuestMemory.from_fds((r.guest_addr, r.size, fd, r.mmap_offset)
                                          for r, fd in zip(regions, msg.fds))
        except GuestMemoryError as e:
            raise RequestError(str(e)) from e
        msg.fds = []  # the memory owns them now
        old, self.memory, self.regions = self.memory, memory, regions
        for i, v in enumerate(self.vrings):
            if v.started:
                try:
                    self._place(v)
                except RequestError as e:
                    self.log(f"ring {i} stopped: {e}")
                    self._stop(i)
        self._activate()
        if old is not None:
            self._unmap(old)
        return None

    # inflight tracking
    def _inflight_sizes(self, msg: Message) -> Inflight:
        body = msg.body
        assert isinstance(body, Inflight)
        if not self.protocol_features & PF_INFLIGHT_SHMFD:
            raise _Unsupported(f"{msg.name} is not supported (INFLIGHT_SHMFD was not "
                               f"offered)")
        if not self.acked_protocol_features & PF_INFLIGHT_SHMFD:
            raise RequestError("INFLIGHT_SHMFD was not negotiated")
        if not 1 <= body.num_queues <= len(self.vrings):
            raise RequestError(f"inflight memory for {body.num_queues} queues (the device "
                               f"has {len(self.vrings)})")
        most = min(MAX_QUEUE_SIZE, max(v.queue.max_size for v in self.vrings))
        if not 1 <= body.queue_size <= most:
            raise RequestError(f"inflight memory for queues of {body.queue_size} "
                               f"(1 to {most})")
        if any(v.started for v in self.vrings):
            raise RequestError("inflight memory while rings are running")
        return body

    def _get_inflight_fd(self, msg: Message) -> Body:
        body = self._inflight_sizes(msg)
        region = InflightRegion.create(body.num_queues, body.queue_size)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        self._reply_fds = [region.fd]
        return Inflight(region.size, 0, body.num_queues, body.queue_size)

    def _set_inflight_fd(self, msg: Message) -> Body:
        body = self._inflight_sizes(msg)
        fd = msg.take_fd()
        if fd is None:
            raise RequestError("no inflight memory descriptor")
        region = InflightRegion.adopt(fd, body.mmap_size, body.mmap_offset,
                                      body.num_queues, body.queue_size)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        return None

    def _resume_inflight(self, index: int) -> None:
        """Attach the ring to its inflight region, if any, and queue what is still
        marked there to run before new requests."""
        q = self.vrings[index].queue
        region = self.inflight
        if region is None or index >= region.num_queues:
            return
        state = region.queue(index)
        heads = state.resume(q.size, q.next_used)
        q.track = state
        q.resubmit = heads
        if heads:
            # every chain taken is used or inflight: new ones start after both
            q.next_avail = (q.next_used + len(heads)) & 0xFFFF
            self.log(f"ring {index}: resubmitting {len(heads)} inflight request(s)")

    # rings
    def _set_vring_num(self, msg: Message) -> Body:
        assert isinstance(msg.body, VringState)
        v = self._stopped_vring(msg.body.index)
        n = msg.body.num
        if not 1 <= n <= v.queue.max_size or n & (n - 1):
            raise RequestError(f"ring {msg.body.index}: size {n} is not a power of two up "
                               f"to {v.queue.max_size}")
        v.queue.size = n
        return None

    def _set_vring_base(self, msg: Message) -> Body:
        assert isinstance(msg.body, VringState)
        v = self._stopped_vring(msg.body.index)
        if msg.body.num > 0xFFFF:
            raise RequestError(f"ring {msg.body.index}: base {msg.body.num:#x} is not a "
                               f"split ring's index")
        v.queue.next_avail = msg.body.num
        return None

    def _get_vring_base(self, msg: Message) -> Body:
        assert isinstance(msg.body, VringState)
        index = msg.body.index
        v = self._vring(index)
        self._stop(index)
        close_fds((v.kick,))
        v.kick = None
        return VringState(index, v.queue.next_avail)

    def _set_vring_addr(self, msg: Message) -> Body:
        a = msg.body
        assert isinstance(a, VringAddr)
        v = self._vring(a.index)
        old, v.addr = v.addr, a
        if self.memory is not None:
            try:
                self._place(v)
            except RequestError:
                v.addr = old
                raise
        return None

    def _place(self, v: Vring) -> None:
        """Translate the ring's user addresses into guest addresses in the queue."""
        a, q = v.addr, v.queue
        assert a is not None
        n = q.size
        q.desc_addr = user_to_guest(self.regions, a.desc, DESC_SIZE * n)
        q.avail_addr = user_to_guest(self.regions, a.avail, 6 + 2 * n)
        q.used_addr = user_to_guest(self.regions, a.used, 6 + 8 * n)

    def _vring_fd(self, msg: Message) -> tuple[int, Vring, Optional[int]]:
        assert isinstance(msg.body, int)
        index = msg.body & VRING_IDX_MASK
        v = self._vring(index)
        fd = None if msg.body & VRING_NOFD else msg.take_fd()
        return index, v, fd

    def _set_vring_kick(self, msg: Message) -> Body:
        index, v, fd = self._vring_fd(msg)
        if fd is None:
            raise RequestError(f"ring {index}: polling (no kick descriptor) is not supported")
        if v.started and v.kick is not None:
            self.loop.remove_reader(v.kick)
        close_fds((v.kick,))
        v.kick = fd
        if v.started:
            self.loop.add_reader(fd, self._kicked(index), f"vhost-user ring {index} kick")
        else:
            self._start(index)
        return None

    def _set_vring_call(self, msg: Message) -> Body:
        _index, v, fd = self._vring_fd(msg)
        close_fds((v.call,))
        v.call = fd
        return None

    def _set_vring_err(self, msg: Message) -> Body:
        _index, v, fd = self._vring_fd(msg)
        close_fds((v.err,))
        v.err = fd
        return None

    def _set_vring_enable(self, msg: Message) -> Body:
        assert isinstance(msg.body, VringState)
        v = self._vring(msg.body.index)
        if msg.body.num not in (0, 1):
            raise RequestError(f"ring {msg.body.index}: enable {msg.body.num}")
        v.enabled = bool(msg.body.num)
        if v.enabled:
            self._serve(msg.body.index)
        return None

    # configuration space
    def _get_config(self, msg: Message) -> Body:
        c = msg.body
        assert isinstance(c, ConfigSpace)
        if c.offset + c.size > MAX_CONFIG_SIZE:
            raise RequestError(f"configuration read at {c.offset}+{c.size} is past "
                               f"{MAX_CONFIG_SIZE} bytes")
        space = self.device.config_bytes().ljust(MAX_CONFIG_SIZE, b"\0")
        return ConfigSpace(c.offset, c.size, c.flags, space[c.offset:c.offset + c.size])

    def _set_config(self, msg: Message) -> Body:
        c = msg.body
        assert isinstance(c, ConfigSpace)
        if c.flags not in (0, 1):
            raise RequestError(f"configuration write with flags {c.flags:#x}")
        if c.offset + c.size > len(self.device.config_bytes()):
            raise RequestError(f"configuration write at {c.offset}+{c.size} is past the "
                               f"device's configuration")
        self.device.write_config(c.offset, c.payload)
        return None

    # ---- serving the rings -----------------------------------------------------------------
    def _activate(self) -> None:
        """Hand the device the current memory, rings and features (again)."""
        if self.memory is None:
            return
        self.device.activate(self.memory, [v.queue for v in self.vrings],
                             _CallInterrupts(self), self.acked_features)
        self.active = True

    def _start(self, index: int) -> None:
        """Start the ring if it has everything it needs; a kick before then is kept
        (the descriptor stays readable) and served when it starts."""
        v = self.vrings[index]
        if v.started or self.memory is None or v.addr is None or v.kick is None:
            return
        q = v.queue
        # a fresh run of the ring: only its size and base carry over (not, say, the
        # used index last signalled in an earlier run, by the firmware)
        size, base = q.size, q.next_avail
        q.reset()
        q.size, q.next_avail = size, base
        self._place(v)
        q.event_idx = bool(self.acked_features & F_RING_EVENT_IDX)
        q.indirect = bool(self.acked_features & F_RING_INDIRECT_DESC)
        try:
            q.validate(self.memory)
            q.next_used = self.memory.read_u16(q.used_addr + 2)
        except (VirtioError, GuestMemoryError) as e:
            raise RequestError(f"ring {index}: {e}") from e
        try:
            self._resume_inflight(index)
        except RequestError as e:
            raise RequestError(f"ring {index}: {e}") from e
        q.ready = True
        v.started = True
        self._activate()
        self.loop.add_reader(v.kick, self._kicked(index), f"vhost-user ring {index} kick")
        self._serve(index)

    def _stop(self, index: int) -> None:
        v = self.vrings[index]
        if v.started and v.kick is not None:
            self.loop.remove_reader(v.kick)
        v.started = False
        v.queue.ready = False

    def _kicked(self, index: int) -> Callable[[int], None]:
        def on_kick(fd: int) -> None:
            try:
                data = os.read(fd, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                data = b""
                self.log(f"ring {index}: kick descriptor: {e.strerror}")
            if not data:  # a pipe whose writer went: no more kicks will come
                self.loop.remove_reader(fd)
                return
            self._serve(index)
        return on_kick

    def _serve(self, index: int) -> None:
        v = self.vrings[index]
        if not v.started or v.enabled is False or self.memory is None:
            return
        try:
            # nothing new (a ring that just started or was enabled): no spurious call
            q, memory = v.queue, self.memory
            if not q.pending(memory):
                return
            self.device.queue_notify(index)
            if not self.poll_ns:
                return
            # the driver's next requests often come within microseconds: watch the
            # ring a while (QEMU's iothreads poll 32 us) rather than sleep and be
            # woken by a kick; never longer than POLL_CAP_NS in a row, so other rings
            # and the frontend's messages are served
            now = time.perf_counter_ns
            start = last = now()
            while last - start < POLL_CAP_NS:
                if q.pending(memory):
                    self.device.queue_notify(index)
                    last = now()
                elif now() - last > self.poll_ns:
                    return
        except (VirtioError, GuestMemoryError) as e:
            self.log(f"ring {index} stopped, the driver broke it: {e}")
            self._stop(index)
            if v.err is not None:
                try:
                    os.write(v.err, _ONE)
                except OSError:
                    pass


_HANDLERS: dict[Request, Callable[[Backend, Message], Body]] = {
    Request.GET_FEATURES: Backend._get_features,
    Request.SET_FEATURES: Backend._set_features,
    Request.GET_PROTOCOL_FEATURES: Backend._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: Backend._set_protocol_features,
    Request.SET_OWNER: Backend._set_owner,
    Request.RESET_OWNER: Backend._reset_owner,
    Request.RESET_DEVICE: Backend._reset_device,
    Request.GET_QUEUE_NUM: Backend._get_queue_num,
    Request.SET_MEM_TABLE: Backend._set_mem_table,
    Request.SET_VRING_NUM: Backend._set_vring_num,
    Request.SET_VRING_BASE: Backend._set_vring_base,
    Request.GET_VRING_BASE: Backend._get_vring_base,
    Request.SET_VRING_ADDR: Backend._set_vring_addr,
    Request.SET_VRING_KICK: Backend._set_vring_kick,
    Request.SET_VRING_CALL: Backend._set_vring_call,
    Request.SET_VRING_ERR: Backend._set_vring_err,
    Request.SET_VRING_ENABLE: Backend._set_vring_enable,
    Request.GET_CONFIG: Backend._get_config,
    Request.SET_CONFIG: Backend._set_config,
    Request.GET_INFLIGHT_FD: Backend._get_inflight_fd,
    Request.SET_INFLIGHT_FD: Backend._set_inflight_fd,
}


class Server:
    """A listening unix socket at ``path``; each frontend that connects is handed to
    ``backend``, one at a time (the next waits in the backlog until the first goes)."""

    def __init__(self, path: str, backend: Backend) -> None:
        self.path = path
        self.backend = backend
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        except OSError as e:
            raise VhostUserError(f"{path}: {e.strerror}") from e
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(1)
        except OSError as e:
            sock.close()
            raise VhostUserError(f"{path}: cannot listen: {e.strerror}") from e
        sock.setblocking(False)
        self.sock = sock
        backend.on_disconnect = self._arm
        self._arm()

    def _arm(self) -> None:
        if self.sock.fileno() >= 0:
            self.backend.loop.add_reader(self.sock.fileno(), self._accept, "vhost-user listener")

    def _accept(self, fd: int) -> None:
        try:
            conn, _addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.backend.loop.remove_reader(fd)
        self.backend.attach(conn)

    def close(self) -> None:
        self.backend.on_disconnect = lambda: None
        self.backend.disconnect()
        if self.sock.fileno() >= 0:
            self.backend.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
