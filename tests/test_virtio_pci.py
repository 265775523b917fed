"""The virtio-pci transport (modern) and virtio-rng, driven the way Linux's
virtio_pci_modern and virtio-rng drivers drive them, on bytearray memory."""

from __future__ import annotations

import os

import pytest
from virtio_driver import Driver, memory

from pyhv.engine.devices import RecordingLine
from pyhv.engine.pci.config import BAR0, CAP_ID_VENDOR, COMMAND
from pyhv.engine.virtio.device import F_RING_EVENT_IDX, F_VERSION_1
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    NO_VECTOR,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VirtioPciFunction,
)
from pyhv.engine.virtio.rng import VirtioRng


class MsiLog:
    def __init__(self) -> None:
        self.fired: list[int] = []
        self.routes: dict[int, object] = {}

    def route(self, vector, address, data) -> None:
        self.routes[vector] = address

    def fire(self, vector: int) -> None:
        self.fired.append(vector)


class PciDriver:
    """The guest's driver: capability walk, status dance, queues, notifications."""

    def __init__(self, fn: VirtioPciFunction) -> None:
        self.fn = fn
        self.caps = {}
        for off, cap_id in fn.config.capabilities():
            if cap_id == CAP_ID_VENDOR:
                cfg_type = fn.config_read(off + 3, 1)
                self.caps[cfg_type] = (fn.config_read(off + 4, 1), fn.config_read(off + 8, 4))
        self.common = self.caps[1][1]
        self.notify = self.caps[2][1]

    def r(self, off: int, size: int) -> int:
        return self.fn.bar_read(MODERN_BAR, self.common + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.fn.bar_write(MODERN_BAR, self.common + off, size, value)

    def status(self) -> int:
        return self.r(0x14, 1)

    def negotiate(self, want: int) -> int:
        self.w(0x14, 1, 0)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.w(0x00, 4, 0)
        lo = self.r(0x04, 4)
        self.w(0x00, 4, 1)
        offered = lo | self.r(0x04, 4) << 32
        accept = offered & want
        self.w(0x08, 4, 0)
        self.w(0x0C, 4, accept & 0xFFFFFFFF)
        self.w(0x08, 4, 1)
        self.w(0x0C, 4, accept >> 32)
        self.w(0x14, 1, self.status() | STATUS_FEATURES_OK)
        return offered

    def setup_queue(self, index: int, drv: Driver, vector: int = NO_VECTOR) -> None:
        self.w(0x16, 2, index)
        assert self.r(0x18, 2) >= drv.size
        self.w(0x18, 2, drv.size)
        self.w(0x20, 8, drv.desc)
        self.w(0x28, 4, drv.avail & 0xFFFFFFFF)
        self.w(0x2C, 4, drv.avail >> 32)
        self.w(0x30, 8, drv.used)
        self.w(0x1A, 2, vector)
        self.w(0x1C, 2, 1)

    def kick(self, index: int) -> None:
        """Notify as the driver does (at queue_notify_off × multiplier), then let the
        engine's loop serve the eventfd that fired."""
        self.w(0x16, 2, index)
        off = self.r(0x1E, 2)
        self.fn.bar_write(MODERN_BAR, self.notify + 4 * off, 2, index)
        self.fn.process(index)


def make(source: str = "/dev/urandom", **kw) -> tuple[VirtioPciFunction, PciDriver, object]:
    mem = memory()
    fn = VirtioPciFunction(VirtioRng(source, **kw), mem, "rng0")
    line = RecordingLine()
    fn.intx = line
    return fn, PciDriver(fn), mem


def test_identity_and_capabilities() -> None:
    fn, drv, _ = make()
    c = fn.config
    assert c.get(0, 4) == 0x10441AF4 and c.get(8, 1) == 1  # 1af4:1044, revision 1
    assert c.get(0x2C, 2) == 0x1AF4
    assert sorted(drv.caps) == [1, 2, 3, 4, 5]
    assert all(bar == MODERN_BAR for bar, _ in drv.caps.values())
    assert {cid for _, cid in c.capabilities()} == {0x11, 0x09}
    # BAR4 is 64-bit prefetchable, 16 KiB
    c.write(BAR0 + 16, 4, 0xFFFFFFFF)
    assert c.read(BAR0 + 16, 4) == 0xFFFFC00C


def test_feature_negotiation_refuses_what_was_not_offered() -> None:
    fn, drv, _ = make()
    offered = drv.negotiate(F_VERSION_1 | F_RING_EVENT_IDX)
    assert offered & F_VERSION_1 and not offered & (1 << 33)  # no ACCESS_PLATFORM
    assert drv.status() & STATUS_FEATURES_OK
    # a driver that asks for something never offered does not get FEATURES_OK
    drv.w(0x14, 1, 0)
    drv.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    drv.w(0x08, 4, 1)
    drv.w(0x0C, 4, 1 | 2)  # VERSION_1 and ACCESS_PLATFORM
    drv.w(0x14, 1, drv.status() | STATUS_FEATURES_OK)
    assert not drv.status() & STATUS_FEATURES_OK
    # nor one without VERSION_1 (legacy drivers are not served)
    drv.w(0x14, 1, 0)
    drv.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert not drv.status() & STATUS_FEATURES_OK


@pytest.mark.parametrize("msix", [False, True])
def test_rng_bytes_with_intx_and_with_msix(msix: bool) -> None:
    fn, drv, mem = make()
    msi = MsiLog()
    fn.attach_msi(msi)
    if msix:
        fn.config_write(fn.msix.cap + 2, 2, 0x8000)
        fn.bar_write(1, 0, 8, 0xFEE0_0000)          # vector 0: address, data, unmasked
        fn.bar_write(1, 8, 4, 0x41)
        fn.bar_write(1, 12, 4, 0)
    drv.negotiate(F_VERSION_1 | F_RING_EVENT_IDX)
    ring = Driver(mem, size=8, event_idx=True)
    drv.setup_queue(0, ring, vector=0 if msix else NO_VECTOR)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    assert drv.status() & STATUS_DRIVER_OK
    head, outs = ring.add([], [64])
    drv.kick(0)
    ((h, n),) = ring.take_used()
    assert h == head and n == 64
    got = mem.read(outs[0][0], 64)
    assert got != bytes(64) and len(set(got)) > 8
    if msix:
        assert msi.fired == [0] and fn.intx.events == []
    else:
        assert fn.intx.events == ["high"]
        assert fn.bar_read(MODERN_BAR, 0x1000, 1) == 1   # ISR: queue interrupt, cleared
        assert fn.intx.events == ["high", "low"] and fn.bar_read(MODERN_BAR, 0x1000, 1) == 0


def test_notification_before_driver_ok_does_nothing_and_reset_starts_over() -> None:
    fn, drv, mem = make()
    drv.negotiate(F_VERSION_1)
    ring = Driver(mem, size=8)
    drv.setup_queue(0, ring)
    ring.add([], [16])
    drv.kick(0)                            # not DRIVER_OK yet: ignored
    assert ring.take_used() == []
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    drv.kick(0)
    assert [n for _, n in ring.take_used()] == [16]
    drv.w(0x14, 1, 0)                      # reset
    assert drv.status() == 0 and drv.r(0x1C, 2) == 0 and drv.r(0x20, 8) == 0


def test_driver_breaking_the_queue_sets_needs_reset() -> None:
    fn, drv, mem = make()
    drv.negotiate(F_VERSION_1)
    ring = Driver(mem, size=8)
    drv.setup_queue(0, ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    mem.write_u16(ring.avail + 2, 100)      # the available index runs away
    drv.kick(0)
    assert drv.status() & STATUS_NEEDS_RESET
    assert fn.isr & 2 and "ahead" in (fn.broken_reason or "")
    drv.kick(0)                              # a broken device serves nothing more
    # the driver resets it and it works again
    drv.negotiate(F_VERSION_1)
    ring = Driver(mem, size=8, base=0x20000)
    drv.setup_queue(0, ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    ring.add([], [8])
    drv.kick(0)
    assert [n for _, n in ring.take_used()] == [8]
    assert not drv.status() & STATUS_NEEDS_RESET


def test_rings_outside_ram_or_driver_ok_without_features_ok() -> None:
    fn, drv, mem = make()
    drv.negotiate(F_VERSION_1)
    drv.w(0x16, 2, 0)
    drv.w(0x20, 8, 1 << 40)
    drv.w(0x1C, 2, 1)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    assert drv.status() & STATUS_NEEDS_RESET
    fn2, drv2, _ = make()
    drv2.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert drv2.status() & STATUS_NEEDS_RESET


def test_rate_limit_holds_requests_until_the_next_period() -> None:
    now = [100.0]
    fn, drv, mem = make(rate_bytes=16, period_ms=1000, clock=lambda: now[0])
    timers: list[float] = []
    fn.device.schedule = lambda delay, cb: timers.append(delay)
    drv.negotiate(F_VERSION_1)
    ring = Driver(mem, size=8)
    drv.setup_queue(0, ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    ring.add([], [64])
    ring.add([], [64])
    drv.kick(0)
    assert [n for _, n in ring.take_used()] == [16]   # the period's 16 bytes
    assert timers and 0 < timers[0] <= 1.0
    now[0] += 1.0
    fn.device.queue_notify(0)
    assert [n for _, n in ring.take_used()] == [16]


def test_config_access_window() -> None:
    """VIRTIO_PCI_CAP_PCI_CFG: the common configuration through config space."""
    fn, drv, _ = make()
    cap = fn.pci_cfg
    fn.config_write(cap + 4, 1, MODERN_BAR)
    fn.config_write(cap + 8, 4, 0x12)           # num_queues
    fn.config_write(cap + 12, 4, 2)
    assert fn.config_read(cap + 16, 4) == 1
    fn.config_write(cap + 8, 4, 0x14)           # device_status
    fn.config_write(cap + 12, 4, 1)
    fn.config_write(cap + 16, 1, STATUS_ACKNOWLEDGE)
    assert drv.status() == STATUS_ACKNOWLEDGE


def test_notify_eventfd_is_what_a_kick_signals() -> None:
    fn, drv, _ = make()
    fn.bar_write(MODERN_BAR, drv.notify, 2, 0)
    assert os.eventfd_read(fn.notify_fds[0]) == 1
    fn.close()


def test_bar4_moves_tell_the_ioeventfd_binding() -> None:
    from pyhv.engine.bus import Bus
    from pyhv.engine.pci.device import PciBuses

    fn, drv, _ = make()
    moves: list[tuple] = []
    fn.on_notify_moved = lambda old, new: moves.append((old, new))
    fn.attach(PciBuses(Bus("pio"), Bus("mmio")))
    fn.config.set_bar_address(4, 0x10_0000_0000)
    fn.config_write(COMMAND, 2, 0x2)
    assert moves == [(None, 0x10_0000_3000)]
    fn.config_write(BAR0 + 20, 4, 0x20)          # the upper half: 0x20_0000_0000
    assert moves[-1] == (0x10_0000_3000, 0x20_0000_3000)
    fn.config_write(COMMAND, 2, 0)
    assert moves[-1] == (0x20_0000_3000, None)


def test_intx_status_bit_and_interrupt_disable() -> None:
    """With INTx the PCI Status Interrupt Status bit is the OR of the ISR (virtio 1.x
    4.1.4.5.1), and the line obeys the command register's Interrupt Disable."""
    fn, drv, mem = make()
    drv.negotiate(F_VERSION_1)
    ring = Driver(mem, size=8)
    drv.setup_queue(0, ring)
    drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
    fn.config_write(COMMAND, 2, fn.config.command | 0x400)   # Interrupt Disable
    ring.add([], [8])
    drv.kick(0)
    assert fn.config.get(0x06, 2) & 0x08 and fn.intx.events == []
    fn.config_write(COMMAND, 2, fn.config.command & ~0x400)  # enabled: the line rises
    assert fn.intx.events == ["high"]
    assert fn.bar_read(MODERN_BAR, 0x1000, 1) == 1           # reading the ISR clears both
    assert not fn.config.get(0x06, 2) & 0x08 and fn.intx.events == ["high", "low"]


def test_a_device_that_fails_to_start_or_to_take_a_config_write_sets_needs_reset() -> None:
    """A device whose activation or configuration write fails (a vhost-user
    backend that cannot be reached) reports NEEDS_RESET through the transport; the
    error does not escape to the vCPU's bus access."""
    from pyhv.engine.virtio.device import VirtioDevice
    from pyhv.engine.virtio.pci import DEVICE_OFFSET
    from pyhv.engine.virtio.queue import VirtioError

    class Failing(VirtioDevice):
        device_type = 4
        queue_sizes = (8,)

        def activate(self, memory, queues, interrupts, features) -> None:  # type: ignore[no-untyped-def]
            raise VirtioError("the backend went away")

        def write_config(self, offset: int, data: bytes) -> None:
            raise VirtioError("the backend refused the write")

    for step in ("activate", "config"):
        fn = VirtioPciFunction(Failing(), memory(), "f0")
        fn.intx = RecordingLine()
        drv = PciDriver(fn)
        drv.negotiate(F_VERSION_1)
        if step == "activate":
            drv.w(0x14, 1, drv.status() | STATUS_DRIVER_OK)
        else:
            fn.bar_write(MODERN_BAR, DEVICE_OFFSET, 1, 1)
        assert drv.status() & STATUS_NEEDS_RESET, step
        assert fn.broken_reason is not None and "backend" in fn.broken_reason
