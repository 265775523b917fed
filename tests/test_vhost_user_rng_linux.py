"""Tier linux: Debian's cloud kernel boots under QEMU (TCG, memory on a shared memfd)
with a busybox initramfs built here, and its virtio-rng driver draws entropy from
``pyhv vhost-user-rng`` through QEMU's ``vhost-user-rng-pci``: the driver binds (the
kernel's current hardware RNG is virtio_rng), and 4 KiB read from /dev/hwrng are not
constant and are not the same in two reads."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cloud_kernel
from test_vhost_user_blk_linux import BASE, VIRTIO_PCI, VIRTIO_PCI_LOAD, initramfs, tcg_argv
from test_vhost_user_blk_qemu import wait_for_socket

pytestmark = pytest.mark.linux

MODULES = VIRTIO_PCI + ("kernel/drivers/char/hw_random/virtio-rng.ko",)
LOAD = VIRTIO_PCI_LOAD + ("virtio-rng",)

INIT = BASE + """echo RNG-CURRENT $(busybox cat /sys/class/misc/hw_random/rng_current)
for i in 1 2; do
  echo RNG-HEX $(busybox dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | busybox od -An -v -tx1)
done
echo GUEST-DONE
busybox poweroff -f
"""


def test_linux_virtio_rng_driver_on_pyhv_vhost_user_rng(tmp_path):
    kernel = cloud_kernel()
    assert kernel is not None
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    initrd = initramfs(tmp_path, kernel, INIT, MODULES, LOAD)
    sock = tmp_path / "rng.sock"
    backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-rng", "--socket",
                                str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_socket(sock, backend)
        done = subprocess.run(
            tcg_argv(kernel, initrd, "-chardev", f"socket,id=c,path={sock}",
                     "-device", "vhost-user-rng-pci,chardev=c"),
            timeout=240, check=False, capture_output=True, text=True)
    finally:
        backend.send_signal(signal.SIGTERM)
        try:
            err = backend.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            backend.kill()
            err = backend.communicate()[1]
    out = done.stdout
    why = (out[-3000:], done.stderr[-2000:], err[-2000:])
    assert "GUEST-DONE" in out and "INSMOD-FAILED" not in out, why
    assert re.search(r"RNG-CURRENT virtio_rng\.\d+", out), why
    reads = [bytes.fromhex(h.replace(" ", "")) for h in re.findall(r"RNG-HEX ([0-9a-f ]+)", out)]
    assert [len(r) for r in reads] == [4096, 4096], why
    assert reads[0] != reads[1] and all(len(set(r)) > 200 for r in reads), why
    assert backend.returncode == 0, why
