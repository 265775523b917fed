"""The test-guest kit: images are built right, and QEMU (an independent
implementation of the boot protocols) boots them and gets the expected report."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import TESTS
from guests.build import (
    ENTRY64,
    LOAD_ADDR,
    PAYLOAD_FORMATS,
    PAYLOAD_MAGIC,
    PVH_ENTRY,
    build_guests,
    decompress,
)
from guests.report import initrd_checksum, parse_report

QEMU = shutil.which("qemu-system-x86_64")
QEMU_BIN = QEMU or "qemu-system-x86_64"
QEMU_TIMEOUT = 120


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


needs_qemu = pytest.mark.skipif(
    QEMU is None or not _kvm_usable(),
    reason="needs qemu-system-x86_64 and a usable /dev/kvm to boot the guests",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return build_guests(tmp_path_factory.mktemp("guests"))


# ---- ELF helpers ------------------------------------------------------------


def _elf_header(data: bytes) -> dict:
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2 and data[5] == 1  # ELFCLASS64, little endian
    (
        e_type,
        e_machine,
        _v,
        e_entry,
        e_phoff,
        _shoff,
        _flags,
        _ehsize,
        e_phentsize,
        e_phnum,
    ) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    phdrs = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = (
            struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        )
        phdrs.append(
            {
                "type": p_type,
                "flags": p_flags,
                "offset": p_offset,
                "vaddr": p_vaddr,
                "paddr": p_paddr,
                "filesz": p_filesz,
                "memsz": p_memsz,
                "align": p_align,
            }
        )
    return {"type": e_type, "machine": e_machine, "entry": e_entry, "phdrs": phdrs}


def _notes(data: bytes, ph: dict) -> list[tuple[bytes, int, bytes]]:
    out, pos, end = [], ph["offset"], ph["offset"] + ph["filesz"]
    align = max(ph["align"], 4)
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + align - 1) // align * align
        desc = data[pos : pos + descsz]
        pos += (descsz + align - 1) // align * align
        out.append((name, ntype, desc))
    return out


def _load_segment(data: bytes) -> tuple[dict, bytes]:
    hdr = _elf_header(data)
    loads = [p for p in hdr["phdrs"] if p["type"] == 1]
    assert len(loads) == 1
    ph = loads[0]
    return ph, data[ph["offset"] : ph["offset"] + ph["filesz"]]


# ---- image structure --------------------------------------------------------


def test_pvh_elf_has_xen_phys32_entry_note(images):
    data = images.pvh_elf.read_bytes()
    hdr = _elf_header(data)
    assert hdr["machine"] == 62 and hdr["type"] == 2
    notes = [p for p in hdr["phdrs"] if p["type"] == 4]
    assert len(notes) == 1
    found = [(n, t, d) for n, t, d in _notes(data, notes[0]) if n == b"Xen" and t == 18]
    assert len(found) == 1
    desc = found[0][2]
    assert len(desc) in (4, 8)
    assert int.from_bytes(desc[:4], "little") == PVH_ENTRY
    ph, seg = _load_segment(data)
    assert ph["paddr"] == LOAD_ADDR and ph["memsz"] >= ph["filesz"]
    # the PVH entry starts with cli; cld
    assert seg[PVH_ENTRY - LOAD_ADDR : PVH_ENTRY - LOAD_ADDR + 2] == b"\xfa\xfc"


def test_vmlinux_elf_is_64bit_entry_without_note(images):
    data = images.vmlinux_elf.read_bytes()
    hdr = _elf_header(data)
    assert hdr["entry"] == ENTRY64 == LOAD_ADDR + 0x200
    assert not [p for p in hdr["phdrs"] if p["type"] == 4]
    ph, seg = _load_segment(data)
    assert ph["paddr"] == LOAD_ADDR
    assert seg[0x200:0x202] == b"\xfa\xfc"
    # the same code image as the PVH ELF
    assert seg == _load_segment(images.pvh_elf.read_bytes())[1]


@pytest.mark.parametrize("fmt", PAYLOAD_FORMATS)
def test_bzimage_header_and_payload(images, fmt):
    bz = images.bzimage_payloads[fmt].read_bytes()
    vmlinux = images.vmlinux_elf.read_bytes()
    u8 = lambda off: bz[off]
    u16 = lambda off: struct.unpack_from("<H", bz, off)[0]
    u32 = lambda off: struct.unpack_from("<I", bz, off)[0]
    u64 = lambda off: struct.unpack_from("<Q", bz, off)[0]

    setup_sects = u8(0x1F1)
    assert setup_sects >= 1
    assert u16(0x1FE) == 0xAA55
    assert bz[0x200] == 0xEB  # jmp short to the real-mode entry
    assert bz[0x202:0x206] == b"HdrS"
    assert u16(0x206) == 0x020F
    assert u8(0x211) & 0x01  # LOADED_HIGH
    assert u32(0x214) == 0x100000  # code32_start
    assert u32(0x22C) == 0x37FFFFFF  # initrd_addr_max
    assert u8(0x234) == 0  # relocatable_kernel
    assert u16(0x236) & 0x1  # XLF_KERNEL_64
    assert u32(0x238) == 2047  # cmdline_size
    assert u64(0x258) == 0x100000  # pref_address
    kernel_alignment = u32(0x230)
    assert kernel_alignment and kernel_alignment & (kernel_alignment - 1) == 0
    assert bz[0x200 + u16(0x20E) :].startswith(b"pyhv-test-guest")

    pm = bz[(setup_sects + 1) * 512 :]
    assert u32(0x1F4) * 16 == len(pm)  # syssize
    ph, seg = _load_segment(vmlinux)
    assert pm[: len(seg)] == seg  # the code image, 64-bit entry at +0x200
    assert pm[0x200:0x202] == b"\xfa\xfc"
    assert u32(0x260) >= ph["memsz"]  # init_size covers code + bss
    kinfo = u32(0x268)
    assert pm[kinfo : kinfo + 4] == b"LToP"

    off, length = u32(0x248), u32(0x24C)
    payload = pm[off : off + length]
    assert len(payload) == length
    assert payload.startswith(PAYLOAD_MAGIC[fmt])
    if fmt in ("lz4", "zstd") and shutil.which(fmt) is None:
        pytest.skip(f"{fmt} CLI not installed")
    assert decompress(fmt, payload) == vmlinux


def test_default_bzimage_is_gzip_variant(images):
    assert images.bzimage.read_bytes() == images.bzimage_payloads["gzip"].read_bytes()


def test_build_is_cached(images):
    before = images.pvh_elf.stat().st_mtime_ns
    again = build_guests(images.pvh_elf.parent)
    assert again.pvh_elf == images.pvh_elf
    assert again.pvh_elf.stat().st_mtime_ns == before


def test_cli_builds(tmp_path):
    out = subprocess.run(
        [sys.executable, str(TESTS / "guests" / "build.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "pvh.elf").exists() and (tmp_path / "bzImage-zstd").exists()


def test_parse_report_grammar():
    text = (
        "noise @not-a-line\r\n"
        "@begin protocol=linux64 info=0x7000\r\n"
        "@cmdline a\\x5cb  c \n"
        "@e820 addr=0x0 size=0x9fc00 type=1\n"
        "@initrd addr=0x1000 size=0x3 csum=0x" + f"{initrd_checksum(b'abc'):x}\n"
        "@acpi-table sig=FACP addr=0xe0000 len=0x114 revision=6 checksum=ok parent=XSDT\n"
        "@cpus count=2 apic_ids=0,1 lapic=0xfee00000 flags=0x1\n"
        "@rtc 2024-02-29 23:59:58\n"
        "@end\n"
    )
    r = parse_report(text)
    assert r.protocol == "linux64" and r.info_addr == 0x7000 and r.complete
    assert r.cmdline == "a\\b  c "
    assert r.e820[0].size == 0x9FC00
    assert r.initrd.csum == initrd_checksum(b"abc")
    assert r.table("FACP").checksum_ok and r.table("FACP").len == 0x114
    assert r.apic_ids == [0, 1]
    assert r.rtc == dt.datetime(2024, 2, 29, 23, 59, 58)


def test_initrd_checksum_definition():
    assert initrd_checksum(b"") == 0
    # words 1, 2 -> a = 3, b = 1 + 3 = 4
    assert initrd_checksum(b"\x01\0\0\0\x02") == (4 << 32) | 3


# ---- QEMU boots -------------------------------------------------------------


def _qemu_cmd(args: list[str]) -> list[str]:
    """QEMU with KVM, nothing by default, COM1 on stdout and the debug-exit port."""
    return [QEMU_BIN, "-accel", "kvm", "-nodefaults", "-display", "none", "-no-user-config",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4", *args]


def _qemu(args: list[str]) -> tuple[int, str]:
    cmd = _qemu_cmd(args)
    p = subprocess.run(cmd, capture_output=True, timeout=QEMU_TIMEOUT, check=False)
    return p.returncode, p.stdout.decode("latin-1")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _check_acpi(r):
    assert r.rsdp.get("checksum") == "ok"
    assert r.acpi_tables, "no ACPI tables reported"
    for t in r.acpi_tables:
        assert t.checksum_ok, f"bad checksum: {t}"
    for sig in ("FACP", "APIC", "DSDT"):
        assert r.table(sig) is not None, sig
    assert r.table("DSDT").parent == "FACP"
    assert r.s5.get("found") == 1


@needs_qemu
def test_qemu_microvm_pvh_report(images, tmp_path):
    initrd = os.urandom(4099)  # not a multiple of 4 on purpose
    (tmp_path / "initrd").write_bytes(initrd)
    cmdline = "hello world pyhv.test=1 x=\\y"
    rc, out = _qemu(
        [
            "-machine",
            "microvm,rtc=on",
            "-smp",
            "2",
            "-m",
            "64",
            "-kernel",
            str(images.pvh_elf),
            "-append",
            cmdline,
            "-initrd",
            str(tmp_path / "initrd"),
        ]
    )
    r = parse_report(out)
    assert r.complete, out
    assert not r.errors and not r.exceptions, out
    assert r.protocol == "pvh"
    assert r.bootinfo["magic"] == 0x336EC578 and r.bootinfo["nr_modules"] == 1
    assert r.cmdline == cmdline
    assert r.initrd is not None
    assert r.initrd.size == len(initrd) and r.initrd.csum == initrd_checksum(initrd)
    assert r.modules[0].addr == r.initrd.addr
    ram = [e for e in r.e820 if e.type == 1]
    assert any(e.addr <= 0x100000 < e.addr + e.size for e in ram)
    assert sum(e.size for e in ram) <= 64 << 20
    _check_acpi(r)
    assert r.fadt["hw_reduced"] == 1  # microvm: GED sleep registers
    assert r.cpu_count == 2 and r.apic_ids == [0, 1]
    assert r.ioapics and r.ioapics[0]["addr"] == 0xFEC00000
    assert (r.ap_expected, r.ap_started) == (1, 1)
    assert r.rtc is not None and abs((r.rtc - _utcnow()).total_seconds()) < 300
    assert r.poweroff_methods == ["sleep-control"]
    assert rc == 0, f"QEMU exit {rc} (33 means the debug-exit fallback ran)"


@needs_qemu
def test_qemu_pc_bzimage_linux_protocol(images, tmp_path):
    """QEMU's own Linux loader: real-mode setup -> 32-bit entry -> report."""
    initrd = os.urandom(3000)
    (tmp_path / "initrd").write_bytes(initrd)
    rc, out = _qemu(
        [
            "-machine",
            "pc",
            "-smp",
            "2",
            "-m",
            "128",
            "-kernel",
            str(images.bzimage_payloads["zstd"]),
            "-append",
            "console=ttyS0 pyhv",
            "-initrd",
            str(tmp_path / "initrd"),
        ]
    )
    r = parse_report(out)
    assert r.complete, out
    assert r.protocol == "linux32"
    assert r.bootinfo["version"] == 0x020F and r.bootinfo["header"] == 0x53726448
    assert r.bootinfo["loadflags"] & 1
    assert r.cmdline == "console=ttyS0 pyhv"
    assert r.initrd.size == len(initrd) and r.initrd.csum == initrd_checksum(initrd)
    assert r.memmap_source == "e820" and any(e.type == 1 for e in r.e820)
    assert r.rsdp["source"] == "scan"
    _check_acpi(r)
    assert r.fadt["hw_reduced"] == 0
    assert (r.ap_expected, r.ap_started) == (1, 1)
    assert r.poweroff_methods == ["pm1a"]
    assert rc == 0


@needs_qemu
def test_qemu_q35_powerbutton(images, tmp_path):
    sock = tmp_path / "mon.sock"
    cmd = _qemu_cmd(["-machine", "q35", "-m", "128",
                     "-monitor", f"unix:{sock},server=on,wait=off",
                     "-kernel", str(images.pvh_elf), "-append", "pyhv.wait=powerbutton"])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = b""
    deadline = time.monotonic() + QEMU_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ln = p.stdout.readline()
            if not ln:
                break
            out += ln
            if ln.startswith(b"@waiting"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                    s.sendall(b"system_powerdown\n")
                    time.sleep(0.5)
        rc = p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = parse_report(out)
    assert r.complete and r.waiting is not None, out
    assert r.waiting["trigger"] == "level"
    assert r.powerbutton, out
    assert r.poweroff_methods == ["pm1a"]
    assert rc == 0


@needs_qemu
def test_qemu_linux64_entry_via_shim(images, tmp_path):
    """The 64-bit Linux entry (0x100200), reached through shim.S (PVH ->
    zero page -> long mode -> RSI = boot_params), since QEMU has no 64-bit
    Linux loader of its own."""
    assert images.linux64_shim_elf is not None
    initrd = os.urandom(2050)
    (tmp_path / "initrd").write_bytes(initrd)
    cmdline = "root=/dev/null pyhv.entry=64"
    rc, out = _qemu(
        [
            "-machine", "microvm", "-smp", "2", "-m", "64",
            "-kernel", str(images.linux64_shim_elf), "-append", cmdline,
            "-initrd", str(tmp_path / "initrd"),
        ]
    )  # fmt: skip
    r = parse_report(out)
    assert r.complete, out
    assert not r.errors and not r.exceptions, out
    assert r.protocol == "linux64"
    assert r.bootinfo["version"] == 0x020F and r.bootinfo["type_of_loader"] == 0xFF
    assert r.cmdline == cmdline
    assert r.memmap_source == "e820" and any(
        e.type == 1 and e.addr == 0x100000 for e in r.e820
    )
    assert r.initrd is not None and r.initrd.csum == initrd_checksum(initrd)
    assert r.rsdp["source"] == "bootinfo"
    _check_acpi(r)
    assert (r.ap_expected, r.ap_started) == (1, 1)
    assert r.poweroff_methods == ["sleep-control"]
    assert rc == 0
