"""QMP: the byte-stream decoder (``pyhv.shim.qmp``) and the command dispatcher
(``pyhv.shim.commands``), as one ``QmpSession`` per input.

Input: the bytes a QMP client sends.  Accepted: every reply is one line of JSON,
a ``return`` or an ``error`` object.  A handler that fails with anything but
:class:`QmpError` is a finding, although the dispatcher turns it into a
``GenericError`` reply to keep the session alive.  The session must answer the
same however the input is split into reads.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Optional

from fuzz.common import Finding, bytes_constants, calls, test_files, unique
from pyhv.shim import schema as qapi
from pyhv.shim.commands import Commands, QmpSession
from pyhv.shim.qmp import QmpConnection, QmpError

MAX_LEN = 4096
#: read sizes the chunked session uses in turn
CHUNKS = (1, 7, 2, 64, 3, 13)


class _Checked(Commands):
    """Commands that remember a handler failing with something other than QmpError."""

    bug: Optional[BaseException] = None

    def execute(self, name: str, args: dict[str, Any], conn: QmpConnection) -> Any:
        try:
            return super().execute(name, args, conn)
        except QmpError:
            raise
        except Exception as e:
            self.bug = e
            raise


def _fake_machine() -> Any:
    """The unit tests' MachineControl (records calls), when it can be imported."""
    try:
        tests: Any = importlib.import_module("test_qmp_commands")
        return tests.FakeMachine()
    except Exception:
        return None


def _check_output(out: bytes) -> None:
    if not out:
        return
    if not out.endswith(b"\r\n"):
        raise Finding(f"output does not end with CRLF: {out[-80:]!r}")
    for line in out.split(b"\r\n")[:-1]:
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise Finding(f"reply is not JSON: {line[:200]!r}") from e
        if not isinstance(msg, dict) or ("return" in msg) == ("error" in msg):
            raise Finding(f"reply is neither a return nor an error: {line[:200]!r}")
        if set(msg) - {"return", "error", "id"}:
            raise Finding(f"unexpected members in reply: {line[:200]!r}")
        if "error" in msg:
            err = msg["error"]
            if not (isinstance(err, dict) and isinstance(err.get("class"), str)
                    and isinstance(err.get("desc"), str)):
                raise Finding(f"malformed error reply: {line[:200]!r}")


_COMMANDS: list[_Checked] = []


def _commands(machine: Any) -> _Checked:
    """One Commands for every input (building one costs more than most inputs), reset."""
    if not _COMMANDS:
        _COMMANDS.append(_Checked(None))
    commands = _COMMANDS[0]
    commands.machine = machine
    commands.quit_requested = False
    commands.bug = None
    return commands


def _run(data: bytes, machine: Any, chunked: bool, **limits: int) -> bytes:
    commands = _commands(machine)
    session = QmpSession(commands, QmpConnection(clock=lambda: 0.0, **limits))
    out = bytearray()
    if not chunked:
        out += session.feed(data) if data else b""
    else:
        i = k = 0
        while i < len(data) and not session.done:
            n = CHUNKS[k % len(CHUNKS)]
            out += session.feed(data[i:i + n])
            i, k = i + n, k + 1
    if commands.bug is not None:
        raise Finding(f"handler raised {type(commands.bug).__name__}, not QmpError") \
            from commands.bug
    if not session.done and session.conn.buffered > session.conn.max_message:
        raise Finding(f"session holds {session.conn.buffered} bytes, "
                      f"limit {session.conn.max_message}")
    _check_output(bytes(out))
    return bytes(out)


def TARGET(data: bytes) -> None:
    whole = _run(data, None, False)
    chunked = _run(data, None, True)
    if whole != chunked:
        raise Finding(f"replies depend on how the input was split:\n{whole!r}\n{chunked!r}")
    machine = _fake_machine()
    if machine is not None:
        _run(data, machine, True, max_message=256, max_depth=6)


def seeds() -> list[bytes]:
    cap = b'{"execute": "qmp_capabilities", "id": "libvirt-1"}\r\n'
    out = [cap + b'{"execute": "%s", "id": "libvirt-2"}\r\n' % name.encode()
           for name in qapi.SCHEMA.commands]
    for name, kwargs in calls(test_files("test_qmp_*.py"), ("ok", "err", "call")):
        msg: dict[str, Any] = {"execute": name, "id": "libvirt-2"}
        if kwargs:
            msg["arguments"] = kwargs
        try:
            out.append(cap + json.dumps(msg).encode() + b"\r\n")
        except (TypeError, ValueError):
            continue
    for blob in bytes_constants(test_files("test_qmp_*.py")):
        out.append(blob)
        out.append(cap + blob)
    return unique(out)


def dictionary() -> list[bytes]:
    tokens = {f'"{name}"' for name in qapi.SCHEMA.commands}
    for t in qapi.SCHEMA.types.values():
        tokens |= {f'"{m.name}"' for m in getattr(t, "members", ())}
        tokens |= {f'"{v}"' for v in getattr(t, "values", ())}
    tokens |= {'"execute"', '"arguments"', '"id"', '"exec-oob"', '"qmp_capabilities"',
               "true", "false", "null", "\r\n", "{}", "[]", '\\"', "\\u0000", "1e999"}
    return sorted(t.encode() for t in tokens)
