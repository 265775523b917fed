"""``pyhv run DOMAIN.xml`` with ``<interface type='bridge'>`` (tier kvm), inside a
network namespace this test creates: pyhv opens a tap, brings it up and puts it on
the bridge the domain names; the test-kit guest's virtio-net driver
(``pyhv.virtio-net=msix``) sends its frames, which a packet socket on the bridge sees
with the MAC the domain gave; the guest then powers off and ``pyhv run`` exits 0.
A bridge that does not exist fails the start with one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parent.parent
PYHV = str(Path(sys.executable).with_name("pyhv"))
MAC = "52:54:00:62:72:30"

SCRIPT = textwrap.dedent("""
    import socket, subprocess, sys, time
    pyhv, xml, bridge = sys.argv[1:4]
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "link", "add", "pyhvbr0", "type", "bridge"],
                ["ip", "link", "set", "pyhvbr0", "up"]):
        subprocess.run(cmd, check=True)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
    s.bind(("pyhvbr0", 0))
    s.settimeout(1)
    p = subprocess.run([pyhv, "run", xml], capture_output=True, text=True, timeout=120)
    frames = []
    while True:
        try:
            frames.append(s.recv(2000).hex())
        except TimeoutError:
            break
    print(p.returncode)
    print(p.stderr.strip().replace(chr(10), " | ") or "-")
    print(" ".join(frames) or "-")
""")


def domain(tmp_path: Path, kernel: Path, bridge: str) -> Path:
    xml = tmp_path / "dom.xml"
    xml.write_text(f"""<domain type='kvm'>
  <name>bridged</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
    <cmdline>console=ttyS0 pyhv.pci pyhv.virtio-net=msix</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='file'><source path='{tmp_path / "serial.txt"}'/></serial>
    <interface type='bridge'><source bridge='{bridge}'/><mac address='{MAC}'/>
      <model type='virtio'/></interface>
    <memballoon model='none'/>
  </devices>
</domain>""")
    return xml


def run_in_namespace(xml: Path) -> list[str]:
    p = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT, PYHV, str(xml), "x"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.splitlines()


def test_pyhv_run_puts_the_tap_on_the_bridge(guests, tmp_path):
    rc, err, frames = run_in_namespace(domain(tmp_path, guests.pvh_elf, "pyhvbr0"))
    assert rc == "0", err
    mine = [bytes.fromhex(f) for f in frames.split() if f != "-"]
    assert mine, "no frame of the guest reached the bridge"
    src = bytes.fromhex(MAC.replace(":", ""))
    assert all(f[6:12] == src and f[14:23] == b"pyhv-net " for f in mine), mine
    report = (tmp_path / "serial.txt").read_text()
    assert "tx-hello" in report  # the guest's own account of the frame it sent


def test_a_missing_bridge_is_one_line(guests, tmp_path):
    rc, err, _frames = run_in_namespace(domain(tmp_path, guests.pvh_elf, "nosuchbr9"))
    assert rc != "0"
    assert "cannot join bridge nosuchbr9" in err and " | " not in err, err
