"""SMBIOS (DMI) tables, as firmware gives them to the guest (DMTF DSP0134 3.0).

Pure: :func:`build_smbios` turns an :class:`SmbiosPlatform` into the bytes of a
64-bit ("_SM3_") entry point, a 32-bit ("_SM_"/"_DMI_", 2.8) entry point and the
structure table; :func:`write_smbios` places them at :data:`layout.SMBIOS_ADDR`,
in the legacy BIOS scan area (0xF0000-0xFFFFF) where Linux's dmi_scan and other
guests look for them on a non-EFI boot (PVH included).

Structures: type 0 (BIOS), 1 (system), 2 (baseboard), 3 (chassis), 4 (one per
socket), 11 (OEM strings, when any), 16 (physical memory array), 17 (one memory
device per 16 GiB), 19 (one mapped address range per RAM run), 32 (boot
information) and 127 (end of table).
"""

from __future__ import annotations

import os
import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Optional

from pyhv import __version__
from pyhv.config import SmbiosConfig, SmbiosFields, VmConfig, machine_family
from pyhv.engine import layout
from pyhv.engine.memory import GuestMemory
from pyhv.errors import PyhvError

#: SMBIOS version the tables follow
SMBIOS_MAJOR, SMBIOS_MINOR = 3, 0
#: size of one type 17 memory device (QEMU's choice too)
DIMM_MAX = 16 * layout.GiB
EP3_LEN = 0x18
EP2_LEN = 0x1F
#: the structure table starts this far after :data:`layout.SMBIOS_ADDR`
TABLE_OFFSET = 0x40
#: BIOS characteristics extension byte 2, bit 4: the table describes a virtual machine
EXT2_VIRTUAL_MACHINE = 0x10
#: sysfs files of the host's DMI values, by (structure, field)
HOST_DMI = {
    ("bios", "vendor"): "bios_vendor", ("bios", "version"): "bios_version",
    ("bios", "date"): "bios_date", ("bios", "release"): "bios_release",
    ("system", "manufacturer"): "sys_vendor", ("system", "product"): "product_name",
    ("system", "version"): "product_version", ("system", "serial"): "product_serial",
    ("system", "sku"): "product_sku", ("system", "family"): "product_family",
}


class SmbiosError(PyhvError):
    """The SMBIOS tables cannot be built (too large, host values unreadable)."""


@dataclass(frozen=True)
class SmbiosPlatform:
    """What the SMBIOS tables of one machine describe."""

    bios: dict[str, str]
    system: dict[str, str]
    baseboards: tuple[dict[str, str], ...]
    chassis: dict[str, str]
    processor: dict[str, str] = field(default_factory=dict)
    memory: dict[str, str] = field(default_factory=dict)
    oem_strings: tuple[str, ...] = ()
    #: the system UUID (RFC 4122 byte order; None: all zeros, "not set")
    uuid: Optional[bytes] = None
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    #: CPUID vendor string and leaf 1 EAX/EDX (the processor ID field)
    cpu_vendor: str = ""
    cpu_signature: tuple[int, int] = (0, 0)
    #: guest RAM runs (address, size)
    ram: tuple[tuple[int, int], ...] = ()


def product_name(machine: str) -> str:
    """The system product name QEMU gives each machine family (guests key on it)."""
    if machine_family(machine) == "q35":
        return "Standard PC (Q35 + ICH9, 2009)"
    return "Standard PC (i440FX + PIIX, 1996)"


def host_fields(dmi_dir: str = "/sys/class/dmi/id") -> tuple[dict[str, str], dict[str, str]]:
    """The host's BIOS and system values (libvirt's ``<smbios mode='host'>``); raises
    :class:`SmbiosError` when the host has no readable DMI."""
    out: dict[str, dict[str, str]] = {"bios": {}, "system": {}}
    for (kind, name), fname in HOST_DMI.items():
        try:
            with open(os.path.join(dmi_dir, fname), encoding="utf-8",
                      errors="replace") as f:
                value = f.read().strip()
        except OSError:
            continue  # absent, or readable by root only (serial)
        if value:
            out[kind][name] = value
    try:
        with open(os.path.join(dmi_dir, "product_uuid"), encoding="ascii") as f:
            out["system"]["uuid"] = str(uuidlib.UUID(f.read().strip()))
    except (OSError, ValueError):
        pass
    if not out["system"].get("product") and not out["bios"].get("vendor"):
        raise SmbiosError(f"smbios mode 'host': the host's DMI values are not readable "
                          f"({dmi_dir})")
    return out["bios"], out["system"]


def smbios_description(cfg: VmConfig, sockets: int, cores: int, threads: int,
                       cpuid: Optional[list] = None,
                       dmi_dir: str = "/sys/class/dmi/id") -> SmbiosPlatform:
    """What the tables of a machine built from ``cfg`` say; ``cpuid`` is the boot
    vCPU's CPUID table (vendor and signature of the type 4 structures)."""
    sm: SmbiosConfig = cfg.smbios
    bios = {"vendor": "pyhv", "version": __version__}
    system = {"manufacturer": "pyhv", "product": product_name(cfg.machine),
              "version": cfg.machine}
    chassis = {"manufacturer": "pyhv"}
    baseboards: tuple[SmbiosFields, ...] = ()
    if sm.mode == "sysinfo":
        bios.update(sm.bios)
        system.update(sm.system)
        chassis.update(sm.chassis)
        baseboards = sm.baseboards
    elif sm.mode == "host":
        host_bios, host_system = host_fields(dmi_dir)
        bios.update(host_bios)
        system.update(host_system)
    # QEMU's -smbios type=0|1|2|3 (pyhv-qemu) arrive without a mode: they apply too
    if sm.mode is None:
        bios.update(sm.bios)
        system.update(sm.system)
        chassis.update(sm.chassis)
        baseboards = sm.baseboards
    uuid_text = system.pop("uuid", None) or cfg.uuid
    vendor, signature = "", (0, 0)
    for fn, _idx, _flags, eax, ebx, ecx, edx in cpuid or ():
        if fn == 0:
            vendor = struct.pack("<III", ebx, edx, ecx).decode("ascii", "replace")
        elif fn == 1:
            signature = (eax, edx)
    return SmbiosPlatform(
        bios=bios, system=system,
        baseboards=tuple(dict(b) for b in baseboards) or (
            {"manufacturer": "pyhv", "product": product_name(cfg.machine)},),
        chassis=chassis, processor=dict(sm.processor), memory=dict(sm.memory),
        oem_strings=sm.oem_strings,
        uuid=uuidlib.UUID(uuid_text).bytes if uuid_text else None,
        sockets=sockets, cores=cores, threads=threads, cpu_vendor=vendor.strip("\0"),
        cpu_signature=signature, ram=tuple(layout.ram_ranges(cfg.memory)))


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to zero (mod 256)."""
    return -sum(data) & 0xFF


class _Strings:
    """The string set of one structure: numbers from 1, 0 for no string."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def add(self, value: Optional[str]) -> int:
        if not value:
            return 0
        raw = value.encode("utf-8", "replace").replace(b"\0", b" ")
        if raw in self.values:
            return self.values.index(raw) + 1
        if len(self.values) == 255:
            raise SmbiosError("smbios: more than 255 strings in one structure")
        self.values.append(raw)
        return len(self.values)

    def encode(self) -> bytes:
        if not self.values:
            return b"\0\0"
        return b"".join(v + b"\0" for v in self.values) + b"\0"


def structure(stype: int, handle: int, body: bytes, strings: _Strings) -> bytes:
    """One structure: header (type, length, handle), formatted area, string set."""
    if 4 + len(body) > 0xFF:
        raise SmbiosError(f"smbios: type {stype} structure is too long")
    return struct.pack("<BBH", stype, 4 + len(body), handle) + body + strings.encode()


def _release(text: Optional[str]) -> tuple[int, int]:
    """libvirt's ``release`` (``major.minor``) as the two type 0 bytes."""
    try:
        major, minor = (text or "").split(".")
        return int(major) & 0xFF, int(minor) & 0xFF
    except ValueError:
        return 0xFF, 0xFF  # "not supported"


def _speed(text: Optional[str], default: int) -> int:
    try:
        return int(text) & 0xFFFF if text else default
    except ValueError:
        return default


def build_structures(p: SmbiosPlatform) -> list[bytes]:
    """Every structure, in handle order (handle = index)."""
    out: list[bytes] = []

    def add(stype: int, body: bytes, s: _Strings) -> int:
        out.append(structure(stype, len(out), body, s))
        return len(out) - 1

    # type 0: BIOS information (2.4+ layout, 0x18 bytes)
    s = _Strings()
    major, minor = _release(p.bios.get("release"))
    add(0, struct.pack("<BBHBBQBBBBBB", s.add(p.bios.get("vendor")),
                       s.add(p.bios.get("version")), 0xE800, s.add(p.bios.get("date")),
                       0, 1 << 3,  # 64 KiB ROM; bit 3: characteristics not supported
                       0, EXT2_VIRTUAL_MACHINE, major, minor, 0xFF, 0xFF), s)
    # type 1: system information (0x1B bytes); the UUID's first three fields are
    # little-endian (SMBIOS 2.6+ byte order)
    s = _Strings()
    uuid = uuidlib.UUID(bytes=p.uuid).bytes_le if p.uuid else bytes(16)
    add(1, struct.pack("<BBBB16sBBB", s.add(p.system.get("manufacturer")),
                       s.add(p.system.get("product")), s.add(p.system.get("version")),
                       s.add(p.system.get("serial")), uuid, 6,  # woken by power switch
                       s.add(p.system.get("sku")), s.add(p.system.get("family"))), s)
    # type 3 first (type 2 names its chassis' handle): chassis, 0x16 bytes
    chassis_handle = len(out) + len(p.baseboards)
    # type 2: baseboard (0x0F bytes), "hosting board", a motherboard
    for board in p.baseboards:
        s = _Strings()
        add(2, struct.pack("<BBBBBBBHBB", s.add(board.get("manufacturer")),
                           s.add(board.get("product")), s.add(board.get("version")),
                           s.add(board.get("serial")), s.add(board.get("asset")), 0x01,
                           s.add(board.get("location")), chassis_handle, 0x0A, 0), s)
    s = _Strings()
    add(3, struct.pack("<BBBBBBBBBIBBBBB", s.add(p.chassis.get("manufacturer")), 0x01,
                       s.add(p.chassis.get("version")), s.add(p.chassis.get("serial")),
                       s.add(p.chassis.get("asset")), 3, 3, 3, 2,  # safe, safe, safe, unknown
                       0, 0, 0, 0, 0, s.add(p.chassis.get("sku"))), s)
    # type 4: one per socket (3.0 layout, 0x30 bytes)
    vendor_names = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon"}
    per_socket = p.cores * p.threads
    for sock in range(p.sockets):
        s = _Strings()
        proc = p.processor
        eax, edx = p.cpu_signature
        characteristics = 0x04 | (0x08 if p.cores > 1 else 0) | (0x10 if p.threads > 1 else 0)
        add(4, struct.pack(
            "<BBBBIIBBHHHBBHHHBBBBBBHHHHH",
            s.add(f"{proc.get('sock_pfx', 'CPU')} {sock}"), 3, 0x01,  # central, "other"
            s.add(proc.get("manufacturer") or vendor_names.get(p.cpu_vendor, p.cpu_vendor)),
            eax, edx, s.add(proc.get("version")), 0, 0,
            _speed(proc.get("max-speed"), 2000), _speed(proc.get("current-speed"), 2000),
            0x41, 0x01,  # socket populated, CPU enabled; upgrade "other"
            0xFFFF, 0xFFFF, 0xFFFF,  # no cache structures
            s.add(proc.get("serial")), s.add(proc.get("asset")), s.add(proc.get("part")),
            min(p.cores, 0xFF), min(p.cores, 0xFF), min(per_socket, 0xFF),
            characteristics, 0x01, p.cores, p.cores, per_socket), s)
    # type 11: OEM strings
    if p.oem_strings:
        if len(p.oem_strings) > 255:
            raise SmbiosError("smbios: more than 255 OEM strings")
        s = _Strings()
        for text in p.oem_strings:
            # every entry gets its own number, even a repeated or empty one
            s.values.append(text.encode("utf-8", "replace").replace(b"\0", b" ") or b" ")
        add(11, struct.pack("<B", len(p.oem_strings)), s)
    # type 16: the physical memory array
    total = sum(size for _addr, size in p.ram)
    dimms = [min(DIMM_MAX, total - off) for off in range(0, total, DIMM_MAX)]
    kib = total // 1024
    array = add(16, struct.pack("<BBBIHHQ", 0x01, 0x03, 0x06,  # other, system, multi-bit ECC
                                kib if kib < 0x8000_0000 else 0x8000_0000, 0xFFFE,
                                len(dimms), total if kib >= 0x8000_0000 else 0), _Strings())
    # type 17: memory devices (2.8 layout, 0x28 bytes)
    mem = p.memory
    for i, size in enumerate(dimms):
        s = _Strings()
        mib = size // layout.MiB
        add(17, struct.pack(
            "<HHHHHBBBBBHHBBBBBIHHHH", array, 0xFFFE, 0xFFFF, 0xFFFF,
            mib if mib < 0x7FFF else 0x7FFF, 0x09, 0,  # DIMM, no set
            s.add(f"{mem.get('loc_pfx', 'DIMM')} {i}"), s.add(mem.get("bank")),
            0x07, 0x02, _speed(mem.get("speed"), 0),  # RAM, type detail "other"
            s.add(mem.get("manufacturer", "pyhv")), s.add(mem.get("serial")),
            s.add(mem.get("asset")), s.add(mem.get("part")), 0,
            mib if mib >= 0x7FFF else 0, _speed(mem.get("speed"), 0), 0, 0, 0), s)
    # type 19: memory array mapped addresses, one per RAM run
    for addr, size in p.ram:
        start, end = addr // 1024, (addr + size) // 1024 - 1
        ext = end >= 0xFFFF_FFFF
        add(19, struct.pack("<IIHBQQ", 0xFFFF_FFFF if ext else start,
                            0xFFFF_FFFF if ext else end, array, 1,
                            addr if ext else 0, addr + size - 1 if ext else 0), _Strings())
    # type 32: system boot information, "no errors detected"
    add(32, bytes(6) + b"\0", _Strings())
    add(127, b"", _Strings())
    return out


@dataclass(frozen=True)
class SmbiosTables:
    base: int
    entry3: bytes
    entry2: bytes
    table: bytes
    count: int

    @property
    def table_addr(self) -> int:
        return self.base + TABLE_OFFSET

    @property
    def entry2_addr(self) -> int:
        return self.base + 0x20


def entry_point3(table_addr: int, table_len: int) -> bytes:
    """The 64-bit ("_SM3_") entry point."""
    ep = bytearray(struct.pack("<5sBBBBBBBIQ", b"_SM3_", 0, EP3_LEN, SMBIOS_MAJOR,
                               SMBIOS_MINOR, 0, 1, 0, table_len, table_addr))
    ep[5] = checksum(bytes(ep))
    return bytes(ep)


def entry_point2(table_addr: int, table_len: int, count: int, max_struct: int) -> bytes:
    """The 32-bit ("_SM_" + "_DMI_") entry point, version 2.8."""
    ep = bytearray(struct.pack("<4sBBBBHB5s5sBHIHB", b"_SM_", 0, EP2_LEN, 2, 8,
                               max_struct, 0, bytes(5), b"_DMI_", 0, table_len,
                               table_addr, count, 0x28))
    ep[0x15] = checksum(bytes(ep[0x10:]))
    ep[4] = checksum(bytes(ep))
    return bytes(ep)


def build_smbios(p: SmbiosPlatform, base: int = layout.SMBIOS_ADDR,
                 end: int = layout.SMBIOS_END) -> SmbiosTables:
    """The entry points (at ``base`` and ``base + 0x20``) and the table (at ``base +
    TABLE_OFFSET``), checked to fit below ``end``."""
    if base % 16 or not layout.SMBIOS_SCAN_START <= base < end <= layout.SMBIOS_SCAN_END:
        raise SmbiosError(f"smbios: base {base:#x} is not a paragraph of the BIOS scan area")
    structs = build_structures(p)
    table = b"".join(structs)
    table_addr = base + TABLE_OFFSET
    if table_addr + len(table) > end or len(table) > 0xFFFF:
        raise SmbiosError(f"smbios: the tables ({len(table)} bytes) do not fit in "
                          f"{end - table_addr} bytes (too many OEM strings?)")
    return SmbiosTables(base, entry_point3(table_addr, len(table)),
                        entry_point2(table_addr, len(table), len(structs),
                                     max(len(x) for x in structs)),
                        table, len(structs))


def write_smbios(memory: GuestMemory, p: SmbiosPlatform,
                 base: int = layout.SMBIOS_ADDR) -> SmbiosTables:
    """Build the tables and write them into guest memory; returns them."""
    tables = build_smbios(p, base)
    memory.write(tables.base, tables.entry3)
    memory.write(tables.entry2_addr, tables.entry2)
    memory.write(tables.table_addr, tables.table)
    return tables


def dmidecode_dump(tables: SmbiosTables) -> bytes:
    """The tables as ``dmidecode --dump-bin`` writes them: the 64-bit entry point at
    offset 0 with its table address patched to 32, the table at offset 32."""
    return entry_point3(32, len(tables.table)).ljust(32, b"\0") + tables.table
