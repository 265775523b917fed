"""The kernel vhost-net interface: pyhv's request numbers and structure layouts
against the kernel's own headers (compiled here with gcc), and descriptors the kernel
cannot use refused in one line.  The data path itself runs where /dev/vhost-net exists
(``test_virtio_net_guest.py``: the test guest's virtio-net driver over it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.engine.net import vhost_net as vn

HEADER = Path("/usr/include/linux/vhost.h")

PROGRAM = r"""
#include <stdio.h>
#include <linux/vhost.h>
int main(void)
{
	printf("GET_FEATURES %lu\n", (unsigned long)VHOST_GET_FEATURES);
	printf("SET_FEATURES %lu\n", (unsigned long)VHOST_SET_FEATURES);
	printf("SET_OWNER %lu\n", (unsigned long)VHOST_SET_OWNER);
	printf("SET_MEM_TABLE %lu\n", (unsigned long)VHOST_SET_MEM_TABLE);
	printf("SET_VRING_NUM %lu\n", (unsigned long)VHOST_SET_VRING_NUM);
	printf("SET_VRING_ADDR %lu\n", (unsigned long)VHOST_SET_VRING_ADDR);
	printf("SET_VRING_BASE %lu\n", (unsigned long)VHOST_SET_VRING_BASE);
	printf("GET_VRING_BASE %lu\n", (unsigned long)VHOST_GET_VRING_BASE);
	printf("SET_VRING_KICK %lu\n", (unsigned long)VHOST_SET_VRING_KICK);
	printf("SET_VRING_CALL %lu\n", (unsigned long)VHOST_SET_VRING_CALL);
	printf("NET_SET_BACKEND %lu\n", (unsigned long)VHOST_NET_SET_BACKEND);
	printf("sizeof_vring_state %zu\n", sizeof(struct vhost_vring_state));
	printf("sizeof_vring_file %zu\n", sizeof(struct vhost_vring_file));
	printf("sizeof_vring_addr %zu\n", sizeof(struct vhost_vring_addr));
	printf("sizeof_memory %zu\n", sizeof(struct vhost_memory));
	printf("sizeof_memory_region %zu\n", sizeof(struct vhost_memory_region));
	printf("NET_F_VIRTIO_NET_HDR %d\n", VHOST_NET_F_VIRTIO_NET_HDR);
	return 0;
}
"""


def test_requests_and_layouts_match_the_kernel_headers(tmp_path: Path) -> None:
    if not HEADER.exists() or not shutil.which("gcc"):
        pytest.skip("the kernel's headers (linux-libc-dev) or gcc are not installed")
    src, exe = tmp_path / "vhost.c", tmp_path / "vhost"
    src.write_text(PROGRAM)
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    kernel = dict(line.split() for line in
                  subprocess.run([str(exe)], capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    mine = {"GET_FEATURES": vn.VHOST_GET_FEATURES, "SET_FEATURES": vn.VHOST_SET_FEATURES,
            "SET_OWNER": vn.VHOST_SET_OWNER, "SET_MEM_TABLE": vn.VHOST_SET_MEM_TABLE,
            "SET_VRING_NUM": vn.VHOST_SET_VRING_NUM,
            "SET_VRING_ADDR": vn.VHOST_SET_VRING_ADDR,
            "SET_VRING_BASE": vn.VHOST_SET_VRING_BASE,
            "GET_VRING_BASE": vn.VHOST_GET_VRING_BASE,
            "SET_VRING_KICK": vn.VHOST_SET_VRING_KICK,
            "SET_VRING_CALL": vn.VHOST_SET_VRING_CALL,
            "NET_SET_BACKEND": vn.VHOST_NET_SET_BACKEND,
            "sizeof_vring_state": vn.VRING_STATE.size,
            "sizeof_vring_file": vn.VRING_FILE.size,
            "sizeof_vring_addr": vn.VRING_ADDR.size,
            "sizeof_memory": vn.MEMORY.size,
            "sizeof_memory_region": vn.MEMORY_REGION.size,
            "NET_F_VIRTIO_NET_HDR": vn.VHOST_NET_F_VIRTIO_NET_HDR.bit_length() - 1}
    assert {k: int(v) for k, v in kernel.items()} == mine


def test_a_descriptor_that_is_not_vhost_net_is_refused() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(vn.VhostNetError, match="interface net0: vhost-net refused"):
            vn.VhostNetBackend([fd], "interface net0")
    finally:
        os.close(fd)


def test_opening_the_device_fails_in_one_line_where_there_is_none() -> None:
    if Path(vn.DEVICE).exists():
        pytest.skip("this host has /dev/vhost-net")
    with pytest.raises(vn.VhostNetError, match=r"^interface net0: /dev/vhost-net: No such"):
        vn.VhostNetBackend.open(2, "interface net0")
