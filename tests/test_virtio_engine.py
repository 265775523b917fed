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


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_virtio_rng_served_by_the_loop(guests, tmp_path, machine):
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="pyhv.wait=powerbutton"),
                   memory=64 * MiB, machine=machine, rngs=(RngConfig(),),
                   serial=SerialConfig("file", str(tmp_path / "out.txt")))
    m = Machine(cfg)
    loop = EventLoop()
    try:
        m.start()
        m.attach(loop)
        plat = m.platform
        (fn,) = [f for _b, _d, f, _p in plat.pci.root.walk() if isinstance(f, VirtioPciFunction)]
        assert fn.name == "rng0" and plat.devices.get("rng0") is not None
        bar4 = fn.mapped[MODERN_BAR]
        assert bar4 is not None and bar4 >= plat.pci.mmio64[0]

        def w(off: int, size: int, value: int) -> None:
            plat.mmio.write(bar4 + off, size, value)

        def r(off: int, size: int) -> int:
            return plat.mmio.read(bar4 + off, size)

        w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        w(0x08, 4, 1)
        w(0x0C, 4, F_VERSION_1 >> 32)
        w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert r(0x14, 1) & STATUS_FEATURES_OK
        # rings in guest RAM the tiny guest does not use (32 MiB up)
        ring = Driver(m.memory, size=8, base=32 * MiB, heap=33 * MiB)
        w(0x16, 2, 0)
        w(0x18, 2, 8)
        w(0x20, 8, ring.desc)
        w(0x28, 8, ring.avail)
        w(0x30, 8, ring.used)
        w(0x1C, 2, 1)
        w(0x14, 1, r(0x14, 1) | STATUS_DRIVER_OK)
        head, outs = ring.add([], [32])
        w(0x3000, 2, 0)                         # the notify register of queue 0
        deadline = time.monotonic() + 10
        used: list = []
        while not used and time.monotonic() < deadline:
            loop.run(timeout=0.05)              # the loop serves the queue's eventfd
            used = ring.take_used()
        assert used == [(head, 32)]
        assert m.memory.read(outs[0][0], 32) != bytes(32)
        assert r(0x1000, 1) == 1                # INTx path: ISR says "queue"
    finally:
        m.close()
        loop.close()


def test_virtio_blk_in_a_machine(guests, tmp_path):
    """A raw disk in a real machine: the image is opened (and locked) when the machine
    is built, and a request through the MMIO bus and guest RAM reaches the file."""
    from pyhv.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="pyhv.wait=powerbutton"),
                   memory=64 * MiB, disks=(DiskConfig(str(image), "vda", serial="SN42"),),
                   serial=SerialConfig("file", str(tmp_path / "out.txt")))
    m = Machine(cfg)
    loop = EventLoop()
    try:
        m.start()
        m.attach(loop)
        plat = m.platform
        (fn,) = [f for _b, _d, f, _p in plat.pci.root.walk() if isinstance(f, VirtioPciFunction)]
        assert fn.config.get(2, 2) == 0x1042 and fn.name == "virtio-disk0"
        bar4 = fn.mapped[MODERN_BAR]

        def w(off: int, size: int, value: int) -> None:
            plat.mmio.write(bar4 + off, size, value)

        assert plat.mmio.read(bar4 + 0x2000, 8) == 2048          # capacity in sectors
        w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        w(0x08, 4, 1)
        w(0x0C, 4, F_VERSION_1 >> 32)
        w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        ring = Driver(m.memory, size=8, base=32 * MiB, heap=33 * MiB)
        w(0x16, 2, 0)
        w(0x18, 2, 8)
        w(0x20, 8, ring.desc)
        w(0x28, 8, ring.avail)
        w(0x30, 8, ring.used)
        w(0x1C, 2, 1)
        w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        header = (1).to_bytes(4, "little") + bytes(4) + (3).to_bytes(8, "little")  # OUT @3
        head, outs = ring.add([header, b"pyhv" * 128], [1])
        w(0x3000, 2, 0)
        deadline = time.monotonic() + 10
        used: list = []
        while not used and time.monotonic() < deadline:
            loop.run(timeout=0.05)
            used = ring.take_used()
        assert used == [(head, 1)] and m.memory.read(outs[0][0], 1) == b"\0"  # VIRTIO_BLK_S_OK
        with open(image, "rb") as f:
            f.seek(3 * 512)
            assert f.read(512) == b"pyhv" * 128
    finally:
        m.close()
        loop.close()
