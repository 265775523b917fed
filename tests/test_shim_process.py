"""pyhv-qemu as a process: QEMU's run states and events over real QMP sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import asm_guest

pytestmark = pytest.mark.kvm

EMULATOR = [sys.executable, "-m", "pyhv.shim.main"]


class Qmp:
    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                assert time.monotonic() < deadline, f"no QMP socket at {path}"
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb")
        self.events: list[dict] = []
        greeting = self._read()
        assert greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert self.cmd("qmp_capabilities") == {}

    def _read(self) -> dict:
        line = self.f.readline()
        assert line, "QMP connection closed"
        return json.loads(line)

    def cmd(self, name: str, **args: object) -> object:
        msg: dict = {"execute": name, "id": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            assert r.get("id") == name, r
            if "error" in r:
                raise AssertionError(f"{name}: {r['error']}")
            return r["return"]

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert time.monotonic() < deadline, f"no {name} event; got {self.events}"
            r = self._read()
            self.sock.settimeout(None)
            if "event" in r:
                self.events.append(r)

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])  # type: ignore[index]


def start(tmp: Path, kernel: Path, cmdline: str, *extra: str,
          machine: str = "pc") -> tuple[subprocess.Popen, Path]:
    sock = tmp / "qmp.sock"
    proc = subprocess.Popen([*EMULATOR, "-S", "-nodefaults", "-no-user-config",
                             "-machine", f"{machine},accel=kvm", "-m", "64", "-smp", "2",
                             "-kernel", str(kernel), "-append", cmdline,
                             "-serial", f"file:{tmp / 'serial.log'}",
                             "-qmp", f"unix:{sock},server=on,wait=off", *extra],
                            stderr=subprocess.PIPE, text=True)
    return proc, sock


def wait_serial(tmp: Path, needle: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    log = tmp / "serial.log"
    while not log.exists() or log.read_text().count(needle) < count:
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.05)


def test_run_states_and_events(guests, tmp_path):
    proc, sock = start(tmp_path, guests.pvh_elf, "pyhv.wait=powerbutton", "-no-shutdown",
                       "-qmp", f"unix:{tmp_path / 'second.sock'},server=on,wait=off")
    try:
        q = Qmp(sock)
        second = Qmp(tmp_path / "second.sock")
        assert q.status() == "prelaunch"
        assert not (tmp_path / "serial.log").read_text()  # -S: not one instruction yet
        q.cmd("cont")
        q.wait_event("RESUME")
        second.wait_event("RESUME")  # events reach every monitor
        assert q.status() == "running"
        threads = [c["thread-id"] for c in q.cmd("query-cpus-fast")]  # type: ignore[union-attr]
        assert len(threads) == 2 and all(os.path.exists(f"/proc/{proc.pid}/task/{t}")
                                          for t in threads)
        wait_serial(tmp_path, "@waiting")
        q.cmd("stop")
        q.wait_event("STOP")
        assert q.status() == "paused"
        q.cmd("cont")
        q.cmd("system_powerdown")
        q.wait_event("POWERDOWN")
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        # -no-shutdown: the process stays, in "shutdown", until reset + cont
        assert q.status() == "shutdown" and proc.poll() is None
        q.cmd("system_reset")
        assert q.status() == "prelaunch"
        q.cmd("cont")
        wait_serial(tmp_path, "@waiting", count=2)
        proc.send_signal(signal.SIGTERM)
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": False, "reason": "host-signal"}
        assert proc.wait(30) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert "terminating on signal 15" in err and "Traceback" not in err


def test_guest_power_off_ends_the_process(guests, tmp_path):
    proc, sock = start(tmp_path, guests.pvh_elf, "plain")
    try:
        q = Qmp(sock)
        q.cmd("cont")
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_guest_reset_with_no_reboot(guests, tmp_path):
    proc, sock = start(tmp_path, guests.pvh_elf, "pyhv.wait=reset", "-no-reboot")
    try:
        q = Qmp(sock)
        q.cmd("cont")
        ev = q.wait_event("SHUTDOWN")
        assert ev["data"] == {"guest": True, "reason": "guest-reset"}
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.communicate()


def test_internal_error_is_not_a_clean_shutdown(tmp_path):
    elf = asm_guest(tmp_path, "ie", "movabs $0xd0000000, %rax\njmp *%rax")
    proc, sock = start(tmp_path, elf, "x", "-no-shutdown")
    try:
        q = Qmp(sock)
        q.cmd("cont")
        q.wait_event("STOP")
        assert q.status() == "internal-error"
        assert not [e for e in q.events if e["event"] == "SHUTDOWN"]
        q.cmd("quit")
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert "KVM internal error" in err and "rip=" in err


def test_bad_argv_is_one_line_exit_1(guests):
    p = subprocess.run([*EMULATOR, "-kernel", str(guests.pvh_elf), "-device", "virtio-gpu-pci"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr.startswith("pyhv-qemu: -device") and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run([*EMULATOR, "-incoming", "tcp:0:4444"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1 and "-incoming" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("what", ["-kernel", "-initrd"])
def test_endless_or_blocking_boot_files_are_refused(guests, tmp_path, what):
    """/dev/zero is never read and a FIFO never blocks open(): one line, exit 1."""
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    for bad in ("/dev/zero", str(fifo)):
        argv = ["-kernel", bad] if what == "-kernel" else \
            ["-kernel", str(guests.pvh_elf), "-initrd", bad]
        p = subprocess.run([*EMULATOR, "-nodefaults", "-machine", "pc,accel=kvm", "-cpu", "host",
                            "-m", "64", "-display", "none", *argv], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 1, p.stderr
        assert bad in p.stderr and "must be a regular file" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def _error(q: Qmp, name: str, **args: object) -> str:
    with pytest.raises(AssertionError) as e:
        q.cmd(name, **args)
    return str(e.value)


def test_hotplug_commands(guests, tmp_path):
    """QMP's hotplug commands as libvirt sends them, on a q35 machine with two
    empty root ports: getfd (a descriptor over SCM_RIGHTS), blockdev-add,
    device_add into a root port, netdev_add naming getfd's descriptor; each bad
    request is one error that leaves nothing behind."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    proc, sock = start(tmp_path, guests.pvh_elf, "pyhv.wait=powerbutton",
                       "-device", "pcie-root-port,id=pci.1,bus=pcie.0,addr=0x2,port=8,"
                       "chassis=1", "-device", "pcie-root-port,id=pci.2,bus=pcie.0,"
                       "addr=0x3,port=9,chassis=2", machine="q35")
    try:
        q = Qmp(sock)

        def open_fds() -> int:
            return len(os.listdir(f"/proc/{proc.pid}/fd"))

        before = open_fds()
        assert "No file descriptor supplied" in _error(q, "getfd", fdname="none")
        r, w = os.pipe()
        q.sock.sendmsg([json.dumps({"execute": "getfd", "id": "getfd",
                                    "arguments": {"fdname": "pipe"}}).encode() + b"\n"],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                           __import__("array").array("i", [r])).cast("B")))])
        assert q._read() == {"return": {}, "id": "getfd"}
        os.close(r)
        assert q.cmd("closefd", fdname="pipe") == {}
        assert "not found" in _error(q, "closefd", fdname="pipe")
        q.sock.sendmsg([json.dumps({"execute": "add-fd", "id": "add-fd",
                                    "arguments": {"opaque": "rw:/x"}}).encode() + b"\n"],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
                           __import__("array").array("i", [w])).cast("B")))])
        added = q._read()
        assert added["return"]["fdset-id"] == 0, added
        assert q.cmd("query-fdsets") == [{"fdset-id": 0, "fds": [
            {"fd": added["return"]["fd"], "opaque": "rw:/x"}]}]
        assert "not found" in _error(q, "remove-fd", **{"fdset-id": 7})
        q.cmd("remove-fd", **{"fdset-id": 0})
        assert q.cmd("query-fdsets") == []
        os.close(w)
        assert open_fds() == before

        assert "No such file" in _error(q, "blockdev-add", driver="file",
                                         filename=str(tmp_path / "nope"), **{"node-name": "x"})
        assert "does not accept value 'nbd'" in _error(q, "blockdev-add", driver="nbd",
                                                       **{"node-name": "x"})
        q.cmd("blockdev-add", driver="file", filename=str(image), **{"node-name": "s1"})
        q.cmd("blockdev-add", driver="raw", file="s1", **{"node-name": "f1"})
        assert "does not support hotplugging" in _error(
            q, "device_add", driver="virtio-blk-pci", drive="f1", id="d1")
        assert "not supported by pyhv" in _error(q, "device_add", driver="virtio-rng-pci",
                                                 id="r1", bus="pci.1")
        assert "drive 'nope' not found" in _error(q, "device_add", driver="virtio-blk-pci",
                                                  drive="nope", id="d1", bus="pci.1")
        q.cmd("device_add", driver="virtio-blk-pci", drive="f1", id="d1", bus="pci.1")
        peripherals = q.cmd("qom-list", path="/machine/peripheral")
        assert "d1" in [p["name"] for p in peripherals]  # type: ignore[union-attr]
        assert "is busy" in _error(q, "blockdev-del", **{"node-name": "f1"})
        q.cmd("blockdev-add", driver="file", filename=str(image), **{"node-name": "s2"})
        q.cmd("blockdev-add", driver="raw", file="s2", **{"node-name": "f2"})
        assert "pci.1 is taken by d1" in _error(q, "device_add", driver="virtio-blk-pci",
                                                drive="f2", id="d2", bus="pci.1")
        assert "write\" lock" in _error(q, "device_add", driver="virtio-blk-pci",
                                         drive="f2", id="d2", bus="pci.2")  # d1 has it
        other = tmp_path / "other.img"
        other.write_bytes(b"\0" * (1 << 20))
        q.cmd("blockdev-add", driver="file", filename=str(other), **{"node-name": "s3"})
        q.cmd("blockdev-add", driver="raw", file="s3", **{"node-name": "f3"})
        q.cmd("device_add", driver="virtio-blk-pci", drive="f3", id="d2", bus="pci.2")
        assert "Device 'zz' not found" in _error(q, "device_del", id="zz")
        q.cmd("device_del", id="d2")  # a request: the guest has no driver to answer it
        assert "has not been found" in _error(q, "netdev_add", type="tap", id="n1", fd="nofd")
        q.cmd("netdev_add", type="tap", id="n1", ifname="x")  # the id is still free
        q.cmd("netdev_del", id="n1")
        assert q.status() == "prelaunch"
        q.cmd("quit")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
