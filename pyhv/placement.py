"""PCI placement: one policy for every front end (domain XML, pyhv-qemu, ``pyhv domxml
check``) and the engine.

:func:`place` returns the config with an id and a PCI address on every PCI
controller and device.  Addresses a front end was given (libvirt's
``<address>``, ``-device ...,bus=,addr=``) are kept exactly and checked; the
rest are assigned as QEMU assigns a ``-device`` without ``addr``: the first free
slot of the root bus (after the chipset's own: 00:00 host bridge, and 00:01
PIIX3 on pc, 00:1f ICH9 on q35), then the first free slot of a ``pci-bridge``,
then an empty ``pcie-root-port``.  Devices are placed in this order:
controllers (a virtio-serial controller is added when virtio consoles or channels
need one), disks, filesystems, NICs, rngs, the balloon.  Virtio consoles and
channels get their port numbers on their controller last (:func:`_place_ports`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, TypeVar, Union

from pyhv.config import (
    MAX_VIRTIO_PORTS,
    BalloonConfig,
    ConfigError,
    ControllerConfig,
    DiskConfig,
    FilesystemConfig,
    NetConfig,
    PciAddress,
    RngConfig,
    VmConfig,
    machine_family,
)

#: slot -> what the chipset keeps there, per machine family
CHIPSET_SLOTS = {
    "pc": {0: "the i440FX host bridge", 1: "the PIIX3 south bridge"},
    "q35": {0: "the Q35 host bridge", 0x1F: "the ICH9 south bridge"},
}
#: the chipset's USB functions where QEMU and libvirt put them (in the chipset's slots)
USB_CHIPSET_ADDRESS = {
    ("pc", "piix3-uhci"): PciAddress(0, 1, 2),
    ("q35", "ich9-ehci1"): PciAddress(0, 0x1D, 7),
    ("q35", "ich9-uhci1"): PciAddress(0, 0x1D, 0, multifunction=True),
    ("q35", "ich9-uhci2"): PciAddress(0, 0x1D, 1),
    ("q35", "ich9-uhci3"): PciAddress(0, 0x1D, 2),
}

#: the device records that sit on PCI
PciDeviceConfig = Union[DiskConfig, FilesystemConfig, NetConfig, RngConfig, BalloonConfig]
T = TypeVar("T", DiskConfig, FilesystemConfig, NetConfig, RngConfig, BalloonConfig)


class _Buses:
    """Which (bus, slot, function) is taken, and by what."""

    def __init__(self, cfg: VmConfig, family: str) -> None:
        self.family = family
        self.used: dict[tuple[int, int, int], str] = {}
        self.kind = {0: "pcie-root" if family == "q35" else "pci-root"}
        for c in cfg.controllers:
            if c.type == "pci":
                self.kind[c.index] = c.model

    def slots(self, bus: int) -> range:
        """Slots devices may take on ``bus``."""
        if self.kind[bus] == "pcie-root-port":
            return range(0, 1)
        if self.kind[bus] == "pci-bridge":
            return range(1, 32)  # slot 0 of a pci-bridge is kept free, as libvirt does
        return range(0, 32)

    def reserved(self, bus: int, slot: int) -> Optional[str]:
        if bus == 0:
            return CHIPSET_SLOTS[self.family].get(slot)
        return None

    def take(self, addr: PciAddress, label: str, chipset_ok: bool = False) -> None:
        if addr.bus not in self.kind:
            raise ConfigError(f"{label}: PCI bus {addr.bus} has no controller (add a "
                              f"pci-bridge or pcie-root-port with index {addr.bus})")
        if addr.slot not in self.slots(addr.bus):
            raise ConfigError(f"{label}: slot {addr.slot:#04x} is not available on bus "
                              f"{addr.bus} (a {self.kind[addr.bus]})")
        chip = self.reserved(addr.bus, addr.slot)
        if chip and not chipset_ok:
            raise ConfigError(f"{label}: PCI address {addr} is taken by {chip}")
        key = (addr.bus, addr.slot, addr.function)
        if key in self.used:
            raise ConfigError(f"{label}: PCI address {addr} is taken by {self.used[key]}")
        self.used[key] = label

    def free(self, label: str) -> PciAddress:
        order = [0] + sorted(b for b, k in self.kind.items() if k == "pci-bridge") + \
            sorted(b for b, k in self.kind.items() if k == "pcie-root-port")
        for bus in order:
            for slot in self.slots(bus):
                if self.reserved(bus, slot):
                    continue
                if any((bus, slot, f) in self.used for f in range(8)):
                    continue
                addr = PciAddress(bus, slot, 0)
                self.take(addr, label)
                return addr
        raise ConfigError(f"{label}: no free PCI slot left (add a pci-bridge or "
                          "pcie-root-port controller)")


def place(cfg: VmConfig) -> VmConfig:
    """``cfg`` with an id and an address on every PCI controller and device."""
    family = machine_family(cfg.machine) or "pc"
    if (cfg.channels or any(p.target == "virtio" for p in cfg.extra_serials)) and \
            not any(c.type == "virtio-serial" for c in cfg.controllers):
        # virtio consoles and channels need their controller (a PCI function)
        cfg = replace(cfg, controllers=cfg.controllers + (
            ControllerConfig("virtio-serial", "virtio-serial"),))
    buses = _Buses(cfg, family)
    # addresses given first, so that nothing assigned takes them
    given: list[tuple[PciAddress, str, bool]] = []
    for c in cfg.controllers:
        if c.address is not None:
            chip = USB_CHIPSET_ADDRESS.get((family, c.model))
            given.append((c.address, c.label, chip is not None and
                          (chip.bus, chip.slot) == (c.address.bus, c.address.slot)))
    for label, dev in _devices(cfg):
        if dev.address is not None:
            given.append((dev.address, label, False))
    for addr, label, chipset_ok in given:
        buses.take(addr, label, chipset_ok)

    controllers = []
    for c in sorted(cfg.controllers, key=lambda c: (c.type != "pci", c.index)):
        cid = c.id or _controller_id(c)
        where = c.address
        if where is None:
            chip = USB_CHIPSET_ADDRESS.get((family, c.model))
            if chip is not None and (chip.bus, chip.slot, chip.function) not in buses.used:
                where = chip
                buses.take(chip, c.label, chipset_ok=True)
            else:
                where = buses.free(c.label)
        controllers.append(replace(c, id=cid, address=where))
    out = replace(cfg, controllers=tuple(controllers))
    out = replace(out,
                  disks=_assign(out.disks, "virtio-disk", buses),
                  filesystems=_assign(out.filesystems, "fs", buses),
                  nets=_assign(out.nets, "net", buses),
                  rngs=_assign(out.rngs, "rng", buses))
    if out.balloon is not None:
        (balloon,) = _assign((out.balloon,), "balloon", buses)
        out = replace(out, balloon=balloon)
    _check_functions(out, buses)
    return _place_ports(out)


def _place_ports(cfg: VmConfig) -> VmConfig:
    """An id and a port number on every virtio console and channel: numbers given are
    kept and checked; the first console without one gets port 0 (the console port
    of a driver without MULTIPORT), the rest the lowest free number from 1, as QEMU
    numbers ``virtconsole``/``virtserialport`` without ``nr``."""
    limits = {c.index: c.max_ports or MAX_VIRTIO_PORTS
              for c in cfg.controllers if c.type == "virtio-serial"}
    used: dict[int, dict[int, str]] = {i: {} for i in limits}

    def take(controller: int, port: Optional[int], label: str, console: bool) -> int:
        if controller not in limits:
            raise ConfigError(f"{label}: virtio-serial controller {controller} does not "
                              "exist")
        taken, limit = used[controller], limits[controller]
        if port is None:
            first = 0 if console and 0 not in taken else 1
            port = next((n for n in range(first, limit) if n not in taken), None)
            if port is None:
                raise ConfigError(f"{label}: virtio-serial controller {controller} has no "
                                  f"free port (it has {limit})")
        elif port >= limit:
            raise ConfigError(f"{label}: port {port} is past the {limit} ports of "
                              f"virtio-serial controller {controller}")
        elif port in taken:
            raise ConfigError(f"{label}: port {port} of virtio-serial controller "
                              f"{controller} is taken by {taken[port]}")
        taken[port] = label
        return port

    # given numbers first, so that nothing numbered here takes them
    serials = list(cfg.extra_serials)
    channels = list(cfg.channels)
    for given in (True, False):
        for i, p in enumerate(serials):
            if p.target == "virtio" and (p.port is not None) == given:
                label = f"console hvc{p.index}"
                serials[i] = replace(p, port=take(p.controller, p.port, label, True),
                                     id=p.id or f"console{p.index}")
        for i, ch in enumerate(channels):
            if (ch.port is not None) == given:
                label = f"channel {ch.name}"
                channels[i] = replace(ch, port=take(ch.controller, ch.port, label, False),
                                      id=ch.id or f"channel{i}")
    return replace(cfg, extra_serials=tuple(serials), channels=tuple(channels))


def _controller_id(c: ControllerConfig) -> str:
    if c.type == "pci":
        return f"pci.{c.index}"
    if c.type == "usb":
        base = "usb" if c.index == 0 else f"usb{c.index}"
        return base if c.master_port is None else f"{base}-companion{c.master_port}"
    return f"virtio-serial{c.index}"


def _label(item: PciDeviceConfig, i: int) -> str:
    """How errors name a device (as the domain XML would let a user find it)."""
    if isinstance(item, DiskConfig):
        return f"disk {item.target or item.path}"
    if isinstance(item, FilesystemConfig):
        return f"filesystem {item.tag}"
    if isinstance(item, NetConfig):
        return f"interface {item.mac or item.ifname or i}"
    if isinstance(item, RngConfig):
        return f"rng #{i}"
    return "memballoon"


def _devices(cfg: VmConfig) -> list[tuple[str, PciDeviceConfig]]:
    out: list[tuple[str, PciDeviceConfig]] = []
    groups: tuple[Sequence[PciDeviceConfig], ...] = (cfg.disks, cfg.filesystems, cfg.nets,
                                                      cfg.rngs)
    for group in groups:
        out += [(_label(item, i), item) for i, item in enumerate(group)]
    if cfg.balloon is not None:
        out.append((_label(cfg.balloon, 0), cfg.balloon))
    return out


def _assign(items: Sequence[T], prefix: str, buses: _Buses) -> tuple[T, ...]:
    out = []
    for i, item in enumerate(items):
        ident = item.id or f"{prefix}{i}"
        addr = item.address
        if addr is None:
            addr = buses.free(_label(item, i))
        out.append(replace(item, id=ident, address=addr))
    return tuple(out)


def _check_functions(cfg: VmConfig, buses: _Buses) -> None:
    """A slot with functions besides 0 needs function 0 (else the guest sees none)."""
    slots: dict[tuple[int, int], list[int]] = {}
    for bus, slot, fn in buses.used:
        slots.setdefault((bus, slot), []).append(fn)
    for (bus, slot), fns in slots.items():
        if buses.reserved(bus, slot):
            continue
        if 0 not in fns:
            label = buses.used[(bus, slot, min(fns))]
            raise ConfigError(f"{label}: PCI slot {bus:02x}:{slot:02x} has function "
                              f"{min(fns)} but no function 0 (the guest would see none)")


def pci_functions(cfg: VmConfig) -> list[tuple[PciAddress, str, str]]:
    """(address, id, what) of every placed controller and device (``place`` first)."""
    out: list[tuple[PciAddress, str, str]] = []
    for c in cfg.controllers:
        if c.address is not None:
            out.append((c.address, c.id or "", c.model))
    for label, dev in _devices(cfg):
        if dev.address is not None:
            out.append((dev.address, dev.id or "", label))
    return sorted(out, key=lambda t: (t[0].bus, t[0].slot, t[0].function))
