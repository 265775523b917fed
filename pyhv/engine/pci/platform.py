"""The PCI platform of a pc (i440FX + PIIX3) or q35 (Q35 MCH + ICH9) machine.

:func:`build_pci` lays out the hierarchy (the chipset's functions where libvirt
expects them, then the bridges and root ports the configuration describes at
their addresses), runs :class:`PciFirmware` over it and returns a
:class:`PciPlatform`; :meth:`PciPlatform.attach` puts the configuration
mechanisms and every BAR on the machine's buses.  No KVM here: interrupt lines
are injected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pyhv.config import (
    ControllerConfig,
    DiskConfig,
    NetConfig,
    PciAddress,
    VmConfig,
    machine_family,
)
from pyhv.engine import layout
from pyhv.engine.block import BlockError
from pyhv.engine.bus import Bus
from pyhv.engine.devices import InterruptLine
from pyhv.engine.errors import EngineError
from pyhv.engine.host import HostResources
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import INTERRUPT_PIN
from pyhv.engine.pci.device import (
    HostBridge,
    IsaBridge,
    PciBridge,
    PciBuses,
    PciFunction,
    pci_bridge,
)
from pyhv.engine.pci.firmware import PciFirmware, intx_gsi
from pyhv.engine.pci.root import ConfigIo, Ecam, PciRoot, bdf_text
from pyhv.engine.pci.rootport import RootPort, pcie_root_port
from pyhv.engine.resources import AddressAllocator
from pyhv.engine.virtio.device import VirtioDevice

#: IOAPIC pins PCI INTx lines are wired to (ACPI _PRT, level, active low)
PCI_INTX_GSIS = (16, 17, 18, 19, 20, 21, 22, 23)
#: port I/O PCI devices get: above the legacy ISA range, as PC firmware does
PCI_IO_START = 0xC000
PCI_IO_END = 0x10000
#: the 64-bit window: 32 GiB from the first 1 GiB boundary above RAM and 4 GiB
PCI_MMIO64_SIZE = 32 << 30

I440FX_HOST = 0x1237
PIIX3_ISA = 0x7000
Q35_HOST = 0x29C0
ICH9_LPC = 0x2918


def mmio64_window(ram_size: int) -> tuple[int, int]:
    top = layout.HIGH_RAM_START + max(0, ram_size - layout.MMIO_HOLE_START)
    start = (top + (1 << 30) - 1) & ~((1 << 30) - 1)
    return start, start + PCI_MMIO64_SIZE


@dataclass(frozen=True)
class PciSlot:
    """Where a function goes: on bus 0 (``parent`` None) or behind a controller."""

    slot: int
    function: int = 0
    #: the controller (by its index in the description) whose bus this is on
    parent: Optional[int] = None


@dataclass(frozen=True)
class BridgeSpec:
    """A ``pcie-root-port`` or ``pci-bridge`` controller at ``at``."""

    model: str
    at: PciSlot
    name: str
    #: pcie-root-port: port number and the physical slot (chassis-unique)
    port: int = 0
    chassis: int = 0
    #: pcie-root-port: a hotplug slot (libvirt's ``<target hotplug='off'/>``: not)
    hotplug: bool = True


@dataclass
class PciPlatform:
    family: str
    root: PciRoot
    config_io: ConfigIo
    ecam: Optional[Ecam]
    mmio64: tuple[int, int]
    bridges: list[PciBridge] = field(default_factory=list)
    #: (function, GSI) of every function with an INTx pin, as firmware routed them
    intx: list[tuple[PciFunction, int]] = field(default_factory=list)
    #: the buses BARs go on (after :meth:`attach`)
    buses: Optional[PciBuses] = None

    @property
    def express(self) -> bool:
        return self.ecam is not None

    def attach(self, pio: Bus, mmio: Bus,
               line_for: Callable[[int], InterruptLine]) -> None:
        """Map the configuration mechanisms and every BAR; wire INTx lines."""
        pio.insert(layout.PCI_CONFIG_PORT, 8, self.config_io, "pci-config")
        if self.ecam is not None:
            mmio.insert(layout.PCIE_ECAM_START, self.ecam.size, self.ecam, "pci-ecam")
        buses = PciBuses(pio, mmio)
        self.buses = buses
        for fn, gsi in self.intx:
            fn.set_intx(line_for(gsi), gsi)
        for _bus, _dfn, fn, _parent in self.root.walk():
            fn.attach(buses)

    def port(self, name: str) -> Optional[RootPort]:
        """The root port called ``name`` (libvirt's alias, ``pci.N``)."""
        return next((b for b in self.bridges if isinstance(b, RootPort) and b.name == name),
                    None)

    def plug(self, port: RootPort, fn: PciFunction,
             line_for: Callable[[int], InterruptLine]) -> None:
        """Hot-add ``fn`` in ``port``'s slot: its INTx wired as firmware would have
        wired it there (a line from ``line_for``), its BARs unassigned (the guest
        assigns them), the card in."""
        assert self.buses is not None, "attach first"
        pin = fn.config.get(INTERRUPT_PIN, 1)
        if pin:
            gsi = intx_gsi(PCI_INTX_GSIS, self._root_slot(port), 0, pin)
            fn.set_intx(line_for(gsi), gsi)
            self.intx.append((fn, gsi))
        fn.attach(self.buses)
        with port.lock:
            port.plug(fn)

    def unplug(self, port: RootPort) -> list[PciFunction]:
        """Take the card out of ``port``'s slot; its functions, off the buses."""
        with port.lock:
            gone = port.unplug()
        for fn in gone:
            with fn.lock:
                fn.detach()
            self.intx = [(f, g) for f, g in self.intx if f is not fn]
        return gone

    def _root_slot(self, port: RootPort) -> int:
        for _bus, dfn, fn, parent in self.root.walk():
            if fn is port:
                assert parent is None, "root ports sit on bus 0"
                return dfn >> 3
        raise ValueError(f"{port.name} is not on this machine")

    def detach(self) -> None:
        for _bus, _dfn, fn, _parent in self.root.walk():
            fn.detach()

    def tree(self) -> list[str]:
        """The hierarchy as ``pyhv domxml check`` prints it."""
        lines = []
        depths: dict[int, int] = {}          # id(bridge) -> depth; walk yields parents first
        for bus, dfn, fn, parent in self.root.walk():
            c = fn.config
            depth = 0 if parent is None else depths[id(parent)] + 1
            depths[id(fn)] = depth
            ident = f"{c.get(0, 2):04x}:{c.get(2, 2):04x} class {c.get(0x0A, 2):04x}"
            extra = []
            for index, bar in sorted(c.bars.items()):
                extra.append(f"BAR{index} {bar.kind} {c.bar_address(index):#x}+{bar.size:#x}")
            if isinstance(fn, PciBridge):
                extra.append(f"bus {fn.secondary}-{fn.subordinate}")
            gsi = next((g for f, g in self.intx if f is fn), None)
            if gsi is not None:
                extra.append(f"INT{'ABCD'[c.get(0x3D, 1) - 1]} GSI {gsi}")
            lines.append(f"{'  ' * depth}{bdf_text(bus, dfn)} {fn.name} ({ident})"
                         + (f": {', '.join(extra)}" if extra else ""))
        return lines


def virtio_devices(cfg: VmConfig, open_files: bool = True,
                   host: Optional[HostResources] = None
                   ) -> list[tuple[str, PciAddress, VirtioDevice]]:
    """(id, address, device model) of every virtio device the engine builds, from a
    placed config (those support.py lists as not built are not here).  Without
    ``open_files`` (a description only) no disk image is opened.  Virtio consoles
    and channels get their host ends, NICs their taps, from ``host`` (without it: a
    description, none opened)."""
    # each device's module is imported only when the config has one (start-up time:
    # the 9P protocol module alone costs ~20 ms)
    out: list[tuple[str, PciAddress, VirtioDevice]] = []
    for c in cfg.controllers:
        if c.type == "virtio-serial":
            from pyhv.engine.virtio.console import VirtioConsole, console_ports
            assert c.address is not None and c.id is not None, "place the config first"
            ports = console_ports(cfg, c.index, host.ports if host else {})
            out.append((c.id, c.address, VirtioConsole(ports, c.max_ports or 31)))
    for d in cfg.disks:
        assert d.address is not None and d.id is not None, "place the config first"
        out.append((d.id, d.address, disk_device(d, open_files, host)))
    for fs in cfg.filesystems:
        assert fs.address is not None and fs.id is not None, "place the config first"
        if fs.driver != "9p":
            continue  # virtio-fs: support.py refuses it
        from pyhv.engine.p9.server import Export
        from pyhv.engine.virtio.p9 import Virtio9p
        for tree in (fs.source, *fs.lower) if open_files else ():
            if not os.path.isdir(tree):
                raise EngineError(f"filesystem {fs.tag}: {tree} is not a directory")
        out.append((fs.id, fs.address, Virtio9p(Export(fs.source, fs.readonly,
                                                       fs.accessmode, fs.lower), fs.tag)))
    for n in cfg.nets:
        assert n.address is not None and n.id is not None, "place the config first"
        out.append((n.id, n.address, net_device(n, host)))
    for r in cfg.rngs:
        assert r.address is not None and r.id is not None, "place the config first"
        from pyhv.engine.virtio.rng import VirtioRng
        out.append((r.id, r.address, VirtioRng(r.source, r.rate_bytes, r.rate_period_ms)))
    b = cfg.balloon
    if b is not None:
        assert b.address is not None and b.id is not None, "place the config first"
        from pyhv.engine.virtio.balloon import VirtioBalloon
        # the statistics queue is always offered (as QEMU does), so that a period
        # set while the guest runs (virsh dommemstat --period) works
        balloon = VirtioBalloon(cfg.memory, b.stats_period, b.autodeflate,
                                b.free_page_reporting, stats_vq=True)
        if cfg.current_memory is not None:
            balloon.set_target(cfg.current_memory)
        out.append((b.id, b.address, balloon))
    return out


def disk_device(d: DiskConfig, open_files: bool = True,
                host: Optional[HostResources] = None) -> VirtioDevice:
    """A placed disk's device model: its image opened (unless ``open_files`` is off,
    for a description), or its vhost-user backend's connection from ``host``."""
    assert d.id is not None, "place the config first"
    if d.source_type == "vhostuser":
        from pyhv.engine.vhost_user.frontend import vhost_user_blk
        return vhost_user_blk(host.vhost_user.get(d.id) if host is not None else None,
                              d.queues, d.reconnect)
    from pyhv.engine.virtio.blk import VirtioBlk
    if open_files:
        return VirtioBlk.from_config(d, d.queues)
    return VirtioBlk(_Unopened(d.path, d.readonly), d.serial, d.queues)


def net_device(n: NetConfig, host: Optional[HostResources] = None) -> VirtioDevice:
    """A placed NIC's device model on its tap (or vhost-user backend) from ``host``
    (without one: a description, nothing opened)."""
    assert n.id is not None, "place the config first"
    from pyhv.engine.virtio.net import mac_bytes
    mac = mac_bytes(n.mac or _mac(n.id))
    if n.backend == "vhost-user":
        from pyhv.engine.vhost_user.frontend_net import VhostUserNet
        return VhostUserNet(host.vhost_user.get(n.id) if host is not None else None,
                            mac, n.queues, n.mtu, n.link_up, n.reconnect)
    from pyhv.engine.net.tap import Tap
    from pyhv.engine.virtio.net import VhostNet, VirtioNet
    tap = host.taps.get(n.id) if host is not None else None
    if tap is None:
        tap = Tap.unopened(n.ifname or "tap", n.queues)
    vhost = host.vhost_net.get(n.id) if host is not None else None
    if vhost is not None:  # the kernel's data path
        return VhostNet(tap, vhost, mac, len(tap.fds), n.mtu, n.link_up)
    return VirtioNet(tap, mac, n.queues, n.mtu, n.link_up)


def _mac(ident: str) -> str:
    """A NIC without a configured MAC: a stable locally administered one (QEMU's
    52:54:00 prefix) from its id, as QEMU derives one per NIC."""
    import zlib

    h = zlib.crc32(ident.encode())
    return f"52:54:00:{h >> 16 & 0xFF:02x}:{h >> 8 & 0xFF:02x}:{h & 0xFF:02x}"


class _Unopened:
    """A disk's place in a description (``pyhv domxml check``): the image is not
    opened, its size not known."""

    def __init__(self, path: str, readonly: bool) -> None:
        self.path, self.readonly = path, readonly
        self.size = 0
        self.can_unmap = False

    def _unopened(self) -> BlockError:
        return BlockError(f"{self.path}: not opened (a description only)")

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise self._unopened()

    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        raise self._unopened()

    def flush(self) -> None:
        raise self._unopened()

    def discard(self, offset: int, length: int) -> None:
        raise self._unopened()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        raise self._unopened()

    def resize(self, size: int) -> None:
        raise self._unopened()

    def close(self) -> None:
        return None


def _mark_multifunction(root: PciRoot) -> None:
    """Function 0 of a slot with other functions says so in its header type (only
    function 0, as QEMU does with libvirt's ``multifunction=on``)."""
    tables = [root.functions] + [fn.children for _b, _d, fn, _p in root.walk()
                                 if isinstance(fn, PciBridge)]
    for table in tables:
        for dfn, fn in table.items():
            if dfn & 7 == 0 and any(d >> 3 == dfn >> 3 and d & 7 for d in table):
                fn.config.set8(0x0E, fn.config.get(0x0E, 1) | 0x80)


def _bridge_order(controllers: Sequence[ControllerConfig]) -> list[int]:
    """The PCI controllers' indexes, each after the controller whose bus it is on."""
    pci = {c.index: c for c in controllers if c.type == "pci"}
    parent_bus = {i: (c.address.bus if c.address is not None else 0) for i, c in pci.items()}
    order: list[int] = []
    pending = sorted(pci)
    while pending:
        ready = [i for i in pending if parent_bus[i] in (0, *order)]
        if not ready:
            raise ValueError(f"PCI controllers {pending} hang below one another in a loop")
        order += ready
        pending = [i for i in pending if i not in ready]
    return order


def bridge_specs(controllers: Sequence[ControllerConfig]) -> list[BridgeSpec]:
    """The PCI bridges and root ports of a placed config, each after its parent."""
    pci = {c.index: c for c in controllers if c.type == "pci"}
    order = _bridge_order(controllers)
    specs = []
    for i in order:
        c = pci[i]
        addr = c.address
        if addr is None:
            raise ValueError(f"{c.label} has no address: place the config first")
        parent = order.index(addr.bus) if addr.bus else None
        specs.append(BridgeSpec(c.model, PciSlot(addr.slot, addr.function, parent),
                                c.id or f"pci.{c.index}", port=c.port or 0,
                                chassis=c.chassis or 0, hotplug=c.hotplug))
    return specs


#: libvirt's USB controller models -> QEMU's device names (what pyhv builds)
USB_QEMU_NAMES = {"piix3-uhci": "piix3-usb-uhci", "ich9-ehci1": "ich9-usb-ehci1",
                  "ich9-uhci1": "ich9-usb-uhci1", "ich9-uhci2": "ich9-usb-uhci2",
                  "ich9-uhci3": "ich9-usb-uhci3", "qemu-xhci": "qemu-xhci"}


def pci_from_config(cfg: VmConfig, memory: Optional[GuestMemory] = None,
                    on_reset: Optional[Callable[[], None]] = None,
                    host: Optional[HostResources] = None) -> PciPlatform:
    """The PCI platform of a (placed) config: chipset, bridges and root ports, USB
    host controllers.  ``memory`` is what the controllers DMA into (``None``: a
    description only, as ``pyhv domxml check`` prints it); ``host`` what the machine
    ends of virtio consoles and channels by (controller index, port)."""
    from pyhv.placement import place

    cfg = place(cfg)
    family = machine_family(cfg.machine) or "pc"
    bridges = bridge_specs(cfg.controllers)
    mem = memory if memory is not None else GuestMemory.from_bytearrays([(0, 4096)])
    endpoints: list[tuple[PciSlot, PciFunction]] = []
    bridge_pos = {index: i for i, index in enumerate(_bridge_order(cfg.controllers))}
    for c in cfg.controllers:
        if c.type != "usb" or c.address is None:
            continue
        from pyhv.engine.devices.usb import usb_controller
        a = c.address
        express = family == "q35" and a.bus != 0
        name = c.id or c.model
        if c.master_port is not None:  # a companion shares its EHCI's index and alias
            name = f"{name}-companion{c.master_port}"
        fn = usb_controller(USB_QEMU_NAMES[c.model], mem, name, express=express)
        parent = bridge_pos[a.bus] if a.bus else None
        endpoints.append((PciSlot(a.slot, a.function, parent), fn))
    for ident, addr, device in virtio_devices(cfg, open_files=memory is not None,
                                              host=host):
        express = family == "q35" and addr.bus != 0
        from pyhv.engine.virtio.pci import VirtioPciFunction
        vfn = VirtioPciFunction(device, mem, ident, express=express,
                                notify=memory is not None)
        endpoints.append((PciSlot(addr.slot, addr.function,
                                  bridge_pos[addr.bus] if addr.bus else None), vfn))
    return build_pci(family, cfg.memory, bridges, endpoints, on_reset)


def build_pci(family: str, ram_size: int, bridges: Sequence[BridgeSpec] = (),
              endpoints: Sequence[tuple[PciSlot, PciFunction]] = (),
              on_reset: Optional[Callable[[], None]] = None) -> PciPlatform:
    """The chipset for ``family`` (``pc`` or ``q35``) plus ``bridges`` and
    ``endpoints`` (functions at their slots), with firmware resource assignment done."""
    root = PciRoot()
    if family == "q35":
        root.add(None, 0, 0, HostBridge(Q35_HOST, "q35 host bridge"))
        root.add(None, 0x1F, 0, IsaBridge(ICH9_LPC, "ICH9 LPC", multifunction=False,
                                          pm_base=layout.PM1A_EVT_PORT))
    else:
        root.add(None, 0, 0, HostBridge(I440FX_HOST, "i440FX host bridge"))
        root.add(None, 1, 0, IsaBridge(PIIX3_ISA, "PIIX3 ISA bridge", multifunction=False))
    built: list[PciBridge] = []
    for spec in bridges:
        b: PciBridge
        if spec.model == "pcie-root-port":
            b = pcie_root_port(spec.name, spec.port, 0, hotplug=spec.hotplug)
        elif spec.model == "pci-bridge":
            b = pci_bridge(spec.name, spec.chassis)
        else:
            raise ValueError(f"controller model {spec.model!r} is not a PCI bridge pyhv builds")
        parent = built[spec.at.parent] if spec.at.parent is not None else None
        root.add(parent, spec.at.slot, spec.at.function, b)
        built.append(b)
    for at, fn in endpoints:
        root.add(built[at.parent] if at.parent is not None else None, at.slot, at.function,
                 fn)
    _mark_multifunction(root)
    for port in built:
        if isinstance(port, RootPort) and port.hotplug:
            port.settle()  # cold-plugged cards: powered, the link up
    mmio64 = mmio64_window(ram_size)
    fw = PciFirmware(root,
                     AddressAllocator("PCI I/O", PCI_IO_START, PCI_IO_END),
                     AddressAllocator("PCI MMIO", layout.PCI_MMIO32_START,
                                      layout.PCI_MMIO32_END),
                     AddressAllocator("PCI 64-bit MMIO", *mmio64),
                     PCI_INTX_GSIS)
    fw.run()
    config_io = ConfigIo(root, on_reset)
    ecam = Ecam(root, layout.PCIE_ECAM_SIZE >> 20) if family == "q35" else None
    return PciPlatform(family, root, config_io, ecam, mmio64, built, fw.intx)
