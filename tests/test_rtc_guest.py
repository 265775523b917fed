"""Tier kvm (and qemu): the test guest takes the RTC's periodic, update and alarm
interrupts on IRQ 8 and sets the clock (pyhv.rtc-irq, pyhv.rtc-set) under pyhv, the
same guest under QEMU agrees; RTC_CHANGE reaches QMP from pyhv-qemu; the guest's
report shows the SRAT/SLIT of a NUMA machine."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from engine_helpers import MiB, run_config
from guests.report import Report, parse_report
from test_shim_process import Qmp, start, wait_serial

from pyhv.config import KernelBoot, NumaCell, SerialConfig, VmConfig
from pyhv.engine.machine import Machine, MachineEvent

pytestmark = pytest.mark.kvm

CMDLINE = "console=ttyS0 pyhv.rtc-irq pyhv.rtc-set"


def rtc_results(r: Report) -> tuple[dict[str, dict], dict]:
    phases = {str(ln.fields["source"]): ln.fields for ln in r.tagged("rtc-irq")}
    end = r.tagged("rtc-irq-end")
    assert len(end) == 1, r.lines
    return phases, end[0].fields


def check_rtc(r: Report) -> tuple[dict[str, dict], dict]:
    assert r.complete and not r.errors and not r.exceptions
    phases, end = rtc_results(r)
    assert set(phases) == {"periodic", "update", "alarm"}
    for source, want in (("periodic", 16), ("update", 2), ("alarm", 1)):
        f = phases[source]
        assert (f["want"], f["got"], f["ok"], f["c_after"]) == (want, want, 1, 0), f
    # the alarm fired in the second it was set for
    assert end["alarm_seen"] == end["alarm_sec"]
    assert end["irqs"] >= 19
    return phases, end


def run_guest(kernel: Path, out: Path, events: list[MachineEvent], **cfg_kw: object) -> Report:
    cfg = VmConfig(KernelBoot(str(kernel), None, CMDLINE), memory=64 * MiB,
                   serial=SerialConfig("file", str(out)), **cfg_kw)  # type: ignore[arg-type]
    m = Machine(cfg)
    m.subscribe(events.append)
    try:
        m.start()
        ev = m.run(timeout=120)
    finally:
        m.close()
    assert ev.kind == "powered-off", ev
    return parse_report(out.read_text(errors="replace"))


def test_rtc_interrupts_and_set_time_under_pyhv(guests, tmp_path: Path) -> None:
    events: list[MachineEvent] = []
    r = run_guest(guests.pvh_elf, tmp_path / "pyhv.txt", events)
    check_rtc(r)
    # the guest moved its clock a year ahead: RTC_CHANGE's offset, in seconds
    changes = [e for e in events if e.kind == "rtc-change"]
    assert len(changes) == 1
    year = 86400 * (366 if r.rtc is not None and r.rtc.year % 4 == 0 else 365)
    assert abs(int(changes[0].data) - year) <= 2  # type: ignore[call-overload]
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert r.rtc is not None and r.rtc.year == now.year + 1


@pytest.mark.qemu
def test_rtc_interrupts_and_srat_agree_with_qemu(guests, tmp_path: Path) -> None:
    """The same guest, two NUMA cells, under pyhv and under QEMU's pc machine (KVM,
    PVH boot through SeaBIOS): the RTC results, the SRAT CPUs and the SLIT agree;
    each cell holds the same RAM (QEMU leaves 640 KiB-1 MiB out of cell 0)."""
    cells = (NumaCell(0, (0,), 32 * MiB, ((1, 21),)), NumaCell(1, (1,), 32 * MiB, ((0, 21),)))
    mine = run_guest(guests.pvh_elf, tmp_path / "pyhv.txt", [], vcpus=2, numa=cells)
    out = tmp_path / "qemu.txt"
    subprocess.run(["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc",
                    "-cpu", "host,-arch-capabilities", "-m", "64", "-smp", "2",
                    "-object", "memory-backend-ram,id=m0,size=32M",
                    "-object", "memory-backend-ram,id=m1,size=32M",
                    "-numa", "node,nodeid=0,cpus=0,memdev=m0",
                    "-numa", "node,nodeid=1,cpus=1,memdev=m1",
                    "-numa", "dist,src=0,dst=1,val=21",
                    "-nodefaults", "-no-user-config", "-display", "none",
                    "-serial", f"file:{out}", "-device", "isa-debug-exit,iobase=0xf4",
                    "-kernel", str(guests.pvh_elf), "-append", CMDLINE],
                   timeout=180, check=False)
    theirs = parse_report(out.read_text(errors="replace"))
    p1, e1 = check_rtc(mine)
    p2, e2 = check_rtc(theirs)
    strip = ("ms",)  # how long each phase took
    assert {s: {k: v for k, v in f.items() if k not in strip} for s, f in p1.items()} == \
        {s: {k: v for k, v in f.items() if k not in strip} for s, f in p2.items()}
    assert [ln.fields for ln in mine.tagged("rtc-set")] == \
        [ln.fields for ln in theirs.tagged("rtc-set")]
    assert [ln.fields for ln in mine.tagged("srat-cpu")] == \
        [ln.fields for ln in theirs.tagged("srat-cpu")]
    assert [ln.fields for ln in mine.tagged("slit")] == [ln.fields for ln in theirs.tagged("slit")]

    def cell_ram(r: Report) -> dict[int, tuple[int, int]]:
        """Per domain: (first address at or above 1 MiB, end) of its enabled ranges."""
        out: dict[int, tuple[int, int]] = {}
        for ln in r.tagged("srat-mem"):
            f = ln.fields
            if not f["enabled"] or not f["len"]:
                continue
            lo, hi = max(int(f["base"]), MiB), int(f["base"]) + int(f["len"])
            d = int(f["domain"])
            old = out.get(d, (lo, hi))
            out[d] = (min(old[0], lo), max(old[1], hi))
        return out

    assert cell_ram(mine) == cell_ram(theirs) == {0: (MiB, 32 * MiB),
                                                  1: (32 * MiB, 64 * MiB)}


def test_localtime_offset_seen_by_the_guest(guests, tmp_path: Path) -> None:
    from pyhv.config import ClockConfig

    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, "plain"), memory=64 * MiB,
                   serial=SerialConfig("file", str(tmp_path / "out.txt")),
                   clock=ClockConfig("variable", -3 * 86400))
    r = run_config(cfg, tmp_path / "out.txt", timeout=120).report
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert r.rtc is not None
    assert abs((now - r.rtc).total_seconds() - 3 * 86400) < 60


def test_guest_clock_survives_a_reset(guests, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, "pyhv.rtc-set pyhv.wait=powerbutton"),
                   memory=64 * MiB, serial=SerialConfig("file", str(out)))
    m = Machine(cfg)
    try:
        m.start()
        from engine_helpers import wait_for_output

        wait_for_output(m, out, "@waiting", timeout=120)
        m.process_events()
        assert m.rtc_adjust is not None and m.rtc_adjust > 300 * 86400
        m.pause()
        m.reset()  # held paused: nothing ran on the new platform yet
        rtc = m.rtc()
        assert rtc is not None
        now = dt.datetime.now(dt.timezone.utc)
        assert (rtc.guest_time() - now).total_seconds() > 300 * 86400
    finally:
        m.close()


def test_rtc_change_and_reinjection_over_qmp(guests, tmp_path: Path) -> None:
    proc, sock = start(tmp_path, guests.pvh_elf, "pyhv.rtc-set pyhv.wait=powerbutton",
                       "-rtc", "base=utc,driftfix=slew")
    try:
        q = Qmp(sock)
        q.cmd("cont")
        ev = q.wait_event("RTC_CHANGE", timeout=120)
        assert 364 * 86400 <= ev["data"]["offset"] <= 367 * 86400
        assert ev["data"]["qom-path"]
        assert q.cmd("rtc-reset-reinjection") == {}
        wait_serial(tmp_path, "@waiting", timeout=120)
        q.cmd("quit")
        proc.wait(30)
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert "Traceback" not in err


def test_guest_report_shows_numa_cells(guests, tmp_path: Path) -> None:
    out = tmp_path / "numa.txt"
    cells = (NumaCell(0, (0,), 32 * MiB, ((1, 21),)), NumaCell(1, (1,), 32 * MiB, ((0, 21),)))
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, "plain"), memory=64 * MiB, vcpus=2,
                   serial=SerialConfig("file", str(out)), numa=cells)
    r = run_config(cfg, out, timeout=120).report
    assert r.complete and not r.errors
    assert {"SRAT", "SLIT"} <= {t.sig for t in r.acpi_tables}
    assert all(t.checksum_ok for t in r.acpi_tables)
    cpus = [(ln.fields["apic"], ln.fields["domain"]) for ln in r.tagged("srat-cpu")]
    assert cpus == [(0, 0), (1, 1)]
    mem = [(ln.fields["domain"], ln.fields["base"], ln.fields["len"])
           for ln in r.tagged("srat-mem")]
    assert mem == [(0, 0, 32 * MiB), (1, 32 * MiB, 32 * MiB)]
    assert [ln.fields["distances"] for ln in r.tagged("slit")] == ["10,21,21,10"]
    assert r.ap_started == 1
