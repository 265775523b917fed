"""Tier linux: Debian's cloud kernel boots under QEMU (TCG, memory on a shared memfd)
with a busybox initramfs built here, loads its own virtio modules, and its virtio_blk
driver uses ``pyhv vhost-user-blk``: it reads the disk's size, writes 1 MiB of random
data with the page cache bypassed by a sync and a cache drop, reads it back, and
powers off.  The host checks the checksums: the guest's, the guest's read-back and the
file's bytes at the same place must all agree.

A second run makes ext4 in the guest with e2fsprogs' own mke2fs on a backend with two
request queues and ``--discard unmap``, runs fstrim, and checks a ``--readonly``
export from inside the guest; the host runs ``e2fsck -fn`` and reads the files back.

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
from typing import Optional, Sequence

import pytest
from conftest import cloud_kernel
from test_vhost_user_blk_qemu import reap, wait_for_socket

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(not shutil.which("qemu-system-x86_64"),
                                 reason="qemu-system-x86_64 is not installed")]

MiB = 1 << 20
DISK = 16 * MiB
#: the cloud kernel's virtio-pci transport, as modules, and their load order
#: (virtio_ring before virtio's users); a device's driver comes after them
VIRTIO_PCI = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
              "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
              "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
              "kernel/drivers/virtio/virtio_pci.ko")
VIRTIO_PCI_LOAD = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                   "virtio_pci")
MODULES = VIRTIO_PCI + ("kernel/drivers/block/virtio_blk.ko",)
LOAD = VIRTIO_PCI_LOAD + ("virtio_blk",)

#: an init's first steps: the filesystems, then the modules (``{load}``, in order)
BASE = """#!/bin/busybox sh
export PATH=/bin:/sbin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
for m in {load}; do busybox insmod /lib/$m.ko || echo INSMOD-FAILED $m; done
"""
#: ... and then /dev/vda
PREAMBLE = BASE + """i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i+1)); done
"""

INIT = PREAMBLE + """echo VDA-SECTORS $(busybox cat /sys/block/vda/size)
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


def initramfs(tmp: Path, kernel: str, init: Optional[str] = None,
              modules: tuple[str, ...] = MODULES, load: tuple[str, ...] = LOAD) -> Path:
    """Busybox, the kernel's ``modules`` (paths under its /lib/modules) and ``init``
    (default :data:`INIT`; ``{load}`` in it becomes ``load``) as /init; the test
    skips when a module is missing."""
    version = re.sub(r"^.*vmlinuz-", "", kernel)
    moddir = Path("/lib/modules") / version
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "lib", "mnt")]
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes(), 0))
    for rel in modules:
        path = moddir / rel
        if not path.exists():
            pytest.skip(f"{path} is missing")
        entries.append((f"lib/{path.name}", 0o100644, path.read_bytes(), 0))
    entries.append(("init", 0o100755,
                    (INIT if init is None else init).format(load=" ".join(load)).encode(), 0))
    image = tmp / "initramfs.cpio"
    image.write_bytes(newc(entries))
    return image


def tcg_argv(kernel: str, initrd: Path, *devices: str, serial: str = "stdio",
             qemu: Sequence[str] = ("qemu-system-x86_64",), smp: int = 1) -> list[str]:
    """QEMU under TCG booting ``kernel`` with ``initrd``, 256 MiB of guest RAM on a
    shared memfd (what a vhost-user backend maps), the console on COM1 to
    ``serial``, no reboot, and ``devices`` (its ``-chardev``/``-device`` options)."""
    return [*qemu, "-accel", "tcg", "-m", "256", "-smp", str(smp),
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine", "pc,memory-backend=mem", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", serial, "-no-reboot",
            "-kernel", kernel, "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet", *devices]


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
            tcg_argv(kernel, initrd, "-chardev", f"socket,id=c,path={sock}",
                     "-device", "vhost-user-blk-pci,chardev=c"),
            timeout=240, check=False, capture_output=True, text=True)
        seconds = time.monotonic() - start
        backend.terminate()
        assert backend.wait(10) == 0
    finally:
        reap(backend)
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


# ---- ext4, fstrim, two queues and a read-only export --------------------------------------

EXT4_INIT = PREAMBLE + """i=0
while [ ! -b /dev/vdb ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i+1)); done
echo NQUEUES $(busybox ls /sys/block/vda/mq | busybox wc -l)
/sbin/mke2fs -q -F -t ext4 -E nodiscard /dev/vda && echo MKFS-OK
busybox mount -t ext4 /dev/vda /mnt && echo MOUNT-OK
for f in f1 f2 f3 f4; do
  busybox dd if=/dev/urandom of=/mnt/$f bs=4096 count=64 2>/dev/null
  echo SUM $f $(busybox sha256sum /mnt/$f | busybox cut -d' ' -f1)
done
busybox dd if=/dev/urandom of=/mnt/big bs=1048576 count=8 2>/dev/null
busybox sync
busybox rm /mnt/big
busybox sync
echo FSTRIM $(busybox fstrim -v /mnt)
busybox umount /mnt && echo UMOUNT-OK
echo RO-FLAG $(busybox cat /sys/block/vdb/ro)
busybox dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null
echo RO-WRITE-RC $?
echo RO-READ $(busybox dd if=/dev/vdb bs=512 count=1 2>/dev/null | busybox sha256sum)
echo GUEST-DONE
busybox poweroff -f
"""


def ext4_initramfs(tmp: Path, kernel: str) -> Path:
    """The initramfs above plus e2fsprogs' mke2fs with the libraries it links
    (``ldd``), so that the guest makes its own ext4."""
    version = re.sub(r"^.*vmlinuz-", "", kernel)
    moddir = Path("/lib/modules") / version
    mke2fs = Path("/sbin/mke2fs")
    if not mke2fs.exists():
        pytest.skip("e2fsprogs (mke2fs) is not installed")
    dirs = {"bin", "sbin", "dev", "proc", "sys", "lib", "mnt", "etc"}
    files: list[tuple[str, int, bytes, int]] = [
        ("dev/console", 0o020600, b"", (5 << 8) | 1),
        ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes(), 0),
        ("sbin/mke2fs", 0o100755, mke2fs.read_bytes(), 0)]
    if Path("/etc/mke2fs.conf").exists():
        files.append(("etc/mke2fs.conf", 0o100644, Path("/etc/mke2fs.conf").read_bytes(), 0))
    ldd = subprocess.run(["ldd", str(mke2fs)], capture_output=True, text=True, check=True)
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd.stdout):
        real = Path(lib).resolve()
        rel = lib.lstrip("/")
        parts = Path(rel).parts
        for k in range(1, len(parts)):
            dirs.add(str(Path(*parts[:k])))
        files.append((rel, 0o100755, real.read_bytes(), 0))
    for rel in MODULES:
        path = moddir / rel
        if not path.exists():
            pytest.skip(f"{path} is missing")
        files.append((f"lib/{path.name}", 0o100644, path.read_bytes(), 0))
    files.append(("init", 0o100755, EXT4_INIT.format(load=" ".join(LOAD)).encode(), 0))
    entries = [(d, 0o040755, b"", 0) for d in sorted(dirs)] + files
    image = tmp / "initramfs-ext4.cpio"
    image.write_bytes(newc(entries))
    return image


def test_linux_ext4_fstrim_two_queues_and_a_readonly_export(tmp_path):
    """Linux's virtio_blk on two ``pyhv vhost-user-blk`` backends: on the first (two
    request queues, ``--discard unmap``) the guest makes ext4 with e2fsprogs' own
    mke2fs, writes files, deletes an 8 MiB one and runs fstrim; the host's
    ``e2fsck -fn`` finds nothing wrong, the files read back (debugfs) with the
    guest's checksums, and the trimmed range was freed in the image.  The second is a
    ``--readonly`` export: the guest sees it read-only, its write fails, and the
    image is unchanged."""
    kernel = cloud_kernel()
    assert kernel is not None
    if not os.path.exists("/bin/busybox") or not shutil.which("e2fsck") or \
            not shutil.which("debugfs"):
        pytest.skip("busybox-static and e2fsprogs are needed")
    initrd = ext4_initramfs(tmp_path, kernel)
    disk = tmp_path / "ext4.img"
    with disk.open("wb") as f:
        f.truncate(64 * MiB)
    ro = tmp_path / "ro.img"
    ro_data = os.urandom(MiB)
    ro.write_bytes(ro_data)
    backends, logs = [], []
    socks = (tmp_path / "rw.sock", tmp_path / "ro.sock")
    args = (["--disk", str(disk), "--queues", "2", "--discard", "unmap"],
            ["--disk", str(ro), "--readonly"])
    try:
        for sock, extra in zip(socks, args):
            log = (tmp_path / f"{sock.stem}.log").open("w")
            logs.append(log)
            backends.append(subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk",
                                              "--socket", str(sock), *extra], stderr=log))
            wait_for_socket(sock, backends[-1])
        # two vCPUs: Linux's virtio_blk uses at most one request queue per CPU
        done = subprocess.run(
            tcg_argv(kernel, initrd,
                     "-chardev", f"socket,id=c0,path={socks[0]}",
                     "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2",
                     "-chardev", f"socket,id=c1,path={socks[1]}",
                     "-device", "vhost-user-blk-pci,chardev=c1,num-queues=1", smp=2),
            timeout=300, check=False, capture_output=True, text=True)
        for b in backends:
            b.terminate()
            assert b.wait(10) == 0
    finally:
        reap(*backends)
        for log in logs:
            log.close()
    out = done.stdout
    assert "GUEST-DONE" in out, out[-3000:] + done.stderr[-2000:]
    assert "INSMOD-FAILED" not in out, out[-3000:]
    for marker in ("MKFS-OK", "MOUNT-OK", "UMOUNT-OK"):
        assert marker in out, out[-3000:]
    assert re.search(r"NQUEUES 2\b", out), out[-3000:]
    trimmed = re.search(r"FSTRIM /mnt: (\d+) bytes trimmed", out)
    assert trimmed and int(trimmed.group(1)) >= 8 * MiB, out[-3000:]
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = dict(re.findall(r"SUM (f\d) ([0-9a-f]{64})", out))
    assert sorted(sums) == ["f1", "f2", "f3", "f4"]
    for name, want in sums.items():
        got = subprocess.run(["debugfs", "-R", f"cat /{name}", str(disk)],
                             capture_output=True, check=True).stdout
        assert hashlib.sha256(got).hexdigest() == want, name
    # the 8 MiB file's blocks were written, then trimmed: the image holds far less
    assert os.stat(disk).st_blocks * 512 < 8 * MiB, os.stat(disk).st_blocks
    assert re.search(r"RO-FLAG 1\b", out), out[-3000:]
    rc = re.search(r"RO-WRITE-RC (\d+)", out)
    assert rc and rc.group(1) != "0", out[-3000:]
    assert hashlib.sha256(ro_data[:512]).hexdigest() in out
    assert ro.read_bytes() == ro_data


# ---- a frontend killed mid-I/O -----------------------------------------------------------

WRITER_INIT = PREAMBLE + """busybox mount -t ext4 /dev/vda /mnt && echo MOUNT-OK
i=0
while true; do
  busybox dd if=/dev/urandom of=/mnt/f$i bs=65536 count=8 conv=fsync 2>/dev/null
  echo WROTE $i
  i=$((i+1))
done
"""

CHECKER_INIT = PREAMBLE + """busybox mount -t ext4 /dev/vda /mnt && echo MOUNT-OK
echo FILES $(busybox ls /mnt | busybox grep -c '^f')
busybox dd if=/dev/urandom of=/mnt/after bs=65536 count=4 conv=fsync 2>/dev/null && echo WRITE-OK
busybox umount /mnt && echo UMOUNT-OK
echo GUEST-DONE
busybox poweroff -f
"""


def test_qemu_killed_mid_io_the_backend_serves_the_next_and_ext4_is_consistent(tmp_path):
    """QEMU is SIGKILLed while its guest writes files on ext4 (each dd fsync'd):
    ``pyhv vhost-user-blk`` stays up, the next QEMU's guest mounts the filesystem
    (the journal replays), writes, unmounts and powers off, and the host's
    ``e2fsck -fn`` finds nothing wrong."""
    kernel = cloud_kernel()
    assert kernel is not None
    if not os.path.exists("/bin/busybox") or not shutil.which("e2fsck") or \
            not shutil.which("mke2fs"):
        pytest.skip("busybox-static and e2fsprogs are needed")
    disk = tmp_path / "ext4.img"
    with disk.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", str(disk)],
                   check=True)
    for d in ("w", "c"):
        (tmp_path / d).mkdir()
    writer = initramfs(tmp_path / "w", kernel, WRITER_INIT)
    checker = initramfs(tmp_path / "c", kernel, CHECKER_INIT)
    sock = tmp_path / "blk.sock"
    log_path = tmp_path / "backend.log"
    console = tmp_path / "console1.txt"
    console.touch()
    with log_path.open("w") as log:
        backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk",
                                    "--socket", str(sock), "--disk", str(disk)], stderr=log)
        try:
            wait_for_socket(sock, backend)
            blk = ("-chardev", f"socket,id=c,path={sock}",
                   "-device", "vhost-user-blk-pci,chardev=c")
            first = subprocess.Popen(tcg_argv(kernel, writer, *blk, serial=f"file:{console}"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
            try:
                end = time.monotonic() + 120
                while "WROTE 3" not in console.read_text(errors="replace"):
                    assert first.poll() is None, console.read_text(errors="replace")[-3000:]
                    assert time.monotonic() < end, "the guest never wrote its fourth file"
                    time.sleep(0.02)
                time.sleep(0.05)  # into the next file's writes
            finally:
                first.kill()
                first.wait()
            assert backend.poll() is None, log_path.read_text()
            done = subprocess.run(tcg_argv(kernel, checker, *blk),
                                  timeout=240, check=False, capture_output=True, text=True)
            assert backend.poll() is None, log_path.read_text()
            backend.terminate()
            assert backend.wait(10) == 0
        finally:
            reap(backend)
    out = done.stdout
    assert "GUEST-DONE" in out, out[-3000:] + done.stderr[-2000:]
    for marker in ("MOUNT-OK", "WRITE-OK", "UMOUNT-OK"):
        assert marker in out, out[-3000:]
    files = re.search(r"FILES (\d+)", out)
    assert files and int(files.group(1)) >= 4, out[-3000:]
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
