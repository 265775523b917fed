"""Loading an uncompressed ELF kernel (vmlinux) and finding its PVH entry."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.common.utils import struct_parse
from elftools.construct import ConstructError
from elftools.elf.structs import ELFStructs

from pyhv.engine.boot.errors import KernelError, size_text
from pyhv.engine.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
XEN_NOTE_NAME = b"Xen"
#: XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit physical PVH entry point
XEN_ELFNOTE_PHYS32_ENTRY = 18
_NOTE_HEADER = struct.Struct("<III")
#: size of an ELF64 program header
PHDR_SIZE = 56


@dataclass(frozen=True)
class ElfKernel:
    """What loading an ELF kernel found."""

    #: physical address of ``e_entry`` (the 64-bit entry of a vmlinux)
    entry: int
    #: the PVH 32-bit entry from the Xen note, None when there is none
    pvh_entry: int | None
    load_start: int
    load_end: int


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def iter_notes(data: bytes) -> Iterator[tuple[bytes, int, bytes]]:
    """``(name, type, desc)`` of each ELF note in a note segment or section."""
    off = 0
    while off + _NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, off)
        off += _NOTE_HEADER.size
        name_end = off + namesz
        desc_off = off + (namesz + 3 & ~3)
        desc_end = desc_off + descsz
        if desc_end > len(data):
            return
        yield bytes(data[off:name_end]).rstrip(b"\0"), ntype, bytes(data[desc_off:desc_end])
        off = desc_off + (descsz + 3 & ~3)


def pvh_entry_from_notes(blobs: list[bytes]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY value in any of the note blobs."""
    for blob in blobs:
        for name, ntype, desc in iter_notes(blob):
            if name == XEN_NOTE_NAME and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) == 4:
                    return int(struct.unpack("<I", desc)[0])
                if len(desc) == 8:
                    return int(struct.unpack("<Q", desc)[0])
    return None


def _read_exact(f: BinaryIO, offset: int, size: int, path: str) -> bytes:
    if offset + size > f.seek(0, os.SEEK_END):  # a huge size would be allocated first
        raise KernelError(f"{path}: truncated ELF (needs {size} bytes at offset 0x{offset:x})")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise KernelError(f"{path}: truncated ELF (needs {size} bytes at offset 0x{offset:x})")
    return data


def _read_into(f: BinaryIO, offset: int, buf: memoryview) -> bool:
    """Fill ``buf`` from ``offset`` of ``f``; False when the file ends first."""
    f.seek(offset)
    done = 0
    while done < len(buf):
        chunk = f.read(min(len(buf) - done, 1 << 24))
        if not chunk:
            return False
        buf[done:done + len(chunk)] = chunk
        done += len(chunk)
    return True


class _ElfFile:
    """The part of pyelftools' ``ELFFile`` the loader needs: the file header, program
    headers and section headers, parsed with the same ``ELFStructs``.  ``ELFFile``
    itself pulls in the DWARF, symbol and relocation modules (~10 ms of start-up)."""

    def __init__(self, f: BinaryIO) -> None:
        self.stream = f
        f.seek(0)
        ident = f.read(6)
        if ident[:4] != ELF_MAGIC:
            raise ELFError("Magic number does not match")
        classes, datas = {b"\x01": 32, b"\x02": 64}, {b"\x01": True, b"\x02": False}
        if ident[4:5] not in classes:
            raise ELFError(f"Invalid EI_CLASS {ident[4:5]!r}")
        if ident[5:6] not in datas:
            raise ELFError(f"Invalid EI_DATA {ident[5:6]!r}")
        self.elfclass, self.little_endian = classes[ident[4:5]], datas[ident[5:6]]
        self.structs = ELFStructs(little_endian=self.little_endian, elfclass=self.elfclass)
        self.structs.create_basic_structs()
        self.header = struct_parse(self.structs.Elf_Ehdr, f, stream_pos=0)
        self.structs.create_advanced_structs(self["e_type"], self["e_machine"],
                                             self["e_ident"]["EI_OSABI"])

    def __getitem__(self, name: str) -> Any:
        return self.header[name]

    def _table(self, offset: int, entsize: int, struct: Any, n: int) -> Any:
        if offset > 0 and entsize < struct.sizeof():
            raise ELFError(f"Too small entry size: {entsize}")
        return struct_parse(struct, self.stream, stream_pos=offset + n * entsize)

    def num_segments(self) -> int:
        if self["e_phnum"] < 0xFFFF:
            return int(self["e_phnum"])
        return int(self._section(0)["sh_info"])  # PN_XNUM: the count is in section 0

    def iter_segments(self) -> Iterator[Any]:
        for i in range(self.num_segments()):
            yield self._table(self["e_phoff"], self["e_phentsize"], self.structs.Elf_Phdr, i)

    def _section(self, n: int) -> Any:
        return self._table(self["e_shoff"], self["e_shentsize"], self.structs.Elf_Shdr, n)

    def iter_sections(self) -> Iterator[Any]:
        if self["e_shoff"] == 0:
            return
        count = self["e_shnum"] or self._section(0)["sh_size"]
        for i in range(count):
            yield self._section(i)


def _check_program_headers(elf: _ElfFile, f: BinaryIO, path: str) -> None:
    """The program headers must be of ELF64 size and lie in the file (elftools
    would parse tens of thousands of 0-byte headers in a 68-byte file)."""
    size = f.seek(0, os.SEEK_END)
    offset, count, entsize = elf["e_phoff"], elf.num_segments(), elf["e_phentsize"]
    if count and (entsize != PHDR_SIZE or offset + count * entsize > size):
        raise KernelError(f"{path}: corrupt ELF ({count} program headers of {entsize} bytes "
                          f"at offset 0x{offset:x}, file is {size} bytes)")


def _note_blobs(elf: _ElfFile, f: BinaryIO, path: str) -> list[bytes]:
    blobs = [_read_exact(f, seg["p_offset"], seg["p_filesz"], path)
             for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE"]
    if not blobs:
        blobs = [_read_exact(f, sec["sh_offset"], sec["sh_size"], path)
                 for sec in elf.iter_sections() if sec["sh_type"] == "SHT_NOTE"]
    return blobs


def _physical_entry(e_entry: int, loads: list[dict[str, int]], path: str) -> int:
    """``e_entry`` as a physical address (it may be a virtual one)."""
    for seg in loads:
        if seg["p_paddr"] <= e_entry < seg["p_paddr"] + seg["p_memsz"]:
            return e_entry
    for seg in loads:
        if seg["p_vaddr"] <= e_entry < seg["p_vaddr"] + seg["p_memsz"]:
            return e_entry - seg["p_vaddr"] + seg["p_paddr"]
    raise KernelError(f"{path}: ELF entry point 0x{e_entry:x} is in no loadable segment")


def load_elf(memory: GuestMemory, f: BinaryIO, path: str) -> ElfKernel:
    """Copy the PT_LOAD segments of an x86_64 ELF kernel to their physical addresses."""
    try:
        elf = _ElfFile(f)
        if elf.elfclass != 64:
            raise KernelError(f"{path}: {elf.elfclass}-bit ELF, need a 64-bit x86_64 kernel")
        if not elf.little_endian or elf["e_machine"] != "EM_X86_64":
            raise KernelError(f"{path}: ELF for {elf['e_machine']}, need x86_64")
        _check_program_headers(elf, f, path)
        loads = [{k: int(seg[k]) for k in ("p_offset", "p_filesz", "p_memsz",
                                           "p_vaddr", "p_paddr")}
                 for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
        loads = [s for s in loads if s["p_memsz"]]
        if not loads:
            raise KernelError(f"{path}: ELF has no loadable segments")
        entry = _physical_entry(int(elf["e_entry"]), loads, path)
        pvh = pvh_entry_from_notes(_note_blobs(elf, f, path))
        for seg in loads:
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise KernelError(f"{path}: ELF segment at 0x{paddr:x} has "
                                  f"p_filesz > p_memsz")
            if not memory.contains(paddr, memsz):
                raise KernelError(
                    f"{path}: ELF segment 0x{paddr:x}-0x{paddr + memsz - 1:x} "
                    f"does not fit in {size_text(memory.size)} of RAM")
            if filesz and not _read_into(f, seg["p_offset"], memory.view(paddr, filesz)):
                raise KernelError(f"{path}: truncated ELF (segment at 0x{paddr:x} "
                                  f"needs {filesz} bytes at offset 0x{seg['p_offset']:x})")
            if memsz > filesz:
                memory.fill(paddr + filesz, memsz - filesz)
    except (ELFError, ConstructError, struct.error, OverflowError, ValueError) as e:
        # OverflowError, ValueError: an offset too large to seek to
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KernelError(f"{path}: truncated or corrupt ELF ({detail})") from e
    except OSError as e:
        raise KernelError(f"{path}: cannot read ELF: {e.strerror or e}") from e
    return ElfKernel(
        entry=entry,
        pvh_entry=pvh,
        load_start=min(s["p_paddr"] for s in loads),
        load_end=max(s["p_paddr"] + s["p_memsz"] for s in loads),
    )
