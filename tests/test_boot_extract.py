"""Extracting the ELF vmlinux from a bzImage's compressed payload."""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv.engine.boot import (
    BootError,
    ExtractError,
    extract_vmlinux,
    extract_vmlinux_file,
    load_kernel,
)
from pyhv.engine.boot import extract as extract_mod
from pyhv.engine.boot.extract import lz4_legacy_decode
from pyhv.engine.layout import MiB, ram_ranges
from pyhv.engine.memory import GuestMemory

DEBIAN_KERNELS = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))


def fake_vmlinux(size: int = 200_000) -> bytes:
    """ELF magic followed by compressible but not trivial bytes."""
    rng = random.Random(size)
    words = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))) for _ in range(64)]
    body = b"".join(rng.choice(words) for _ in range(size // 6))
    return b"\x7fELF\x02\x01\x01" + bytes(9) + body[:size]


def with_size(compressed: bytes, raw: bytes) -> bytes:
    """A payload as Linux builds it: compressed data, then the raw size (u32)."""
    return compressed + struct.pack("<I", len(raw))


def make_bzimage(payload: bytes, *, version: int = 0x020F, offset: int = 0x3C0) -> bytes:
    setup = bytearray(5 * 512)
    setup[0x1F1] = 4
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = b"\xeb\x6a"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x236, 1)
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    code = b"\x90" * offset + payload + b"\xcc" * 64
    return bytes(setup) + code


def cli(*args: str) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        return subprocess.run(list(args), input=data, capture_output=True,
                              check=True).stdout
    return run


CODECS: list[tuple[str, Callable[[bytes], bytes], str | None]] = [
    ("gzip", lambda d: gzip.compress(d, 9), None),
    ("xz", lambda d: lzma.compress(d, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=[
        {"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]), None),
    ("xz-cli", cli("xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB", "-c"), "xz"),
    ("lzma", lambda d: lzma.compress(d, lzma.FORMAT_ALONE), None),
    ("lzma-cli", cli("xz", "--format=lzma", "-9", "-c"), "xz"),
    ("bzip2", lambda d: bz2.compress(d, 9), None),
    ("bzip2-cli", cli("bzip2", "-9", "-c"), "bzip2"),
    ("lz4", cli("lz4", "-l", "-9", "-c"), "lz4"),
    ("zstd", cli("zstd", "-19", "-c"), "zstd"),
]


@pytest.mark.parametrize(("name", "compress", "tool"), CODECS, ids=[c[0] for c in CODECS])
@pytest.mark.parametrize("size_appended", [True, False])
def test_extract_each_codec(name: str, compress: Callable[[bytes], bytes],
                            tool: str | None, size_appended: bool) -> None:
    if tool and shutil.which(tool) is None:
        pytest.skip(f"{tool} command is not installed")
    raw = fake_vmlinux()
    payload = compress(raw)
    if size_appended:
        payload = with_size(payload, raw)
    assert extract_vmlinux(make_bzimage(payload)) == raw


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 command is not installed")
def test_pure_python_lz4_matches_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    # 9 MiB: more than one 8 MiB legacy block; runs exercise overlapping matches
    raw = b"\x7fELF" + (b"abc" * 1000 + fake_vmlinux(50_000)) * 170 + b"z" * 70000
    raw = raw[:9 * MiB]
    compressed = subprocess.run(["lz4", "-l", "-c"], input=raw, capture_output=True,
                                check=True).stdout
    assert lz4_legacy_decode(compressed[4:] + struct.pack("<I", len(raw))) == raw
    monkeypatch.setattr(extract_mod.shutil, "which", lambda name: None)
    assert extract_vmlinux(make_bzimage(with_size(compressed, raw))) == raw


def test_lz4_decoder_rejects_bad_offset() -> None:
    # token: 1 literal, match length 4 at offset 5 (only 1 byte decoded so far)
    block = bytes([0x10]) + b"A" + b"\x05\x00"
    with pytest.raises(extract_mod._Corrupt):
        lz4_legacy_decode(struct.pack("<I", len(block)) + block)


def test_missing_tool_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract_mod.shutil, "which", lambda name: None)
    data = make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(20))
    with pytest.raises(ExtractError) as exc:
        extract_vmlinux(data, "vmlinuz-z")
    assert str(exc.value) == ("vmlinuz-z: zstd payload needs the 'zstd' command, "
                              "which is not installed")


@pytest.mark.parametrize(("data", "message"), [
    (make_bzimage(with_size(gzip.compress(b"MZ not elf" * 100), b"x")),
     "k: decompressed gzip payload is not an ELF image"),
    (make_bzimage(b"\x89LZO\0" + bytes(50)), "k: cannot extract a vmlinux: lzo-compressed payload"),
    (make_bzimage(b"\x01\x02\x03\x04" + bytes(50)),
     "k: cannot extract a vmlinux: unknown compression (magic 01020304) payload"),
    (make_bzimage(gzip.compress(fake_vmlinux())[:-500]), "k: corrupt gzip payload"),
    (make_bzimage(b"\x1f\x8b" + bytes(100)), "k: corrupt gzip payload"),
    (make_bzimage(b"\xfd7zXZ\x00" + bytes(100)), "k: corrupt xz payload"),
    (make_bzimage(b"BZh9" + bytes(100)), "k: corrupt bzip2 payload"),
    (make_bzimage(gzip.compress(b"x"), version=0x0207),
     "k: boot protocol 2.07 has no payload fields (need 2.08)"),
    (make_bzimage(gzip.compress(fake_vmlinux()))[:3000], "k: truncated bzImage (payload"),
    (b"just text", "k: not a Linux kernel (no bzImage header, not ELF)"),
])
def test_extract_errors(data: bytes, message: str) -> None:
    with pytest.raises(BootError) as exc:
        extract_vmlinux(data, "k")
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command is not installed")
def test_corrupt_cli_payload() -> None:
    with pytest.raises(ExtractError) as exc:
        extract_vmlinux(make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(64)), "k")
    assert str(exc.value).startswith("k: corrupt zstd payload (zstd: ")
    assert "\n" not in str(exc.value)


def test_elf_is_returned_unchanged() -> None:
    raw = fake_vmlinux(1000)
    assert extract_vmlinux(raw) is raw


def test_extract_file(tmp_path: Path) -> None:
    raw = fake_vmlinux()
    src = tmp_path / "vmlinuz"
    src.write_bytes(make_bzimage(with_size(gzip.compress(raw), raw)))
    dst = tmp_path / "vmlinux"
    extract_vmlinux_file(src, dst)
    assert dst.read_bytes() == raw
    missing = tmp_path / "nothing"
    with pytest.raises(ExtractError) as exc:
        extract_vmlinux_file(missing, dst)
    assert str(exc.value) == f"{missing}: No such file or directory"
    with pytest.raises(ExtractError) as exc:
        extract_vmlinux_file(src, tmp_path / "no" / "dir")
    assert str(exc.value) == f"{tmp_path / 'no' / 'dir'}: No such file or directory"


@pytest.mark.skipif(not DEBIAN_KERNELS, reason="no /boot/vmlinuz-*-cloud-amd64 installed")
def test_debian_cloud_kernel_extracts_to_pvh_elf(tmp_path: Path) -> None:
    dst = tmp_path / "vmlinux"
    extract_vmlinux_file(DEBIAN_KERNELS[-1], dst)
    data = dst.read_bytes()
    assert data[:5] == b"\x7fELF\x02" and struct.unpack_from("<H", data, 18)[0] == 62
    mem = GuestMemory.from_bytearrays(ram_ranges(256 * MiB))
    k = load_kernel(mem, os.fspath(dst))
    assert (k.format, k.protocol) == ("elf", "pvh")
    assert k.load_start <= k.entry < k.load_end
    linux = load_kernel(mem, os.fspath(dst), "linux")
    assert linux.protocol == "linux64" and linux.entry == k.load_start
