"""The vhost-user backend serving the engine's virtio-blk, over real unix sockets, to a
test frontend (tests/vhost_user_frontend.py): negotiation, memory table, rings, blk
requests checked on the host file, the call and error eventfds; bad frontends (an
error reply or a disconnect, and the next frontend is served); no descriptor or
mapping left behind when frontends come and go."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from vhost_user_frontend import (
    REGION1_GUEST,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    USER_BASE,
    Frontend,
)

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.vhost_user.backend import Backend, Server
from pyhv.engine.vhost_user.blk import make_device
from pyhv.engine.vhost_user.message import (
    F_PROTOCOL_FEATURES,
    HEADER,
    PF_CONFIG,
    PF_MQ,
    PF_REPLY_ACK,
    VERSION,
    ConfigSpace,
    MemoryRegion,
    MemoryTable,
    Request,
    VringAddr,
    VringState,
)
from pyhv.engine.virtio.device import F_RING_EVENT_IDX, F_VERSION_1

MiB = 1 << 20
SECTOR = 512
DISK = 1 * MiB
SERIAL = "VHOST-TEST"
F_RO, F_FLUSH, F_MQ = 1 << 5, 1 << 9, 1 << 12
S_OK, S_IOERR = 0, 1


class Served:
    """A backend on its own loop thread, listening at a socket path."""

    def __init__(self, tmp: Path, queues: int = 1, readonly: bool = False,
                 poll_us: int = 0) -> None:
        """``poll_us`` 0 by default: the tests here publish requests without a kick
        and expect them to wait (the polling test sets it)."""
        self.image = tmp / "disk.img"
        if not self.image.exists():
            self.image.write_bytes(bytes(range(256)) * (DISK // 256))
        self.path = str(tmp / "blk.sock")
        self.device = make_device(str(self.image), readonly=readonly, queues=queues,
                                  serial=SERIAL)
        self.logs: list[str] = []
        self.loop = EventLoop(log=self.logs.append)
        self.backend = Backend(self.device, self.loop, log=self.logs.append,
                               poll_us=poll_us)
        self.server = Server(self.path, self.backend)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def connect(self) -> Frontend:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(self.path)
        return Frontend(s)

    def on_loop(self, fn):  # type: ignore[no-untyped-def]
        """Run ``fn`` on the backend's loop thread (after what it is doing); its result."""
        done = threading.Event()
        out = []

        def run() -> None:
            out.append(fn())
            done.set()
        self.loop.call_soon_threadsafe(run)
        assert done.wait(5)
        return out[0]

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Until the backend dropped its frontend."""
        end = time.monotonic() + timeout
        while self.backend.connected and time.monotonic() < end:
            time.sleep(0.01)
        assert not self.backend.connected

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.server.close()
        self.device.close()
        self.loop.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def ready(fe: Frontend, rings: int = 1) -> None:
    fe.negotiate()
    assert fe.set_mem_table() == 0
    for i in range(rings):
        fe.add_ring(i)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


# ---- a frontend that does everything right -----------------------------------------------------

def test_negotiation_features_queue_count_and_config(served):
    fe = served.connect()
    try:
        features = fe.get_u64(Request.GET_FEATURES)
        assert features & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_FLUSH | F_RING_EVENT_IDX) == \
            F_VERSION_1 | F_PROTOCOL_FEATURES | F_FLUSH | F_RING_EVENT_IDX
        assert not features & F_RO
        pf = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert pf & (PF_MQ | PF_REPLY_ACK | PF_CONFIG) == PF_MQ | PF_REPLY_ACK | PF_CONFIG
        assert fe.ack(Request.SET_PROTOCOL_FEATURES, pf) == 0
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1
        cfg = fe.get(Request.GET_CONFIG, ConfigSpace(0, 60, 0, bytes(60)))
        offset, size, _flags = struct.unpack_from("=III", cfg)
        capacity, = struct.unpack_from("<Q", cfg, 12)
        assert (offset, size, capacity) == (0, 60, DISK // SECTOR)
        assert fe.ack(Request.SET_FEATURES, features | (1 << 63)) != 0   # never offered
        assert fe.ack(Request.SET_FEATURES, features) == 0
    finally:
        fe.close()


def test_blk_requests_reach_the_host_file_and_the_call_fires(served):
    fe = served.connect()
    try:
        ready(fe)
        data = pattern(8 * SECTOR, 5)
        assert fe.blk(0, T_OUT, 3, data=data)[0] == S_OK
        assert fe.blk(0, T_FLUSH, 0)[0] == S_OK
        assert served.image.read_bytes()[3 * SECTOR:11 * SECTOR] == data
        status, got, used = fe.blk(0, T_IN, 3, read_len=8 * SECTOR)
        assert (status, got, used) == (S_OK, data, 8 * SECTOR + 1)
        status, got, _ = fe.blk(0, T_IN, 0, read_len=SECTOR)
        assert got == bytes(range(256)) * 2                     # what was there before
        status, got, _ = fe.blk(0, T_GET_ID, 0, read_len=20)
        assert got.rstrip(b"\0") == SERIAL.encode()
        assert fe.blk(0, T_IN, DISK // SECTOR, read_len=SECTOR)[0] == S_IOERR
        base = VringState(*struct.unpack("=II", fe.get(Request.GET_VRING_BASE,
                                                        VringState(0, 0))))
        assert base == VringState(0, 6)                          # six requests taken
    finally:
        fe.close()


@pytest.mark.parametrize("poll_us", [0, 1000])
def test_a_request_made_while_the_backend_polls_is_served_without_a_kick(tmp_path, poll_us):
    """The driver adds a request while the backend is still on the ring after a batch
    (here: as the first batch completes, from the backend's own thread, so that it is
    there before the first look): with polling it is served in the same pass, no kick
    needed; without, it waits for one."""
    served = Served(tmp_path, poll_us=poll_us)
    fe = served.connect()
    try:
        ready(fe)
        d = fe.drivers[0]
        notify = served.device.queue_notify
        later: list[tuple[int, int]] = []

        def add_one_more(index: int) -> None:
            notify(index)
            if not later:  # the driver's next request, published, not kicked
                head, outs = d.add([struct.pack("<IIQ", T_IN, 0, 2)], [SECTOR, 1])
                later.append((head, outs[-1][0]))
        served.device.queue_notify = add_one_more  # type: ignore[method-assign]
        first, _outs = d.add([struct.pack("<IIQ", T_IN, 0, 1)], [SECTOR, 1])
        fe.kick(0)
        assert fe.wait_call(0)
        served.on_loop(lambda: None)  # the backend is back on its loop: the pass is over
        used = [h for h, _len in d.take_used()]
        d.set_used_event(d.last_used)  # as a driver does: interrupt me for the next one
        (head, status_addr), = later
        if poll_us:
            assert used == [first, head] and fe.memory.read_u8(status_addr) == S_OK
        else:
            assert used == [first]
            fe.kick(0)
            assert fe.wait_call(0)
            assert [h for h, _len in d.take_used()] == [head]
    finally:
        fe.close()
        served.close()


def test_data_buffers_in_the_other_region_are_translated(served):
    """Rings live in region 1 (guest 4 GiB); a data buffer in region 0 (guest 0)."""
    fe = served.connect()
    try:
        ready(fe)
        d = fe.drivers[0]
        buf = 0x8000                                            # guest address, region 0
        fe.memory.write(buf, pattern(SECTOR, 9))
        hdr, _ = d.alloc(struct.pack("<IIQ", T_OUT, 0, 7))
        st, _ = d.alloc(1)
        t, _ = d.alloc(16 * 3)
        d.write_desc(t, 0, hdr, 16, 1, 1)
        d.write_desc(t, 1, buf, SECTOR, 1, 2)
        d.write_desc(t, 2, st, 1, 2)
        head = d.free.pop(0)
        d.write_desc(d.desc, head, t, 48, 4)
        d.publish(head)
        fe.kick(0)
        assert fe.wait_call(0)
        assert d.take_used() == [(head, 1)] and fe.memory.read_u8(st) == S_OK
        assert served.image.read_bytes()[7 * SECTOR:8 * SECTOR] == pattern(SECTOR, 9)
    finally:
        fe.close()


def test_multiqueue_serves_each_ring(tmp_path):
    s = Served(tmp_path, queues=2)
    fe = s.connect()
    try:
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 2
        assert fe.get_u64(Request.GET_FEATURES) & F_MQ
        ready(fe, rings=2)
        assert fe.blk(1, T_OUT, 1, data=pattern(SECTOR, 1))[0] == S_OK
        assert fe.blk(0, T_IN, 1, read_len=SECTOR)[1] == pattern(SECTOR, 1)
        assert not fe.wait_call(1, timeout=0.1)                  # ring 1 was not used again
    finally:
        fe.close()
        s.close()


def test_a_read_only_disk_refuses_writes(tmp_path):
    s = Served(tmp_path, readonly=True)
    fe = s.connect()
    try:
        assert fe.get_u64(Request.GET_FEATURES) & F_RO
        ready(fe)
        before = s.image.read_bytes()
        assert fe.blk(0, T_OUT, 1, data=pattern(SECTOR, 2))[0] == S_IOERR
        assert s.image.read_bytes() == before
    finally:
        fe.close()
        s.close()


def test_a_disabled_ring_waits_until_enabled(served):
    fe = served.connect()
    try:
        ready(fe)
        assert fe.ack(Request.SET_VRING_ENABLE, VringState(0, 0)) == 0
        d = fe.drivers[0]
        head, outs = d.add([struct.pack("<IIQ", T_OUT, 0, 2), pattern(SECTOR, 3)], [1],
                           indirect=True)
        fe.kick(0)
        assert not fe.wait_call(0, timeout=0.2)
        assert fe.ack(Request.SET_VRING_ENABLE, VringState(0, 1)) == 0
        assert fe.wait_call(0)
        assert d.take_used() == [(head, 1)]
    finally:
        fe.close()


def test_a_kick_before_the_ring_is_set_up_is_served_once_it_is(served):
    fe = served.connect()
    try:
        fe.negotiate()
        d = fe.add_ring(0, kick=False)           # no memory table yet: addresses unchecked
        k = fe.kicks[0]
        assert fe.ack(Request.SET_VRING_KICK, 0, [k]) == 0
        head, _ = d.add([struct.pack("<IIQ", T_OUT, 0, 4), pattern(SECTOR, 4)], [1],
                        indirect=True)
        fe.kick(0)                               # the ring cannot start: no memory
        assert not fe.wait_call(0, timeout=0.2)
        assert fe.set_mem_table() == 0
        # the ring starts on the next kick descriptor the frontend gives
        assert fe.ack(Request.SET_VRING_KICK, 0, [k]) == 0
        assert fe.wait_call(0)
        assert d.take_used() == [(head, 1)]
        assert served.image.read_bytes()[4 * SECTOR:5 * SECTOR] == pattern(SECTOR, 4)
    finally:
        fe.close()


def test_a_ring_the_driver_breaks_stops_and_writes_the_error_eventfd(served):
    fe = served.connect()
    try:
        ready(fe)
        d = fe.drivers[0]
        fe.memory.write_u16(d.avail + 2, 1000)   # 1000 ahead on a 16-entry ring
        fe.kick(0)
        assert fe.wait_err(0)
        assert any("ring 0 stopped" in line for line in served.logs)
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1            # the backend goes on
    finally:
        fe.close()


# ---- bad frontends -------------------------------------------------------------------------------

def raw(fe: Frontend, data: bytes, fds=()) -> None:
    if fds:
        socket.send_fds(fe.sock, [data], list(fds))
    else:
        fe.sock.sendall(data)


def bad_table(kind: str) -> MemoryTable:
    if kind == "overlap":
        return MemoryTable((MemoryRegion(0, 2 * MiB, USER_BASE, 0),
                            MemoryRegion(MiB, MiB, USER_BASE + 2 * MiB, 2 * MiB)))
    if kind == "wrap":
        return MemoryTable((MemoryRegion((1 << 64) - MiB, 2 * MiB, USER_BASE, 0),))
    assert kind == "past-fd"
    return MemoryTable((MemoryRegion(0, 4 * MiB, USER_BASE, 1 * MiB),))


@pytest.mark.parametrize("kind", ["overlap", "wrap", "past-fd"])
def test_bad_memory_tables_get_an_error_reply(served, kind):
    fe = served.connect()
    try:
        fe.negotiate()
        table = bad_table(kind)
        fds = [os.dup(fe.memfd) for _ in table.regions]
        try:
            assert fe.ack(Request.SET_MEM_TABLE, table, fds) != 0
        finally:
            for fd in fds:
                os.close(fd)
        assert served.backend.memory is None
        assert fe.set_mem_table() == 0           # a good one is still taken
    finally:
        fe.close()


def test_a_bad_memory_table_without_reply_ack_ends_the_connection(served):
    fe = served.connect()
    try:
        fd = os.dup(fe.memfd)
        fe.send(Request.SET_MEM_TABLE, bad_table("past-fd"), [fd])
        os.close(fd)
        assert fe.hung_up()
    finally:
        fe.close()


def test_vring_addresses_outside_every_region_are_refused(served):
    fe = served.connect()
    try:
        fe.negotiate()
        assert fe.set_mem_table() == 0
        assert fe.ack(Request.SET_VRING_NUM, VringState(0, 16)) == 0
        outside = USER_BASE + 64 * MiB
        inside = USER_BASE + MiB + 0x10000
        for desc, used, avail in [(outside, inside + 0x1000, inside + 0x2000),
                                  (inside, inside + 0x1000, outside),
                                  (inside, USER_BASE + 4 * MiB - 8, inside + 0x2000)]:
            assert fe.ack(Request.SET_VRING_ADDR, VringAddr(0, 0, desc, used, avail)) != 0
        assert fe.ack(Request.SET_VRING_ADDR,
                      VringAddr(7, 0, inside, inside + 0x1000, inside + 0x2000)) != 0
        assert fe.ack(Request.SET_VRING_NUM, VringState(0, 24)) != 0      # not a power of 2
        assert fe.ack(Request.SET_VRING_NUM, VringState(0, 4096)) != 0    # past the max
    finally:
        fe.close()


def test_unknown_requests_get_an_error_reply_or_are_ignored(served):
    fe = served.connect()
    try:
        assert fe.ack(99) != 0
        fe.send(98, b"whatever")                                     # no reply wanted
        assert fe.ack(Request.SET_LOG_FD, None, [fe.memfd]) != 0     # not offered
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1                # still served
        assert any("request 98" in line for line in served.logs)
    finally:
        fe.close()


@pytest.mark.parametrize("case", ["truncated-header", "too-large", "missing-fd",
                                  "surplus-fds", "bad-version", "unsupported-get",
                                  "no-such-ring-base", "reply-flag"])
def test_broken_frontends_are_dropped_and_the_next_one_is_served(served, case):
    fe = served.connect()
    try:
        if case == "truncated-header":
            raw(fe, HEADER.pack(Request.GET_FEATURES, VERSION, 0)[:5])
            fe.sock.shutdown(socket.SHUT_WR)
        elif case == "too-large":
            raw(fe, HEADER.pack(Request.SET_CONFIG, VERSION, 1 << 20))
        elif case == "missing-fd":
            fe.send(Request.SET_MEM_TABLE, MemoryTable(fe.regions))
        elif case == "surplus-fds":
            fds = [os.dup(fe.memfd) for _ in range(3)]
            fe.send(Request.SET_VRING_CALL, 0, fds)
            for fd in fds:
                os.close(fd)
        elif case == "bad-version":
            raw(fe, HEADER.pack(Request.GET_FEATURES, 2, 0))
        elif case == "unsupported-get":
            fe.send(Request.GET_INFLIGHT_FD, b"\0" * 24)
        elif case == "no-such-ring-base":
            fe.send(Request.GET_VRING_BASE, VringState(5, 0))
        elif case == "reply-flag":
            raw(fe, HEADER.pack(Request.GET_FEATURES, VERSION | 4, 0))
        assert fe.hung_up()
    finally:
        fe.close()
    served.wait_idle()
    nxt = served.connect()
    try:
        ready(nxt)
        assert nxt.blk(0, T_OUT, 1, data=pattern(SECTOR, 7))[0] == S_OK
    finally:
        nxt.close()


def test_more_descriptors_than_the_protocol_allows_end_the_connection(served):
    fe = served.connect()
    try:
        fds = [os.dup(fe.memfd) for _ in range(12)]
        fe.send(Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, MiB, USER_BASE, 0),)),
                fds)
        for fd in fds:
            os.close(fd)
        assert fe.hung_up()
    finally:
        fe.close()


# ---- frontends come and go ---------------------------------------------------------------------

def open_fds() -> list[str]:
    """What every open descriptor of this process is (numbers may be reused)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{name}").split(":[")[0])
        except FileNotFoundError:
            pass   # listdir's own descriptor
    return sorted(out)


def ram_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("vhost-test-ram" in line for line in f)


def test_frontends_come_and_go_without_leaks(served):
    def session(i: int) -> None:
        fe = served.connect()
        try:
            ready(fe)
            assert fe.blk(0, T_OUT, 10 + i, data=pattern(SECTOR, i))[0] == S_OK
            if i % 2:   # half of them stop their ring first, as QEMU does at shutdown
                fe.get(Request.GET_VRING_BASE, VringState(0, 0))
        finally:
            fe.close()
        served.wait_idle()

    session(0)                         # first use: lazy imports, caches
    fds, maps = open_fds(), ram_mappings()
    for i in range(1, 6):
        session(i)
    assert open_fds() == fds
    assert not [f for f in fds if "vhost-test-ram" in f]
    assert ram_mappings() == maps == 0
    data = served.image.read_bytes()
    for i in range(6):
        assert data[(10 + i) * SECTOR:(11 + i) * SECTOR] == pattern(SECTOR, i)


def test_guest_addresses_in_descriptors_not_user_addresses(served):
    """A descriptor holding a user address points nowhere the backend maps: IOERR or an
    empty answer, never host memory."""
    fe = served.connect()
    try:
        ready(fe)
        d = fe.drivers[0]
        hdr, _ = d.alloc(struct.pack("<IIQ", T_IN, 0, 0))
        st, _ = d.alloc(1)
        t, _ = d.alloc(48)
        d.write_desc(t, 0, hdr, 16, 1, 1)
        d.write_desc(t, 1, fe.user(REGION1_GUEST + 0x200000), SECTOR, 2 | 1, 2)
        d.write_desc(t, 2, st, 1, 2)
        head = d.free.pop(0)
        d.write_desc(d.desc, head, t, 48, 4)
        d.publish(head)
        fe.kick(0)
        assert fe.wait_call(0)
        (h, used), = d.take_used()
        assert h == head and used <= 1
        if used:
            assert fe.memory.read_u8(st) == S_IOERR
    finally:
        fe.close()


def test_a_restarted_ring_signals_its_first_completion(served):
    """The firmware uses the ring, the frontend stops it (GET_VRING_BASE), the OS's
    driver sets up a fresh one from index 0: its first completion must be signalled
    (found by Linux under QEMU, after SeaBIOS had made one request)."""
    fe = served.connect()
    try:
        ready(fe)
        assert fe.blk(0, T_OUT, 1, data=pattern(SECTOR, 8))[0] == S_OK
        fe.get(Request.GET_VRING_BASE, VringState(0, 0))
        for fd in [*fe.kicks, *fe.calls, *fe.errs]:
            os.close(fd)
        fe.kicks, fe.calls, fe.errs, fe.drivers = [], [], [], []
        fe.add_ring(0)                                      # zeroed, indexes from 0
        assert fe.blk(0, T_IN, 1, read_len=SECTOR)[1] == pattern(SECTOR, 8)
    finally:
        fe.close()
