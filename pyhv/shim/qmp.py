"""QMP, the QEMU Machine Protocol, as a sans-I/O state machine (h11-style).

A :class:`QmpConnection` never touches a socket.  The owner feeds it the bytes
it read (:meth:`QmpConnection.receive_data`), takes parsed events out
(:meth:`QmpConnection.next_event`) and writes out the bytes the connection
produces (:meth:`greeting`, :meth:`reply`, :meth:`error`, :meth:`event`).

What it does the way QEMU 7.2 does, because libvirt depends on it:

* every message it writes is one line of JSON ended by ``\\r\\n`` (libvirt
  splits its input on ``\\r\\n``);
* the input is a stream of JSON values, not of lines: an object may span lines,
  several may share one; a value that is not an object gets
  ``GenericError "QMP input must be a JSON object"``;
* malformed JSON gets ``GenericError "JSON parse error, ..."`` and the
  connection keeps working: after an error the rest of that line is skipped;
* until ``qmp_capabilities`` succeeds only ``qmp_capabilities`` is accepted
  (``CommandNotFound "Expecting capabilities negotiation with
  'qmp_capabilities'"``), and no events are sent;
* the ``id`` of a command is echoed back verbatim, whatever JSON value it is;
* out-of-band execution is not offered (the greeting's capabilities are ``[]``).

Input is bounded: a value larger than :attr:`QmpConnection.max_message` bytes
or nested deeper than :attr:`QmpConnection.max_depth` is answered with an
error and skipped to the end of its line, so a peer cannot make the
connection hold more than ``max_message`` bytes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Optional, Union

from pyhv import __version__
from pyhv.engine.fds import close_fds

#: (major, minor, micro) of the QEMU release pyhv-qemu presents itself as
QEMU_VERSION: Final = (7, 2, 0)
PACKAGE: Final = f"pyhv {__version__}"

GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
DEVICE_NOT_FOUND: Final = "DeviceNotFound"
DEVICE_NOT_ACTIVE: Final = "DeviceNotActive"
KVM_MISSING_CAP: Final = "KVMMissingCap"

NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"

_WHITESPACE: Final = frozenset(b" \t\r\n")
#: bytes that may appear outside strings inside a JSON value
_VALUE_BYTES: Final = frozenset(b" \t\r\n{}[]:,-+.0123456789eEtruefalsn")
_TOP_LEVEL_MEMBERS: Final = frozenset({"execute", "arguments", "id", "exec-oob"})


class QmpError(Exception):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Command:
    """A well-formed command to execute."""

    name: str
    arguments: dict[str, Any]
    #: the command's ``id``, any JSON value (meaningful only when ``has_id``)
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class Rejected:
    """Input the connection refused; answer it with :meth:`QmpConnection.reject`."""

    error_class: str
    desc: str
    id: Any = None
    has_id: bool = False


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`QmpConnection.next_event` has nothing more until more bytes arrive
NEED_DATA: Final = _NeedData()

Event = Union[Command, Rejected]


def timestamp(now: Optional[float] = None) -> dict[str, int]:
    """QEMU's event timestamp: wall-clock seconds and microseconds."""
    t = time.time() if now is None else now
    micros = int(round(t * 1_000_000))
    return {"seconds": micros // 1_000_000, "microseconds": micros % 1_000_000}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid constant {name}")


def _finite_float(text: str) -> float:
    # 1e999 would come back as Infinity, which no reply can carry (an echoed id)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} out of range")
    return value


@dataclass
class _Scanner:
    """Splits a byte stream into top-level JSON values, bounded in size and depth."""

    max_message: int
    max_depth: int
    buf: bytearray = field(default_factory=bytearray)
    #: bytes of the value being collected (empty between values)
    value: bytearray = field(default_factory=bytearray)
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    #: skipping input up to the next newline after an error
    discarding: bool = False
    #: a top-level scalar (number or keyword) is being collected
    scalar: bool = False

    def reset_value(self) -> None:
        self.value.clear()
        self.depth = 0
        self.in_string = self.escape = self.scalar = False

    def fail(self) -> None:
        """Drop the value being collected and skip to the end of the line."""
        self.reset_value()
        self.discarding = True

    def next_value(self) -> Union[bytes, tuple[str], None]:
        """The next complete value, ``(error message,)`` for bad input, or None."""
        i = 0
        buf = self.buf
        n = len(buf)
        try:
            while i < n:
                c = buf[i]
                i += 1
                if self.discarding:
                    if c == 0x0A:
                        self.discarding = False
                    continue
                if self.scalar:
                    if c in _WHITESPACE or c in b"{}[]:,\"":
                        i -= 1  # the delimiter belongs to what follows
                        done = bytes(self.value)
                        self.reset_value()
                        return done
                    if c not in _VALUE_BYTES:
                        self.fail()
                        return ("JSON parse error, invalid keyword",)
                    self.value.append(c)
                elif self.in_string:
                    self.value.append(c)
                    if self.escape:
                        self.escape = False
                    elif c == 0x5C:  # backslash
                        self.escape = True
                    elif c == 0x22:  # closing quote
                        self.in_string = False
                        if self.depth == 0:
                            done = bytes(self.value)
                            self.reset_value()
                            return done
                    elif c < 0x20:
                        self.fail()
                        return ("JSON parse error, control character in string",)
                elif self.depth == 0:
                    if c in _WHITESPACE:
                        continue
                    if c in b"{[":
                        self.depth = 1
                        self.value.append(c)
                    elif c == 0x22:
                        self.in_string = True
                        self.value.append(c)
                    elif c in b"-0123456789tfn":
                        self.scalar = True
                        self.value.append(c)
                    else:
                        self.fail()
                        return ("JSON parse error, expecting value",)
                else:
                    if c == 0x22:
                        self.in_string = True
                    elif c in b"{[":
                        self.depth += 1
                        if self.depth > self.max_depth:
                            self.fail()
                            return ("JSON nesting depth limit exceeded",)
                    elif c in b"}]":
                        self.depth -= 1
                    elif c not in _VALUE_BYTES:
                        self.fail()
                        return ("JSON parse error, invalid character",)
                    self.value.append(c)
                    if self.depth == 0:
                        done = bytes(self.value)
                        self.reset_value()
                        return done
                if len(self.value) > self.max_message:
                    self.fail()
                    return ("JSON token size limit exceeded",)
            return None
        finally:
            del buf[:i]


class QmpConnection:
    """One QMP session, server side."""

    #: the largest JSON value accepted, in bytes
    max_message: int = 1 << 20
    #: the deepest nesting of objects and arrays accepted
    max_depth: int = 64

    def __init__(self, *, package: str = PACKAGE,
                 version: tuple[int, int, int] = QEMU_VERSION,
                 clock: Callable[[], float] = time.time,
                 max_message: Optional[int] = None,
                 max_depth: Optional[int] = None) -> None:
        self.package = package
        self.version = version
        self.clock = clock
        if max_message is not None:
            self.max_message = max_message
        if max_depth is not None:
            self.max_depth = max_depth
        self._scanner = _Scanner(self.max_message, self.max_depth)
        #: capabilities negotiation is over: commands are accepted, events sent
        self.negotiated = False
        self.closed = False
        #: descriptors that came with the last bytes carrying any (SCM_RIGHTS)
        self.fds: list[int] = []

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; ``b""`` means it closed its end."""
        if not data:
            self.closed = True
            return
        self._scanner.buf += data

    def receive_fds(self, fds: list[int]) -> None:
        """Descriptors the peer sent: they replace (and close) any that no command
        took."""
        self.drop_fds()
        self.fds = list(fds)

    def take_fd(self) -> Optional[int]:
        """The last descriptor received, handed over (None: none is waiting)."""
        return self.fds.pop() if self.fds else None

    def drop_fds(self) -> None:
        """Close the descriptors no command took."""
        close_fds(self.fds)
        self.fds = []

    @property
    def buffered(self) -> int:
        """Bytes held: unscanned input plus the value being collected."""
        return len(self._scanner.buf) + len(self._scanner.value)

    def next_event(self) -> Union[Event, _NeedData]:
        """The next command or rejected input, or :data:`NEED_DATA`."""
        got = self._scanner.next_value()
        if got is None:
            return NEED_DATA
        if isinstance(got, tuple):
            return Rejected(GENERIC_ERROR, got[0])
        return self._parse(got)

    def _parse(self, raw: bytes) -> Event:
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                             parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return Rejected(GENERIC_ERROR, f"JSON parse error, {reason[:100]}")
        if not isinstance(obj, dict):
            return Rejected(GENERIC_ERROR, "QMP input must be a JSON object")
        has_id = "id" in obj
        cid = obj.get("id")

        def reject(desc: str, cls: str = GENERIC_ERROR) -> Rejected:
            return Rejected(cls, desc, cid, has_id)

        for key in obj:
            if key not in _TOP_LEVEL_MEMBERS:
                return reject(f"QMP input member '{key}' is unexpected")
        if "exec-oob" in obj:
            if not isinstance(obj["exec-oob"], str):
                return reject("QMP input member 'exec-oob' must be a string")
            return reject(f"The command {obj['exec-oob']} does not support OOB")
        if "execute" not in obj:
            return reject("QMP input lacks member 'execute'")
        name = obj["execute"]
        if not isinstance(name, str):
            return reject("QMP input member 'execute' must be a string")
        args = obj.get("arguments", {})
        if not isinstance(args, dict):
            return reject("QMP input member 'arguments' must be an object")
        if not self.negotiated and name != "qmp_capabilities":
            return reject(NEGOTIATION_REQUIRED, COMMAND_NOT_FOUND)
        return Command(name, args, cid, has_id)

    # ----------------------------------------------------------------- output

    def complete_negotiation(self) -> None:
        """``qmp_capabilities`` succeeded: enter command mode."""
        self.negotiated = True

    def greeting(self) -> bytes:
        major, minor, micro = self.version
        return _encode({"QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                        "package": self.package},
            "capabilities": [],
        }})

    def reply(self, cid: Any, result: Any, *, has_id: bool = True) -> bytes:
        msg: dict[str, Any] = {"return": result}
        if has_id:
            msg["id"] = cid
        return _encode(msg)

    def error(self, cid: Any, error_class: str, desc: str, *, has_id: bool = True) -> bytes:
        msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if has_id:
            msg["id"] = cid
        return _encode(msg)

    def reply_to(self, command: Command, result: Any) -> bytes:
        return self.reply(command.id, result, has_id=command.has_id)

    def error_to(self, command: Command, err: QmpError) -> bytes:
        return self.error(command.id, err.error_class, err.desc, has_id=command.has_id)

    def reject(self, rejected: Rejected) -> bytes:
        return self.error(rejected.id, rejected.error_class, rejected.desc,
                          has_id=rejected.has_id)

    def event(self, name: str, data: Optional[dict[str, Any]] = None) -> bytes:
        """An asynchronous event; nothing (``b""``) before negotiation is over."""
        if not self.negotiated:
            return b""
        msg: dict[str, Any] = {"event": name}
        if data is not None:
            msg["data"] = data
        msg["timestamp"] = timestamp(self.clock())
        return _encode(msg)


# ------------------------------------------------------------------ events

#: ``SHUTDOWN``'s reasons (QEMU's ShutdownCause)
SHUTDOWN_CAUSES: Final = (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
    "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
    "snapshot-load",
)


def _guest_cause(reason: str) -> bool:
    if reason not in SHUTDOWN_CAUSES:
        raise ValueError(f"unknown shutdown cause {reason!r}")
    return reason.startswith("guest-")


def shutdown_event(reason: str) -> tuple[str, dict[str, Any]]:
    """``SHUTDOWN`` (``reason`` one of :data:`SHUTDOWN_CAUSES`)."""
    return "SHUTDOWN", {"guest": _guest_cause(reason), "reason": reason}


def reset_event(reason: str) -> tuple[str, dict[str, Any]]:
    """``RESET``: ``guest-reset``, ``host-qmp-system-reset``..."""
    return "RESET", {"guest": _guest_cause(reason), "reason": reason}


def powerdown_event() -> tuple[str, None]:
    return "POWERDOWN", None


def stop_event() -> tuple[str, None]:
    return "STOP", None


def resume_event() -> tuple[str, None]:
    return "RESUME", None


def guest_panicked_event(action: str = "pause") -> tuple[str, dict[str, Any]]:
    """``GUEST_PANICKED``; ``action`` is ``pause``, ``poweroff`` or ``run``."""
    return "GUEST_PANICKED", {"action": action}
