"""virtio devices in a real machine (tier kvm): the PCI function where placement put
it, BARs mapped, MSI-X routed through KVM, and queue notifications served by the
machine's event loop off the vCPU threads.  The test plays the guest's driver
through the machine's MMIO bus and RAM while the guest itself waits idle."""

from __future__ import annotations

import time

import pytest
from virtio_driver import Driver

from pyhv.config import KernelBoot, RngConfig, SerialConfig, VmConfig
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.machine import Machine
from pyhv.engine.virtio.device import F_VERSION_1
from pyhv.engine.virtio.pci import (
    MODERN_BAR,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioPciFunction,
)

pytestmark = pytest.mark.kvm
MiB = 1 << 20


class HostDriver:
    """The guest driver's part, played from the host through the machine's MMIO bus
    (the device cannot tell) with rings in guest RAM the tiny guest never uses."""

    def __init__(self, m: Machine, fn: VirtioPciFunction) -> None:
        self.m = m
        self.bar4 = fn.mapped[MODERN_BAR]
        assert self.bar4 is not None

    def w(self, off: int, size: int, value: int) -> None:
        self.m.platform.mmio.write(self.bar4 + off, size, value)

    def r(self, off: int, size: int) -> int:
        return self.m.platform.mmio.read(self.bar4 + off, size)

    def bring_up(self) -> Driver:
        """Negotiate VERSION_1, set up queue 0 (8 entries at 32 MiB), DRIVER_OK."""
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.w(0x08, 4, 1)
        self.w(0x0C, 4, F_VERSION_1 >> 32)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.r(0x14, 1) & STATUS_FEATURES_OK
        ring = Driver(self.m.memory, size=8, base=32 * MiB, heap=33 * MiB)
        for off, size, value in ((0x16, 2, 0), (0x18, 2, 8), (0x20, 8, ring.desc),
                                 (0x28, 8, ring.avail), (0x30, 8, ring.used), (0x1C, 2, 1)):
            self.w(off, size, value)
        self.w(0x14, 1, self.r(0x14, 1) | STATUS_DRIVER_OK)
        return ring

    def kick_and_wait(self, loop: EventLoop, ring: Driver) -> list[tuple[int, int]]:
        """Notify queue 0; the machine's loop serves its eventfd off the vCPUs."""
        self.w(0x3000, 2, 0)
        deadline = time.monotonic() + 10
        used: list[tuple[int, int]] = []
        while not used and time.monotonic() < deadline:
            loop.run(timeout=0.05)
            used = ring.take_used()
        return used


def _machine(guests, tmp_path, **kw) -> Machine:
    return Machine(VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="pyhv.wait=powerbutton"),
                            memory=64 * MiB,
                            serial=SerialConfig("file", str(tmp_path / "out.txt")), **kw))


def _virtio_function(m: Machine) -> VirtioPciFunction:
    (fn,) = [f for _b, _d, f, _p in m.platform.pci.root.walk()
             if isinstance(f, VirtioPciFunction)]
    return fn


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_virtio_rng_served_by_the_loop(guests, tmp_path, machine):
    m = _machine(guests, tmp_path, machine=machine, rngs=(RngConfig(),))
    loop = EventLoop()
    try:
        m.start()
        m.attach(loop)
        fn = _virtio_function(m)
        assert fn.name == "rng0" and m.platform.devices.get("rng0") is not None
        assert fn.mapped[MODERN_BAR] >= m.platform.pci.mmio64[0]
        drv = HostDriver(m, fn)
        ring = drv.bring_up()
        head, outs = ring.add([], [32])
        assert drv.kick_and_wait(loop, ring) == [(head, 32)]
        assert m.memory.read(outs[0][0], 32) != bytes(32)
        assert drv.r(0x1000, 1) == 1                # INTx path: ISR says "queue"
    finally:
        m.close()
        loop.close()


def test_virtio_blk_in_a_machine(guests, tmp_path):
    """A raw disk in a real machine: the image is opened (and locked) when the machine
    is built, and a request through the MMIO bus and guest RAM reaches the file."""
    from pyhv.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    m = _machine(guests, tmp_path, disks=(DiskConfig(str(image), "vda", serial="SN42"),))
    loop = EventLoop()
    try:
        m.start()
        m.attach(loop)
        fn = _virtio_function(m)
        assert fn.config.get(2, 2) == 0x1042 and fn.name == "virtio-disk0"
        drv = HostDriver(m, fn)
        assert drv.r(0x2000, 8) == 2048                          # capacity in sectors
        ring = drv.bring_up()
        header = (1).to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little")  # OUT @3
        head, outs = ring.add([header, b"pyhv" * 128], [1])
        assert drv.kick_and_wait(loop, ring) == [(head, 1)]
        assert m.memory.read(outs[0][0], 1) == b"\0"             # VIRTIO_BLK_S_OK
        with open(image, "rb") as f:
            f.seek(3 * 512)
            assert f.read(512) == b"pyhv" * 128

        # block_resize: the file grows, the capacity and the configuration generation
        # move, the driver gets a configuration interrupt, and the new sectors serve
        drv.r(0x1000, 1)                                         # read ISR: clears it
        generation = drv.r(0x15, 1)
        m.disks()["virtio-disk0"].resize(2 << 20)
        assert image.stat().st_size == 2 << 20
        assert drv.r(0x2000, 8) == 4096
        assert drv.r(0x15, 1) == (generation + 1) & 0xFF
        assert drv.r(0x1000, 1) == 2                             # ISR: "configuration"
        header = (1).to_bytes(4, "little") + bytes(4) + (4000).to_bytes(8, "little")
        head, outs = ring.add([header, b"grow" * 128], [1])
        assert drv.kick_and_wait(loop, ring) == [(head, 1)]
        assert m.memory.read(outs[0][0], 1) == b"\0"
        with open(image, "rb") as f:
            f.seek(4000 * 512)
            assert f.read(512) == b"grow" * 128
    finally:
        m.close()
        loop.close()


def test_an_error_policy_stop_pauses_the_machine_and_resume_retries(guests, tmp_path,
                                                                     monkeypatch):
    """error_policy='stop': a write the host fails is held, the machine tells its
    subscribers (BLOCK_IO_ERROR) and pauses; once the host is fixed, resume runs the
    request again and the driver gets its answer."""
    import errno
    import os

    from pyhv.config import DiskConfig
    from pyhv.engine.machine import MachineState

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    m = _machine(guests, tmp_path, disks=(DiskConfig(str(image), "vda",
                                                     error_policy="stop"),))
    loop = EventLoop()
    events = []
    real = os.pwritev
    armed = [1]

    def pwritev(fd, views, pos):
        if armed:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, views, pos)

    try:
        m.start()
        m.attach(loop)
        m.subscribe(events.append)
        drv = HostDriver(m, _virtio_function(m))
        ring = drv.bring_up()
        monkeypatch.setattr(os, "pwritev", pwritev)
        header = (1).to_bytes(4, "little") + bytes(4) + (5).to_bytes(8, "little")
        head, outs = ring.add([header, b"held" * 128], [1])
        drv.w(0x3000, 2, 0)
        deadline = time.monotonic() + 10
        while m.state is not MachineState.PAUSED and time.monotonic() < deadline:
            loop.run(timeout=0.05)
        assert m.state is MachineState.PAUSED
        kinds = [ev.kind for ev in events]
        assert kinds[-2:] == ["block-io-error", "paused"], kinds
        err = events[-2]
        assert err.detail == "virtio-disk0" and err.data.action == "stop"
        assert err.data.operation == "write" and err.data.reason == "Input/output error"
        assert ring.take_used() == []
        armed.clear()
        m.resume()
        assert ring.take_used() == [(head, 1)]
        assert m.memory.read(outs[0][0], 1) == b"\0"
        with open(image, "rb") as f:
            f.seek(5 * 512)
            assert f.read(512) == b"held" * 128
    finally:
        m.close()
        loop.close()
