"""Tier kvm: pyhv as a vhost-user frontend.  The test guest's own virtio-pci
driver (``pyhv.virtio``) drives a virtio-blk disk whose queues another process
serves over vhost-user: pyhv's own ``pyhv vhost-user-blk`` and QEMU's
``qemu-storage-daemon`` export.  The guest's requests (write, flush, read back,
read of sector 0, read past the end) get their answers from the backend, the
interrupts come back through the call eventfds, and the host file holds the
write afterwards.  A backend that goes away sets NEEDS_RESET and the VMM goes
on; with ``reconnect`` and an inflight region, a backend that comes back resumes
the rings and the guest goes on; a disk config without shared memory is refused
in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from guests.report import initrd_checksum, parse_report
from test_virtio_blk_guest import (
    DISK_ADDRESS,
    MACHINES,
    PATTERN,
    S_IOERR,
    S_OK,
    SECTOR,
    SERIAL,
    T_FLUSH,
    T_IN,
    T_OUT,
    cmdline,
    make_image,
    the_function,
)

from pyhv.config import DiskConfig, KernelBoot, SerialConfig, VmConfig
from pyhv.engine.machine import Machine
from pyhv.engine.support import unsupported
from pyhv.engine.vhost_user.frontend import VhostUserClient, VhostUserFrontendError

pytestmark = pytest.mark.kvm

MiB = 1 << 20


def backend(kind: str, sock: Path, image: Path) -> subprocess.Popen:
    if kind == "pyhv":
        cmd = [sys.executable, "-m", "pyhv", "vhost-user-blk", "--socket", str(sock),
               "--disk", str(image), "--serial", SERIAL]
    else:
        cmd = ["qemu-storage-daemon", "--blockdev",
               f"driver=file,node-name=f,filename={image}", "--export",
               f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
               "writable=on"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the backend did not listen"
        time.sleep(0.05)
    return p


def config(kernel: Path, sock: Path, out: Path, cmd: str, shared: bool = True,
           reconnect: Optional[int] = None) -> VmConfig:
    """The test guest on a pc machine with one vhost-user-blk disk on ``sock``."""
    machine, controllers, _rng, _bdf = MACHINES["pc"]
    disk = DiskConfig(str(sock), "vda", source_type="vhostuser", address=DISK_ADDRESS["pc"],
                      reconnect=reconnect)
    return VmConfig(KernelBoot(str(kernel), cmdline=cmd), memory=64 * MiB, vcpus=1,
                    serial=SerialConfig("file", str(out)), machine=machine,
                    controllers=controllers, disks=(disk,), shared_memory=shared)


@pytest.mark.parametrize("kind", ["pyhv", "qsd"])
@pytest.mark.parametrize("mode", ["msix", "intx"])
def test_guest_drives_a_vhost_user_blk_backend(guests, tmp_path, kind, mode):
    if kind == "qsd" and not shutil.which("qemu-storage-daemon"):
        pytest.skip("qemu-storage-daemon is not installed")
    image = tmp_path / "disk.img"
    before = make_image(image)
    sock = tmp_path / "blk.sock"
    proc = backend(kind, sock, image)
    out = tmp_path / "out.txt"
    try:
        m = Machine(config(guests.pvh_elf, sock, out, cmdline(mode)))
        try:
            m.start()
            event = m.run(timeout=90)
        finally:
            m.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    text = out.read_text(errors="replace")
    assert event is not None and event.kind == "powered-off", text[-2000:]
    from guests.report import parse_report
    v = the_function(parse_report(text), text, "pc", mode)
    s = v.step

    def req(name: str, rtype: int, sector: int, status: int) -> dict:
        r = s(name)
        assert (r["type"], r["sector"], r["status"]) == (rtype, sector, status), (name, r)
        return r

    c = s("blk-config")
    assert (c["capacity"], c["blk_size"]) == (len(before) // SECTOR, SECTOR)
    if kind == "pyhv":
        assert s("get-id")["serial"] == SERIAL      # the backend answers GET_ID
    req("write", T_OUT, 1, S_OK)
    req("flush", T_FLUSH, 0, S_OK)
    assert req("read", T_IN, 1, S_OK)["diff"] == 0
    assert req("read0", T_IN, 0, S_OK)["csum"] == initrd_checksum(before[:SECTOR])
    req("read-oob", T_IN, len(before) // SECTOR, S_IOERR)
    st = s("stop")
    assert st["status"] == 0
    if mode == "msix":
        assert st["irqs"] >= 5                       # the calls became interrupts
    after = image.read_bytes()
    assert after[SECTOR:2 * SECTOR] == PATTERN      # on the host file, through the backend
    assert after[:SECTOR] == before[:SECTOR]


def test_without_shared_memory_the_disk_is_refused(tmp_path):
    cfg = config(Path("/k"), tmp_path / "none.sock", tmp_path / "out.txt", "", shared=False)
    problems = unsupported(cfg)
    assert len(problems) == 1 and "access mode='shared'" in problems[0]


def test_no_backend_is_one_clear_error(tmp_path):
    c = VhostUserClient(str(tmp_path / "missing.sock"), "disk vda")
    with pytest.raises(VhostUserFrontendError, match="disk vda: cannot connect to the "
                                                     "vhost-user backend at .*missing.sock"):
        c.connect(0.2)
    c.close()


def _pump(m: Machine) -> None:
    from pyhv.engine.errors import EngineError
    try:
        m.run(timeout=0.2)
    except EngineError as e:
        assert "still running" in str(e)


def _function(m: Machine):  # type: ignore[no-untyped-def]
    from pyhv.engine.virtio.pci import VirtioPciFunction
    plat = m.platform
    assert plat is not None and plat.pci is not None
    (fn,) = [f for _b, _d, f, _p in plat.pci.root.walk() if isinstance(f, VirtioPciFunction)]
    return fn


def test_backend_that_dies_sets_needs_reset_and_the_vmm_goes_on(guests, tmp_path):
    """Without ``reconnect``: the guest waits (``pyhv.wait=echo``) after bringing the
    disk up; the backend is killed; within a few seconds the device reports
    NEEDS_RESET and the machine is still running."""
    image = tmp_path / "disk.img"
    make_image(image)
    sock = tmp_path / "blk.sock"
    proc = backend("pyhv", sock, image)
    cfg = config(guests.pvh_elf, sock, tmp_path / "out.txt",
                 cmdline("msix") + " pyhv.wait=echo")
    from pyhv.engine.virtio.pci import STATUS_NEEDS_RESET
    m = Machine(cfg)
    try:
        m.start()
        deadline = time.monotonic() + 60
        while "@virtio-end" not in (tmp_path / "out.txt").read_text(errors="replace"):
            assert time.monotonic() < deadline
            _pump(m)
        proc.kill()
        proc.wait()
        fn = _function(m)
        deadline = time.monotonic() + 10
        while not fn.status & STATUS_NEEDS_RESET:
            assert time.monotonic() < deadline, "no NEEDS_RESET after the backend died"
            _pump(m)
        assert "went away" in (fn.broken_reason or "")
        assert not m.finished
    finally:
        m.close()
        if proc.poll() is None:
            proc.kill()


def test_a_backend_that_comes_back_resumes_the_rings_unseen_by_the_guest(guests, tmp_path):
    """``reconnect=1`` with a backend that keeps an inflight region (pyhv's): the
    guest writes and flushes a sector, then waits (``pyhv.blk-pause``); the backend
    is killed with SIGKILL and started again on the socket.  pyhv connects to it,
    hands it the inflight region and resumes each ring at the used index: the
    device never reports NEEDS_RESET, and the guest's read after the pause returns
    what it wrote (the rest of its requests too)."""
    image = tmp_path / "disk.img"
    make_image(image)
    sock = tmp_path / "blk.sock"
    out = tmp_path / "out.txt"
    proc = backend("pyhv", sock, image)
    cfg = config(guests.pvh_elf, sock, out, cmdline("msix") + " pyhv.blk-pause",
                 reconnect=1)
    from pyhv.engine.virtio.pci import STATUS_NEEDS_RESET
    m = Machine(cfg)
    try:
        m.start()
        deadline = time.monotonic() + 60
        while "@echo-ready" not in out.read_text(errors="replace"):
            assert time.monotonic() < deadline, out.read_text(errors="replace")[-2000:]
            _pump(m)
        fn = _function(m)
        dev = fn.device
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not dev.suspended:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the device did not notice the backend go"
            _pump(m)
        os.unlink(sock)
        proc = backend("pyhv", sock, image)
        deadline = time.monotonic() + 10
        while dev.suspended or not dev._started:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the rings did not resume"
            _pump(m)
        assert not fn.status & STATUS_NEEDS_RESET
        m.serial_input(b"go\n")
        ev = m.run(timeout=60)
        assert ev.kind == "powered-off", ev
    finally:
        m.close()
        if proc.poll() is None:
            proc.kill()
        if os.path.exists(sock):
            os.unlink(sock)
    text = out.read_text(errors="replace")
    v = the_function(parse_report(text), text, "pc", "msix")
    assert v.step("read")["status"] == S_OK and v.step("read")["diff"] == 0, v.step("read")
    assert v.step("read0")["status"] == S_OK


def test_sigterm_ends_a_wait_for_the_backend_at_once(tmp_path):
    """pyhv listening for a vhost-user NIC backend that never comes: SIGTERM ends the
    wait (and the process) at once, in one line, and the socket file is removed."""
    import signal
    import subprocess
    import sys

    sock = tmp_path / "net.sock"
    xml = tmp_path / "d.xml"
    xml.write_text(f"""<domain type='kvm'><name>w</name><memory unit='MiB'>64</memory>
      <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
      <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/nonexistent</kernel></os>
      <devices><interface type='vhostuser'><source type='unix' path='{sock}'
        mode='server'/><model type='virtio'/></interface>
        <serial type='null'/><memballoon model='none'/></devices></domain>""")
    p = subprocess.Popen([sys.executable, "-m", "pyhv", "run", str(xml)],
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=10)
    assert time.monotonic() - t0 < 5
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.count("\n") == 1 and "signal 15 while waiting" in err, err
    assert not sock.exists()
