"""pyhv.shim.qmp: the sans-I/O QMP connection, fed bytes in memory."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pyhv.shim.qmp import (
    NEED_DATA,
    Command,
    QmpConnection,
    Rejected,
    reset_event,
    shutdown_event,
    timestamp,
)


def lines(data: bytes) -> list[dict[str, Any]]:
    """Split server output as libvirt does: on CRLF, one JSON object per line."""
    assert data.endswith(b"\r\n") or not data
    return [json.loads(x) for x in data.split(b"\r\n")[:-1]]


def drain(conn: QmpConnection) -> list[Any]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def negotiated() -> QmpConnection:
    conn = QmpConnection()
    conn.complete_negotiation()
    return conn


def test_greeting() -> None:
    (g,) = lines(QmpConnection().greeting())
    assert g == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                     "package": "pyhv 0.1.0"},
                         "capabilities": []}}


def test_negotiation_gate() -> None:
    conn = QmpConnection()
    conn.receive_data(b'{"execute": "query-status", "id": 7}\r\n'
                      b'{"execute": "qmp_capabilities", "id": 8}\r\n')
    rej, cmd = drain(conn)
    assert rej == Rejected("CommandNotFound",
                           "Expecting capabilities negotiation with 'qmp_capabilities'", 7, True)
    assert (lines(conn.reject(rej))[0]["error"]["class"]) == "CommandNotFound"
    assert cmd == Command("qmp_capabilities", {}, 8, True)
    assert conn.event("STOP") == b""  # no events before negotiation
    conn.complete_negotiation()
    conn.receive_data(b'{"execute": "query-status"}')
    assert drain(conn) == [Command("query-status", {}, None, False)]


@pytest.mark.parametrize("cid", ["libvirt-1", 0, -5, 1.5, None, True, [1, "x"], {"a": {"b": []}}])
def test_id_echoed_verbatim(cid: Any) -> None:
    conn = negotiated()
    conn.receive_data(json.dumps({"execute": "stop", "id": cid}).encode())
    (cmd,) = drain(conn)
    assert cmd.has_id and cmd.id == cid
    assert lines(conn.reply_to(cmd, {})) == [{"return": {}, "id": cid}]


def test_stream_not_lines() -> None:
    conn = negotiated()
    data = b'{"execute":\n "cont",\n "id": "a"}{"execute": "stop", "id": "b"}  \n'
    for i in range(len(data)):  # byte by byte
        conn.receive_data(data[i:i + 1])
    assert [c.id for c in drain(conn)] == ["a", "b"]
    conn.receive_data(b'{"execute": "x", "arguments": {"s": "}{\\"]["}}')
    (cmd,) = drain(conn)
    assert cmd.arguments == {"s": '}{"]['}


@pytest.mark.parametrize("data, desc", [
    (b'{"execute": }\n', "JSON parse error"),
    (b'{"execute" "x"}\n', "JSON parse error"),
    (b'}\n', "JSON parse error"),
    (b'\xff\xfe\n', "JSON parse error"),
    (b'{"execute": "\x01"}\n', "JSON parse error"),
    (b'{"execute": NaN}\n', "JSON parse error"),
    # found by tests/fuzz (target qmp): an id of Infinity cannot be echoed back
    (b'{"execute": "cont", "id": 1e999}\n', "JSON parse error, number 1e999 out of range"),
    (b'{"execute": "cont", "arguments": {"a": -1.5E+400}}\n', "JSON parse error"),
    (b'[1, 2]\n', "QMP input must be a JSON object"),
    (b'"str"\n', "QMP input must be a JSON object"),
    (b'42\n', "QMP input must be a JSON object"),
    (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
    (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
    (b'{"execute": "x", "arguments": []}\n', "QMP input member 'arguments' must be an object"),
    (b'{"execute": "x", "foo": 1}\n', "QMP input member 'foo' is unexpected"),
    (b'{"exec-oob": "x"}\n', "does not support OOB"),
])
def test_malformed_input_then_recovers(data: bytes, desc: str) -> None:
    conn = negotiated()
    conn.receive_data(data + b'{"execute": "cont", "id": 1}\r\n')
    evs = drain(conn)
    assert isinstance(evs[0], Rejected) and evs[0].error_class == "GenericError"
    assert evs[0].desc.startswith(desc) or desc in evs[0].desc
    assert evs[-1] == Command("cont", {}, 1, True)
    assert len(evs) == 2


def test_rejection_keeps_id_when_parseable() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute": 3, "id": "q"}')
    (rej,) = drain(conn)
    assert lines(conn.reject(rej)) == [{"error": {
        "class": "GenericError", "desc": "QMP input member 'execute' must be a string"},
        "id": "q"}]


def test_huge_value_is_bounded() -> None:
    conn = QmpConnection(max_message=4096)
    conn.complete_negotiation()
    chunk = b'{"execute": "x", "arguments": {"s": "' + b"a" * 1000
    conn.receive_data(chunk)
    for _ in range(100):
        conn.receive_data(b"a" * 1000)
        for ev in drain(conn):
            assert isinstance(ev, Rejected)
        assert conn.buffered <= 4096 + 1000
    conn.receive_data(b'"}}\n{"execute": "cont"}\n')
    evs = drain(conn)
    assert [type(e) for e in evs] == [Command]


def test_size_limit_error_once_per_value() -> None:
    conn = QmpConnection(max_message=100)
    conn.complete_negotiation()
    conn.receive_data(b"[" * 10 + b"1," * 200 + b"\n" + b'{"execute": "cont"}\n')
    evs = drain(conn)
    assert evs[0] == Rejected("GenericError", "JSON token size limit exceeded")
    assert isinstance(evs[1], Command) and len(evs) == 2


def test_nesting_limit() -> None:
    conn = QmpConnection(max_depth=8)
    conn.receive_data(b'{"a":' * 20 + b"\n")
    assert drain(conn) == [Rejected("GenericError", "JSON nesting depth limit exceeded")]


def test_events_and_timestamps() -> None:
    conn = QmpConnection(clock=lambda: 1700000000.25)
    conn.complete_negotiation()
    (ev,) = lines(conn.event(*shutdown_event("host-qmp-quit")))
    assert ev == {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"},
                  "timestamp": {"seconds": 1700000000, "microseconds": 250000}}
    (ev,) = lines(conn.event(*reset_event("guest-reset")))
    assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    (ev,) = lines(conn.event("STOP"))
    assert "data" not in ev and set(ev["timestamp"]) == {"seconds", "microseconds"}
    assert timestamp(0.9999999) == {"seconds": 1, "microseconds": 0}
    with pytest.raises(ValueError):
        shutdown_event("bogus")


def test_peer_close() -> None:
    conn = QmpConnection()
    conn.receive_data(b"")
    assert conn.closed and conn.next_event() is NEED_DATA


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.randint(-10**20, 10**20)
    if kind == 1:
        return "".join(chr(rng.randrange(0, 0x2FF)) for _ in range(rng.randrange(8)))
    if kind == 2:
        return rng.choice([True, False, None, 1.5])
    if kind == 3:
        return rng.choice(["execute", "arguments", "id", "qmp_capabilities", "stop"])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["execute", "arguments", "id", "exec-oob", "x"]):
            _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_fuzz_never_raises() -> None:
    rng = random.Random(1234)
    conn = QmpConnection(max_message=2048, max_depth=16)
    for i in range(3000):
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            data = json.dumps(_random_json(rng)).encode()
            if rng.random() < 0.3:
                cut = rng.randrange(len(data) + 1)
                data = data[:cut] + bytes([rng.randrange(256)]) + data[cut:]
        conn.receive_data(data + (b"\n" if rng.random() < 0.5 else b""))
        for ev in drain(conn):
            assert isinstance(ev, (Command, Rejected))
            out = conn.reject(ev) if isinstance(ev, Rejected) else conn.reply_to(ev, {})
            assert out.endswith(b"\r\n") and out.count(b"\r\n") == 1
            json.loads(out)
        assert conn.buffered <= 2048 + 64 + 2
        if i == 1000:
            conn.complete_negotiation()
    conn.receive_data(b'\n{"execute": "cont", "id": "end"}\n')
    assert drain(conn)[-1] == Command("cont", {}, "end", True)
