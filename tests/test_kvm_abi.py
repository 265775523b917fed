"""pyhv's KVM ABI (abi.CDEF, ioctl numbers, constants) against the host's kernel headers.

A C program is generated from abi.py at test time and compiled with gcc against
``<linux/kvm.h>``; it prints the kernel's idea of every struct size, every field
offset and size (walked recursively from the cffi declarations), every ioctl
number named in ``abi.IOCTL_DEFS`` and every ``KVM_*`` constant abi.py mirrors.
Each is compared with what cffi / ``ioctl.NUMBERS`` / abi.py say.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from pyhv.engine.kvm import abi, build_ffi
from pyhv.engine.kvm._ffi import ffi
from pyhv.engine.kvm.ioctl import NUMBERS

KVM_H = "/usr/include/linux/kvm.h"
GCC = shutil.which("gcc")

needs_c = pytest.mark.skipif(
    GCC is None or not os.path.exists(KVM_H),
    reason="needs gcc and /usr/include/linux/kvm.h (linux-libc-dev) to compile the ABI probe")

#: structs declared shorter than the kernel's on purpose, with where the kernel's
#: continues: ``kvm_run`` is only reached through the vCPU mmap (sized by
#: KVM_GET_VCPU_MMAP_SIZE), never allocated by cffi or encoded in an ioctl, and
#: pyhv does not use the sync-regs area ``s`` that follows ``kvm_dirty_regs``.
PREFIX_STRUCTS = {"struct kvm_run": "s"}

#: offsets the test must cover whatever the recursive walk finds (the brief's list)
IMPORTANT_FIELDS = [
    ("struct kvm_run", "exit_reason"), ("struct kvm_run", "io"), ("struct kvm_run", "mmio"),
    ("struct kvm_run", "io.data_offset"), ("struct kvm_run", "mmio.data"),
    ("struct kvm_run", "internal.data"), ("struct kvm_run", "system_event.type"),
    ("struct kvm_run", "kvm_valid_regs"), ("struct kvm_run", "immediate_exit"),
    ("struct kvm_sregs", "cr0"), ("struct kvm_sregs", "efer"), ("struct kvm_sregs", "apic_base"),
    ("struct kvm_sregs", "interrupt_bitmap"), ("struct kvm_regs", "rip"),
    ("struct kvm_segment", "selector"), ("struct kvm_segment", "unusable"),
    ("struct kvm_fpu", "mxcsr"), ("struct kvm_fpu", "xmm"),
    ("struct kvm_irq_routing_entry", "u"), ("struct kvm_ioeventfd", "fd"),
    ("struct kvm_ioeventfd", "flags"), ("struct kvm_vcpu_events", "sipi_vector"),
    ("struct kvm_vcpu_events", "exception_payload"), ("struct kvm_irqchip", "chip"),
    ("struct kvm_ioapic_state", "redirtbl"), ("struct kvm_cpuid_entry2", "edx"),
    ("struct kvm_cpuid2", "entries"), ("struct kvm_msrs", "entries"),
]


def cdef_structs() -> list[str]:
    names = re.findall(r"^struct\s+(\w+)\s*\{", abi.CDEF, re.M)
    assert names, "no top-level struct found in abi.CDEF"
    return [f"struct {n}" for n in names]


def walk_fields(ctype, prefix: str = ""):
    """(dotted path, offset from the top, size or None, cffi type) of every field."""
    out = []

    def rec(t, pfx, off):
        for name, f in t.fields:
            if not name:  # an anonymous member cffi did not flatten: recurse transparently
                rec(f.type, pfx, off + f.offset)
                continue
            path = f"{pfx}{name}"
            ft = f.type
            size = None if (ft.kind == "array" and ft.length is None) else ffi.sizeof(ft)
            out.append((path, off + f.offset, size, ft))
            if ft.kind in ("struct", "union"):
                rec(ft, path + ".", off + f.offset)

    rec(ctype, prefix, 0)
    return out


def abi_constants() -> dict[str, tuple[str, int]]:
    """Python name -> (C name, value) for every KVM constant abi.py mirrors."""
    out = {}
    for name, value in vars(abi).items():
        if name.startswith("_") or not name.isupper() or type(value) is not int:
            continue
        cname = name if name.startswith("KVM") else f"KVM_{name}"
        out[name] = (cname, value)
    return out


def test_constant_mapping_covers_the_families() -> None:
    consts = abi_constants()
    for family in ("CAP_", "EXIT_", "MP_STATE_", "IRQ_ROUTING_", "IRQFD_FLAG_",
                   "IOEVENTFD_FLAG_", "SYSTEM_EVENT_", "MEM_"):
        assert any(n.startswith(family) for n in consts), family
    assert consts["CAP_IRQCHIP"] == ("KVM_CAP_IRQCHIP", 0)
    assert consts["IOEVENTFD_FLAG_PIO"][0] == "KVM_IOEVENTFD_FLAG_PIO"
    assert consts["KVM_API_VERSION"][0] == "KVM_API_VERSION"
    assert consts["PIT_SPEAKER_DUMMY"][0] == "KVM_PIT_SPEAKER_DUMMY"


def probe_source() -> str:
    lines = [
        "#include <linux/kvm.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <stdint.h>",
        "int main(void) {",
    ]
    for st in cdef_structs():
        lines.append(f'    printf("size\\t%s\\t%lu\\n", "{st}", (unsigned long)sizeof({st}));')
        for path, _off, size, _t in walk_fields(ffi.typeof(st)):
            lines.append(f'    printf("off\\t%s\\t%s\\t%lu\\n", "{st}", "{path}", '
                         f'(unsigned long)offsetof({st}, {path}));')
            if size is not None:
                lines.append(f'    printf("fsize\\t%s\\t%s\\t%lu\\n", "{st}", "{path}", '
                             f'(unsigned long)sizeof((({st} *)0)->{path}));')
    for st, member in PREFIX_STRUCTS.items():
        lines.append(f'    printf("off\\t%s\\t%s\\t%lu\\n", "{st}", "{member}", '
                     f'(unsigned long)offsetof({st}, {member}));')
    for name, _kind, _nr, _ctype in abi.IOCTL_DEFS:
        lines += [f"#ifdef {name}",
                  f'    printf("ioctl\\t%s\\t%lu\\n", "{name}", (unsigned long){name});',
                  "#else",
                  f'    printf("missing\\t%s\\n", "{name}");',
                  "#endif"]
    for cname, _value in abi_constants().values():
        lines += [f"#ifdef {cname}",
                  f'    printf("const\\t%s\\t%ld\\n", "{cname}", (long)({cname}));',
                  "#else",
                  f'    printf("missing\\t%s\\n", "{cname}");',
                  "#endif"]
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


class Kernel:
    def __init__(self, text: str) -> None:
        self.sizes: dict[str, int] = {}
        self.offsets: dict[tuple[str, str], int] = {}
        self.fsizes: dict[tuple[str, str], int] = {}
        self.ioctls: dict[str, int] = {}
        self.consts: dict[str, int] = {}
        self.missing: list[str] = []
        for line in text.splitlines():
            kind, *rest = line.split("\t")
            if kind == "size":
                self.sizes[rest[0]] = int(rest[1])
            elif kind == "off":
                self.offsets[(rest[0], rest[1])] = int(rest[2])
            elif kind == "fsize":
                self.fsizes[(rest[0], rest[1])] = int(rest[2])
            elif kind == "ioctl":
                self.ioctls[rest[0]] = int(rest[1])
            elif kind == "const":
                self.consts[rest[0]] = int(rest[1])
            elif kind == "missing":
                self.missing.append(rest[0])
            else:
                raise AssertionError(f"unexpected probe output line {line!r}")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    if GCC is None or not os.path.exists(KVM_H):
        pytest.skip("needs gcc and /usr/include/linux/kvm.h (linux-libc-dev) to compile the "
                    "ABI probe")
    d = tmp_path_factory.mktemp("kvm_abi")
    src = d / "probe.c"
    exe = d / "probe"
    src.write_text(probe_source())
    cc = subprocess.run([GCC, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                        capture_output=True, text=True)
    assert cc.returncode == 0, f"probe did not compile (a CDEF name the header lacks?):\n" \
                               f"{cc.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    return Kernel(run.stdout)


@needs_c
def test_probe_covers_everything(kernel: Kernel) -> None:
    assert set(kernel.sizes) == set(cdef_structs())
    assert set(kernel.ioctls) | set(kernel.missing) >= {d[0] for d in abi.IOCTL_DEFS}
    for st, path in IMPORTANT_FIELDS:
        assert (st, path) in kernel.offsets, f"probe lacks offsetof({st}, {path})"
    # sanity: the probe really is the kernel's view, not cffi's
    assert kernel.ioctls.get("KVM_RUN") == 0xAE80


@needs_c
@pytest.mark.parametrize("struct", cdef_structs())
def test_struct_size(kernel: Kernel, struct: str) -> None:
    if struct in PREFIX_STRUCTS:
        member = PREFIX_STRUCTS[struct]
        # the declaration stops exactly where the kernel's next member starts
        assert ffi.sizeof(struct) == kernel.offsets[(struct, member)]
        assert ffi.sizeof(struct) < kernel.sizes[struct]
        assert all(c != struct for _n, _k, _nr, c in abi.IOCTL_DEFS)
    else:
        assert ffi.sizeof(struct) == kernel.sizes[struct], struct


@needs_c
@pytest.mark.parametrize("struct", cdef_structs())
def test_field_offsets_and_sizes(kernel: Kernel, struct: str) -> None:
    wrong = []
    for path, off, size, _t in walk_fields(ffi.typeof(struct)):
        k_off = kernel.offsets[(struct, path)]
        if off != k_off:
            wrong.append(f"offsetof({path}): cffi {off}, kernel {k_off}")
        if size is not None and size != kernel.fsizes[(struct, path)]:
            wrong.append(f"sizeof({path}): cffi {size}, kernel {kernel.fsizes[(struct, path)]}")
    assert not wrong, f"{struct}:\n" + "\n".join(wrong)


@needs_c
@pytest.mark.parametrize("struct,path", IMPORTANT_FIELDS)
def test_important_offsets_via_ffi_offsetof(kernel: Kernel, struct: str, path: str) -> None:
    assert ffi.offsetof(struct, *path.split(".")) == kernel.offsets[(struct, path)]


@needs_c
def test_ioctl_numbers(kernel: Kernel) -> None:
    assert not [n for n in kernel.missing if n in NUMBERS], "ioctls missing from the header"
    assert set(NUMBERS) == {d[0] for d in abi.IOCTL_DEFS}
    wrong = {n: (hex(NUMBERS[n]), hex(kernel.ioctls[n])) for n in NUMBERS
             if NUMBERS[n] != kernel.ioctls[n]}
    assert not wrong, f"(pyhv, kernel): {wrong}"


@needs_c
def test_constants(kernel: Kernel) -> None:
    consts = abi_constants()
    missing = [c for c, _v in consts.values() if c in kernel.missing]
    assert not missing, f"abi.py constants the header does not define: {missing}"
    wrong = {c: (v, kernel.consts[c]) for c, v in consts.values() if kernel.consts[c] != v}
    assert not wrong, f"(pyhv, kernel): {wrong}"
    assert kernel.consts["KVM_API_VERSION"] == 12


def test_known_ioctl_encodings() -> None:
    # independent of gcc: hand-computed from _IO/_IOR/_IOW/_IOWR in <asm-generic/ioctl.h>
    assert NUMBERS["KVM_GET_API_VERSION"] == 0xAE00
    assert NUMBERS["KVM_RUN"] == 0xAE80
    assert NUMBERS["KVM_CREATE_VM"] == 0xAE01
    # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region) (32 bytes)
    assert NUMBERS["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    # _IOR(KVMIO, 0x81, struct kvm_regs) (144 bytes)
    assert NUMBERS["KVM_GET_REGS"] == 0x8090AE81
    # _IOWR(KVMIO, 0x05, struct kvm_cpuid2) (8 bytes)
    assert NUMBERS["KVM_GET_SUPPORTED_CPUID"] == 0xC008AE05
    # the kernel's historical quirk: KVM_SET_IRQCHIP is _IOR
    assert NUMBERS["KVM_SET_IRQCHIP"] == 0x8208AE63


def test_generated_ffi_is_up_to_date() -> None:
    with open(build_ffi.target()) as f:
        current = f.read()
    assert build_ffi.generate() == current, \
        "pyhv/engine/kvm/_ffi.py is stale: run `python -m pyhv.engine.kvm.build_ffi`"


def test_run_io_unpack_matches_the_struct() -> None:
    # VcpuFd.run reads kvm_run.io with one struct.unpack_from instead of cffi fields
    from pyhv.engine.kvm import vcpu

    io = dict(ffi.typeof("struct kvm_run").fields)["io"].type
    offsets = [f.offset for _name, f in io.fields]
    sizes = [ffi.sizeof(f.type) for _name, f in io.fields]
    assert [n for n, _f in io.fields] == ["direction", "size", "port", "count", "data_offset"]
    assert offsets == [0, 1, 2, 4, 8] and sizes == [1, 1, 2, 4, 8]
    assert vcpu._IO.size == 16 and vcpu._IO_OFFSET == ffi.offsetof("struct kvm_run", "io")
