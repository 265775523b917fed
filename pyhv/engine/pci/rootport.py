"""QEMU's ``pcie-root-port`` (1b36:000c) with a PCI Express native hotplug slot.

The slot follows the PCI Express Base Specification (7.5.3.9-7.5.3.11: Slot
Capabilities, Control and Status; 6.7: the hotplug model) the way guests'
drivers (Linux's pciehp) use it:

* A card is put in (:meth:`RootPort.plug`): Presence Detect State goes up,
  Presence Detect Changed is raised and, the slot being off, Attention Button
  Pressed too.  The driver powers the slot on (Power Controller Control
  cleared), the link comes up (Data Link Layer Link Active, with Data Link Layer
  State Changed) and it enumerates the bus below.
* The host asks for the card back (:meth:`RootPort.press_button`): the Attention
  Button Pressed event.  The driver lets go of the device and powers the slot off
  with the power indicator off; that is when the card is taken out
  (``on_power_off``; the machine removes the device), Presence Detect State drops
  and Presence Detect Changed is raised.
* Every write to Slot Control completes at once (Command Completed).
* The port signals an event on its INTx pin, level, while Hot-Plug Interrupt
  Enable and an event with its enable bit are both set.

While the slot's power is off nothing below the port answers configuration
cycles (all-ones), as a card without power does not.
"""

from __future__ import annotations

from typing import Callable, Optional

from pyhv.engine.pci.config import CAP_ID_EXP, CAP_ID_PM, ConfigSpace
from pyhv.engine.pci.device import (
    CLASS_PCI_BRIDGE,
    PCIE_LINK_CAPS,
    PCIE_ROOT_PORT,
    REDHAT,
    PciBridge,
    PciFunction,
    pcie_capability,
    pm_capability,
)

# offsets inside the PCI Express capability
LINK_STATUS = 0x12
SLOT_CAPS = 0x14
SLOT_CONTROL = 0x18
SLOT_STATUS = 0x1A

# Slot Capabilities
SLTCAP_ABP = 1 << 0      # attention button present
SLTCAP_PCP = 1 << 1      # power controller present
SLTCAP_AIP = 1 << 3      # attention indicator present
SLTCAP_PIP = 1 << 4      # power indicator present
SLTCAP_HPC = 1 << 6      # hot-plug capable
SLTCAP_PSN_SHIFT = 19    # physical slot number

# Slot Control
SLTCTL_ABPE = 1 << 0
SLTCTL_PFDE = 1 << 1
SLTCTL_MRLSCE = 1 << 2
SLTCTL_PDCE = 1 << 3
SLTCTL_CCIE = 1 << 4
SLTCTL_HPIE = 1 << 5
SLTCTL_AIC = 3 << 6
SLTCTL_PIC = 3 << 8
SLTCTL_PCC = 1 << 10     # 1: power off
SLTCTL_DLLSCE = 1 << 12
IND_ON, IND_BLINK, IND_OFF = 1, 2, 3
PIC_SHIFT, AIC_SHIFT = 8, 6

# Slot Status
SLTSTA_ABP = 1 << 0
SLTSTA_PFD = 1 << 1
SLTSTA_MRLSC = 1 << 2
SLTSTA_PDC = 1 << 3
SLTSTA_CC = 1 << 4
SLTSTA_PDS = 1 << 6
SLTSTA_DLLSC = 1 << 8
#: the event bits (write one to clear), each with its enable bit in Slot Control
EVENTS = ((SLTSTA_ABP, SLTCTL_ABPE), (SLTSTA_PFD, SLTCTL_PFDE),
          (SLTSTA_MRLSC, SLTCTL_MRLSCE), (SLTSTA_PDC, SLTCTL_PDCE),
          (SLTSTA_CC, SLTCTL_CCIE), (SLTSTA_DLLSC, SLTCTL_DLLSCE))
EVENT_BITS = SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC

# Link Status
LNKSTA_DLLLA = 1 << 13   # data link layer link active


class RootPort(PciBridge):
    """A PCI Express root port; with ``hotplug``, its slot takes cards while the
    machine runs."""

    kind = "pcie-root-port"

    def __init__(self, config: ConfigSpace, name: str, exp: int, hotplug: bool) -> None:
        super().__init__(config, name)
        self.exp = exp
        self.hotplug = hotplug
        #: the guest powered the slot off with a card in it: take the card out
        #: (called under the port's lock, on the vCPU thread that wrote the register)
        self.on_power_off: Optional[Callable[["RootPort"], None]] = None

    # ---- registers ----------------------------------------------------------------
    def _get(self, reg: int) -> int:
        return self.config.get(self.exp + reg, 2)

    def _set(self, reg: int, value: int) -> None:
        self.config.set16(self.exp + reg, value)

    @property
    def present(self) -> bool:
        return bool(self.children)

    @property
    def powered(self) -> bool:
        """Whether the slot has power (a slot without a power controller always has)."""
        return not (self.hotplug and self._get(SLOT_CONTROL) & SLTCTL_PCC)

    @property
    def visible(self) -> bool:
        return self.powered

    def _link(self, up: bool) -> None:
        sta = self._get(LINK_STATUS)
        if bool(sta & LNKSTA_DLLLA) != up:
            self._set(LINK_STATUS, sta ^ LNKSTA_DLLLA)
            self._event(SLTSTA_DLLSC)

    def _presence(self, present: bool) -> None:
        sta = self._get(SLOT_STATUS)
        if bool(sta & SLTSTA_PDS) != present:
            self._set(SLOT_STATUS, sta ^ SLTSTA_PDS)
            self._event(SLTSTA_PDC)

    def _event(self, bit: int) -> None:
        self._set(SLOT_STATUS, self._get(SLOT_STATUS) | bit)

    def _signal(self) -> None:
        """The port's INTx follows its enabled, pending hotplug events."""
        ctl, sta = self._get(SLOT_CONTROL), self._get(SLOT_STATUS)
        pending = bool(ctl & SLTCTL_HPIE) and any(
            sta & event and ctl & enable for event, enable in EVENTS)
        self.drive_intx(pending)

    # ---- the guest ----------------------------------------------------------------
    def config_write(self, offset: int, size: int, value: int) -> None:
        ctl_at = self.exp + SLOT_CONTROL
        touches_ctl = self.hotplug and offset < ctl_at + 2 and offset + size > ctl_at
        before = self._get(SLOT_CONTROL)
        super().config_write(offset, size, value)
        if not self.hotplug:
            return
        if touches_ctl:
            after = self._get(SLOT_CONTROL)
            self._event(SLTSTA_CC)  # the slot controller takes each command at once
            self._power_changed(before, after)
        self._signal()

    def _power_changed(self, before: int, after: int) -> None:
        if not self.present:
            return
        if (before ^ after) & SLTCTL_PCC:
            self._link(not after & SLTCTL_PCC)
        # the card goes when the slot becomes powered off *and* dark (Linux writes
        # the two in separate commands); a slot that stays so is left alone, as
        # guests rewrite the control of powered-off slots before powering them on
        if _off_and_dark(after) and not _off_and_dark(before) and self.on_power_off:
            self.on_power_off(self)

    def reset(self) -> None:
        super().reset()
        if self.hotplug:
            self.settle()

    def settle(self) -> None:
        """The slot as a reset leaves it: powered with its indicator on if it holds a
        card, off (and dark) if empty; the link up with a powered card; no events."""
        present = self.present
        ctl = self._get(SLOT_CONTROL) & ~(SLTCTL_PCC | SLTCTL_PIC | SLTCTL_AIC)
        ctl |= IND_OFF << AIC_SHIFT
        ctl |= (IND_ON << PIC_SHIFT) if present else (SLTCTL_PCC | IND_OFF << PIC_SHIFT)
        self._set(SLOT_CONTROL, ctl)
        self._set(SLOT_STATUS, SLTSTA_PDS if present else 0)
        sta = self._get(LINK_STATUS) & ~LNKSTA_DLLLA
        self._set(LINK_STATUS, sta | (LNKSTA_DLLLA if present else 0))
        self.drive_intx(False)

    # ---- the host -----------------------------------------------------------------
    def plug(self, fn: PciFunction) -> None:
        """Put a card in the empty slot (call under the port's lock)."""
        if not self.hotplug:
            raise ValueError(f"{self.name} has hotplug off")
        if self.present:
            raise ValueError(f"{self.name} already holds {self.children[0].name}")
        self.children[0] = fn
        self._presence(True)
        if self.powered:
            self._link(True)
        else:
            # the button is pressed for the new card, as a person would after putting
            # it in (and as QEMU does): Linux's pciehp, on a slot with a button,
            # enables button events and not presence changes, and powers the slot on
            # when the button asks
            self._event(SLTSTA_ABP)
        self._signal()

    def press_button(self) -> None:
        """Ask the guest to let go of the card (the attention button)."""
        self._event(SLTSTA_ABP)
        self._signal()

    def unplug(self) -> list[PciFunction]:
        """Take the cards out (call under the port's lock); the functions removed."""
        gone = list(self.children.values())
        self.children.clear()
        self._link(False)
        self._presence(False)
        self._signal()
        return gone


def pcie_root_port(name: str, port: int, slot: int, multifunction: bool = False,
                   hotplug: bool = True) -> RootPort:
    """QEMU's ``pcie-root-port`` with its PCI Express capability; physical slot
    ``slot``, and a hotplug slot unless ``hotplug`` is off (libvirt's
    ``<target hotplug='off'/>``)."""
    cfg = ConfigSpace(REDHAT, 0x000C, CLASS_PCI_BRIDGE, header_type=1, interrupt_pin=1,
                      pcie=True, multifunction=multifunction)
    body, wmask = pcie_capability(PCIE_ROOT_PORT, slot=slot)
    lc = PCIE_LINK_CAPS
    body = body[:lc] + (int.from_bytes(body[lc:lc + 4], "little") | (port << 24)).to_bytes(
        4, "little") + body[lc + 4:]
    exp = cfg.add_capability(CAP_ID_EXP, body, wmask)
    cfg.add_capability(CAP_ID_PM, *pm_capability())
    if hotplug:
        caps = cfg.get(exp + SLOT_CAPS, 4)
        cfg.set32(exp + SLOT_CAPS, caps | SLTCAP_ABP | SLTCAP_PCP | SLTCAP_AIP |
                  SLTCAP_PIP | SLTCAP_HPC)
        cfg.w1c[exp + SLOT_STATUS] = EVENT_BITS & 0xFF
        cfg.w1c[exp + SLOT_STATUS + 1] = EVENT_BITS >> 8
        cfg.allow(exp + SLOT_STATUS, 2, 0)
    bridge = RootPort(cfg, name, exp, hotplug)
    if hotplug:
        bridge.settle()  # empty until the platform puts its cards in (and settles again)
    return bridge


def _off_and_dark(ctl: int) -> bool:
    return bool(ctl & SLTCTL_PCC) and (ctl & SLTCTL_PIC) >> PIC_SHIFT == IND_OFF
