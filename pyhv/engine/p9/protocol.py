"""9P2000.L messages and connections as a sans-I/O state machine (h11-style).

A :class:`Connection` never touches a socket.  Its owner feeds it the bytes it
read (:meth:`Connection.receive_data`; ``b""`` means end of input), takes
events out (:meth:`Connection.next_event`) and writes the bytes
:meth:`Connection.send` returns.  Both ends are here: a ``SERVER`` connection
decodes T-messages and encodes R-messages, a ``CLIENT`` connection the reverse
(tests drive the server with one).

The wire format (Linux's ``Documentation/filesystems/9p.rst`` and the
9P2000.L description): every message is ``size[4] type[1] tag[2] body``, all
integers little-endian, ``size`` counting itself; a string is ``len[2]``
followed by that many bytes (nominally UTF-8; Linux sends file names as raw
bytes, so they are decoded with ``surrogateescape`` and encoded back the same
way, as :func:`os.fsdecode` does); a qid is ``type[1] version[4] path[8]``.

What a peer can do wrong and what happens:

* a ``size`` below 7 or above the negotiated ``msize`` (before ``Tversion``:
  the connection's ``max_msize``), a tag reused while its request is still
  unanswered, a reply nobody asked for, or end of input inside a message:
  :class:`RemoteProtocolError`, and the connection is in a terminal ERROR
  state (the owner disconnects);
* a well-framed message of a type this end does not take (an unknown type, an
  R-message sent to a server): an :class:`Invalid` event with ``EOPNOTSUPP``
  for the owner to answer with ``Rlerror``;
* a known type whose body is too short, too long, or whose counts disagree
  with its data: :class:`Invalid` with ``EINVAL``; a request other than
  ``Tversion`` before one was negotiated: :class:`Invalid` with ``EPROTO``.

Misuse by the owner (sending a reply for a tag that is not pending, a field
out of range, a message larger than ``msize``) raises
:class:`LocalProtocolError` and leaves the connection usable.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Optional, Union

from pyhv.engine.errors import EngineError

VERSION: Final = "9P2000.L"
UNKNOWN_VERSION: Final = "unknown"
NOTAG: Final = 0xFFFF
NOFID: Final = 0xFFFFFFFF
HEADER_SIZE: Final = 7
#: bytes of a Twrite/Rread header (the conventional P9_IOHDRSZ): iounit = msize - IOHDRSZ
IOHDRSZ: Final = 24
#: the most names one Twalk may carry
MAX_WELEM: Final = 16
#: the smallest msize a client may ask for (Linux refuses servers below 4096 too)
MIN_MSIZE: Final = 4096
DEFAULT_MAX_MSIZE: Final = 512 * 1024
#: the largest string field the decoder takes (a name or path; Linux's PATH_MAX)
MAX_STRING: Final = 4096

# qid types
QTDIR: Final = 0x80
QTAPPEND: Final = 0x40
QTEXCL: Final = 0x20
QTSYMLINK: Final = 0x02
QTFILE: Final = 0x00

# Tgetattr request_mask / Rgetattr valid
GETATTR_MODE: Final = 0x1
GETATTR_NLINK: Final = 0x2
GETATTR_UID: Final = 0x4
GETATTR_GID: Final = 0x8
GETATTR_RDEV: Final = 0x10
GETATTR_ATIME: Final = 0x20
GETATTR_MTIME: Final = 0x40
GETATTR_CTIME: Final = 0x80
GETATTR_INO: Final = 0x100
GETATTR_SIZE: Final = 0x200
GETATTR_BLOCKS: Final = 0x400
GETATTR_BASIC: Final = 0x7FF
GETATTR_ALL: Final = 0x3FFF

# Tsetattr valid
SETATTR_MODE: Final = 0x1
SETATTR_UID: Final = 0x2
SETATTR_GID: Final = 0x4
SETATTR_SIZE: Final = 0x8
SETATTR_ATIME: Final = 0x10
SETATTR_MTIME: Final = 0x20
SETATTR_CTIME: Final = 0x40
SETATTR_ATIME_SET: Final = 0x80
SETATTR_MTIME_SET: Final = 0x100

# Tlock / Tgetlock
LOCK_TYPE_RDLCK: Final = 0
LOCK_TYPE_WRLCK: Final = 1
LOCK_TYPE_UNLCK: Final = 2
LOCK_SUCCESS: Final = 0
LOCK_BLOCKED: Final = 1
LOCK_ERROR: Final = 2
LOCK_GRACE: Final = 3
LOCK_FLAGS_BLOCK: Final = 1
LOCK_FLAGS_RECLAIM: Final = 2

#: Tunlinkat flags
AT_REMOVEDIR: Final = 0x200


class P9Error(EngineError):
    """The root of the 9P package's errors."""


class RemoteProtocolError(P9Error):
    """The peer broke the protocol; the connection is unusable (disconnect)."""


class LocalProtocolError(P9Error):
    """This end's owner misused the connection (a bug on our side)."""


class _Malformed(Exception):
    """A body that does not decode as its type says (answered with EINVAL)."""


@dataclass(frozen=True)
class Qid:
    type: int
    version: int
    path: int

    def encode(self) -> bytes:
        return _QID.pack(self.type, self.version, self.path)


_QID: Final = struct.Struct("<BIQ")
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
_HEADER: Final = struct.Struct("<IBH")
_INT_KINDS: Final = {"u8": _U8, "u16": _U16, "u32": _U32, "u64": _U64}


class Message:
    """A 9P message body; subclasses are frozen dataclasses.

    ``FIELDS`` lists (name, kind) in wire order; kinds are ``u8`` ``u16``
    ``u32`` ``u64``, ``str``, ``qid``, ``data`` (count[4] + bytes), ``strs``
    (n[2] + strings) and ``qids`` (n[2] + qids).
    """

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]


_Fields = tuple[tuple[str, str], ...]


def _fields(*spec: str) -> _Fields:
    """("name:kind", ...) as ((name, kind), ...)."""
    out = []
    for s in spec:
        name, kind = s.split(":")
        out.append((name, kind))
    return tuple(out)


@dataclass(frozen=True)
class Rlerror(Message):
    TYPE: ClassVar[int] = 7
    FIELDS: ClassVar[_Fields] = _fields("ecode:u32")
    ecode: int


@dataclass(frozen=True)
class Tstatfs(Message):
    TYPE: ClassVar[int] = 8
    FIELDS: ClassVar[_Fields] = _fields("fid:u32")
    fid: int


@dataclass(frozen=True)
class Rstatfs(Message):
    TYPE: ClassVar[int] = 9
    FIELDS: ClassVar[_Fields] = _fields("type:u32", "bsize:u32", "blocks:u64", "bfree:u64",
                                        "bavail:u64", "files:u64", "ffree:u64", "fsid:u64",
                                        "namelen:u32")
    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: int
    namelen: int


@dataclass(frozen=True)
class Tlopen(Message):
    TYPE: ClassVar[int] = 12
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "flags:u32")
    fid: int
    flags: int


@dataclass(frozen=True)
class Rlopen(Message):
    TYPE: ClassVar[int] = 13
    FIELDS: ClassVar[_Fields] = _fields("qid:qid", "iounit:u32")
    qid: Qid
    iounit: int


@dataclass(frozen=True)
class Tlcreate(Message):
    TYPE: ClassVar[int] = 14
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "name:str", "flags:u32", "mode:u32", "gid:u32")
    fid: int
    name: str
    flags: int
    mode: int
    gid: int


@dataclass(frozen=True)
class Rlcreate(Message):
    TYPE: ClassVar[int] = 15
    FIELDS: ClassVar[_Fields] = _fields("qid:qid", "iounit:u32")
    qid: Qid
    iounit: int


@dataclass(frozen=True)
class Tsymlink(Message):
    TYPE: ClassVar[int] = 16
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "name:str", "symtgt:str", "gid:u32")
    fid: int
    name: str
    symtgt: str
    gid: int


@dataclass(frozen=True)
class Rsymlink(Message):
    TYPE: ClassVar[int] = 17
    FIELDS: ClassVar[_Fields] = _fields("qid:qid")
    qid: Qid


@dataclass(frozen=True)
class Tmknod(Message):
    TYPE: ClassVar[int] = 18
    FIELDS: ClassVar[_Fields] = _fields("dfid:u32", "name:str", "mode:u32", "major:u32",
                                        "minor:u32", "gid:u32")
    dfid: int
    name: str
    mode: int
    major: int
    minor: int
    gid: int


@dataclass(frozen=True)
class Rmknod(Message):
    TYPE: ClassVar[int] = 19
    FIELDS: ClassVar[_Fields] = _fields("qid:qid")
    qid: Qid


@dataclass(frozen=True)
class Trename(Message):
    TYPE: ClassVar[int] = 20
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "dfid:u32", "name:str")
    fid: int
    dfid: int
    name: str


@dataclass(frozen=True)
class Rrename(Message):
    TYPE: ClassVar[int] = 21
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Treadlink(Message):
    TYPE: ClassVar[int] = 22
    FIELDS: ClassVar[_Fields] = _fields("fid:u32")
    fid: int


@dataclass(frozen=True)
class Rreadlink(Message):
    TYPE: ClassVar[int] = 23
    FIELDS: ClassVar[_Fields] = _fields("target:str")
    target: str


@dataclass(frozen=True)
class Tgetattr(Message):
    TYPE: ClassVar[int] = 24
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "request_mask:u64")
    fid: int
    request_mask: int


@dataclass(frozen=True)
class Rgetattr(Message):
    TYPE: ClassVar[int] = 25
    FIELDS: ClassVar[_Fields] = _fields("valid:u64", "qid:qid", "mode:u32", "uid:u32", "gid:u32",
                                        "nlink:u64", "rdev:u64", "size:u64", "blksize:u64",
                                        "blocks:u64", "atime_sec:u64", "atime_nsec:u64",
                                        "mtime_sec:u64", "mtime_nsec:u64", "ctime_sec:u64",
                                        "ctime_nsec:u64", "btime_sec:u64", "btime_nsec:u64",
                                        "gen:u64", "data_version:u64")
    valid: int
    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int
    ctime_sec: int
    ctime_nsec: int
    btime_sec: int
    btime_nsec: int
    gen: int
    data_version: int


@dataclass(frozen=True)
class Tsetattr(Message):
    TYPE: ClassVar[int] = 26
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "valid:u32", "mode:u32", "uid:u32", "gid:u32",
                                        "size:u64", "atime_sec:u64", "atime_nsec:u64",
                                        "mtime_sec:u64", "mtime_nsec:u64")
    fid: int
    valid: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_sec: int
    atime_nsec: int
    mtime_sec: int
    mtime_nsec: int


@dataclass(frozen=True)
class Rsetattr(Message):
    TYPE: ClassVar[int] = 27
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Txattrwalk(Message):
    TYPE: ClassVar[int] = 30
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "newfid:u32", "name:str")
    fid: int
    newfid: int
    name: str


@dataclass(frozen=True)
class Rxattrwalk(Message):
    TYPE: ClassVar[int] = 31
    FIELDS: ClassVar[_Fields] = _fields("size:u64")
    size: int


@dataclass(frozen=True)
class Txattrcreate(Message):
    TYPE: ClassVar[int] = 32
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "name:str", "attr_size:u64", "flags:u32")
    fid: int
    name: str
    attr_size: int
    flags: int


@dataclass(frozen=True)
class Rxattrcreate(Message):
    TYPE: ClassVar[int] = 33
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Treaddir(Message):
    TYPE: ClassVar[int] = 40
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "offset:u64", "count:u32")
    fid: int
    offset: int
    count: int


@dataclass(frozen=True)
class Rreaddir(Message):
    TYPE: ClassVar[int] = 41
    FIELDS: ClassVar[_Fields] = _fields("data:data")
    data: bytes


@dataclass(frozen=True)
class Tfsync(Message):
    TYPE: ClassVar[int] = 50
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "datasync:u32")
    fid: int
    datasync: int


@dataclass(frozen=True)
class Rfsync(Message):
    TYPE: ClassVar[int] = 51
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Tlock(Message):
    TYPE: ClassVar[int] = 52
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "type:u8", "flags:u32", "start:u64",
                                        "length:u64", "proc_id:u32", "client_id:str")
    fid: int
    type: int
    flags: int
    start: int
    length: int
    proc_id: int
    client_id: str


@dataclass(frozen=True)
class Rlock(Message):
    TYPE: ClassVar[int] = 53
    FIELDS: ClassVar[_Fields] = _fields("status:u8")
    status: int


@dataclass(frozen=True)
class Tgetlock(Message):
    TYPE: ClassVar[int] = 54
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "type:u8", "start:u64", "length:u64",
                                        "proc_id:u32", "client_id:str")
    fid: int
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@dataclass(frozen=True)
class Rgetlock(Message):
    TYPE: ClassVar[int] = 55
    FIELDS: ClassVar[_Fields] = _fields("type:u8", "start:u64", "length:u64", "proc_id:u32",
                                        "client_id:str")
    type: int
    start: int
    length: int
    proc_id: int
    client_id: str


@dataclass(frozen=True)
class Tlink(Message):
    TYPE: ClassVar[int] = 70
    FIELDS: ClassVar[_Fields] = _fields("dfid:u32", "fid:u32", "name:str")
    dfid: int
    fid: int
    name: str


@dataclass(frozen=True)
class Rlink(Message):
    TYPE: ClassVar[int] = 71
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Tmkdir(Message):
    TYPE: ClassVar[int] = 72
    FIELDS: ClassVar[_Fields] = _fields("dfid:u32", "name:str", "mode:u32", "gid:u32")
    dfid: int
    name: str
    mode: int
    gid: int


@dataclass(frozen=True)
class Rmkdir(Message):
    TYPE: ClassVar[int] = 73
    FIELDS: ClassVar[_Fields] = _fields("qid:qid")
    qid: Qid


@dataclass(frozen=True)
class Trenameat(Message):
    TYPE: ClassVar[int] = 74
    FIELDS: ClassVar[_Fields] = _fields("olddirfid:u32", "oldname:str", "newdirfid:u32",
                                        "newname:str")
    olddirfid: int
    oldname: str
    newdirfid: int
    newname: str


@dataclass(frozen=True)
class Rrenameat(Message):
    TYPE: ClassVar[int] = 75
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Tunlinkat(Message):
    TYPE: ClassVar[int] = 76
    FIELDS: ClassVar[_Fields] = _fields("dirfid:u32", "name:str", "flags:u32")
    dirfid: int
    name: str
    flags: int


@dataclass(frozen=True)
class Runlinkat(Message):
    TYPE: ClassVar[int] = 77
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Tversion(Message):
    TYPE: ClassVar[int] = 100
    FIELDS: ClassVar[_Fields] = _fields("msize:u32", "version:str")
    msize: int
    version: str


@dataclass(frozen=True)
class Rversion(Message):
    TYPE: ClassVar[int] = 101
    FIELDS: ClassVar[_Fields] = _fields("msize:u32", "version:str")
    msize: int
    version: str


@dataclass(frozen=True)
class Tauth(Message):
    TYPE: ClassVar[int] = 102
    FIELDS: ClassVar[_Fields] = _fields("afid:u32", "uname:str", "aname:str", "n_uname:u32")
    afid: int
    uname: str
    aname: str
    n_uname: int


@dataclass(frozen=True)
class Rauth(Message):
    TYPE: ClassVar[int] = 103
    FIELDS: ClassVar[_Fields] = _fields("aqid:qid")
    aqid: Qid


@dataclass(frozen=True)
class Tattach(Message):
    TYPE: ClassVar[int] = 104
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "afid:u32", "uname:str", "aname:str",
                                        "n_uname:u32")
    fid: int
    afid: int
    uname: str
    aname: str
    n_uname: int


@dataclass(frozen=True)
class Rattach(Message):
    TYPE: ClassVar[int] = 105
    FIELDS: ClassVar[_Fields] = _fields("qid:qid")
    qid: Qid


@dataclass(frozen=True)
class Tflush(Message):
    TYPE: ClassVar[int] = 108
    FIELDS: ClassVar[_Fields] = _fields("oldtag:u16")
    oldtag: int


@dataclass(frozen=True)
class Rflush(Message):
    TYPE: ClassVar[int] = 109
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Twalk(Message):
    TYPE: ClassVar[int] = 110
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "newfid:u32", "wnames:strs")
    fid: int
    newfid: int
    wnames: tuple[str, ...]


@dataclass(frozen=True)
class Rwalk(Message):
    TYPE: ClassVar[int] = 111
    FIELDS: ClassVar[_Fields] = _fields("wqids:qids")
    wqids: tuple[Qid, ...]


@dataclass(frozen=True)
class Tread(Message):
    TYPE: ClassVar[int] = 116
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "offset:u64", "count:u32")
    fid: int
    offset: int
    count: int


@dataclass(frozen=True)
class Rread(Message):
    TYPE: ClassVar[int] = 117
    FIELDS: ClassVar[_Fields] = _fields("data:data")
    data: bytes


@dataclass(frozen=True)
class Twrite(Message):
    TYPE: ClassVar[int] = 118
    FIELDS: ClassVar[_Fields] = _fields("fid:u32", "offset:u64", "data:data")
    fid: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Rwrite(Message):
    TYPE: ClassVar[int] = 119
    FIELDS: ClassVar[_Fields] = _fields("count:u32")
    count: int


@dataclass(frozen=True)
class Tclunk(Message):
    TYPE: ClassVar[int] = 120
    FIELDS: ClassVar[_Fields] = _fields("fid:u32")
    fid: int


@dataclass(frozen=True)
class Rclunk(Message):
    TYPE: ClassVar[int] = 121
    FIELDS: ClassVar[_Fields] = _fields()


@dataclass(frozen=True)
class Tremove(Message):
    TYPE: ClassVar[int] = 122
    FIELDS: ClassVar[_Fields] = _fields("fid:u32")
    fid: int


@dataclass(frozen=True)
class Rremove(Message):
    TYPE: ClassVar[int] = 123
    FIELDS: ClassVar[_Fields] = _fields()


def _all_messages() -> list[type[Message]]:
    return [c for c in globals().values()
            if isinstance(c, type) and issubclass(c, Message) and c is not Message]


#: the T-messages a server takes and the R-messages a client takes, by type
REQUESTS: Final[dict[int, type[Message]]] = {
    c.TYPE: c for c in _all_messages() if c.__name__.startswith("T")}
REPLIES: Final[dict[int, type[Message]]] = {
    c.TYPE: c for c in _all_messages() if c.__name__.startswith("R")}


# --- encoding -------------------------------------------------------------------------

def _encode_str(value: str) -> bytes:
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise LocalProtocolError(f"9P string cannot be encoded: {value!r}") from e
    if len(raw) > 0xFFFF:
        raise LocalProtocolError(f"9P string of {len(raw)} bytes is too long")
    return _U16.pack(len(raw)) + raw


def _encode_field(kind: str, value: Any, out: bytearray) -> None:
    packer = _INT_KINDS.get(kind)
    if packer is not None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise LocalProtocolError(f"9P {kind} field is not an int: {value!r}")
        try:
            out += packer.pack(value)
        except struct.error as e:
            raise LocalProtocolError(f"9P {kind} field out of range: {value}") from e
    elif kind == "str":
        out += _encode_str(value)
    elif kind == "qid":
        if not isinstance(value, Qid):
            raise LocalProtocolError(f"9P qid field is not a Qid: {value!r}")
        try:
            out += value.encode()
        except struct.error as e:
            raise LocalProtocolError(f"9P qid out of range: {value}") from e
    elif kind == "data":
        data = bytes(value)
        if len(data) > 0xFFFFFFFF:
            raise LocalProtocolError("9P data field too long")
        out += _U32.pack(len(data)) + data
    elif kind == "strs":
        if len(value) > 0xFFFF:
            raise LocalProtocolError("too many 9P strings")
        out += _U16.pack(len(value))
        for s in value:
            out += _encode_str(s)
    elif kind == "qids":
        if len(value) > 0xFFFF:
            raise LocalProtocolError("too many 9P qids")
        out += _U16.pack(len(value))
        for q in value:
            _encode_field("qid", q, out)
    else:  # pragma: no cover - a typo in a FIELDS table
        raise AssertionError(kind)


def encode(tag: int, message: Message) -> bytes:
    """One whole message (header and body); raises LocalProtocolError on bad fields."""
    if not 0 <= tag <= 0xFFFF:
        raise LocalProtocolError(f"9P tag out of range: {tag}")
    body = bytearray()
    for name, kind in message.FIELDS:
        _encode_field(kind, getattr(message, name), body)
    size = HEADER_SIZE + len(body)
    if size > 0xFFFFFFFF:
        raise LocalProtocolError("9P message too long")
    return _HEADER.pack(size, message.TYPE, tag) + bytes(body)


# --- decoding -------------------------------------------------------------------------

class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise _Malformed(f"field past the end of the message (at byte {self.pos})")
        view = self.buf[self.pos:end]
        self.pos = end
        return view

    def int(self, packer: struct.Struct) -> int:
        value: int = packer.unpack(self.take(packer.size))[0]
        return value

    def str(self) -> str:
        n = self.int(_U16)
        if n > MAX_STRING:
            raise _Malformed(f"string of {n} bytes (at most {MAX_STRING})")
        return bytes(self.take(n)).decode("utf-8", "surrogateescape")

    def qid(self) -> Qid:
        t, v, p = _QID.unpack(self.take(_QID.size))
        return Qid(t, v, p)


def _decode_field(kind: str, r: _Reader) -> Any:
    packer = _INT_KINDS.get(kind)
    if packer is not None:
        return r.int(packer)
    if kind == "str":
        return r.str()
    if kind == "qid":
        return r.qid()
    if kind == "data":
        n = r.int(_U32)
        return bytes(r.take(n))
    if kind == "strs":
        n = r.int(_U16)
        if n > MAX_WELEM:
            raise _Malformed(f"{n} names in one walk (at most {MAX_WELEM})")
        return tuple(r.str() for _ in range(n))
    if kind == "qids":
        n = r.int(_U16)
        if n > MAX_WELEM:
            raise _Malformed(f"{n} qids in one walk (at most {MAX_WELEM})")
        return tuple(r.qid() for _ in range(n))
    raise AssertionError(kind)  # pragma: no cover


def decode_body(cls: type[Message], body: Union[bytes, memoryview]) -> Message:
    """Decode ``body`` as a ``cls``; raises ValueError when it does not fit exactly."""
    r = _Reader(memoryview(body))
    try:
        values = [_decode_field(kind, r) for _, kind in cls.FIELDS]
    except _Malformed as e:
        raise ValueError(str(e)) from None
    if r.pos != len(r.buf):
        raise ValueError(f"{len(r.buf) - r.pos} bytes after the last field")
    return cls(*values)


# --- readdir entries ------------------------------------------------------------------

@dataclass(frozen=True)
class Dirent:
    qid: Qid
    #: the offset to pass to the next Treaddir to continue after this entry
    offset: int
    type: int
    name: str


_DIRENT_FIXED: Final = _QID.size + 8 + 1 + 2


def encode_dirent(entry: Dirent) -> bytes:
    out = bytearray(entry.qid.encode())
    out += _U64.pack(entry.offset) + _U8.pack(entry.type)
    out += _encode_str(entry.name)
    return bytes(out)


def dirent_size(name: str) -> int:
    """Bytes :func:`encode_dirent` produces for ``name``."""
    return _DIRENT_FIXED + len(name.encode("utf-8", "surrogateescape"))


def decode_dirents(data: bytes) -> list[Dirent]:
    """The entries of an Rreaddir's data; raises ValueError when malformed."""
    r = _Reader(memoryview(data))
    out = []
    try:
        while r.pos < len(r.buf):
            qid = r.qid()
            offset = r.int(_U64)
            type_ = r.int(_U8)
            out.append(Dirent(qid, offset, type_, r.str()))
    except _Malformed as e:
        raise ValueError(str(e)) from None
    return out


# --- version negotiation --------------------------------------------------------------

def negotiate_version(request: Tversion, max_msize: int) -> Message:
    """The server's answer to Tversion: Rversion (9P2000.L or "unknown") or Rlerror."""
    if request.version != VERSION:
        return Rversion(min(request.msize, max_msize), UNKNOWN_VERSION)
    if request.msize < MIN_MSIZE:
        return Rlerror(errno.EINVAL)
    return Rversion(min(request.msize, max_msize), VERSION)


# --- the connection -------------------------------------------------------------------

class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class State(enum.Enum):
    #: no version negotiated yet
    INIT = "init"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True)
class Received:
    """A well-formed message (a request on a server, a reply on a client)."""

    tag: int
    message: Message


@dataclass(frozen=True)
class Invalid:
    """A well-framed request the server must answer with ``Rlerror(errno)``."""

    tag: int
    errno: int
    reason: str


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer ended its input between messages."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
Event = Union[Received, Invalid, ConnectionClosed]


class Connection:
    """One end of a 9P2000.L conversation; see the module's docstring."""

    def __init__(self, role: Role, max_msize: int = DEFAULT_MAX_MSIZE) -> None:
        if max_msize < MIN_MSIZE:
            raise LocalProtocolError(f"max_msize {max_msize} below {MIN_MSIZE}")
        self.role = role
        self.max_msize = max_msize
        #: the negotiated msize (max_msize until a version is agreed)
        self.msize = max_msize
        self.state = State.INIT
        self._buf = bytearray()
        self._eof = False
        #: tags awaiting a reply (server: received; client: sent), with the request type
        self._pending: dict[int, int] = {}
        #: client side: Tflush tag -> the tag it flushes
        self._flushing: dict[int, int] = {}
        self._takes = REQUESTS if role is Role.SERVER else REPLIES
        self._sends = REPLIES if role is Role.SERVER else REQUESTS

    # ---- input -----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

    @property
    def wants_data(self) -> bool:
        """Whether the owner should read more (the buffer holds less than one message)."""
        return self.state in (State.INIT, State.READY) and not self._eof \
            and len(self._buf) < self.msize

    @property
    def pending_tags(self) -> frozenset[int]:
        return frozenset(self._pending)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` marks the end of its input.

        The buffer is bounded: feeding more while it already holds ``max_msize``
        bytes is local misuse (read only while :attr:`wants_data`).
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("receive_data on a connection in ERROR state")
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data after end of input")
            return
        if not data:
            self._eof = True
            return
        if len(self._buf) + len(data) > 2 * self.max_msize:
            raise LocalProtocolError("9P receive buffer over its bound: call next_event first")
        self._buf += data

    def _fail(self, message: str) -> RemoteProtocolError:
        self.state = State.ERROR
        return RemoteProtocolError(message)

    def next_event(self) -> Union[Event, _NeedData]:
        """The next event, or NEED_DATA; raises RemoteProtocolError on a broken peer."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("9P connection already failed")
        if self.state is State.CLOSED:
            return ConnectionClosed()
        buf = self._buf
        if len(buf) < 4:
            return self._end_or_need()
        (size,) = _U32.unpack_from(buf, 0)
        if size < HEADER_SIZE:
            raise self._fail(f"9P message size {size} is below the header's {HEADER_SIZE}")
        if size > self.msize:
            raise self._fail(f"9P message of {size} bytes exceeds msize {self.msize}")
        if len(buf) < size:
            return self._end_or_need()
        _, type_, tag = _HEADER.unpack_from(buf, 0)
        body = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        if self.role is Role.SERVER:
            return self._request(type_, tag, body)
        return self._reply(type_, tag, body)

    def _end_or_need(self) -> Union[ConnectionClosed, _NeedData]:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise self._fail(f"9P input ended inside a message ({len(self._buf)} bytes)")
        self.state = State.CLOSED
        return ConnectionClosed()

    def _request(self, type_: int, tag: int, body: bytes) -> Event:
        if tag in self._pending and type_ != Tversion.TYPE:
            raise self._fail(f"9P tag {tag} reused while its request is pending")
        cls = self._takes.get(type_)
        if cls is None:
            self._pending[tag] = type_
            return Invalid(tag, errno.EOPNOTSUPP, f"message type {type_} not supported")
        try:
            message = decode_body(cls, body)
        except ValueError as e:
            self._pending[tag] = type_
            return Invalid(tag, errno.EINVAL, f"malformed {cls.__name__}: {e}")
        if isinstance(message, Tversion):
            # a version request aborts everything outstanding and starts a new session
            self._pending.clear()
        elif self.state is State.INIT:
            self._pending[tag] = type_
            return Invalid(tag, errno.EPROTO, f"{cls.__name__} before Tversion")
        self._pending[tag] = type_
        return Received(tag, message)

    def _reply(self, type_: int, tag: int, body: bytes) -> Event:
        if tag not in self._pending:
            raise self._fail(f"9P reply for tag {tag}, which has no request pending")
        cls = self._takes.get(type_)
        if cls is None:
            raise self._fail(f"9P reply of unknown type {type_}")
        try:
            message = decode_body(cls, body)
        except ValueError as e:
            raise self._fail(f"malformed {cls.__name__}: {e}") from None
        request_type = self._pending.pop(tag)
        if not isinstance(message, Rlerror) and type_ != request_type + 1:
            raise self._fail(f"{cls.__name__} answers a request of type {request_type}")
        if isinstance(message, Rversion):
            if message.version == VERSION:
                if not MIN_MSIZE <= message.msize <= self.max_msize:
                    raise self._fail(f"server's msize {message.msize} out of range")
                self.msize = message.msize
                self.state = State.READY
        if isinstance(message, Rflush):
            old = self._flushing.pop(tag, None)
            if old is not None:
                self._pending.pop(old, None)
        return Received(tag, message)

    # ---- output ----------------------------------------------------------------------

    def send(self, tag: int, message: Message) -> bytes:
        """The bytes of ``message`` under ``tag``; raises LocalProtocolError on misuse."""
        if self.state in (State.ERROR, State.CLOSED):
            raise LocalProtocolError(f"send on a connection in {self.state.name} state")
        if self._sends.get(message.TYPE) is not type(message):
            raise LocalProtocolError(
                f"a {self.role.value} does not send {type(message).__name__}")
        data = encode(tag, message)
        if len(data) > self.msize:
            raise LocalProtocolError(f"{type(message).__name__} of {len(data)} bytes "
                                     f"exceeds msize {self.msize}")
        if self.role is Role.SERVER:
            if tag not in self._pending:
                raise LocalProtocolError(f"reply for tag {tag}, which has no request pending")
            request_type = self._pending[tag]
            if not isinstance(message, Rlerror) and message.TYPE != request_type + 1:
                raise LocalProtocolError(f"{type(message).__name__} does not answer "
                                         f"a request of type {request_type}")
            del self._pending[tag]
            if isinstance(message, Rversion) and message.version == VERSION:
                if not MIN_MSIZE <= message.msize <= self.max_msize:
                    raise LocalProtocolError(f"msize {message.msize} out of range")
                self.msize = message.msize
                self.state = State.READY
        else:
            if tag in self._pending:
                raise LocalProtocolError(f"tag {tag} is already pending")
            if self.state is State.INIT and not isinstance(message, Tversion):
                raise LocalProtocolError("send Tversion first")
            if isinstance(message, Tversion):
                self._pending.clear()
                self._flushing.clear()
            if isinstance(message, Tflush):
                self._flushing[tag] = message.oldtag
            self._pending[tag] = message.TYPE
        return data


def message_fields(message: Message) -> dict[str, Any]:
    """A message's fields by name (for logs and tests)."""
    return {f.name: getattr(message, f.name) for f in fields(message)}  # type: ignore[arg-type]


def rlerror_for(exc: BaseException) -> Optional[int]:
    """The errno an OSError carries, if any."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return None
