"""PCI Express native hotplug: the root port's slot registers (pure), and a running
machine taking a disk into an empty ``pcie-root-port`` and giving it back (tier kvm).

The guest side (a driver that powers the slot on, enumerates the card and powers it
off on the attention button, compared with QEMU) is ``test_hotplug_guest.py``; here
the test itself plays the guest's driver through the host bridge's configuration
path, which is what a guest's config cycles reach.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_helpers import wait_for_output

from pyhv.config import (
    ControllerConfig,
    DiskConfig,
    KernelBoot,
    NetConfig,
    PciAddress,
    SerialConfig,
    VmConfig,
)
from pyhv.engine.devices import RecordingLine
from pyhv.engine.errors import EngineError
from pyhv.engine.machine import Machine, MachineEvent
from pyhv.engine.pci.config import STATUS, STATUS_INTERRUPT
from pyhv.engine.pci.device import PciBridge, pci_bridge
from pyhv.engine.pci.platform import PciSlot, build_pci
from pyhv.engine.pci.rootport import (
    LINK_STATUS,
    LNKSTA_DLLLA,
    SLOT_CAPS,
    SLOT_CONTROL,
    SLOT_STATUS,
    SLTCAP_ABP,
    SLTCAP_HPC,
    SLTCAP_PCP,
    SLTCTL_ABPE,
    SLTCTL_DLLSCE,
    SLTCTL_HPIE,
    SLTCTL_PCC,
    SLTCTL_PDCE,
    SLTSTA_ABP,
    SLTSTA_CC,
    SLTSTA_DLLSC,
    SLTSTA_PDC,
    SLTSTA_PDS,
    RootPort,
    pcie_root_port,
)

MiB = 1 << 20
PIC_ON, PIC_OFF = 1 << 8, 3 << 8


def _reg(port: RootPort, reg: int) -> int:
    return port.config_read(port.exp + reg, 2)


def _write(port: RootPort, reg: int, value: int) -> None:
    port.config_write(port.exp + reg, 2, value)


def _card() -> PciBridge:
    """Any PCI function will do as the card (a bridge has a config space too)."""
    return pci_bridge("card", 7)


def test_an_empty_hotplug_slot_is_dark_and_unpowered() -> None:
    port = pcie_root_port("pci.1", 0x10, 0)
    caps = port.config_read(port.exp + SLOT_CAPS, 4)
    assert caps & SLTCAP_HPC and caps & SLTCAP_ABP and caps & SLTCAP_PCP
    assert not _reg(port, SLOT_STATUS) & SLTSTA_PDS
    assert _reg(port, SLOT_CONTROL) & SLTCTL_PCC
    assert _reg(port, SLOT_CONTROL) & PIC_OFF == PIC_OFF
    assert not _reg(port, LINK_STATUS) & LNKSTA_DLLLA


def test_hotplug_off_leaves_a_plain_slot() -> None:
    port = pcie_root_port("pci.1", 0x10, 0, hotplug=False)
    assert not port.config_read(port.exp + SLOT_CAPS, 4) & SLTCAP_HPC
    _write(port, SLOT_CONTROL, SLTCTL_HPIE | SLTCTL_PDCE)
    assert not _reg(port, SLOT_STATUS) & SLTSTA_CC   # no slot controller to complete
    with pytest.raises(ValueError, match="hotplug off"):
        port.plug(_card())


def test_plug_power_on_and_the_interrupt_follow_the_spec() -> None:
    port = pcie_root_port("pci.1", 0x10, 0)
    line = RecordingLine()
    port.set_intx(line, 16)
    _write(port, SLOT_CONTROL, _reg(port, SLOT_CONTROL) | SLTCTL_HPIE | SLTCTL_PDCE |
           SLTCTL_ABPE | SLTCTL_DLLSCE)
    assert _reg(port, SLOT_STATUS) & SLTSTA_CC   # command completed (no interrupt: CCIE off)
    assert not line.level
    _write(port, SLOT_STATUS, SLTSTA_CC)         # write one to clear
    assert not _reg(port, SLOT_STATUS) & SLTSTA_CC

    port.plug(_card())
    sta = _reg(port, SLOT_STATUS)
    assert sta & SLTSTA_PDS and sta & SLTSTA_PDC
    assert sta & SLTSTA_ABP                      # the button asks for power (pciehp)
    assert not sta & SLTSTA_DLLSC                # the slot has no power yet: no link
    assert line.level and port.config_read(STATUS, 2) & STATUS_INTERRUPT
    assert not port.visible                      # a card without power answers nothing
    _write(port, SLOT_STATUS, SLTSTA_PDC)
    assert line.level                            # the button event is still pending
    _write(port, SLOT_STATUS, SLTSTA_ABP)
    assert not line.level

    _write(port, SLOT_CONTROL, (_reg(port, SLOT_CONTROL) & ~SLTCTL_PCC & ~PIC_OFF) | PIC_ON)
    assert port.visible and port.powered
    assert _reg(port, LINK_STATUS) & LNKSTA_DLLLA
    assert _reg(port, SLOT_STATUS) & SLTSTA_DLLSC and line.level
    _write(port, SLOT_STATUS, SLTSTA_DLLSC | SLTSTA_CC)
    assert not line.level

    # the host asks for the card back; the guest powers the slot off, then darkens it
    gone: list[RootPort] = []
    port.on_power_off = gone.append
    port.press_button()
    assert _reg(port, SLOT_STATUS) & SLTSTA_ABP and line.level
    _write(port, SLOT_STATUS, SLTSTA_ABP)
    _write(port, SLOT_CONTROL, _reg(port, SLOT_CONTROL) | SLTCTL_PCC)
    assert not gone                              # still lit: not yet
    assert not _reg(port, LINK_STATUS) & LNKSTA_DLLLA
    _write(port, SLOT_CONTROL, _reg(port, SLOT_CONTROL) | PIC_OFF)
    assert gone == [port]
    _write(port, SLOT_CONTROL, _reg(port, SLOT_CONTROL))  # rewritten while off and dark
    assert gone == [port]
    assert [f.name for f in port.unplug()] == ["card"]
    sta = _reg(port, SLOT_STATUS)
    assert not sta & SLTSTA_PDS and sta & SLTSTA_PDC
    assert "pulse" not in line.events  # a root port's INTx is level-triggered


def test_a_slot_takes_one_card() -> None:
    port = pcie_root_port("pci.1", 0x10, 0)
    port.plug(_card())
    with pytest.raises(ValueError, match="already holds"):
        port.plug(_card())


def test_the_platform_hides_an_unpowered_slot_and_powers_cold_plugged_cards() -> None:
    from pyhv.engine.pci.platform import BridgeSpec

    bridges = [BridgeSpec("pcie-root-port", PciSlot(2), "pci.1", port=0x10),
               BridgeSpec("pcie-root-port", PciSlot(3), "pci.2", port=0x11)]
    pci = build_pci("q35", 64 * MiB, bridges, [(PciSlot(0, parent=0), _card())])
    full, empty = pci.bridges
    assert isinstance(full, RootPort) and isinstance(empty, RootPort)
    assert full.powered and _reg(full, SLOT_STATUS) & SLTSTA_PDS
    assert _reg(full, LINK_STATUS) & LNKSTA_DLLLA
    assert not empty.powered
    card_bus = full.secondary
    assert pci.root.config_read(card_bus, 0, 0, 2) == 0x1B36
    _write(full, SLOT_CONTROL, _reg(full, SLOT_CONTROL) | SLTCTL_PCC)
    assert pci.root.config_read(card_bus, 0, 0, 2) == 0xFFFF


# ---- a running machine (tier kvm) -----------------------------------------------------

def _q35(guest: Path, out: Path, ports: int = 2) -> VmConfig:
    return VmConfig(KernelBoot(str(guest), None, "pyhv.wait=echo"), memory=64 * MiB,
                    machine="q35", serial=SerialConfig("file", str(out)),
                    controllers=tuple(ControllerConfig("pci", "pcie-root-port", i,
                                                       f"pci.{i}",
                                                       PciAddress(0, 1 + i, 0), 0x10 + i,
                                                       i)
                                      for i in range(1, ports + 1)))


def _guest_powers(machine: Machine, port: RootPort, on: bool) -> None:
    """What the guest's driver writes: power and power indicator together."""
    assert machine.platform is not None and machine.platform.pci is not None
    ctl = _reg(port, SLOT_CONTROL) & ~(SLTCTL_PCC | PIC_OFF)
    ctl |= PIC_ON if on else SLTCTL_PCC | PIC_OFF
    _, dfn = _bdf(machine, port)
    machine.platform.pci.root.config_write(0, dfn, port.exp + SLOT_CONTROL, 2, ctl)


def _bdf(machine: Machine, port: RootPort) -> tuple[int, int]:
    assert machine.platform is not None and machine.platform.pci is not None
    for bus, dfn, fn, _parent in machine.platform.pci.root.walk():
        if fn is port:
            return bus, dfn
    raise AssertionError("port not on the machine")


@pytest.mark.kvm
def test_a_disk_goes_in_and_comes_out_of_a_running_machine(guests, tmp_path: Path) -> None:
    out = tmp_path / "com1.txt"
    image = tmp_path / "hot.img"
    image.write_bytes(b"\0" * MiB)
    machine = Machine(_q35(guests.pvh_elf, out))
    events: list[MachineEvent] = []
    machine.subscribe(events.append)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        machine.start()
        wait_for_output(machine, out, "@echo-ready")
        ident = machine.add_device(DiskConfig(str(image), id="hotdisk",
                                              address=PciAddress(2, 0, 0)))
        assert ident == "hotdisk"
        assert [d.id for d in machine.config.disks] == ["hotdisk"]
        assert machine.platform is not None and machine.platform.pci is not None
        port = machine.platform.pci.port("pci.2")
        assert port is not None and port.present and not port.powered
        assert "hotdisk" in [d[0] for d in machine.devices()]
        assert _reg(port, SLOT_STATUS) & SLTSTA_PDC

        _guest_powers(machine, port, True)   # the guest takes the card
        assert _reg(port, LINK_STATUS) & LNKSTA_DLLLA
        sec = port.secondary
        assert machine.platform.pci.root.config_read(sec, 0, 0, 4) == 0x1042_1AF4

        with pytest.raises(EngineError, match="pci.2 is taken by hotdisk"):
            machine.add_device(DiskConfig(str(image), id="other",
                                          address=PciAddress(2, 0, 0)))
        with pytest.raises(EngineError, match="id hotdisk is taken"):
            machine.add_device(DiskConfig(str(image), id="hotdisk"))
        with pytest.raises(EngineError, match="bus 0 is not a pcie-root-port"):
            machine.add_device(DiskConfig(str(image), id="root",
                                          address=PciAddress(0, 9, 0)))
        with pytest.raises(EngineError, match="no device 'nosuch'"):
            machine.remove_device("nosuch")

        machine.remove_device("hotdisk")
        assert _reg(port, SLOT_STATUS) & SLTSTA_ABP
        machine.process_events()
        assert not [e for e in events if e.kind == "device-deleted"]  # the guest decides
        _guest_powers(machine, port, False)
        machine.process_events()
        deleted = [e for e in events if e.kind == "device-deleted"]
        assert [e.detail for e in deleted] == ["hotdisk"]
        assert not port.present and machine.config.disks == ()
        assert "hotdisk" not in [d[0] for d in machine.devices()]

        # the slot is free again, and a NIC needs nothing the test cannot give it
        # without a tap: the first empty port is chosen without an address
        machine.add_device(DiskConfig(str(image), id="again"))
        assert machine.config.disks[0].address == PciAddress(1, 0, 0)
        machine.serial_input(b"done\n")
        ev = machine.run(timeout=30)
        assert ev.kind == "powered-off"
    finally:
        machine.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.kvm
def test_hotplug_needs_a_q35_root_port(guests, tmp_path: Path) -> None:
    out = tmp_path / "com1.txt"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, "pyhv.wait=echo"),
                   memory=64 * MiB, serial=SerialConfig("file", str(out)))
    machine = Machine(cfg)
    try:
        machine.start()
        with pytest.raises(EngineError, match="hotplug needs a q35 machine"):
            machine.add_device(NetConfig())
        machine.power_off()
    finally:
        machine.close()
