"""Extracting the ELF vmlinux from a bzImage's compressed payload."""

from __future__ import annotations

import bz2
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from typing import Protocol

from pyhv.engine.boot.bzimage import parse_setup_header, version_text
from pyhv.engine.boot.elf import ELF_MAGIC
from pyhv.engine.boot.errors import ExtractError, os_error_message

#: payload_offset/payload_length appeared in boot protocol 2.08
MIN_PAYLOAD_VERSION = 0x0208
LZ4_LEGACY_MAGIC = 0x184C2102
_U32 = struct.Struct("<I")


class _Corrupt(Exception):
    """A decoder found the compressed data malformed."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes) -> bytes: ...


def _stream(decompressor: _Decompressor, data: bytes) -> bytes:
    out = decompressor.decompress(data)
    if not decompressor.eof:
        raise _Corrupt("compressed data ends early")
    return out


def _gzip(data: bytes) -> bytes:
    return _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), data)


def _xz(data: bytes) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data)


def _lzma(data: bytes) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data)


def _bzip2(data: bytes) -> bytes:
    return _stream(bz2.BZ2Decompressor(), data)


def lz4_block_decode(src: bytes | memoryview, out: bytearray) -> None:
    """Append the decoding of one raw LZ4 block to ``out``."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            raise _Corrupt("LZ4 literals run past the block")
        out += src[i:i + lit]
        i += lit
        if i >= n:
            return
        offset = src[i] | src[i + 1] << 8
        i += 2
        mlen = token & 15
        if mlen == 15:
            while True:
                b = src[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        if offset == 0 or offset > len(out):
            raise _Corrupt(f"LZ4 match offset {offset} out of range")
        pos = len(out) - offset
        if offset >= mlen:
            out += out[pos:pos + mlen]
        else:
            pattern = out[pos:]
            out += (pattern * (mlen // offset + 1))[:mlen]


def lz4_legacy_decode(data: bytes) -> bytes:
    """Decode Linux's legacy LZ4 frame: magic, then (u32 length, block) pairs.

    Decoding stops at the first length that runs past the data: the 4-byte
    uncompressed size Linux appends to its payloads.
    """
    out = bytearray()
    view = memoryview(data)
    off = 0
    try:
        while off + 4 <= len(data):
            size, = _U32.unpack_from(data, off)
            off += 4
            if size == LZ4_LEGACY_MAGIC:
                continue
            if off + size > len(data):
                break
            lz4_block_decode(view[off:off + size], out)
            off += size
    except IndexError as e:
        raise _Corrupt("LZ4 block ends early") from e
    return bytes(out)


def _run_tool(tool: str, data: bytes) -> bytes:
    """Decompress with ``tool -dc`` (stdin to stdout)."""
    exe = shutil.which(tool)
    if exe is None:
        raise FileNotFoundError(tool)
    proc = subprocess.run([exe, "-dcq"], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise _Corrupt(f"{tool}: {err[-1] if err else f'exit status {proc.returncode}'}")
    return proc.stdout


def _run_tool_sized(tool: str, data: bytes) -> bytes:
    """Like :func:`_run_tool`, first without the size Linux appends to payloads.

    The command-line tools reject those 4 trailing bytes as a broken frame.
    """
    try:
        return _run_tool(tool, data[:-4])
    except _Corrupt:
        return _run_tool(tool, data)


def _lz4(data: bytes) -> bytes:
    try:
        return _run_tool_sized("lz4", data)
    except FileNotFoundError:
        return lz4_legacy_decode(data[4:])


def _zstd(data: bytes) -> bytes:
    return _run_tool_sized("zstd", data)


#: (magic, name, decoder), tried in order
CODECS: list[tuple[bytes, str, Callable[[bytes], bytes]]] = [
    (b"\x1f\x8b", "gzip", _gzip),
    (b"\xfd7zXZ\x00", "xz", _xz),
    (b"\x5d\x00\x00", "lzma", _lzma),
    (b"BZh", "bzip2", _bzip2),
    (_U32.pack(LZ4_LEGACY_MAGIC), "lz4", _lz4),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd),
]
_UNSUPPORTED = [(b"\x89LZO", "lzo")]


def detect_codec(payload: bytes) -> str | None:
    """The name of the compression ``payload`` starts with, or None."""
    for magic, name, _ in CODECS:
        if payload.startswith(magic):
            return name
    for magic, name in _UNSUPPORTED:
        if payload.startswith(magic):
            return name
    return None


def extract_vmlinux(data: bytes, name: str = "bzImage") -> bytes:
    """The ELF vmlinux inside bzImage ``data`` (``name`` is used in messages).

    An ELF image is returned unchanged.
    """
    if data[:4] == ELF_MAGIC:
        return data
    hdr = parse_setup_header(data, name)
    if hdr.version < MIN_PAYLOAD_VERSION:
        raise ExtractError(f"{name}: boot protocol {version_text(hdr.version)} has no "
                           f"payload fields (need {version_text(MIN_PAYLOAD_VERSION)})")
    start = hdr.setup_size + hdr.payload_offset
    end = start + hdr.payload_length
    if not hdr.payload_length or end > len(data):
        raise ExtractError(f"{name}: truncated bzImage (payload 0x{start:x}-0x{end:x}, "
                           f"file is {len(data)} bytes)")
    payload = data[start:end]
    codec = detect_codec(payload)
    decoder = next((d for m, n, d in CODECS if n == codec), None)
    if decoder is None:
        what = (f"{codec}-compressed" if codec
                else f"unknown compression (magic {payload[:4].hex()})")
        raise ExtractError(f"{name}: cannot extract a vmlinux: {what} payload")
    try:
        vmlinux = decoder(payload)
    except FileNotFoundError as e:
        raise ExtractError(f"{name}: {codec} payload needs the '{e.args[0]}' "
                           f"command, which is not installed") from e
    except (_Corrupt, zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise ExtractError(f"{name}: corrupt {codec} payload ({e})") from e
    if vmlinux[:4] != ELF_MAGIC:
        raise ExtractError(f"{name}: decompressed {codec} payload is not an ELF image")
    return vmlinux


def extract_vmlinux_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Write the vmlinux extracted from the bzImage ``src`` to ``dst``."""
    name = os.fspath(src)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExtractError(os_error_message(name, e)) from e
    vmlinux = extract_vmlinux(data, name)
    try:
        with open(dst, "wb") as f:
            f.write(vmlinux)
    except OSError as e:
        raise ExtractError(os_error_message(dst, e)) from e
