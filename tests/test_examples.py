"""Every domain in examples/domains either boots on a fresh machine after
``scripts/setup`` or says in its leading comment what it needs (``Needs: …``).

The ones that boot are booted here with ``pyhv run``; the others must be refused
with one line, not a traceback.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "domains").glob("*.xml"))
PYHV = [sys.executable, "-m", "pyhv", "run"]

pytestmark = pytest.mark.kvm


def needs(path: Path) -> str | None:
    """The ``Needs:`` sentence of the example's leading comment, if any."""
    m = re.match(r"\s*<!--(.*?)-->", path.read_text(), re.S)
    if not m:
        return None
    found = re.search(r"Needs:\s*(.*)", m.group(1), re.S)
    return " ".join(found.group(1).split()) if found else None


def kernel(path: Path) -> str:
    m = re.search(r"<kernel>([^<]+)</kernel>", path.read_text())
    assert m, f"{path.name} has no <kernel>"
    return m.group(1)


BOOTABLE = [p for p in EXAMPLES if needs(p) is None]
NEEDY = [p for p in EXAMPLES if needs(p) is not None]


def test_every_example_is_either_bootable_or_says_what_it_needs() -> None:
    assert EXAMPLES and BOOTABLE and NEEDY
    for p in NEEDY:
        assert len(needs(p) or "") > 10, p.name


def _skip_without_kernel(path: Path) -> str:
    k = kernel(path)
    if not os.path.exists(k):
        pytest.skip(f"{k} is missing: scripts/setup has not run on this machine")
    return k


@pytest.mark.parametrize("path", [p for p in BOOTABLE if "/var/lib/pyhv/guests/" in kernel(p)],
                         ids=lambda p: p.name)
def test_test_kit_examples_boot_and_power_off(path: Path) -> None:
    """The test-kit guest reports and powers off through ACPI: ``pyhv run`` exits 0."""
    _skip_without_kernel(path)
    p = subprocess.run([*PYHV, str(path)], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    if "<serial type=\"stdio\">" in path.read_text():
        assert "@end" in p.stdout and "@poweroff" in p.stdout, p.stdout[-2000:]


LINUX = [p for p in BOOTABLE if "/var/lib/pyhv/guests/" not in kernel(p)]


def _start(path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*PYHV, str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    m = re.search(r"redirected to (/dev/pts/\d+) \(label serial0\)", line)
    if not m:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(line + err.decode())
    return proc, m.group(1)


def _terminate(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err.decode()
    assert "terminating on signal 15" in err.decode()


@pytest.mark.parametrize("path", LINUX, ids=lambda p: p.name)
def test_linux_examples_start(path: Path) -> None:
    """A Linux kernel example loads, runs, and SIGTERM ends pyhv cleanly.  (On a PVM
    host the bzImage's own decompressor runs in emulated kernel code and prints
    nothing for minutes; the kernel's output is checked in the hwvirt tier.)"""
    _skip_without_kernel(path)
    proc, _pty = _start(path)
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[1].decode()
        _terminate(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.hwvirt
@pytest.mark.parametrize("path", LINUX, ids=lambda p: p.name)
def test_linux_examples_boot(path: Path) -> None:
    """With hardware virtualization the kernel's own lines reach the serial pty."""
    _skip_without_kernel(path)
    proc, pty = _start(path)
    try:
        fd = os.open(pty, os.O_RDONLY | os.O_NOCTTY)
        seen = b""
        deadline = time.monotonic() + 120
        try:
            while b"ACPI:" not in seen and time.monotonic() < deadline:
                if select.select([fd], [], [], 1)[0]:
                    seen += os.read(fd, 4096)
                assert proc.poll() is None
        finally:
            os.close(fd)
        assert b"ACPI:" in seen, seen[-2000:]
        _terminate(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("path", NEEDY, ids=lambda p: p.name)
def test_examples_with_needs_are_refused_in_one_line(path: Path) -> None:
    """Where the host lacks what the comment names, ``pyhv run`` says so in one line."""
    p = subprocess.run([*PYHV, str(path)], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    if p.returncode == 0:
        pytest.skip(f"this host has what {path.name} needs ({needs(path)}) and it booted")
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyhv: "), p.stderr
    assert "Traceback" not in p.stderr
