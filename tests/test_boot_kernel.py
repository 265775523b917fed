"""Loading kernels (bzImage, ELF) and initrds into guest memory: no KVM."""

from __future__ import annotations

import glob
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pyhv.engine.boot import (
    BootError,
    InitrdError,
    KernelError,
    KernelImage,
    load_initrd,
    load_kernel,
)
from pyhv.engine.errors import EngineError
from pyhv.engine.layout import CMDLINE_MAX, HIMEM_START, MiB, ram_ranges
from pyhv.engine.memory import GuestMemory

XLF_KERNEL_64 = 1
EM_X86_64 = 62
DEBIAN_KERNELS = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))


# ---- builders ---------------------------------------------------------------
def make_bzimage(*, version: int = 0x020F, setup_sects: int = 4,
                 xloadflags: int = XLF_KERNEL_64, relocatable: bool = True,
                 pref_address: int = 0x1000000, init_size: int = 0x100000,
                 kernel_alignment: int = 0x200000, cmdline_size: int = 2047,
                 initrd_addr_max: int = 0x7FFFFFFF, code: bytes = b"",
                 header_end: int = 0x26C) -> bytes:
    """A bzImage with the given header and protected-mode ``code``."""
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    code = code or bytes(range(256)) * 16
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(code) + 15) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = int(relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + code


def make_elf(segments: list[tuple[int, int, bytes, int]], entry: int, *,
             notes: Sequence[tuple[bytes, int, bytes]] = (), elfclass: int = 64,
             machine: int = EM_X86_64) -> bytes:
    """An ELF executable: ``segments`` are ``(paddr, vaddr, data, memsz)``."""
    if elfclass == 32:
        hdr = bytearray(52)
        hdr[:16] = b"\x7fELF\x01\x01\x01" + bytes(9)
        struct.pack_into("<HHIIIIIHHHHHH", hdr, 16, 2, 3, 1, entry, 0, 0, 0, 52, 32,
                         0, 40, 0, 0)
        return bytes(hdr)
    note_blob = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        note_blob += struct.pack("<III", len(n), len(desc), ntype)
        note_blob += n.ljust((len(n) + 3) & ~3, b"\0") + desc.ljust((len(desc) + 3) & ~3, b"\0")
    phnum = len(segments) + (1 if notes else 0)
    data_off = 64 + 56 * phnum
    body = bytearray()
    phdrs = bytearray()
    for paddr, vaddr, data, memsz in segments:
        off = data_off + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 8)
        body += data
        body += bytes(-len(body) % 8)
    if notes:
        off = data_off + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(note_blob),
                             len(note_blob), 4)
        body += note_blob
    hdr = bytearray(64)
    hdr[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 2, machine, 1, entry, 64 if phnum else 0,
                     0, 0, 64, 56, phnum, 64, 0, 0)
    return bytes(hdr + phdrs + body)


def pvh_note(entry: int, size: int = 4) -> tuple[bytes, int, bytes]:
    return (b"Xen", 18, entry.to_bytes(size, "little"))


def ram(size: int = 64 * MiB) -> GuestMemory:
    return GuestMemory.from_bytearrays(ram_ranges(size))


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def assert_one_line_error(exc: pytest.ExceptionInfo[BootError], *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert isinstance(exc.value, EngineError)
    for part in parts:
        assert part in msg, msg


ELF_KERNEL = KernelImage(
    path="k", format="elf", protocol="linux64", entry=0x100000, load_start=0x100000,
    load_end=0x200000, setup_header=None, protocol_version=None, cmdline_max=2047,
    initrd_addr_max=0x37FFFFFF)


def kernel_image(**kw: Any) -> KernelImage:
    return replace(ELF_KERNEL, **kw)


# ---- bzImage ------------------------------------------------------------------
def test_bzimage_loads_at_pref_address(tmp_path: Path) -> None:
    code = bytes(range(256)) * 64
    data = make_bzimage(code=code, init_size=0x300000)
    path = write(tmp_path, "bzImage", data)
    mem = ram()
    k = load_kernel(mem, path)
    assert (k.format, k.protocol) == ("bzimage", "linux64")
    assert k.load_start == 0x1000000
    assert k.entry == 0x1000200
    assert k.load_end == 0x1000000 + 0x300000
    assert mem.read(0x1000000, len(code)) == code
    assert k.setup_header == data[0x1F1:0x26C]
    assert k.protocol_version == 0x020F
    assert k.cmdline_max == 2047
    assert k.initrd_addr_max == 0x7FFFFFFF
    assert k.path == path


def test_bzimage_setup_sects_zero_means_four(tmp_path: Path) -> None:
    code = b"\xcc" * 0x1000
    data = make_bzimage(setup_sects=0, code=code)
    mem = ram()
    k = load_kernel(mem, write(tmp_path, "bz", data))
    assert mem.read(k.load_start, len(code)) == code
    assert len(data) == 5 * 512 + len(code)


def test_bzimage_not_relocatable_loads_at_1mib(tmp_path: Path) -> None:
    code = b"\x90" * 0x2000
    mem = ram()
    k = load_kernel(mem, write(tmp_path, "bz", make_bzimage(relocatable=False, code=code)))
    assert k.load_start == HIMEM_START
    assert k.entry == HIMEM_START + 0x200
    assert mem.read(HIMEM_START, len(code)) == code
    # it decompresses itself at pref_address: the initrd must stay above that
    assert k.load_end == 0x1000000 + 0x100000


def test_bzimage_short_header_fields_ignored(tmp_path: Path) -> None:
    # pref_address and init_size lie beyond a header that ends at 0x248
    data = make_bzimage(version=0x020C, header_end=0x248)
    k = load_kernel(ram(), write(tmp_path, "bz", data))
    assert k.load_start == HIMEM_START
    assert k.protocol_version == 0x020C
    assert k.setup_header == data[0x1F1:0x248]


def test_bzimage_cmdline_size_and_initrd_max_from_header(tmp_path: Path) -> None:
    data = make_bzimage(cmdline_size=255, initrd_addr_max=0x37FFFFFF)
    k = load_kernel(ram(), write(tmp_path, "bz", data))
    assert k.cmdline_max == 255
    assert k.initrd_addr_max == 0x37FFFFFF


def test_bzimage_protocol_linux_and_auto_agree(tmp_path: Path) -> None:
    path = write(tmp_path, "bz", make_bzimage())
    assert load_kernel(ram(), path, "linux") == load_kernel(ram(), path, "auto")


@pytest.mark.parametrize(("data", "parts"), [
    (b"", ["empty file"]),
    (b"MZ" + bytes(4000), ["not a Linux kernel (no bzImage header, not ELF)"]),
    (make_bzimage()[:0x204], ["not a Linux kernel"]),
    (make_bzimage()[:0x230], ["truncated bzImage setup header"]),
    (make_bzimage()[:5 * 512], ["truncated bzImage", "setup alone needs 2560"]),
    (make_bzimage()[:5 * 512 + 100], ["truncated bzImage", "kernel is 100 bytes"]),
    (make_bzimage(version=0x0202), ["boot protocol 2.02 too old (need 2.06)"]),
    (make_bzimage(version=0x020A, xloadflags=0), ["no 64-bit entry point", "2.10"]),
    (make_bzimage(init_size=0x8000000), ["does not fit in 64 MiB of RAM"]),
    (make_bzimage(pref_address=0x8000000), ["does not fit in 64 MiB of RAM"]),
])
def test_bad_kernels(tmp_path: Path, data: bytes, parts: list[str]) -> None:
    path = write(tmp_path, "vmlinuz", data)
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path)
    assert_one_line_error(exc, path, *parts)


def test_bad_boot_flag(tmp_path: Path) -> None:
    data = bytearray(make_bzimage())
    data[0x1FE:0x200] = b"\0\0"
    path = write(tmp_path, "bz", bytes(data))
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path)
    assert_one_line_error(exc, path, "boot flag")


def test_missing_and_unreadable_kernel(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(BootError) as exc:
        load_kernel(ram(), missing)
    assert_one_line_error(exc, f"{missing}: No such file or directory")
    with pytest.raises(BootError) as exc:
        load_kernel(ram(), str(tmp_path))
    assert_one_line_error(exc, str(tmp_path), "a directory; the kernel must be a regular file")


def test_bzimage_refuses_pvh_and_unknown_protocol(tmp_path: Path) -> None:
    path = write(tmp_path, "bz", make_bzimage())
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path, "pvh")
    assert_one_line_error(exc, path, "PVH")
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path, "multiboot")
    assert_one_line_error(exc, path, "unknown boot protocol 'multiboot'")


# ---- ELF --------------------------------------------------------------------------
def test_elf_segments_copied_and_bss_zeroed(tmp_path: Path) -> None:
    text = b"\xf4\xeb\xfd" * 100
    data = b"DATA" * 10
    elf = make_elf([(0x200000, 0xFFFFFFFF81000000, text, len(text)),
                    (0x400000, 0xFFFFFFFF81200000, data, 0x3000)],
                   entry=0xFFFFFFFF81000010)
    mem = ram()
    mem.fill(0x400000, 0x4000, 0xFF)
    k = load_kernel(mem, write(tmp_path, "vmlinux", elf))
    assert (k.format, k.protocol) == ("elf", "linux64")
    assert k.entry == 0x200010
    assert (k.load_start, k.load_end) == (0x200000, 0x403000)
    assert mem.read(0x200000, len(text)) == text
    assert mem.read(0x400000, len(data)) == data
    assert mem.read(0x400000 + len(data), 0x3000 - len(data)) == bytes(0x3000 - len(data))
    assert mem.read_u8(0x403000) == 0xFF
    assert k.setup_header is None and k.protocol_version is None
    assert k.cmdline_max == 2047
    assert k.initrd_addr_max == 64 * MiB - 1


def test_elf_physical_entry_kept(tmp_path: Path) -> None:
    elf = make_elf([(0x1000000, 0xFFFFFFFF81000000, b"\x90" * 64, 64)], entry=0x1000020)
    assert load_kernel(ram(), write(tmp_path, "v", elf)).entry == 0x1000020


@pytest.mark.parametrize("size", [4, 8])
def test_elf_pvh_note(tmp_path: Path, size: int) -> None:
    elf = make_elf([(0x1000000, 0xFFFFFFFF81000000, b"\x90" * 64, 64)], entry=0x1000000,
                   notes=[(b"GNU", 3, b"abcd"), (b"Xen", 6, b"linux\0"),
                          pvh_note(0x1000030, size)])
    path = write(tmp_path, "v", elf)
    k = load_kernel(ram(), path)
    assert (k.protocol, k.entry, k.cmdline_max) == ("pvh", 0x1000030, CMDLINE_MAX - 1)
    assert load_kernel(ram(), path, "pvh") == k
    forced = load_kernel(ram(), path, "linux")
    assert (forced.protocol, forced.entry, forced.cmdline_max) == ("linux64", 0x1000000, 2047)


def test_elf_pvh_without_note_fails(tmp_path: Path) -> None:
    elf = make_elf([(0x1000000, 0x1000000, b"\x90" * 64, 64)], entry=0x1000000,
                   notes=[(b"Xen", 17, b"\0\0\0\0")])
    path = write(tmp_path, "v", elf)
    assert load_kernel(ram(), path).protocol == "linux64"
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path, "pvh")
    assert_one_line_error(exc, path, "no PVH entry note")


def _patched(data: bytes, *fields: tuple[str, int, int]) -> bytes:
    """``data`` with ``(struct format, offset, value)`` fields overwritten."""
    out = bytearray(data)
    for fmt, offset, value in fields:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _bad_elves() -> list[tuple[bytes, list[str]]]:
    good = make_elf([(0x100000, 0x100000, b"\x90" * 0x1000, 0x1000)], entry=0x100000)
    noted = make_elf([(0x100000, 0x100000, b"\x90" * 16, 16)], entry=0x100000,
                     notes=[pvh_note(0x100000)])
    return [
        # found by tests/fuzz (targets elf, kernel): offsets too large to seek to,
        # sizes too large to allocate, header counts that took elftools seconds
        (_patched(good, ("<Q", 32, 1 << 63)), ["corrupt ELF", "program headers"]),
        (_patched(noted, ("<Q", 64 + 56 + 8, (1 << 64) - 16)), ["truncated ELF"]),
        (_patched(noted, ("<Q", 64 + 56 + 32, 1 << 40)), ["truncated ELF"]),
        (_patched(good, ("<Q", 64 + 8, 1 << 63)), ["truncated or corrupt ELF"]),
        (_patched(good, ("<Q", 32, 0), ("<H", 54, 0), ("<H", 56, 0xFFC0)),
         ["corrupt ELF (65472 program headers of 0 bytes"]),
        (make_elf([], entry=0x100000), ["ELF has no loadable segments"]),
        (make_elf([], entry=0x100000, elfclass=32), ["32-bit ELF", "64-bit"]),
        (make_elf([(0x100000, 0x100000, b"\0", 1)], 0x100000, machine=183),
         ["EM_AARCH64", "x86_64"]),
        (good[:40], ["truncated or corrupt ELF"]),
        (good[:0x200], ["truncated ELF"]),
        (make_elf([(0x100000, 0x100000, b"\0" * 16, 16)], entry=0x900000),
         ["entry point 0x900000 is in no loadable segment"]),
        (make_elf([(0x3F00000, 0x3F00000, b"\0" * 16, 0x200000)], entry=0x3F00000),
         ["ELF segment 0x3f00000-0x40fffff does not fit in 64 MiB of RAM"]),
    ]


@pytest.mark.parametrize(("data", "parts"), _bad_elves())
def test_bad_elves(tmp_path: Path, data: bytes, parts: list[str]) -> None:
    path = write(tmp_path, "vmlinux", data)
    with pytest.raises(KernelError) as exc:
        load_kernel(ram(), path)
    assert_one_line_error(exc, path, *parts)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_gcc_built_elf_with_pvh_note(tmp_path: Path) -> None:
    src = tmp_path / "k.S"
    src.write_text(
        '.section .note.Xen, "a", @note\n.balign 4\n.long 4, 4, 18\n.asciz "Xen"\n'
        ".long 0x200001\n.text\n.globl _start\n_start:\n hlt\n hlt\n jmp _start\n"
        ".data\n.quad 0x1122334455667788\n.bss\n.space 8192\n")
    out = tmp_path / "k.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x200000",
                    "-Wl,--build-id=none", "-o", str(out), str(src)], check=True)
    mem = ram()
    k = load_kernel(mem, str(out))
    assert (k.protocol, k.entry) == ("pvh", 0x200001)
    assert mem.read(0x200000, 3) == b"\xf4\xf4\xeb"
    linux = load_kernel(ram(), str(out), "linux")
    assert linux.entry == 0x200000


# ---- initrd --------------------------------------------------------------------------
def test_initrd_placed_high_and_aligned(tmp_path: Path) -> None:
    blob = bytes(range(251)) * 1000
    mem = ram()
    k = kernel_image()
    rd = load_initrd(mem, write(tmp_path, "initrd.img", blob), k)
    assert rd.addr % 0x1000 == 0
    assert rd.end <= 64 * MiB and rd.addr + 0x1000 > 64 * MiB - len(blob)
    assert rd.size == len(blob)
    assert mem.read(rd.addr, rd.size) == blob


def test_initrd_respects_initrd_addr_max(tmp_path: Path) -> None:
    blob = b"x" * 10000
    k = kernel_image(initrd_addr_max=0x1FFFFFF)
    rd = load_initrd(ram(), write(tmp_path, "rd", blob), k)
    assert rd.end <= 0x2000000 and rd.addr == (0x2000000 - len(blob)) & ~0xFFF


def test_initrd_stays_below_4gib(tmp_path: Path) -> None:
    mem = GuestMemory.from_bytearrays([(0, 32 * MiB), (1 << 32, 2 * MiB)])
    rd = load_initrd(mem, write(tmp_path, "rd", b"y" * 5000),
                     kernel_image(initrd_addr_max=0xFFFFFFFF))
    assert rd.end <= 32 * MiB


def test_initrd_errors(tmp_path: Path) -> None:
    k = kernel_image(load_end=60 * MiB)
    big = write(tmp_path, "initrd.img", b"z" * (5 * MiB))
    with pytest.raises(InitrdError) as exc:
        load_initrd(ram(), big, k)
    assert_one_line_error(exc, f"{big}: 5 MiB does not fit below 0x37ffffff in 64 MiB of RAM")
    missing = str(tmp_path / "gone.img")
    with pytest.raises(InitrdError) as exc:
        load_initrd(ram(), missing, k)
    assert_one_line_error(exc, f"{missing}: No such file or directory")
    empty = write(tmp_path, "empty.img", b"")
    with pytest.raises(InitrdError) as exc:
        load_initrd(ram(), empty, k)
    assert_one_line_error(exc, empty, "empty initrd")


# ---- the real Debian cloud kernel -------------------------------------------------------
@pytest.mark.skipif(not DEBIAN_KERNELS, reason="no /boot/vmlinuz-*-cloud-amd64 installed")
def test_debian_cloud_bzimage_loads() -> None:
    path = DEBIAN_KERNELS[-1]
    data = Path(path).read_bytes()
    mem = ram(256 * MiB)
    k = load_kernel(mem, path)
    assert k.format == "bzimage" and k.protocol == "linux64"
    assert k.protocol_version is not None and k.protocol_version >= 0x020F
    assert k.entry == k.load_start + 0x200
    setup_size = (data[0x1F1] + 1) * 512
    assert mem.read(k.load_start, 4096) == data[setup_size:setup_size + 4096]
    tail = data[-4096:]
    assert mem.read(k.load_start + len(data) - setup_size - 4096, 4096) == tail
    assert k.setup_header == data[0x1F1:0x202 + data[0x201]]
    initrds = sorted(glob.glob(path.replace("vmlinuz", "initrd.img")))
    if initrds:
        rd = load_initrd(mem, initrds[0], k)
        assert rd.addr >= k.load_end and rd.end <= 256 * MiB
