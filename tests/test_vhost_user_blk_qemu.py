"""Tier qemu: QEMU (TCG, guest RAM on a shared memfd) hands its ``vhost-user-blk-pci``
to ``pyhv vhost-user-blk``, and the project's test-kit guest (tests/guests, its own
modern virtio-pci driver, ``pyhv.virtio=msix``) runs the same virtio-blk requests as
in test_virtio_blk_guest.py: GET_ID, a write, FLUSH, reads, WRITE_ZEROES, a read past
the disk.  The guest's answers must be the ones the specification fixes
(``check_blk``) and the host file must hold the guest's writes.  The backend outlives
the QEMU that used it: a second QEMU is served by the same process, which then ends
cleanly on SIGTERM (exit 0, socket removed).

The same guest against qemu-storage-daemon's vhost-user-blk export is run where it
is installed, and its answers are compared with pyhv's on what both must agree on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from guests.report import parse_report
from test_virtio_blk_guest import (
    PATTERN,
    SECTOR,
    SERIAL,
    Run,
    check_blk,
    cmdline,
    comparable,
    differences,
    make_image,
    the_function,
)

pytestmark = pytest.mark.qemu

MODE = "msix"
MEMORY_MIB = 64


def reap(*procs: Optional[subprocess.Popen]) -> None:
    """Kill and wait for each process that still runs (a test's cleanup)."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the backend ended: {proc.returncode}"
        assert time.monotonic() < end, f"no socket at {path}"
        time.sleep(0.05)


def run_qemu_vhost(kernel: Path, out: Path, sock: Path) -> Run:
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(MEMORY_MIB),
           "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
           "-machine", "pc,memory-backend=mem",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{out}",
           "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(kernel),
           "-append", cmdline(MODE),
           "-chardev", f"socket,id=c,path={sock}",
           "-device", "vhost-user-blk-pci,chardev=c,disable-legacy=on,id=vda,"
                      "bus=pci.0,addr=0x2"]
    start = time.monotonic()
    done = subprocess.run(cmd, timeout=240, check=False, capture_output=True, text=True)
    text = out.read_text(errors="replace")
    return Run(None, text, parse_report(text), "00:02.0", time.monotonic() - start,
               done.stderr)


def check_image(image: Path, before: bytes) -> None:
    after = image.read_bytes()
    assert after[SECTOR:2 * SECTOR] == PATTERN              # the guest's write
    assert after[2 * SECTOR:3 * SECTOR] == bytes(SECTOR)    # its write-zeroes
    assert after[:SECTOR] == before[:SECTOR] and after[3 * SECTOR:] == before[3 * SECTOR:]


def test_test_guest_under_qemu_on_pyhv_vhost_user_blk(guests, tmp_path):
    image = tmp_path / "disk.img"
    before = make_image(image)
    sock = tmp_path / "blk.sock"
    log = (tmp_path / "backend.log").open("w")
    backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk",
                                "--socket", str(sock), "--disk", str(image),
                                "--serial", SERIAL], stderr=log)
    try:
        wait_for_socket(sock, backend)
        runs = []
        for i in range(2):   # the second QEMU proves the backend serves the next frontend
            if i:
                image.write_bytes(before)
            run = run_qemu_vhost(guests.pvh_elf, tmp_path / f"out{i}.txt", sock)
            v = the_function(run.report, run.output, "pc", MODE)
            check_blk(v, MODE, before[:SECTOR], readonly=False)
            check_image(image, before)
            runs.append(run)
        backend.send_signal(signal.SIGTERM)
        assert backend.wait(10) == 0
        assert not sock.exists()
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait()
        log.close()
    text = (tmp_path / "backend.log").read_text()
    assert "frontend dropped" not in text, text     # QEMU never broke the protocol
    print(f"under QEMU (TCG) on pyhv vhost-user-blk: "
          f"{', '.join(f'{r.seconds:.1f} s' for r in runs)}")


@pytest.mark.skipif(not shutil.which("qemu-storage-daemon"),
                    reason="qemu-storage-daemon is not installed")
def test_same_answers_as_qemu_storage_daemon(guests, tmp_path):
    mine_img, their_img = tmp_path / "pyhv.img", tmp_path / "qsd.img"
    before = make_image(mine_img)
    make_image(their_img)
    runs = {}
    for name, _img, argv in (
            ("pyhv", mine_img, [sys.executable, "-m", "pyhv", "vhost-user-blk", "--socket",
                                "{sock}", "--disk", str(mine_img), "--serial", SERIAL]),
            ("qsd", their_img, ["qemu-storage-daemon", "--blockdev",
                                f"driver=file,node-name=f,filename={their_img}",
                                "--export", "type=vhost-user-blk,id=e,node-name=f,"
                                "addr.type=unix,addr.path={sock},writable=on"])):
        sock = tmp_path / f"{name}.sock"
        proc = subprocess.Popen([a.replace("{sock}", str(sock)) for a in argv],
                                stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_for_socket(sock, proc)
            runs[name] = run_qemu_vhost(guests.pvh_elf, tmp_path / f"{name}.txt", sock)
        finally:
            proc.terminate()
            proc.wait(10)
    mine = the_function(runs["pyhv"].report, runs["pyhv"].output, "pc", MODE)
    theirs = the_function(runs["qsd"].report, runs["qsd"].output, "pc", MODE)
    check_image(mine_img, before)
    check_image(their_img, before)
    assert their_img.read_bytes() == mine_img.read_bytes()
    # qemu-storage-daemon has no serial (its GET_ID answers differ) and offers other
    # features and limits (DISCARD, CONFIG_WCE, SIZE_MAX; seg_max 126); libvhost-user
    # also calls the frontend once when a ring starts, before any buffer is used (the
    # ISR reads 1 at DRIVER_OK), where pyhv calls only for used buffers.  Every other
    # answer must be the same.
    ignore = {"get-id", "blk-config", "features"}

    def kept(v):
        out = {k: f for k, f in comparable(v).items() if k not in ignore}
        out["driver-ok"] = {k: f for k, f in out["driver-ok"].items() if k != "isr"}
        return out

    a, b = kept(mine), kept(theirs)
    assert a == b, "\n".join(differences(mine, theirs))
    print("\n".join([f"pyhv {runs['pyhv'].seconds:.1f} s, qemu-storage-daemon "
                     f"{runs['qsd'].seconds:.1f} s; differences:", *differences(mine, theirs)]))
    assert os.path.getsize(mine_img) == os.path.getsize(their_img)
