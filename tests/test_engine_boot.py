"""Tier kvm: the test guests boot under pyhv's engine on real /dev/kvm, and every
line of their report matches what pyhv was told to build."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from engine_helpers import MiB, boot, wait_for_output
from guests.report import initrd_checksum

from pyhv.engine import layout

pytestmark = pytest.mark.kvm

CMDLINE = "console=ttyS0 pyhv.test=1 quoted=\"a b\" end"


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(os.urandom(5000) + b"pyhv-initrd-end")
    return path


def check_common(b, *, cpus: int, memory: int, cmdline: str, initrd: Path | None) -> None:
    r = b.report
    assert b.event.kind == "powered-off" and b.event.detail == "guest", b.output[-2000:]
    assert r.complete, b.output
    assert not r.errors and not r.exceptions
    assert r.cmdline == cmdline
    got = [(e.addr, e.size, e.type) for e in r.e820]
    assert got == [(e.addr, e.size, e.type) for e in layout.e820_map(memory)]
    if initrd is None:
        assert r.initrd is None or r.initrd.addr is None
    else:
        data = initrd.read_bytes()
        assert r.initrd is not None
        assert r.initrd.size == len(data)
        assert r.initrd.csum == initrd_checksum(data)
        assert r.initrd.addr % 4096 == 0 and r.initrd.addr >= layout.HIMEM_START
        assert r.initrd.addr + r.initrd.size <= min(memory, layout.MMIO_HOLE_START)
    # ACPI: found where pyhv put it, every table present with a valid checksum
    assert r.rsdp["addr"] == layout.ACPI_ADDR and r.rsdp["checksum"] == "ok"
    sigs = {t.sig for t in r.acpi_tables}
    assert {"XSDT", "FACP", "APIC", "DSDT"} <= sigs
    assert all(t.checksum_ok for t in r.acpi_tables), r.acpi_tables
    assert r.fadt["pm1a_cnt"] == layout.PM1A_CNT_PORT and r.fadt["sci_int"] == layout.SCI_IRQ
    # CPUs: MADT says `cpus`, and every AP actually started through INIT/SIPI
    assert r.cpu_count == cpus
    assert r.apic_ids == list(range(cpus))
    assert r.ap_expected == cpus - 1 and r.ap_started == cpus - 1
    assert [io["addr"] for io in r.ioapics] == [layout.IOAPIC_ADDR]
    # RTC: host time (UTC) within a few seconds
    assert r.rtc is not None
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert abs((r.rtc - now).total_seconds()) < 10
    assert r.poweroff_methods and r.poweroff_methods[0].startswith("pm1a")


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_pvh_guest(guests, initrd, tmp_path, cpus):
    memory = 64 * MiB
    b = boot(guests.pvh_elf, tmp_path / "out.txt", cmdline=CMDLINE, initrd=initrd,
             cpus=cpus, memory=memory)
    check_common(b, cpus=cpus, memory=memory, cmdline=CMDLINE, initrd=initrd)
    r = b.report
    assert r.protocol == "pvh"
    assert r.info_addr == layout.PVH_INFO_ADDR
    assert r.bootinfo["magic"] == 0x336EC578 and r.bootinfo["version"] == 1
    assert r.bootinfo["nr_modules"] == 1


def test_vmlinux_guest_linux64(guests, initrd, tmp_path):
    memory = 96 * MiB
    b = boot(guests.vmlinux_elf, tmp_path / "out.txt", cmdline=CMDLINE, initrd=initrd,
             cpus=2, memory=memory)
    check_common(b, cpus=2, memory=memory, cmdline=CMDLINE, initrd=initrd)
    r = b.report
    assert r.protocol == "linux64"
    assert r.info_addr == layout.ZERO_PAGE_ADDR
    assert r.bootinfo["type_of_loader"] == 0xFF
    assert r.bootinfo["loadflags"] & 0x81 == 0x81  # LOADED_HIGH | CAN_USE_HEAP


@pytest.mark.parametrize("variant", ["gzip", "zstd"])
def test_bzimage_guest(guests, initrd, tmp_path, variant):
    memory = 64 * MiB
    b = boot(guests.bzimage_payloads[variant], tmp_path / "out.txt", cmdline="bz " + variant,
             initrd=initrd, cpus=2, memory=memory)
    check_common(b, cpus=2, memory=memory, cmdline="bz " + variant, initrd=initrd)
    r = b.report
    assert r.protocol == "linux64"
    assert r.bootinfo["version"] == 0x020F  # the header the image carries, copied
    assert r.bootinfo["code32_start"] == 0x100000


def test_no_initrd_and_memory_above_4g(guests, tmp_path):
    """More RAM than fits below the PCI hole: the rest is mapped at 4 GiB."""
    memory = 3 * 1024 * MiB + 512 * MiB
    b = boot(guests.pvh_elf, tmp_path / "out.txt", cmdline="big", memory=memory)
    check_common(b, cpus=1, memory=memory, cmdline="big", initrd=None)
    assert b.report.e820[-1].addr == layout.HIGH_RAM_START


def test_forced_linux_protocol_on_pvh_image(guests, tmp_path):
    b = boot(guests.pvh_elf, tmp_path / "out.txt", cmdline="x", protocol="linux")
    assert b.report.protocol == "linux64"


def test_power_button(guests, tmp_path):
    out = tmp_path / "out.txt"

    def press(m):
        wait_for_output(m, out, "@waiting")
        m.power_button()

    b = boot(guests.pvh_elf, out, cmdline="pyhv.wait=powerbutton", cpus=2, control=press)
    assert b.report.powerbutton, b.output
    assert b.event.kind == "powered-off" and b.event.detail == "guest"


def test_guest_reset_reboots_then_no_reboot_ends(guests, tmp_path):
    out = tmp_path / "out.txt"

    def watch(m):
        wait_for_output(m, out, "@reset")
        # the reset rebuilds the machine: the guest boots a second time
        import time
        deadline = time.monotonic() + 30
        while out.read_text().count("@begin") < 2:
            assert time.monotonic() < deadline, out.read_text()
            m.process_events()
            time.sleep(0.02)
        assert m.boots == 2
        m.power_off()

    b = boot(guests.pvh_elf, out, cmdline="pyhv.wait=reset", control=watch)
    assert b.event.kind == "powered-off" and b.event.detail == "host"

    b = boot(guests.pvh_elf, tmp_path / "out2.txt", cmdline="pyhv.wait=reset",
             on_reboot="destroy")
    assert b.event.kind == "powered-off" and b.event.detail == "guest-reset"
    assert b.output.count("@begin") == 1


def test_pause_resume(guests, tmp_path):
    out = tmp_path / "out.txt"

    def pause_resume(m):
        wait_for_output(m, out, "@waiting")
        m.pause()
        assert m.state.value == "paused"
        assert all(v.state.value == "paused" for v in m.platform.vcpus)
        m.power_button()  # latched while paused, handled after resume
        m.resume()

    b = boot(guests.pvh_elf, out, cmdline="pyhv.wait=powerbutton", cpus=2,
             control=pause_resume)
    assert b.report.powerbutton and b.event.kind == "powered-off"


def test_reset_after_power_off_boots_again_when_resumed(guests, tmp_path):
    """QEMU's -no-shutdown reboot: the guest powers off, a reset rebuilds the
    machine held paused, resume runs the guest a second time."""
    from pyhv.config import KernelBoot, SerialConfig, VmConfig
    from pyhv.engine.machine import Machine

    out = tmp_path / "out.txt"
    m = Machine(VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="again"), memory=64 * MiB,
                         vcpus=2, serial=SerialConfig("file", str(out))))
    try:
        m.start()
        assert m.run(timeout=60).kind == "powered-off"
        assert m.state.value == "shutdown" and m.platform is None
        m.reset()
        assert m.state.value == "paused" and not m.finished
        assert all(t > 0 for t in m.vcpu_thread_ids())
        assert len(m.vcpu_thread_ids()) == 2 and len(set(m.vcpu_thread_ids())) == 2
        m.resume()
        assert m.run(timeout=60).kind == "powered-off"
        assert m.boots == 2
    finally:
        m.close()
    # the host end of the console outlives the reset: both boots' reports are there
    assert out.read_text().count("@end") == 2


@pytest.mark.parametrize("sockets,cores,threads", [(2, 3, 1), (1, 2, 2), (2, 1, 1)])
def test_cpu_topology(guests, tmp_path, sockets, cores, threads):
    """APIC ids follow the topology (socket/core/thread bit fields) in the MADT,
    and every AP in it starts."""
    from pyhv.config import CpuConfig, CpuTopology, KernelBoot, SerialConfig, VmConfig
    from pyhv.engine.cpuid import Topology
    from pyhv.engine.machine import Machine

    cpus = sockets * cores * threads
    out = tmp_path / "out.txt"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="topo"), memory=64 * MiB,
                   vcpus=cpus, serial=SerialConfig("file", str(out)),
                   cpu=CpuConfig(topology=CpuTopology(sockets, 1, cores, threads)))
    m = Machine(cfg)
    try:
        m.start()
        assert m.run(timeout=60).kind == "powered-off"
    finally:
        m.close()
    from guests.report import parse_report

    r = parse_report(out.read_text())
    topo = Topology(sockets, cores, threads)
    assert r.apic_ids == [topo.apic_id(i) for i in range(cpus)]
    assert r.cpu_count == cpus and r.ap_started == cpus - 1


def test_acpi_off_leaves_the_mp_table(guests, tmp_path):
    """features.acpi off (QEMU's -no-acpi): no RSDP anywhere, the MP table still
    describes the CPUs; the guest cannot power off through ACPI then."""
    from pyhv.config import FeaturesConfig, KernelBoot, SerialConfig, VmConfig
    from pyhv.engine.machine import Machine

    out = tmp_path / "out.txt"
    m = Machine(VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="noacpi"), memory=64 * MiB,
                         vcpus=2, serial=SerialConfig("file", str(out)),
                         features=FeaturesConfig(acpi=False)))
    try:
        m.start()
        wait_for_output(m, out, "@end")
        assert m.memory.read(layout.MPTABLE_ADDR, 4) == b"_MP_"
        m.power_off()
    finally:
        m.close()
    text = out.read_text()
    assert "@acpi-table" not in text and "@cmdline noacpi" in text


def test_device_fault_is_isolated(guests, tmp_path):
    """An exception in a device model (a pyhv bug) takes that device off the bus and
    is reported with the exception named; the guest and the other devices go on (the
    guest still powers off through ACPI)."""
    from pyhv.config import KernelBoot, SerialConfig, VmConfig
    from pyhv.engine.machine import Machine

    class Broken:
        def read(self, offset, size):
            raise RuntimeError("broken device model")

        def write(self, offset, size, value):
            raise RuntimeError("broken device model")

    m = Machine(VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="x"), memory=64 * MiB,
                         serial=SerialConfig("file", str(tmp_path / "out.txt"))))
    events = []
    m.subscribe(events.append)
    try:
        m.start(paused=True)
        # the guest's first access to COM1 reaches the broken model
        m.platform.pio.remove(layout.COM1_PORT)
        m.platform.pio.insert(layout.COM1_PORT, 8, Broken(), "broken")
        m.resume()
        ev = m.run(timeout=60)
        assert m.platform is None or m.platform.pio.find(layout.COM1_PORT) is None
    finally:
        m.close()
    assert ev.kind == "powered-off" and ev.detail == "guest"
    (broken,) = [e for e in events if e.kind == "device-broken"]
    assert broken.detail == "broken" and "RuntimeError: broken device model" in broken.message


def test_registered_device_fault_marks_it_broken(guests, tmp_path):
    """The device manager records which device broke and why (by its id)."""
    from pyhv.config import KernelBoot, SerialConfig, VmConfig
    from pyhv.engine.machine import Machine

    m = Machine(VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="x"), memory=64 * MiB,
                         serial=SerialConfig("file", str(tmp_path / "out.txt"))))
    events = []
    m.subscribe(events.append)
    try:
        m.start(paused=True)
        rtc = m.platform.devices.get("rtc").device

        def fail(*args):
            raise ValueError("rtc model bug")

        rtc.read = rtc.write = fail  # the guest reads the RTC in its report
        m.resume()
        ev = m.run(timeout=60)
    finally:
        m.close()
    assert ev.kind == "powered-off"
    (broken,) = [e for e in events if e.kind == "device-broken"]
    assert broken.detail == "rtc" and "ValueError: rtc model bug" in broken.message
    text = (tmp_path / "out.txt").read_text()
    assert "@end" in text  # COM1 and the rest went on


def test_the_engine_refuses_what_it_does_not_build(guests):
    """Not only the front ends: building a machine that needs an unbuilt device fails
    with the same one line support.py gives (no machine without its filesystem)."""
    from pyhv.config import FilesystemConfig, KernelBoot, VmConfig
    from pyhv.engine.errors import EngineError
    from pyhv.engine.machine import Machine

    m = Machine(VmConfig(KernelBoot(str(guests.pvh_elf)), memory=64 * MiB,
                         filesystems=(FilesystemConfig("/srv", "srv", "virtiofs"),)))
    try:
        with pytest.raises(EngineError, match="filesystem srv: virtio-fs is not built"):
            m.start()
    finally:
        m.close()
