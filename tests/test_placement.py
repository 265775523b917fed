"""PCI placement (pyhv/placement.py): one policy for domain XML, pyhv-qemu and check."""

from __future__ import annotations

import pytest

from pyhv.config import (
    BalloonConfig,
    ChannelConfig,
    ConfigError,
    ControllerConfig,
    DiskConfig,
    KernelBoot,
    NetConfig,
    PciAddress,
    RngConfig,
    SerialConfig,
    SerialPortConfig,
    VmConfig,
)
from pyhv.domxml import DomainXmlError, map_domain
from pyhv.placement import pci_functions, place


def vm(machine: str = "pc", **kw: object) -> VmConfig:
    return VmConfig(KernelBoot("/k"), machine=machine, **kw)  # type: ignore[arg-type]


def root_ports(n: int) -> tuple[ControllerConfig, ...]:
    """libvirt's layout for virt-install's q35 domains: 00:02.0-7, 00:03.0-..."""
    out = []
    for i in range(n):
        slot, fn = (2, i) if i < 8 else (3, i - 8)
        out.append(ControllerConfig("pci", "pcie-root-port", i + 1, f"pci.{i + 1}",
                                    PciAddress(0, slot, fn, multifunction=fn == 0),
                                    port=0x10 + i, chassis=i + 1))
    return tuple(out)


def test_unplaced_devices_take_the_first_free_root_slots_in_order() -> None:
    cfg = place(vm(disks=(DiskConfig("/a"), DiskConfig("/b")), nets=(NetConfig(),),
                   rngs=(RngConfig(),), balloon=BalloonConfig()))
    assert [d.address for d in cfg.disks] == [PciAddress(0, 2), PciAddress(0, 3)]
    assert cfg.nets[0].address == PciAddress(0, 4) and cfg.rngs[0].address == PciAddress(0, 5)
    assert cfg.balloon is not None and cfg.balloon.address == PciAddress(0, 6)
    assert [d.id for d in cfg.disks] == ["virtio-disk0", "virtio-disk1"]
    assert (cfg.nets[0].id, cfg.rngs[0].id, cfg.balloon.id) == ("net0", "rng0", "balloon0")
    q35 = place(vm("q35", disks=(DiskConfig("/a"),)))
    assert q35.disks[0].address == PciAddress(0, 1)  # q35: slot 1 is free
    assert place(cfg) == cfg  # placing again changes nothing


def test_given_addresses_are_kept_and_others_go_around_them() -> None:
    cfg = place(vm(disks=(DiskConfig("/a", address=PciAddress(0, 2)), DiskConfig("/b")),
                   nets=(NetConfig(id="hostnet", address=PciAddress(0, 7, 0)),)))
    assert cfg.disks[0].address == PciAddress(0, 2)
    assert cfg.disks[1].address == PciAddress(0, 3)
    assert cfg.nets[0].address == PciAddress(0, 7) and cfg.nets[0].id == "hostnet"


def test_devices_behind_root_ports_and_bridges() -> None:
    ports = root_ports(14)
    cfg = place(vm("q35", controllers=ports,
                   disks=(DiskConfig("/a", address=PciAddress(3, 0)),), nets=(NetConfig(),)))
    assert cfg.disks[0].address == PciAddress(3, 0)
    # the root bus has room: an unaddressed device goes there, as with QEMU
    assert cfg.nets[0].address == PciAddress(0, 1)
    funcs = pci_functions(cfg)
    assert funcs[0] == (PciAddress(0, 1), "net0", "interface 0")
    assert [f[1] for f in funcs if f[2] == "pcie-root-port"][:2] == ["pci.1", "pci.2"]
    bridge = ControllerConfig("pci", "pci-bridge", 1, address=PciAddress(0, 5), chassis=1)
    cfg = place(vm(controllers=(bridge,), disks=(DiskConfig("/a", address=PciAddress(1, 1)),)))
    assert cfg.controllers[0].id == "pci.1" and cfg.disks[0].address == PciAddress(1, 1)


@pytest.mark.parametrize("cfg,needle", [
    (vm(disks=(DiskConfig("/a", "vda", address=PciAddress(0, 1)),)),
     "disk vda: PCI address 0000:00:01.0 is taken by the PIIX3 south bridge"),
    (vm("q35", disks=(DiskConfig("/a", "vda", address=PciAddress(0, 0x1F, 3)),)),
     "taken by the ICH9 south bridge"),
    (vm(disks=(DiskConfig("/a", "vda", address=PciAddress(0, 4)),
               DiskConfig("/b", "vdb", address=PciAddress(0, 4)))),
     "disk vdb: PCI address 0000:00:04.0 is taken by disk vda"),
    (vm(disks=(DiskConfig("/a", "vda", address=PciAddress(2, 0)),)),
     "disk vda: PCI bus 2 has no controller"),
    (vm("q35", controllers=root_ports(1), disks=(DiskConfig("/a", "vda",
                                                            address=PciAddress(1, 3)),)),
     "slot 0x03 is not available on bus 1 (a pcie-root-port)"),
    (vm(disks=(DiskConfig("/a", "vda", address=PciAddress(0, 6, 2)),)),
     "has function 2 but no function 0"),
])
def test_placement_errors_name_the_device(cfg: VmConfig, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        place(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_full_root_bus_is_one_line() -> None:
    disks = tuple(DiskConfig(f"/d{i}", f"vd{chr(97 + i % 26)}{i}") for i in range(31))
    with pytest.raises(ConfigError, match=r"^disk vd.*: no free PCI slot left"):
        place(vm(disks=disks))


def test_usb_controllers_go_where_the_chipset_has_them() -> None:
    cfg = place(vm(controllers=(ControllerConfig("usb", "piix3-uhci"),)))
    assert cfg.controllers[0].address == PciAddress(0, 1, 2) and cfg.controllers[0].id == "usb"
    ehci = ControllerConfig("usb", "ich9-ehci1")
    companions = tuple(ControllerConfig("usb", f"ich9-uhci{i}", master_port=2 * (i - 1))
                       for i in (1, 2, 3))
    with pytest.raises(ConfigError, match="has function 7 but no function 0"):
        place(vm("q35", controllers=(ehci,)))  # invisible to a guest without function 0
    cfg = place(vm("q35", controllers=(ehci, *companions)))
    assert [c.address for c in cfg.controllers] == [
        PciAddress(0, 0x1D, 7), PciAddress(0, 0x1D, 0, multifunction=True),
        PciAddress(0, 0x1D, 1), PciAddress(0, 0x1D, 2)]


# ---- through domain XML --------------------------------------------------------------

XML = """<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='{machine}'>hvm</type><kernel>/k</kernel></os>
<devices>{devices}</devices></domain>"""


def test_domain_xml_addresses_and_aliases_are_kept() -> None:
    devices = """
      <controller type='pci' index='0' model='pcie-root'><alias name='pcie.0'/></controller>
      <controller type='pci' index='1' model='pcie-root-port'>
        <model name='pcie-root-port'/><target chassis='1' port='0x10'/><alias name='pci.1'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'
                 multifunction='on'/></controller>
      <controller type='pci' index='2' model='pcie-root-port'>
        <target chassis='2' port='0x11'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x1'/>
      </controller>
      <disk type='file' device='disk'><source file='/img'/><target dev='vda' bus='virtio'/>
        <alias name='ua-root'/>
        <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/></disk>
      <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"""
    cfg = map_domain(XML.format(machine="q35", devices=devices).encode()).config
    p1, p2 = cfg.controllers
    assert (p1.id, p1.port, p1.chassis, p1.address) == (
        "pci.1", 0x10, 1, PciAddress(0, 2, 0, multifunction=True))
    assert (p2.id, p2.address) == ("pci.2", PciAddress(0, 2, 1))
    assert cfg.disks[0].id == "ua-root" and cfg.disks[0].address == PciAddress(2, 0)
    assert cfg.rngs[0].address == PciAddress(0, 1) and cfg.rngs[0].id == "rng0"


@pytest.mark.parametrize("devices,needle", [
    ("<controller type='pci' index='1' model='pcie-root-port'/>",
     "/domain/devices/controller: pcie-root-port controllers need a q35 machine"),
    ("<disk type='file' device='disk'><source file='/img'/><target dev='vda' bus='virtio'/>"
     "<address type='pci' bus='0x00' slot='0x01' function='0x0'/></disk>",
     "/domain/devices: disk vda: PCI address 0000:00:01.0 is taken by the PIIX3"),
    ("<disk type='file' device='disk'><source file='/img'/><target dev='vda' bus='virtio'/>"
     "<address type='drive' controller='0' bus='0' unit='0'/></disk>",
     "/domain/devices/disk/address: address type 'drive' is not supported"),
])
def test_domain_xml_placement_errors(devices: str, needle: str) -> None:
    with pytest.raises(DomainXmlError) as e:
        map_domain(XML.format(machine="pc", devices=devices).encode())
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---- virtio-serial ports -------------------------------------------------------------------

def _console(port: int | None = None, index: int = 0) -> SerialPortConfig:
    return SerialPortConfig(SerialConfig("null"), "virtio", index, port=port)


def test_virtio_ports_numbered_as_qemu_numbers_them() -> None:
    cfg = place(vm(extra_serials=(_console(), _console(index=1)),
                   channels=(ChannelConfig("org.qemu.guest_agent.0"),
                             ChannelConfig("b", port=5), ChannelConfig("c"))))
    (vs,) = cfg.controllers
    assert (vs.type, vs.id) == ("virtio-serial", "virtio-serial0")
    # the first console takes port 0, everything else the lowest free from 1, around
    # the numbers given
    assert [(p.port, p.id) for p in cfg.extra_serials] == [(0, "console0"), (1, "console1")]
    assert [(c.port, c.id) for c in cfg.channels] == \
        [(2, "channel0"), (5, "channel1"), (3, "channel2")]


@pytest.mark.parametrize("kw,needle", [
    ({"channels": (ChannelConfig("a", port=1), ChannelConfig("b", port=1))},
     "channel b: port 1 of virtio-serial controller 0 is taken by channel a"),
    ({"channels": (ChannelConfig("a", controller=1),)},
     "channel a: virtio-serial controller 1 does not exist"),
    ({"channels": (ChannelConfig("a", port=4),),
      "controllers": (ControllerConfig("virtio-serial", "virtio-serial", max_ports=4),)},
     "channel a: port 4 is past the 4 ports of virtio-serial controller 0"),
    ({"channels": (ChannelConfig("a"), ChannelConfig("b")),
      "controllers": (ControllerConfig("virtio-serial", "virtio-serial", max_ports=2),)},
     "channel b: virtio-serial controller 0 has no free port (it has 2)"),
])
def test_virtio_port_errors_name_the_port(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        place(vm(**kw))
    assert needle in str(e.value)


def test_domain_xml_virtio_serial_addresses_and_aliases() -> None:
    devices = """
      <controller type='virtio-serial' index='0'><alias name='virtio-serial0'/></controller>
      <console type='pty'><target type='virtio' port='0'/><alias name='console1'/>
        <address type='virtio-serial' controller='0' bus='0' port='0'/></console>
      <channel type='unix'><source mode='bind' path='/run/agent.sock'/>
        <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
        <alias name='channel0'/>
        <address type='virtio-serial' controller='0' bus='0' port='1'/></channel>"""
    cfg = place(map_domain(XML.format(machine="pc", devices=devices).encode()).config)
    (con,) = cfg.extra_serials
    (ch,) = cfg.channels
    assert (con.id, con.controller, con.port) == ("console1", 0, 0)
    assert (ch.id, ch.controller, ch.port, ch.chardev.path) == \
        ("channel0", 0, 1, "/run/agent.sock")


def test_port_names_from_argv_bytes() -> None:
    """Found by the mapping fuzzer: a name that is not UTF-8 (argv decodes it with
    surrogate escapes) is measured in bytes, not refused with a traceback."""
    assert ChannelConfig("org.qemu.guest_agent\udc94.0").name.endswith(".0")
    with pytest.raises(ConfigError, match="longer than 255 bytes"):
        ChannelConfig("\udc94" * 256)


def test_root_port_numbers_are_bytes() -> None:
    """Found by the domxml fuzzer: a port past 255 reached the PCIe capability's 8-bit
    field and raised OverflowError; it is one line now."""
    with pytest.raises(ConfigError, match="port 4096 is not 0-255"):
        ControllerConfig("pci", "pcie-root-port", 1, port=4096)
    with pytest.raises(ConfigError, match="chassis 300 is not 0-255"):
        ControllerConfig("pci", "pci-bridge", 1, chassis=300)
