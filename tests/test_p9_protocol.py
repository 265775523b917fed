"""9P2000.L framing, encoding and the sans-I/O connection (pure, no filesystem)."""

from __future__ import annotations

import dataclasses
import errno
import random
import struct

import pytest

from pyhv.engine.p9 import protocol as p


def frame(type_: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type_, tag) + body


def ready_server(msize: int = 8192) -> p.Connection:
    conn = p.Connection(p.Role.SERVER, max_msize=65536)
    conn.receive_data(p.encode(p.NOTAG, p.Tversion(msize, p.VERSION)))
    ev = conn.next_event()
    assert isinstance(ev, p.Received) and isinstance(ev.message, p.Tversion)
    conn.send(p.NOTAG, p.negotiate_version(ev.message, conn.max_msize))
    assert conn.msize == msize and conn.state is p.State.READY
    return conn


def test_every_message_class_lists_its_dataclass_fields_in_order() -> None:
    for table in (p.REQUESTS, p.REPLIES):
        for type_, cls in table.items():
            assert cls.TYPE == type_
            assert [n for n, _ in cls.FIELDS] == [f.name for f in dataclasses.fields(cls)]
    assert p.REQUESTS.keys().isdisjoint(p.REPLIES.keys())
    for type_ in p.REQUESTS:
        assert type_ + 1 in p.REPLIES, type_
    assert len(p.REQUESTS) == 28


def test_known_wire_bytes() -> None:
    # Tversion as Linux sends it: size, type 100, NOTAG, msize, "9P2000.L"
    data = p.encode(p.NOTAG, p.Tversion(8192, "9P2000.L"))
    assert data == (b"\x15\x00\x00\x00\x64\xff\xff\x00\x20\x00\x00\x08\x009P2000.L")
    qid = p.Qid(p.QTDIR, 7, 0x0102030405060708)
    assert p.encode(1, p.Rattach(qid)) == \
        b"\x14\x00\x00\x00\x69\x01\x00\x80\x07\x00\x00\x00\x08\x07\x06\x05\x04\x03\x02\x01"
    walk = p.encode(3, p.Twalk(1, 2, ("a", "bc")))
    assert walk[7:] == struct.pack("<IIH", 1, 2, 2) + b"\x01\x00a\x02\x00bc"


def test_round_trip_every_type_with_sample_values() -> None:
    rng = random.Random(5)
    samples = {"u8": 0xAB, "u16": 0xBEEF, "u32": 0xDEADBEEF, "u64": 2**64 - 2,
               "str": "n\u00e4me\udcff", "qid": p.Qid(2, 3, 4), "data": b"\x00\xff" * 9,
               "strs": ("a", "..", ""), "qids": (p.Qid(0, 0, 1),) * 3}
    for cls in list(p.REQUESTS.values()) + list(p.REPLIES.values()):
        msg = cls(*[samples[kind] for _, kind in cls.FIELDS])
        tag = rng.randrange(0x10000)
        data = p.encode(tag, msg)
        size, type_, got_tag = struct.unpack_from("<IBH", data)
        assert (size, type_, got_tag) == (len(data), cls.TYPE, tag)
        assert p.decode_body(cls, data[7:]) == msg


def test_raw_byte_names_survive_round_trip() -> None:
    raw = b"caf\xe9-\xff"  # not UTF-8: Linux sends names as bytes
    body = struct.pack("<IIH", 1, 2, 1) + struct.pack("<H", len(raw)) + raw
    msg = p.decode_body(p.Twalk, body)
    assert isinstance(msg, p.Twalk)
    assert msg.wnames[0].encode("utf-8", "surrogateescape") == raw
    assert p.encode(0, msg)[7:] == body


def test_decode_body_refuses_short_long_and_lying_counts() -> None:
    with pytest.raises(ValueError, match="past the end"):
        p.decode_body(p.Tclunk, b"\x01\x00\x00")
    with pytest.raises(ValueError, match="after the last field"):
        p.decode_body(p.Tclunk, b"\x01\x00\x00\x00\x00")
    # Twrite's count says 100 bytes, 3 follow
    with pytest.raises(ValueError):
        p.decode_body(p.Twrite, struct.pack("<IQI", 1, 0, 100) + b"abc")
    # 17 names in one walk
    with pytest.raises(ValueError, match="at most 16"):
        p.decode_body(p.Twalk, struct.pack("<IIH", 1, 2, 17) + b"\x01\x00a" * 17)
    # a string longer than PATH_MAX
    with pytest.raises(ValueError, match="string of"):
        p.decode_body(p.Rreadlink,
                      struct.pack("<H", 5000) + b"x" * 5000)


def test_encode_refuses_out_of_range_fields() -> None:
    with pytest.raises(p.LocalProtocolError):
        p.encode(0, p.Tclunk(2**32))
    with pytest.raises(p.LocalProtocolError):
        p.encode(0x10000, p.Tclunk(1))
    with pytest.raises(p.LocalProtocolError):
        p.encode(0, p.Rreadlink("x" * 70000))


def test_version_negotiation() -> None:
    assert p.negotiate_version(p.Tversion(1 << 20, p.VERSION), 65536) == \
        p.Rversion(65536, p.VERSION)
    assert p.negotiate_version(p.Tversion(8192, "9P2000.u"), 65536) == \
        p.Rversion(8192, "unknown")
    assert p.negotiate_version(p.Tversion(100, p.VERSION), 65536) == p.Rlerror(errno.EINVAL)
    conn = ready_server(8192)
    assert conn.msize == 8192
    # an unknown version leaves the connection unnegotiated
    c2 = p.Connection(p.Role.SERVER)
    c2.receive_data(p.encode(p.NOTAG, p.Tversion(8192, "9P2000")))
    ev = c2.next_event()
    assert isinstance(ev, p.Received)
    c2.send(p.NOTAG, p.negotiate_version(ev.message, c2.max_msize))  # type: ignore[arg-type]
    assert c2.state is p.State.INIT


def test_request_before_version_is_eproto() -> None:
    conn = p.Connection(p.Role.SERVER)
    conn.receive_data(p.encode(5, p.Tclunk(1)))
    ev = conn.next_event()
    assert isinstance(ev, p.Invalid) and (ev.tag, ev.errno) == (5, errno.EPROTO)
    out = conn.send(5, p.Rlerror(ev.errno))
    assert out == frame(7, 5, struct.pack("<I", errno.EPROTO))


def test_size_past_msize_or_below_header_is_a_remote_error() -> None:
    conn = ready_server(8192)
    conn.receive_data(struct.pack("<I", 8193))  # only the size field is needed
    with pytest.raises(p.RemoteProtocolError, match="exceeds msize"):
        conn.next_event()
    assert conn.state is p.State.ERROR
    with pytest.raises(p.RemoteProtocolError):
        conn.next_event()
    with pytest.raises(p.LocalProtocolError):
        conn.send(1, p.Rclunk())
    conn = ready_server()
    conn.receive_data(struct.pack("<IBH", 6, 120, 1))
    with pytest.raises(p.RemoteProtocolError, match="below the header"):
        conn.next_event()


def test_unknown_type_and_r_message_get_eopnotsupp_and_connection_goes_on() -> None:
    conn = ready_server()
    conn.receive_data(frame(250, 9, b"whatever") + frame(p.Rclunk.TYPE, 10, b"")
                      + p.encode(11, p.Tclunk(3)))
    ev = conn.next_event()
    assert isinstance(ev, p.Invalid) and (ev.tag, ev.errno) == (9, errno.EOPNOTSUPP)
    ev2 = conn.next_event()
    assert isinstance(ev2, p.Invalid) and (ev2.tag, ev2.errno) == (10, errno.EOPNOTSUPP)
    ev3 = conn.next_event()
    assert ev3 == p.Received(11, p.Tclunk(3))
    assert conn.next_event() is p.NEED_DATA
    assert conn.pending_tags == {9, 10, 11}


def test_malformed_body_is_einval() -> None:
    conn = ready_server()
    conn.receive_data(frame(p.Tclunk.TYPE, 4, b"\x01"))
    ev = conn.next_event()
    assert isinstance(ev, p.Invalid) and ev.errno == errno.EINVAL and "Tclunk" in ev.reason


def test_tag_reuse_while_pending_is_a_remote_error() -> None:
    conn = ready_server()
    conn.receive_data(p.encode(4, p.Tclunk(1)) + p.encode(4, p.Tclunk(2)))
    assert isinstance(conn.next_event(), p.Received)
    with pytest.raises(p.RemoteProtocolError, match="tag 4 reused"):
        conn.next_event()
    # answered tags may be reused
    conn = ready_server()
    conn.receive_data(p.encode(4, p.Tclunk(1)))
    conn.next_event()
    conn.send(4, p.Rclunk())
    conn.receive_data(p.encode(4, p.Tclunk(2)))
    assert conn.next_event() == p.Received(4, p.Tclunk(2))


def test_local_misuse_is_local_error_and_harmless() -> None:
    conn = ready_server()
    with pytest.raises(p.LocalProtocolError, match="no request pending"):
        conn.send(77, p.Rclunk())
    conn.receive_data(p.encode(3, p.Tclunk(1)))
    conn.next_event()
    with pytest.raises(p.LocalProtocolError, match="does not answer"):
        conn.send(3, p.Rremove())
    with pytest.raises(p.LocalProtocolError, match="does not send"):
        conn.send(3, p.Tclunk(1))
    with pytest.raises(p.LocalProtocolError, match="exceeds msize"):
        conn.send(3, p.Rread(b"x" * 9000))
    assert conn.send(3, p.Rclunk()) == frame(p.Rclunk.TYPE, 3, b"")


def test_messages_split_anywhere_and_batched() -> None:
    conn = ready_server()
    stream = b"".join(p.encode(t, p.Tread(t, t * 10, 100)) for t in range(20))
    got = []
    rng = random.Random(1)
    pos = 0
    while pos < len(stream):
        n = rng.randrange(1, 30)
        conn.receive_data(stream[pos:pos + n])
        pos += n
        while (ev := conn.next_event()) is not p.NEED_DATA:
            assert isinstance(ev, p.Received)
            got.append(ev)
            conn.send(ev.tag, p.Rread(b""))
    assert [e.message for e in got] == [p.Tread(t, t * 10, 100) for t in range(20)]


def test_eof_between_and_inside_messages() -> None:
    conn = ready_server()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), p.ConnectionClosed)
    assert conn.state is p.State.CLOSED
    conn = ready_server()
    conn.receive_data(p.encode(1, p.Tclunk(1))[:5])
    conn.receive_data(b"")
    with pytest.raises(p.RemoteProtocolError, match="inside a message"):
        conn.next_event()


def test_receive_buffer_is_bounded() -> None:
    conn = p.Connection(p.Role.SERVER, max_msize=8192)
    conn.receive_data(b"\x00" * 16384)
    assert not conn.wants_data
    with pytest.raises(p.LocalProtocolError, match="bound"):
        conn.receive_data(b"\x00")


def test_client_side_checks_replies() -> None:
    client = p.Connection(p.Role.CLIENT)
    with pytest.raises(p.LocalProtocolError, match="Tversion first"):
        client.send(1, p.Tclunk(1))
    client.send(p.NOTAG, p.Tversion(8192, p.VERSION))
    client.receive_data(p.encode(p.NOTAG, p.Rversion(8192, p.VERSION)))
    assert client.next_event() == p.Received(p.NOTAG, p.Rversion(8192, p.VERSION))
    assert client.msize == 8192
    client.send(1, p.Tclunk(1))
    client.receive_data(p.encode(2, p.Rclunk()))
    with pytest.raises(p.RemoteProtocolError, match="no request pending"):
        client.next_event()
    client = p.Connection(p.Role.CLIENT)
    client.send(p.NOTAG, p.Tversion(8192, p.VERSION))
    client.receive_data(p.encode(p.NOTAG, p.Rversion(8192, p.VERSION)))
    client.next_event()
    client.send(1, p.Tclunk(1))
    client.receive_data(p.encode(1, p.Rremove()))
    with pytest.raises(p.RemoteProtocolError, match="answers a request"):
        client.next_event()


def test_dirents_round_trip_and_size() -> None:
    ents = [p.Dirent(p.Qid(p.QTDIR, 0, 5), 1, 4, "."),
            p.Dirent(p.Qid(0, 0, 9), 2, 8, "f\udce9")]
    data = b"".join(p.encode_dirent(e) for e in ents)
    assert len(data) == sum(p.dirent_size(e.name) for e in ents)
    assert p.decode_dirents(data) == ents
    with pytest.raises(ValueError):
        p.decode_dirents(data[:-1])


def _fuzz_server(data: bytes) -> None:
    conn = p.Connection(p.Role.SERVER, max_msize=p.MIN_MSIZE)
    try:
        for i in range(0, len(data), 37):
            if not conn.wants_data:
                break
            conn.receive_data(data[i:i + 37])
            while True:
                ev = conn.next_event()
                if ev is p.NEED_DATA or isinstance(ev, p.ConnectionClosed):
                    break
                tag = ev.tag  # type: ignore[union-attr]
                conn.send(tag, p.Rlerror(errno.EIO))
        conn.receive_data(b"")
        conn.next_event()
    except p.RemoteProtocolError:
        pass


def test_fuzz_decoder_raises_only_its_own_error() -> None:
    rng = random.Random(0x9F)
    valid = [p.encode(p.NOTAG, p.Tversion(8192, p.VERSION))]
    for cls in p.REQUESTS.values():
        samples = {"u8": 1, "u16": 2, "u32": 3, "u64": 4, "str": "ab", "qid": p.Qid(0, 0, 0),
                   "data": b"xyz", "strs": ("a",), "qids": ()}
        valid.append(p.encode(rng.randrange(1000), cls(*[samples[k] for _, k in cls.FIELDS])))
    for _ in range(3000):
        kind = rng.randrange(3)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        else:
            msgs = [rng.choice(valid) for _ in range(rng.randrange(1, 6))]
            if kind == 2:
                msgs.insert(0, valid[0])
            buf = bytearray(b"".join(msgs))
            for _ in range(rng.randrange(1, 6)):
                if buf:
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        _fuzz_server(data)
        # every body decoder alone
        for cls in (rng.choice(list(p.REQUESTS.values())),
                    rng.choice(list(p.REPLIES.values()))):
            try:
                p.decode_body(cls, data[7:])
            except ValueError:
                pass
        try:
            p.decode_dirents(data)
        except ValueError:
            pass
