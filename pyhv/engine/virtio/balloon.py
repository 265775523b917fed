"""virtio-balloon (virtio 1.x, section 5.5): the host asks the guest for memory back.

The host sets a target (:meth:`VirtioBalloon.set_target`); the device turns it
into ``num_pages`` (4 KiB pages the guest should give up) and raises a
configuration interrupt.  The guest answers with page frame numbers on the
inflate queue (each page is released to the host: ``madvise`` on the mapping
behind guest RAM) and on the deflate queue (pages it takes back: nothing to do,
a released page faults in again as zeroes), and writes ``actual``.

Queues, in the spec's order: inflateq, deflateq, statsq (only with
VIRTIO_BALLOON_F_STATS_VQ), free_page_vq (FREE_PAGE_HINT: never offered here),
reporting_vq (only with PAGE_REPORTING).  A queue that does not exist takes no
index: the ones after it move down (what Linux's ``virtio_find_vqs`` and QEMU
do), so which role an index has is fixed when the driver's features are
known, at activation.

Statistics: the guest keeps one buffer of ``(le16 tag, le64 value)`` pairs on
the stats queue; the device records it and holds the buffer until the next
period, then returns it to ask for fresh numbers (a timer the owner arms
through ``schedule``, as for virtio-rng).

Free page reporting: each buffer on the reporting queue names a range of free
guest memory, released like an inflated page.

Everything the guest sends is checked: a PFN or a range outside guest RAM is
skipped, a chain that cannot be walked is returned empty and the queue goes on.
The host-side calls (``set_target``, ``set_stats_period``) may come from
another thread (QMP): they only store values, raise the configuration interrupt
and arm a timer; queue work stays on the engine's loop.
"""

from __future__ import annotations

import logging
import mmap
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from pyhv.engine.memory import GuestMemory, GuestRegion
from pyhv.engine.virtio.device import TYPE_BALLOON, Interrupts, VirtioDevice
from pyhv.engine.virtio.queue import ChainError, DescriptorChain, SplitQueue, VirtioError

if TYPE_CHECKING:
    from pyhv.config import BalloonConfig

log = logging.getLogger(__name__)

# feature bits (virtio 1.x 5.5.3)
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_FREE_PAGE_HINT = 1 << 3
F_PAGE_POISON = 1 << 4
F_PAGE_REPORTING = 1 << 5

#: the balloon's page: PFNs and num_pages/actual count 4 KiB pages whatever the
#: guest's or the host's page size
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

QUEUE_SIZE = 128

INFLATE, DEFLATE, STATS, FREE_PAGE, REPORTING = ("inflate", "deflate", "stats",
                                                 "free-page", "reporting")

#: statistics tags (5.5.6.3) and the names QEMU's ``guest-stats`` gives them
STAT_NAMES = {
    0: "stat-swap-in",
    1: "stat-swap-out",
    2: "stat-major-faults",
    3: "stat-minor-faults",
    4: "stat-free-memory",
    5: "stat-total-memory",
    6: "stat-available-memory",
    7: "stat-disk-caches",
    8: "stat-htlb-pgalloc",
    9: "stat-htlb-pgfail",
}
#: a statistic the guest never reported (QEMU's ``(uint64_t)-1``)
STAT_UNSET = (1 << 64) - 1

_STAT = struct.Struct("<HQ")
#: the most statistics read from one buffer (the spec defines 16 tags)
MAX_STATS = 64
#: the most PFN bytes read from one inflate/deflate chain (Linux sends 256 PFNs;
#: this bounds what one chain can cost the loop: 256 Ki PFNs, 1 GiB of guest RAM)
MAX_PFN_BYTES = 1 << 20
_PFN_CHUNK = 64 * 1024

_CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val


# ---- releasing guest memory to the host --------------------------------------------
def discard(memory: GuestMemory, addr: int, size: int) -> int:
    """Give the host back the RAM in ``[addr, addr+size)``: the part that is not RAM is
    skipped.  Released memory reads back as zeroes.  Returns the bytes of RAM the
    range covered.

    Anonymous private mappings get ``MADV_DONTNEED`` (the pages are freed and
    fault in again as zeroes); shared, fd-backed ones ``MADV_REMOVE`` (punches
    the hole in the memfd or tmpfs/hugetlbfs file, which ``DONTNEED`` would not
    free); only whole host pages inside the range are released.  ``bytearray``
    RAM (tests) is zero-filled.
    """
    if size <= 0 or addr < 0:
        return 0
    end = addr + size
    covered = 0
    for r in memory.regions:
        lo, hi = max(addr, r.guest_addr), min(end, r.end)
        if lo >= hi:
            continue
        _release(r, lo - r.guest_addr, hi - lo)
        covered += hi - lo
    return covered


def _release(region: GuestRegion, offset: int, size: int) -> None:
    buf = region.buffer
    if not isinstance(buf, mmap.mmap):
        buf[offset:offset + size] = bytes(size)  # same length: no resize under views
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    stop = (offset + size) // page * page
    if start >= stop:
        return  # less than a host page: kept (its contents no longer matter)
    advices = [mmap.MADV_REMOVE, mmap.MADV_DONTNEED] if region.fd >= 0 \
        else [mmap.MADV_DONTNEED]
    last: Optional[BaseException] = None
    for advice in advices:
        try:
            buf.madvise(advice, start, stop - start)
            return
        except (OSError, ValueError) as e:
            # EINVAL on hugetlb pages the range does not align with, EOPNOTSUPP for
            # MADV_REMOVE on a regular file, ValueError on a closed mapping: the pages
            # stay in place, which is only a missed saving
            last = e
    log.debug("balloon: cannot release %#x bytes at offset %#x: %s", stop - start, start,
              last)


class VirtioBalloon(VirtioDevice):
    device_type = TYPE_BALLOON
    kind = "virtio-balloon"

    def __init__(self, ram_size: int, stats_period: Optional[int] = None,
                 autodeflate: bool = False, free_page_reporting: bool = False,
                 stats_vq: Optional[bool] = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """``ram_size``: the guest's RAM in bytes (what targets are taken from).
        ``stats_vq``: offer the statistics queue (default: when a stats period is
        configured; QEMU always offers it, so that a period set at run time works)."""
        super().__init__()
        if ram_size <= 0:
            raise ValueError("balloon: guest RAM size must be positive")
        self.ram_size = ram_size
        self.stats_period = stats_period or 0
        self.wall_clock = wall_clock
        offer_stats = bool(stats_period) if stats_vq is None else stats_vq
        self.features = (F_STATS_VQ if offer_stats else 0) \
            | (F_DEFLATE_ON_OOM if autodeflate else 0) \
            | (F_PAGE_REPORTING if free_page_reporting else 0)
        # one queue per role that can exist with what is offered (the driver may
        # leave some unused)
        self.queue_sizes = (QUEUE_SIZE,) * (2 + bool(offer_stats) + bool(free_page_reporting))
        #: 4 KiB pages the host wants the guest to give up (the host's to write)
        self.num_pages = 0
        #: 4 KiB pages the guest says it gave up (the guest's to write)
        self.actual = 0
        self._roles: list[str] = []
        self._stats: dict[str, int] = {name: STAT_UNSET for name in STAT_NAMES.values()}
        self._last_update = 0
        #: the stats buffer the device holds until the next period
        self._stats_head: Optional[int] = None
        #: bumped whenever pending timers must come to nothing (period change, reset)
        self._timer_gen = 0
        #: arm a timer: call the given function after the given seconds (the engine's
        #: loop); None: no periodic statistics
        self.schedule: Optional[Callable[[float, Callable[[], None]], None]] = None
        #: told the guest's new size (bytes) whenever it changes ``actual`` (QMP's
        #: BALLOON_CHANGE); called on the vCPU thread that wrote it
        self.on_actual: Optional[Callable[[int], None]] = None
        #: pages released (inflate) and bytes released (reporting), for the curious
        self.inflated_pages = 0
        self.reported_bytes = 0

    @classmethod
    def from_config(cls, cfg: BalloonConfig, ram_size: int) -> "VirtioBalloon":
        return cls(ram_size, cfg.stats_period, cfg.autodeflate, cfg.free_page_reporting)

    # ---- the host's side ----------------------------------------------------------------
    def set_target(self, target: int) -> None:
        """Ask the guest to shrink to ``target`` bytes (above RAM: the whole RAM);
        the difference is counted in 4 KiB pages, as QEMU does."""
        if target <= 0:
            raise ValueError("balloon: the target must be a positive size")
        target = min(target, self.ram_size)
        pages = min((self.ram_size - target) >> PAGE_SHIFT, 0xFFFFFFFF)
        if pages == self.num_pages:
            return
        self.num_pages = pages
        interrupts = self.interrupts
        if interrupts is not None:
            interrupts.config()

    def actual_bytes(self) -> int:
        """The guest's RAM less what the guest says its balloon holds."""
        return max(self.ram_size - (self.actual << PAGE_SHIFT), 0)

    def stats(self) -> dict[str, int]:
        """The latest statistics under QEMU's names (a statistic the guest never
        reported is :data:`STAT_UNSET`), and ``last-update`` (seconds since the
        epoch; 0: none yet)."""
        out = dict(self._stats)
        out["last-update"] = self._last_update
        return out

    def guest_stats(self) -> dict[str, Any]:
        """The same, shaped as QEMU's ``guest-stats`` property (``qom-get``)."""
        return {"stats": dict(self._stats), "last-update": self._last_update}

    def set_stats_period(self, seconds: int) -> None:
        """Poll the guest's statistics every ``seconds`` (0: stop).  Turning polling
        on asks at once, as QEMU does; changing the period takes effect after it."""
        if seconds < 0:
            raise ValueError("balloon: the stats period must not be negative")
        if seconds == self.stats_period:
            return
        was = self.stats_period
        self.stats_period = seconds
        self._timer_gen += 1
        if seconds:
            self._arm(0 if not was else seconds)

    # ---- configuration space --------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.num_pages, self.actual, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``actual`` (bytes 4..7) is the driver's to write, whole or in part."""
        cur = bytearray(_CONFIG.pack(self.num_pages, self.actual, 0, 0))
        lo, hi = max(offset, 4), min(offset + len(data), 8)
        if lo >= hi:
            return
        cur[lo:hi] = data[lo - offset:hi - offset]
        before = self.actual
        self.actual = int.from_bytes(cur[4:8], "little")
        if self.actual != before and self.on_actual is not None:
            self.on_actual(self.actual_bytes())

    # ---- lifecycle ------------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: list[SplitQueue],
                 interrupts: Interrupts, features: int) -> None:
        super().activate(memory, queues, interrupts, features)
        self._roles = [INFLATE, DEFLATE] \
            + ([STATS] if features & F_STATS_VQ else []) \
            + ([FREE_PAGE] if features & F_FREE_PAGE_HINT else []) \
            + ([REPORTING] if features & F_PAGE_REPORTING else [])

    def reset(self) -> None:
        super().reset()
        self._roles = []
        self._stats_head = None
        self._timer_gen += 1
        # the guest has all its memory again; the host's target stands
        self.actual = 0

    def role(self, index: int) -> Optional[str]:
        """What queue ``index`` is with the features the driver accepted."""
        return self._roles[index] if index < len(self._roles) else None

    # ---- queues -----------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        role = self.role(index)
        if role is None or index >= len(self.queues):
            return
        q = self.queues[index]
        memory, interrupts = self.memory, self.interrupts
        assert memory is not None and interrupts is not None
        while (chain := q.pop_valid(memory)) is not None:
            if role == STATS:
                self._receive_stats(q, memory, chain)
                continue
            try:
                if role == INFLATE:
                    self._inflate(memory, chain)
                elif role == REPORTING:
                    self._report(memory, chain)
                # deflate: the guest reuses its pages; a released page faults in again
            except ChainError as e:
                log.debug("balloon: %s chain %d: %s", role, chain.head, e)
            q.add_used(memory, chain.head, 0)
        if q.needs_notification(memory):  # nothing used: no interrupt
            interrupts.queue(index)

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        r = chain.reader()
        n = min(r.available, MAX_PFN_BYTES) & ~3
        out: list[int] = []
        while n:
            take = min(n, _PFN_CHUNK)
            data = r.read(take)
            out.extend(struct.unpack(f"<{take // 4}I", data))
            n -= take
        return out

    def _inflate(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        """Release each page the guest names; runs of consecutive PFNs go in one call."""
        pfns = self._pfns(chain)
        i = 0
        while i < len(pfns):
            j = i + 1
            while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
                j += 1
            released = discard(memory, pfns[i] << PAGE_SHIFT, (j - i) << PAGE_SHIFT)
            self.inflated_pages += released >> PAGE_SHIFT
            i = j

    def _report(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        """Free page reporting: each buffer (Linux makes them device-writable) is a
        range of free guest memory."""
        for d in chain.descriptors:
            self.reported_bytes += discard(memory, d.addr, d.length)

    def _receive_stats(self, q: SplitQueue, memory: GuestMemory,
                       chain: DescriptorChain) -> None:
        """Record the guest's statistics and hold the buffer."""
        if self._stats_head is not None:
            # a second buffer while one is held: the driver broke the protocol; give
            # the old one back, keep the new one (QEMU does the same)
            q.add_used(memory, self._stats_head, 0)
        self._stats_head = chain.head
        try:
            r = chain.reader()
            count = min(r.available // _STAT.size, MAX_STATS)
            values = [_STAT.unpack(r.read(_STAT.size)) for _ in range(count)]
        except ChainError as e:
            log.debug("balloon: stats buffer %d: %s", chain.head, e)
            values = []
        for tag, value in values:
            name = STAT_NAMES.get(tag)
            if name is not None:  # newer tags than QEMU's names: ignored
                self._stats[name] = value
        self._last_update = int(self.wall_clock())
        self._timer_gen += 1  # only the latest buffer's timer counts
        if self.stats_period:
            self._arm(self.stats_period)

    def _arm(self, delay: float) -> None:
        if self.schedule is None:
            return
        gen = self._timer_gen
        self.schedule(delay, lambda: self._stats_due(gen))

    def _stats_due(self, gen: int) -> None:
        """The period is over: hand the held buffer back so the guest refills it."""
        if gen != self._timer_gen or self._stats_head is None:
            return
        memory, interrupts = self.memory, self.interrupts
        index = self._roles.index(STATS) if STATS in self._roles else None
        if memory is None or interrupts is None or index is None:
            return
        q = self.queues[index]
        head, self._stats_head = self._stats_head, None
        try:
            q.add_used(memory, head, 0)
            if q.needs_notification(memory):
                interrupts.queue(index)
        except VirtioError as e:
            # the rings moved out of RAM: the next notification of this queue finds
            # it too and the transport sets NEEDS_RESET
            log.debug("balloon: cannot return the stats buffer: %s", e)
