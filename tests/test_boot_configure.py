"""configure_boot: command line, zero page, PVH start info, GDT, page tables."""

from __future__ import annotations

import glob
import struct
from dataclasses import replace
from typing import Any

import pytest

from pyhv.engine.boot import (
    BootError,
    Cmdline,
    CmdlineError,
    EntryState,
    Initrd,
    KernelImage,
    Segment,
    configure_boot,
    load_initrd,
    load_kernel,
)
from pyhv.engine.layout import (
    BOOT_GDT_ADDR,
    BOOT_IDT_ADDR,
    BOOT_STACK_POINTER,
    CMDLINE_ADDR,
    CMDLINE_MAX,
    PAGE_TABLES_ADDR,
    PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR,
    ZERO_PAGE_ADDR,
    E820Entry,
    GiB,
    MiB,
    e820_map,
    ram_ranges,
)
from pyhv.engine.memory import GuestMemory

ZP = ZERO_PAGE_ADDR
DEBIAN_KERNELS = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))


def ram(size: int = 64 * MiB, fill: int = 0xAB) -> GuestMemory:
    mem = GuestMemory.from_bytearrays(ram_ranges(size))
    mem.fill(0, 0x30000, fill)  # garbage in the boot area: everything must be written
    return mem


def setup_header(version: int = 0x020F) -> bytes:
    """Bytes 0x1f1..0x26c of a bzImage (as KernelImage.setup_header holds them)."""
    page = bytearray(0x26C)
    page[0x1F1] = 27
    struct.pack_into("<H", page, 0x1FE, 0xAA55)
    page[0x200:0x202] = b"\xeb\x6a"
    page[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", page, 0x206, version)
    page[0x211] = 0x01
    struct.pack_into("<I", page, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", page, 0x230, 0x200000)
    page[0x234] = 1
    struct.pack_into("<H", page, 0x236, 0x7F)
    struct.pack_into("<I", page, 0x238, 2047)
    struct.pack_into("<Q", page, 0x258, 0x1000000)
    struct.pack_into("<I", page, 0x260, 0x3000000)
    return bytes(page[0x1F1:])


BZIMAGE = KernelImage(
    path="/boot/k", format="bzimage", protocol="linux64", entry=0x1000200,
    load_start=0x1000000, load_end=0x4000000, setup_header=setup_header(),
    protocol_version=0x020F, cmdline_max=2047, initrd_addr_max=0x7FFFFFFF)


def kernel_image(**kw: Any) -> KernelImage:
    return replace(BZIMAGE, **kw)


ELF_LINUX: dict[str, Any] = {
    "format": "elf", "setup_header": None, "protocol_version": None, "entry": 0x1000000}
ELF_PVH: dict[str, Any] = {
    **ELF_LINUX, "protocol": "pvh", "entry": 0x1000A50, "cmdline_max": CMDLINE_MAX - 1}


def gdt(mem: GuestMemory, selector: int) -> int:
    return mem.read_u64(BOOT_GDT_ADDR + selector)


# ---- command line ------------------------------------------------------------------
def test_cmdline_written_nul_terminated() -> None:
    mem = ram()
    configure_boot(mem, kernel_image(), "console=ttyS0 root=/dev/vda")
    line = b"console=ttyS0 root=/dev/vda\0"
    assert mem.read(CMDLINE_ADDR, len(line)) == line


def test_cmdline_at_limit_accepted_and_over_limit_refused() -> None:
    mem = ram()
    configure_boot(mem, kernel_image(cmdline_max=100), "a" * 100)
    assert mem.read(CMDLINE_ADDR, 101) == b"a" * 100 + b"\0"
    with pytest.raises(CmdlineError) as exc:
        configure_boot(mem, kernel_image(cmdline_max=100), "a" * 101)
    assert str(exc.value) == "kernel command line is 101 bytes, limit 100"


def test_cmdline_too_long_for_any_kernel() -> None:
    with pytest.raises(CmdlineError) as exc:
        configure_boot(ram(), kernel_image(), "x" * 70000)
    assert str(exc.value) == "kernel command line is 70000 bytes, limit 2047"
    with pytest.raises(CmdlineError) as exc:
        configure_boot(ram(), kernel_image(**ELF_PVH), "x" * 70000)
    assert str(exc.value) == f"kernel command line is 70000 bytes, limit {CMDLINE_MAX - 1}"


@pytest.mark.parametrize("bad", ["a\0b", "tab\there", "new\nline", "caf\u00e9", b"\xff"])
def test_cmdline_bad_characters(bad: str | bytes) -> None:
    with pytest.raises(CmdlineError) as exc:
        configure_boot(ram(), kernel_image(), bad)
    assert "\n" not in str(exc.value) and "kernel command line has" in str(exc.value)


def test_cmdline_object() -> None:
    c = Cmdline(b"quiet", 10)
    assert (str(c), len(c), c.to_bytes()) == ("quiet", 5, b"quiet\0")
    mem = ram()
    configure_boot(mem, kernel_image(), c)
    assert mem.read(CMDLINE_ADDR, 6) == b"quiet\0"
    with pytest.raises(CmdlineError):  # re-checked against the kernel's own limit
        configure_boot(mem, kernel_image(cmdline_max=3), Cmdline("quiet", 4096))


# ---- zero page -----------------------------------------------------------------------
def test_zero_page_fields_bzimage() -> None:
    mem = ram()
    k = kernel_image()
    rd = Initrd(path="rd", addr=0x3F00000, size=0x12345)
    e820 = e820_map(64 * MiB)
    configure_boot(mem, k, "quiet", rd, e820, 0xE0000, 64 * MiB)
    zp = mem.read(ZP, 4096)
    hdr = bytearray(k.setup_header or b"")
    hdr[0x210 - 0x1F1] = 0xFF                       # type_of_loader
    hdr[0x211 - 0x1F1] |= 0x81                      # LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", hdr, 0x224 - 0x1F1, 0xFE00)
    struct.pack_into("<I", hdr, 0x228 - 0x1F1, CMDLINE_ADDR)
    struct.pack_into("<II", hdr, 0x218 - 0x1F1, 0x3F00000, 0x12345)
    assert zp[0x1F1:0x26C] == hdr
    u32 = lambda off: struct.unpack_from("<I", zp, off)[0]
    assert u32(0x228) == CMDLINE_ADDR and u32(0x0C8) == 0
    assert (u32(0x218), u32(0x21C), u32(0x0C0), u32(0x0C4)) == (0x3F00000, 0x12345, 0, 0)
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xE0000
    assert zp[0x1E8] == len(e820)
    table = [E820Entry(*struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i))
             for i in range(len(e820))]
    assert table == e820
    assert zp[0x2D0 + 20 * len(e820):] == bytes(4096 - 0x2D0 - 20 * len(e820))
    # nothing else is set: everything outside header, e820 and the fields is zero
    other = bytearray(zp)
    other[0x1F1:0x26C] = bytes(0x26C - 0x1F1)
    other[0x2D0:0x2D0 + 20 * len(e820)] = bytes(20 * len(e820))
    for off, n in ((0x070, 8), (0x1E8, 1)):
        other[off:off + n] = bytes(n)
    assert other == bytes(4096)


def test_zero_page_without_initrd_or_rsdp() -> None:
    mem = ram()
    configure_boot(mem, kernel_image(), "", None, None, None, 64 * MiB)
    assert mem.read_u32(ZP + 0x218) == 0 and mem.read_u32(ZP + 0x21C) == 0
    assert mem.read_u64(ZP + 0x070) == 0
    assert mem.read_u8(CMDLINE_ADDR) == 0
    assert mem.read_u8(ZP + 0x1E8) == len(e820_map(64 * MiB))


def test_zero_page_high_initrd_uses_ext_fields() -> None:
    mem = ram()
    rd = Initrd(path="rd", addr=0x1_2000_0000, size=0x1_0000_1000)
    configure_boot(mem, kernel_image(), "", rd)
    assert mem.read_u32(ZP + 0x218) == 0x2000_0000 and mem.read_u32(ZP + 0x0C0) == 1
    assert mem.read_u32(ZP + 0x21C) == 0x1000 and mem.read_u32(ZP + 0x0C4) == 1


def test_zero_page_synthesized_for_elf() -> None:
    mem = ram()
    k = kernel_image(**ELF_LINUX, initrd_addr_max=64 * MiB - 1)
    configure_boot(mem, k, "x")
    assert mem.read_u16(ZP + 0x1FE) == 0xAA55
    assert mem.read(ZP + 0x202, 4) == b"HdrS"
    assert mem.read_u16(ZP + 0x206) == 0x020F
    assert mem.read_u32(ZP + 0x230) == 0x1000000
    assert mem.read_u8(ZP + 0x210) == 0xFF
    assert mem.read_u8(ZP + 0x211) == 0x81
    assert mem.read_u16(ZP + 0x224) == 0xFE00
    assert mem.read_u32(ZP + 0x228) == CMDLINE_ADDR
    assert mem.read_u32(ZP + 0x238) == 2047
    assert mem.read_u32(ZP + 0x22C) == 64 * MiB - 1


def test_e820_with_high_ram_and_too_many_entries() -> None:
    mem = ram()
    big = e820_map(6 * GiB)
    configure_boot(mem, kernel_image(), "", None, big, None, 6 * GiB)
    assert mem.read_u8(ZP + 0x1E8) == len(big)
    last = mem.read_struct("<QQI", ZP + 0x2D0 + 20 * (len(big) - 1))
    assert last == (4 * GiB, 6 * GiB - 3 * GiB, 1)
    many = [E820Entry(i * 0x1000, 0x1000, 1) for i in range(129)]
    with pytest.raises(BootError) as exc:
        configure_boot(mem, kernel_image(), "", None, many)
    assert str(exc.value) == "memory map has 129 entries, limit 128"


# ---- 64-bit entry state ----------------------------------------------------------------
def translate(mem: GuestMemory, cr3: int, va: int) -> int:
    """Walk 4-level page tables (2 MiB leaves expected at the PD level)."""
    pml4e = mem.read_u64(cr3 + 8 * ((va >> 39) & 511))
    assert pml4e & 3 == 3
    pdpte = mem.read_u64((pml4e & ~0xFFF) + 8 * ((va >> 30) & 511))
    assert pdpte & 3 == 3 and not pdpte & 0x80
    pde = mem.read_u64((pdpte & ~0xFFF & (1 << 52) - 1) + 8 * ((va >> 21) & 511))
    assert pde & 0x83 == 0x83
    return (pde & ~0x1FFFFF & (1 << 52) - 1) | (va & 0x1FFFFF)


def test_linux64_entry_state() -> None:
    mem = ram()
    state = configure_boot(mem, kernel_image(), "")
    assert isinstance(state, EntryState) and state.long_mode
    assert state.rip == 0x1000200
    assert (state.rsi, state.rsp, state.rbp, state.rbx) == (
        ZERO_PAGE_ADDR, BOOT_STACK_POINTER, BOOT_STACK_POINTER, 0)
    assert state.rflags == 0x2
    assert (state.cr0, state.cr3, state.cr4, state.efer) == (
        0x80000011, PAGE_TABLES_ADDR, 0x20, 0x500)
    assert (state.gdt_base, state.idt_base, state.idt_limit) == (BOOT_GDT_ADDR, BOOT_IDT_ADDR, 0)
    assert state.gdt_limit == 0x27
    assert gdt(mem, 0) == 0 and gdt(mem, 8) == 0
    assert gdt(mem, 0x10) == 0x00AF9B000000FFFF
    assert gdt(mem, 0x18) == 0x00CF93000000FFFF
    assert gdt(mem, 0x20) == 0x00008B0000000067
    assert state.cs == Segment.from_descriptor(0x10, gdt(mem, 0x10))
    assert (state.cs.l, state.cs.db, state.cs.g, state.cs.limit) == (1, 0, 1, 0xFFFFFFFF)
    for seg in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert seg == Segment.from_descriptor(0x18, gdt(mem, 0x18))
        assert (seg.base, seg.limit, seg.db, seg.type, seg.present) == (0, 0xFFFFFFFF, 1, 3, 1)
    assert state.tr == Segment.from_descriptor(0x20, gdt(mem, 0x20))
    assert (state.tr.type, state.tr.s, state.tr.limit) == (11, 0, 0x67)
    assert state.ldt.unusable == 1


def test_identity_page_tables_map_4gib() -> None:
    mem = ram()
    state = configure_boot(mem, kernel_image(), "")
    for va in (0, 0x1234, 0x1FFFFF, 0x200000, 0x1000200, 0x3FFFFFFF, 0x40000000,
               0x8765_4321, 0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF):
        assert translate(mem, state.cr3, va) == va
    pml4 = mem.read(state.cr3, 4096)
    assert pml4[8:] == bytes(4096 - 8)
    pdpt = mem.read_u64(state.cr3) & ~0xFFF
    assert mem.read(pdpt + 32, 4096 - 32) == bytes(4096 - 32)
    for i in range(4):
        pd = mem.read_u64(pdpt + 8 * i) & ~0xFFF
        entries = struct.unpack("<512Q", mem.read(pd, 4096))
        assert entries == tuple((i << 30) | (j << 21) | 0x83 for j in range(512))


# ---- PVH -----------------------------------------------------------------------------
def test_pvh_start_info_and_entry_state() -> None:
    mem = ram()
    k = kernel_image(**ELF_PVH)
    rd = Initrd(path="rd", addr=0x3000000, size=0x54321)
    e820 = e820_map(64 * MiB)
    state = configure_boot(mem, k, "console=hvc0", rd, e820, 0xE0000, 64 * MiB)
    info = mem.read_struct("<IIIIQQQQII", PVH_INFO_ADDR)
    assert info == (0x336EC578, 1, 0, 1, PVH_MODLIST_ADDR, CMDLINE_ADDR, 0xE0000,
                    PVH_MEMMAP_ADDR, len(e820), 0)
    assert mem.read_struct("<QQQQ", PVH_MODLIST_ADDR) == (0x3000000, 0x54321, 0, 0)
    memmap = [mem.read_struct("<QQII", PVH_MEMMAP_ADDR + 24 * i) for i in range(len(e820))]
    assert memmap == [(e.addr, e.size, e.type, 0) for e in e820]
    assert mem.read(CMDLINE_ADDR, 13) == b"console=hvc0\0"
    # the zero page is not written for PVH
    assert mem.read(ZERO_PAGE_ADDR, 16) == b"\xab" * 16
    assert not state.long_mode
    assert (state.rip, state.rbx, state.rflags) == (0x1000A50, PVH_INFO_ADDR, 0x2)
    assert (state.cr0, state.cr4, state.efer) == (0x11, 0, 0)
    assert gdt(mem, 0x10) == 0x00CF9B000000FFFF
    assert gdt(mem, 0x18) == 0x00CF93000000FFFF
    assert gdt(mem, 0x20) == 0x00008B0000000067
    assert state.cs == Segment.from_descriptor(0x10, gdt(mem, 0x10))
    assert (state.cs.db, state.cs.l, state.cs.type, state.cs.limit) == (1, 0, 11, 0xFFFFFFFF)
    for seg in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert seg == Segment.from_descriptor(0x18, gdt(mem, 0x18))
    assert state.tr == Segment.from_descriptor(0x20, gdt(mem, 0x20))
    assert (state.tr.selector, state.tr.base, state.tr.limit) == (0x20, 0, 0x67)
    assert (state.gdt_base, state.gdt_limit) == (BOOT_GDT_ADDR, 0x27)


def test_pvh_without_initrd_or_rsdp() -> None:
    mem = ram()
    configure_boot(mem, kernel_image(**ELF_PVH), "")
    info = mem.read_struct("<IIIIQQQQII", PVH_INFO_ADDR)
    assert info[3:7] == (0, 0, CMDLINE_ADDR, 0)


def test_segment_descriptor_round_trip() -> None:
    for desc in (0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF,
                 0x00008B0000000067, 0x12CF9B345678FFFF):
        assert Segment.from_descriptor(0x10, desc).descriptor() == desc


# ---- the real Debian cloud kernel ------------------------------------------------------
@pytest.mark.skipif(not DEBIAN_KERNELS, reason="no /boot/vmlinuz-*-cloud-amd64 installed")
def test_debian_cloud_kernel_configured() -> None:
    path = DEBIAN_KERNELS[-1]
    mem = GuestMemory.from_bytearrays(ram_ranges(256 * MiB))
    k = load_kernel(mem, path)
    initrds = glob.glob(path.replace("vmlinuz", "initrd.img"))
    rd = load_initrd(mem, initrds[0], k) if initrds else None
    state = configure_boot(mem, k, "console=ttyS0 panic=-1", rd, None, 0xE0000, 256 * MiB)
    assert state.rip == k.entry
    assert mem.read(ZP + 0x202, 4) == b"HdrS"
    assert mem.read_u16(ZP + 0x206) >= 0x020F
    assert mem.read_u8(ZP + 0x211) & 0x81 == 0x81
    if rd is not None:
        assert (mem.read_u32(ZP + 0x218), mem.read_u32(ZP + 0x21C)) == (rd.addr, rd.size)
