"""Domain XML → VmConfig mapping, schema validation, errors and the round trip (pure)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pyhv.config import (
    BackingFile,
    BalloonConfig,
    ChannelConfig,
    ClockConfig,
    CpuConfig,
    CpuFeature,
    CpuTopology,
    DiskConfig,
    FeaturesConfig,
    FilesystemConfig,
    KernelBoot,
    MemoryBackingConfig,
    NetConfig,
    PciAddress,
    RngConfig,
    SerialConfig,
    SerialPortConfig,
    VmConfig,
)
from pyhv.domxml import DomainXmlError, load_domain, map_domain, parse_domain, to_xml
from pyhv.domxml import schema as domschema
from pyhv.domxml.check import run_check
from pyhv.engine.support import unsupported
from pyhv.placement import place

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "domains").glob("*.xml"))
needs_schema = pytest.mark.skipif(not domschema.available(),
                                  reason="libvirt's domain.rng is not installed")

#: examples the engine can build today; the others map but are refused by `pyhv run`
BUILDABLE = {"test-guest.xml", "direct-kernel-q35.xml", "flat-smp.xml", "disks.xml",
             "openstack-nova.xml",
             "q35-platform.xml", "channel-rng-balloon.xml",
             "consoles.xml", "smp-topology.xml"}


def schema_valid(xml: str) -> bool:
    from lxml import etree

    return domschema.schema_error(etree.fromstring(xml.encode()).getroottree()) is None


def check(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_check(str(path), out, err)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_map_and_round_trip(path: Path) -> None:
    rc, out, err = check(path)
    assert rc == 0, err
    print(out)
    cfg = map_domain(path.read_bytes(), str(path)).config
    xml = to_xml(cfg)
    assert parse_domain(xml.encode()) == cfg
    if domschema.available():
        assert schema_valid(xml), xml
    problems = unsupported(cfg)
    if path.name in BUILDABLE:
        assert problems == [] and "pyhv run can build this machine" in out
        assert load_domain(str(path)) == cfg
    else:
        assert problems and "not built by this engine yet" in out
        with pytest.raises(DomainXmlError, match="not built by this engine yet"):
            load_domain(str(path))


def test_check_opens_and_keeps_nothing() -> None:
    """A description (``pyhv domxml check``, the fuzzer's target) binds no socket,
    opens no pty and leaves no descriptor behind, however many ports it plans."""
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        rc, _out, err = check(ROOT / "examples" / "domains" / "channel-rng-balloon.xml")
        assert rc == 0, err
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_examples_cover_the_issue_list() -> None:
    cfgs = [map_domain(p.read_bytes(), str(p)).config for p in EXAMPLES]
    assert any(c.boot.initrd for c in cfgs)
    assert any(c.disks for c in cfgs) and any(c.filesystems for c in cfgs)
    assert any(c.nets for c in cfgs) and any(c.channels for c in cfgs)
    assert any(p.target == "virtio" for c in cfgs for p in c.extra_serials)
    assert any(c.rngs for c in cfgs) and any(c.balloon for c in cfgs)
    assert any(c.cpu.topology and c.cpu.topology.sockets > 1 for c in cfgs)


def test_readme_example() -> None:
    cfg = load_domain(str(ROOT / "examples" / "domains" / "test-guest.xml"))
    assert cfg.name == "pyhv-test-guest" and cfg.memory == 64 << 20 and cfg.vcpus == 2
    assert cfg.serial == SerialConfig("stdio") and cfg.boot.kernel.endswith("pvh.elf")


def test_example_details() -> None:
    ex = ROOT / "examples" / "domains"
    disks = load_domain(str(ex / "disks.xml"), buildable=False).disks
    assert disks[0] == DiskConfig("/var/lib/libvirt/images/root.img", "vda", cache="none",
                                  io="native", discard="unmap", detect_zeroes="unmap",
                                  serial="root-disk-0001", boot_order=1, id="virtio-disk0",
                                  address=disks[0].address)
    # placed as QEMU places -device without addr on pc: slots 2, 3... (1 is PIIX3)
    assert [d.address for d in disks] == [PciAddress(0, 2), PciAddress(0, 3)]
    assert disks[1].source_type == "block" and disks[1].readonly and disks[1].shareable
    assert (disks[1].error_policy, disks[1].rerror_policy) == ("stop", "report")
    cons = load_domain(str(ex / "consoles.xml"), buildable=False)
    assert cons.serial.kind == "pty"
    assert [(p.target, p.index, p.chardev.kind) for p in cons.extra_serials] == [
        ("isa-serial", 1, "file"), ("isa-serial", 2, "tcp"), ("virtio", 0, "unix"),
        ("virtio", 1, "pty")]
    smp = load_domain(str(ex / "smp-topology.xml"), buildable=False)
    assert smp.cpu == CpuConfig("custom", "Skylake-Server", CpuTopology(2, 1, 2, 2),
                                (CpuFeature("x2apic"), CpuFeature("hle", "disable")))
    assert smp.memory_backing == MemoryBackingConfig(hugepages=True, hugepage_size=2 << 20,
                                                     locked=True)
    net = load_domain(str(ex / "network.xml"), buildable=False)
    assert net.shared_memory and net.nets[3] == NetConfig(
        "vhost-user", socket="/run/vhost-user/net0.sock", mac="52:54:00:12:34:58",
        id="net3", address=net.nets[3].address)
    q35 = load_domain(str(ex / "direct-kernel-q35.xml"))
    assert q35.machine == "pc-q35-7.2" and q35.on_reboot == "destroy"
    assert q35.emulator == "/usr/local/bin/pyhv-qemu" and q35.boot_order == ("hd",)


def _full_config() -> VmConfig:
    return VmConfig(
        boot=KernelBoot("/boot/vmlinuz", "/boot/initrd", "console=ttyS0 quiet"),
        name="full", uuid="12345678-1234-5678-9abc-123456789abc", memory=1 << 30,
        vcpus=2, max_vcpus=4, machine="q35", current_memory=512 << 20, shared_memory=True,
        memory_backing=MemoryBackingConfig("memfd", hugepages=True, hugepage_size=2 << 20,
                                           locked=True),
        cpu=CpuConfig("custom", "EPYC", CpuTopology(2, 1, 2, 1),
                      (CpuFeature("svm", "disable"), CpuFeature("x2apic"))),
        features=FeaturesConfig(pmu=False), clock=ClockConfig("variable", -3600, "localtime"),
        on_reboot="destroy", on_poweroff="restart", on_crash="preserve",
        serial=SerialConfig("tcp", host="127.0.0.1", port=4444, log_path="/var/log/c.log",
                            log_append=True),
        emulator="/usr/bin/pyhv-qemu", boot_order=("hd", "network"),
        disks=(DiskConfig("/img/a.raw", "vda", cache="unsafe", boot_order=1,
                          error_policy="enospace", rerror_policy="stop"),
               DiskConfig("/dev/sdb", "vdc", source_type="block", readonly=True,
                          serial="SN1")),
        filesystems=(FilesystemConfig("/srv", "srv", accessmode="squash", readonly=True),
                     FilesystemConfig("/data", "data", driver="virtiofs")),
        nets=(NetConfig(ifname="tap3", mac="52:54:00:aa:bb:cc"), NetConfig(bridge="br0"),
              NetConfig(network="default"),
              NetConfig("vhost-user", socket="/run/vu.sock", server=True)),
        extra_serials=(SerialPortConfig(SerialConfig("file", "/tmp/com2", append=True), index=1),
                       SerialPortConfig(SerialConfig("unix", "/tmp/s", server=False),
                                        "virtio", 0)),
        channels=(ChannelConfig("org.qemu.guest_agent.0", SerialConfig("unix", "/tmp/ga")),),
        rngs=(RngConfig("/dev/random", 100, 2000), RngConfig()),
        balloon=BalloonConfig(5, autodeflate=True, free_page_reporting=True),
    )


@pytest.mark.parametrize("cfg", [
    VmConfig(boot=KernelBoot("/k")),
    VmConfig(boot=KernelBoot("/k", cmdline="a b"), serial=SerialConfig("null"), vcpus=3,
             cpu=CpuConfig("maximum")),
    VmConfig(boot=KernelBoot("/k"), serial=SerialConfig("pty", log_path="/tmp/console.log")),
    VmConfig(boot=KernelBoot("/k"), serial=SerialConfig("file", "/tmp/x"), machine="pc-i440fx-7.2",
             cpu=CpuConfig(topology=CpuTopology(cores=2, threads=2)), vcpus=4),
    _full_config(),
    # found by tests/fuzz (target domxml): COM2 alone made to_xml add a
    # virtio-serial controller, which came back as a device of the machine
    VmConfig(boot=KernelBoot("/k"), extra_serials=(SerialPortConfig(SerialConfig("stdio")),)),
], ids=["minimal", "null-serial", "pty-log", "threads", "everything", "com2-only"])
def test_round_trip(cfg: VmConfig) -> None:
    xml = to_xml(cfg)
    if domschema.available():
        assert schema_valid(xml), xml
    assert parse_domain(xml.encode()) == place(cfg)
    placed = place(cfg)
    assert parse_domain(to_xml(placed).encode()) == placed  # addresses kept exactly


def test_support_messages() -> None:
    msgs = unsupported(_full_config())
    assert not any("virtio-9p" in m for m in msgs)  # built
    assert not any(m.startswith("disk") for m in msgs)  # raw virtio disks are built
    assert any(m.startswith("filesystem data: virtio-fs") for m in msgs)
    assert any(m.startswith("serial COM1: tcp") for m in msgs)
    assert any("hotplug" in m for m in msgs)
    assert not any("hugepage" in m or "locked" in m for m in msgs)  # built
    assert unsupported(VmConfig(boot=KernelBoot("/k"), vcpus=4)) == []


# ---- errors ---------------------------------------------------------------------------

BASE = """<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory>
<vcpu>{vcpu}</vcpu>{cpu}<os><type arch='x86_64'>hvm</type>{kernel}{loader}</os>
<features><acpi/><apic/></features>
<devices>{devices}</devices></domain>"""


def dom(vcpu: str = "1", cpu: str = "", kernel: str = "<kernel>/k</kernel>", loader: str = "",
        devices: str = "", memory: str = "") -> str:
    xml = BASE.format(vcpu=vcpu, cpu=cpu, kernel=kernel, loader=loader, devices=devices)
    if memory:
        xml = xml.replace("<memory unit='MiB'>64</memory>", memory)
    return xml


ERRORS = [
    # (xml, substrings the one-line error must contain)
    ("<domain type='kvm'><name>x</name", ["malformed XML"]),
    # found by tests/fuzz (target domxml): libxml2's message ended in a line break
    ("<domain type='kvm'><name>x\x00</name></domain>", ["malformed XML", "Char 0x0"]),
    (dom(vcpu="two"), ["/domain/vcpu", "schema"]),
    (dom(memory="<memory unit='furlongs'>64</memory>"), ["/domain/memory", "schema"]),
    (dom(vcpu="4", cpu="<cpu><topology sockets='3' cores='1' threads='1'/></cpu>"),
     ["/domain", "topology", "= 3 vCPUs", "has 4"]),
    (dom(kernel=""), ["/domain/os/kernel", "no kernel"]),
    (dom(loader="<loader>/usr/share/OVMF/OVMF_CODE.fd</loader>"),
     ["/domain/os/loader", "firmware"]),
    (dom(devices="<disk type='file' device='disk'><driver name='qemu' type='vmdk'/>"
                 "<source file='/a.vmdk'/><target dev='vda' bus='virtio'/></disk>"),
     ["/domain/devices/disk/driver", "'vmdk'", "raw, qcow2"]),
    (dom(devices="<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                 "<source file='/a.raw'/><backingStore type='file' index='1'>"
                 "<format type='raw'/><source file='/b.raw'/><backingStore/></backingStore>"
                 "<target dev='vda' bus='virtio'/></disk>"),
     ["/domain/devices/disk/backingStore", "only qcow2 images do"]),
    (dom(devices="<disk type='file' device='disk'><source file='/a'/>"
                 "<target dev='sda' bus='sata'/></disk>"),
     ["/domain/devices/disk/target", "bus", "virtio"]),
    (dom(devices="<graphics type='vnc'/>"), ["/domain/devices/graphics", "not supported"]),
    (dom(devices="<video><model type='vga'/></video>"), ["/domain/devices/video"]),
    (dom(devices="<input type='tablet' bus='usb'/>"), ["/domain/devices/input", "tablet"]),
    (dom(devices="<watchdog model='i6300esb'/>"), ["/domain/devices/watchdog"]),
    (dom(devices="<tpm model='tpm-crb'><backend type='emulator'/></tpm>"),
     ["/domain/devices/tpm"]),
    (dom(devices="<interface type='user'><model type='virtio'/></interface>"),
     ["/domain/devices/interface", "'user'"]),
    (dom(devices="<interface type='bridge'><source bridge='br0'/>"
                 "<model type='e1000'/></interface>"),
     ["/domain/devices/interface/model", "virtio"]),
    (dom(devices="<controller type='scsi' model='virtio-scsi'/>"),
     ["/domain/devices/controller", "scsi"]),
    (dom(devices="<serial type='udp'><source mode='connect' host='h' service='1'/>"
                 "</serial>"), ["/domain/devices/serial", "udp"]),
    (dom(memory="<maxMemory slots='4' unit='GiB'>8</maxMemory>"
                "<memory unit='MiB'>64</memory>"), ["/domain/maxMemory", "hotplug"]),
    (dom(devices="<disk type='file' device='disk'><driver name='qemu' type='raw' "
                 "queues='99'/><source file='/a'/><target dev='vda' bus='virtio'/></disk>"),
     ["/domain/devices/disk", "99 queues (1 to 64)"]),
    (dom(devices="<disk type='file' device='disk'><driver name='qemu' type='raw' "
                 "rerror_policy='enospace'/><source file='/a'/>"
                 "<target dev='vda' bus='virtio'/></disk>"),
     ["/domain/devices", "schema"]),
    (dom(memory="<memory unit='KiB'>65537</memory>"), ["/domain/memory", "4 KiB"]),
]


@pytest.mark.parametrize("xml,needles", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_are_one_line_with_the_element(tmp_path: Path, xml: str,
                                              needles: list[str]) -> None:
    if "schema" in needles and not domschema.available():
        pytest.skip("libvirt's domain.rng is not installed")
    path = tmp_path / "bad.xml"
    path.write_text(xml)
    rc, out, err = check(path)
    print(err, end="")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"pyhv: {path}:")
    for needle in needles:
        assert needle in err


@needs_schema
def test_schema_error_has_line_and_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(dom(vcpu="two").replace("<vcpu>", "\n\n<vcpu>"))
    with pytest.raises(DomainXmlError, match=r"bad\.xml:4: /domain/vcpu: "):
        load_domain(str(path))


def test_units() -> None:
    for unit, value, expect in (("KiB", "65536", 64 << 20), ("MiB", "64", 64 << 20),
                                ("G", "1", 1 << 30), ("bytes", str(64 << 20), 64 << 20),
                                ("MB", "64", 64_000_000 - 64_000_000 % 4096)):
        if unit == "MB":
            continue  # 64 MB is not a whole number of pages: refused (see ERRORS)
        xml = dom(memory=f"<memory unit='{unit}'>{value}</memory>")
        assert parse_domain(xml.encode()).memory == expect
    xml = dom(memory="<memory>131072</memory><currentMemory unit='MiB'>64</currentMemory>")
    cfg = parse_domain(xml.encode())
    assert cfg.memory == 128 << 20 and cfg.current_memory == 64 << 20


def test_vcpu_current_and_topology() -> None:
    xml = dom(vcpu="4", cpu="<cpu mode='host-passthrough'><topology sockets='2' dies='1' "
                           "cores='2' threads='1'/></cpu>").replace("<vcpu>", "<vcpu current='2'>")
    cfg = parse_domain(xml.encode())
    assert (cfg.vcpus, cfg.max_vcpus, cfg.total_vcpus) == (2, 4, 4)
    assert cfg.cpu.topology == CpuTopology(2, 1, 2, 1)


def test_cli_exit_status(tmp_path: Path) -> None:
    bad = tmp_path / "topo.xml"
    bad.write_text(dom(vcpu="4", cpu="<cpu><topology sockets='3' cores='1' threads='1'/></cpu>"))
    p = subprocess.run([sys.executable, "-m", "pyhv", "run", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "topology" in p.stderr
    fs = tmp_path / "fs.xml"
    fs.write_text(dom(devices="<filesystem type='mount'><driver type='virtiofs'/>"
                              "<source dir='/srv'/><target dir='srv'/></filesystem>"))
    p = subprocess.run([sys.executable, "-m", "pyhv", "run", str(fs)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and \
        "/domain/devices/filesystem: filesystem srv: virtio-fs is not built" in p.stderr


def test_harmless_elements_accepted() -> None:
    xml = dom(devices="<controller type='usb' model='qemu-xhci' ports='15'/>"
                      "<controller type='pci' model='pcie-root'/>"
                      "<controller type='pci' model='pcie-root-port'/>"
                      "<input type='keyboard' bus='ps2'/><audio id='1' type='none'/>"
                      "<video><model type='none'/></video>")
    xml = xml.replace("<name>x</name>", "<name>x</name><title>t</title><description>d"
                      "</description><metadata><a xmlns='urn:x'>1</a></metadata>")
    xml = xml.replace("</features>", "</features><clock offset='utc'><timer name='rtc' "
                      "tickpolicy='catchup'/><timer name='hpet' present='no'/></clock>"
                      "<pm><suspend-to-mem enabled='no'/></pm>")
    xml = xml.replace("<type arch='x86_64'>", "<type arch='x86_64' machine='q35'>")
    m = map_domain(xml.encode())
    assert m.config.disks == () and any("xHCI has 4 USB 2 and 4 USB 3" in n for n in m.notes)
    port, xhci = m.config.controllers
    assert (port.model, port.index, port.id) == ("pcie-root-port", 1, "pci.1")
    assert (xhci.type, xhci.model, xhci.id) == ("usb", "qemu-xhci", "usb")
    assert unsupported(m.config) == []



def test_root_port_hotplug_off_round_trips() -> None:
    """``<target hotplug='off'/>`` on a pcie-root-port gives a plain slot."""
    xml = dom(devices="<controller type='pci' model='pcie-root'/>"
                      "<controller type='pci' index='1' model='pcie-root-port'>"
                      "<target chassis='1' port='0x10' hotplug='off'/></controller>"
                      "<controller type='pci' index='2' model='pcie-root-port'/>")
    xml = xml.replace("<type arch='x86_64'>", "<type arch='x86_64' machine='q35'>")
    cfg = map_domain(xml.encode()).config
    off, on = (c for c in cfg.controllers if c.type == "pci")
    assert (off.hotplug, on.hotplug) == (False, True)
    assert parse_domain(to_xml(cfg).encode()) == cfg

def test_serial_log_element() -> None:
    """``<log file= append=>`` (what OpenStack Nova writes for console.log) is mapped."""
    xml = dom(devices="<serial type='pty'><log file='/var/log/nova/console.log' "
                      "append='off'/><target port='0'/></serial>")
    cfg = map_domain(xml.encode()).config
    assert cfg.serial == SerialConfig("pty", log_path="/var/log/nova/console.log")
    assert "logged to /var/log/nova/console.log" in cfg.serial.describe()


def test_rng_models() -> None:
    xml = dom(devices="<rng model='virtio-non-transitional'><backend model='random'>"
                      "/dev/urandom</backend></rng>")
    (rng,) = map_domain(xml.encode()).config.rngs
    assert rng.source == "/dev/urandom" and rng.address is not None
    xml = xml.replace("virtio-non-transitional", "virtio-transitional")
    with pytest.raises(DomainXmlError, match="modern only"):
        map_domain(xml.encode())


def test_interface_queues_mtu_and_link_round_trip() -> None:
    xml = dom(devices="<interface type='bridge'><source bridge='br0'/>"
                      "<mac address='52:54:00:00:00:09'/><model type='virtio'/>"
                      "<driver queues='4'/><mtu size='9000'/><link state='down'/>"
                      "</interface>")
    cfg = map_domain(xml.encode()).config
    (net,) = cfg.nets
    assert (net.bridge, net.queues, net.mtu, net.link_up) == ("br0", 4, 9000, False)
    assert parse_domain(to_xml(cfg).encode()) == cfg
    assert unsupported(cfg) == []
    with pytest.raises(DomainXmlError, match="MTU 20 is not 68-65535"):
        map_domain(dom(devices="<interface type='bridge'><source bridge='br0'/>"
                               "<model type='virtio'/><mtu size='20'/></interface>").encode())


@pytest.mark.parametrize("driver,vhost", [("", None), ("<driver name='vhost'/>", True),
                                          ("<driver name='qemu' queues='2'/>", False)])
def test_interface_driver_name_chooses_the_data_path(driver: str, vhost: object) -> None:
    xml = dom(devices="<interface type='bridge'><source bridge='br0'/>"
                      f"<model type='virtio'/>{driver}</interface>")
    cfg = map_domain(xml.encode()).config
    assert cfg.nets[0].vhost is vhost
    assert parse_domain(to_xml(cfg).encode()) == cfg


QCOW2_DISK = """<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
  <source file='/var/lib/libvirt/images/top.qcow2' index='3'/>
  {backing}
  <target dev='vda' bus='virtio'/></disk>"""
CHAIN = """<backingStore type='file' index='2'><format type='qcow2'/>
    <source file='/var/lib/libvirt/images/mid.qcow2'/>
    <backingStore type='file' index='1'><format type='raw'/>
      <source file='/var/lib/libvirt/images/base.raw'/>{end}</backingStore></backingStore>"""


@pytest.mark.parametrize("backing,expect", [
    ("", None),
    ("<backingStore/>", ()),
    (CHAIN.format(end="<backingStore/>"),
     (BackingFile("/var/lib/libvirt/images/mid.qcow2", "qcow2"),
      BackingFile("/var/lib/libvirt/images/base.raw", "raw"))),
    # a chain that does not end in an empty element: the headers decide
    (CHAIN.format(end=""), None),
], ids=["header", "none", "chain", "partial"])
def test_qcow2_disk_and_backing_chain(backing: str, expect: Any) -> None:
    xml = dom(devices=QCOW2_DISK.format(backing=backing))
    cfg = map_domain(xml.encode()).config
    (disk,) = cfg.disks
    assert (disk.format, disk.backing, disk.cache) == ("qcow2", expect, "none")
    out = to_xml(cfg)
    if domschema.available():
        assert schema_valid(out), out
    assert parse_domain(out.encode()) == cfg
    assert unsupported(cfg) == []


VHOSTUSER_DISK = """<domain type='kvm'><name>vu</name><memory unit='MiB'>64</memory>
  {backing}
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k</kernel></os>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source type='unix' path='/run/vhost-blk.sock'>{reconnect}</source>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices></domain>"""
SHARED = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


def test_vhostuser_disk() -> None:
    """libvirt's <disk type='vhostuser'>: the backend's socket, reconnect, round trip;
    refused in one line without shared memory or with a format other than raw."""
    xml = VHOSTUSER_DISK.format(backing=SHARED, fmt="raw",
                                reconnect="<reconnect enabled='yes' timeout='7'/>")
    cfg = parse_domain(xml.encode())
    (d,) = cfg.disks
    assert (d.source_type, d.path, d.reconnect, d.target) == \
        ("vhostuser", "/run/vhost-blk.sock", 7, "vdb")
    assert parse_domain(to_xml(cfg).encode()) == cfg
    assert unsupported(cfg) == []
    bare = parse_domain(VHOSTUSER_DISK.format(backing="", fmt="raw", reconnect="").encode())
    assert bare.disks[0].reconnect is None
    (why,) = unsupported(bare)
    assert "access mode='shared'" in why
    with pytest.raises(DomainXmlError, match="driver type is raw"):
        parse_domain(VHOSTUSER_DISK.format(backing=SHARED, fmt="qcow2", reconnect="").encode())


def test_vhostuser_interface_reconnect() -> None:
    xml = f"""<domain type='kvm'><name>vn</name><memory unit='MiB'>64</memory>
      {SHARED}
      <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k</kernel></os>
      <devices><interface type='vhostuser'><mac address='52:54:00:00:00:09'/>
        <source type='unix' path='/run/vu-net.sock' mode='client'>
          <reconnect enabled='yes' timeout='3'/></source>
        <model type='virtio'/><driver queues='2'/></interface></devices></domain>"""
    cfg = parse_domain(xml.encode())
    (n,) = cfg.nets
    assert (n.backend, n.socket, n.server, n.reconnect, n.queues) == \
        ("vhost-user", "/run/vu-net.sock", False, 3, 2)
    assert parse_domain(to_xml(cfg).encode()) == cfg
    assert unsupported(cfg) == []
    with pytest.raises(DomainXmlError, match="reconnect needs a vhost-user client"):
        parse_domain(xml.replace("mode='client'", "mode='server'").encode())


def test_cpu_migratable() -> None:
    """virt-manager writes migratable='on' (QEMU's -cpu host default); 'off' keeps the
    features that block migration and is written back."""
    base = ("<domain type='kvm'><name>m</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k</kernel></os>"
            "<cpu mode='host-passthrough' check='none' migratable='{}'/></domain>")
    assert parse_domain(base.format("on").encode()).cpu.migratable
    off = parse_domain(base.format("off").encode())
    assert not off.cpu.migratable
    assert parse_domain(to_xml(off).encode()) == off
    with pytest.raises(DomainXmlError, match="migratable|/domain/cpu"):  # or the schema
        parse_domain(base.format("maybe").encode())


def test_openstack_nova_example() -> None:
    """Nova's domain: sysinfo for SMBIOS, host-model CPU, CPU shares and vmcoreinfo
    (both noted), a qcow2 root disk, a logged pty console."""
    mapped = map_domain((ROOT / "examples" / "domains" / "openstack-nova.xml").read_bytes())
    cfg = mapped.config
    assert cfg.smbios.mode == "sysinfo" and cfg.cpu.mode == "host-model"
    assert cfg.disks[0].format == "qcow2" and cfg.serial.kind == "pty"
    assert any("cputune/shares" in n for n in mapped.notes)
    assert any("vmcoreinfo: not built" in n for n in mapped.notes)
