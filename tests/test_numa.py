"""Guest NUMA: cells in VmConfig, domain XML and pyhv-qemu's -numa; SRAT/SLIT; host
binding of guest RAM (<numatune>)."""

from __future__ import annotations

import io
import mmap
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.config import ConfigError, KernelBoot, NumaCell, NumaTune, VmConfig, parse_cpuset
from pyhv.domxml import DomainXmlError, parse_domain, to_xml
from pyhv.domxml.check import run_check
from pyhv.engine import layout
from pyhv.engine.acpi import build_acpi
from pyhv.engine.builder import acpi_description
from pyhv.engine.memory import GuestMemory
from pyhv.engine.numa import NumaError, bind_guest_ram, binding_plan, check_nodes, host_nodes
from pyhv.shim.errors import ShimError
from pyhv.shim.mapping import build

GiB, MiB = layout.GiB, layout.MiB
needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl (acpica-tools) is not installed")

NUMA_XML = """<domain type="kvm">
  <name>numa</name>
  <memory unit="GiB">4</memory>
  <vcpu>4</vcpu>
  <numatune>
    <memory mode="strict" nodeset="0"/>
    <memnode cellid="1" mode="preferred" nodeset="0"/>
  </numatune>
  <os><type arch="x86_64" machine="q35">hvm</type><kernel>/k</kernel></os>
  <features><acpi/><apic/></features>
  <cpu mode="host-passthrough">
    <topology sockets="2" dies="1" cores="2" threads="1"/>
    <numa>
      <cell id="0" cpus="0-1" memory="3" unit="GiB">
        <distances><sibling id="0" value="10"/><sibling id="1" value="21"/></distances>
      </cell>
      <cell id="1" cpus="2,3" memory="1048576" memAccess="shared">
        <distances><sibling id="0" value="21"/><sibling id="1" value="10"/></distances>
      </cell>
    </numa>
  </cpu>
  <devices><memballoon model="none"/></devices>
</domain>"""


def cfg(cells: tuple[NumaCell, ...], memory: int = 4 * GiB, vcpus: int = 4,
        tune: NumaTune | None = None) -> VmConfig:
    return VmConfig(boot=KernelBoot("/k"), memory=memory, vcpus=vcpus, numa=cells,
                    numatune=tune)


TWO = (NumaCell(0, (0, 1), 3 * GiB + 512 * MiB, ((1, 21),)),
       NumaCell(1, (2, 3), 512 * MiB, ((0, 21),)))


# ---- cells ------------------------------------------------------------------------
def test_cpuset_syntax() -> None:
    assert parse_cpuset("0-3,^2,8") == (0, 1, 3, 8)
    with pytest.raises(ConfigError, match="not a list"):
        parse_cpuset("a-b")


@pytest.mark.parametrize("cells,message", [
    ((NumaCell(0, (0, 1), 2 * GiB), NumaCell(1, (1, 2, 3), 2 * GiB)),
     r"^numa cell 1: vCPU 1 is already in cell 0$"),
    ((NumaCell(0, (0, 1), 2 * GiB), NumaCell(1, (2,), 2 * GiB)),
     r"^numa cell 1: vCPU 3 is in no cell"),
    ((NumaCell(0, (0, 1), 2 * GiB), NumaCell(1, (2, 3, 4), 2 * GiB)),
     r"^numa cell 1: vCPU 4 does not exist"),
    ((NumaCell(0, (0, 1), 2 * GiB), NumaCell(1, (2, 3), 1 * GiB)),
     r"^numa cell 1: the cells have 3G of memory, the machine 4G$"),
    ((NumaCell(0, (0, 1), 2 * GiB, ((1, 9),)), NumaCell(1, (2, 3), 2 * GiB)),
     r"^numa cell 0: distance 9 to cell 1"),
    ((NumaCell(0, (0, 1), 2 * GiB, ((2, 20),)), NumaCell(1, (2, 3), 2 * GiB)),
     r"^numa cell 0: distance to cell 2, which does not exist$"),
    ((NumaCell(1, (0, 1, 2, 3), 4 * GiB),), r"^numa cell ids \[1\]"),
])
def test_bad_cells_are_refused_with_one_line(cells: tuple[NumaCell, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        cfg(cells)
    assert "\n" not in str(e.value)


def test_ranges_skip_the_mmio_hole() -> None:
    assert layout.numa_ranges([3 * GiB + 512 * MiB, 512 * MiB]) == [
        [(0, 3 * GiB), (4 * GiB, 512 * MiB)], [(4 * GiB + 512 * MiB, 512 * MiB)]]
    assert layout.numa_ranges([1 * GiB, 2 * GiB + 512 * MiB, 512 * MiB]) == [
        [(0, 1 * GiB)], [(1 * GiB, 2 * GiB), (4 * GiB, 512 * MiB)],
        [(4 * GiB + 512 * MiB, 512 * MiB)]]
    assert layout.numa_ranges([128 * MiB, 128 * MiB]) == [[(0, 128 * MiB)],
                                                          [(128 * MiB, 128 * MiB)]]


# ---- domain XML ---------------------------------------------------------------------
def test_domain_xml_cells_and_numatune() -> None:
    c = parse_domain(NUMA_XML.encode())
    assert c.numa == (NumaCell(0, (0, 1), 3 * GiB, ((0, 10), (1, 21))),
                      NumaCell(1, (2, 3), GiB, ((0, 21), (1, 10)), "shared"))
    assert c.numatune == NumaTune("strict", (0,), ((1, "preferred", (0,)),))
    assert c.shared_memory  # cell 1 is memAccess='shared': all RAM is one shared backing
    assert parse_domain(to_xml(c).encode()) == c
    private = parse_domain(NUMA_XML.replace(' memAccess="shared"', "").encode())
    assert not private.shared_memory


@pytest.mark.parametrize("change,message", [
    (('cpus="2,3"', 'cpus="1-3"'), "vCPU 1 is already in cell 0"),
    (('memory="1048576"', 'memory="1000"'), "the cells have"),
    (('<memory mode="strict" nodeset="0"/>\n    <memnode cellid="1" mode="preferred" '
      'nodeset="0"/>', '<memory mode="strict" placement="auto"/>'),
     "placement='auto' needs numad"),
    (('cellid="1"', 'cellid="5"'), "memnode cellid 5: no such numa cell"),
])
def test_domain_xml_errors(change: tuple[str, str], message: str) -> None:
    with pytest.raises(DomainXmlError, match=message) as e:
        parse_domain(NUMA_XML.replace(*change).encode())
    assert "\n" not in str(e.value)


def test_domxml_check_lists_cells(tmp_path: Path) -> None:
    path = tmp_path / "numa.xml"
    path.write_text(NUMA_XML)
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(path), out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert "numa cell 0: vcpus 0-1, 3 GiB at 0x0-0xbfffffff" in text
    assert "numa cell 1: vcpus 2-3, 1 GiB at 0x100000000-0x13fffffff" in text
    assert "numatune cell 1: preferred on host nodes 0" in text


# ---- ACPI -----------------------------------------------------------------------------
def _iasl(tmp_path: Path, name: str, blob: bytes) -> str:
    (tmp_path / f"{name}.dat").write_bytes(blob)
    run = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not re.search(r"(?i)\b(error|warning)", run.stdout + run.stderr)
    return (tmp_path / f"{name}.dsl").read_text()


def _fields(dsl: str, name: str) -> list[str]:
    return re.findall(rf"\b{re.escape(name)} : ([0-9A-F]+)", dsl)


@needs_iasl
def test_srat_and_slit_decompile(tmp_path: Path) -> None:
    c = cfg(TWO, tune=None)
    c = VmConfig(boot=c.boot, memory=c.memory, vcpus=4, numa=c.numa,
                 cpu=parse_domain(NUMA_XML.encode()).cpu)  # 2 sockets × 2 cores
    tables = {blob[:4].decode(): blob for _a, blob in build_acpi(acpi_description(c)).blobs}
    srat = _iasl(tmp_path, "srat", tables["SRAT"])
    # CPUs: (domain, APIC id) in cell order
    assert list(zip(_fields(srat, "Proximity Domain Low(8)"), _fields(srat, "Apic ID"))) == [
        ("00", "00"), ("00", "01"), ("01", "02"), ("01", "03")]
    # memory: cell 0 takes the RAM below the hole and 512 MiB above, cell 1 the rest
    ranges = list(zip(_fields(srat, "Proximity Domain"), _fields(srat, "Base Address"),
                      _fields(srat, "Address Length")))
    assert [(int(d, 16), int(b, 16), int(n, 16)) for d, b, n in ranges] == [
        (0, 0, 3 * GiB), (0, 4 * GiB, 512 * MiB), (1, 4 * GiB + 512 * MiB, 512 * MiB)]
    slit = _iasl(tmp_path, "slit", tables["SLIT"])
    assert re.search(r"Localities : 0+2\b", slit)
    assert re.search(r"Locality   0 : 0A 15\b", slit)
    assert re.search(r"Locality   1 : 15 0A\b", slit)


def test_no_slit_without_distances_and_no_srat_without_cells() -> None:
    cells = tuple(NumaCell(c.id, c.cpus, c.memory) for c in TWO)
    sigs = {blob[:4] for _a, blob in build_acpi(acpi_description(cfg(cells))).blobs}
    assert b"SRAT" in sigs and b"SLIT" not in sigs  # QEMU: no SLIT without -numa dist
    plain = VmConfig(boot=KernelBoot("/k"), memory=256 * MiB)
    sigs = {blob[:4] for _a, blob in build_acpi(acpi_description(plain)).blobs}
    assert b"SRAT" not in sigs


def test_one_sided_distances_are_mirrored() -> None:
    from pyhv.engine.builder import numa_distances

    cells = (NumaCell(0, (0, 1), 2 * GiB, ((1, 30),)), NumaCell(1, (2,), 1 * GiB),
             NumaCell(2, (3,), 1 * GiB))
    assert numa_distances(cfg(cells)) == ((10, 30, 20), (30, 10, 20), (20, 20, 10))


# ---- pyhv-qemu ---------------------------------------------------------------------------
LIBVIRT_NUMA = [  # what libvirt 9.0 passes for two cells with distances
    "-machine", "pc-q35-7.2,usb=off,dump-guest-core=off", "-accel", "kvm",
    "-cpu", "host", "-m", "size=4194304k",
    "-smp", "4,sockets=2,dies=1,cores=2,threads=1",
    "-object", '{"qom-type":"memory-backend-ram","id":"ram-node0","size":3221225472}',
    "-numa", "node,nodeid=0,cpus=0-1,memdev=ram-node0",
    "-object", '{"qom-type":"memory-backend-ram","id":"ram-node1","size":1073741824,'
               '"host-nodes":[0],"policy":"preferred"}',
    "-numa", "node,nodeid=1,cpus=2,cpus=3,memdev=ram-node1",
    "-numa", "dist,src=0,dst=0,val=10", "-numa", "dist,src=0,dst=1,val=21",
    "-numa", "dist,src=1,dst=0,val=21", "-numa", "dist,src=1,dst=1,val=10",
    "-kernel", "/k", "-nodefaults", "-display", "none",
]


def test_shim_maps_libvirt_numa() -> None:
    c = build(LIBVIRT_NUMA).config
    assert c is not None
    assert c.numa == (NumaCell(0, (0, 1), 3 * GiB, ((0, 10), (1, 21))),
                      NumaCell(1, (2, 3), GiB, ((0, 21), (1, 10))))
    assert c.numatune == NumaTune(memnodes=((1, "preferred", (0,)),))


def test_shim_numa_cpu_and_even_split() -> None:
    args = ["-machine", "pc", "-accel", "kvm", "-m", "512", "-smp", "4,sockets=2,cores=2",
            "-numa", "node,nodeid=0", "-numa", "node,nodeid=1",
            "-numa", "cpu,node-id=0,socket-id=0,core-id=0",
            "-numa", "cpu,node-id=0,socket-id=0,core-id=1",
            "-numa", "cpu,node-id=1,socket-id=1,core-id=0",
            "-numa", "cpu,node-id=1,socket-id=1,core-id=1", "-kernel", "/k"]
    c = build(args).config
    assert c is not None
    assert [(n.cpus, n.memory) for n in c.numa] == [((0, 1), 256 * MiB), ((2, 3), 256 * MiB)]


@pytest.mark.parametrize("extra,message", [
    (["-numa", "node,nodeid=0,cpus=0-3,mem=512"], "mem= is not supported"),
    (["-numa", "node,nodeid=0,cpus=0-3,memdev=nope"], "memdev 'nope' is not a memory"),
    (["-numa", "node,nodeid=0,cpus=0-1", "-numa", "node,nodeid=1,cpus=1-3"],
     "numa cell 1: vCPU 1 is already in cell 0"),
    (["-numa", "node,nodeid=0,cpus=0-3", "-numa", "dist,src=0,dst=0,val=20"],
     "invalid distance 20"),
    (["-numa", "hmat-lb,initiator=0"], "-numa hmat-lb is not supported"),
    (["-numa", "node,nodeid=0,cpus=0-3,color=red"], "invalid parameter 'color'"),
])
def test_shim_numa_errors(extra: list[str], message: str) -> None:
    args = ["-machine", "pc", "-accel", "kvm", "-m", "512", "-smp", "4", "-kernel", "/k"]
    with pytest.raises(ShimError, match=message) as e:
        build(args + extra)
    assert "\n" not in str(e.value)


# ---- host binding ------------------------------------------------------------------------
def test_binding_plan_and_missing_host_node() -> None:
    tune = NumaTune("strict", (0,), ((1, "interleave", (0,)),))
    c = cfg(TWO, tune=tune)
    assert binding_plan(c) == [(0, 3 * GiB, "strict", (0,)),
                               (4 * GiB, 512 * MiB, "strict", (0,)),
                               (4 * GiB + 512 * MiB, 512 * MiB, "interleave", (0,))]
    with pytest.raises(NumaError, match=r"^numatune memory: host NUMA node 7 does not "
                                        r"exist \(this host has node 0\)$"):
        check_nodes(cfg(TWO, tune=NumaTune("strict", (7,))), online=(0,))
    check_nodes(c, online=(0,))


def test_bind_guest_ram_to_host_node(tmp_path: Path) -> None:
    online = host_nodes()
    node = online[0]
    c = VmConfig(boot=KernelBoot("/k"), memory=64 * MiB,
                 numatune=NumaTune("strict", (node,)))
    memory = GuestMemory.anonymous(layout.ram_ranges(c.memory))
    try:
        assert bind_guest_ram(memory, c) == 1
        buf = memory.regions[0].buffer
        assert isinstance(buf, mmap.mmap)
        import ctypes

        view = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(view)
        del view
        maps = Path("/proc/self/numa_maps")
        if not maps.exists():
            pytest.skip("this kernel has no /proc/self/numa_maps to check the policy")
        line = next(x for x in maps.read_text().splitlines() if x.startswith(f"{addr:x} "))
        assert f"bind:{node}" in line
        bad = VmConfig(boot=KernelBoot("/k"), memory=64 * MiB,
                       numatune=NumaTune("strict", (max(online) + 1,)))
        with pytest.raises(NumaError, match="does not exist"):
            bind_guest_ram(memory, bad)
    finally:
        memory.close()


def test_shim_maps_libvirt_numatune_memnode_argv() -> None:
    """The -object/-numa lines of libvirt 9.0's numatune-memnode test (32 vCPUs, three
    cells, cpus= given more than once, each backend's host-nodes and policy)."""
    obj = '{{"qom-type":"memory-backend-ram","id":"ram-node{}","size":{},' \
          '"host-nodes":[{}],"policy":"{}"}}'
    args = ["-machine", "pc,accel=kvm,usb=off,dump-guest-core=off", "-cpu", "host",
            "-m", "24105", "-smp", "32,sockets=32,cores=1,threads=1",
            "-object", obj.format(0, 20971520, "3", "preferred"),
            "-numa", "node,nodeid=0,cpus=0,memdev=ram-node0",
            "-object", obj.format(1, 676331520, "0,1,2,3,4,5,6,7", "bind"),
            "-numa", "node,nodeid=1,cpus=1-27,cpus=29,memdev=ram-node1",
            "-object", obj.format(2, 24578621440, "1,2,5,7", "bind"),
            "-numa", "node,nodeid=2,cpus=28,cpus=30-31,memdev=ram-node2",
            "-rtc", "base=utc", "-no-acpi", "-kernel", "/k"]
    c = build(args).config
    assert c is not None
    assert [c_.cpus for c_ in c.numa] == [(0,), (*range(1, 28), 29), (28, 30, 31)]
    assert [c_.memory for c_ in c.numa] == [20971520, 676331520, 24578621440]
    assert c.numatune is not None and c.numatune.memnodes == (
        (0, "preferred", (3,)), (1, "strict", tuple(range(8))), (2, "strict", (1, 2, 5, 7)))
    # this host has node 0 only (or a few): naming node 3 is refused with one line
    if 3 not in host_nodes():
        with pytest.raises(NumaError, match=r"^numatune memnode cellid 0: host NUMA node 3 "
                                            r"does not exist"):
            check_nodes(c)
