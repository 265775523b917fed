"""The CPUID and MSR values each vCPU starts with.

CPUID starts from what KVM supports (KVM_GET_SUPPORTED_CPUID), then pyhv sets
what a VMM must: the hypervisor bit, KVM's paravirtual leaves (kvmclock), and
APIC IDs and topology leaves (1, 4, 0xB, 0x1F) consistent with the vCPU count,
so the guest's view agrees with the MADT.
"""

from __future__ import annotations

from dataclasses import dataclass

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
               *, pmu: bool = True) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``index``."""
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
            c |= 1 << 31  # hypervisor present
            d = d | (1 << 28) if per_pkg > 1 else d & ~(1 << 28)
        elif fn == 4:
            cache_level = (a >> 5) & 7
            sharing = (per_pkg if cache_level >= 3 else topo.threads) - 1
            a = (a & 0x3FFF) | (min(sharing, 0xFFF) << 14) | (min(topo.cores - 1, 63) << 26)
        elif fn == 6:
            a &= ~(1 << 0)  # no digital thermal sensor, no turbo reporting
        elif fn == 0xA and not pmu:
            a = b = c = d = 0
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
    if not any(e[0] == 0x40000000 for e in out):
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
