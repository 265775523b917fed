"""Per-vCPU CPUID tables (pyhv/engine/cpuid.py)."""

from __future__ import annotations

import math
import os
import struct

import pytest

from pyhv.engine.cpuid import KVM_SIGNATURE, Topology, flat_topology, vcpu_cpuid

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

LEAF1_EBX = 0x0010_0800 | 0xAB            # CLFLUSH 8, 16 logical, brand index 0xAB, APIC 0
LEAF1_ECX = 0x7FFA_3203                    # hypervisor bit (31) clear
LEAF1_EDX = 0x1FEB_FBFF | (1 << 28)        # HTT set by the host
LEAF_80000008_ECX = 0x0001_7007            # ApicIdCoreIdSize 7, NC 7 (8 cores)


def leaf4(level: int, ctype: int) -> int:
    # type | level | self-initialising | junk in the sharing/cores fields the VMM must replace
    return ctype | (level << 5) | (1 << 8) | (0x3F << 14) | (0x3F << 26)


SUPPORTED = [
    (0x0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),  # GenuineIntel, max leaf 0x1F
    (0x1, 0, 0, 0x000906EA, LEAF1_EBX, LEAF1_ECX, LEAF1_EDX),
    (0x4, 0, SIG, leaf4(1, 1), 0x01C0003F, 0x3F, 0),
    (0x4, 1, SIG, leaf4(1, 2), 0x01C0003F, 0x3F, 0),
    (0x4, 2, SIG, leaf4(2, 3), 0x01C0003F, 0x3FF, 0),
    (0x4, 3, SIG, leaf4(3, 3), 0x03C0003F, 0x3FFF, 6),
    (0x4, 4, SIG, 0, 0, 0, 0),
    (0x6, 0, 0, 0x0000_0077, 0x2, 0x9, 0),
    (0xA, 0, 0, 0x0730_0404, 0, 0, 0x603),
    (0xB, 0, SIG, 1, 2, 0x100, 0x55),
    (0xB, 1, SIG, 4, 16, 0x201, 0x55),
    (0xB, 2, SIG, 0, 0, 2, 0x55),
    (0x1F, 0, SIG, 1, 2, 0x100, 0x55),
    (0x1F, 1, SIG, 4, 16, 0x201, 0x55),
    (0x1F, 2, SIG, 0, 0, 2, 0x55),
    (0x40000000, 0, 0, 0x40000001, 0, 0, 0),
    (0x40000001, 0, 0, 0x0100_7EFB, 0, 0, 0),
    (0x80000008, 0, 0, 0x3030, 0, LEAF_80000008_ECX, 0),
]

TOPOLOGIES = [
    flat_topology(1),
    flat_topology(2),
    flat_topology(3),
    flat_topology(8),
    Topology(1, 1, 2),
    Topology(2, 1, 1),
    Topology(1, 4, 2),
    Topology(2, 3, 2),
    Topology(4, 5, 1),
    flat_topology(300),  # more than leaf 1's 8-bit fields can hold
]


def ids(t: Topology) -> str:
    return f"{t.sockets}s{t.cores}c{t.threads}t"


def leaf(table, fn: int, idx: int = 0):
    hits = [e for e in table if e[0] == fn and e[1] == idx]
    assert len(hits) == 1, f"CPUID 0x{fn:x}.{idx}: {len(hits)} entries"
    return hits[0]


def subleaves(table, fn: int):
    return sorted((e for e in table if e[0] == fn), key=lambda e: e[1])


def cpu_indices(topo: Topology) -> list[int]:
    n = topo.cpus
    return sorted({0, 1 % n, n // 2, n - 1})


# ---- Topology ------------------------------------------------------------------

def test_flat_topology_ids_are_indices() -> None:
    t = flat_topology(7)
    assert (t.sockets, t.cores, t.threads, t.cpus) == (1, 7, 1, 7)
    assert [t.apic_id(i) for i in range(7)] == list(range(7))


def test_apic_ids_2_sockets_3_cores_2_threads() -> None:
    t = Topology(2, 3, 2)
    assert t.cpus == 12
    assert (t.thread_bits, t.core_bits) == (1, 2)
    apic = [t.apic_id(i) for i in range(12)]
    assert len(set(apic)) == 12
    assert apic == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    for i, a in enumerate(apic):
        socket, rest = divmod(i, 6)
        core, thread = divmod(rest, 2)
        assert a & 0b1 == thread
        assert (a >> 1) & 0b11 == core
        assert a >> 3 == socket


@pytest.mark.parametrize("s,c,t", [(1, 1, 1), (1, 2, 2), (3, 3, 3), (2, 5, 4), (4, 1, 8),
                                   (5, 7, 1), (1, 16, 1)])
def test_apic_id_fields_recoverable(s: int, c: int, t: int) -> None:
    topo = Topology(s, c, t)
    tb, cb = topo.thread_bits, topo.core_bits
    assert 2 ** tb >= t and (t == 1 or 2 ** (tb - 1) < t)
    assert 2 ** cb >= c and (c == 1 or 2 ** (cb - 1) < c)
    seen = set()
    for i in range(topo.cpus):
        a = topo.apic_id(i)
        assert a not in seen
        seen.add(a)
        thread = a & ((1 << tb) - 1)
        core = (a >> tb) & ((1 << cb) - 1)
        socket = a >> (tb + cb)
        assert (socket * c + core) * t + thread == i
        assert thread < t and core < c and socket < s


# ---- vcpu_cpuid on a synthetic host ------------------------------------------------

@pytest.fixture(params=TOPOLOGIES, ids=ids)
def topo(request: pytest.FixtureRequest) -> Topology:
    return request.param


def test_input_preserved_and_shape(topo: Topology) -> None:
    before = list(SUPPORTED)
    out = vcpu_cpuid(SUPPORTED, 0, topo)
    assert SUPPORTED == before
    assert [(e[0], e[1], e[2]) for e in out] == [(e[0], e[1], e[2]) for e in SUPPORTED]
    for e in out:
        assert all(0 <= r <= 0xFFFF_FFFF for r in e[3:]), e


def test_untouched_leaves_pass_through(topo: Topology) -> None:
    out = vcpu_cpuid(SUPPORTED, 0, topo)
    for fn in (0x0, 0x40000001):
        assert leaf(out, fn) == leaf(SUPPORTED, fn)
    assert leaf(out, 0xA) == leaf(SUPPORTED, 0xA)  # pmu defaults to on


def test_leaf1(topo: Topology) -> None:
    per_pkg = topo.cores * topo.threads
    for i in cpu_indices(topo):
        _f, _i, _fl, a, b, c, d = leaf(vcpu_cpuid(SUPPORTED, i, topo), 1)
        assert a == leaf(SUPPORTED, 1)[3]
        assert c >> 31 == 1, "hypervisor bit"
        assert c & 0x7FFF_FFFF == LEAF1_ECX
        assert b >> 24 == topo.apic_id(i) & 0xFF
        assert (b >> 16) & 0xFF == min(per_pkg, 255)
        assert b & 0xFFFF == LEAF1_EBX & 0xFFFF
        assert bool(d & (1 << 28)) == (per_pkg > 1), "HTT"
        assert d & ~(1 << 28) == LEAF1_EDX & ~(1 << 28)


@pytest.mark.parametrize("n", [1, 2, 4, 64])
def test_leaf1_flat_apic_id_is_index(n: int) -> None:
    for i in range(n):
        b = leaf(vcpu_cpuid(SUPPORTED, i, flat_topology(n)), 1)[4]
        assert b >> 24 == i
        assert (b >> 16) & 0xFF == n
    no_htt = [(1, 0, 0, 0, 0, 0, 0)]
    assert leaf(vcpu_cpuid(no_htt, 0, flat_topology(2)), 1)[6] & (1 << 28)
    assert not leaf(vcpu_cpuid(SUPPORTED, 0, flat_topology(1)), 1)[6] & (1 << 28)


@pytest.mark.parametrize("fn", [0xB, 0x1F])
def test_extended_topology(topo: Topology, fn: int) -> None:
    per_pkg = topo.cores * topo.threads
    apics = set()
    for i in cpu_indices(topo):
        out = vcpu_cpuid(SUPPORTED, i, topo)
        apic = topo.apic_id(i)
        levels = subleaves(out, fn)
        assert [e[1] for e in levels] == [0, 1, 2]
        for _f, idx, flags, _a, _b, c, d in levels:
            assert d == apic, "EDX is the x2APIC ID"
            assert c & 0xFF == idx
            assert flags == SIG
        smt, core, end = levels
        assert (smt[5] >> 8) & 0xFF == 1 and smt[4] & 0xFFFF == topo.threads
        assert (core[5] >> 8) & 0xFF == 2 and core[4] & 0xFFFF == per_pkg
        assert (end[5] >> 8) & 0xFF == 0 and end[4] & 0xFFFF == 0
        smt_shift, pkg_shift = smt[3] & 0x1F, core[3] & 0x1F
        assert 2 ** smt_shift >= topo.threads
        assert 2 ** pkg_shift >= per_pkg
        assert pkg_shift >= smt_shift
        # the fields of the x2APIC ID the shifts delimit are the CPU's coordinates
        socket, rest = divmod(i, per_pkg)
        core_id, thread = divmod(rest, topo.threads)
        assert apic >> pkg_shift == socket
        assert apic & ((1 << smt_shift) - 1) == thread
        assert (apic >> smt_shift) & ((1 << (pkg_shift - smt_shift)) - 1) == core_id
        apics.add(apic)
    assert len(apics) == len(cpu_indices(topo))


def test_leaf4(topo: Topology) -> None:
    per_pkg = topo.cores * topo.threads
    out = vcpu_cpuid(SUPPORTED, 0, topo)
    caches = subleaves(out, 4)
    assert [e[1] for e in caches] == [0, 1, 2, 3, 4]
    for (_f, _idx, _fl, a, b, c, d), orig in zip(caches[:4], subleaves(SUPPORTED, 4)):
        assert a & 0x3FFF == orig[3] & 0x3FFF  # type, level, flags kept
        assert (b, c, d) == orig[4:]
        level = (a >> 5) & 7
        cores_field = a >> 26
        sharing = (a >> 14) & 0xFFF
        assert cores_field + 1 >= min(topo.cores, 64)
        assert cores_field <= 63
        if level == 3:
            assert sharing + 1 >= min(per_pkg, 4096)  # shared by the whole package
        else:
            assert sharing + 1 >= topo.threads  # private to a core
            assert sharing + 1 < 2 * topo.threads
    # power-of-two topologies have one right answer
    if topo == Topology(1, 4, 2):
        eax = [e[3] for e in caches[:4]]
        assert [a >> 26 for a in eax] == [3, 3, 3, 3]
        assert [(a >> 14) & 0xFFF for a in eax] == [1, 1, 1, 7]


def test_kvm_signature(topo: Topology) -> None:
    out = vcpu_cpuid(SUPPORTED, 0, topo)
    _f, _i, _fl, a, b, c, d = leaf(out, 0x40000000)
    assert struct.pack("<III", b, c, d) == b"KVMKVMKVM\0\0\0"
    assert (b, c, d) == KVM_SIGNATURE
    assert a >= 0x40000001


def test_kvm_leaf_added_when_missing() -> None:
    supported = [e for e in SUPPORTED if e[0] != 0x40000000]
    out = vcpu_cpuid(supported, 0, flat_topology(2))
    _f, idx, _fl, a, b, c, d = leaf(out, 0x40000000)
    assert idx == 0 and a >= 0x40000001
    assert struct.pack("<III", b, c, d) == b"KVMKVMKVM\0\0\0"
    assert len(out) == len(supported) + 1


def test_thermal_and_pmu() -> None:
    out = vcpu_cpuid(SUPPORTED, 0, flat_topology(1))
    a6 = leaf(out, 6)[3]
    assert a6 & 1 == 0
    assert a6 | 1 == leaf(SUPPORTED, 6)[3]
    assert leaf(vcpu_cpuid(SUPPORTED, 0, flat_topology(1), pmu=False), 0xA)[3:] == (0, 0, 0, 0)


def test_hypervisor_bit_and_hidden_kvm() -> None:
    """<feature policy='disable' name='hypervisor'/> and <kvm><hidden state='on'/>."""
    topo = flat_topology(2)
    plain = vcpu_cpuid(SUPPORTED, 0, topo)
    assert leaf(plain, 1)[5] & (1 << 31)
    assert leaf(plain, 0x40000000)[4:] == KVM_SIGNATURE
    out = vcpu_cpuid(SUPPORTED, 0, topo, hypervisor=False, kvm_hidden=True)
    assert not leaf(out, 1)[5] & (1 << 31)
    assert not any(0x40000000 <= e[0] <= 0x400000FF for e in out)
    # everything else is as without them
    assert [e for e in out if e[0] != 1] == \
        [e for e in plain if e[0] != 1 and not 0x40000000 <= e[0] <= 0x400000FF]


def test_host_passthrough_leaves_out_the_invariant_tsc_unless_migratable_off() -> None:
    """QEMU's ``-cpu host`` is migratable=on by default: no invariant TSC
    (0x80000007 EDX bit 8); ``migratable=off`` (libvirt's migratable='off') keeps it;
    nothing else changes."""
    from pyhv.config import CpuConfig
    from pyhv.engine.cpuid import INVTSC, guest_cpu

    host = [e for e in SUPPORTED if e[0] != 0x80000007] + \
        [(0x80000007, 0, 0, 0, 0, 0, INVTSC | 0x1)]
    on = guest_cpu(host, CpuConfig("host-passthrough"))
    off = guest_cpu(host, CpuConfig("host-passthrough", migratable=False))
    topo = flat_topology(1)
    assert leaf(on.table(0, topo), 0x80000007)[6] == 0x1
    assert leaf(off.table(0, topo), 0x80000007)[6] == INVTSC | 0x1
    assert [e for e in on.table(0, topo) if e[0] != 0x80000007] == \
        [e for e in off.table(0, topo) if e[0] != 0x80000007]


def test_leaf_80000008(topo: Topology) -> None:
    per_pkg = topo.cores * topo.threads
    _f, _i, _fl, a, b, c, d = leaf(vcpu_cpuid(SUPPORTED, 0, topo), 0x80000008)
    assert a == 0x3030
    assert c & 0xFF == min(per_pkg - 1, 0xFF)
    assert c & ~0xFFFF == LEAF_80000008_ECX & ~0xFFFF


def test_extended_topology_complete_when_host_lists_only_subleaf_0() -> None:
    supported = [e for e in SUPPORTED if not (e[0] == 0xB and e[1] > 0)]
    topo = flat_topology(4)
    out = vcpu_cpuid(supported, 3, topo)
    types = {(e[5] >> 8) & 0xFF: e for e in subleaves(out, 0xB)}
    assert 2 in types, "no core level in CPUID 0xB"
    assert 2 ** (types[2][3] & 0x1F) >= 4


def test_leaf_80000008_apic_id_size_matches_topology() -> None:
    topo = Topology(2, 3, 2)
    pkg_shift = topo.core_bits + topo.thread_bits
    for i in range(topo.cpus):
        c = leaf(vcpu_cpuid(SUPPORTED, i, topo), 0x80000008)[5]
        size = (c >> 12) & 0xF
        assert size == 0 or size == pkg_shift
        shift = size or math.ceil(math.log2((c & 0xFF) + 1))
        assert topo.apic_id(i) >> shift == i // 6


# ---- on the host's real KVM_GET_SUPPORTED_CPUID ------------------------------------

@pytest.fixture(scope="module")
def host_cpuid():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is absent or not read-write for this user")
    from pyhv.engine.kvm import Kvm, KvmUnavailable

    try:
        kvm = Kvm()
    except KvmUnavailable as e:
        pytest.skip(f"KVM unusable: {e}")
    try:
        return kvm.get_supported_cpuid()
    finally:
        kvm.close()


@pytest.mark.parametrize("topo", [flat_topology(1), flat_topology(4), Topology(2, 2, 2)],
                         ids=ids)
def test_invariants_on_host_cpuid(host_cpuid, topo: Topology) -> None:
    assert any(e[0] == 1 for e in host_cpuid), "KVM lists no leaf 1"
    per_pkg = topo.cores * topo.threads
    for i in range(topo.cpus):
        out = vcpu_cpuid(host_cpuid, i, topo)
        apic = topo.apic_id(i)
        rebuilt = (0x40000000, 0xB, 0x1F)
        assert [e[:3] for e in out if e[0] not in rebuilt] == \
            [e[:3] for e in host_cpuid if e[0] not in rebuilt]
        max_basic = next(e[3] for e in host_cpuid if e[0] == 0)
        if max_basic >= 0xB:
            assert [e[1] for e in out if e[0] == 0xB] == [0, 1, 2]
        _f, _i, _fl, _a, b, c, d = leaf(out, 1)
        assert c >> 31 == 1
        assert b >> 24 == apic
        assert (b >> 16) & 0xFF == per_pkg
        assert bool(d & (1 << 28)) == (per_pkg > 1)
        sig = leaf(out, 0x40000000)
        assert struct.pack("<III", *sig[4:]) == b"KVMKVMKVM\0\0\0"
        assert sig[3] >= 0x40000001
        for fn in (0xB, 0x1F):
            for _f, idx, _fl, a, b, c, d in subleaves(out, fn):
                assert d == apic
                assert c & 0xFF == idx
                ltype = (c >> 8) & 0xFF
                if ltype == 1:
                    assert 2 ** (a & 0x1F) >= topo.threads and b & 0xFFFF == topo.threads
                    assert apic & ((1 << (a & 0x1F)) - 1) == i % topo.threads
                elif ltype == 2:
                    assert 2 ** (a & 0x1F) >= per_pkg and b & 0xFFFF == per_pkg
                    assert apic >> (a & 0x1F) == i // per_pkg
        for _f, _idx, _fl, a, *_ in subleaves(out, 4):
            if a & 0x1F:  # a described cache
                assert (a >> 26) + 1 >= topo.cores
                level = (a >> 5) & 7
                need = per_pkg if level >= 3 else topo.threads
                assert ((a >> 14) & 0xFFF) + 1 >= need
        for e in subleaves(out, 0x80000008):
            assert e[5] & 0xFF == per_pkg - 1
