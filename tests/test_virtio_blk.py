"""virtio-blk on raw images, driven through the virtio-pci transport as Linux's
virtio_blk driver drives it (bytearray guest memory, real rings, a temp file),
and the raw backend's cache modes, O_DIRECT alignment and QEMU-compatible image
locking (cross-checked against qemu-io / qemu-img when they are installed)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
from test_virtio_pci import MsiLog, PciDriver
from virtio_driver import Driver, memory

from pyhv.config import ConfigError, DiskConfig
from pyhv.engine.block import (
    BlockError,
    ImageLockedError,
    open_disk,
)
from pyhv.engine.block import raw as rawmod
from pyhv.engine.block.raw import RawBackend
from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio import blk
from pyhv.engine.virtio.blk import (
    F_BLK_SIZE,
    F_DISCARD,
    F_FLUSH,
    F_MQ,
    F_RO,
    F_SEG_MAX,
    F_TOPOLOGY,
    F_WRITE_ZEROES,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_GET_LIFETIME,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkIoError,
    BlkLimits,
    VirtioBlk,
    parse_request,
)
from pyhv.engine.virtio.device import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from pyhv.engine.virtio.pci import MODERN_BAR, STATUS_DRIVER_OK, STATUS_NEEDS_RESET
from pyhv.engine.virtio.pci import VirtioPciFunction as Fn

MiB = 1 << 20
SECTOR = 512
ALL = (1 << 64) - 1
TESTS = Path(__file__).resolve().parent


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def image(tmp_path: Path, size: int = MiB, name: str = "disk.img",
          fill: Optional[bytes] = None) -> str:
    p = tmp_path / name
    if fill is None:
        p.write_bytes(b"")
        os.truncate(p, size)
    else:
        p.write_bytes((fill * (size // len(fill) + 1))[:size])
    return str(p)


@dataclass
class Env:
    fn: Fn
    drv: PciDriver
    mem: GuestMemory
    rings: list[Driver]
    dev: VirtioBlk
    path: str
    msi: MsiLog

    # ---- requests as the guest driver makes them -----------------------------------
    def submit(self, readable: list[bytes], writable: list[int], q: int = 0,
               indirect: bool = False) -> tuple[int, list[tuple[int, int]]]:
        ring = self.rings[q]
        free = list(ring.free)
        head, outs = ring.add(readable, writable, indirect=indirect)
        self.drv.kick(q)
        used = ring.take_used()
        assert [h for h, _ in used] == [head]
        ring.free = free                       # the chain's descriptors are free again
        return used[0][1], outs

    def status(self, outs: list[tuple[int, int]]) -> int:
        addr, n = outs[-1]
        return self.mem.read_u8(addr + n - 1)

    def read(self, sector: int, sectors: int, q: int = 0) -> tuple[int, int, bytes]:
        used, outs = self.submit([hdr(T_IN, sector)], [sectors * SECTOR, 1], q)
        return self.status(outs), used, self.mem.read(outs[0][0], sectors * SECTOR)

    def write(self, sector: int, data: bytes, q: int = 0) -> tuple[int, int]:
        used, outs = self.submit([hdr(T_OUT, sector), data], [1], q)
        return self.status(outs), used

    def simple(self, rtype: int, payload: bytes = b"", q: int = 0,
               sector: int = 0) -> tuple[int, int]:
        used, outs = self.submit([hdr(rtype, sector)] + ([payload] if payload else []), [1], q)
        return self.status(outs), used

    def host(self, offset: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(n)


def make(path: str, *, num_queues: int = 1, readonly: bool = False,
         serial: Optional[str] = None, discard: bool = False, cache: str = "writeback",
         detect_zeroes: str = "off", want: int = ALL, ring_size: int = 16,
         msix: bool = False, backend: Any = None) -> Env:
    mem = memory(8 * MiB * (num_queues + 1))
    if backend is None:
        backend = RawBackend(path, readonly=readonly, cache=cache, unmap=discard)
    dev = VirtioBlk(backend, serial=serial, num_queues=num_queues, discard=discard,
                    detect_zeroes=detect_zeroes)
    fn = Fn(dev, mem, "blk0")
    msi = MsiLog()
    fn.attach_msi(msi)
    if msix:
        fn.config_write(fn.msix.cap + 2, 2, 0x8000)
        for v in range(num_queues + 1):
            fn.bar_write(1, 16 * v, 8, 0xFEE0_0000)
            fn.bar_write(1, 16 * v + 8, 4, 0x40 + v)
            fn.bar_write(1, 16 * v + 12, 4, 0)
    drv = PciDriver(fn)
    drv.negotiate(want)
    event_idx = bool(want & F_RING_EVENT_IDX)
    indirect = bool(want & F_RING_INDIRECT_DESC)
    rings = []
    for i in range(num_queues):
        ring = Driver(mem, size=ring_size, base=0x10000 * (i + 1), heap=8 * MiB * (i + 1),
                      event_idx=event_idx, indirect=indirect)
        drv.setup_queue(i, ring, vector=i if msix else 0xFFFF)
        rings.append(ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    assert drv.status() & STATUS_DRIVER_OK
    return Env(fn, drv, mem, rings, dev, path, msi)


@pytest.fixture
def env(tmp_path: Path):
    made: list[Env] = []

    def factory(size: int = MiB, fill: Optional[bytes] = None, **kw: Any) -> Env:
        e = make(image(tmp_path, size, fill=fill, name=f"disk{len(made)}.img"), **kw)
        made.append(e)
        return e

    yield factory
    for e in made:
        e.dev.close()
        e.fn.close()


# ---- identity, features, configuration space ------------------------------------------
def test_identity_and_features(env) -> None:
    e = env()
    assert e.fn.config.get(0, 4) == 0x10421AF4           # 1af4:1042, a modern block device
    assert e.fn.config.get(0x09, 3) == 0x010000          # mass storage, SCSI
    offered = e.fn.offered
    for bit in (F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_WRITE_ZEROES, F_VERSION_1):
        assert offered & bit
    for bit in (F_RO, F_MQ, F_DISCARD, blk.F_CONFIG_WCE, blk.F_SIZE_MAX, blk.F_GEOMETRY):
        assert not offered & bit
    assert e.drv.r(0x12, 2) == 1 and e.drv.r(0x18, 2) == 16   # one queue (driver sized it)


def test_feature_variants(tmp_path: Path) -> None:
    p = image(tmp_path)
    with RawBackend(p, readonly=True) as b:
        assert VirtioBlk(b).features & F_RO
    with RawBackend(p, unmap=True) as b:
        d = VirtioBlk(b, num_queues=4, discard=True)
        assert d.features & F_MQ and d.features & F_DISCARD
        assert d.queue_sizes == (256,) * 4
    with pytest.raises(ValueError):
        VirtioBlk(RawBackend(p, locking=False), num_queues=0)


def test_config_space_layout_byte_by_byte(env) -> None:
    e = env(size=3 * MiB + 1000, num_queues=3, discard=True)
    dev_cfg = e.drv.caps[4][1]
    got = bytes(e.fn.bar_read(MODERN_BAR, dev_cfg + i, 1) for i in range(64))
    want = bytearray(64)

    def put(off: int, size: int, value: int) -> None:
        want[off:off + size] = value.to_bytes(size, "little")

    put(0, 8, (3 * MiB + 1000) // 512)   # capacity: whole sectors only
    put(8, 4, 0)                         # size_max
    put(12, 4, 254)                      # seg_max: queue size 256 less header and status
    put(16, 2, 0)                        # geometry.cylinders
    put(18, 1, 0)                        # geometry.heads
    put(19, 1, 0)                        # geometry.sectors
    put(20, 4, 512)                      # blk_size
    put(24, 1, 0)                        # topology.physical_block_exp
    put(25, 1, 0)                        # topology.alignment_offset
    put(26, 2, 0)                        # topology.min_io_size
    put(28, 4, 0)                        # topology.opt_io_size
    put(32, 1, 0)                        # writeback
    put(33, 1, 0)                        # unused0
    put(34, 2, 3)                        # num_queues
    put(36, 4, 0x3FFFFF)                 # max_discard_sectors
    put(40, 4, 16)                       # max_discard_seg
    put(44, 4, 8)                        # discard_sector_alignment
    put(48, 4, 0x3FFFFF)                 # max_write_zeroes_sectors
    put(52, 4, 16)                       # max_write_zeroes_seg
    put(56, 1, 1)                        # write_zeroes_may_unmap (discard='unmap')
    assert got == bytes(want)
    assert len(e.dev.config_bytes()) == 60
    # wider accesses see the same little-endian fields
    assert e.fn.bar_read(MODERN_BAR, dev_cfg, 4) == (3 * MiB + 1000) // 512
    assert e.fn.bar_read(MODERN_BAR, dev_cfg + 4, 4) == 0
    assert e.fn.bar_read(MODERN_BAR, dev_cfg + 34, 2) == 3
    # writes to the (read-only) configuration are ignored
    e.fn.bar_write(MODERN_BAR, dev_cfg, 4, 0x1234)
    assert e.fn.bar_read(MODERN_BAR, dev_cfg, 4) == (3 * MiB + 1000) // 512


def test_config_without_discard_and_o_direct_4k_topology(tmp_path: Path) -> None:
    p = image(tmp_path)
    with RawBackend(p) as b:
        cfg = VirtioBlk(b).config_bytes()
        assert cfg[56] == 0 and cfg[24] == 0
    with RawBackend(p, cache="none") as b:
        b.request_alignment = 4096                  # a 4Kn host disk
        cfg = VirtioBlk(b).config_bytes()
        assert cfg[24] == 3 and struct.unpack_from("<H", cfg, 26)[0] == 8


# ---- reads and writes ---------------------------------------------------------------
def test_write_then_read_back_checked_on_the_host_file(env) -> None:
    e = env()
    data = pattern(3 * SECTOR)
    assert e.write(5, data) == (S_OK, 1)                 # OUT: only the status is written
    assert e.host(5 * SECTOR, len(data)) == data
    assert e.host(0, 5 * SECTOR) == bytes(5 * SECTOR)    # nothing else touched
    status, used, got = e.read(5, 3)
    assert (status, used, got) == (S_OK, 3 * SECTOR + 1, data)  # IN: data + status


def test_scattered_buffers_and_header_sharing_a_descriptor(env) -> None:
    e = env()
    a, b_ = pattern(SECTOR, 3), pattern(2 * SECTOR, 9)
    # header and first data sector in one descriptor, the rest in another
    used, outs = e.submit([hdr(T_OUT, 100) + a, b_], [1])
    assert (e.status(outs), used) == (S_OK, 1)
    assert e.host(100 * SECTOR, 3 * SECTOR) == a + b_
    # read into three buffers of odd sizes whose total is whole sectors, the status byte
    # sharing the last one
    used, outs = e.submit([hdr(T_IN, 100)], [700, 300, 3 * SECTOR - 1000 + 1])
    assert used == 3 * SECTOR + 1 and e.status(outs) == S_OK
    got = b"".join(e.mem.read(addr, n) for addr, n in outs)[:3 * SECTOR]
    assert got == a + b_


def test_indirect_chains(env) -> None:
    e = env()
    data = pattern(2 * SECTOR, 5)
    used, outs = e.submit([hdr(T_OUT, 7), data], [1], indirect=True)
    assert (e.status(outs), used) == (S_OK, 1)
    used, outs = e.submit([hdr(T_IN, 7)], [2 * SECTOR, 1], indirect=True)
    assert used == 2 * SECTOR + 1 and e.mem.read(outs[0][0], 2 * SECTOR) == data


def test_multiqueue_each_queue_served_and_interrupts_per_vector(env) -> None:
    e = env(num_queues=4, msix=True)
    assert e.fn.offered & F_MQ and e.drv.r(0x12, 2) == 4
    for q in range(4):
        data = pattern(SECTOR, q + 11)
        assert e.write(10 + q, data, q=q) == (S_OK, 1)
        status, used, got = e.read(10 + q, 1, q=q)
        assert (status, got) == (S_OK, data)
        assert e.host((10 + q) * SECTOR, SECTOR) == data
    assert sorted(set(e.msi.fired)) == [0, 1, 2, 3]
    assert all(not r.take_used() for r in e.rings)


def test_flush_and_writethrough_when_the_driver_refuses_flush(env, monkeypatch) -> None:
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    e = env()
    assert e.write(0, pattern(SECTOR)) == (S_OK, 1)
    assert calls == []                              # write-back: the write is not synced
    assert e.simple(T_FLUSH) == (S_OK, 1)
    assert len(calls) == 1
    # a driver without VIRTIO_BLK_F_FLUSH: every write is stable when it completes
    e2 = env(want=ALL & ~F_FLUSH)
    assert e2.dev.writethrough
    calls.clear()
    assert e2.write(0, pattern(SECTOR)) == (S_OK, 1)
    assert len(calls) == 1


def test_unsafe_cache_flush_is_a_no_op(env, monkeypatch) -> None:
    e = env(cache="unsafe")
    monkeypatch.setattr(os, "fdatasync", lambda fd: pytest.fail("fdatasync under unsafe"))
    assert e.simple(T_FLUSH) == (S_OK, 1)


def test_a_failed_flush_fails_every_later_flush(env, monkeypatch) -> None:
    e = env()
    real = os.fdatasync

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", eio)
    assert e.simple(T_FLUSH) == (S_IOERR, 1)
    monkeypatch.setattr(os, "fdatasync", real)
    assert e.simple(T_FLUSH) == (S_IOERR, 1)      # the page cache may have lost writes
    assert e.read(0, 1)[0] == S_OK                 # reads go on


# ---- error policies (werror/rerror) -----------------------------------------------------
def failing(monkeypatch, name: str, err: int) -> list[int]:
    """os.preadv or os.pwritev fails with ``err`` while the returned list is non-empty."""
    real = getattr(os, name)
    armed = [1]

    def call(fd, views, pos):
        if armed:
            raise OSError(err, os.strerror(err))
        return real(fd, views, pos)

    monkeypatch.setattr(os, name, call)
    return armed


def policy_env(env, werror: str = "enospc", rerror: str = "report"):
    e = env()
    e.dev.werror, e.dev.rerror = werror, rerror
    seen: list[BlkIoError] = []
    e.dev.on_io_error = seen.append
    return e, seen


def test_report_ignore_and_the_default_enospc(env, monkeypatch) -> None:
    e, seen = policy_env(env)                            # QEMU's defaults
    armed = failing(monkeypatch, "pwritev", errno.EIO)
    assert e.write(4, pattern(SECTOR)) == (S_IOERR, 1)   # enospc: EIO is reported
    assert seen == [BlkIoError("write", "report", False, "Input/output error")]
    assert not e.dev.stopped and e.dev.io_status == "ok"
    e.dev.werror = "ignore"
    assert e.write(4, pattern(SECTOR)) == (S_OK, 1)      # ignored: the guest sees success
    assert seen[-1].action == "ignore" and e.dev.stats.wr_operations == 0
    armed.clear()
    rfail = failing(monkeypatch, "preadv", errno.EIO)
    assert e.read(0, 1)[:2] == (S_IOERR, 1)              # rerror report
    assert seen[-1] == BlkIoError("read", "report", False, "Input/output error")
    rfail.clear()
    assert e.write(4, pattern(SECTOR)) == (S_OK, 1)
    assert e.host(4 * SECTOR, SECTOR) == pattern(SECTOR)


@pytest.mark.parametrize("werror,err,status", [("enospc", errno.ENOSPC, "nospace"),
                                               ("stop", errno.EIO, "failed")])
def test_stop_holds_the_request_until_retry(env, monkeypatch, werror, err, status) -> None:
    e, seen = policy_env(env, werror=werror)
    armed = failing(monkeypatch, "pwritev", err)
    ring = e.rings[0]
    head, outs = ring.add([hdr(T_OUT, 8), pattern(SECTOR)], [1])
    e.drv.kick(0)
    assert ring.take_used() == [] and e.dev.stopped and e.dev.io_status == status
    assert seen == [BlkIoError("write", "stop", err == errno.ENOSPC, os.strerror(err))]
    head2, outs2 = ring.add([hdr(T_IN, 0)], [SECTOR, 1])   # queued while stopped
    e.drv.kick(0)
    assert ring.take_used() == [] and len(seen) == 1       # nothing moves
    e.dev.retry()                                          # resumed, still failing
    assert ring.take_used() == [] and e.dev.stopped and len(seen) == 2
    armed.clear()                                          # the host made room
    e.dev.retry()
    assert ring.take_used() == [(head, 1), (head2, SECTOR + 1)]
    assert e.status(outs) == S_OK and e.status(outs2) == S_OK
    assert not e.dev.stopped and e.dev.io_status == "ok"
    assert e.host(8 * SECTOR, SECTOR) == pattern(SECTOR)


def test_a_read_stop_and_reset_drops_what_was_held(env, monkeypatch) -> None:
    e, seen = policy_env(env, rerror="stop")
    failing(monkeypatch, "preadv", errno.EIO)
    ring = e.rings[0]
    ring.add([hdr(T_IN, 0)], [SECTOR, 1])
    e.drv.kick(0)
    assert e.dev.stopped and seen[-1].operation == "read" and seen[-1].action == "stop"
    e.dev.reset()
    assert not e.dev.stopped and e.dev.io_status == "ok"


@pytest.mark.parametrize("policy,rpolicy,want", [
    (None, None, ("enospc", "report")),
    ("stop", None, ("stop", "stop")),            # libvirt: error_policy covers reads
    ("enospace", None, ("enospc", "report")),    # ... but enospace means nothing for reads
    ("ignore", "report", ("ignore", "report")),
    ("report", "stop", ("report", "stop")),
])
def test_error_policies_from_libvirts_attributes(policy, rpolicy, want) -> None:
    d = DiskConfig("/x.img", "vda", error_policy=policy, rerror_policy=rpolicy)
    assert d.error_policies() == want


def test_bad_error_policies_are_refused() -> None:
    with pytest.raises(ConfigError, match="error policy 'pause'"):
        DiskConfig("/x.img", "vda", error_policy="pause")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="read error policy 'enospace'"):
        DiskConfig("/x.img", "vda", rerror_policy="enospace")  # type: ignore[arg-type]


# ---- write threshold (QMP block-set-write-threshold) -------------------------------------
def test_write_threshold_fires_once_on_the_first_write_past_it(env) -> None:
    e = env()
    fired: list[tuple[int, int]] = []
    e.dev.on_threshold = lambda past, at: fired.append((past, at))
    e.dev.write_threshold = 8 * SECTOR
    assert e.write(7, pattern(SECTOR)) == (S_OK, 1)          # ends at the threshold
    assert e.read(100, 4)[0] == S_OK                          # reads never count
    assert fired == [] and e.dev.write_threshold == 8 * SECTOR
    assert e.write(7, pattern(2 * SECTOR)) == (S_OK, 1)      # one sector past it
    assert fired == [(SECTOR, 8 * SECTOR)] and e.dev.write_threshold == 0
    assert e.write(500, pattern(SECTOR)) == (S_OK, 1)        # disarmed
    assert fired == [(SECTOR, 8 * SECTOR)]
    e.dev.write_threshold = 64 * SECTOR                      # re-armed: write-zeroes
    assert e.simple(T_WRITE_ZEROES, seg(10, 2) + seg(100, 4)) == (S_OK, 1)
    assert fired[-1] == (40 * SECTOR, 64 * SECTOR)


# ---- GET_ID -------------------------------------------------------------------------
@pytest.mark.parametrize("serial,want", [
    ("pyhv-disk-1", b"pyhv-disk-1".ljust(20, b"\0")),
    ("ABCDEFGHIJKLMNOPQRST", b"ABCDEFGHIJKLMNOPQRST"),
    (None, bytes(20)),
])
def test_get_id(env, serial: Optional[str], want: bytes) -> None:
    e = env(serial=serial)
    used, outs = e.submit([hdr(T_GET_ID)], [20, 1])
    assert (e.status(outs), used) == (S_OK, 21)
    assert e.mem.read(outs[0][0], 20) == want


def test_get_id_into_a_short_buffer(env) -> None:
    e = env(serial="serial-number-0042")
    used, outs = e.submit([hdr(T_GET_ID)], [8, 1])
    assert (e.status(outs), used) == (S_OK, 9)
    assert e.mem.read(outs[0][0], 8) == b"serial-n"


# ---- discard and write-zeroes -------------------------------------------------------
def blocks(path: str) -> int:
    return os.stat(path).st_blocks


def test_discard_punches_a_hole(env) -> None:
    e = env(fill=b"\xaa", discard=True)
    before = blocks(e.path)
    assert e.simple(T_DISCARD, seg(256, 512) + seg(1024, 8)) == (S_OK, 1)
    assert e.host(256 * SECTOR, 512 * SECTOR) == bytes(512 * SECTOR)
    assert e.host(1024 * SECTOR, 8 * SECTOR) == bytes(8 * SECTOR)
    assert e.host(255 * SECTOR, SECTOR) == b"\xaa" * SECTOR       # neighbours kept
    assert e.host(768 * SECTOR, SECTOR) == b"\xaa" * SECTOR
    assert os.path.getsize(e.path) == MiB                         # KEEP_SIZE
    assert blocks(e.path) < before                                # deallocated


def test_discard_checks(env) -> None:
    e = env(fill=b"\xaa", discard=True)
    cap = MiB // SECTOR
    assert e.simple(T_DISCARD, seg(0, 8, flags=1)) == (S_UNSUPP, 1)   # unmap flag: UNSUPP
    assert e.simple(T_DISCARD, seg(0, 8, flags=4)) == (S_UNSUPP, 1)   # unknown flag
    assert e.simple(T_DISCARD, seg(0, 1) * 17) == (S_UNSUPP, 1)       # > max_discard_seg
    assert e.simple(T_DISCARD, seg(cap - 4, 8)) == (S_IOERR, 1)       # beyond the end
    assert e.simple(T_DISCARD, seg(2**64 - 1, 2)) == (S_IOERR, 1)     # overflowing
    assert e.simple(T_DISCARD, seg(0, 8)[:10]) == (S_IOERR, 1)        # not whole segments
    assert e.simple(T_DISCARD) == (S_IOERR, 1)                        # no segment
    assert e.simple(T_DISCARD, seg(0, 0x400000)) == (S_IOERR, 1)      # > max sectors
    assert e.host(0, MiB) == b"\xaa" * MiB                            # nothing done
    # not offered (discard='ignore'): UNSUPP
    e2 = env(fill=b"\xaa")
    assert e2.simple(T_DISCARD, seg(0, 8)) == (S_UNSUPP, 1)


def test_write_zeroes_with_and_without_unmap(env) -> None:
    e = env(fill=b"\x55", discard=True)
    assert e.simple(T_WRITE_ZEROES, seg(8, 8)) == (S_OK, 1)
    assert e.host(8 * SECTOR, 8 * SECTOR) == bytes(8 * SECTOR)
    assert e.host(7 * SECTOR, SECTOR) == b"\x55" * SECTOR
    before = blocks(e.path)
    assert e.simple(T_WRITE_ZEROES, seg(512, 256, flags=1)) == (S_OK, 1)
    assert e.host(512 * SECTOR, 256 * SECTOR) == bytes(256 * SECTOR)
    assert blocks(e.path) < before
    assert e.simple(T_WRITE_ZEROES, seg(0, 1, flags=2)) == (S_UNSUPP, 1)
    assert e.simple(T_WRITE_ZEROES, seg(2040, 16)) == (S_IOERR, 1)
    # without discard='unmap' write-zeroes is still offered, and never deallocates
    e2 = env(fill=b"\x55")
    assert e2.fn.offered & F_WRITE_ZEROES and not e2.fn.offered & F_DISCARD
    assert e2.simple(T_WRITE_ZEROES, seg(3, 5, flags=1)) == (S_OK, 1)
    assert e2.host(3 * SECTOR, 5 * SECTOR) == bytes(5 * SECTOR)


def test_write_zeroes_falls_back_to_writing_zeroes(env, monkeypatch) -> None:
    e = env(fill=b"\x77", discard=True)
    modes: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(rawmod, "fallocate", refuse)
    assert e.simple(T_WRITE_ZEROES, seg(3, 2000, flags=1)) == (S_OK, 1)
    assert modes == [rawmod.FALLOC_FL_PUNCH_HOLE | rawmod.FALLOC_FL_KEEP_SIZE,
                     rawmod.FALLOC_FL_ZERO_RANGE]
    assert e.host(3 * SECTOR, 2000 * SECTOR) == bytes(2000 * SECTOR)
    assert e.host(2 * SECTOR, SECTOR) == b"\x77" * SECTOR
    assert e.host(2003 * SECTOR, SECTOR) == b"\x77" * SECTOR
    # a discard the filesystem refuses is a no-op, not an error
    assert e.simple(T_DISCARD, seg(0, 8)) == (S_OK, 1)
    assert e.host(0, SECTOR) == b"\x77" * SECTOR


def test_detect_zeroes_turns_zero_writes_into_holes(env) -> None:
    e = env(fill=b"\x11", discard=True, detect_zeroes="unmap")
    before = blocks(e.path)
    assert e.write(256, bytes(256 * SECTOR)) == (S_OK, 1)
    assert e.host(256 * SECTOR, 256 * SECTOR) == bytes(256 * SECTOR)
    assert blocks(e.path) < before
    assert e.write(0, pattern(SECTOR)) == (S_OK, 1)           # non-zero data: a write
    assert e.host(0, SECTOR) == pattern(SECTOR)


# ---- read-only disks and ranges ------------------------------------------------------
def test_read_only_disk_refuses_writes_and_leaves_the_file_alone(env) -> None:
    e = env(fill=b"\x42", readonly=True, discard=True)
    assert e.fn.offered & F_RO
    assert e.write(0, pattern(2 * SECTOR)) == (S_IOERR, 1)
    assert e.simple(T_DISCARD, seg(0, 8)) == (S_IOERR, 1)
    assert e.simple(T_WRITE_ZEROES, seg(0, 8)) == (S_IOERR, 1)
    assert e.host(0, MiB) == b"\x42" * MiB
    assert e.read(0, 1)[:2] == (S_OK, SECTOR + 1)
    assert e.simple(T_FLUSH) == (S_OK, 1)
    with pytest.raises(BlockError, match="read-only"):
        e.dev.backend.write_from(0, [memoryview(bytearray(SECTOR))])
    assert fcntl.fcntl(e.dev.backend.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def test_out_of_range_sectors(env) -> None:
    e = env(size=64 * SECTOR + 100)             # a partial last sector is not exposed
    assert e.dev.limits.capacity == 64
    assert e.read(63, 1)[0] == S_OK
    assert e.read(64, 1)[:2] == (S_IOERR, 1)
    assert e.read(62, 4)[:2] == (S_IOERR, 1)
    assert e.read(2**64 - 1, 1)[:2] == (S_IOERR, 1)
    assert e.write(64, pattern(SECTOR)) == (S_IOERR, 1)
    assert e.write(2**63, pattern(SECTOR)) == (S_IOERR, 1)
    assert os.path.getsize(e.path) == 64 * SECTOR + 100
    assert e.host(64 * SECTOR, 100) == bytes(100)
    # the backend refuses on its own too
    with pytest.raises(BlockError, match="beyond"):
        e.dev.backend.write_from(64 * SECTOR, [memoryview(bytearray(101))])


def test_resize_grows_and_shrinks_what_the_driver_sees(env) -> None:
    """block_resize: the file and the capacity follow, each change is a configuration
    interrupt with a new generation, and requests are checked against the new size."""
    e = env(size=64 * SECTOR, msix=True)
    e.drv.w(0x10, 2, 1)                                  # msix_config: vector 1
    generation = e.drv.r(0x15, 1)
    e.dev.resize(128 * SECTOR)
    assert os.path.getsize(e.path) == 128 * SECTOR
    assert e.drv.r(0x2000, 8) == 128 and e.dev.limits.capacity == 128
    assert e.drv.r(0x15, 1) == (generation + 1) & 0xFF and e.msi.fired == [1]
    assert e.write(127, pattern(SECTOR)) == (S_OK, 1)
    assert e.host(127 * SECTOR, SECTOR) == pattern(SECTOR)
    assert e.read(100, 1)[0] == S_OK
    e.dev.resize(32 * SECTOR + 100)                      # a partial sector is not exposed
    assert os.path.getsize(e.path) == 32 * SECTOR + 100
    assert e.drv.r(0x2000, 8) == 32 and e.msi.fired[-1] == 1
    assert e.read(32, 1)[:2] == (S_IOERR, 1)
    assert e.read(31, 1)[0] == S_OK
    with pytest.raises(BlockError, match="size of -1"):
        e.dev.resize(-1)
    assert e.dev.limits.capacity == 32


def test_resize_of_a_read_only_disk_is_refused(env) -> None:
    e = env(size=64 * SECTOR, readonly=True)
    with pytest.raises(BlockError, match="read-only"):
        e.dev.resize(128 * SECTOR)
    assert os.path.getsize(e.path) == 64 * SECTOR and e.drv.r(0x2000, 8) == 64


# ---- malformed requests ----------------------------------------------------------------
def test_short_header(env) -> None:
    e = env()
    used, outs = e.submit([hdr(T_IN)[:8]], [SECTOR, 1])
    assert (e.status(outs), used) == (S_IOERR, 1)


def test_no_status_byte_or_a_read_only_one(env) -> None:
    e = env(fill=b"\x01")
    # only device-readable descriptors: the device cannot answer, length 0
    used, _ = e.submit([hdr(T_OUT, 0), pattern(SECTOR), b"\0"], [])
    assert used == 0
    assert e.host(0, SECTOR) == b"\x01" * SECTOR            # and did nothing
    used, _ = e.submit([hdr(T_FLUSH)], [])
    assert used == 0
    # the status byte outside guest RAM: same
    ring = e.rings[0]
    hdr_addr, _ = ring.alloc(hdr(T_IN))
    ring.write_desc(ring.desc, 0, hdr_addr, 16, 1, 1)
    ring.write_desc(ring.desc, 1, 1 << 40, 1, 2)
    ring.publish(0)
    e.drv.kick(0)
    assert ring.take_used() == [(0, 0)]
    # the queue goes on
    assert e.read(0, 1)[:2] == (S_OK, SECTOR + 1)
    assert not e.drv.status() & STATUS_NEEDS_RESET


def test_odd_lengths(env) -> None:
    e = env(fill=b"\x02")
    used, outs = e.submit([hdr(T_IN, 0)], [SECTOR + 1, 1])
    assert (e.status(outs), used) == (S_IOERR, 1)
    assert e.write(0, b"x" * 100) == (S_IOERR, 1)
    assert e.write(0, b"x" * (SECTOR + 3)) == (S_IOERR, 1)
    assert e.host(0, 2 * SECTOR) == b"\x02" * 2 * SECTOR
    # a zero-length read at the end is fine
    assert e.read(MiB // SECTOR, 0)[:2] == (S_OK, 1)


def test_unknown_and_unoffered_types(env) -> None:
    e = env()
    for rtype in (T_GET_LIFETIME, blk.T_SECURE_ERASE, 2, 99, 0xFFFFFFFF):
        assert e.simple(rtype) == (S_UNSUPP, 1)


def test_data_buffer_outside_ram_fails_the_request_only(env) -> None:
    e = env(fill=b"\x03")
    ring = e.rings[0]
    hdr_addr, _ = ring.alloc(hdr(T_IN, 0))
    st_addr, _ = ring.alloc(1)
    ring.write_desc(ring.desc, 0, hdr_addr, 16, 1, 1)
    ring.write_desc(ring.desc, 1, 1 << 40, SECTOR, 1 | 2, 2)
    ring.write_desc(ring.desc, 2, st_addr, 1, 2)
    ring.publish(0)
    e.drv.kick(0)
    assert ring.take_used() == [(0, 1)]
    assert e.mem.read_u8(st_addr) == S_IOERR
    # a chain the queue cannot walk (a loop) goes back empty; the queue goes on
    ring.write_desc(ring.desc, 3, hdr_addr, 16, 1, 4)
    ring.write_desc(ring.desc, 4, hdr_addr, 16, 1, 3)
    ring.publish(3)
    e.drv.kick(0)
    assert ring.take_used() == [(3, 0)]
    ring.free = [i for i in ring.free if i not in (0, 1, 2, 3, 4)]
    assert e.read(0, 1)[:2] == (S_OK, SECTOR + 1)
    assert not e.drv.status() & STATUS_NEEDS_RESET


def test_parse_request_is_pure(tmp_path: Path) -> None:
    """parse_request decides from the chain and the limits alone."""
    mem = memory()
    ring = Driver(mem, size=8)
    q = ring.queue()
    ring.add([hdr(T_OUT, 4), pattern(SECTOR)], [1])
    chain = q.pop(mem)
    assert chain is not None
    ok = parse_request(chain, BlkLimits(capacity=8))
    assert ok.status is None and ok.data_len == SECTOR and ok.sector == 4
    assert ok.reportable and ok.status_addr is not None
    ro = parse_request(chain, BlkLimits(capacity=8, readonly=True))
    assert ro.status == S_IOERR and "read-only" in ro.reason
    small = parse_request(chain, BlkLimits(capacity=4))
    assert small.status == S_IOERR and "beyond" in small.reason


def _three(ring: Driver, rtype: int, sector: int, data: int | bytes, into: bool,
           hdr_len: int, status_len: int, data_addr: Optional[int]) -> tuple[int, int]:
    """Publish a header / data / status chain of three direct descriptors (the shape
    VirtioBlk serves without walking it); (head, status address)."""
    h, _ = ring.alloc(hdr(rtype, sector).ljust(hdr_len, b"\0")[:hdr_len])
    d, n = ring.alloc(data)
    if data_addr is not None:
        d = data_addr
    st, _ = ring.alloc(status_len)
    ids = [ring.free.pop(0) for _ in range(3)]
    ring.write_desc(ring.desc, ids[0], h, hdr_len, 1, ids[1])
    ring.write_desc(ring.desc, ids[1], d, n, 1 | (2 if into else 0), ids[2])
    ring.write_desc(ring.desc, ids[2], st, status_len, 2)
    ring.publish(ids[0])
    return ids[0], st


@pytest.mark.parametrize("readonly,detect", [(False, "off"), (True, "off"), (False, "on")])
def test_plain_chains_served_inline_as_the_general_path_serves_them(
        env, readonly: bool, detect: str) -> None:
    """Chains of the plain shape are served from the descriptor table without
    walking them; a device serving them so and the general path (``handle`` on the
    walked chain) must leave the same status, used length, guest memory and image."""
    import random
    rng = random.Random(7)
    fill = pattern(SECTOR, 3)
    a = env(size=64 * SECTOR, fill=fill, readonly=readonly, detect_zeroes=detect,
            ring_size=64)
    b = env(size=64 * SECTOR, fill=fill, readonly=readonly, detect_zeroes=detect,
            ring_size=64)
    general = b.rings[0].queue()   # the same ring, walked here instead of by b's device
    ring_area = b.rings[0].desc
    errors: tuple[list[BlkIoError], list[BlkIoError]] = ([], [])
    a.dev.on_io_error, b.dev.on_io_error = errors[0].append, errors[1].append
    for _ in range(300):
        rtype = rng.choice([T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, 99])
        sectors = rng.choice([1, 2, 8])
        data: int | bytes = rng.choice([
            sectors * SECTOR, SECTOR - 1, bytes(sectors * SECTOR),
            pattern(sectors * SECTOR, rng.randrange(256))])
        args = (rtype, rng.choice([0, 5, 63, 64, 60, 1 << 40]), data, rng.random() < 0.5,
                rng.choice([16, 16, 16, 20]), rng.choice([1, 1, 1, 2]),
                rng.choice([None] * 8 + [1 << 40, 8 * MiB * 2 - 8]))
        for ring in (a.rings[0], b.rings[0]):
            ring.free = list(range(ring.size))
        head, st = _three(a.rings[0], *args)
        assert _three(b.rings[0], *args) == (head, st)
        a.drv.kick(0)
        got = a.rings[0].take_used()
        chain = general.pop(b.mem)
        assert chain is not None and chain.head == head
        want = [(head, b.dev.handle(chain))]
        general.add_used(b.mem, head, want[0][1])
        assert general.pop(b.mem) is None   # caught up, as a's device is (avail_event)
        assert got == want, args
        for start, n in ((ring_area, 0x1000), (8 * MiB, 0x10000)):  # rings, buffers
            assert a.mem.read(start, n) == b.mem.read(start, n), args
        assert a.host(0, 64 * SECTOR) == b.host(0, 64 * SECTOR), args
        assert errors[0] == errors[1], args
        a.rings[0].heap = b.rings[0].heap = 8 * MiB   # buffers reused
    counts = ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations",
              "wr_highest_offset")
    assert [getattr(a.dev.stats, k) for k in counts] == \
        [getattr(b.dev.stats, k) for k in counts]
    assert a.dev.stats.rd_operations and (readonly or a.dev.stats.wr_operations)


def test_a_request_held_mid_batch_holds_the_ones_after_it(env, monkeypatch) -> None:
    e, seen = policy_env(env, werror="stop")
    armed = failing(monkeypatch, "pwritev", errno.EIO)
    ring = e.rings[0]
    h1, o1 = ring.add([hdr(T_IN, 0)], [SECTOR, 1])
    h2, o2 = ring.add([hdr(T_OUT, 8), pattern(SECTOR)], [1])
    h3, o3 = ring.add([hdr(T_IN, 8)], [SECTOR, 1])
    e.drv.kick(0)                  # one notification, three requests: the second stops
    assert ring.take_used() == [(h1, SECTOR + 1)] and e.dev.stopped
    armed.clear()
    e.dev.retry()
    assert ring.take_used() == [(h2, 1), (h3, SECTOR + 1)]
    assert e.mem.read(o3[0][0], SECTOR) == pattern(SECTOR)
    assert [e.status(o) for o in (o1, o2, o3)] == [S_OK] * 3 and len(seen) == 1


def test_a_request_the_driver_rewrote_before_it_could_be_held_is_answered_empty(
        env, monkeypatch) -> None:
    """The stop policy holds a failed plain write by walking its chain; if the driver
    broke the chain meanwhile (here: while the write was failing), the request goes
    back empty, nothing is held and the requests after it are served."""
    e, seen = policy_env(env, werror="stop")
    ring = e.rings[0]
    h1, _o1 = ring.add([hdr(T_OUT, 8), pattern(SECTOR)], [1])
    h2, o2 = ring.add([hdr(T_IN, 0)], [SECTOR, 1])
    real = os.pwritev

    def rewrite_and_fail(fd, views, pos):  # type: ignore[no-untyped-def]
        ring.write_desc(ring.desc, h1, 0, 16, 1, h1)  # h1 now links to itself
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pwritev", rewrite_and_fail)
    e.drv.kick(0)
    monkeypatch.setattr(os, "pwritev", real)
    assert ring.take_used() == [(h1, 0), (h2, SECTOR + 1)]
    assert not e.dev.stopped and e.status(o2) == S_OK
    assert [s.action for s in seen] == ["stop"]


def test_take_with_no_room_takes_nothing() -> None:
    mem = memory()
    drv = Driver(mem)
    q = drv.queue()
    drv.add([b"x"], [1])
    assert q.take(mem, 0) == [] and q.pending(mem) == 1


def test_event_idx_driver_told_once_the_device_caught_up(env) -> None:
    e = env(want=ALL)
    ring = e.rings[0]
    assert ring.event_idx
    for _ in range(3):
        ring.add([hdr(T_IN, 0)], [SECTOR, 1])
    e.drv.kick(0)
    assert len(ring.take_used()) == 3
    # avail_event (after the used ring's elements) names the next index to come
    assert e.mem.read_u16(ring.used + 4 + 8 * ring.size) == ring.avail_idx


# ---- the raw backend: cache modes, O_DIRECT -------------------------------------------
@pytest.mark.parametrize("cache,direct,dsync", [
    ("writeback", False, False), ("default", False, False), ("none", True, False),
    ("writethrough", False, True), ("directsync", True, True), ("unsafe", False, False),
])
def test_cache_modes_open_flags_and_round_trip(env, cache: str, direct: bool,
                                               dsync: bool) -> None:
    e = env(cache=cache)
    flags = fcntl.fcntl(e.dev.backend.fd, fcntl.F_GETFL)
    assert bool(flags & os.O_DIRECT) == direct
    assert bool(flags & os.O_DSYNC) == dsync
    # bytearray guest memory is not sector-aligned: O_DIRECT goes through a bounce buffer
    data = pattern(5 * SECTOR, 4)
    assert e.write(3, data) == (S_OK, 1)
    assert e.host(3 * SECTOR, len(data)) == data
    assert e.read(3, 5)[2] == data
    assert e.simple(T_FLUSH) == (S_OK, 1)


def test_o_direct_straight_into_aligned_guest_memory(tmp_path: Path, monkeypatch) -> None:
    p = image(tmp_path, fill=b"\x99")
    mem = GuestMemory.anonymous([(0, 4 * MiB)])
    with RawBackend(p, cache="none") as b:
        seen: list[int] = []
        real = os.preadv
        monkeypatch.setattr(os, "preadv",
                            lambda fd, bufs, off: (seen.append(len(bufs)), real(fd, bufs, off))[1])
        b.read_into(4096, [mem.view(0x10000, 4096), mem.view(0x20000, 4096)])
        assert seen == [2]                    # one preadv into guest memory, no bounce
        assert mem.read(0x10000, 4096) == b"\x99" * 4096
        mem.write(0x30000, pattern(8192))
        b.write_from(0, [mem.view(0x30000, 8192)])
    assert Path(p).read_bytes()[:8192] == pattern(8192)
    mem.close()


def test_o_direct_read_modify_write_on_4k_blocks(tmp_path: Path) -> None:
    size = 8192 + 1536                     # the last 4 KiB block is partial
    p = image(tmp_path, size=size, fill=b"\xcc")
    with RawBackend(p, cache="none") as b:
        b.request_alignment = b.memory_alignment = 4096
        b.write_from(512, [memoryview(bytearray(b"A" * 1024))])          # inside a block
        b.write_from(3584, [memoryview(bytearray(b"B" * 1024))])         # across blocks
        b.write_from(8192 + 512, [memoryview(bytearray(b"C" * 1024))])   # the partial block
        out = bytearray(size)
        b.read_into(0, [memoryview(out)[:700], memoryview(out)[700:]])
    want = bytearray(b"\xcc" * size)
    want[512:1536] = b"A" * 1024
    want[3584:4608] = b"B" * 1024
    want[8704:9728] = b"C" * 1024
    assert bytes(out) == bytes(want)
    assert Path(p).read_bytes() == bytes(want)       # and the file did not grow


def test_o_direct_refused_by_the_filesystem(tmp_path: Path, monkeypatch) -> None:
    p = image(tmp_path)
    real = os.open

    def no_direct(path: str, flags: int, *a: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(BlockError) as ei:
        RawBackend(p, cache="none")
    msg = str(ei.value)
    assert p in msg and "O_DIRECT" in msg and "cache=writeback" in msg and "\n" not in msg
    RawBackend(p, cache="writeback").close()


def test_short_file_reads_as_zeroes(tmp_path: Path) -> None:
    p = image(tmp_path, size=8 * SECTOR, fill=b"\x10")
    with RawBackend(p) as b:
        os.truncate(p, 2 * SECTOR)              # someone shrank it under us
        out = bytearray(b"\xff" * 4 * SECTOR)
        b.read_into(0, [memoryview(out)])
        assert bytes(out) == b"\x10" * 2 * SECTOR + bytes(2 * SECTOR)


def test_open_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.img")
    for call, needle in [
        (lambda: RawBackend(missing), "No such file"),
        (lambda: RawBackend(image(tmp_path), kind="block"), "block device"),
        (lambda: RawBackend(str(tmp_path), readonly=True), "regular file"),
        (lambda: RawBackend(image(tmp_path, name="c.img"), cache="bogus"), "cache mode"),
    ]:
        with pytest.raises(BlockError) as ei:
            call()
        assert needle in str(ei.value) and "\n" not in str(ei.value)
    raw = image(tmp_path, name="q.img")
    with pytest.raises(BlockError, match=f"^{raw}: not a valid qcow2 image: no qcow2 magic$"):
        open_disk(DiskConfig(raw, format="qcow2"))


def test_from_config(tmp_path: Path) -> None:
    p = image(tmp_path, fill=b"\x01")
    disk = DiskConfig(p, target="vda", readonly=False, cache="none", discard="unmap",
                      detect_zeroes="unmap", serial="S1")
    d = VirtioBlk.from_config(disk, num_queues=2)
    try:
        assert d.features & F_DISCARD and d.features & F_MQ and d.serial == "S1"
        assert d.backend.can_unmap and d.detect_zeroes == "unmap"
        assert isinstance(d.backend, RawBackend) and d.backend.direct
    finally:
        d.close()


# ---- image locking ---------------------------------------------------------------
def test_two_writers_the_second_is_refused(tmp_path: Path) -> None:
    p = image(tmp_path)
    first = RawBackend(p)
    with pytest.raises(ImageLockedError) as ei:
        RawBackend(p)
    msg = str(ei.value)
    assert msg.startswith(p + ":") and '"write" lock' in msg and "\n" not in msg
    with pytest.raises(ImageLockedError):
        RawBackend(p, readonly=True)                # a reader would see writes it refuses
    first.close()
    RawBackend(p).close()                           # released with the file


def test_readers_share_and_keep_writers_out(tmp_path: Path) -> None:
    p = image(tmp_path)
    a, b = RawBackend(p, readonly=True), RawBackend(p, readonly=True)
    with pytest.raises(ImageLockedError, match="write"):
        RawBackend(p)
    a.close()
    b.close()


def test_shareable_disks_share_writes(tmp_path: Path) -> None:
    p = image(tmp_path)
    a, b = RawBackend(p, shared=True), RawBackend(p, shared=True)
    with pytest.raises(ImageLockedError):
        RawBackend(p)                               # an exclusive writer is still refused
    a.close()
    b.close()


def test_lock_bytes_are_qemus(tmp_path: Path) -> None:
    """Bytes 100+perm held, 200+perm not shared: a writer holds 100, 101 and 201."""
    p = image(tmp_path)
    with RawBackend(p):
        fd = os.open(p, os.O_RDONLY)
        try:
            held = [o for o in range(96, 210) if rawmod._held_by_others(fd, o)]
        finally:
            os.close(fd)
    assert held == [100, 101, 201]
    with RawBackend(p, readonly=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            held = [o for o in range(96, 210) if rawmod._held_by_others(fd, o)]
        finally:
            os.close(fd)
    assert held == [100, 201]


qemu_io = pytest.mark.skipif(not shutil.which("qemu-io") or not shutil.which("qemu-img"),
                             reason="qemu-io / qemu-img (qemu-utils) are not installed")


def _wait_locked(path: str, offset: int, timeout: float = 20.0) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while not rawmod._held_by_others(fd, offset):
            if time.monotonic() > deadline:
                pytest.fail(f"nobody locked byte {offset} of {path}")
            time.sleep(0.05)
    finally:
        os.close(fd)


@qemu_io
def test_qemu_holding_the_image_keeps_pyhv_out(tmp_path: Path) -> None:
    p = image(tmp_path)
    proc = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 60000", p],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_locked(p, 101)
        for ro in (False, True):
            with pytest.raises(ImageLockedError) as ei:
                RawBackend(p, readonly=ro)
            assert p in str(ei.value) and "\n" not in str(ei.value)
    finally:
        proc.kill()
        proc.wait()
    RawBackend(p).close()


@qemu_io
def test_pyhv_holding_the_image_keeps_qemu_out(tmp_path: Path) -> None:
    p = image(tmp_path)
    with RawBackend(p):
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
        r = subprocess.run(["qemu-img", "convert", "-n", "-O", "raw",
                            image(tmp_path, name="src.img"), p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "lock" in r.stderr
    with RawBackend(p, readonly=True):
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "lock" in r.stderr
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr          # readers share
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", p],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(p).read_bytes()[:512] == b"\x5a" * 512


# ---- host block devices ---------------------------------------------------------------
@pytest.fixture
def loop_device(tmp_path: Path):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("needs root and losetup for a loop device")
    backing = image(tmp_path, size=2 * MiB, fill=b"\x33", name="loop.img")
    made: list[str] = []

    def attach(readonly: bool = False) -> str:
        r = subprocess.run(["losetup", "-f", "--show"] + (["-r"] if readonly else [])
                           + [backing], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"losetup: {r.stderr.strip()}")
        made.append(r.stdout.strip())
        return made[-1]

    yield attach, backing
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_block_device(loop_device) -> None:
    attach, backing = loop_device
    dev = attach()
    with pytest.raises(BlockError, match="regular file"):
        RawBackend(dev, kind="file")
    e = make(dev, cache="none")
    try:
        assert e.dev.backend.is_block and e.dev.limits.capacity == 2 * MiB // SECTOR
        assert e.write(8, pattern(2 * SECTOR)) == (S_OK, 1)
        assert e.simple(T_WRITE_ZEROES, seg(100, 8)) == (S_OK, 1)
        assert e.simple(T_FLUSH) == (S_OK, 1)
        assert e.read(8, 2)[2] == pattern(2 * SECTOR)
        assert e.read(4096, 1)[:2] == (S_IOERR, 1)
        with pytest.raises(BlockError, match="cannot grow a block device"):
            e.dev.resize(4 * MiB)
        e.dev.resize(MiB)                   # a block device may show less of itself
        assert e.dev.limits.capacity == MiB // SECTOR
        assert e.read(MiB // SECTOR, 1)[:2] == (S_IOERR, 1)
    finally:
        e.dev.close()
        e.fn.close()
    data = Path(backing).read_bytes()
    assert data[8 * SECTOR:10 * SECTOR] == pattern(2 * SECTOR)
    assert data[100 * SECTOR:108 * SECTOR] == bytes(8 * SECTOR)
    ro = attach(readonly=True)
    with pytest.raises(BlockError, match="read-only"):
        RawBackend(ro)
    RawBackend(ro, readonly=True).close()


# ---- crash consistency ------------------------------------------------------------------
CHILD = r"""
import struct, sys, time
sys.path.insert(0, sys.argv[3])
from virtio_driver import Driver, memory
from pyhv.engine.block.raw import RawBackend
from pyhv.engine.virtio.blk import F_FLUSH, VirtioBlk

class Irq:
    def queue(self, index): pass
    def config(self): pass

mem = memory()
dev = VirtioBlk(RawBackend(sys.argv[1], cache=sys.argv[2]))
ring = Driver(mem, size=16)
dev.activate(mem, [ring.queue(256)], Irq(), F_FLUSH | (1 << 32))
payload = bytes((i * 13 + 5) & 0xFF for i in range(64 * 1024))
_, w = ring.add([struct.pack("<IIQ", 1, 0, 40), payload], [1])
_, f = ring.add([struct.pack("<IIQ", 4, 0, 0)], [1])
dev.queue_notify(0)
assert [mem.read_u8(w[0][0]), mem.read_u8(f[0][0])] == [0, 0]
print("flushed", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_data_survives_kill_9_after_flush(tmp_path: Path, cache: str) -> None:
    p = image(tmp_path, size=MiB)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, p, cache, str(TESTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "flushed", proc.stderr.read() if proc.stderr else ""
        _wait_locked(p, 101)
    finally:
        proc.kill()                          # SIGKILL: no close, no atexit, no flush
        proc.wait()
    payload = bytes((i * 13 + 5) & 0xFF for i in range(64 * 1024))
    assert Path(p).read_bytes()[40 * SECTOR:40 * SECTOR + len(payload)] == payload
    RawBackend(p).close()                    # the dead process's locks went with it
