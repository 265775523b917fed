"""Tier libvirt: CPU models under a private libvirtd.  ``virsh domcapabilities``
lists the models with the usability pyhv computes from this host's KVM and a
host-model built from pyhv-qemu's ``query-cpu-model-expansion``; domains with
``<cpu mode='host-model'>`` and with a named model start, and the test guest's
CPUID report shows the vendor and signature libvirt asked for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from guests.report import parse_report
from libvirt_daemon import LibvirtDaemon
from test_libvirt import EMULATOR, daemon, define, virsh, wait_state  # noqa: F401

from pyhv.cpumodel import CPU_MAP_DIR, cpu_map, decode_signature

pytestmark = [pytest.mark.libvirt, pytest.mark.kvm,
              pytest.mark.skipif(not Path(CPU_MAP_DIR, "index.xml").is_file(),
                                 reason=f"libvirt's CPU map is not installed ({CPU_MAP_DIR})")]


def host_vendor() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_domain(name: str, kernel: Path, out: Path, cpu: str) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><cmdline>pyhv.cpuid</cmdline></os>
  <features><acpi/><apic/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <serial type='file'><source path='{out}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def run_guest(d: LibvirtDaemon, tmp: Path, name: str, kernel: Path, cpu: str) -> dict:
    """Start the domain, wait for the guest to power off, return its CPUID words."""
    out = tmp / f"{name}.log"
    define(d, tmp, name, cpu_domain(name, kernel, out, cpu))
    try:
        virsh(d, "start", name)
        assert wait_state(d, name, "shut off (shutdown)") == "shut off (shutdown)"
        report = parse_report(out.read_text(errors="replace"))
        assert report.complete, out.read_text(errors="replace")[-2000:]
        words = {}
        for ln in report.lines:
            if ln.tag == "cpuid":
                f = ln.fields
                for i, reg in enumerate(("eax", "ebx", "ecx", "edx")):
                    words[(f["leaf"], f["sub"], i)] = f[reg]
            elif ln.tag == "cpuid-vendor":
                words["vendor"] = ln.fields["vendor"]
        return words
    finally:
        virsh(d, "destroy", name, check=False)
        virsh(d, "undefine", name, check=False)


def test_domcapabilities_lists_models(daemon):  # noqa: F811
    from pyhv.shim import cpus, registry

    caps = virsh(daemon, "domcapabilities", "--emulatorbin", EMULATOR, "--virttype",
                 "kvm").stdout
    custom = re.search(r"<mode name='custom' supported='yes'>(.*?)</mode>", caps, re.S)
    assert custom, caps
    listed = dict((m, u) for u, m in re.findall(
        r"<model usable='(yes|no)'[^>]*>([^<]+)</model>", custom.group(1)))
    expected = {d["name"]: d["unavailable-features"]
                for d in cpus.definitions(registry.cpu_models())
                if d["name"] not in ("host", "max", "base")}
    for name in ("qemu64", "Skylake-Server", "EPYC-Rome"):
        assert listed[name] == ("no" if expected[name] else "yes"), name
    assert set(listed) <= set(expected)
    # host-model: a model of the map plus what pyhv-qemu's expansion says KVM has
    hm = re.search(r"<mode name='host-model' supported='yes'>(.*?)</mode>", caps, re.S)
    assert hm, caps
    model = re.search(r"<model fallback='forbid'>([^<]+)</model>", hm.group(1))
    assert model and model.group(1) in cpu_map().models


def test_hypervisor_cpu_compare_and_baseline(daemon, tmp_path):  # noqa: F811
    from pyhv.shim import cpus, registry

    unavailable = {d["name"]: d["unavailable-features"]
                   for d in cpus.definitions(registry.cpu_models())}
    opts = ("--emulator", EMULATOR, "--virttype", "kvm")
    for name in ("qemu64", "486"):
        f = tmp_path / f"{name}.xml"
        f.write_text(f"<cpu mode='custom' match='exact'><model fallback='forbid'>{name}"
                     "</model></cpu>")
        p = virsh(daemon, "hypervisor-cpu-compare", str(f), *opts, check=False)
        if unavailable[name]:
            assert p.returncode != 0 and "incompatible" in p.stdout, p.stdout + p.stderr
        else:
            assert p.returncode == 0 and re.search("superset|identical", p.stdout), p.stderr
    f = tmp_path / "486.xml"
    out = virsh(daemon, "hypervisor-cpu-baseline", str(f), *opts).stdout
    assert "<model fallback='forbid'>486</model>" in out


def test_host_model_domain_starts(daemon, guests, tmp_path):  # noqa: F811
    words = run_guest(daemon, tmp_path, "hostmodel", guests.pvh_elf,
                      "<cpu mode='host-model' check='partial'/>")
    # libvirt turns host-model into "-cpu MODEL,feat=on,...": the guest sees that
    # model's vendor and signature (QEMU's kvm64, say, is Intel's family 15 model 6
    # whatever the host)
    log = daemon.domain_log("hostmodel").read_text()
    arg = re.search(r"-cpu ([A-Za-z0-9_-]+),(\S*)", log)
    assert arg, log[-2000:]
    model = cpu_map().model(arg.group(1))
    assert words["vendor"] == cpu_map().vendors[model.vendor or ""]
    assert decode_signature(words[(1, 0, 0)]) == (model.family, model.model, model.stepping)
    # every feature libvirt asked for is one pyhv-qemu said this KVM has: none is
    # left out (pyhv would warn "host doesn't support requested feature(s)")
    assert any(f.endswith("=on") for f in arg.group(2).split(","))
    assert "doesn't support" not in log and "Traceback" not in log


def test_named_model_domain_starts(daemon, guests, tmp_path):  # noqa: F811
    # a model of the other vendor, so the report can only show it if pyhv set it
    name = "EPYC-Rome" if host_vendor() == "GenuineIntel" else "Skylake-Server"
    model = cpu_map().model(name)
    words = run_guest(daemon, tmp_path, "named", guests.pvh_elf,
                      f"<cpu mode='custom' match='exact' check='none'>"
                      f"<model fallback='forbid'>{name}</model>"
                      f"<feature policy='disable' name='svm'/></cpu>")
    assert words["vendor"] == cpu_map().vendors[model.vendor or ""]
    assert decode_signature(words[(1, 0, 0)]) == (model.family, model.model, model.stepping)
    log = daemon.domain_log("named").read_text()
    assert f"-cpu {name}" in log
