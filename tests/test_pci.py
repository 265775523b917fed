"""PCI (pyhv/engine/pci): configuration space, BARs on the buses, routing through
bridges, port 0xCF8 and ECAM, the firmware's assignment, and the allocators."""

from __future__ import annotations

import pytest

from pyhv.engine import layout
from pyhv.engine.bus import Bus
from pyhv.engine.devices import RecordingLine
from pyhv.engine.pci.config import (
    BAR0,
    CMD_IO,
    CMD_MEMORY,
    COMMAND,
    STATUS,
    Bar,
    ConfigSpace,
)
from pyhv.engine.pci.device import PciBridge, PciBuses, PciFunction
from pyhv.engine.pci.platform import (
    PCI_INTX_GSIS,
    BridgeSpec,
    PciSlot,
    build_pci,
)
from pyhv.engine.pci.root import ConfigIo, Ecam, devfn
from pyhv.engine.resources import AddressAllocator, ResourceError


class Dev(PciFunction):
    """An endpoint with BARs whose registers echo which BAR was hit."""

    kind = "test-device"

    def __init__(self, *bars: Bar, pin: int = 1, name: str = "dev") -> None:
        super().__init__(ConfigSpace(0x1234, 0x5678, 0xFF0000, interrupt_pin=pin,
                                     bars=bars), name)
        self.log: list[tuple] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        self.log.append(("read", index, offset))
        return 0xB0 + index

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.log.append(("write", index, offset, value))


# ---- configuration space ------------------------------------------------------

def test_read_only_fields_and_write_one_to_clear() -> None:
    c = ConfigSpace(0x8086, 0x1237, 0x060000)
    c.write(0, 4, 0xFFFFFFFF)
    assert c.read(0, 4) == 0x12378086
    c.set16(STATUS, 0x8000 | 0x10)  # a detected parity error, and the capability bit
    c.write(STATUS, 2, 0x8000)
    assert c.read(STATUS, 2) == 0x10
    c.write(COMMAND, 2, 0xFFFF)
    assert c.read(COMMAND, 2) == 0x0547
    assert c.read(0x3C, 1) == 0 and c.write(0x3C, 1, 11) == [] and c.read(0x3C, 1) == 11
    assert c.read(0xFF, 1) == 0 and c.read(0x100, 4) == 0xFFFFFFFF  # beyond 256 bytes


@pytest.mark.parametrize("bar,low_flags", [(Bar(0, 0x1000), 0x0),
                                           (Bar(0, 0x40, "io"), 0x1),
                                           (Bar(0, 0x4000, "mem32", True), 0x8)])
def test_bar_sizing(bar: Bar, low_flags: int) -> None:
    c = ConfigSpace(1, 2, 3, bars=(bar,))
    assert c.read(BAR0, 4) == low_flags
    assert c.write(BAR0, 4, 0xFFFFFFFF) == [0]
    mask = (~(bar.size - 1)) & (0xFFFC if bar.kind == "io" else 0xFFFFFFF0)
    if bar.kind == "io":
        mask |= 0xFFFF0000
    assert c.read(BAR0, 4) == mask | low_flags
    c.write(BAR0, 4, 0x12345678)
    assert c.bar_address(0) == 0x12345678 & ~(bar.size - 1) & 0xFFFFFFFF


def test_64bit_bar_spans_two_registers() -> None:
    c = ConfigSpace(1, 2, 3, bars=(Bar(2, 1 << 33, "mem64", True),))
    assert c.read(BAR0 + 8, 4) == 0xC
    c.write(BAR0 + 8, 4, 0xFFFFFFFF)
    c.write(BAR0 + 12, 4, 0xFFFFFFFF)
    assert c.read(BAR0 + 8, 4) == 0x0000000C      # size ≥ 4 GiB: the low half is all flags
    assert c.read(BAR0 + 12, 4) == 0xFFFFFFFE     # 8 GiB
    c.set_bar_address(2, 0x40_0000_0000)
    assert c.bar_address(2) == 0x40_0000_0000 and c.read(BAR0 + 12, 4) == 0x40
    with pytest.raises(ValueError):
        c.set_bar_address(2, 0x40_0000_1000)
    with pytest.raises(ValueError):
        ConfigSpace(1, 2, 3, bars=(Bar(2, 1 << 20, "mem64"), Bar(3, 0x1000)))
    with pytest.raises(ValueError):
        Bar(0, 0x1800)


def test_capability_lists() -> None:
    c = ConfigSpace(1, 2, 3, pcie=True)
    assert c.capabilities() == []
    a = c.add_capability(0x01, b"\x03\x00\x08\x00")
    b = c.add_capability(0x10, bytes(58))
    assert c.capabilities() == [(a, 0x01), (b, 0x10)]
    assert c.read(STATUS, 2) & 0x10 and c.read(0x34, 1) == a == 0x40
    e1 = c.add_ext_capability(0x0001, 2, bytes(0x3C))
    e2 = c.add_ext_capability(0x000D, 1, bytes(4))
    assert e1 == 0x100 and c.read(e1, 4) >> 20 == e2 and c.read(e2, 4) & 0xFFFF == 0x0D
    assert ConfigSpace(1, 2, 3).read(0x100, 4) == 0xFFFFFFFF


# ---- BARs on the buses -----------------------------------------------------------

def test_bars_follow_the_guest() -> None:
    pio, mmio = Bus("pio"), Bus("mmio")
    d = Dev(Bar(0, 0x100, "io"), Bar(1, 0x1000), Bar(2, 0x4000, "mem64", True))
    d.config.set_bar_address(0, 0xC000)
    d.config.set_bar_address(1, 0xC000_0000)
    d.config.set_bar_address(2, 0x10_0000_0000)
    d.attach(PciBuses(pio, mmio))
    assert mmio.devices() == [] and pio.devices() == []  # decoding is off
    d.config_write(COMMAND, 2, CMD_IO | CMD_MEMORY)
    assert pio.read(0xC010, 4) == 0xB0 and mmio.read(0xC000_0004, 4) == 0xB1
    assert mmio.read(0x10_0000_0008, 4) == 0xB2
    assert d.log == [("read", 0, 0x10), ("read", 1, 4), ("read", 2, 8)]
    # the guest moves BAR1: the device answers at the new address only
    d.config_write(BAR0 + 4, 4, 0xC010_0000)
    assert mmio.read(0xC000_0004, 4) == 0xFFFFFFFF and mmio.read(0xC010_0004, 4) == 0xB1
    # sizing while decoding: all-ones is not an address, nothing answers meanwhile
    d.config_write(BAR0 + 4, 4, 0xFFFFFFFF)
    assert d.mapped[1] is None
    d.config_write(BAR0 + 4, 4, 0xC020_0000)
    assert mmio.read(0xC020_0000, 4) == 0xB1
    # memory decoding off: the memory BARs go, the I/O BAR stays
    d.config_write(COMMAND, 2, CMD_IO)
    assert mmio.devices() == [] and pio.read(0xC000, 1) == 0xB0
    # a BAR put over another device is not decoded (no crash, nothing misrouted)
    mmio.insert(0xD000_0000, 0x1000, Dev(), "other")
    d.config_write(COMMAND, 2, CMD_IO | CMD_MEMORY)
    d.config_write(BAR0 + 4, 4, 0xD000_0000)
    assert d.mapped[1] is None and mmio.find(0xD000_0000).name == "other"
    d.reset()
    assert d.config.command == 0 and d.mapped == {0: None, 1: None, 2: None}
    assert pio.devices() == []


# ---- routing configuration cycles ---------------------------------------------------

def _two_level_pc():
    """pc with a pci-bridge at 00:03.0, another at 01:05.0 behind it, devices below."""
    plat = build_pci("pc", 256 << 20, [
        BridgeSpec("pci-bridge", PciSlot(3), "pci.1", chassis=1),
        BridgeSpec("pci-bridge", PciSlot(5, parent=0), "pci.2", chassis=2),
    ])
    return plat


def test_routing_through_bridges_follows_the_guests_numbering() -> None:
    plat = _two_level_pc()
    root = plat.root
    outer, inner = plat.bridges
    assert (outer.secondary, outer.subordinate) == (1, 2)
    assert (inner.secondary, inner.subordinate) == (2, 2)
    assert root.lookup(0, devfn(3, 0)) is outer and root.lookup(1, devfn(5, 0)) is inner
    dev = Dev(name="leaf")
    root.add(inner, 7, 0, dev)
    assert root.config_read(2, devfn(7, 0), 0, 4) == 0x56781234
    assert root.config_read(3, devfn(7, 0), 0, 4) == 0xFFFFFFFF
    # the guest renumbers: the leaf is on bus 9 now, and nowhere else
    root.config_write(0, devfn(3, 0), 0x19, 1, 8)
    root.config_write(0, devfn(3, 0), 0x1A, 1, 9)
    root.config_write(8, devfn(5, 0), 0x19, 1, 9)
    root.config_write(8, devfn(5, 0), 0x1A, 1, 9)
    assert root.config_read(9, devfn(7, 0), 2, 2) == 0x5678
    assert root.lookup(2, devfn(7, 0)) is None
    # a function 1 without a function 0 is invisible, as on real hardware
    root.add(None, 9, 1, Dev(name="orphan"))
    assert root.config_read(0, devfn(9, 1), 0, 2) == 0xFFFF


def test_config_mechanism_one_and_reset_control() -> None:
    resets: list[int] = []
    plat = build_pci("pc", 256 << 20, on_reset=lambda: resets.append(1))
    io = ConfigIo(plat.root, lambda: resets.append(1))
    io.write(0, 4, 0x8000_0000)                         # 00:00.0, register 0
    assert io.read(0, 4) == 0x8000_0000
    assert io.read(4, 4) == 0x12378086                  # i440FX
    io.write(0, 4, 0x8000_0800)                         # 00:01.0
    assert io.read(6, 2) == 0x7000 and io.read(4, 1) == 0x86
    io.write(0, 4, 0x8000_0808)                         # 00:01.0 register 8: class
    assert io.read(4, 4) >> 8 == 0x060100
    io.write(0, 4, 0x0000_0000)                         # enable bit clear: nothing
    assert io.read(4, 4) == 0xFFFFFFFF
    io.write(1, 1, 0x02)
    assert resets == []
    io.write(1, 1, 0x06)                                # what Linux's reboot=pci writes
    assert resets == [1]


def test_ecam_on_q35() -> None:
    plat = build_pci("q35", 256 << 20)
    assert plat.ecam is not None and plat.express
    e = plat.ecam
    assert e.read(0, 4) == 0x29C08086                   # Q35 MCH at 00:00.0
    assert e.read(devfn(0x1F, 0) << 12, 4) == 0x29188086  # ICH9 LPC at 00:1f.0
    assert e.read((devfn(0x1F, 0) << 12) + 0x40, 4) == layout.PM1A_EVT_PORT | 1
    assert e.read(1 << 20, 4) == 0xFFFFFFFF             # bus 1: nobody
    assert e.read(0xFFE, 4) == 0xFFFFFFFF               # crosses the function's 4 KiB
    assert build_pci("pc", 256 << 20).ecam is None


# ---- firmware ------------------------------------------------------------------------

def virt_install_q35() -> list[BridgeSpec]:
    """The 14 pcie-root-ports libvirt lays out for virt-install's q35 domains:
    00:02.0-00:02.7 (multifunction) and 00:03.0-00:03.5."""
    specs = []
    for i in range(14):
        slot, fn = (2, i) if i < 8 else (3, i - 8)
        specs.append(BridgeSpec("pcie-root-port", PciSlot(slot, fn), f"pci.{i + 1}",
                                port=0x10 + i, chassis=i + 1))
    return specs


def test_q35_root_ports_get_buses_windows_and_interrupts() -> None:
    plat = build_pci("q35", 2 << 30, virt_install_q35())
    ports = plat.bridges
    assert [(p.secondary, p.subordinate) for p in ports] == [(i, i) for i in range(1, 15)]
    windows = []
    for p in ports:
        c = p.config
        mem = (c.get(0x20, 2) << 16, (c.get(0x22, 2) << 16) | 0xFFFFF)
        pref = ((c.get(0x24, 2) & 0xFFF0) << 16 | c.get(0x28, 4) << 32,
                ((c.get(0x26, 2) & 0xFFF0) << 16 | 0xFFFFF) | c.get(0x2C, 4) << 32)
        assert layout.PCI_MMIO32_START <= mem[0] < mem[1] < layout.PCI_MMIO32_END
        assert plat.mmio64[0] <= pref[0] < pref[1] < plat.mmio64[1]
        assert c.get(0x1C, 1) > c.get(0x1D, 1)  # no I/O behind it: the window is closed
        windows += [mem, pref]
        assert c.command & 0x7 == 0x7
    windows.sort()
    assert all(a[1] < b[0] for a, b in zip(windows, windows[1:]))
    # INTA of the root port at slot s, function f: GSI (s + 0) % 8 + 16, one per slot
    for p in ports:
        bus, dfn = next((b, d) for b, d, f, _ in plat.root.walk() if f is p)
        assert dict((id(f), g) for f, g in plat.intx)[id(p)] == \
            PCI_INTX_GSIS[(dfn >> 3) % len(PCI_INTX_GSIS)]
    # multifunction: the header type says so on slot 2's functions
    assert [p.config.get(0x0E, 1) for p in (ports[0], ports[1], ports[8], ports[13])] == [
        0x81, 0x01, 0x81, 0x01]  # only function 0 of a slot, as QEMU does
    lines = plat.tree()
    assert lines[0].startswith("00:00.0 q35 host bridge (8086:29c0")
    assert any(line.startswith("00:02.7 pci.8 (1b36:000c class 0604): bus 8-8") for line in lines)
    assert lines[-1].startswith("00:1f.0 ICH9 LPC")


def test_bars_and_windows_behind_nested_bridges() -> None:
    """BARs behind two bridges get addresses inside both windows, aligned; the INTx
    swizzle is the PCI-to-PCI bridge specification's."""
    from pyhv.engine.pci.device import pci_bridge
    from pyhv.engine.pci.firmware import PciFirmware
    from pyhv.engine.pci.root import PciRoot

    root = PciRoot()
    outer, inner = pci_bridge("pci.1", 1), pci_bridge("pci.2", 2)
    root.add(None, 3, 0, outer)
    root.add(outer, 5, 0, inner)
    big = Dev(Bar(0, 16 << 20), Bar(1, 0x100, "io"), Bar(2, 1 << 30, "mem64", True), pin=2)
    small = Dev(Bar(0, 0x1000), pin=1)
    root.add(inner, 7, 0, big)
    root.add(outer, 2, 0, small)
    fw = PciFirmware(root, AddressAllocator("io", 0xC000, 0x10000),
                     AddressAllocator("mem", 0xC000_0000, 0xE000_0000),
                     AddressAllocator("mem64", 1 << 36, (1 << 36) + (32 << 30)), PCI_INTX_GSIS)
    fw.run()
    b0 = big.config.bar_address(0)
    assert b0 % (16 << 20) == 0 and 0xC000_0000 <= b0
    for br in (outer, inner):
        c = br.config
        mem_lo, mem_hi = c.get(0x20, 2) << 16, (c.get(0x22, 2) << 16) | 0xFFFFF
        assert mem_lo <= b0 and b0 + (16 << 20) - 1 <= mem_hi
        io_lo, io_hi = (c.get(0x1C, 1) & 0xF0) << 8, ((c.get(0x1D, 1) & 0xF0) << 8) | 0xFFF
        assert io_lo <= big.config.bar_address(1) <= io_hi
        pref_lo = (c.get(0x24, 2) & 0xFFF0) << 16 | c.get(0x28, 4) << 32
        assert pref_lo <= big.config.bar_address(2) and big.config.bar_address(2) % (1 << 30) == 0
    s0 = small.config.bar_address(0)
    assert not (b0 <= s0 < b0 + (16 << 20))
    gsi = dict((id(f), g) for f, g in fw.intx)
    # big: INTB at 07 behind 05 behind 03: pin (1 + 7 + 5) % 4 = 1 at root slot 3
    assert gsi[id(big)] == PCI_INTX_GSIS[(3 + (1 + 7 + 5) % 4) % 8]
    assert gsi[id(small)] == PCI_INTX_GSIS[(3 + (0 + 2) % 4) % 8]
    assert gsi[id(outer)] == PCI_INTX_GSIS[3]


def test_platform_attach_maps_config_access_and_wires_intx() -> None:
    plat = build_pci("q35", 256 << 20, virt_install_q35()[:2])
    pio, mmio = Bus("pio"), Bus("mmio")
    lines: dict[int, RecordingLine] = {}
    plat.attach(pio, mmio, lambda gsi: lines.setdefault(gsi, RecordingLine()))
    pio.write(0xCF8, 4, 0x8000_1000)                   # 00:02.0
    assert pio.read(0xCFC, 2) == 0x1B36
    assert mmio.read(layout.PCIE_ECAM_START + (devfn(2, 1) << 12) + 2, 2) == 0x000C
    assert plat.bridges[0].config.get(0x3C, 1) == 18 and set(lines) == {18}
    assert isinstance(plat.bridges[0], PciBridge)


def test_pci_firmware_error_when_space_runs_out() -> None:
    from pyhv.engine.pci.firmware import PciFirmware, PciFirmwareError
    from pyhv.engine.pci.root import PciRoot

    root = PciRoot()
    root.add(None, 3, 0, Dev(Bar(0, 1 << 30)))
    fw = PciFirmware(root, AddressAllocator("io", 0xC000, 0x10000),
                     AddressAllocator("mem", 0xC000_0000, 0xE000_0000),
                     AddressAllocator("mem64", 1 << 36, (1 << 36) + (1 << 30)), PCI_INTX_GSIS)
    with pytest.raises(PciFirmwareError, match="mem space"):
        fw.run()


# ---- allocators ---------------------------------------------------------------------

def test_address_allocator() -> None:
    a = AddressAllocator("mmio", 0x1000, 0x10000)
    assert a.allocate(0x100, 0x1000) == 0x1000
    assert a.allocate(0x10) == 0x1100
    a.reserve(0x4000, 0x1000)
    assert a.allocate(0x3000, 0x1000) == 0x5000
    assert a.allocate(0x1000, 0x1000) == 0x2000
    with pytest.raises(ResourceError, match="overlaps"):
        a.reserve(0x4800, 0x10)
    with pytest.raises(ResourceError, match="no room"):
        a.allocate(0x10000)
    a.free(0x5000)
    assert a.allocate(0x3000, 0x1000) == 0x5000
    with pytest.raises(ResourceError):
        a.free(0x9999)
    with pytest.raises(ResourceError):
        a.allocate(0x100, 3)


def test_ecam_class_directly() -> None:
    plat = build_pci("pc", 64 << 20)
    e = Ecam(plat.root, 1)
    assert e.size == 1 << 20 and e.read(0, 2) == 0x8086


# ---- MSI-X ---------------------------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.routes: list[tuple] = []
        self.fired: list[int] = []

    def route(self, vector: int, address, data: int) -> None:
        self.routes.append((vector, address, data))

    def fire(self, vector: int) -> None:
        self.fired.append(vector)


def _msix(size: int = 4):
    from pyhv.engine.pci.msix import Msix

    c = ConfigSpace(0x1AF4, 0x1041, 0x020000, bars=(Bar(1, 0x1000),))
    m = Msix(c, size, bar=1, table_offset=0, pba_offset=0x800)
    sink = Sink()
    m.attach(sink)
    return c, m, sink


def test_msix_capability_and_enable() -> None:
    c, m, sink = _msix()
    (cap_off, cap_id), = c.capabilities()
    assert cap_id == 0x11 and cap_off == m.cap
    assert c.read(m.cap + 2, 2) == 3                      # table size - 1, disabled
    assert c.read(m.cap + 4, 4) == 0x0001 and c.read(m.cap + 8, 4) == 0x801  # BIR 1
    c.write(m.cap + 2, 2, 0xFFFF)
    assert c.read(m.cap + 2, 2) == 0xC003                 # only enable and mask change
    assert m.read(12, 4) == 1                             # vectors start masked
    assert sink.routes == [] and sink.fired == []


def test_msix_vectors_route_fire_and_pend_while_masked() -> None:
    c, m, sink = _msix()
    c.write(m.cap + 2, 2, 0x8000)
    m.config_written()
    m.write(16, 8, 0xFEE0_1000)            # vector 1: address (64-bit write)
    m.write(24, 4, 0x41)                   # data
    assert sink.routes == []               # still masked
    m.notify(1)
    assert sink.fired == [] and m.read(0x800, 8) == 0b10   # pending bit
    m.write(28, 4, 0)                      # unmask: routed, and the pending one fires
    assert sink.routes == [(1, 0xFEE0_1000, 0x41)] and sink.fired == [1]
    assert m.read(0x800, 4) == 0
    m.notify(1)
    assert sink.fired == [1, 1]
    c.write(m.cap + 2, 2, 0xC000)          # function mask: vectors unrouted, pending
    m.config_written()
    assert sink.routes[-1] == (1, None, 0)
    m.notify(1)
    assert sink.fired == [1, 1] and m.read(0x800, 4) == 0b10
    c.write(m.cap + 2, 2, 0x8000)
    m.config_written()
    assert sink.fired == [1, 1, 1] and sink.routes[-1] == (1, 0xFEE0_1000, 0x41)
    m.notify(7)                            # beyond the table: dropped
    m.write(0x800, 4, 0xFFFF)              # the PBA is read-only
    assert m.read(0x800, 4) == 0 and sink.fired == [1, 1, 1]
    c.write(m.cap + 2, 2, 0)               # disabled: nothing is delivered or pended
    m.config_written()
    m.notify(1)
    assert sink.fired == [1, 1, 1] and m.read(0x800, 4) == 0
    m.reset()
    assert m.read(28, 4) == 1 and not m.enabled


def test_usb_controllers_from_a_config() -> None:
    """EHCI and its companions share index 0 (and libvirt's alias): their functions
    still get distinct names; 00:1d.0 says the slot is multifunction."""
    from pyhv.config import ControllerConfig, KernelBoot, VmConfig
    from pyhv.engine.pci.platform import pci_from_config

    usb = (ControllerConfig("usb", "ich9-ehci1", id="usb"),) + tuple(
        ControllerConfig("usb", f"ich9-uhci{i}", id="usb", master_port=2 * (i - 1))
        for i in (1, 2, 3))
    plat = pci_from_config(VmConfig(KernelBoot("/k"), machine="q35", controllers=usb))
    found = {dfn: fn for bus, dfn, fn, _ in plat.root.walk() if bus == 0}
    names = [fn.name for fn in found.values()]
    assert len(names) == len(set(names))
    assert found[devfn(0x1D, 7)].config.get(0, 4) == 0x293A8086
    assert found[devfn(0x1D, 0)].config.get(0x0E, 1) == 0x80
    assert found[devfn(0x1D, 1)].config.get(0x0E, 1) == 0x00
    assert {fn.name for fn, _gsi in plat.intx} >= {"usb", "usb-companion0"}
