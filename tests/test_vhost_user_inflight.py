"""Inflight I/O tracking (INFLIGHT_SHMFD) in the vhost-user backend, with the test
frontend (tests/vhost_user_frontend.py): GET_INFLIGHT_FD's sealed, zeroed memory
of the specification's size; heads marked when taken and cleared when used; a
backend that goes away with requests taken and a new one given the same memory
with SET_INFLIGHT_FD runs exactly those again (in counter order, before new
requests, not the one whose used entry was already published) and the data
lands in the image; sizes from the frontend out of bounds are refused."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import test_vhost_user_blk_linux as lin
from conftest import cloud_kernel
from test_vhost_user_backend import SECTOR, Served, pattern
from test_vhost_user_blk_qemu import reap, wait_for_socket
from vhost_user_frontend import T_OUT, Frontend

from pyhv.engine.eventloop import EventLoop
from pyhv.engine.vhost_user.backend import Backend
from pyhv.engine.vhost_user.message import (
    PF_INFLIGHT_SHMFD,
    Inflight,
    Request,
)
from pyhv.engine.vhost_user.rng import make_device as make_rng

QSIZE = 16
#: one queue's region: a 16-byte header and 16 bytes per descriptor, rounded to 64
REGION = (16 + 16 * QSIZE + 63) // 64 * 64
HDR = struct.Struct("=QHHHH")
DESC = struct.Struct("=B5xHQ")
ORIGINAL = bytes(range(256)) * 2  # every sector of the test image


class Region:
    """The frontend's view of one queue's inflight region."""

    def __init__(self, fd: int, size: int) -> None:
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED)

    def header(self) -> tuple[int, int, int, int, int]:
        """(features, version, desc_num, last_batch_head, used_idx)"""
        return HDR.unpack_from(self.map, 0)  # type: ignore[return-value]

    def desc(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter)"""
        return DESC.unpack_from(self.map, HDR.size + DESC.size * head)  # type: ignore[return-value]

    def mark(self, head: int, counter: int) -> None:
        DESC.pack_into(self.map, HDR.size + DESC.size * head, 1, 0, counter)

    def set_header(self, last_batch_head: int, used_idx: int) -> None:
        features, version, desc_num, _l, _u = self.header()
        HDR.pack_into(self.map, 0, features, version, desc_num, last_batch_head, used_idx)

    def inflight(self) -> list[int]:
        return [h for h in range(QSIZE) if self.desc(h)[0]]

    def close(self) -> None:
        self.map.close()


def on_loop(served: Served, fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` on the backend's loop thread; its result."""
    return served.on_loop(fn)


def start(fe: Frontend, info_fd=None) -> tuple[Inflight, int]:  # type: ignore[no-untyped-def]
    """Negotiate, get (or hand back) the inflight memory, as QEMU's vhost-user-blk
    does before it starts the device."""
    offered_pf = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert offered_pf & PF_INFLIGHT_SHMFD
    fe.negotiate()
    if info_fd is None:
        info_fd = fe.get_inflight(1, QSIZE)
    info, fd = info_fd
    assert fe.set_inflight(info, fd) == 0
    assert fe.set_mem_table() == 0
    return info, fd


def connect(served: Served, fe: Frontend) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(served.path)
    fe.reconnect(s)


def sector(served: Served, n: int) -> bytes:
    with open(served.image, "rb") as f:
        f.seek(n * SECTOR)
        return f.read(SECTOR)


def write_request(fe: Frontend, sec: int, data: bytes) -> tuple[int, int]:
    """A write made available (not kicked): its head and status byte's address."""
    d = fe.drivers[0]
    head, outs = d.add([struct.pack("<IIQ", T_OUT, 0, sec), data], [1], indirect=True)
    return head, outs[-1][0]


# ---- the memory -------------------------------------------------------------------------------

def test_get_inflight_fd_gives_sealed_zeroed_memory_of_the_specified_size(tmp_path):
    served = Served(tmp_path, queues=2)
    fe = served.connect()
    try:
        fe.negotiate()
        info, fd = fe.get_inflight(2, 128)
        assert info == Inflight(2 * 2112, 0, 2, 128)  # 16 + 16*128 rounded up to 64
        assert os.fstat(fd).st_size == 2 * 2112
        with mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED) as m:
            assert bytes(m) == bytes(info.mmap_size)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        os.close(fd)
        info, fd = fe.get_inflight(1, QSIZE)  # again: a new one replaces it
        assert info.mmap_size == REGION
        os.close(fd)
    finally:
        fe.close()
        served.close()


def test_inflight_is_offered_only_for_devices_that_can_replay_requests(tmp_path):
    loop = EventLoop()
    try:
        rng = make_rng()
        try:
            assert not Backend(rng, loop).protocol_features & PF_INFLIGHT_SHMFD
        finally:
            rng.close()
    finally:
        loop.close()
    served = Served(tmp_path)
    try:
        assert served.backend.protocol_features & PF_INFLIGHT_SHMFD
    finally:
        served.close()


@pytest.mark.parametrize("queues,size", [(0, 16), (2, 16), (1, 0), (1, 2048)])
def test_get_inflight_fd_with_bad_sizes_ends_the_connection(tmp_path, queues, size):
    served = Served(tmp_path)
    fe = served.connect()
    try:
        fe.negotiate()
        fe.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, queues, size))
        assert fe.hung_up()
        served.wait_idle()
        assert any("inflight memory for" in line for line in served.logs), served.logs
    finally:
        fe.close()
    fe = served.connect()  # the next frontend is served
    try:
        fe.negotiate()
        _info, fd = fe.get_inflight(1, QSIZE)
        os.close(fd)
    finally:
        fe.close()
        served.close()


def test_get_inflight_fd_without_the_protocol_feature_ends_the_connection(tmp_path):
    served = Served(tmp_path)
    fe = served.connect()
    try:
        pf = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
        assert fe.ack(Request.SET_PROTOCOL_FEATURES, pf & ~PF_INFLIGHT_SHMFD) == 0
        fe.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, QSIZE))
        assert fe.hung_up()
    finally:
        fe.close()
        served.close()


@pytest.mark.parametrize("case", ["size", "file", "offset", "queues", "queue-size"])
def test_set_inflight_fd_with_bad_sizes_gets_an_error_reply(tmp_path, case):
    served = Served(tmp_path)
    fe = served.connect()
    mem = os.memfd_create("fe-inflight", os.MFD_CLOEXEC)
    try:
        fe.negotiate()
        os.ftruncate(mem, 2 * mmap.PAGESIZE)
        info = {"size": Inflight(REGION - 64, 0, 1, QSIZE),
                "file": Inflight(REGION, mmap.PAGESIZE * 2, 1, QSIZE),
                "offset": Inflight(REGION, 64, 1, QSIZE),
                "queues": Inflight(REGION * 2, 0, 2, QSIZE),
                "queue-size": Inflight(1 << 20, 0, 1, 4096)}[case]
        assert fe.set_inflight(info, mem) == 1
        assert served.backend.inflight is None
        info, fd = fe.get_inflight(1, QSIZE)  # the connection goes on
        os.close(fd)
    finally:
        os.close(mem)
        fe.close()
        served.close()


# ---- tracking and resubmission ----------------------------------------------------------------

class Session:
    """A backend, a frontend that negotiated inflight tracking, and its region."""

    def __init__(self, tmp_path) -> None:
        self.served = Served(tmp_path)
        self.fe = self.served.connect()
        self.info, self.fd = start(self.fe)
        self.region = Region(self.fd, self.info.mmap_size)

    def close(self) -> None:
        self.region.close()
        os.close(self.fd)
        self.fe.close()
        self.served.close()


def test_taken_heads_are_marked_and_a_new_backend_resubmits_them(tmp_path):
    ses = Session(tmp_path)
    try:
        ses.fe.add_ring(0, size=QSIZE)
        assert ses.region.header() == (0, 1, QSIZE, 0, 0)  # initialised when the ring started
        first = pattern(SECTOR, 1)
        status, _got, _len = ses.fe.blk(0, T_OUT, 4, first)
        assert status == 0 and sector(ses.served, 4) == first
        head0 = ses.fe.drivers[0].free[-1]  # the head blk() just gave back
        assert ses.region.desc(head0)[0] == 0 and ses.region.desc(head0)[2] == 0  # counter 0
        assert ses.region.header()[3:] == (head0, 1)  # last batch head, used index

        # the backend takes a request and goes away before it completes it
        data = pattern(SECTOR, 2)
        head1, status_addr = write_request(ses.fe, 9, data)
        backend = ses.served.backend
        chain = on_loop(ses.served, lambda: backend.vrings[0].queue.pop(backend.memory))
        assert chain.head == head1
        assert ses.region.inflight() == [head1] and ses.region.desc(head1)[2] == 1
        ses.served.close()
        assert sector(ses.served, 9) == ORIGINAL

        ses.served = Served(tmp_path)  # a new backend on the same socket and image
        connect(ses.served, ses.fe)
        start(ses.fe, (ses.info, ses.fd))
        ses.fe.restart_ring(0, base=1)  # QEMU's base after a crash: the used index
        assert ses.fe.wait_call(0), "the resubmitted request did not complete"
        assert ses.fe.drivers[0].take_used() == [(head1, 1)]
        assert ses.fe.memory.read_u8(status_addr) == 0
        assert sector(ses.served, 9) == data
        assert ses.region.inflight() == [] and ses.region.header()[3:] == (head1, 2)
        assert any("resubmitting 1 inflight" in line for line in ses.served.logs), ses.served.logs

        # new requests go on from there, counted after the resubmitted one
        ses.fe.drivers[0].free.append(head1)
        ses.fe.drivers[0].set_used_event(ses.fe.drivers[0].last_used)  # as blk() does
        status, _got, _len = ses.fe.blk(0, T_OUT, 10, first)
        assert status == 0 and sector(ses.served, 10) == first
        assert ses.region.header()[4] == 3
    finally:
        ses.close()


def test_resubmission_runs_in_counter_order_before_new_requests(tmp_path):
    ses = Session(tmp_path)
    try:
        d = ses.fe.add_ring(0, size=QSIZE)
        ses.served.close()  # the backend is gone; what it left is crafted below

        # done: its used entry was published, the region not updated after it
        done, _s = write_request(ses.fe, 2, pattern(SECTOR, 9))
        ses.fe.memory.write(d.used + 4, struct.pack("<II", done, 1))
        ses.fe.memory.write_u16(d.used + 2, 1)
        ses.region.mark(done, 0)
        ses.region.set_header(last_batch_head=done, used_idx=0)
        # taken later, in the other order of their counters: both write sector 0
        a, sa = write_request(ses.fe, 0, pattern(SECTOR, 10))
        b, sb = write_request(ses.fe, 0, pattern(SECTOR, 11))
        ses.region.mark(a, 7)
        ses.region.mark(b, 3)
        # and a new request nobody took yet
        c, sc = write_request(ses.fe, 1, pattern(SECTOR, 12))

        ses.served = Served(tmp_path)
        connect(ses.served, ses.fe)
        start(ses.fe, (ses.info, ses.fd))
        ses.fe.restart_ring(0, base=1)
        assert ses.fe.wait_call(0)
        assert [h for h, _len in d.take_used()] == [done, b, a, c]
        assert [ses.fe.memory.read_u8(s) for s in (sb, sa, sc)] == [0, 0, 0]
        assert sector(ses.served, 0) == pattern(SECTOR, 10)  # a ran after b
        assert sector(ses.served, 1) == pattern(SECTOR, 12)
        assert sector(ses.served, 2) == ORIGINAL  # the published one was not run again
        assert ses.region.inflight() == []
        assert ses.region.header()[4] == 4
        assert ses.region.desc(c)[2] == 8  # the counter goes on after the largest
        assert any("resubmitting 2 inflight" in line for line in ses.served.logs), ses.served.logs
    finally:
        ses.close()


@pytest.mark.parametrize("published", [False, True])
def test_a_batch_completed_at_once_is_recovered_as_a_whole(published: bool) -> None:
    """A device completes a batch with one used-index store: the heads are linked
    from last_batch_head first, so a backend that dies before the store resubmits
    all of them, and one that dies after it (before clearing their marks) none."""
    from virtio_driver import Driver, memory

    from pyhv.engine.vhost_user.inflight import InflightRegion, TrackedQueue
    from pyhv.engine.virtio.queue import SplitQueue

    mem = memory()
    drv = Driver(mem, size=QSIZE)
    q = TrackedQueue(QSIZE)
    q.size, q.desc_addr, q.avail_addr, q.used_addr = QSIZE, drv.desc, drv.avail, drv.used
    q.ready = True
    region = InflightRegion.create(1, QSIZE)
    try:
        q.track = region.queue(0)
        assert q.track.resume(QSIZE, 0) == []
        heads = [drv.add([b"x"], [1])[0] for _ in range(3)]
        assert q.take(mem) == heads
        for h in heads:
            q.fill(mem, h, 1)
        if published:
            SplitQueue.flush(q, mem)  # the index is out; the backend dies right after
        assert drv.take_used() == ([(h, 1) for h in heads] if published else [])
        again = region.queue(0).resume(QSIZE, q.next_used)
        assert again == ([] if published else heads)
        assert region.queue(0).used_idx == (3 if published else 0)
    finally:
        region.close()


def test_a_ring_larger_than_the_inflight_region_is_refused(tmp_path):
    served = Served(tmp_path)
    fe = served.connect()
    try:
        fe.negotiate()
        info, fd = fe.get_inflight(1, 8)
        assert fe.set_inflight(info, fd) == 0
        os.close(fd)
        assert fe.set_mem_table() == 0
        with pytest.raises(AssertionError):
            fe.add_ring(0, size=QSIZE)  # the kick that starts it gets an error reply
        assert any("do not fit the inflight region" in line for line in served.logs)
    finally:
        fe.close()
        served.close()


# ---- QEMU's vhost-user-blk reconnects to a restarted backend (tier linux) ----------------------

RECONNECT_INIT = lin.PREAMBLE + """\
busybox dd if=/dev/urandom of=/pattern bs=4096 count=512 2>/dev/null
echo PATTERN-SUM $(busybox sha256sum /pattern)
r=1
while [ $r -le {rounds} ]; do
  busybox dd if=/pattern of=/dev/vda bs=4096 seek=$((r*512)) oflag=direct conv=fsync \
    2>/dev/null
  echo ROUND $r RC $?
  r=$((r+1))
done
busybox sync
echo 3 > /proc/sys/vm/drop_caches
r=1
while [ $r -le {rounds} ]; do
  busybox dd if=/dev/vda of=/back bs=4096 skip=$((r*512)) count=512 2>/dev/null
  echo READ $r $(busybox sha256sum /back)
  r=$((r+1))
done
echo GUEST-DONE
busybox poweroff -f
"""
ROUNDS = 8
#: the backend is killed (and a new one started) once the guest printed these rounds
KILL_AFTER = (1, 3, 5)


def _backend(sock, disk, log):  # type: ignore[no-untyped-def]
    return subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk", "--socket",
                             str(sock), "--disk", str(disk)], stderr=log)


@pytest.mark.linux
def test_qemu_reconnects_to_a_restarted_backend_and_the_guest_writes_go_on(tmp_path,
                                                                           monkeypatch):
    """The guest writes 2 MiB rounds with dd (fsync'd) while the test kills ``pyhv
    vhost-user-blk`` with SIGKILL (after rounds 1, 3 and 5) and starts a new one on
    the same socket each time; QEMU (``reconnect=1``) hands it the inflight memory,
    and every dd completes, the guest reads back what it wrote and so does the host.
    Whether a kill lands with requests taken is chance (the count is printed)."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    kernel = cloud_kernel()
    if kernel is None:
        pytest.skip("no Debian cloud kernel")
    monkeypatch.setattr(lin, "INIT", RECONNECT_INIT.replace("{rounds}", str(ROUNDS)))
    initrd = lin.initramfs(tmp_path, kernel)
    image = tmp_path / "disk.img"
    disk_size = (ROUNDS + 2) * 2 * (1 << 20)
    image.write_bytes(b"\x5a" * disk_size)
    sock = tmp_path / "blk.sock"
    console = tmp_path / "console.log"
    console.touch()
    logs = []
    backends = []

    def launch() -> None:
        logs.append((tmp_path / f"backend{len(logs) + 1}.log").open("w"))
        backends.append(_backend(sock, image, logs[-1]))
        wait_for_socket(sock, backends[-1])

    qemu = None
    err = ""
    at_kill = []
    try:
        launch()
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "256",
             "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
             "-machine", "pc,memory-backend=mem", "-nodefaults", "-no-user-config",
             "-display", "none", "-serial", f"file:{console}", "-no-reboot",
             "-kernel", kernel, "-initrd", str(initrd),
             "-append", "console=ttyS0 panic=-1 quiet",
             "-chardev", f"socket,id=c,path={sock},reconnect=1",
             "-device", "vhost-user-blk-pci,chardev=c"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 120
        for after in KILL_AFTER:
            while f"ROUND {after} " not in console.read_text(errors="replace"):
                assert qemu.poll() is None, console.read_text(errors="replace")[-3000:]
                assert time.monotonic() < end, f"the guest never finished round {after}"
                time.sleep(0.02)
            time.sleep(0.1)  # into the next round's writes
            backends[-1].send_signal(signal.SIGKILL)
            backends[-1].wait()
            at_kill.append(console.read_text(errors="replace").count(" RC "))
            os.unlink(sock)  # what is left of the killed one
            launch()
        _out, err = qemu.communicate(timeout=180)
        backends[-1].terminate()
        assert backends[-1].wait(10) == 0
    finally:
        reap(qemu, *backends)
        for f in logs:
            f.close()
    out = console.read_text(errors="replace")
    assert "GUEST-DONE" in out, out[-3000:] + err[-2000:]
    assert "I/O error" not in out, out[-3000:]
    rcs = re.findall(r"ROUND (\d+) RC (\d+)", out)
    assert rcs == [(str(r), "0") for r in range(1, ROUNDS + 1)], out[-3000:]
    wrote = re.search(r"PATTERN-SUM ([0-9a-f]{64})", out).group(1)  # type: ignore[union-attr]
    reads = re.findall(r"READ (\d+) ([0-9a-f]{64})", out)
    assert reads == [(str(r), wrote) for r in range(1, ROUNDS + 1)], out[-3000:]
    data = image.read_bytes()
    for r in range(1, ROUNDS + 1):
        chunk = data[r * 2 * (1 << 20):(r + 1) * 2 * (1 << 20)]
        assert hashlib.sha256(chunk).hexdigest() == wrote, f"round {r} on the host"
    resubmitted = sum((tmp_path / f"backend{i}.log").read_text().count("resubmitting")
                      for i in range(2, len(logs) + 1))
    print(f"rounds done at each kill: {at_kill}; restarts that resubmitted requests: "
          f"{resubmitted} of {len(KILL_AFTER)}")
