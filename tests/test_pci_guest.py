"""Tier kvm: the test guest enumerates PCI as an OS does (``pyhv.pci``: ECAM from the
MCFG, else port 0xCF8; bus 0 and, through every bridge, the secondary buses as
programmed; BARs sized; windows and capabilities read) under pyhv's engine, and
every function it reports is one pyhv built, with the same registers.  The tree
also has to look as a PC firmware leaves it: buses numbered depth first, each
bridge's windows inside its parent's, nothing overlapping, INTx lines swizzled.

Tier qemu: the same guest on QEMU's q35 with the same 14 root ports, SeaBIOS
doing the firmware part, finds a tree of the same shape.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from guests.report import PciBar, PciFunction, Report, Window, parse_report

from pyhv.config import ControllerConfig, KernelBoot, PciAddress, SerialConfig, VmConfig
from pyhv.engine import layout
from pyhv.engine.machine import Machine, MachineEvent
from pyhv.engine.pci.config import ConfigSpace
from pyhv.engine.pci.device import PciFunction as PyhvFunction
from pyhv.engine.pci.platform import PCI_INTX_GSIS, PCI_IO_END, PCI_IO_START, PciPlatform
from pyhv.engine.pci.root import bdf_text

pytestmark = pytest.mark.kvm

MiB = 1 << 20
CMDLINE = "console=ttyS0 pyhv.pci"
ROOT_PORT_ID = (0x1B36, 0x000C)


def pci_bridge(index: int, bus: int, slot: int, chassis: int) -> ControllerConfig:
    return ControllerConfig("pci", "pci-bridge", index, address=PciAddress(bus, slot, 0),
                            chassis=chassis)


def root_ports(count: int = 14) -> tuple[ControllerConfig, ...]:
    """virt-install's default q35 layout: index i+1 at 00:02.0-00:02.7 (function 0
    multifunction), then 00:03.0 on; port 0x10+i, chassis i+1."""
    return tuple(
        ControllerConfig("pci", "pcie-root-port", i + 1,
                         address=PciAddress(0, 2 + i // 8, i % 8, multifunction=i % 8 == 0),
                         port=0x10 + i, chassis=i + 1)
        for i in range(count))


MACHINES = {
    "pc": ("pc", ()),
    # a pci-bridge on the root bus and a second one behind it, at bus 1 slot 3
    "pc-bridges": ("pc", (pci_bridge(1, 0, 5, 1), pci_bridge(2, 1, 3, 2))),
    "q35-root-ports": ("q35", root_ports()),
}


# ---- reading pyhv's side ----------------------------------------------------------------

def _windows(c: ConfigSpace) -> dict[str, Window]:
    """A bridge's windows decoded from its registers (None: closed)."""
    def window(base: int, limit: int) -> Window:
        return None if base > limit else (base, limit)

    io_base = (c.get(0x1C, 1) & 0xF0) << 8
    io_limit = (c.get(0x1D, 1) & 0xF0) << 8 | 0xFFF
    if c.get(0x1C, 1) & 0xF == 1:
        io_base |= c.get(0x30, 2) << 16
        io_limit |= c.get(0x32, 2) << 16
    mem = window((c.get(0x20, 2) & 0xFFF0) << 16, (c.get(0x22, 2) & 0xFFF0) << 16 | 0xFFFFF)
    pref_base = (c.get(0x24, 2) & 0xFFF0) << 16
    pref_limit = (c.get(0x26, 2) & 0xFFF0) << 16 | 0xFFFFF
    if c.get(0x24, 2) & 0xF == 1:
        pref_base |= c.get(0x28, 4) << 32
        pref_limit |= c.get(0x2C, 4) << 32
    return {"io": window(io_base, io_limit), "mem": mem, "pref": window(pref_base, pref_limit)}


def built_function(bus: int, dfn: int, fn: PyhvFunction) -> PciFunction:
    """What the guest should report for ``fn``: its ConfigSpace, as the guest's record."""
    c = fn.config
    bars = {}
    for index, bar in c.bars.items():
        value = c.get(0x10 + 4 * index, 4)
        if bar.kind == "mem64":
            value |= c.get(0x14 + 4 * index, 4) << 32
        bars[index] = PciBar(index, value, bar.size)
    out = PciFunction(bus=bus, slot=dfn >> 3, function=dfn & 7, vendor=c.get(0x00, 2),
                      device=c.get(0x02, 2), class_code=c.get(0x09, 3),
                      header_type=c.get(0x0E, 1), pin=c.get(0x3D, 1), line=c.get(0x3C, 1),
                      command=c.command, bars=bars,
                      caps=[cap_id for _off, cap_id in c.capabilities()])
    if c.get(0x0E, 1) & 0x7F == 1:
        out.primary, out.secondary, out.subordinate = (c.get(0x18, 1), c.get(0x19, 1),
                                                       c.get(0x1A, 1))
        out.windows = _windows(c)
    return out


@dataclass
class PyhvRun:
    event: MachineEvent
    output: str
    report: Report
    pci: PciPlatform
    #: (bus, devfn, function kind, record) of what pyhv built, in walk() order
    built: list[tuple[int, int, str, PciFunction]]
    #: every function's configuration space before the guest ran and after
    before: dict[str, bytes]
    after: dict[str, bytes]
    seconds: float


def run_pyhv(kernel: Path, out: Path, machine: str,
             controllers: tuple[ControllerConfig, ...], cmdline: str = CMDLINE) -> PyhvRun:
    cfg = VmConfig(KernelBoot(str(kernel), cmdline=cmdline), memory=64 * MiB, vcpus=1,
                   serial=SerialConfig("file", str(out)), machine=machine,
                   controllers=controllers)
    m = Machine(cfg)
    start = time.monotonic()
    try:
        m.start(paused=True)
        assert m.platform is not None and m.platform.pci is not None
        pci = m.platform.pci
        walk = list(pci.root.walk())
        built = [(bus, dfn, fn.kind, built_function(bus, dfn, fn))
                 for bus, dfn, fn, _parent in walk]
        before = {bdf_text(bus, dfn): bytes(fn.config.data) for bus, dfn, fn, _p in walk}
        m.resume()
        event = m.run(timeout=60)
    finally:
        m.close()
    seconds = time.monotonic() - start
    after = {bdf_text(bus, dfn): bytes(fn.config.data) for bus, dfn, fn, _p in walk}
    text = out.read_text(errors="replace")
    return PyhvRun(event, text, parse_report(text), pci, built, before, after, seconds)


def changed_registers(run: PyhvRun) -> list[str]:
    """``bdf offset: before -> after`` of every configuration byte that changed."""
    return [f"{bdf} {off:#05x}: {old:#04x} -> {new:#04x}"
            for bdf, data in run.before.items()
            for off, (old, new) in enumerate(zip(data, run.after[bdf])) if old != new]


def assert_clean(r: Report, output: str) -> None:
    assert r.complete, output[-3000:]
    assert not r.errors and not r.exceptions, (r.errors, r.exceptions)
    assert r.pci_config and r.pci_end, "no @pci-config / @pci-end: pyhv.pci not honoured"
    assert r.pci_end["functions"] == len(r.pci)


# ---- firmware invariants, from the guest's view -------------------------------------------

Range = tuple[int, int]  # inclusive


def _inside(r: Range, outer: Range) -> bool:
    return outer[0] <= r[0] and r[1] <= outer[1]


def _bar_range(bar: PciBar) -> Range:
    return bar.address, bar.address + bar.size - 1


def parents(fns: list[PciFunction]) -> dict[str, Optional[PciFunction]]:
    """The bridge each function sits behind (None: bus 0)."""
    by_secondary = {f.secondary: f for f in fns if f.is_bridge}
    out: dict[str, Optional[PciFunction]] = {}
    for f in fns:
        if f.bus == 0:
            out[f.bdf] = None
        else:
            assert f.bus in by_secondary, f"{f.bdf}: no bridge has secondary bus {f.bus}"
            out[f.bdf] = by_secondary[f.bus]
    return out


def check_firmware_invariants(fns: list[PciFunction],
                              apertures: Optional[dict[str, list[Range]]] = None) -> None:
    """Buses numbered depth first (in the order found), every subordinate covering
    what is below, windows and BARs inside the parent's windows (the root's
    ``apertures`` on bus 0, when known), nothing on one bus overlapping."""
    up = parents(fns)

    def ancestors(f: PciFunction) -> list[PciFunction]:
        out = []
        p = up[f.bdf]
        while p is not None:
            out.append(p)
            p = up[p.bdf]
        return out

    bridges = [f for f in fns if f.is_bridge]
    # depth-first numbering: the n-th bridge found (preorder) has secondary bus n
    for n, b in enumerate(bridges, start=1):
        assert b.primary == b.bus, f"{b.bdf}: primary bus {b.primary}, sits on {b.bus}"
        assert b.secondary == n, f"{b.bdf}: secondary {b.secondary}, depth-first gives {n}"
    for b in bridges:
        assert b.secondary is not None and b.subordinate is not None
        below = [c.secondary for c in bridges if b in ancestors(c)]
        assert b.subordinate == max([b.secondary, *below]), \
            f"{b.bdf}: subordinate {b.subordinate}, buses below reach {max([0, *below])}"
    for f in fns:
        for a in ancestors(f):
            assert a.secondary <= f.bus <= a.subordinate, f"{f.bdf} outside {a.bdf}'s buses"
            if f.is_bridge:
                assert a.secondary < f.secondary <= f.subordinate <= a.subordinate

    def allowed(f: PciFunction, kind: str) -> Optional[list[Range]]:
        """Where something of ``kind`` on f's bus may lie (None: not known)."""
        p = up[f.bdf]
        if p is None:
            return None if apertures is None else apertures[kind]
        room = [w for w in (p.windows.get(kind),) if w is not None]
        if kind == "pref" and p.windows.get("pref") is None and p.windows.get("mem"):
            room = [p.windows["mem"]]  # forwarded through the memory window then
        return room

    ranges: dict[tuple[int, str], list[tuple[Range, str]]] = {}
    for f in fns:
        items: list[tuple[str, Range, str]] = []
        for kind, w in f.windows.items():
            if w is not None:
                items.append((kind, w, f"{f.bdf} {kind} window"))
        for bar in f.bars.values():
            if bar.address:  # 0: not assigned
                kind = "io" if bar.kind == "io" else \
                    "pref" if bar.prefetchable and bar.kind == "mem64" else "mem"
                items.append((kind, _bar_range(bar), f"{f.bdf} BAR{bar.index}"))
        for kind, r, what in items:
            room = allowed(f, kind)
            if room is not None:
                assert any(_inside(r, w) for w in room), \
                    f"{what} {r[0]:#x}-{r[1]:#x} is outside {[(hex(a), hex(b)) for a, b in room]}"
            space = "io" if kind == "io" else "memory"
            ranges.setdefault((f.bus, space), []).append((r, what))
    for (bus, space), items2 in ranges.items():
        items2.sort()
        for (r1, w1), (r2, w2) in zip(items2, items2[1:]):
            assert r1[1] < r2[0], f"bus {bus}: {w1} {r1} overlaps {w2} {r2} ({space})"


def check_intx_swizzle(fns: list[PciFunction]) -> None:
    """pyhv's rule (firmware.py, the _PRT of PCI0): slot s pin p (0 = INTA) on bus 0
    is GSI ``gsis[(s + p) % 8]``; behind bridges the pin is swizzled by the device
    number at each level up to bus 0."""
    up = parents(fns)
    for f in fns:
        if not f.pin:
            continue
        pin, node = f.pin - 1, f
        while up[node.bdf] is not None:
            pin = (pin + node.slot) % 4
            parent = up[node.bdf]
            assert parent is not None
            node = parent
        gsi = PCI_INTX_GSIS[(node.slot + pin) % len(PCI_INTX_GSIS)]
        assert f.line == gsi, f"{f.bdf} INT{'ABCD'[f.pin - 1]}: line {f.line}, swizzle {gsi}"


def pyhv_apertures(pci: PciPlatform) -> dict[str, list[Range]]:
    """The root bus's windows (what \\_SB.PCI0's _CRS gives)."""
    mem32 = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - 1)
    return {"io": [(PCI_IO_START, PCI_IO_END - 1)], "mem": [mem32],
            "pref": [(pci.mmio64[0], pci.mmio64[1] - 1), mem32]}


# ---- under pyhv -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MACHINES))
def test_guest_finds_the_tree_pyhv_built(guests, tmp_path, name):
    machine, controllers = MACHINES[name]
    run = run_pyhv(guests.pvh_elf, tmp_path / "out.txt", machine, controllers)
    r = run.report
    assert run.event.kind == "powered-off" and run.event.detail == "guest", run.output[-2000:]
    assert_clean(r, run.output)
    # the mechanism: ECAM where the MCFG says (q35), port 0xCF8 on pc
    if machine == "q35":
        assert r.pci_config["method"] == "ecam"
        assert r.pci_config["addr"] == layout.PCIE_ECAM_START
        assert r.pci_config["last_bus"] == (layout.PCIE_ECAM_SIZE >> 20) - 1
    else:
        assert r.pci_config["method"] == "io"
    # exactly the functions pyhv built, in the same (depth-first) order ...
    want = [rec for _bus, _dfn, _kind, rec in run.built]
    assert [f.bdf for f in r.pci] == [f.bdf for f in want]
    # ... each with every register the guest reads as pyhv has it
    for got, exp in zip(r.pci, want):
        assert got == exp, f"{got.bdf}: guest saw\n{got}\npyhv built\n{exp}"
    # the guest restored every register it wrote (BAR sizing, decode off and on)
    assert run.after == run.before, changed_registers(run)
    # INTx: the line register is the GSI pyhv's firmware routed the pin to
    routed = {id(fn): gsi for fn, gsi in run.pci.intx}
    for bus, dfn, fn, _p in run.pci.root.walk():
        f = r.pci_function(bdf_text(bus, dfn))
        assert f is not None
        if f.pin:
            assert f.line == routed[id(fn)], f.bdf
    check_intx_swizzle(r.pci)
    check_firmware_invariants(r.pci, pyhv_apertures(run.pci))
    check_cost(r, {bdf_text(b, d) for b, d, kind, _ in run.built if kind == "pcie-root-port"})


def check_cost(r: Report, one_device_bridges: set[str]) -> None:
    """The guest's configuration accesses: one read per probed slot and function,
    a bounded number per function; writes exactly those of BAR sizing."""
    fns = r.pci
    scanned = 1 + sum(1 for f in fns if f.is_bridge and f.bdf not in one_device_bridges)
    probes = 32 * scanned + len(one_device_bridges) + \
        7 * sum(1 for f in fns if f.function == 0 and f.multifunction)
    per_function = sum(4 + (12 if f.layout == 0 else 4 + 7) + 1 + len(f.caps) for f in fns)
    assert r.pci_end["reads"] <= probes + per_function, r.pci_end
    # every BAR register written twice (all-ones, restore; a 64-bit BAR is two
    # registers), the command register twice where decoding was on (not host bridges)
    writes = sum(2 * (6 if f.layout == 0 else 2)
                 + (2 if f.command & 3 and f.class_code >> 8 != 0x0600 else 0) for f in fns)
    assert r.pci_end["writes"] == writes, r.pci_end


def test_pc_layout(guests, tmp_path):
    r = run_pyhv(guests.pvh_elf, tmp_path / "out.txt", *MACHINES["pc"]).report
    assert [(f.bdf, f.vendor, f.device, f.class_code) for f in r.pci] == [
        ("00:00.0", 0x8086, 0x1237, 0x060000),   # i440FX
        ("00:01.0", 0x8086, 0x7000, 0x060100),   # PIIX3
    ]


def test_pc_nested_bridges_layout(guests, tmp_path):
    r = run_pyhv(guests.pvh_elf, tmp_path / "out.txt", *MACHINES["pc-bridges"]).report
    assert [f.bdf for f in r.pci] == ["00:00.0", "00:01.0", "00:05.0", "01:03.0"]
    outer, inner = r.pci[2], r.pci[3]
    for b in (outer, inner):
        assert (b.vendor, b.device, b.class_code, b.layout) == (0x1B36, 0x0001, 0x060400, 1)
    assert (outer.primary, outer.secondary, outer.subordinate) == (0, 1, 2)
    assert (inner.primary, inner.secondary, inner.subordinate) == (1, 2, 2)
    # INTA of 01:03.0 reaches bus 0 as INT((0 + 3) % 4) = INTD of slot 5
    assert outer.line == PCI_INTX_GSIS[5] and inner.line == PCI_INTX_GSIS[(5 + 3) % 8]


def test_q35_root_ports_layout(guests, tmp_path):
    r = run_pyhv(guests.pvh_elf, tmp_path / "out.txt", *MACHINES["q35-root-ports"]).report
    ports = [f"00:02.{i}" for i in range(8)] + [f"00:03.{i}" for i in range(6)]
    assert [f.bdf for f in r.pci] == ["00:00.0", *ports, "00:1f.0"]
    assert (r.pci[0].vendor, r.pci[0].device) == (0x8086, 0x29C0)
    assert (r.pci[-1].vendor, r.pci[-1].device) == (0x8086, 0x2918)
    for n, bdf in enumerate(ports, start=1):
        p = r.pci_function(bdf)
        assert p is not None
        assert (p.vendor, p.device, p.class_code) == (*ROOT_PORT_ID, 0x060400)
        assert (p.primary, p.secondary, p.subordinate) == (0, n, n)
        assert p.caps[0] == 0x10  # PCI Express first
        if p.function == 0:
            assert p.multifunction
        # room for a hotplugged device: 2 MiB of memory and of prefetchable memory
        # (what SeaBIOS reserves under QEMU too), no I/O
        assert p.windows["io"] is None
        for kind in ("mem", "pref"):
            w = p.windows[kind]
            assert w is not None and w[1] - w[0] + 1 == 2 * MiB, (bdf, kind, w)


def test_without_the_switch_the_report_is_unchanged(guests, tmp_path):
    """No ``pyhv.pci``: no PCI lines, and every other line is as with it."""
    machine, controllers = MACHINES["q35-root-ports"]
    plain = run_pyhv(guests.pvh_elf, tmp_path / "plain.txt", machine, controllers,
                     cmdline="console=ttyS0")
    with_pci = run_pyhv(guests.pvh_elf, tmp_path / "pci.txt", machine, controllers)
    assert plain.report.complete and not plain.report.pci and not plain.report.pci_config
    assert not any(ln.tag.startswith("pci") for ln in plain.report.lines)

    def rest(r: Report) -> list[tuple[str, dict]]:
        return [(ln.tag, ln.fields) for ln in r.lines
                if not ln.tag.startswith("pci") and ln.tag not in ("cmdline", "rtc")]

    assert rest(plain.report) == rest(with_pci.report)
    assert plain.after == plain.before


# ---- under QEMU ---------------------------------------------------------------------------------

def qemu_root_port_args(controllers: tuple[ControllerConfig, ...]) -> list[str]:
    args = []
    for c in controllers:
        a = c.address
        assert a is not None and c.port is not None
        args += ["-device",
                 f"pcie-root-port,port={c.port:#x},chassis={c.chassis},id=pci.{c.index},"
                 f"bus=pcie.0,addr={a.slot:#x}.{a.function}"
                 + (",multifunction=on" if a.multifunction else "")]
    return args


def run_qemu(kernel: Path, out: Path, controllers: tuple[ControllerConfig, ...]) -> Report:
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-m", "64",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{out}",
           "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(kernel),
           "-append", CMDLINE, *qemu_root_port_args(controllers)]
    # SeaBIOS runs in emulated real mode on PVM: seconds, not milliseconds
    subprocess.run(cmd, timeout=300, check=False, capture_output=True)
    return parse_report(out.read_text(errors="replace"))


def _shape(f: PciFunction) -> tuple:
    return (f.bdf, f.vendor, f.device, f.class_code, f.layout, f.primary, f.secondary,
            f.subordinate)


@pytest.mark.qemu
def test_q35_root_ports_same_shape_as_qemu(guests, tmp_path):
    _machine, controllers = MACHINES["q35-root-ports"]
    mine_run = run_pyhv(guests.pvh_elf, tmp_path / "pyhv.txt", "q35", controllers)
    mine = mine_run.report
    out = tmp_path / "qemu.txt"
    theirs = run_qemu(guests.pvh_elf, out, controllers)
    assert_clean(mine, mine_run.output)
    assert_clean(theirs, out.read_text(errors="replace"))
    assert mine.pci_config["method"] == theirs.pci_config["method"] == "ecam"

    ports = {f"00:{c.address.slot:02x}.{c.address.function}" for c in controllers
             if c.address is not None}

    def root_ports_of(r: Report) -> list[PciFunction]:
        return [f for f in r.pci if f.bdf in ports]

    # the host bridge: same identity and header
    hm, ht = mine.pci_function("00:00.0"), theirs.pci_function("00:00.0")
    assert hm is not None and ht is not None
    assert (hm.vendor, hm.device, hm.class_code, hm.header_type) == \
        (ht.vendor, ht.device, ht.class_code, ht.header_type)
    # the root ports: same places, identity, header layout and bus numbers ...
    pm, pt = root_ports_of(mine), root_ports_of(theirs)
    assert len(pm) == len(pt) == len(controllers)
    assert [_shape(f) for f in pm] == [_shape(f) for f in pt]
    # ... function 0 of each slot multifunction on both (QEMU sets bit 7 only on
    # the function given multifunction=on; pyhv on every function of the slot)
    assert [f.header_type for f in pm if f.function == 0] == \
        [f.header_type for f in pt if f.function == 0]
    # ... and the same room behind them (SeaBIOS's hotplug reserve: 2 MiB of
    # memory and of prefetchable memory, no I/O), wherever each firmware put it
    def sizes(f: PciFunction) -> dict[str, Optional[int]]:
        return {k: None if w is None else w[1] - w[0] + 1 for k, w in f.windows.items()}

    assert [sizes(f) for f in pm] == [sizes(f) for f in pt]
    # nothing behind the root ports on either
    assert [f.bdf for f in mine.pci if f.bus] == [f.bdf for f in theirs.pci if f.bus] == []
    check_firmware_invariants(theirs.pci)

    # the rest differs by design (chipset functions, capabilities, firmware
    # choices): reported, not compared
    notes = []
    for f in theirs.pci:
        if mine.pci_function(f.bdf) is None:
            notes.append(f"only QEMU: {f.bdf} {f.vendor:04x}:{f.device:04x} "
                         f"class {f.class_code:06x}")
    for f in mine.pci:
        g = theirs.pci_function(f.bdf)
        if g is None:
            notes.append(f"only pyhv: {f.bdf}")
            continue
        for attr in ("header_type", "command", "line", "caps", "bars"):
            a, b = getattr(f, attr), getattr(g, attr)
            if a != b:
                notes.append(f"{f.bdf} {attr}: pyhv {a} QEMU {b}")
    print("\n".join(["pyhv vs QEMU q35, not compared:", *notes]))
