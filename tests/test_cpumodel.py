"""Named CPU models from libvirt's CPU map (pyhv/cpumodel.py), the CPUID they give
(pyhv/engine/cpuid.py guest_cpu), their -cpu syntax, the QMP answers about them
(pyhv/shim/cpus.py), and a test guest's view of them under KVM."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pyhv.config import (
    ConfigError,
    CpuConfig,
    CpuFeature,
    FeaturesConfig,
    KernelBoot,
    SerialConfig,
    VmConfig,
)
from pyhv.cpumodel import (
    CPU_MAP_DIR,
    KVM_DEFAULT_OFF,
    CpuMap,
    CpuModelError,
    cpu_map,
    decode_signature,
    encode_signature,
    normalize,
    parse_cpu_option,
    vendor_string,
    vendor_words,
)
from pyhv.engine.cpuid import (
    MSR_IA32_ARCH_CAPABILITIES,
    CpuModelRefused,
    flat_topology,
    guest_cpu,
    words_of,
)

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(CPU_MAP_DIR, "index.xml")),
                                reason=f"libvirt's CPU map is not installed ({CPU_MAP_DIR})")

MODELS = ("Skylake-Server", "EPYC-Rome", "qemu64")
#: features a guest without PMU does not get
NO_PMU = {"perfctr_core", "perfctr_nb", "pdcm"}


@pytest.fixture(scope="module")
def cmap() -> CpuMap:
    return cpu_map()


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def hwvirt() -> bool:
    return any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))


@pytest.fixture(scope="module")
def host_cpuid() -> list:
    if not kvm_usable():
        pytest.skip("needs read-write /dev/kvm")
    from pyhv.engine.kvm import Kvm

    kvm = Kvm()
    try:
        return kvm.get_supported_cpuid()
    finally:
        kvm.close()


def rich_host(cmap: CpuMap, without: tuple[str, ...] = ()) -> list:
    """A synthetic KVM table with every feature the map knows, except ``without``."""
    names = [n for n in cmap.features if n not in without]
    words = cmap.bits(names)
    leaves = sorted({(fn, idx) for fn, idx, _ in words} |
                    {(0, 0), (1, 0), (0xA, 0), (0x40000000, 0), (0x80000000, 0)})
    table = []
    for fn, idx in leaves:
        regs = [words.get((fn, idx, i), 0) for i in range(4)]
        if fn == 0:
            b, d, c = vendor_words("GenuineIntel")
            regs = [0xD, b, c, d]
        elif fn == 0x80000000:
            regs[0] = 0x80000008
        elif fn == 0xA:
            regs = [0x07300402, 0, 0, 0x603]
        table.append((fn, idx, 1 if fn in (7, 0xD) else 0, *regs))
    return table


def known_words(cmap: CpuMap, table: list) -> dict:
    words = words_of(table)
    return {w: v for w, v in words.items() if w in cmap.words()}


# ---- the map and QEMU's spellings -------------------------------------------------

def test_feature_spellings(cmap: CpuMap) -> None:
    for spelling in ("sse4.1", "sse4_1", "sse4-1", "SSE4.1"):
        assert cmap.feature_name(spelling) == "sse4.1"
    assert cmap.feature_name("pclmulqdq") == cmap.feature_name("pclmuldq") == "pclmuldq"
    assert cmap.feature_name("lahf-lm") == "lahf_lm"
    assert cmap.feature_name("tsc_deadline") == "tsc-deadline"
    assert cmap.feature_name("sse3") == "pni"
    assert normalize("sse4.2") == normalize("sse4_2")
    with pytest.raises(CpuModelError, match="unknown CPU feature 'avx9000'") as e:
        cmap.feature_name("avx9000")
    assert "\n" not in str(e.value)


def test_models_and_signatures(cmap: CpuMap) -> None:
    sky = cmap.model("Skylake-Server")
    assert (sky.vendor, sky.family, sky.model, sky.stepping) == ("Intel", 6, 85, 4)
    assert sky.signature == 0x50654
    rome = cmap.model("EPYC-Rome")
    assert (rome.vendor, rome.family, rome.model) == ("AMD", 23, 49)
    assert rome.signature == 0x830F10
    q = cmap.model("qemu64")
    assert (q.vendor, q.family, q.model, q.stepping) == ("AMD", 15, 107, 1)
    assert q.signature == 0x60FB1
    assert cmap.model("Skylake-Server-v1") is sky
    assert {"avx512f", "avx2", "xsave"} <= sky.features and "avx512f" not in rome.features
    assert cmap.vendors["Intel"] == "GenuineIntel"
    for sig in (0x50654, 0x830F10, 0x60FB1, 0xA10F11):
        assert encode_signature(*decode_signature(sig)) == sig
    with pytest.raises(CpuModelError, match="unknown CPU model 'Pentium9'"):
        cmap.model("Pentium9")


def test_vendor_words_round_trip() -> None:
    b, d, c = vendor_words("AuthenticAMD")
    assert (b, d, c) == (0x68747541, 0x69746E65, 0x444D4163)
    assert vendor_string(b, d, c) == "AuthenticAMD"


def test_missing_map_is_one_line(tmp_path: Path) -> None:
    from pyhv.cpumodel import load

    with pytest.raises(CpuModelError, match="index.xml is missing"):
        load(str(tmp_path))


# ---- -cpu syntax -------------------------------------------------------------------

def test_cpu_option_syntax() -> None:
    o = parse_cpu_option("Skylake-Server,+avx2,-hle,sse4_1=on,pcid=off,check=on,enforce,"
                         "pmu=off,kvm=off,vendor=GenuineIntel,model-id=Test CPU")
    assert o.model == "Skylake-Server"
    assert o.flags == [("avx2", True), ("hle", False), ("sse4_1", True), ("pcid", False)]
    assert o.enforce and o.check
    assert o.props["pmu"] == "off" and o.props["kvm"] == "off"
    assert o.props["vendor"] == "GenuineIntel" and o.props["model-id"] == "Test CPU"
    assert not parse_cpu_option("qemu64").enforce


@pytest.mark.parametrize("text, message", [
    ("Skylake-Server,hv-relaxed", "Hyper-V enlightenment 'hv-relaxed' is not built"),
    ("qemu64,avx2=maybe", "neither a CPU property nor a feature"),
    ("qemu64,enforce=perhaps", "takes on or off"),
    (",avx2", "a model name is needed"),
])
def test_cpu_option_errors(text: str, message: str) -> None:
    with pytest.raises(CpuModelError, match=message) as e:
        o = parse_cpu_option(text)
        _ = o.enforce
    assert "\n" not in str(e.value)


def test_shim_maps_cpu_option() -> None:
    from pyhv.errors import PyhvError
    from pyhv.shim.mapping import build

    c = build(["-cpu", "EPYC-Rome,pclmulqdq=off,+lahf_lm,tsc-deadline=on,pmu=off,kvm=off,"
               "vendor=GenuineIntel,model-id=Mine", "-kernel", "/k"]).config
    assert c is not None
    assert (c.cpu.mode, c.cpu.model, c.cpu.check) == ("custom", "EPYC-Rome", "partial")
    assert [(f.name, f.policy) for f in c.cpu.features] == [
        ("pclmuldq", "disable"), ("lahf_lm", "optional"), ("tsc-deadline", "optional")]
    assert c.features.pmu is False and c.features.kvm_hidden
    assert (c.cpu.vendor, c.cpu.model_id) == ("GenuineIntel", "Mine")
    c = build(["-cpu", "qemu64,check=off", "-kernel", "/k"]).config
    assert c is not None and c.cpu.check == "none"
    c = build(["-cpu", "host,-invtsc", "-kernel", "/k"]).config
    assert c is not None and c.cpu.mode == "host-passthrough"
    for bad, needle in (("qemu64,+nosuchflag", "unknown CPU feature 'nosuchflag'"),
                        ("Pentium9", "unable to find CPU model 'Pentium9'"),
                        ("qemu64,vendor=short", "must be 12 characters"),
                        ("qemu64,hv-time", "Hyper-V enlightenment")):
        with pytest.raises(PyhvError, match=needle) as e:
            build(["-cpu", bad, "-kernel", "/k"])
        assert "\n" not in str(e.value)


# ---- CPUID from the map (a synthetic host that has every feature) ------------------

@pytest.mark.parametrize("name", MODELS)
def test_model_words_on_rich_host(cmap: CpuMap, name: str) -> None:
    host = rich_host(cmap)
    cpu = guest_cpu(host, CpuConfig("custom", name), cmap=cmap)
    model = cmap.model(name)
    expected = set(model.features) | {"x2apic"}
    # named models have no PMU unless pmu=on (QEMU), and with it go AMD's counters
    expected -= set(KVM_DEFAULT_OFF) | {"hypervisor"} | NO_PMU
    expected = {f for f in expected if cmap.features[f].cpuid}
    want = cmap.bits(expected)
    got = known_words(cmap, cpu.base)
    for word in cmap.words():
        assert got.get(word, 0) == want.get(word, 0), (name, word)
    w = words_of(cpu.base)
    vendor = cmap.vendors[model.vendor or ""]
    assert vendor_string(w[(0, 0, 1)], w[(0, 0, 3)], w[(0, 0, 2)]) == vendor
    assert w[(1, 0, 0)] == model.signature
    assert not cpu.filtered and not cpu.pmu


def test_policies(cmap: CpuMap) -> None:
    host = rich_host(cmap, without=("avx512f",))
    sky = CpuConfig("custom", "Skylake-Server")
    cpu = guest_cpu(host, sky, cmap=cmap)
    assert cpu.filtered == ("avx512f",)
    assert not words_of(cpu.base)[(7, 0, 1)] & (1 << 16)
    # XSAVE components of AVX-512 go with it
    assert not words_of(cpu.base).get((0xD, 0, 0), 0) & 0xE0
    with pytest.raises(CpuModelRefused, match="avx512f") as e:
        guest_cpu(host, replace(sky, check="full"), cmap=cmap)
    assert "\n" not in str(e.value)
    with pytest.raises(CpuModelRefused, match="avx512f"):
        guest_cpu(host, replace(sky, features=(CpuFeature("avx512f", "require"),)),
                  cmap=cmap)
    # check='none' drops silently, optional keeps only what the host has
    assert guest_cpu(host, replace(sky, check="none"), cmap=cmap).filtered == ("avx512f",)
    opt = guest_cpu(host, CpuConfig("custom", "qemu64",
                                    features=(CpuFeature("avx512f", "optional"),
                                              CpuFeature("avx2", "optional"))), cmap=cmap)
    w = words_of(opt.base)
    assert w[(7, 0, 1)] & (1 << 5) and not w[(7, 0, 1)] & (1 << 16)
    # force sets it anyway; disable clears; forbid refuses what the host has
    forced = guest_cpu(host, replace(sky, features=(CpuFeature("avx512f", "force"),)),
                       cmap=cmap)
    assert words_of(forced.base)[(7, 0, 1)] & (1 << 16)
    off = guest_cpu(host, replace(sky, features=(CpuFeature("avx2", "disable"),)),
                    cmap=cmap)
    assert not words_of(off.base)[(7, 0, 1)] & (1 << 5)
    with pytest.raises(CpuModelRefused, match="avx2 .forbidden"):
        guest_cpu(host, replace(sky, features=(CpuFeature("avx2", "forbid"),)), cmap=cmap)
    with pytest.raises(CpuModelError, match="unknown CPU feature 'bogus'"):
        guest_cpu(host, replace(sky, features=(CpuFeature("bogus", "require"),)), cmap=cmap)


def test_hypervisor_pmu_kvm_hidden(cmap: CpuMap) -> None:
    host = rich_host(cmap)
    topo = flat_topology(1)
    plain = guest_cpu(host, CpuConfig("custom", "EPYC-Rome"), cmap=cmap).table(0, topo)
    assert words_of(plain)[(1, 0, 2)] & (1 << 31)
    assert any(e[0] == 0x40000000 for e in plain)
    assert words_of(plain)[(0xA, 0, 0)] == 0  # named models: no PMU unless asked (QEMU)
    cfg = CpuConfig("custom", "EPYC-Rome",
                    features=(CpuFeature("hypervisor", "disable"),))
    cpu = guest_cpu(host, cfg, FeaturesConfig(pmu=True, kvm_hidden=True), cmap=cmap)
    table = cpu.table(0, topo)
    assert not words_of(table)[(1, 0, 2)] & (1 << 31)
    assert not any(0x40000000 <= e[0] < 0x40000100 for e in table)
    assert words_of(table)[(0xA, 0, 0)] == 0x07300402
    assert words_of(table)[(0x80000001, 0, 2)] & (1 << 23)  # perfctr_core with a PMU
    nopmu = guest_cpu(host, CpuConfig(), FeaturesConfig(pmu=False), cmap=cmap).table(0, topo)
    assert words_of(nopmu)[(0xA, 0, 0)] == 0
    assert not words_of(nopmu)[(0x80000001, 0, 2)] & (1 << 23)


def test_arch_capabilities_msr_follows_model(cmap: CpuMap) -> None:
    host = rich_host(cmap)
    msrs = {MSR_IA32_ARCH_CAPABILITIES: (1 << 64) - 1}
    sky = guest_cpu(host, CpuConfig("custom", "Skylake-Server"), feature_msrs=msrs,
                    cmap=cmap)
    assert MSR_IA32_ARCH_CAPABILITIES not in sky.msrs
    assert not words_of(sky.base)[(7, 0, 3)] & (1 << 29)
    coop = guest_cpu(host, CpuConfig("custom", "Cooperlake"), feature_msrs=msrs, cmap=cmap)
    value = coop.msrs[MSR_IA32_ARCH_CAPABILITIES]
    expected = cmap.msr_bits(f for f in cmap.model("Cooperlake").features
                             if cmap.features[f].msr)[MSR_IA32_ARCH_CAPABILITIES]
    assert value == expected and value
    assert words_of(coop.base)[(7, 0, 3)] & (1 << 29)


def test_host_model_drops_unmigratable(cmap: CpuMap) -> None:
    host = rich_host(cmap)
    hm = guest_cpu(host, CpuConfig("host-model"), cmap=cmap)
    present = cmap.present(words_of(hm.base))
    assert "invtsc" not in present and "avx2" in present
    pt = guest_cpu(host, CpuConfig("host-passthrough", features=(
        CpuFeature("avx2", "disable"),), migratable=False), cmap=cmap)
    present = cmap.present(words_of(pt.base))
    assert "invtsc" in present and "avx2" not in present
    # QEMU's -cpu host default (migratable=on) leaves the invariant TSC out too
    pt = guest_cpu(host, CpuConfig("host-passthrough"), cmap=cmap)
    assert "invtsc" not in cmap.present(words_of(pt.base))


def test_config_rejects_bad_vendor() -> None:
    with pytest.raises(ConfigError, match="12 characters"):
        CpuConfig("custom", "qemu64", vendor="Intel")


# ---- on this host's KVM -------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_model_clipped_to_kvm(cmap: CpuMap, host_cpuid: list, name: str) -> None:
    cpu = guest_cpu(host_cpuid, CpuConfig("custom", name, check="none"), cmap=cmap)
    host = words_of(host_cpuid)
    wanted = {f for f in cmap.model(name).features | {"x2apic"}
              if cmap.features[f].cpuid} - set(KVM_DEFAULT_OFF) - {"hypervisor"} - NO_PMU
    if "x2apic" not in cmap.present(host):
        wanted.discard("x2apic")
    bits = cmap.bits(wanted)
    got = known_words(cmap, cpu.base)
    for word in cmap.words():
        if word[:2] == (0xD, 1) and "xsave" not in cmap.present(host):
            continue
        assert got.get(word, 0) == bits.get(word, 0) & host.get(word, 0), (name, word)
    lacking = sorted(f for f in wanted if f not in cmap.present(host))
    assert sorted(cpu.filtered) == lacking


def test_enforce_names_missing_feature(cmap: CpuMap, host_cpuid: list) -> None:
    host = cmap.present(words_of(host_cpuid))
    for name in ("qemu64", "Skylake-Server", "EPYC-Rome"):
        lacking = sorted(f for f in cmap.model(name).features
                         if cmap.features[f].cpuid and f not in host
                         and f not in KVM_DEFAULT_OFF)
        if lacking:
            break
    else:
        pytest.skip("this host's KVM has every feature of the models tried")
    with pytest.raises(CpuModelRefused) as e:
        guest_cpu(host_cpuid, CpuConfig("custom", name, check="full"), cmap=cmap)
    assert all(f in str(e.value) for f in lacking) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", MODELS + ("host",))
def test_qmp_expansion_is_guest_cpuid(cmap: CpuMap, host_cpuid: list, name: str) -> None:
    from pyhv.shim import cpus

    full = cpus.expansion("full", {"name": name})["model"]
    static = cpus.expansion("static", {"name": name})["model"]
    assert full["name"] == name and static["name"] == "base"
    cfg = CpuConfig("custom", name, check="none") if name != "host" else CpuConfig("host-model")
    table = guest_cpu(host_cpuid, cfg, cmap=cmap).table(0, flat_topology(1))
    present = cmap.present(words_of(table))
    on = {k for k, v in static["props"].items() if v is True}
    assert on == {cpus.qemu_name(f) for f in present}
    family, model, stepping = decode_signature(words_of(table)[(1, 0, 0)])
    assert (static["props"]["family"], static["props"]["model"]) == (family, model)
    if name != "host":
        m = cmap.model(name)
        assert static["props"]["vendor"] == cmap.vendors[m.vendor or ""]
        assert (family, model, stepping) == (m.family, m.model, m.stepping)
    # full expansion also lists QEMU's other spellings
    assert set(full["props"]) >= set(static["props"])
    # what libvirt does with it (its STATIC_FULL probe): a full expansion of "base"
    # with the static properties gives the same CPU back
    again = cpus.expansion("full", static)["model"]
    assert again["name"] == "base"
    assert {k: again["props"][k] for k in static["props"]} == static["props"]


def test_qmp_definitions_compare_baseline(cmap: CpuMap, host_cpuid: list) -> None:
    from pyhv.shim import cpus, registry
    from pyhv.shim.qmp import QmpError

    defs = {d["name"]: d for d in cpus.definitions(registry.cpu_models())}
    assert {"host", "max", "qemu64", "Skylake-Server", "EPYC-Rome"} <= set(defs)
    assert "cpu64-rhel6" not in defs
    from pyhv.engine.cpuid import FEATURE_MSRS
    from pyhv.engine.kvm import Kvm

    kvm = Kvm()
    msrs = kvm.get_feature_msrs(list(FEATURE_MSRS))
    kvm.close()
    for name in MODELS + ("Cooperlake",):
        filtered = guest_cpu(host_cpuid, CpuConfig("custom", name, check="none"),
                             feature_msrs=msrs, cmap=cmap).filtered
        assert defs[name]["unavailable-features"] == [cpus.qemu_name(f) for f in filtered]
        assert defs[name]["typename"] == f"{name}-x86_64-cpu"
    same = cpus.comparison({"name": "qemu64"}, {"name": "qemu64"})
    assert same == {"result": "identical", "responsible-properties": []}
    sub = cpus.comparison({"name": "qemu64", "props": {"sse2": False}}, {"name": "qemu64"})
    assert sub == {"result": "subset", "responsible-properties": ["sse2"]}
    base = cpus.baseline({"name": "qemu64", "props": {"sse2": False}}, {"name": "host"})
    assert base["model"]["props"]["sse2"] is False and base["model"]["props"]["fpu"] is True
    with pytest.raises(QmpError, match="cannot be used"):
        cpus.expansion("full", {"name": "Pentium9"})
    with pytest.raises(QmpError, match="Property 'bogus' not found"):
        cpus.expansion("full", {"name": "qemu64", "props": {"bogus": True}})


# ---- the guest's view (tier kvm) ----------------------------------------------------

def _guest_words(report) -> dict:
    out = {}
    for ln in report.lines:
        if ln.tag == "cpuid":
            f = ln.fields
            for i, reg in enumerate(("eax", "ebx", "ecx", "edx")):
                out[(f["leaf"], f["sub"], i)] = f[reg]
    return out


#: bits the CPU computes at run time (OSXSAVE, OSPKE)
_DYNAMIC = {"osxsave", "ospke"}


@pytest.mark.kvm
@pytest.mark.parametrize("name", MODELS)
def test_guest_sees_model(cmap: CpuMap, host_cpuid: list, guests, tmp_path: Path,
                          name: str) -> None:
    from engine_helpers import run_config

    out = tmp_path / "out.txt"
    cpu = CpuConfig("custom", name, check="none")
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, "pyhv.cpuid"), memory=64 << 20,
                   vcpus=1, serial=SerialConfig("file", str(out)), cpu=cpu)
    run = run_config(cfg, out, timeout=120)
    report = run.report
    assert run.event.kind == "powered-off" and report.complete, report
    seen = _guest_words(report)
    expected = words_of(guest_cpu(host_cpuid, cpu, cmap=cmap).table(0, flat_topology(1)))
    model = cmap.model(name)
    vendor = next(ln.fields["vendor"] for ln in report.lines if ln.tag == "cpuid-vendor")
    assert vendor == cmap.vendors[model.vendor or ""]
    assert seen[(1, 0, 0)] == model.signature
    assert decode_signature(seen[(1, 0, 0)]) == (model.family, model.model, model.stepping)
    got, want = cmap.present(seen) - _DYNAMIC, cmap.present(expected) - _DYNAMIC
    if not hwvirt():
        # PVM (no VT-x/AMD-V): the guest reads leaf 1 ECX/EDX, leaf 7 and leaf 0xD
        # from the host CPU whatever KVM_SET_CPUID2 says (measured: qemu64's table has
        # leaf 7 EBX 0, the guest sees the host's); every other leaf is the table's
        native = {w for w in cmap.words() if w[0] in (7, 0xD) or w in ((1, 0, 2), (1, 0, 3))}
        decided = {f.name for f in cmap.features.values()
                   if f.cpuid and not any(w in native for w, _ in f.cpuid)}
        got &= decided
        want &= decided
        assert "lahf_lm" in decided and "syscall" in decided
    assert got == want
    assert seen[(0x80000001, 0, 3)] == expected[(0x80000001, 0, 3)]
    assert seen[(0x80000001, 0, 2)] == expected[(0x80000001, 0, 2)]
    brand = b"".join(seen[(fn, 0, i)].to_bytes(4, "little")
                     for fn in (0x80000002, 0x80000003, 0x80000004) for i in range(4))
    assert brand.rstrip(b"\0").decode() == f"{name} (pyhv)"


@pytest.mark.kvm
def test_machine_refuses_with_enforce(cmap: CpuMap, host_cpuid: list, guests) -> None:
    from pyhv.engine.machine import Machine
    from pyhv.errors import PyhvError

    host = cmap.present(words_of(host_cpuid))
    lacking = sorted(f for f in cmap.model("Skylake-Server").features
                     if cmap.features[f].cpuid and f not in host)
    if not lacking:
        pytest.skip("this host's KVM has every Skylake-Server feature")
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), None, ""), memory=64 << 20,
                   cpu=CpuConfig("custom", "Skylake-Server", check="full"))
    m = Machine(cfg)
    try:
        with pytest.raises(PyhvError, match=lacking[0]) as e:
            m.start()
        assert "\n" not in str(e.value)
    finally:
        m.close()


# ---- domain XML -----------------------------------------------------------------------

def _domain(cpu: str, features: str = "<acpi/><apic/>") -> bytes:
    return f"""<domain type="kvm"><name>t</name><memory unit="MiB">64</memory>
<os><type arch="x86_64" machine="pc">hvm</type><kernel>/k</kernel></os>
<features>{features}</features>{cpu}</domain>""".encode()


def test_domxml_cpu_models() -> None:
    from pyhv.domxml.check import describe
    from pyhv.domxml.parse import parse_domain
    from pyhv.engine.support import issues

    cfg = parse_domain(_domain(
        """<cpu mode="custom" match="exact" check="full">
             <model fallback="forbid" vendor_id="GenuineIntel">EPYC-Rome</model>
             <vendor>AMD</vendor>
             <feature policy="disable" name="svm"/>
             <feature policy="disable" name="hypervisor"/>
             <feature policy="optional" name="sse4_2"/>
           </cpu>""",
        "<acpi/><apic/><pmu state='off'/><kvm><hidden state='on'/></kvm>"))
    cpu = cfg.cpu
    assert (cpu.mode, cpu.model, cpu.check, cpu.vendor) == ("custom", "EPYC-Rome", "full",
                                                            "GenuineIntel")
    assert [(f.name, f.policy) for f in cpu.features] == [
        ("svm", "disable"), ("hypervisor", "disable"), ("sse4_2", "optional")]
    assert cfg.features.pmu is False and cfg.features.kvm_hidden
    assert not [i for i in issues(cfg) if i.subject[0] in ("cpu", "features")]
    text = "\n".join(describe(cfg))
    assert "cpu custom EPYC-Rome" in text and "check full" in text and "kvm-hidden" in text
    hm = parse_domain(_domain("<cpu mode='host-model' check='partial'>"
                              "<model fallback='forbid'/></cpu>"))
    assert (hm.cpu.mode, hm.cpu.model, hm.cpu.check) == ("host-model", None, "partial")
    assert not [i for i in issues(hm) if i.subject[0] == "cpu"]


def test_domxml_cpu_errors() -> None:
    from pyhv.domxml.parse import map_domain, parse_domain
    from pyhv.engine.support import issues
    from pyhv.errors import PyhvError

    xml = _domain("<cpu mode='custom'><model vendor_id='Intel'>qemu64</model></cpu>")
    with pytest.raises(PyhvError, match="/domain/cpu") as e:
        parse_domain(xml)  # libvirt's schema already wants 12 characters
    assert "\n" not in str(e.value)
    with pytest.raises(PyhvError, match="vendor_id 'Intel' must be 12 characters"):
        map_domain(xml, validate=False)
    bad = parse_domain(_domain("<cpu mode='custom'><model>Pentium9</model>"
                               "<feature policy='require' name='avx2'/></cpu>"))
    assert [i.message for i in issues(bad) if i.subject[0] == "cpu"] == [
        "cpu model: unknown CPU model 'Pentium9' (the models are libvirt's CPU map, "
        f"{CPU_MAP_DIR})"]
    flag = parse_domain(_domain("<cpu mode='host-model'><feature policy='require' "
                                "name='avx9000'/></cpu>"))
    assert [i.message for i in issues(flag) if i.subject[0] == "cpu"] == [
        "cpu feature: unknown CPU feature 'avx9000'"]
    with pytest.raises(PyhvError, match="hyperv"):
        parse_domain(_domain("<cpu mode='host-passthrough'/>",
                             "<acpi/><hyperv mode='custom'><relaxed state='on'/></hyperv>"))


def test_qom_filtered_features() -> None:
    """libvirt reads a started vCPU's feature-words and filtered-features: the bits
    of model features the host lacked are reported filtered, as QEMU does."""
    from pyhv.shim.commands import Commands, VcpuInfo
    from pyhv.shim.qmp import QmpConnection

    class Machine:
        cpu_type = "Skylake-Server-x86_64-cpu"

        def vcpus(self):
            return [VcpuInfo(0, 1234)]

        def cpuid_words(self):
            return [(1, None, "ECX", 0x80202000), (7, 0, "EBX", 0x1)]

        def cpuid_filtered(self):
            return [(1, None, "ECX", 0x1), (7, 0, "EBX", 1 << 5)]

        def balloon_path(self):
            return None

    c = Commands(Machine())  # type: ignore[arg-type]
    path = "/machine/unattached/device[0]"
    got = c.execute("qom-get", {"path": path, "property": "filtered-features"},
                    QmpConnection())
    assert {(w["cpuid-input-eax"], w.get("cpuid-input-ecx"), w["cpuid-register"]):
            w["features"] for w in got} == {(1, None, "ECX"): 1, (7, 0, "EBX"): 32}
    words = c.execute("qom-get", {"path": path, "property": "feature-words"},
                      QmpConnection())
    assert [w["features"] for w in words] == [0x80202000, 0x1]
    assert c.execute("qom-get", {"path": path, "property": "type"},
                     QmpConnection()) == "Skylake-Server-x86_64-cpu"
