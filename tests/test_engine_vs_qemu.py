"""Tier qemu: the same PVH guest under pyhv and under QEMU (microvm, KVM); the
parts of the two reports that do not depend on the machine model must agree."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from engine_helpers import MiB, boot
from guests.report import initrd_checksum, parse_report

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

CMDLINE = "console=ttyS0 compare=1 pyhv-vs-qemu"


def test_pvh_guest_agrees_with_qemu(guests, tmp_path: Path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(os.urandom(3000))
    cpus = 2

    mine = boot(guests.pvh_elf, tmp_path / "pyhv.txt", cmdline=CMDLINE, initrd=initrd,
                cpus=cpus, memory=64 * MiB).report

    out = tmp_path / "qemu.txt"
    subprocess.run(["qemu-system-x86_64", "-accel", "kvm", "-machine", "microvm,rtc=on",
                    "-m", "64", "-smp", str(cpus), "-nodefaults", "-no-user-config",
                    "-display", "none", "-serial", f"file:{out}",
                    "-device", "isa-debug-exit,iobase=0xf4",
                    "-kernel", str(guests.pvh_elf), "-initrd", str(initrd),
                    "-append", CMDLINE], timeout=120, check=False)
    theirs = parse_report(out.read_text(errors="replace"))

    for r in (mine, theirs):
        assert r.complete and not r.errors and not r.exceptions
    assert mine.protocol == theirs.protocol == "pvh"
    assert mine.bootinfo["magic"] == theirs.bootinfo["magic"]
    assert mine.bootinfo["nr_modules"] == theirs.bootinfo["nr_modules"] == 1
    assert mine.cmdline == theirs.cmdline == CMDLINE
    assert mine.initrd.size == theirs.initrd.size == initrd.stat().st_size
    assert mine.initrd.csum == theirs.initrd.csum == initrd_checksum(initrd.read_bytes())
    assert mine.cpu_count == theirs.cpu_count == cpus
    assert mine.ap_started == theirs.ap_started == cpus - 1
    # both memory maps describe 64 MiB of usable RAM
    for r in (mine, theirs):
        usable = sum(e.size for e in r.e820 if e.type == 1)
        assert 63 * MiB <= usable <= 64 * MiB
    # both tables sets are valid ACPI and both guests read the same wall clock
    for r in (mine, theirs):
        assert all(t.checksum_ok for t in r.acpi_tables)
        assert {"FACP", "APIC", "DSDT"} <= {t.sig for t in r.acpi_tables}
    assert abs((mine.rtc - theirs.rtc).total_seconds()) < 10
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert abs((mine.rtc - now).total_seconds()) < 10
