"""libvirt networking with pyhv-qemu (tier libvirt): a private libvirtd in its own
network namespace (every bridge, tap and frame stays there and ends with it)
defines an isolated network (a bridge, no address, no forwarding); domains on it
and on a plain bridge get taps libvirt opened and passed to pyhv-qemu, and virsh
manages their links and reads their statistics."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from libvirt_daemon import LibvirtDaemon, unavailable_reason
from test_libvirt import EMULATOR, Console, define, log_tail, state, virsh

pytestmark = pytest.mark.libvirt

NETWORK = "pyhvnet"
BRIDGE = "pyhvbr0"
MAC = "52:54:00:6e:65:74"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    assert os.access(EMULATOR, os.X_OK), f"{EMULATOR}: pyhv-qemu is not installed"
    # the daemons' own network namespace (``unshare --net``, made by LibvirtDaemon):
    # every bridge, tap and frame below lives there and ends with it.  Checked before
    # any network is made, so a daemon that shared ours would stop the module here.
    with LibvirtDaemon(tmp_path_factory.mktemp("libvirt-net"), net_namespace=True) as d:
        theirs = os.readlink(f"/proc/{d.libvirtd_pid()}/ns/net")
        assert theirs != os.readlink("/proc/self/ns/net"), \
            "libvirtd runs in this host's network namespace"
        net = tmp_path_factory.mktemp("net") / "net.xml"
        net.write_text(f"<network><name>{NETWORK}</name><bridge name='{BRIDGE}'/></network>")
        virsh(d, "net-define", str(net))
        virsh(d, "net-start", NETWORK)
        yield d


def domain(name: str, kernel: Path, cmdline: str, interface: str) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><cmdline>{cmdline}</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <serial type='pty'><target port='0'/></serial>
    {interface}
    <memballoon model='none'/>
  </devices>
</domain>"""


def tap_on_the_bridge(daemon: LibvirtDaemon, name: str) -> str:
    """The tap ``virsh domiflist`` shows for the NIC on the network, checked to be
    on the network's bridge."""
    out = virsh(daemon, "domiflist", name).stdout
    m = re.search(rf"(vnet\d+)\s+network\s+{NETWORK}\s+virtio\s+{MAC}", out)
    assert m, out
    links = daemon.in_net_namespace("ip", "-o", "link", "show", "master", BRIDGE)
    assert m.group(1) in links.stdout, links.stdout + links.stderr
    return m.group(1)

def test_network_interface_link_and_stats(daemon, guests, tmp_path):
    """<interface type='network'>: libvirt makes the tap, puts it on the network's
    bridge and passes it; domiflist, domif-setlink/getlink (QMP set_link) and
    domifstat work, and the link state survives in the live XML."""
    name = "netlink"
    iface = (f"<interface type='network'><source network='{NETWORK}'/>"
             f"<mac address='{MAC}'/><model type='virtio'/></interface>")
    define(daemon, tmp_path, name, domain(name, guests.pvh_elf, "pyhv.wait=powerbutton",
                                          iface))
    try:
        virsh(daemon, "start", name)
        assert state(daemon, name) == "running (booted)", log_tail(daemon, (name,))
        tap = tap_on_the_bridge(daemon, name)
        assert virsh(daemon, "domif-getlink", name, tap).stdout.strip().endswith("up")
        virsh(daemon, "domif-setlink", name, tap, "down")
        assert virsh(daemon, "domif-getlink", name, tap).stdout.strip().endswith("down")
        assert "<link state='down'/>" in virsh(daemon, "dumpxml", name).stdout
        virsh(daemon, "domif-setlink", name, tap, "up")
        assert virsh(daemon, "domif-getlink", name, tap).stdout.strip().endswith("up")
        stats = virsh(daemon, "domifstat", name, tap).stdout
        assert re.search(rf"{tap} rx_bytes \d+", stats) and \
            re.search(rf"{tap} tx_packets \d+", stats), stats
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)



def test_interface_hotplug(daemon, guests, tmp_path):
    """`virsh attach-interface --live` / `detach-interface --live` on a q35 domain with
    spare root ports, the guest running the test kit's hotplug driver: libvirt opens
    the tap, puts it on the network's bridge, passes it with getfd (SCM_RIGHTS) and
    sends netdev_add + device_add; the guest powers the slot on and reads the NIC's
    MAC.  On detach the guest lets go, pyhv closes the tap (it leaves the bridge) and
    libvirt drops the NIC from the live XML."""
    name = "hotnic"
    spare = "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>"
                    for i in (1, 2))
    xml = domain(name, guests.pvh_elf, "pyhv.pci pyhv.hotplug pyhv.wait=echo", spare)
    define(daemon, tmp_path, name, xml.replace("machine='pc'", "machine='q35'"))
    try:
        virsh(daemon, "start", name)
        con = Console(daemon, name)
        con.read_until("@hotplug step=ready")
        virsh(daemon, "attach-interface", name, "network", NETWORK, "--model", "virtio",
              "--mac", MAC, "--live")
        tap = tap_on_the_bridge(daemon, name)
        filters = virsh(daemon, "qemu-monitor-command", name,
                        '{"execute":"query-rx-filter"}').stdout
        assert MAC in filters, filters
        assert virsh(daemon, "domif-getlink", name, tap).stdout.strip().endswith("up")
        text = con.read_until("@hotplug step=unplug-ready")
        device = next(ln for ln in text.splitlines() if "@hotplug step=device" in ln)
        assert "device=0x1041" in device and f"mac={MAC}" in device, device
        virsh(daemon, "detach-interface", name, "network", "--mac", MAC, "--live")
        text = con.read_until("@echo-ready")
        con.close()
        assert "@hotplug step=removed" in text, text[-2000:]
        assert MAC not in virsh(daemon, "domiflist", name).stdout
        links = daemon.in_net_namespace("ip", "-o", "link", "show", "master", BRIDGE)
        assert tap not in links.stdout, links.stdout  # closed by pyhv, gone
        assert "running" in state(daemon, name)
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)

CAPTURE = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.bind((sys.argv[1], 0))
    s.settimeout(1)
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            frame = s.recv(2000)
        except TimeoutError:
            continue
        print(frame.hex(), flush=True)
        break
""")


def test_virt_install_default_network(daemon, guests, tmp_path):
    """virt-install with its defaults and only --graphics none (no --network, no
    --channel: virtio-net on libvirt's network named 'default', q35, root ports,
    xHCI, rng, balloon, agent channel): the domain starts, libvirt plugs the tap into
    the bridge, and the frame the guest's virtio-net driver sends arrives on it."""
    if not shutil.which("virt-install"):
        pytest.skip("virt-install is not installed")
    net = tmp_path / "default.xml"
    net.write_text("<network><name>default</name><bridge name='pyhvbr1'/></network>")
    virsh(daemon, "net-define", str(net))
    virsh(daemon, "net-start", "default")
    name = "vinstallnet"
    capture = subprocess.Popen(["nsenter", "-t", str(daemon.libvirtd_pid()), "-m", "-n",
                                sys.executable, "-c",
                                CAPTURE, "pyhvbr1", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert capture.stdout is not None
        assert capture.stdout.readline().strip() == "ready", capture.stderr.read()
        p = subprocess.run(
            ["virt-install", "--connect", daemon.uri, "--name", name, "--memory", "64",
             "--vcpus", "1", "--osinfo", "debian11",
             "--boot", f"kernel={guests.pvh_elf},kernel_args=console=ttyS0 pyhv.pci "
                       f"pyhv.virtio-net=msix,emulator={EMULATOR}",
             "--import", "--disk", "none", "--graphics", "none", "--noautoconsole"],
            capture_output=True, text=True, timeout=180, env=daemon.client_env())
        assert p.returncode == 0, p.stdout + p.stderr + log_tail(daemon, (name,))
        xml = virsh(daemon, "dumpxml", name).stdout
        assert "<interface type='network'>" in xml and "<model type='virtio'/>" in xml
        mac = re.search(r"<mac address='([0-9a-f:]+)'/>", xml)
        assert mac, xml
        out, err = capture.communicate(timeout=90)
        assert out.strip(), "no frame from the guest on the bridge: " + err
        frame = bytes.fromhex(out.split()[0])
        assert frame[6:12] == bytes.fromhex(mac.group(1).replace(":", ""))
        # one of the driver's frames (the first may leave before the bridge port
        # forwards; the guest sends more)
        assert frame[12:14] == b"\x88\xb5" and frame[14:23] == b"pyhv-net "
    finally:
        capture.kill()
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
        virsh(daemon, "net-destroy", "default", check=False)
        virsh(daemon, "net-undefine", "default", check=False)


def test_bridge_interface(daemon, guests, tmp_path):
    """<interface type='bridge'>: libvirt makes the tap and puts it on a bridge the
    test made (in the daemons' namespace); pyhv-qemu serves it."""
    for cmd in (("ip", "link", "add", "pyhvbr2", "type", "bridge"),
                ("ip", "link", "set", "pyhvbr2", "up")):
        r = daemon.in_net_namespace(*cmd)
        assert r.returncode == 0, r.stderr
    name = "bridged"
    iface = ("<interface type='bridge'><source bridge='pyhvbr2'/>"
             "<mac address='52:54:00:62:72:32'/><model type='virtio'/></interface>")
    define(daemon, tmp_path, name, domain(name, guests.pvh_elf, "pyhv.wait=powerbutton",
                                          iface))
    try:
        virsh(daemon, "start", name)
        assert state(daemon, name) == "running (booted)", log_tail(daemon, (name,))
        out = virsh(daemon, "domiflist", name).stdout
        m = re.search(r"(vnet\d+)\s+bridge\s+pyhvbr2\s+virtio\s+52:54:00:62:72:32", out)
        assert m, out
        links = daemon.in_net_namespace("ip", "-o", "link", "show", "master", "pyhvbr2")
        assert m.group(1) in links.stdout, links.stdout + links.stderr
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
        daemon.in_net_namespace("ip", "link", "del", "pyhvbr2")
