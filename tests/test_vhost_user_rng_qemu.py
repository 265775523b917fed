"""Tier qemu: QEMU (TCG, guest RAM on a shared memfd) hands its ``vhost-user-rng-pci``
to ``pyhv vhost-user-rng``, and the project's test-kit guest (``pyhv.virtio=msix``,
its own modern virtio-pci driver) draws entropy through it: the requests are filled
with bytes that are not constant, from the engine's own virtio-rng behind the
backend; the backend ends cleanly on SIGTERM and removes its socket."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from guests.report import parse_report
from test_vhost_user_blk_qemu import wait_for_socket

pytestmark = pytest.mark.qemu

PYHV = str(Path(sys.executable).with_name("pyhv"))
MEMORY_MIB = 64


def test_test_guest_draws_entropy_through_pyhv_vhost_user_rng(guests, tmp_path):
    sock = tmp_path / "rng.sock"
    backend = subprocess.Popen([PYHV, "vhost-user-rng", "--socket", str(sock)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, backend)
        out = tmp_path / "serial.txt"
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(MEMORY_MIB),
               "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
               "-machine", "pc,memory-backend=mem", "-nodefaults", "-no-user-config",
               "-display", "none", "-serial", f"file:{out}",
               "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(guests.pvh_elf),
               "-append", "console=ttyS0 pyhv.pci pyhv.virtio=msix",
               "-chardev", f"socket,id=c,path={sock}",
               "-device", "vhost-user-rng-pci,chardev=c,bus=pci.0,addr=0x2"]
        done = subprocess.run(cmd, timeout=240, capture_output=True, text=True)
        text = out.read_text(errors="replace")
        report = parse_report(text)
        assert report.complete, text[-3000:] + done.stderr
        (v,) = report.virtio
        assert (v.bdf, v.id) == ("00:02.0", "1af4:1044")
        r = v.step("requests")
        assert (r["zero_bufs"], r["flat_bufs"], r["same_pairs"]) == (0, 0, 0), r
        assert v.step("driver-ok")["status"] == 0xF
    finally:
        backend.send_signal(signal.SIGTERM)
        rc = backend.wait(timeout=30)
        err = backend.stderr.read() if backend.stderr else ""
    assert rc == 0, err
    assert not sock.exists()
    assert "serving virtio-rng" in err


def test_bad_options_are_one_line(tmp_path):
    p = subprocess.run([PYHV, "vhost-user-rng", "--socket", str(tmp_path / "s"),
                        "--max-bytes", "100"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and p.stderr.count("\n") == 1 and "--period" in p.stderr
