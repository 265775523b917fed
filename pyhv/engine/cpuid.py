"""The CPUID and MSR values each vCPU starts with.

CPUID starts from what KVM supports (KVM_GET_SUPPORTED_CPUID), then pyhv sets
what a VMM must: the hypervisor bit, KVM's paravirtual leaves (kvmclock), and
APIC IDs and topology leaves (1, 4, 0xB, 0x1F) consistent with the vCPU count,
so the guest's view agrees with the MADT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from pyhv.config import CpuConfig, FeaturesConfig
from pyhv.engine.errors import EngineError

if TYPE_CHECKING:
    from pyhv.cpumodel import CpuMap

# (leaf, subleaf, register index 0-3), as pyhv.cpumodel has it (imported only when a
# model, host-model or a feature change is asked for: not on the host CPU's launch path)
Word = tuple[int, int, int]

CpuidEntry = tuple[int, int, int, int, int, int, int]  # fn, index, flags, eax, ebx, ecx, edx

KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x0000004D)  # "KVMKVMKVM\0\0\0"


@dataclass(frozen=True)
class Topology:
    """CPU topology of the guest: ``sockets * cores * threads`` vCPUs."""

    sockets: int = 1
    cores: int = 1
    threads: int = 1

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def thread_bits(self) -> int:
        return (self.threads - 1).bit_length()

    @property
    def core_bits(self) -> int:
        return (self.cores - 1).bit_length()

    def apic_id(self, index: int) -> int:
        """The APIC ID of vCPU ``index`` (packed socket/core/thread fields)."""
        thread = index % self.threads
        core = (index // self.threads) % self.cores
        socket = index // (self.threads * self.cores)
        return (socket << (self.core_bits + self.thread_bits)) | \
            (core << self.thread_bits) | thread


def flat_topology(cpus: int) -> Topology:
    """One socket with ``cpus`` single-threaded cores."""
    return Topology(1, cpus, 1)


def vcpu_cpuid(supported: list[CpuidEntry], index: int, topo: Topology,
               *, pmu: bool = True, hypervisor: bool = True,
               kvm_hidden: bool = False) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``index`` (``supported``: KVM's table, or the one
    :func:`guest_cpu` made for a model)."""
    apic = topo.apic_id(index)
    per_pkg = topo.cores * topo.threads
    out: list[CpuidEntry] = []
    max_basic = next((e[3] for e in supported if e[0] == 0), 0)
    rebuilt: set[int] = set()
    for fn, idx, flags, a, b, c, d in supported:
        if fn in (0xB, 0x1F):
            # rebuilt from the guest topology, in place, whatever subleaves the host lists
            if fn not in rebuilt:
                rebuilt.add(fn)
                out.extend(topology_leaf(fn, topo, apic))
            continue
        if fn == 1:
            b = (b & 0x0000FFFF) | (min(per_pkg, 255) << 16) | ((apic & 0xFF) << 24)
            c = c | (1 << 31) if hypervisor else c & ~(1 << 31)  # hypervisor present
            d = d | (1 << 28) if per_pkg > 1 else d & ~(1 << 28)
        elif fn == 4:
            cache_level = (a >> 5) & 7
            sharing = (per_pkg if cache_level >= 3 else topo.threads) - 1
            a = (a & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(topo.cores - 1, 63) << 26)
        elif fn == 6:
            a &= ~(1 << 0)  # no digital thermal sensor, no turbo reporting
        elif fn == 0xA and not pmu:
            a = b = c = d = 0
        elif 0x40000000 <= fn <= 0x400000FF and kvm_hidden:
            continue
        elif fn == 0x40000000:
            a = max(a, 0x40000001)
            b, c, d = KVM_SIGNATURE
        elif fn == 0x80000008:
            # NC (cores - 1) and ApicIdCoreIdSize (the package shift of the APIC ID)
            c = (c & ~0xF0FF) | ((topo.core_bits + topo.thread_bits) << 12) \
                | min(per_pkg - 1, 0xFF)
        out.append((fn, idx, flags, a & 0xFFFFFFFF, b & 0xFFFFFFFF, c & 0xFFFFFFFF,
                    d & 0xFFFFFFFF))
    for leaf in (0xB, 0x1F):
        if max_basic >= leaf and leaf not in rebuilt:
            out.extend(topology_leaf(leaf, topo, apic))
    if not kvm_hidden and not any(e[0] == 0x40000000 for e in out):
        out.append((0x40000000, 0, 0, 0x40000001, *KVM_SIGNATURE))
    return out


def topology_leaf(leaf: int, topo: Topology, apic: int) -> list[CpuidEntry]:
    """Extended topology (0xB or 0x1F): SMT level, core level, end marker."""
    sig = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    per_pkg = topo.cores * topo.threads
    return [
        (leaf, 0, sig, topo.thread_bits, topo.threads, (1 << 8) | 0, apic),
        (leaf, 1, sig, topo.thread_bits + topo.core_bits, per_pkg, (2 << 8) | 1, apic),
        (leaf, 2, sig, 0, 0, 2, apic),
    ]


MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_CORE_CAPABILITIES = 0xCF
#: the feature MSRs libvirt's CPU map names bits of
FEATURE_MSRS = (MSR_IA32_ARCH_CAPABILITIES, MSR_IA32_CORE_CAPABILITIES)

#: XCR0 state components (CPUID 0xD) and the feature each needs
_XSAVE_COMPONENTS = {2: "avx", 3: "mpx", 4: "mpx", 5: "avx512f", 6: "avx512f",
                     7: "avx512f", 9: "pku", 17: "amx-tile", 18: "amx-tile"}
#: features a disabled PMU takes away (AMD's core counters, Intel's PDCM)
_PMU_FEATURES = ("perfctr_core", "perfctr_nb", "pdcm")


class CpuModelRefused(EngineError):
    """The model asks for something this host's KVM cannot give (``enforce``)."""


@dataclass(frozen=True)
class GuestCpu:
    """What every vCPU of a machine is given before its topology is filled in."""

    #: the CPUID table (KVM_GET_SUPPORTED_CPUID for host-passthrough, else the model's)
    base: list[CpuidEntry]
    #: MSRs that follow from the model (IA32_ARCH_CAPABILITIES)
    msrs: dict[int, int] = field(default_factory=dict)
    pmu: bool = True
    hypervisor: bool = True
    kvm_hidden: bool = False
    #: model features the host lacks, left out (QEMU's "filtered features")
    filtered: tuple[str, ...] = ()
    #: the model's name (``host`` for passthrough)
    model: str = "host"

    def table(self, index: int, topo: Topology) -> list[CpuidEntry]:
        return vcpu_cpuid(self.base, index, topo, pmu=self.pmu, hypervisor=self.hypervisor,
                          kvm_hidden=self.kvm_hidden)


def words_of(entries: list[CpuidEntry]) -> dict[Word, int]:
    """CPUID registers by (leaf, subleaf, register index)."""
    out: dict[Word, int] = {}
    for fn, idx, _flags, *regs in entries:
        for i, v in enumerate(regs):
            out.setdefault((fn, idx, i), v)
    return out


#: CPUID 0x80000007 EDX bit 8: the invariant TSC, which blocks migration
INVTSC = 1 << 8


def without_invtsc(supported: list[CpuidEntry]) -> list[CpuidEntry]:
    """The host's CPUID less the invariant TSC (what QEMU's ``-cpu host`` drops
    unless ``migratable=off``)."""
    return [(fn, idx, flags, a, b, c, d & ~INVTSC) if fn == 0x80000007 else
            (fn, idx, flags, a, b, c, d)
            for fn, idx, flags, a, b, c, d in supported]


def guest_cpu(supported: list[CpuidEntry], cpu: CpuConfig,
              features: Optional[FeaturesConfig] = None, *,
              feature_msrs: Optional[dict[int, int]] = None,
              cmap: Optional[CpuMap] = None) -> GuestCpu:
    """The CPU a machine's vCPUs get: the host's (``host-passthrough``,
    ``maximum``), the host's migratable features (``host-model``) or a named model
    from libvirt's CPU map, with the feature policies applied and every feature
    clipped to what KVM supports.  Raises :class:`CpuModelRefused` naming each
    missing feature where the policies or ``check='full'`` ask for it."""
    feats = features or FeaturesConfig()
    passthrough = cpu.mode in ("host-passthrough", "maximum")
    if cpu.mode == "host-passthrough" and cpu.migratable:
        supported = without_invtsc(supported)
    pmu = feats.pmu if feats.pmu is not None else passthrough
    plain = passthrough and not cpu.features and cpu.vendor is None and \
        cpu.model_id is None
    hypervisor = not any(f.name == "hypervisor" and f.policy in ("disable", "forbid")
                         for f in cpu.features)
    if plain and pmu:
        return GuestCpu(list(supported), pmu=True, kvm_hidden=feats.kvm_hidden)
    from pyhv.cpumodel import KVM_DEFAULT_OFF, KVM_DEFAULT_ON, cpu_map

    cmap = cmap or cpu_map()
    host = words_of(supported)
    host_features = cmap.present(host)
    if cpu.mode == "custom":
        assert cpu.model is not None
        model = cmap.model(cpu.model, "cpu model")
        want = set(model.features)
        want |= {f for f in KVM_DEFAULT_ON if f in host_features}
        want -= set(KVM_DEFAULT_OFF)
        name = model.name
    else:
        model = None
        want = set(host_features)
        if cpu.mode == "host-model":
            want -= {f.name for f in cmap.features.values() if not f.migratable}
        name = "host" if passthrough else "host-model"
    want.discard("hypervisor")
    forced: set[str] = set()
    refused: list[str] = []
    required: set[str] = set()
    for f in cpu.features:
        fname = cmap.feature_name(f.name, "cpu feature")
        if fname == "hypervisor":
            continue
        if f.policy == "disable":
            want.discard(fname)
        elif f.policy == "forbid":
            want.discard(fname)
            if fname in host_features:
                refused.append(f"{fname} (forbidden, but the host has it)")
        elif f.policy == "force":
            want.add(fname)
            forced.add(fname)
        elif f.policy == "optional":
            if fname in host_features or not cmap.features[fname].cpuid:
                want.add(fname)
        else:
            want.add(fname)
            required.add(fname)
    if not pmu:
        want -= set(_PMU_FEATURES)
    cpuid_want = {f for f in want if cmap.features[f].cpuid}
    missing = sorted(f for f in cpuid_want - forced if f not in host_features)
    msr_want = {f for f in want if cmap.features[f].msr and not cmap.features[f].cpuid}
    host_msrs = feature_msrs or {}
    msr_missing = sorted(f for f in msr_want - forced if any(
        host_msrs.get(i, 0) & m != m for i, m in cmap.features[f].msr))
    for lacking in missing + msr_missing:
        if cpu.check == "full" or (lacking in required and cpu.check != "none"):
            refused.append(lacking)
    if refused:
        raise CpuModelRefused(f"CPU model {name}: this host's KVM does not support "
                              f"{', '.join(refused)}")
    filtered = tuple(missing + msr_missing)
    keep = (cpuid_want - set(missing)) | forced
    words = cmap.bits(keep)
    known = cmap.words()
    table = _model_table(supported, words, known)
    if model is not None and model.vendor:
        vendor = cmap.vendors.get(model.vendor)
        table = _set_vendor(table, vendor) if vendor else table
    if cpu.vendor is not None:
        table = _set_vendor(table, cpu.vendor)
    if model is not None:
        table = _set_signature(table, model.signature)
    if cpu.model_id is not None or model is not None:
        table = _set_brand(table, cpu.model_id if cpu.model_id is not None
                           else f"{model.name} (pyhv)" if model else "")
    if not passthrough:
        table = _clip_xsave(table, keep)
    msrs: dict[int, int] = {}
    if "arch-capabilities" in keep and not passthrough:
        value = 0
        for mf in (msr_want - set(msr_missing)) | (forced & msr_want):
            for index, mask in cmap.features[mf].msr:
                if index == MSR_IA32_ARCH_CAPABILITIES:
                    value |= mask
        msrs[MSR_IA32_ARCH_CAPABILITIES] = value
    return GuestCpu(table, msrs, pmu, hypervisor, feats.kvm_hidden, filtered, name)


def _model_table(supported: list[CpuidEntry], words: dict[Word, int],
                 known: set[Word]) -> list[CpuidEntry]:
    """KVM's table with every register the map knows replaced by ``words``."""
    out: list[CpuidEntry] = []
    seen: set[tuple[int, int]] = set()
    for fn, idx, flags, *regs in supported:
        seen.add((fn, idx))
        new = [words.get((fn, idx, i), 0) if (fn, idx, i) in known else v
               for i, v in enumerate(regs)]
        out.append((fn, idx, flags, *new))  # type: ignore[arg-type]
    # forced bits in a leaf KVM does not list
    extra: dict[tuple[int, int], list[int]] = {}
    for (fn, idx, i), v in words.items():
        if (fn, idx) not in seen and v:
            extra.setdefault((fn, idx), [0, 0, 0, 0])[i] = v
    for (fn, idx), regs in sorted(extra.items()):
        out.append((fn, idx, 1 if fn in (7, 0xD, 0x14) else 0, *regs))  # type: ignore
    return out


def _replace(table: list[CpuidEntry], fn: int, idx: int,
             regs: dict[int, int]) -> list[CpuidEntry]:
    out: list[CpuidEntry] = []
    found = False
    for e in table:
        if e[0] == fn and e[1] == idx:
            found = True
            vals = list(e[3:])
            for i, v in regs.items():
                vals[i] = v
            out.append((e[0], e[1], e[2], *vals))  # type: ignore[arg-type]
        else:
            out.append(e)
    if not found:
        vals = [0, 0, 0, 0]
        for i, v in regs.items():
            vals[i] = v
        out.append((fn, idx, 0, *vals))  # type: ignore[arg-type]
    return out


def _set_vendor(table: list[CpuidEntry], vendor: str) -> list[CpuidEntry]:
    from pyhv.cpumodel import vendor_words

    b, d, c = vendor_words(vendor)
    for fn in (0, 0x80000000):
        table = _replace(table, fn, 0, {1: b, 2: c, 3: d})
    return table


def _set_signature(table: list[CpuidEntry], eax: int) -> list[CpuidEntry]:
    table = _replace(table, 1, 0, {0: eax})
    return _replace(table, 0x80000001, 0, {0: eax})


def _set_brand(table: list[CpuidEntry], brand: str) -> list[CpuidEntry]:
    raw = brand.encode("ascii", "replace")[:47].ljust(48, b"\0")
    for n in range(3):
        chunk = raw[n * 16:(n + 1) * 16]
        table = _replace(table, 0x80000002 + n, 0, {
            i: int.from_bytes(chunk[i * 4:i * 4 + 4], "little") for i in range(4)})
    return table


def _clip_xsave(table: list[CpuidEntry], features: set[str]) -> list[CpuidEntry]:
    """XSAVE state components (CPUID 0xD) only for the features the guest has."""
    dropped = {c for c, f in _XSAVE_COMPONENTS.items() if f not in features}
    dropped |= {c for c in range(10, 32) if c not in _XSAVE_COMPONENTS}
    if "xsave" not in features:
        return [e for e in table if e[0] != 0xD]
    out: list[CpuidEntry] = []
    kept_end = 0x240  # legacy area + XSAVE header
    for e in table:
        if e[0] == 0xD and e[1] >= 2:
            if e[1] in dropped:
                continue
            kept_end = max(kept_end, e[3] + e[4])
        out.append(e)
    mask = ~sum(1 << c for c in dropped) & 0xFFFFFFFF
    return [(e[0], e[1], e[2], e[3] & mask, e[4], kept_end if e[5] else 0, e[6])
            if e[0] == 0xD and e[1] == 0 else e for e in out]


def filtered_warning(cpu: GuestCpu) -> Optional[str]:
    """QEMU's warning for features the host lacks (None: nothing was left out)."""
    if not cpu.filtered:
        return None
    return (f"warning: host doesn't support requested feature(s) of CPU model "
            f"{cpu.model}: {', '.join(cpu.filtered)} (left out)")


# MSRs a vCPU starts with (what firmware or a VMM leaves for the kernel)
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_LSTAR: 0,
    MSR_CSTAR: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: 1,  # fast string operations
    MSR_MTRR_DEF_TYPE: (1 << 11) | 6,  # MTRRs enabled, default type write-back
}
