"""The vhost-user protocol module (sans-I/O): typed decoding, limits, descriptor counts,
replies, and the memory-table checks, each against what a bad frontend could send."""

from __future__ import annotations

import fcntl
import os

import pytest

from pyhv.engine.vhost_user.message import (
    F_NEED_REPLY,
    F_REPLY,
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    VRING_NOFD,
    ConfigSpace,
    Decoder,
    Inflight,
    MemoryRegion,
    MemoryTable,
    ProtocolError,
    Request,
    RequestError,
    VringAddr,
    VringState,
    check_regions,
    decode_reply,
    encode,
    encode_reply,
    user_to_guest,
)

MiB = 1 << 20


def fd_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


def eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def decode_one(data: bytes, fds: list[int] | None = None):
    d = Decoder()
    d.receive(data, fds or [])
    m = d.next_message()
    assert m is not None and d.next_message() is None and d.idle
    return m


TABLE = MemoryTable((MemoryRegion(0, MiB, 0x7000_0000, 0),
                     MemoryRegion(1 << 32, 2 * MiB, 0x7010_0000, MiB)))


@pytest.mark.parametrize(("request_", "body", "nfds"), [
    (Request.GET_FEATURES, None, 0),
    (Request.SET_FEATURES, (1 << 32) | (1 << 30), 0),
    (Request.SET_VRING_NUM, VringState(1, 256), 0),
    (Request.SET_VRING_ADDR, VringAddr(0, 0, 0x7000_1000, 0x7000_3000, 0x7000_2000, 7), 0),
    (Request.GET_VRING_BASE, VringState(0, 0), 0),
    (Request.SET_MEM_TABLE, TABLE, 2),
    (Request.SET_VRING_KICK, 3, 1),
    (Request.SET_VRING_CALL, 3 | VRING_NOFD, 0),
    (Request.GET_CONFIG, ConfigSpace(0, 4, 0, b"\0" * 4), 0),
    (Request.SET_CONFIG, ConfigSpace(8, 2, 1, b"ab"), 0),
    (Request.SET_INFLIGHT_FD, Inflight(4096, 0, 2, 128), 1),
])
def test_requests_decode_to_their_typed_payloads(request_, body, nfds):
    fds = eventfds(nfds)
    m = decode_one(encode(request_, body, need_reply=True), list(fds))
    assert m.request is request_ and m.body == body and m.need_reply
    assert m.fds == fds
    m.close_fds()
    assert not any(fd_open(fd) for fd in fds)


def test_a_message_fed_one_byte_at_a_time_and_wanted_never_overreads():
    data = encode(Request.SET_MEM_TABLE, TABLE) + encode(Request.GET_QUEUE_NUM)
    d = Decoder()
    fds = eventfds(2)
    got = []
    pos = 0
    while pos < len(data):
        want = d.wanted()
        assert 0 < want <= len(data) - pos
        d.receive(data[pos:pos + 1], fds if pos == 0 else [])
        pos += 1
        while (m := d.next_message()) is not None:
            got.append(m)
    assert [m.request for m in got] == [Request.SET_MEM_TABLE, Request.GET_QUEUE_NUM]
    assert got[0].fds == fds and got[1].fds == []
    got[0].close_fds()


def test_more_bytes_than_wanted_are_split_into_messages():
    d = Decoder()
    d.receive(encode(Request.SET_OWNER) + encode(Request.SET_FEATURES, 1 << 32))
    assert d.next_message().request is Request.SET_OWNER
    m = d.next_message()
    assert m.request is Request.SET_FEATURES and m.body == 1 << 32


def test_a_truncated_header_is_no_message_and_not_idle():
    d = Decoder()
    d.receive(encode(Request.GET_FEATURES)[:7])
    assert d.next_message() is None and not d.idle and d.wanted() == 5


def test_a_payload_past_the_limit_is_refused_before_it_is_read_and_fds_closed():
    d = Decoder()
    fds = eventfds(1)
    head = HEADER.pack(Request.SET_CONFIG, VERSION, MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolError, match="more than"):
        d.receive(head, fds)
    assert not fd_open(fds[0])
    with pytest.raises(ProtocolError):  # terminal: the decoder stays broken
        d.receive(encode(Request.GET_FEATURES))


@pytest.mark.parametrize("flags", [0, 2, VERSION | F_REPLY])
def test_bad_version_or_a_reply_flag_is_a_protocol_error(flags):
    with pytest.raises(ProtocolError):
        Decoder().receive(HEADER.pack(Request.GET_FEATURES, flags, 0))


@pytest.mark.parametrize(("request_", "payload"), [
    (Request.SET_FEATURES, b"\0" * 4),
    (Request.GET_FEATURES, b"\0" * 8),
    (Request.SET_VRING_NUM, b"\0" * 12),
    (Request.SET_VRING_ADDR, b"\0" * 32),
    (Request.SET_MEM_TABLE, b"\0" * 4),
    (Request.SET_MEM_TABLE, (0).to_bytes(4, "little") + b"\0" * 4),       # no region
    (Request.SET_MEM_TABLE, (9).to_bytes(4, "little") + b"\0" * (4 + 9 * 32)),
    (Request.SET_MEM_TABLE, TABLE.pack()[:-1]),
    (Request.GET_CONFIG, ConfigSpace(0, 8, 0, b"\0" * 8).pack()[:-1]),   # size mismatch
    (Request.GET_CONFIG, ConfigSpace(0, 300, 0, b"\0" * 300).pack()),    # > 256 bytes
    (Request.SET_VRING_KICK, (1 << 9).to_bytes(8, "little")),           # reserved bits
])
def test_payloads_of_the_wrong_shape_are_refused(request_, payload):
    data = HEADER.pack(request_, VERSION, len(payload)) + payload
    nfds = 2 if request_ is Request.SET_MEM_TABLE else 0
    fds = eventfds(nfds)
    with pytest.raises(ProtocolError):
        Decoder().receive(data, fds)
    assert not any(fd_open(fd) for fd in fds)


@pytest.mark.parametrize(("request_", "body", "nfds"), [
    (Request.SET_MEM_TABLE, TABLE, 1),            # a descriptor missing
    (Request.SET_MEM_TABLE, TABLE, 3),            # one too many
    (Request.SET_VRING_KICK, 0, 0),               # no descriptor, no NOFD flag
    (Request.SET_VRING_CALL, VRING_NOFD, 1),      # NOFD but a descriptor
    (Request.GET_FEATURES, None, 1),              # a descriptor where none belongs
    (Request.SET_SLAVE_REQ_FD, None, 0),
])
def test_missing_or_surplus_descriptors_are_refused_and_closed(request_, body, nfds):
    fds = eventfds(nfds)
    with pytest.raises(ProtocolError, match="file descriptors"):
        Decoder().receive(encode(request_, body), fds)
    assert not any(fd_open(fd) for fd in fds)


def test_an_unknown_request_is_a_message_with_its_raw_payload():
    m = decode_one(encode(99, b"xyz", need_reply=True))
    assert m.request == 99 and not isinstance(m.request, Request)
    assert m.body == b"xyz" and m.flags & F_NEED_REPLY and m.name == "request 99"


def test_decoder_close_closes_descriptors_of_messages_nobody_took():
    d = Decoder()
    fds = eventfds(1)
    d.receive(encode(Request.SET_VRING_CALL, 0), fds)
    d.close()
    assert not fd_open(fds[0])


def test_replies_encode_with_the_reply_flag_and_decode_back():
    data = encode_reply(Request.GET_VRING_BASE, VringState(1, 42))
    req, flags, payload = decode_reply(data)
    assert (req, flags, payload) == (Request.GET_VRING_BASE, VERSION | F_REPLY,
                                     VringState(1, 42).pack())
    with pytest.raises(ProtocolError):
        decode_reply(encode(Request.GET_FEATURES))         # a request, not a reply
    with pytest.raises(ProtocolError):
        decode_reply(data[:-1])


# ---- memory table checks ------------------------------------------------------------------------

GOOD = [MemoryRegion(0, MiB, 0x7000_0000, 0), MemoryRegion(1 << 32, MiB, 0x7010_0000, MiB)]


def test_a_good_table_passes():
    check_regions(GOOD, [2 * MiB, 2 * MiB])


@pytest.mark.parametrize(("regions", "sizes", "match"), [
    ([MemoryRegion(0, MiB, 0x7000_0000, 0), MemoryRegion(MiB - 4096, MiB, 0x8000_0000, 0)],
     [4 * MiB] * 2, "overlap in guest"),
    ([MemoryRegion(0, MiB, 0x7000_0000, 0), MemoryRegion(4 * MiB, MiB, 0x700F_F000, 0)],
     [4 * MiB] * 2, "overlap in user"),
    ([MemoryRegion((1 << 64) - 4096, 8192, 0x7000_0000, 0)], [MiB], "wraps"),
    ([MemoryRegion(0, 8192, (1 << 64) - 4096, 0)], [MiB], "wraps"),
    ([MemoryRegion(0, MiB, 0x7000_0000, MiB)], [MiB + 4096], "past the end"),
    ([MemoryRegion(0, 2 * MiB, 0x7000_0000, 0)], [MiB], "past the end"),
    ([MemoryRegion(0, MiB, 0x7000_0000, 100)], [4 * MiB], "page-aligned"),
    ([MemoryRegion(0, 0, 0x7000_0000, 0)], [MiB], "empty"),
])
def test_bad_tables_are_refused(regions, sizes, match):
    with pytest.raises(RequestError, match=match):
        check_regions(regions, sizes)


def test_user_addresses_translate_inside_one_region_only():
    assert user_to_guest(GOOD, 0x7010_0010, 16) == (1 << 32) + 0x10
    assert user_to_guest(GOOD, 0x7000_0000, MiB) == 0
    with pytest.raises(RequestError):
        user_to_guest(GOOD, 0x700F_FFF8, 16)              # straddles two regions
    with pytest.raises(RequestError):
        user_to_guest(GOOD, 0x1000, 16)                   # in no region
