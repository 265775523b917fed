"""Tier linux: Debian's cloud kernel boots under QEMU (TCG, memory on a shared memfd)
with a busybox initramfs built here, and its virtio_net driver runs on ``pyhv
vhost-user-net``: QEMU's ``-netdev vhost-user`` hands the rings to pyhv, which moves
the frames between them and a tap.  Everything runs in a network namespace the test
creates (``unshare -n``): the tap, its address and the host's end of the traffic.

The guest brings eth0 up with the MAC QEMU gave it, pings the host's end of the tap,
sends 2 MiB of random data over TCP (the host checks its checksum against the one the
guest printed) and receives 2 MiB the host sends (the guest prints its checksum).

This needs the newer QEMU scripts/setup unpacks from Debian's backports: Debian 12's
7.2 dies (a NULL access under TCG) when a vhost-user netdev starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cloud_kernel, new_qemu
from test_vhost_user_blk_linux import BASE, VIRTIO_PCI, VIRTIO_PCI_LOAD, initramfs, tcg_argv
from test_vhost_user_blk_qemu import wait_for_socket

pytestmark = pytest.mark.linux

TESTS = Path(__file__).resolve().parent
TAP = "pyhvvu0"
HOST, GUEST = "10.9.0.1", "10.9.0.2"
MAC = "52:54:00:ab:cd:01"
TX_PORT, RX_PORT = 5555, 5556
TRANSFER = 2 << 20
MODULES = VIRTIO_PCI + ("kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                       "kernel/drivers/net/virtio_net.ko")
LOAD = VIRTIO_PCI_LOAD + ("failover", "net_failover", "virtio_net")

INIT = BASE + f"""busybox ip link set lo up
busybox ip link set eth0 up && echo LINK-UP
busybox ip addr add {GUEST}/24 dev eth0
echo MAC $(busybox cat /sys/class/net/eth0/address)
busybox ping -c 3 -W 5 {HOST} >/dev/null && echo PING-OK
busybox dd if=/dev/urandom of=/tx bs=65536 count={TRANSFER // 65536} 2>/dev/null
echo TX-SUM $(busybox sha256sum /tx)
busybox nc {HOST} {TX_PORT} < /tx
echo TX-RC $?
busybox nc {HOST} {RX_PORT} > /rx
echo RX-RC $?
echo RX-SUM $(busybox sha256sum /rx)
echo GUEST-DONE
busybox poweroff -f
"""


# ---- inside the namespace (run as a script: ``unshare -n python -c ...``) -----------------
def _serve_tcp(port: int, send: bytes, out: dict[str, Any]) -> threading.Thread:
    """Accept one connection on the tap's address: read TRANSFER bytes from it
    (``send`` empty) or send ``send``; then close it."""
    listener = socket.create_server((HOST, port))
    listener.settimeout(200)

    def run() -> None:
        try:
            conn, _addr = listener.accept()
            with conn:
                conn.settimeout(60)
                if send:
                    conn.sendall(send)
                    return
                got = bytearray()
                while len(got) < TRANSFER:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
                out[f"received_{port}"] = len(got)
                out[f"sum_{port}"] = hashlib.sha256(got).hexdigest()
        except OSError as e:
            out[f"error_{port}"] = str(e)
        finally:
            listener.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def namespace_main(argv: list[str]) -> None:
    args = json.loads(argv[0])
    result: dict[str, Any] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    sock = Path(args["short"]) / "net.sock"
    backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-net", "--socket",
                                str(sock), "--tap", TAP], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=str(TESTS.parent))
    try:
        wait_for_socket(sock, backend)
        subprocess.run(["ip", "addr", "add", f"{HOST}/24", "dev", TAP], check=True)
        subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
        payload = os.urandom(TRANSFER)
        result["rx_sum"] = hashlib.sha256(payload).hexdigest()
        servers = [_serve_tcp(TX_PORT, b"", result), _serve_tcp(RX_PORT, payload, result)]
        start = time.monotonic()
        done = subprocess.run(
            tcg_argv(args["kernel"], args["initrd"], "-chardev", f"socket,id=c,path={sock}",
                     "-netdev", "vhost-user,id=n0,chardev=c",
                     "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", qemu=args["qemu"]),
            env=args["env"], timeout=240, check=False, capture_output=True, text=True)
        result.update(seconds=time.monotonic() - start, out=done.stdout,
                      qemu_stderr=done.stderr[-2000:], qemu_rc=done.returncode)
        for t in servers:
            t.join(5)
    finally:
        backend.terminate()
        try:
            result["backend_stderr"] = backend.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            backend.kill()
            result["backend_stderr"] = backend.communicate()[1]
        result["backend_rc"] = backend.returncode
    print(json.dumps(result))


# ---- the test -------------------------------------------------------------------------
def test_linux_virtio_net_driver_on_pyhv_vhost_user_net(tmp_path):
    kernel = cloud_kernel()
    assert kernel is not None
    qemu, env = new_qemu()
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        pytest.skip("a tap in a network namespace needs root and /dev/net/tun")
    initrd = initramfs(tmp_path, kernel, INIT, MODULES, LOAD)
    short = Path(tmp_path / "s")
    short.mkdir()
    args = {"qemu": qemu, "env": env, "kernel": kernel, "initrd": str(initrd),
            "short": str(short)}
    script = (f"import sys; sys.path[:0] = [{str(TESTS)!r}]; "
              "import test_vhost_user_net_linux as t; t.namespace_main(sys.argv[1:])")
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", script, json.dumps(args)],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=str(TESTS.parent))
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-3000:])
    r = json.loads(lines[-1])
    out = r["out"]
    why = (out[-3000:], r["qemu_stderr"], r["backend_stderr"][-2000:])
    assert "GUEST-DONE" in out and "INSMOD-FAILED" not in out, why
    assert "LINK-UP" in out and f"MAC {MAC}" in out, why
    assert "PING-OK" in out, why
    tx = re.search(r"TX-SUM ([0-9a-f]{64})", out)
    assert tx and "TX-RC 0" in out, why
    assert r.get(f"received_{TX_PORT}") == TRANSFER and r[f"sum_{TX_PORT}"] == tx.group(1), \
        (r.get(f"error_{TX_PORT}"), why)
    rx = re.search(r"RX-SUM ([0-9a-f]{64})", out)
    assert rx and "RX-RC 0" in out and rx.group(1) == r["rx_sum"], why
    assert r["backend_rc"] == 0, why
    # the backend offers no CONFIG protocol feature to a net front (QEMU would warn)
    assert "PROTOCOL_F_CONFIG" not in r["qemu_stderr"], why
    print(f"Linux under QEMU (TCG) on pyhv vhost-user-net: {r['seconds']:.1f} s")
