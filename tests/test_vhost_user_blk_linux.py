"""Tier linux: Debian's cloud kernel boots under QEMU (TCG, memory on a shared memfd)
with a busybox initramfs built here, loads its own virtio modules, and its virtio_blk
driver uses ``pyhv vhost-user-blk``: it reads the disk's size, writes 1 MiB of random
data with the page cache bypassed by a sync and a cache drop, reads it back, and
powers off.  The host checks the checksums: the guest's, the guest's read-back and the
file's bytes at the same place must all agree.

The initramfs is written by :func:`newc` (the cpio format the kernel unpacks), so the
console node needs no mknod and the test needs no root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cloud_kernel
from test_vhost_user_blk_qemu import wait_for_socket

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(not shutil.which("qemu-system-x86_64"),
                                 reason="qemu-system-x86_64 is not installed")]

MiB = 1 << 20
DISK = 16 * MiB
MODULES = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
           "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
           "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
           "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/block/virtio_blk.ko")
#: the load order (virtio_ring before virtio's users)
LOAD = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
        "virtio_pci", "virtio_blk")

INIT = """#!/bin/busybox sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
for m in {load}; do busybox insmod /lib/$m.ko || echo INSMOD-FAILED $m; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i+1)); done
echo VDA-SECTORS $(busybox cat /sys/block/vda/size)
busybox dd if=/dev/urandom of=/pattern bs=4096 count=256 2>/dev/null
echo PATTERN-SUM $(busybox sha256sum /pattern)
busybox dd if=/pattern of=/dev/vda bs=4096 seek=1 conv=fsync 2>/dev/null
busybox sync
echo 3 > /proc/sys/vm/drop_caches
echo READ-SUM $(busybox dd if=/dev/vda bs=4096 skip=1 count=256 2>/dev/null | busybox sha256sum)
echo GUEST-DONE
busybox poweroff -f
"""


def newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive in the kernel's newc format: (name, mode, data, rdev) each."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)]):
        raw = name.encode() + b"\0"
        fields = [ino + 1, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF,
                  len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs(tmp: Path, kernel: str) -> Path:
    version = re.sub(r"^.*vmlinuz-", "", kernel)
    moddir = Path("/lib/modules") / version
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "lib", "mnt")]
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes(), 0))
    for rel in MODULES:
        path = moddir / rel
        if not path.exists():
            pytest.skip(f"{path} is missing")
        entries.append((f"lib/{path.name}", 0o100644, path.read_bytes(), 0))
    entries.append(("init", 0o100755, INIT.format(load=" ".join(LOAD)).encode(), 0))
    image = tmp / "initramfs.cpio"
    image.write_bytes(newc(entries))
    return image


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_linux_virtio_blk_driver_on_pyhv_vhost_user_blk(tmp_path, fmt):
    """``qcow2``: the disk is a qcow2 overlay (64 KiB clusters) over the raw image, as
    a cloud instance's is: Linux's writes land in the overlay, the base is untouched,
    and the chain read back (``qemu-img convert``) holds them; ``qemu-img check`` is
    clean."""
    kernel = cloud_kernel()
    assert kernel is not None
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    initrd = initramfs(tmp_path, kernel)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * DISK)
    disk = image
    if fmt == "qcow2":
        disk = tmp_path / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        "cluster_size=65536", "-b", str(image), "-F", "raw", str(disk)],
                       check=True)
    sock = tmp_path / "blk.sock"
    log = (tmp_path / "backend.log").open("w")
    backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk", "--socket",
                                str(sock), "--disk", str(disk), "--format", fmt], stderr=log)
    try:
        wait_for_socket(sock, backend)
        start = time.monotonic()
        done = subprocess.run(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "256",
             "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
             "-machine", "pc,memory-backend=mem", "-nodefaults", "-no-user-config",
             "-display", "none", "-serial", "stdio", "-no-reboot",
             "-kernel", kernel, "-initrd", str(initrd),
             "-append", "console=ttyS0 panic=-1 quiet",
             "-chardev", f"socket,id=c,path={sock}",
             "-device", "vhost-user-blk-pci,chardev=c"],
            timeout=240, check=False, capture_output=True, text=True)
        seconds = time.monotonic() - start
        backend.terminate()
        assert backend.wait(10) == 0
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait()
        log.close()
    out = done.stdout
    assert "GUEST-DONE" in out, out[-3000:] + done.stderr[-2000:]
    assert "INSMOD-FAILED" not in out, out[-3000:]
    sectors = int(re.search(r"VDA-SECTORS (\d+)", out).group(1))
    assert sectors == DISK // 512
    wrote = re.search(r"PATTERN-SUM ([0-9a-f]{64})", out).group(1)
    read = re.search(r"READ-SUM ([0-9a-f]{64})", out).group(1)
    if fmt == "qcow2":
        assert image.read_bytes() == b"\xa5" * DISK  # the base: untouched
        check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        image = tmp_path / "flat.img"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(image)],
                       check=True)
    data = image.read_bytes()
    assert hashlib.sha256(data[4096:4096 + MiB]).hexdigest() == wrote == read
    assert data[:4096] == b"\xa5" * 4096 and data[4096 + MiB:] == b"\xa5" * (DISK - 4096 - MiB)
    print(f"Linux under QEMU (TCG) on pyhv vhost-user-blk ({fmt}): {seconds:.1f} s")
