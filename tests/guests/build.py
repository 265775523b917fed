"""Build the pyhv test guests (PVH ELF, vmlinux-like ELF, bzImages) with gcc.

Python API::

    from tests.guests.build import build_guests
    images = build_guests(Path("/tmp/guests"))
    images.pvh_elf, images.vmlinux_elf, images.bzimage, images.bzimage_payloads["xz"]

CLI::

    python tests/guests/build.py OUTDIR

Nothing binary is committed: every image is made from guest.c, entry.S,
setup.S and guest.ld at test time.  A build is cached in OUTDIR and reused
while the sources, this script and the tool versions are unchanged.

One code image, linked at physical 0x100000, is packaged three ways:

* ``pvh.elf``: ELF64, one PT_LOAD (p_paddr 0x100000) and a PT_NOTE holding
  the Xen note XEN_ELFNOTE_PHYS32_ENTRY (type 18) = 0x100040.
* ``vmlinux.elf``: the same ELF64 without the note; e_entry = 0x100200, the
  64-bit Linux boot protocol entry.
* ``bzImage-<fmt>``: setup sectors (real-mode entry + setup header, protocol
  2.15) followed by the protected-mode part: the code image (32-bit entry at
  +0, 64-bit entry at +0x200) and, at payload_offset, vmlinux.elf compressed
  with <fmt>, laid out like Linux's bzImage (for every format but gzip the
  uncompressed size is appended as 4 little-endian bytes, as Linux's
  ``size_append`` does; payload_length includes them).
* ``linux64-shim.elf``: cross-check only (QEMU has no 64-bit Linux loader):
  the code image plus shim.S at 0x400000 behind a PVH note; the shim builds
  a zero page from the PVH start_info and enters the 64-bit entry.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent
SOURCES = ("guest.c", "entry.S", "setup.S", "shim.S", "guest.ld", "build.py")

LOAD_ADDR = 0x100000
LINUX32_ENTRY = 0x100000
PVH_ENTRY = 0x100040
ENTRY64 = 0x100200
SHIM_ADDR = 0x400000

XEN_ELFNOTE_PHYS32_ENTRY = 18

# setup sectors: boot sector + SETUP_SECTS sectors (2 KiB in all)
SETUP_SECTS = 3
SETUP_CODE_OFFSET = 0x280
BOOT_PROTOCOL = 0x020F
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x1
CMDLINE_SIZE = 2047
INITRD_ADDR_MAX = 0x37FFFFFF
KERNEL_ALIGNMENT = 0x100000
KERNEL_VERSION = b"pyhv-test-guest 1.0\0"

PAYLOAD_FORMATS = ("gzip", "xz", "lzma", "bzip2", "lz4", "zstd")
# magic numbers the payload starts with (what extract-vmlinux looks for)
PAYLOAD_MAGIC = {
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "lzma": b"\x5d\x00\x00",
    "bzip2": b"BZh",
    "lz4": b"\x02\x21\x4c\x18",
    "zstd": b"\x28\xb5\x2f\xfd",
}

CFLAGS = [
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-nostdlib",
    "-O2",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "--param=min-pagesize=0",
    "-Wall",
    "-Wextra",
]


@dataclass
class GuestImages:
    pvh_elf: Path
    vmlinux_elf: Path
    bzimage: Path
    bzimage_payloads: dict[str, Path] = field(default_factory=dict)
    #: the linked ELF with symbols (for debugging: addr2line, objdump)
    debug_elf: Path | None = None
    #: cross-check only: a PVH ELF whose note enters shim.S, which builds a
    #: zero page from the start_info and enters the guest's 64-bit entry
    linux64_shim_elf: Path | None = None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, **kw)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({e.returncode}):\n"
            f"{e.stdout.decode(errors='replace')}{e.stderr.decode(errors='replace')}"
        ) from None


def _cache_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SRC_DIR / name).read_bytes() + b"\0")
    h.update(" ".join(CFLAGS).encode())
    for tool in ("gcc", "ld", "xz", "bzip2", "lz4", "zstd"):
        h.update(str(shutil.which(tool)).encode())
    return h.hexdigest()


def _symbols(elf: Path) -> dict[str, int]:
    out = _run(["nm", str(elf)]).stdout.decode()
    syms = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16)
    return syms


def make_elf64(
    image: bytes,
    memsz: int,
    entry: int,
    pvh_entry: int | None,
    extra: list[tuple[int, bytes]] | None = None,
) -> bytes:
    """An ELF64 executable: one RWX PT_LOAD of ``image`` at LOAD_ADDR (plus
    one per ``extra`` (paddr, bytes) segment) and, when ``pvh_entry`` is
    given, a PT_NOTE with the Xen PHYS32_ENTRY note."""
    segments = [(LOAD_ADDR, image, memsz), *((a, b, len(b)) for a, b in extra or [])]
    note = b""
    if pvh_entry is not None:
        # Elf64_Nhdr: namesz, descsz, type; name "Xen\0"; desc 64-bit like Linux
        note = struct.pack("<III", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
        note += struct.pack("<Q", pvh_entry)
    phnum = len(segments) + (1 if note else 0)
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
        2, 62, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0,
    )  # fmt: skip
    body = bytearray()
    offset = 0x1000
    phdrs = b""
    for paddr, data, msz in segments:
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 7, offset, paddr, paddr, len(data), msz, 0x1000
        )
        body += data + bytes(-len(data) % 0x1000)
        offset += len(data) + (-len(data) % 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(note), 0, 4)
        body += note
    out = bytearray(ehdr + phdrs)
    out += bytes(0x1000 - len(out))
    return bytes(out + body)


def compress(fmt: str, data: bytes) -> bytes:
    """Compress ``data`` as Linux's bzImage build does for that format."""
    size = struct.pack("<I", len(data))
    if fmt == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if fmt == "bzip2":
        return bz2.compress(data, 9) + size
    if fmt == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9) + size
    if fmt == "xz":
        filters = [
            {"id": lzma.FILTER_X86},
            {"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 20},
        ]
        return (
            lzma.compress(
                data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters
            )
            + size
        )
    if fmt == "lz4":
        return _run(["lz4", "-l", "-9", "-c"], input=data).stdout + size
    if fmt == "zstd":
        return _run(["zstd", "-19", "-q", "-c"], input=data).stdout + size
    raise ValueError(f"unknown payload format {fmt!r}")


def decompress(fmt: str, payload: bytes) -> bytes:
    """Inverse of :func:`compress` (the appended size is checked and dropped)."""
    if fmt == "gzip":
        return gzip.decompress(payload)
    body, size = payload[:-4], struct.unpack("<I", payload[-4:])[0]
    if fmt == "bzip2":
        data = bz2.decompress(body)
    elif fmt == "lzma":
        data = lzma.decompress(body, format=lzma.FORMAT_ALONE)
    elif fmt == "xz":
        data = lzma.decompress(body, format=lzma.FORMAT_XZ)
    elif fmt == "lz4":
        data = _run(["lz4", "-d", "-c"], input=body).stdout
    elif fmt == "zstd":
        data = _run(["zstd", "-d", "-q", "-c"], input=body).stdout
    else:
        raise ValueError(f"unknown payload format {fmt!r}")
    if len(data) != size:
        raise ValueError(f"{fmt}: appended size {size} != {len(data)}")
    return data


def make_bzimage(
    setup_code: bytes, image: bytes, memsz: int, kernel_info: int, payload: bytes
) -> bytes:
    """A bzImage: setup sectors with a protocol-2.15 header, then the
    protected-mode part (code image + compressed payload)."""
    setup_len = (SETUP_SECTS + 1) * 512
    setup = bytearray(setup_len)
    if SETUP_CODE_OFFSET + len(setup_code) > setup_len - len(KERNEL_VERSION):
        raise RuntimeError("real-mode setup code does not fit in the setup sectors")
    setup[SETUP_CODE_OFFSET : SETUP_CODE_OFFSET + len(setup_code)] = setup_code
    ver_off = setup_len - len(KERNEL_VERSION)
    setup[ver_off:] = KERNEL_VERSION

    payload_offset = (len(image) + 15) & ~15
    pm = bytearray(image) + bytes(payload_offset - len(image)) + payload
    pm += bytes((-len(pm)) % 16)
    init_size = (max(memsz, len(pm)) + 0xFFF) & ~0xFFF

    def put(off: int, fmt: str, value: int | bytes) -> None:
        struct.pack_into("<" + fmt, setup, off, value)

    put(0x1F1, "B", SETUP_SECTS)  # setup_sects
    put(0x1F2, "H", 0)  # root_flags
    put(0x1F4, "I", len(pm) // 16)  # syssize (16-byte units)
    put(0x1F8, "H", 0)  # ram_size (obsolete)
    put(0x1FA, "H", 0xFFFF)  # vid_mode: normal
    put(0x1FC, "H", 0)  # root_dev
    put(0x1FE, "H", 0xAA55)  # boot_flag
    setup[0x200:0x202] = bytes([0xEB, SETUP_CODE_OFFSET - 0x202])  # jmp short
    put(0x202, "4s", b"HdrS")  # header
    put(0x206, "H", BOOT_PROTOCOL)  # version
    put(0x208, "I", 0)  # realmode_swtch
    put(0x20C, "H", 0x1000)  # start_sys_seg (obsolete)
    put(0x20E, "H", ver_off - 0x200)  # kernel_version
    put(0x210, "B", 0)  # type_of_loader
    put(0x211, "B", LOADED_HIGH)  # loadflags
    put(0x212, "H", 0x8000)  # setup_move_size
    put(0x214, "I", LINUX32_ENTRY)  # code32_start
    put(0x218, "I", 0)  # ramdisk_image
    put(0x21C, "I", 0)  # ramdisk_size
    put(0x220, "I", 0)  # bootsect_kludge
    put(0x224, "H", 0)  # heap_end_ptr
    put(0x228, "I", 0)  # cmd_line_ptr
    put(0x22C, "I", INITRD_ADDR_MAX)  # initrd_addr_max
    put(0x230, "I", KERNEL_ALIGNMENT)  # kernel_alignment
    put(0x234, "B", 0)  # relocatable_kernel
    put(0x235, "B", KERNEL_ALIGNMENT.bit_length() - 1)  # min_alignment (log2)
    put(0x236, "H", XLF_KERNEL_64)  # xloadflags
    put(0x238, "I", CMDLINE_SIZE)  # cmdline_size
    put(0x23C, "I", 0)  # hardware_subarch
    put(0x240, "Q", 0)  # hardware_subarch_data
    put(0x248, "I", payload_offset)  # payload_offset
    put(0x24C, "I", len(payload))  # payload_length
    put(0x250, "Q", 0)  # setup_data
    put(0x258, "Q", LOAD_ADDR)  # pref_address
    put(0x260, "I", init_size)  # init_size
    put(0x264, "I", 0)  # handover_offset
    put(0x268, "I", kernel_info - LOAD_ADDR)  # kernel_info_offset
    return bytes(setup) + bytes(pm)


def _compile(outdir: Path, work: Path) -> GuestImages:
    cc = os.environ.get("CC", "gcc")
    objs = []
    for src in ("entry.S", "guest.c"):
        obj = work / (src.rsplit(".", 1)[0] + ".o")
        _run([cc, *CFLAGS, "-c", str(SRC_DIR / src), "-o", str(obj)])
        objs.append(str(obj))
    elf = work / "guest.elf"
    _run(
        [
            "ld",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-z",
            "noexecstack",
            "--no-warn-rwx-segments",
            "-T",
            str(SRC_DIR / "guest.ld"),
            "-o",
            str(elf),
            *objs,
        ]
    )
    flat = work / "guest.bin"
    _run(
        [
            "objcopy",
            "-O",
            "binary",
            "--only-section=.text",
            "--only-section=.rodata",
            "--only-section=.data",
            str(elf),
            str(flat),
        ]
    )
    syms = _symbols(elf)
    image = flat.read_bytes()
    if len(image) != syms["__image_end"] - LOAD_ADDR:
        raise RuntimeError(
            f"flat image is {len(image):#x} bytes, expected "
            f"{syms['__image_end'] - LOAD_ADDR:#x}"
        )
    memsz = syms["__memory_end"] - LOAD_ADDR

    setup_o = work / "setup.o"
    _run([cc, "-m32", "-c", str(SRC_DIR / "setup.S"), "-o", str(setup_o)])
    setup_elf = work / "setup.elf"
    _run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-nostdlib",
            "-static",
            "-z",
            "noexecstack",
            "-Ttext",
            hex(SETUP_CODE_OFFSET),
            "-e",
            "rm_entry",
            "-o",
            str(setup_elf),
            str(setup_o),
        ]
    )
    setup_bin = work / "setup.bin"
    _run(
        [
            "objcopy",
            "-O",
            "binary",
            "--only-section=.text",
            str(setup_elf),
            str(setup_bin),
        ]
    )
    setup_code = setup_bin.read_bytes()

    shim_o = work / "shim.o"
    _run([cc, "-m32", "-c", str(SRC_DIR / "shim.S"), "-o", str(shim_o)])
    shim_elf = work / "shim.elf"
    _run(["ld", "-m", "elf_i386", "-nostdlib", "-static", "-z", "noexecstack",
          "--no-warn-rwx-segments", "-Ttext", hex(SHIM_ADDR), "-e", "shim_entry",
          "--defsym", f"guest_pml4={syms['pml4']:#x}",
          "-o", str(shim_elf), str(shim_o)])
    shim_bin = work / "shim.bin"
    _run(["objcopy", "-O", "binary", "--only-section=.text", "--only-section=.rodata",
          "--only-section=.data", str(shim_elf), str(shim_bin)])  # fmt: skip
    shim_entry = _symbols(shim_elf)["shim_entry"]

    outdir.mkdir(parents=True, exist_ok=True)
    pvh = make_elf64(image, memsz, ENTRY64, PVH_ENTRY)
    shim = make_elf64(
        image, memsz, ENTRY64, shim_entry, [(SHIM_ADDR, shim_bin.read_bytes())]
    )
    vmlinux = make_elf64(image, memsz, ENTRY64, None)
    images = GuestImages(
        pvh_elf=outdir / "pvh.elf",
        vmlinux_elf=outdir / "vmlinux.elf",
        bzimage=outdir / "bzImage",
        debug_elf=outdir / "guest-debug.elf",
        linux64_shim_elf=outdir / "linux64-shim.elf",
    )
    _write(images.pvh_elf, pvh)
    _write(outdir / "linux64-shim.elf", shim)
    _write(images.vmlinux_elf, vmlinux)
    shutil.copyfile(elf, outdir / "guest-debug.elf")
    for fmt in PAYLOAD_FORMATS:
        bz = make_bzimage(
            setup_code, image, memsz, syms["kernel_info"], compress(fmt, vmlinux)
        )
        path = outdir / f"bzImage-{fmt}"
        _write(path, bz)
        images.bzimage_payloads[fmt] = path
    _write(images.bzimage, images.bzimage_payloads["gzip"].read_bytes())
    return images


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _images_in(outdir: Path) -> GuestImages:
    return GuestImages(
        pvh_elf=outdir / "pvh.elf",
        vmlinux_elf=outdir / "vmlinux.elf",
        bzimage=outdir / "bzImage",
        bzimage_payloads={fmt: outdir / f"bzImage-{fmt}" for fmt in PAYLOAD_FORMATS},
        debug_elf=outdir / "guest-debug.elf",
        linux64_shim_elf=outdir / "linux64-shim.elf",
    )


def build_guests(outdir: Path) -> GuestImages:
    """Build (or reuse the cached build of) every guest image into ``outdir``."""
    outdir = Path(outdir)
    key = _cache_key()
    stamp = outdir / "build-stamp.json"
    cached = _images_in(outdir)
    try:
        if json.loads(stamp.read_text()).get("key") == key and all(
            p is not None and p.exists()
            for p in [
                cached.pvh_elf,
                cached.vmlinux_elf,
                cached.bzimage,
                cached.linux64_shim_elf,
                *cached.bzimage_payloads.values(),
            ]
        ):
            return cached
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryDirectory(prefix="pyhv-guest-build-") as tmp:
        images = _compile(outdir, Path(tmp))
    stamp.write_text(json.dumps({"key": key}))
    return images


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTDIR", file=sys.stderr)
        return 2
    images = build_guests(Path(argv[1]))
    print(f"pvh_elf      {images.pvh_elf}")
    print(f"vmlinux_elf  {images.vmlinux_elf}")
    print(f"bzimage      {images.bzimage}")
    for fmt, path in images.bzimage_payloads.items():
        print(f"bzimage-{fmt:<5} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
