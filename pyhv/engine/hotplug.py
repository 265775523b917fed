"""Which devices a running machine takes, and where: the configuration side of
PCI Express native hotplug.

A disk or NIC goes into the slot of an empty ``pcie-root-port`` whose hotplug is
on (the port's bus, slot 0, function 0), as QEMU's ``device_add`` does on a q35
machine; without an address, the first such port.  The machine's configuration
gains the device (a reset keeps it, as QEMU keeps hot-added devices) and loses it
when the guest lets go of it.  The slot itself is
:class:`~pyhv.engine.pci.rootport.RootPort`'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Union

from pyhv.config import (
    ConfigError,
    ControllerConfig,
    DiskConfig,
    NetConfig,
    PciAddress,
    VmConfig,
    machine_family,
)
from pyhv.engine.errors import EngineError
from pyhv.engine.support import unsupported
from pyhv.placement import pci_functions, place

HotItem = Union[DiskConfig, NetConfig]


def label(item: HotItem) -> str:
    """How errors name the device (its id, else what the config says of it)."""
    if isinstance(item, DiskConfig):
        return f"disk {item.id or item.target or item.path}"
    return f"interface {item.id or item.mac or item.ifname or ''}".rstrip()


def admit(cfg: VmConfig, item: HotItem) -> tuple[VmConfig, HotItem, ControllerConfig]:
    """The (placed) configuration with ``item`` added, ``item`` as placed there and
    the root port it goes into; :class:`EngineError` (one line) where it cannot go."""
    what = label(item)
    cfg = place(cfg)
    if machine_family(cfg.machine) != "q35":
        raise EngineError(f"{what}: hotplug needs a q35 machine (pyhv hot-adds devices "
                          "into pcie-root-port slots)")
    ports = {c.index: c for c in cfg.controllers
             if c.type == "pci" and c.model == "pcie-root-port"}
    taken = {a.bus: ident or kind for a, ident, kind in pci_functions(cfg)}
    if item.address is None:
        free = [c for i, c in sorted(ports.items()) if c.hotplug and i not in taken]
        if not free:
            raise EngineError(f"{what}: no empty pcie-root-port with hotplug on is left "
                              "(give the domain spare root ports)")
        item = replace(item, address=PciAddress(free[0].index, 0, 0))
    a = item.address
    assert a is not None
    port = ports.get(a.bus)
    if port is None:
        raise EngineError(f"{what}: bus {a.bus} is not a pcie-root-port's (pyhv hot-adds "
                          "devices into root ports only)")
    if not port.hotplug:
        raise EngineError(f"{what}: {port.id} has hotplug off")
    if (a.slot, a.function) != (0, 0):
        raise EngineError(f"{what}: a root port's slot holds one device, at slot 0 "
                          f"function 0 (not {a.slot:#x}.{a.function})")
    if a.bus in taken:
        raise EngineError(f"{what}: {port.id} is taken by {taken[a.bus]}")
    ids = {d.id for d in cfg.disks} | {n.id for n in cfg.nets} | \
        {ident for _a, ident, _k in pci_functions(cfg)}
    if item.id is not None and item.id in ids:
        raise EngineError(f"{what}: the id {item.id} is taken")
    new = replace(cfg, disks=cfg.disks + (item,)) if isinstance(item, DiskConfig) else \
        replace(cfg, nets=cfg.nets + (item,))
    try:
        new = place(new)
    except ConfigError as e:
        raise EngineError(f"{what}: {e}") from None
    before = set(unsupported(cfg))
    problems = [p for p in unsupported(new) if p not in before]
    if problems:
        raise EngineError(problems[0])
    placed = new.disks[-1] if isinstance(item, DiskConfig) else new.nets[-1]
    return new, placed, port


def without(cfg: VmConfig, ident: str) -> VmConfig:
    """``cfg`` without the disk or NIC ``ident`` (the guest let go of it)."""
    return replace(cfg, disks=tuple(d for d in cfg.disks if d.id != ident),
                   nets=tuple(n for n in cfg.nets if n.id != ident))


__all__ = ["HotItem", "admit", "label", "without"]
