"""PCI functions: the base every PCI device builds on, bridges and the chipset's own.

A :class:`PciFunction` owns its :class:`ConfigSpace`, one lock for all its
registers, and its BARs' places on the port and MMIO buses: when the guest
programs a BAR or toggles decoding in the command register, the function moves
its ranges (one atomic bus update each), so a BAR answers at the address the
guest wrote.  Subclasses answer BAR accesses in :meth:`PciFunction.bar_read` /
:meth:`PciFunction.bar_write`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

from pyhv.engine.bus import Bus, BusError, Region
from pyhv.engine.pci.config import (
    CAP_ID_PM,
    CMD_INTX_DISABLE,
    COMMAND,
    INTERRUPT_LINE,
    SECONDARY_BUS,
    STATUS,
    STATUS_INTERRUPT,
    SUBORDINATE_BUS,
    ConfigSpace,
    pack,
)

if TYPE_CHECKING:
    from pyhv.engine.devices import InterruptLine

# vendor and device ids (what QEMU's models use, so guests' drivers and quirks match)
INTEL = 0x8086
REDHAT = 0x1B36
QEMU_SUBSYSTEM_VENDOR = 0x1AF4
QEMU_SUBSYSTEM = 0x1100

CLASS_HOST_BRIDGE = 0x060000
CLASS_ISA_BRIDGE = 0x060100
CLASS_PCI_BRIDGE = 0x060400

#: PCI Express capability: device/port types
PCIE_ENDPOINT = 0x0
PCIE_ROOT_PORT = 0x4
PCIE_ROOT_INTEGRATED = 0x9


class PciBuses:
    """The buses a function's BARs live on."""

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self.pio = pio
        self.mmio = mmio


class PciFunction:
    """One PCI function: configuration space, BARs, one lock, an INTx pin."""

    #: shown in ``pyhv domxml check`` and errors
    kind = "pci-function"

    def __init__(self, config: ConfigSpace, name: str = "") -> None:
        self.config = config
        self.name = name or self.kind
        self.lock = threading.Lock()
        self.buses: Optional[PciBuses] = None
        #: where each BAR is mapped now (None: not decoded)
        self.mapped: dict[int, Optional[int]] = {i: None for i in config.bars}
        #: the INTx line the platform wired (None: no pin or not wired yet)
        self.intx: Optional["InterruptLine"] = None
        self._initial = bytes(config.data)
        self._regions = {i: Region(self, i) for i in config.bars}
        #: the model raised while serving the guest: its BARs stay off the buses
        self.broken = False
        #: the function wants its INTx asserted (the line also obeys Interrupt Disable)
        self._intx_pending = False
        self._intx_level = False

    # ---- wiring (the platform) ----------------------------------------------------
    def attach(self, buses: PciBuses) -> None:
        self.buses = buses
        for index in self.config.bars:
            self._remap(index)

    def set_intx(self, line: "InterruptLine", gsi: int) -> None:
        """Wire the function's INTx pin and tell the guest which GSI it is."""
        self.intx = line
        self.config.set8(INTERRUPT_LINE, gsi)
        self._initial = bytes(self.config.data)
        if self._intx_level:
            line.set_level(True)  # a newly wired line learns what is pending

    def drive_intx(self, pending: bool) -> None:
        """The function wants its INTx asserted or not: the PCI Status register's
        Interrupt Status bit says so, and the line follows unless the command
        register's Interrupt Disable is set (PCI 3.0, 6.2.2 and 6.2.3)."""
        self._intx_pending = pending
        status = self.config.get(STATUS, 2)
        self.config.set16(STATUS, status | STATUS_INTERRUPT if pending
                          else status & ~STATUS_INTERRUPT)
        level = pending and not self.config.command & CMD_INTX_DISABLE
        if level != self._intx_level:
            self._intx_level = level
            if self.intx is not None:
                self.intx.set_level(level)

    def snapshot_as_initial(self) -> None:
        """What the function looks like after firmware set-up is what reset restores."""
        self._initial = bytes(self.config.data)

    # ---- configuration access (the host bridge, under ``lock``) -------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        for index in self.config.write(offset, size, value):
            self._remap(index)
        if offset <= COMMAND + 1 < offset + size:  # Interrupt Disable may have changed
            self.drive_intx(self._intx_pending)

    def _remap(self, index: int) -> None:
        if self.buses is None or self.broken:
            return
        bar = self.config.bars[index]
        bus = self.buses.pio if bar.kind == "io" else self.buses.mmio
        want = self.config.bar_address(index) if self.config.decoding(index) else None
        # the last byte must lie below the top of the space (as QEMU decides): a BAR
        # being sized (all ones written) is never mapped over the top of 4 GiB
        top = {"io": 0xFFFF, "mem32": 0xFFFF_FFFF, "mem64": (1 << 64) - 1}[bar.kind]
        if want is not None and (want == 0 or want + bar.size - 1 >= top):
            want = None  # unassigned, or being sized
        have = self.mapped[index]
        if want == have:
            return
        try:
            if have is not None and want is not None:
                bus.move(have, want)
            elif have is not None:
                bus.remove(have)
            else:
                assert want is not None
                bus.insert(want, bar.size, self._regions[index],
                           f"{self.name} BAR{index}", lock=self.lock, owner=self)
        except BusError:
            # the guest put the BAR over another device: like hardware with a
            # conflict, nothing answers there for this function until it moves
            if have is not None:
                bus.remove(have)
            want = None
        self.mapped[index] = want

    # ---- BAR access (the bus, under ``lock``) --------------------------------------
    def region_read(self, region: int, offset: int, size: int) -> int:
        return self.bar_read(region, offset, size)

    def region_write(self, region: int, offset: int, size: int, value: int) -> None:
        self.bar_write(region, offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        return None

    # ---- lifecycle -------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after firmware set-up (a guest or host reset)."""
        self.config.data[:] = self._initial
        for index in self.config.bars:
            self._remap(index)
        self.drive_intx(False)

    def detach(self) -> None:
        """Take every BAR off the buses (the platform is going away)."""
        if self.buses is None:
            return
        for index, base in self.mapped.items():
            if base is not None:
                bar = self.config.bars[index]
                (self.buses.pio if bar.kind == "io" else self.buses.mmio).remove(base)
                self.mapped[index] = None


def pcie_capability(port_type: int, *, slot: Optional[int] = None) -> tuple[bytes, bytes]:
    """A PCI Express capability (version 2) body and its write mask.

    Root ports get a slot with power/attention indicators absent and the
    chassis-wide physical slot number ``slot``; the link is x1 at 2.5 GT/s.
    """
    caps = 0x2 | (port_type << 4) | (0x100 if slot is not None else 0)
    dev_caps = 0x0000_8000  # role-based error reporting
    dev_ctl, dev_sta = 0x2810, 0  # relaxed ordering, no snoop, 512-byte read requests
    link_caps = 0x1 | (1 << 4) | (1 << 20)  # 2.5 GT/s, x1, data link active reporting
    link_ctl, link_sta = 0, 0x2011          # x1 at 2.5 GT/s, data link layer active
    # a slot with a card present, no hotplug controller (yet)
    slot_caps = (slot << 19) if slot is not None else 0
    slot_sta = 0x40 if slot is not None else 0
    body = pack("HIHHIHHIHH", caps, dev_caps, dev_ctl, dev_sta, link_caps, link_ctl, link_sta,
                slot_caps, 0, slot_sta)
    body += pack("HHI", 0, 0, 0)                            # root control/caps/status
    body += pack("IHHIHHIHH", 0x0, 0, 0, 0, 0, 0, 0, 0, 0)  # the version 2 registers
    wmask = bytearray(len(body))
    wmask[6:8] = (0x7CFF).to_bytes(2, "little")     # device control
    wmask[14:16] = (0x0FCB).to_bytes(2, "little")   # link control
    if slot is not None:
        wmask[22:24] = (0x1FFF).to_bytes(2, "little")  # slot control
        wmask[26:28] = (0x001F).to_bytes(2, "little")  # root control
    return body, bytes(wmask)


#: offset of the Link Capabilities register in a PCI Express capability's body
PCIE_LINK_CAPS = 10


def pm_capability() -> tuple[bytes, bytes]:
    """Power management v1.2: D0 only, the state field writable."""
    return pack("HH", 0x0003, 0x0008), pack("HH", 0, 0x8103)


class HostBridge(PciFunction):
    kind = "host-bridge"

    def __init__(self, device_id: int, name: str = "host bridge") -> None:
        super().__init__(ConfigSpace(INTEL, device_id, CLASS_HOST_BRIDGE, revision=2,
                                     subsystem_vendor=QEMU_SUBSYSTEM_VENDOR,
                                     subsystem=QEMU_SUBSYSTEM), name)


class IsaBridge(PciFunction):
    """The chipset's ISA/LPC bridge (PIIX3 at 00:01.0, ICH9 LPC at 00:1f.0).

    The legacy devices behind it (COM ports, i8042, RTC, PM) are on fixed ports:
    this function only identifies the chipset to the guest."""

    kind = "isa-bridge"

    def __init__(self, device_id: int, name: str, multifunction: bool,
                 pm_base: Optional[int] = None) -> None:
        cfg = ConfigSpace(INTEL, device_id, CLASS_ISA_BRIDGE, revision=2 if pm_base else 0,
                          subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM,
                          multifunction=multifunction)
        if pm_base is not None:  # ICH9: PMBASE and ACPI enable, where the PM block is
            cfg.set32(0x40, pm_base | 1)
            cfg.set8(0x44, 0x80)
        super().__init__(cfg, name)


class PciBridge(PciFunction):
    """A PCI-to-PCI bridge (type 1 header): ``pci-bridge`` or ``pcie-root-port``.

    Functions behind it sit on its secondary bus; configuration cycles for
    buses in secondary..subordinate go through it, as the guest numbered them.
    """

    kind = "pci-bridge"

    def __init__(self, config: ConfigSpace, name: str) -> None:
        super().__init__(config, name)
        self.children: dict[int, PciFunction] = {}

    @property
    def secondary(self) -> int:
        return self.config.get(SECONDARY_BUS, 1)

    @property
    def subordinate(self) -> int:
        return self.config.get(SUBORDINATE_BUS, 1)

    @property
    def visible(self) -> bool:
        """Whether what is behind the bridge answers configuration cycles (a root
        port's slot without power: no)."""
        return True

    def reset(self) -> None:
        super().reset()
        for child in self.children.values():
            with child.lock:
                child.reset()


def pci_bridge(name: str, chassis_nr: int) -> PciBridge:
    """QEMU's ``pci-bridge`` (1b36:0001): a conventional bridge with 32 slots."""
    cfg = ConfigSpace(REDHAT, 0x0001, CLASS_PCI_BRIDGE, header_type=1, interrupt_pin=1,
                      subsystem_vendor=QEMU_SUBSYSTEM_VENDOR)
    cfg.add_capability(0x04, pack("BB", 0, chassis_nr))  # slot identification
    cfg.add_capability(CAP_ID_PM, *pm_capability())
    return PciBridge(cfg, name)
