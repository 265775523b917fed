"""Real Linux under pyhv.

Tier ``linux``: Debian's cloud kernel, its vmlinux extracted by ``pyhv
extract-vmlinux``, entered directly in 64-bit mode, must print (within 120 s on
this PVM host, where guest kernel code is emulated) the command line pyhv
passed, the e820 map pyhv built, KVM detection, each ACPI table at the address
pyhv wrote it, and the MADT's CPU count.

Tier ``hwvirt``: the same kernel with a busybox initramfs boots to userspace and
powers off; only where /dev/kvm is hardware-backed.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cloud_kernel

from pyhv.config import KernelBoot, SerialConfig, VmConfig
from pyhv.engine import layout
from pyhv.engine.acpi import build_acpi
from pyhv.engine.builder import acpi_description
from pyhv.engine.machine import Machine

MiB = 1 << 20
E820_NAMES = {layout.E820_RAM: "usable", layout.E820_RESERVED: "reserved",
              layout.E820_ACPI: "ACPI data"}


@pytest.fixture(scope="module")
def vmlinux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kernel = cloud_kernel()
    assert kernel is not None
    out = tmp_path_factory.mktemp("linux") / "vmlinux"
    p = subprocess.run([sys.executable, "-m", "pyhv", "extract-vmlinux", kernel, str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"
    return out


def expected_lines(cmdline: str, memory: int, cpus: int, exact_e820: bool = True) -> list[str]:
    lines = [f"Command line: {cmdline}", "Hypervisor detected: KVM"]
    for e in layout.e820_map(memory):
        if exact_e820 or e.type == layout.E820_RAM and e.addr >= layout.HIMEM_START:
            lines.append(f"BIOS-e820: [mem {e.addr:#018x}-{e.end - 1:#018x}] "
                         f"{E820_NAMES[e.type]}")
    tables = build_acpi(acpi_description(VmConfig(KernelBoot("vmlinux"), memory=memory,
                                                  vcpus=cpus)))
    lines.append(f"ACPI: RSDP {tables.rsdp_addr:#018X}".replace("0X", "0x"))
    for sig in ("XSDT", "FACP", "DSDT", "APIC"):
        lines.append(f"ACPI: {sig} {tables.addresses[sig]:#018X}".replace("0X", "0x"))
    lines.append("ACPI: Using ACPI (MADT) for SMP configuration information")
    lines.append(f"smpboot: Allowing {cpus} CPUs")
    return lines


@pytest.mark.linux
@pytest.mark.kvm
@pytest.mark.parametrize("protocol", ["linux", "pvh"])
def test_linux_early_boot(vmlinux, tmp_path, protocol):
    """Entered in 64-bit mode (Linux boot protocol) or in 32-bit mode through its PVH
    note (what ``auto`` picks for a vmlinux).  Under PVH Linux itself reserves the
    legacy area below 1 MiB, so only the RAM above 1 MiB is compared there."""
    cpus, memory = 2, 128 * MiB
    cmdline = "earlyprintk=ttyS0 console=ttyS0 no_timer_check tsc=reliable pyhv.marker=42"
    out = tmp_path / "console.log"
    cfg = VmConfig(KernelBoot(str(vmlinux), None, cmdline, protocol), memory=memory,  # type: ignore[arg-type]
                   vcpus=cpus, serial=SerialConfig("file", str(out)))
    want = expected_lines(cmdline, memory, cpus, exact_e820=protocol == "linux")
    m = Machine(cfg)
    missing = want
    try:
        m.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not m.finished:
            select.select([m.event_fd], [], [], 0.5)
            m.process_events()
            text = out.read_text(errors="replace")
            missing = [w for w in want if w not in text]
            if not missing:
                break
    finally:
        m.close()
    text = out.read_text(errors="replace")
    assert not missing, f"missing {missing}\n--- console ---\n{text[-3000:]}"
    if protocol == "linux":
        # the kernel saw exactly the map pyhv built: no other e820 lines
        e820 = re.findall(r"BIOS-e820: \[mem [^\]]+\] .*", text)
        assert len(e820) == len(layout.e820_map(memory))


def _initramfs(tmp: Path) -> Path:
    """A busybox initramfs whose /init prints a marker and powers off."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    root = tmp / "root"
    for d in ("bin", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    # /init's output needs the console node: nothing mounts devtmpfs in an initramfs
    console = root / "dev" / "console"
    if not console.exists():
        os.mknod(console, 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    (root / "init").write_text("#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
                               "echo PYHV-USERSPACE-OK $(/bin/busybox cat /proc/cmdline)\n"
                               "/bin/busybox poweroff -f\n")
    (root / "init").chmod(0o755)
    image = tmp / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    with open(image, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                       stdout=f, check=True)
    return image


def test_initramfs_for_the_hwvirt_tier(tmp_path):
    """The image the hwvirt tier boots: /init, busybox and the console node
    (checked here because the boot itself cannot run on this host)."""
    if os.geteuid() != 0 or not shutil.which("cpio") or not os.path.exists("/bin/busybox"):
        pytest.skip("needs root (mknod), cpio and busybox-static")
    image = _initramfs(tmp_path)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=open(image, "rb"),
                             capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in listing.splitlines()}
    assert {"init", "bin/busybox", "dev/console"} <= names
    assert re.search(r"^crw.* 5,\s+1 .* dev/console$", listing, re.M), listing
    assert re.search(r"^-rwx.* init$", listing, re.M)


@pytest.mark.hwvirt
@pytest.mark.linux
def test_linux_boots_to_userspace_and_powers_off(tmp_path):
    kernel = cloud_kernel()
    assert kernel is not None and os.path.exists("/bin/busybox")
    out = tmp_path / "console.log"
    cfg = VmConfig(KernelBoot(kernel, str(_initramfs(tmp_path)), "console=ttyS0 panic=-1"),
                   memory=256 * MiB, vcpus=2, serial=SerialConfig("file", str(out)))
    m = Machine(cfg)
    try:
        m.start()
        ev = m.run(timeout=120)
    finally:
        m.close()
    text = out.read_text(errors="replace")
    assert "PYHV-USERSPACE-OK console=ttyS0 panic=-1" in text, text[-3000:]
    assert ev.kind == "powered-off" and ev.detail == "guest"
