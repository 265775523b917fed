"""Tier libvirt: libvirtd starts a domain with a variable clock (rtc catchup), guest
NUMA cells and <numatune> through pyhv-qemu; the guest takes RTC interrupts, sees the
offset and the SRAT/SLIT, and when it sets its clock libvirt follows RTC_CHANGE."""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest
from guests.report import parse_report
from test_libvirt import EMULATOR, daemon, define, virsh, wait_state  # noqa: F401

pytestmark = [pytest.mark.libvirt, pytest.mark.kvm]


def test_clock_and_numa_under_libvirt(daemon, guests, tmp_path):  # noqa: F811
    name = "clocknuma"
    out = tmp_path / "serial.log"
    xml = f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>2</vcpu>
  <numatune><memory mode='strict' nodeset='0'/></numatune>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guests.pvh_elf}</kernel>
    <cmdline>pyhv.rtc-irq pyhv.rtc-set pyhv.wait=powerbutton</cmdline></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough'>
    <numa>
      <cell id='0' cpus='0' memory='32' unit='MiB'>
        <distances><sibling id='0' value='10'/><sibling id='1' value='31'/></distances>
      </cell>
      <cell id='1' cpus='1' memory='32' unit='MiB'>
        <distances><sibling id='0' value='31'/><sibling id='1' value='10'/></distances>
      </cell>
    </numa>
  </cpu>
  <clock offset='variable' adjustment='-86400' basis='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <serial type='file'><source path='{out}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
    define(daemon, tmp_path, name, xml)
    try:
        virsh(daemon, "start", name)
        deadline = time.monotonic() + 120
        while "@waiting" not in (out.read_text(errors="replace") if out.exists() else ""):
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "no log"
            time.sleep(0.2)
        r = parse_report(out.read_text(errors="replace"))
        assert r.complete and not r.errors and not r.exceptions
        phases = {ln.fields["source"]: ln.fields for ln in r.tagged("rtc-irq")}
        assert {s: (f["got"], f["ok"]) for s, f in phases.items()} == {
            "periodic": (16, 1), "update": (2, 1), "alarm": (1, 1)}
        first = next(ln for ln in r.tagged("rtc"))
        seen = dt.datetime.strptime(first.text.strip(), "%Y-%m-%d %H:%M:%S")
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        assert abs((now - seen).total_seconds() - 86400) < 120  # adjustment -1 day
        assert [(ln.fields["apic"], ln.fields["domain"]) for ln in r.tagged("srat-cpu")] \
            == [(0, 0), (1, 1)]
        assert [ln.fields["distances"] for ln in r.tagged("slit")] == ["10,31,31,10"]
        # the guest moved its clock a year ahead: libvirt took RTC_CHANGE's offset
        deadline = time.monotonic() + 30
        while True:
            live = virsh(daemon, "dumpxml", name).stdout
            m = re.search(r"<clock offset='variable' adjustment='(-?\d+)'", live)
            if m and int(m.group(1)) > 300 * 86400:
                break
            assert time.monotonic() < deadline, live
            time.sleep(0.2)
        assert 363 * 86400 <= int(m.group(1)) <= 366 * 86400
        virsh(daemon, "shutdown", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
