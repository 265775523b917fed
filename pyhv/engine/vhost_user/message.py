"""The vhost-user protocol (QEMU's docs/interop/vhost-user.rst) as a sans-I/O module.

Nothing here touches a socket.  A :class:`Decoder` is fed the bytes and the file
descriptors a connection received (:meth:`Decoder.receive`), says how many bytes
it wants next (:meth:`Decoder.wanted`: never more than the rest of the current
header or payload, so a reader never takes bytes, or descriptors, that belong to
the next message) and yields typed :class:`Message` objects
(:meth:`Decoder.next_message`).  Replies and requests are made into bytes by
:func:`encode`.

A message is a 12-byte header (request, flags, payload size; native byte order)
and a payload whose shape depends on the request.  The decoder checks, for each
request it knows, the payload's size and the number of descriptors that came with
it, and refuses any payload larger than its limit before reading it.  What the
frontend got wrong raises :class:`ProtocolError` and leaves the decoder in a
terminal error state (the connection must be closed), as h11 does; descriptors it
took are then closed by :meth:`Decoder.close`.  A request the decoder does not know
is still a :class:`Message` (with its raw payload): what to answer is the backend's
decision (an error reply when the frontend asked for one).

Checks that need more than one message (a vring address inside the memory table)
are pure functions here as well (:func:`check_regions`, :func:`user_to_guest`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Sequence, Union

from pyhv.engine.errors import EngineError
from pyhv.engine.fds import close_fds


class VhostUserError(EngineError):
    """The root of the vhost-user errors."""


class ProtocolError(VhostUserError):
    """The peer broke the protocol: the connection cannot go on."""


class RequestError(VhostUserError):
    """One request cannot be served (a bad address, a ring that does not exist): the
    backend answers it with an error when the frontend asked for a reply."""


class Request(IntEnum):
    """Front-end message types (the ``:id:`` of each in the specification)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# header flags
VERSION = 0x1
VERSION_MASK = 0x3
F_REPLY = 1 << 2
F_NEED_REPLY = 1 << 3

#: the virtio feature bit (30, reserved in virtio) that says protocol features exist
F_PROTOCOL_FEATURES = 1 << 30
#: VHOST_F_LOG_ALL: the frontend logs dirty pages (migration)
F_LOG_ALL = 1 << 26

# protocol feature bits
PF_MQ = 1 << 0
PF_LOG_SHMFD = 1 << 1
PF_RARP = 1 << 2
PF_REPLY_ACK = 1 << 3
PF_MTU = 1 << 4
PF_SLAVE_REQ = 1 << 5
PF_CROSS_ENDIAN = 1 << 6
PF_CRYPTO_SESSION = 1 << 7
PF_PAGEFAULT = 1 << 8
PF_CONFIG = 1 << 9
PF_SLAVE_SEND_FD = 1 << 10
PF_HOST_NOTIFIER = 1 << 11
PF_INFLIGHT_SHMFD = 1 << 12
PF_RESET_DEVICE = 1 << 13
PF_INBAND_NOTIFICATIONS = 1 << 14
PF_CONFIGURE_MEM_SLOTS = 1 << 15
PF_STATUS = 1 << 16

#: SET_VRING_KICK/CALL/ERR: bits 0-7 the ring, bit 8 "no descriptor" (polling)
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8
#: SET_VRING_ADDR flags: VHOST_VRING_F_LOG
VRING_F_LOG = 1 << 0

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
VRING_ADDR = struct.Struct("=IIQQQQ")
MEMORY_HEADER = struct.Struct("=II")
MEMORY_REGION = struct.Struct("=QQQQ")
CONFIG_HEADER = struct.Struct("=III")
INFLIGHT = struct.Struct("=QQHH4x")

#: VHOST_MEMORY_BASELINE_NREGIONS: the most regions (and descriptors) in one message
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS
#: VHOST_USER_MAX_CONFIG_SIZE
MAX_CONFIG_SIZE = 256
#: the largest payload accepted: a full memory table is 264 bytes, a full
#: configuration access 268
MAX_PAYLOAD = 4096
#: SET_CONFIG flags
CONFIG_WRITABLE = 0
CONFIG_MIGRATION = 1


# ---- payloads -----------------------------------------------------------------------------

@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail,
                               self.log)


@dataclass(frozen=True)
class MemoryRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return MEMORY_REGION.pack(self.guest_addr, self.size, self.user_addr,
                                  self.mmap_offset)


@dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]

    def pack(self) -> bytes:
        return MEMORY_HEADER.pack(len(self.regions), 0) + \
            b"".join(r.pack() for r in self.regions)


@dataclass(frozen=True)
class ConfigSpace:
    offset: int
    size: int
    flags: int
    payload: bytes

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.payload


@dataclass(frozen=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues,
                             self.queue_size)


Body = Union[None, int, VringState, VringAddr, MemoryTable, ConfigSpace, Inflight, bytes]


@dataclass
class Message:
    """One decoded message: ``request`` is a :class:`Request` when known, else the raw
    number; ``body`` is typed for known requests (``bytes`` for unknown ones)."""

    request: Union[Request, int]
    flags: int
    body: Body
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & F_NEED_REPLY)

    @property
    def name(self) -> str:
        r = self.request
        return r.name if isinstance(r, Request) else f"request {r}"

    def take_fd(self) -> Optional[int]:
        """The message's only descriptor, now the caller's to close (None: none came)."""
        return self.fds.pop() if self.fds else None

    def close_fds(self) -> None:
        """Close the descriptors nobody took."""
        fds, self.fds = self.fds, []
        close_fds(fds)


# ---- what each known request carries -----------------------------------------------------------

_NONE, _U64, _STATE, _ADDR, _MEM, _CONFIG, _INFLIGHT, _ANY = range(8)

_SHAPE: dict[Request, int] = {
    Request.GET_FEATURES: _NONE,
    Request.SET_FEATURES: _U64,
    Request.SET_OWNER: _NONE,
    Request.RESET_OWNER: _NONE,
    Request.SET_MEM_TABLE: _MEM,
    Request.SET_LOG_BASE: _ANY,
    Request.SET_LOG_FD: _NONE,
    Request.SET_VRING_NUM: _STATE,
    Request.SET_VRING_ADDR: _ADDR,
    Request.SET_VRING_BASE: _STATE,
    Request.GET_VRING_BASE: _STATE,
    Request.SET_VRING_KICK: _U64,
    Request.SET_VRING_CALL: _U64,
    Request.SET_VRING_ERR: _U64,
    Request.GET_PROTOCOL_FEATURES: _NONE,
    Request.SET_PROTOCOL_FEATURES: _U64,
    Request.GET_QUEUE_NUM: _NONE,
    Request.SET_VRING_ENABLE: _STATE,
    Request.SET_SLAVE_REQ_FD: _NONE,
    Request.SET_VRING_ENDIAN: _STATE,
    Request.GET_CONFIG: _CONFIG,
    Request.SET_CONFIG: _CONFIG,
    Request.GET_INFLIGHT_FD: _INFLIGHT,
    Request.SET_INFLIGHT_FD: _INFLIGHT,
    Request.RESET_DEVICE: _NONE,
    Request.VRING_KICK: _STATE,
    Request.GET_MAX_MEM_SLOTS: _NONE,
    Request.SET_STATUS: _U64,
    Request.GET_STATUS: _NONE,
}

_FIXED = {_NONE: 0, _U64: U64.size, _STATE: VRING_STATE.size, _ADDR: VRING_ADDR.size,
          _INFLIGHT: INFLIGHT.size}

#: requests that carry exactly one descriptor (SET_VRING_* unless VRING_NOFD)
_ONE_FD = {Request.SET_LOG_FD, Request.SET_SLAVE_REQ_FD, Request.SET_INFLIGHT_FD}
_VRING_FD = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
#: requests that may carry one descriptor or none (LOG_BASE: with LOG_SHMFD only)
_MAYBE_FD = {Request.SET_LOG_BASE}


def _parse_body(request: Request, payload: bytes, nfds: int) -> Body:
    """The typed payload of a known request; :class:`ProtocolError` when its size or
    its descriptors are wrong."""
    shape = _SHAPE.get(request, _ANY)
    name = request.name
    if shape in _FIXED and len(payload) != _FIXED[shape]:
        raise ProtocolError(f"{name}: payload of {len(payload)} bytes, expected "
                            f"{_FIXED[shape]}")
    body: Body
    want_fds = 0
    if shape == _NONE:
        body = None
    elif shape == _U64:
        body = U64.unpack(payload)[0]
    elif shape == _STATE:
        body = VringState(*VRING_STATE.unpack(payload))
    elif shape == _ADDR:
        body = VringAddr(*VRING_ADDR.unpack(payload))
    elif shape == _INFLIGHT:
        body = Inflight(*INFLIGHT.unpack(payload))
    elif shape == _MEM:
        if len(payload) < MEMORY_HEADER.size:
            raise ProtocolError(f"{name}: payload of {len(payload)} bytes has no region count")
        count, _pad = MEMORY_HEADER.unpack_from(payload)
        if not 1 <= count <= MAX_REGIONS:
            raise ProtocolError(f"{name}: {count} regions (1 to {MAX_REGIONS})")
        want = MEMORY_HEADER.size + count * MEMORY_REGION.size
        # QEMU sends the regions it has; older frontends send the whole 8-entry array
        if len(payload) not in (want, MEMORY_HEADER.size + MAX_REGIONS * MEMORY_REGION.size):
            raise ProtocolError(f"{name}: payload of {len(payload)} bytes for {count} "
                                f"regions")
        body = MemoryTable(tuple(
            MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size
                                                    + i * MEMORY_REGION.size))
            for i in range(count)))
        want_fds = count
    elif shape == _CONFIG:
        if len(payload) < CONFIG_HEADER.size:
            raise ProtocolError(f"{name}: payload of {len(payload)} bytes has no header")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        data = payload[CONFIG_HEADER.size:]
        if size > MAX_CONFIG_SIZE or len(data) != size:
            raise ProtocolError(f"{name}: {size} bytes announced, {len(data)} sent "
                                f"(at most {MAX_CONFIG_SIZE})")
        body = ConfigSpace(offset, size, flags, bytes(data))
    else:
        body = bytes(payload)
    if request in _VRING_FD:
        assert isinstance(body, int)
        want_fds = 0 if body & VRING_NOFD else 1
        if body & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"{name}: reserved bits set in {body:#x}")
    elif request in _ONE_FD:
        want_fds = 1
    elif request in _MAYBE_FD:
        want_fds = nfds if nfds <= 1 else 1
    if nfds != want_fds:
        raise ProtocolError(f"{name}: {nfds} file descriptors, expected {want_fds}")
    return body


# ---- decoding ----------------------------------------------------------------------------------

class Decoder:
    """Bytes and descriptors in, :class:`Message` objects out."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: Optional[tuple[int, int, int]] = None
        self._ready: list[Message] = []
        self.error: Optional[ProtocolError] = None

    def wanted(self) -> int:
        """How many bytes to read next: the rest of the header or of the payload."""
        if self._header is None:
            return HEADER.size - len(self._buf)
        return self._header[2] - len(self._buf)

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes read from the connection, with the descriptors that came with them
        (the decoder owns those now).  Raises :class:`ProtocolError` (and stays
        broken) on a bad header."""
        self._fds.extend(fds)
        if self.error is not None:
            self.close()
            raise self.error
        if len(data) > self.wanted():
            # the reader took more than it was told: split and go on message by message
            first, rest = data[:self.wanted()], data[self.wanted():]
            self.receive(first)
            self.receive(rest)
            return
        self._buf += data
        try:
            self._advance()
        except ProtocolError as e:
            self.error = e
            self.close()
            raise

    def _advance(self) -> None:
        if self._header is None:
            if len(self._buf) < HEADER.size:
                return
            request, flags, size = HEADER.unpack(self._buf)
            del self._buf[:]
            if flags & VERSION_MASK != VERSION:
                raise ProtocolError(f"request {request}: protocol version "
                                    f"{flags & VERSION_MASK}, expected {VERSION}")
            if flags & F_REPLY:
                raise ProtocolError(f"request {request}: a reply where a request was due")
            if size > self.max_payload:
                raise ProtocolError(f"request {request}: payload of {size} bytes, more "
                                    f"than {self.max_payload}")
            self._header = (request, flags, size)
        request, flags, size = self._header
        if len(self._buf) < size:
            return
        payload, self._buf = bytes(self._buf), bytearray()
        self._header = None
        fds, self._fds = self._fds, []
        try:
            known: Union[Request, int] = Request(request)
        except ValueError:
            known = request
        if isinstance(known, Request):
            try:
                body = _parse_body(known, payload, len(fds))
            except ProtocolError:
                self._fds = fds
                raise
        else:
            body = payload
        self._ready.append(Message(known, flags, body, fds))

    def next_message(self) -> Optional[Message]:
        return self._ready.pop(0) if self._ready else None

    @property
    def idle(self) -> bool:
        """No partial message is buffered (a peer that hangs up now did so cleanly)."""
        return self._header is None and not self._buf

    def close(self) -> None:
        """Close every descriptor still held (decoded messages nobody took included)."""
        fds, self._fds = self._fds, []
        for m in self._ready:
            fds.extend(m.fds)
            m.fds = []
        self._ready = []
        close_fds(fds)


# ---- encoding -----------------------------------------------------------------------------------

def pack_body(body: Body) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bool):
        raise TypeError("a vhost-user payload is not a bool")
    if isinstance(body, int):
        return U64.pack(body)
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    return body.pack()


def encode(request: Union[Request, int], body: Body = None, *, reply: bool = False,
           need_reply: bool = False) -> bytes:
    """A whole message: header and payload."""
    payload = pack_body(body)
    flags = VERSION | (F_REPLY if reply else 0) | (F_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def encode_reply(request: Union[Request, int], body: Body = None) -> bytes:
    return encode(request, body, reply=True)


def decode_reply(data: bytes) -> tuple[int, int, bytes]:
    """(request, flags, payload) of one whole reply (a frontend's side, for tests and
    the frontend); :class:`ProtocolError` when it is not one."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"reply of {len(data)} bytes is shorter than a header")
    request, flags, size = HEADER.unpack_from(data)
    if flags & VERSION_MASK != VERSION or not flags & F_REPLY:
        raise ProtocolError(f"reply to request {request} has flags {flags:#x}")
    if len(data) != HEADER.size + size:
        raise ProtocolError(f"reply to request {request}: {len(data) - HEADER.size} "
                            f"payload bytes, header says {size}")
    return request, flags, data[HEADER.size:]


# ---- memory table checks -----------------------------------------------------------------------

_TOP = 1 << 64


def check_regions(regions: Sequence[MemoryRegion], fd_sizes: Sequence[int],
                  page_size: int = 4096) -> None:
    """Raise :class:`RequestError` unless every region is non-empty, does not wrap,
    lies inside its descriptor's file (``fd_sizes``, from fstat), starts at a page
    in it, and no two regions overlap in guest or in user addresses."""
    for i, (r, fd_size) in enumerate(zip(regions, fd_sizes)):
        what = f"memory region {i} (guest {r.guest_addr:#x}+{r.size:#x})"
        if r.size == 0:
            raise RequestError(f"{what} is empty")
        for name, base in (("guest", r.guest_addr), ("user", r.user_addr),
                           ("mmap offset", r.mmap_offset)):
            if base + r.size > _TOP:
                raise RequestError(f"{what}: {name} address {base:#x} wraps around")
        if r.mmap_offset % page_size:
            raise RequestError(f"{what}: mmap offset {r.mmap_offset:#x} is not page-aligned")
        if r.mmap_offset + r.size > fd_size:
            raise RequestError(f"{what}: offset {r.mmap_offset:#x} + size is past the end "
                               f"of its file ({fd_size:#x} bytes)")
    for key, name in ((lambda r: r.guest_addr, "guest"), (lambda r: r.user_addr, "user")):
        ordered = sorted(regions, key=key)
        for a, b in zip(ordered, ordered[1:]):
            if key(a) + a.size > key(b):
                raise RequestError(f"memory regions overlap in {name} addresses at "
                                   f"{key(b):#x}")


def user_to_guest(regions: Sequence[MemoryRegion], user_addr: int, size: int) -> int:
    """The guest address of ``size`` bytes at the frontend's ``user_addr``, which must
    lie inside one region; :class:`RequestError` otherwise."""
    for r in regions:
        if r.user_addr <= user_addr and user_addr + size <= r.user_addr + r.size:
            return r.guest_addr + (user_addr - r.user_addr)
    raise RequestError(f"user address {user_addr:#x}+{size:#x} is in no memory region")
