"""virtio-balloon driven through the virtio-pci transport as Linux's virtio_balloon
driver drives it (bytearray guest memory, real rings), and page release on real
anonymous and memfd mappings (the pages go back to the host and read as zeroes)."""

from __future__ import annotations

import os
import struct
from typing import Optional

import pytest
from test_virtio_pci import MsiLog, PciDriver
from virtio_driver import Driver, memory

from pyhv.config import BalloonConfig
from pyhv.engine.devices import RecordingLine
from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio.balloon import (
    F_DEFLATE_ON_OOM,
    F_PAGE_REPORTING,
    F_STATS_VQ,
    INFLATE,
    REPORTING,
    STAT_UNSET,
    STATS,
    VirtioBalloon,
    discard,
)
from pyhv.engine.virtio.device import F_RING_EVENT_IDX, F_VERSION_1
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VirtioPciFunction,
)
from pyhv.engine.virtio.queue import DESC_F_NEXT, DESC_F_WRITE

MiB = 1 << 20
PAGE = 4096
RAM = 4 * MiB
NOW = 1_700_000_000.0


def make(mem: GuestMemory | None = None, **kw) -> tuple[VirtioPciFunction, PciDriver,
                                                         GuestMemory]:
    mem = mem if mem is not None else memory(RAM)
    kw.setdefault("wall_clock", lambda: NOW)
    dev = VirtioBalloon(mem.size, **kw)
    fn = VirtioPciFunction(dev, mem, "balloon0")
    fn.intx = RecordingLine()
    return fn, PciDriver(fn), mem


def dev_of(fn: VirtioPciFunction) -> VirtioBalloon:
    assert isinstance(fn.device, VirtioBalloon)
    return fn.device


def bring_up(fn: VirtioPciFunction, drv: PciDriver, mem: GuestMemory, want: int = 0,
             queues: int = 2, event_idx: bool = False,
             config_vector: Optional[int] = None) -> list[Driver]:
    drv.negotiate(F_VERSION_1 | want | (F_RING_EVENT_IDX if event_idx else 0))
    if config_vector is not None:
        drv.w(0x10, 2, config_vector)
    rings = []
    for i in range(queues):
        ring = Driver(mem, size=16, base=0x10000 + 0x2000 * i, heap=0x100000 + 0x40000 * i,
                      event_idx=event_idx)
        drv.setup_queue(i, ring)
        rings.append(ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    assert drv.status() & STATUS_DRIVER_OK and not drv.status() & STATUS_NEEDS_RESET
    return rings


def cfg_read(fn: VirtioPciFunction, drv: PciDriver, off: int, size: int = 4) -> int:
    return fn.bar_read(MODERN_BAR, drv.caps[4][1] + off, size)


def cfg_write(fn: VirtioPciFunction, drv: PciDriver, off: int, size: int, value: int) -> None:
    fn.bar_write(MODERN_BAR, drv.caps[4][1] + off, size, value)


def pfns(*numbers: int) -> bytes:
    return struct.pack(f"<{len(numbers)}I", *numbers)


def add_raw(ring: Driver, bufs: list[tuple[int, int, int]]) -> int:
    """A chain of (addr, len, flags) buffers the test places itself."""
    ids = [ring.free.pop(0) for _ in bufs]
    for i, (addr, n, flags) in enumerate(bufs):
        last = i == len(bufs) - 1
        ring.write_desc(ring.desc, ids[i], addr, n, flags | (0 if last else DESC_F_NEXT),
                        0 if last else ids[i + 1])
    ring.publish(ids[0])
    return ids[0]


def stats_buffer(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in pairs)


# ---- identity, features, configuration ---------------------------------------------------
def test_identity_features_and_queue_count() -> None:
    fn, drv, _ = make()
    assert fn.config.get(0, 4) == 0x10451AF4              # 1af4:1045, modern balloon
    assert fn.config.get(9, 3) == 0x00FF00                # class: as QEMU gives it
    offered = drv.negotiate(F_VERSION_1)
    assert offered & 0xFF == 0 and drv.r(0x12, 2) == 2    # inflateq, deflateq

    fn, drv, _ = make(stats_period=10, autodeflate=True, free_page_reporting=True)
    offered = drv.negotiate(F_VERSION_1)
    assert offered & 0xFF == F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING
    assert drv.r(0x12, 2) == 4                            # + statsq, reporting_vq

    dev = VirtioBalloon.from_config(BalloonConfig(stats_period=0, autodeflate=True), RAM)
    assert dev.features == F_DEFLATE_ON_OOM and len(dev.queue_sizes) == 2
    dev = VirtioBalloon(RAM, stats_vq=True)               # QEMU's way: always offered
    assert dev.features == F_STATS_VQ and len(dev.queue_sizes) == 3


def test_target_actual_and_config_interrupt() -> None:
    fn, drv, mem = make()
    dev = dev_of(fn)
    dev.set_target(3 * MiB)                  # before the driver is up: no interrupt
    assert cfg_read(fn, drv, 0) == 256 and fn.intx.events == []
    bring_up(fn, drv, mem)
    dev.set_target(3 * MiB + 1)              # counted in whole 4 KiB pages
    assert cfg_read(fn, drv, 0) == 255
    assert fn.intx.events == ["high"] and fn.bar_read(MODERN_BAR, 0x1000, 1) == 2
    dev.set_target(3 * MiB + 1)              # unchanged: no interrupt
    assert fn.intx.events == ["high", "low"]
    dev.set_target(64 * MiB)                 # above RAM: the whole RAM
    assert cfg_read(fn, drv, 0) == 0
    with pytest.raises(ValueError):
        dev.set_target(0)
    # the guest writes actual (whole or in halves); num_pages is not the guest's
    assert dev.actual_bytes() == RAM
    cfg_write(fn, drv, 4, 4, 256)
    assert cfg_read(fn, drv, 4) == 256 and dev.actual_bytes() == 3 * MiB
    cfg_write(fn, drv, 6, 2, 0)
    cfg_write(fn, drv, 4, 2, 512)
    assert dev.actual == 512 and dev.actual_bytes() == 2 * MiB
    cfg_write(fn, drv, 0, 4, 1234)
    assert cfg_read(fn, drv, 0) == 0 and dev.actual == 512


def test_config_interrupt_with_msix() -> None:
    fn, drv, mem = make()
    msi = MsiLog()
    fn.attach_msi(msi)
    fn.config_write(fn.msix.cap + 2, 2, 0x8000)
    fn.bar_write(1, 16, 8, 0xFEE0_0000)        # vector 1: address, data, unmasked
    fn.bar_write(1, 24, 4, 0x42)
    fn.bar_write(1, 28, 4, 0)
    bring_up(fn, drv, mem, config_vector=1)
    dev_of(fn).set_target(RAM // 2)
    assert msi.fired == [1] and fn.intx.events == []


# ---- inflate, deflate, bad chains -------------------------------------------------------
def test_inflate_releases_pages_and_skips_pfns_outside_ram() -> None:
    fn, drv, mem = make()
    inflate, deflate = bring_up(fn, drv, mem, event_idx=True)
    mem.fill(0x200000, 4 * PAGE, 0xAA)
    # three pages (two consecutive), the first page past RAM, a PFN far away
    head, _ = inflate.add([pfns(0x200, 0x201, 0x203, RAM // PAGE, 0xFFFFFFFF)], [])
    drv.kick(0)
    assert inflate.take_used() == [(head, 0)]
    for pfn, byte in ((0x200, 0), (0x201, 0), (0x202, 0xAA), (0x203, 0)):
        assert mem.read(pfn * PAGE, PAGE) == bytes([byte]) * PAGE
    assert dev_of(fn).inflated_pages == 3
    assert fn.intx.events == ["high"]         # a queue interrupt for the used chain
    # deflate: the guest takes pages back; the device returns the chain and touches
    # nothing
    mem.fill(0x200000, PAGE, 0x55)
    head, _ = deflate.add([pfns(0x200, 0x201)], [])
    drv.kick(1)
    assert deflate.take_used() == [(head, 0)]
    assert mem.read(0x200000, PAGE) == b"\x55" * PAGE


def test_bad_chains_fail_alone() -> None:
    fn, drv, mem = make()
    inflate, _ = bring_up(fn, drv, mem)
    mem.fill(0x300000, PAGE, 0xAA)
    outside = add_raw(inflate, [(1 << 40, 8, 0)])              # buffer not in RAM
    loop = inflate.free.pop(0)                                 # a chain looping on itself
    inflate.write_desc(inflate.desc, loop, 0x100000, 4, DESC_F_NEXT, loop)
    inflate.publish(loop)
    odd = add_raw(inflate, [(inflate.alloc(pfns(0x300) + b"\x01\x02")[0], 6, 0)])
    partial = add_raw(inflate, [(RAM - 2, 8, 0)])               # runs off the end of RAM
    drv.kick(0)
    assert inflate.take_used() == [(outside, 0), (loop, 0), (odd, 0), (partial, 0)]
    assert mem.read(0x300000, PAGE) == bytes(PAGE)             # the odd tail was ignored
    assert not drv.status() & STATUS_NEEDS_RESET
    head, _ = inflate.add([pfns(0x301)], [])                   # the queue goes on
    drv.kick(0)
    assert inflate.take_used() == [(head, 0)]


# ---- statistics ---------------------------------------------------------------------------
def test_stats_buffer_is_held_until_the_period_then_returned() -> None:
    now = [NOW]
    fn, drv, mem = make(stats_period=10, wall_clock=lambda: now[0])
    dev = dev_of(fn)
    timers: list[tuple[float, object]] = []
    dev.schedule = lambda delay, cb: timers.append((delay, cb))
    _, _, statsq = bring_up(fn, drv, mem, F_STATS_VQ, queues=3)
    assert dev.role(2) == STATS
    assert dev.stats()["last-update"] == 0 and dev.stats()["stat-free-memory"] == STAT_UNSET
    # Linux sends every tag it knows, always in a buffer of the same size
    head, _ = statsq.add([stats_buffer((4, 1000), (5, 4000), (6, 1500), (42, 7),
                                       (0, 0), (1, 0), (2, 0), (3, 0))], [])
    drv.kick(2)
    assert statsq.take_used() == []                            # held
    st = dev.stats()
    assert st["stat-free-memory"] == 1000 and st["stat-total-memory"] == 4000
    assert st["stat-available-memory"] == 1500 and st["stat-swap-in"] == 0
    assert st["stat-disk-caches"] == STAT_UNSET
    assert st["last-update"] == int(NOW) and len(st) == 11
    assert dev.guest_stats() == {"stats": {k: v for k, v in st.items()
                                           if k != "last-update"},
                                 "last-update": int(NOW)}
    ((delay, due),) = timers
    assert delay == 10
    due()                                                       # the period is over
    assert statsq.take_used() == [(head, 0)]
    # the guest refills the same buffer and sends it again
    now[0] += 10
    mem.write(mem.read_u64(statsq.desc + 16 * head),
              stats_buffer((4, 900), (0, 3), (1, 4), (2, 5), (3, 6), (7, 7), (8, 8), (9, 9)))
    statsq.publish(head)
    drv.kick(2)
    st = dev.stats()
    assert st["stat-free-memory"] == 900 and st["stat-swap-out"] == 4
    assert st["stat-htlb-pgfail"] == 9 and st["last-update"] == int(NOW) + 10
    assert len(timers) == 2
    due()                                                       # a stale timer: nothing
    assert statsq.take_used() == []
    dev.set_stats_period(0)                                     # polling off
    timers[-1][1]()                                             # came to nothing
    assert statsq.take_used() == [] and len(timers) == 2
    dev.set_stats_period(5)                                     # on again: asks at once
    assert timers[-1][0] == 0
    timers[-1][1]()
    assert statsq.take_used() == [(head, 0)]
    with pytest.raises(ValueError):
        dev.set_stats_period(-1)


def test_second_stats_buffer_returns_the_first_and_reset_drops_the_held_one() -> None:
    fn, drv, mem = make(stats_period=10)
    dev = dev_of(fn)
    timers: list[tuple[float, object]] = []
    dev.schedule = lambda delay, cb: timers.append((delay, cb))
    _, _, statsq = bring_up(fn, drv, mem, F_STATS_VQ, queues=3)
    first, _ = statsq.add([stats_buffer((4, 1))], [])
    second = add_raw(statsq, [(1 << 40, 10, 0)])   # not RAM: no statistics, still held
    drv.kick(2)
    assert statsq.take_used() == [(first, 0)]
    assert dev.stats()["stat-free-memory"] == 1
    cfg_write(fn, drv, 4, 4, 100)
    dev.set_target(RAM // 2)
    drv.w(0x14, 1, 0)                               # the driver resets the device
    assert dev.actual == 0 and dev.num_pages == RAM // 2 // PAGE
    timers[-1][1]()                                 # the held buffer is gone with it
    assert statsq.take_used() == [] and second is not None


# ---- queue indexes and free page reporting ---------------------------------------------
@pytest.mark.parametrize("want, index", [(F_PAGE_REPORTING, 2),
                                         (F_PAGE_REPORTING | F_STATS_VQ, 3)])
def test_reporting_queue_index_follows_negotiated_features(want: int, index: int) -> None:
    """A queue whose feature was not negotiated takes no index (virtio 5.5.2; Linux's
    virtio_find_vqs skips it): reporting_vq is queue 2 without STATS_VQ, 3 with it."""
    fn, drv, mem = make(stats_period=10, free_page_reporting=True)
    dev = dev_of(fn)
    rings = bring_up(fn, drv, mem, want, queues=index + 1)
    assert dev.role(0) == INFLATE and dev.role(index) == REPORTING
    assert dev.role(index + 1) is None
    report = rings[index]
    mem.fill(0x200000, 4 * PAGE, 0xAA)
    mem.fill(RAM - 4 * PAGE, 4 * PAGE, 0xAA)
    # Linux reports free ranges as device-writable buffers; the second one runs past RAM
    head = add_raw(report, [(0x200000, 2 * PAGE, DESC_F_WRITE),
                            (RAM - 2 * PAGE, 8 * PAGE, DESC_F_WRITE)])
    drv.kick(index)
    assert report.take_used() == [(head, 0)]
    assert mem.read(0x200000, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(0x202000, 2 * PAGE) == b"\xaa" * 2 * PAGE
    assert mem.read(RAM - 2 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(RAM - 4 * PAGE, 2 * PAGE) == b"\xaa" * 2 * PAGE
    assert dev.reported_bytes == 4 * PAGE


# ---- releasing memory to the host -----------------------------------------------------------
def test_discard_clips_to_ram_across_regions() -> None:
    mem = GuestMemory.from_bytearrays([(0, 2 * PAGE), (4 * PAGE, 2 * PAGE)])
    mem.fill(0, 2 * PAGE, 1)
    mem.fill(4 * PAGE, 2 * PAGE, 1)
    assert discard(mem, PAGE, 4 * PAGE) == 2 * PAGE      # the gap is skipped
    assert mem.read(0, PAGE) == b"\x01" * PAGE and mem.read(PAGE, PAGE) == bytes(PAGE)
    assert mem.read(4 * PAGE, PAGE) == bytes(PAGE)
    assert mem.read(5 * PAGE, PAGE) == b"\x01" * PAGE
    assert discard(mem, 8 * PAGE, PAGE) == 0 and discard(mem, -PAGE, PAGE) == 0


def test_discard_punches_holes_in_shared_memory() -> None:
    mem = GuestMemory.shared_fd([(0, 4 * MiB)])
    try:
        fd = mem.regions[0].fd
        for off in range(0, 4 * MiB, MiB):
            mem.write(off, b"\x5a" * MiB)
        before = os.fstat(fd).st_blocks
        assert discard(mem, MiB, 2 * MiB) == 2 * MiB
        # the memfd's pages are gone (before reading: a read faults them in again)
        assert os.fstat(fd).st_blocks <= before - 2 * MiB // 512
        assert mem.read(MiB, 2 * MiB) == bytes(2 * MiB)
        assert mem.read(0, 16) == b"\x5a" * 16 and mem.read(3 * MiB, 16) == b"\x5a" * 16
    finally:
        mem.close()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_inflate_on_anonymous_memory_gives_pages_back_to_the_host() -> None:
    mem = GuestMemory.anonymous([(0, 80 * MiB)])
    try:
        fn, drv, _ = make(mem)
        inflate, _ = bring_up(fn, drv, mem)
        lo, hi = 8 * MiB, 72 * MiB
        chunk = b"\x5a" * MiB
        for off in range(lo, hi + MiB, MiB):             # touch 64 MiB and a marker MiB
            mem.write(off, chunk)
        before = _rss()
        first, count, per_chain = lo // PAGE, (hi - lo) // PAGE, 4096
        heads = [inflate.add([pfns(*range(p, p + per_chain))], [])[0]
                 for p in range(first, first + count, per_chain)]
        drv.kick(0)
        assert inflate.take_used() == [(h, 0) for h in heads]
        after = _rss()
        assert before - after >= 48 * MiB, (before, after)
        assert dev_of(fn).inflated_pages == count
        assert mem.read(lo, PAGE) == bytes(PAGE) and mem.read(hi - PAGE, PAGE) == bytes(PAGE)
        assert mem.read(40 * MiB, 16) == bytes(16)
        assert mem.read(hi, PAGE) == b"\x5a" * PAGE       # the page after: untouched
        fn.close()
    finally:
        mem.close()
