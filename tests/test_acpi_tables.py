"""ACPI tables: structure, checksums, placement, and what acpica-tools make of them."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyhv.engine import layout
from pyhv.engine.acpi import (
    MAX_CPUS,
    AcpiError,
    AcpiPlatform,
    AcpiTables,
    aml,
    build_acpi,
    checksum,
    write_acpi,
)
from pyhv.engine.memory import GuestMemory

needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl (acpica-tools) is not installed")
needs_acpiexec = pytest.mark.skipif(shutil.which("acpiexec") is None,
                                    reason="acpiexec (acpica-tools) is not installed")

FULL = AcpiPlatform(cpus=8, pci_root=True, pci_intx_gsis=(16, 17, 18, 19),
                    serial_ports=((0x3F8, 4), (0x2F8, 3)))
#: a pc machine: conventional PCI (no ECAM, no MCFG) with a 64-bit window
PC = AcpiPlatform(cpus=2, pci_root=True, pci_intx_gsis=(16, 17, 18, 19, 20, 21, 22, 23),
                  pci_express=False, pci_mmio64=(0x1_0000_0000, 0x9_0000_0000),
                  pci_prt_slots=(3, 1, 3))
#: two NUMA nodes, node 1 straddling the MMIO hole, with a SLIT
NUMA = AcpiPlatform(cpus=4, apic_ids=(0, 1, 2, 3),
                    numa_nodes=(((0, 1), ((0, 0x8000_0000),)),
                                ((2, 3), ((0x8000_0000, 0x4000_0000),
                                          (0x1_0000_0000, 0x4000_0000)))),
                    numa_distances=((10, 21), (21, 10)))
PLATFORMS = [AcpiPlatform(), FULL, PC, NUMA]


def _by_sig(tables: AcpiTables) -> dict[str, bytes]:
    return {blob[:8].decode() if blob[:8] == b"RSD PTR " else blob[:4].decode(): blob
            for _, blob in tables.blobs}


def _image(tables: AcpiTables) -> tuple[int, bytearray]:
    base = tables.blobs[0][0]
    image = bytearray(tables.end - base)
    for addr, blob in tables.blobs:
        image[addr - base:addr - base + len(blob)] = blob
    return base, image


def _table_at(tables: AcpiTables, addr: int) -> bytes:
    base, image = _image(tables)
    off = addr - base
    length = struct.unpack_from("<I", image, off + 4)[0]
    return bytes(image[off:off + length])


def _numa_sigs(platform: AcpiPlatform) -> set[str]:
    """SRAT with NUMA nodes, SLIT when they have distances too."""
    if not platform.numa_nodes:
        return set()
    return {"SRAT", "SLIT"} if platform.numa_distances else {"SRAT"}


def _madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, off = [], 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2
        entries.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return entries


# ---- structure ----------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
def test_checksums_and_lengths(platform: AcpiPlatform) -> None:
    tables = build_acpi(platform)
    sigs = _by_sig(tables)
    expected = {"RSD PTR ", "FACS", "FACP", "DSDT", "APIC", "XSDT", "RSDT"}
    assert set(sigs) == expected | ({"MCFG"} if platform.pci_root and platform.pci_express
                                    else set()) | _numa_sigs(platform)
    for sig, blob in sigs.items():
        if sig == "RSD PTR ":
            assert len(blob) == 36
            assert sum(blob[:20]) % 256 == 0 and sum(blob) % 256 == 0
            assert blob[15] == 2 and struct.unpack_from("<I", blob, 20)[0] == 36
        elif sig == "FACS":
            assert struct.unpack_from("<I", blob, 4)[0] == len(blob) == 64
        else:
            assert struct.unpack_from("<I", blob, 4)[0] == len(blob)
            assert sum(blob) % 256 == 0, sig
            assert blob[10:16] == b"PYHV  " and blob[16:24] == b"PYHVMACH"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_placement(platform: AcpiPlatform) -> None:
    tables = build_acpi(platform)
    assert tables.rsdp_addr == layout.ACPI_ADDR == tables.blobs[0][0]
    assert tables.end <= layout.ACPI_END
    prev_end = layout.ACPI_ADDR
    for addr, blob in tables.blobs:
        assert addr % 16 == 0 and addr >= prev_end
        prev_end = addr + len(blob)
    assert tables.addresses["FACS"] % 64 == 0


@pytest.mark.parametrize("platform", PLATFORMS)
def test_pointers(platform: AcpiPlatform) -> None:
    tables = build_acpi(platform)
    rsdp = _by_sig(tables)["RSD PTR "]
    rsdt_addr = struct.unpack_from("<I", rsdp, 16)[0]
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt, rsdt = _table_at(tables, xsdt_addr), _table_at(tables, rsdt_addr)
    assert xsdt[:4] == b"XSDT" and rsdt[:4] == b"RSDT"
    x_ptrs = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    r_ptrs = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    assert list(x_ptrs) == list(r_ptrs)
    sigs = [_table_at(tables, p)[:4] for p in x_ptrs]
    assert sigs == [b"FACP", b"APIC"] + ([b"MCFG"] if platform.pci_root
                                         and platform.pci_express else []) \
        + [sig.encode() for sig in ("SRAT", "SLIT") if sig in _numa_sigs(platform)]
    fadt = _table_at(tables, x_ptrs[0])
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert struct.unpack_from("<QQ", fadt, 132) == (0, dsdt_addr)
    assert _table_at(tables, dsdt_addr)[:4] == b"DSDT"
    base, image = _image(tables)
    assert image[facs_addr - base:facs_addr - base + 4] == b"FACS"


def test_fadt_fields() -> None:
    fadt = _by_sig(build_acpi(AcpiPlatform()))["FACP"]
    assert len(fadt) == 276 and fadt[8] == 6
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", fadt, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (layout.PM1A_EVT_PORT, layout.PM1A_CNT_PORT,
                                            layout.PM_TMR_PORT)
    assert fadt[108] == 0x32  # CMOS century register
    assert tuple(fadt[88:92]) == (layout.PM1A_EVT_LEN, layout.PM1A_CNT_LEN, 0, layout.PM_TMR_LEN)
    boot, flags = struct.unpack_from("<H", fadt, 109)[0], struct.unpack_from("<I", fadt, 112)[0]
    assert boot & 0b10 and boot & 0b100 and not boot & 0b101000  # 8042, no VGA, MSI, RTC
    assert flags & (1 << 10) and not flags & (1 << 4) and not flags & (1 << 20)
    assert fadt[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, layout.I8042_CMD_PORT)
    assert fadt[128] == layout.I8042_RESET_VALUE
    for off, port, length in ((148, layout.PM1A_EVT_PORT, layout.PM1A_EVT_LEN),
                              (172, layout.PM1A_CNT_PORT, layout.PM1A_CNT_LEN),
                              (208, layout.PM_TMR_PORT, layout.PM_TMR_LEN)):
        space, bits, _, _, addr = struct.unpack_from("<BBBBQ", fadt, off)
        assert (space, bits, addr) == (1, 8 * length, port)


@pytest.mark.parametrize("cpus", [1, 2, 4, 8, 64, MAX_CPUS])
def test_madt(cpus: int) -> None:
    madt = _by_sig(build_acpi(AcpiPlatform(cpus=cpus)))["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    entries = _madt_entries(madt)
    lapics = [e for t, e in entries if t == 0]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [
        (i, i, 1) for i in range(cpus)]
    ioapics = [e for t, e in entries if t == 1]
    assert len(ioapics) == 1
    assert struct.unpack_from("<BxII", ioapics[0], 2) == (0, layout.IOAPIC_ADDR, 0)
    isos = [struct.unpack_from("<BBIH", e, 2) for t, e in entries if t == 2]
    assert isos == [(0, 0, 2, 0), (0, layout.SCI_IRQ, layout.SCI_IRQ, 0xD)]
    nmis = [e for t, e in entries if t == 4]
    assert len(nmis) == 1 and nmis[0][2] == 0xFF and nmis[0][5] == 1


def test_mcfg() -> None:
    mcfg = _by_sig(build_acpi(FULL))["MCFG"]
    assert len(mcfg) == 60
    assert struct.unpack_from("<QHBB", mcfg, 44) == (layout.PCIE_ECAM_START, 0, 0, 255)


def test_dsdt_contents() -> None:
    dsdt = _by_sig(build_acpi(FULL))["DSDT"]
    assert dsdt[8] == 2
    assert b"\x08\\_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00" in dsdt
    for name in (b"C000", b"C007", b"COM1", b"COM2", b"PCI0", b"_OSC", b"_PRT", b"MRES"):
        assert name in dsdt
    assert b"C008" not in dsdt
    plain = _by_sig(build_acpi(AcpiPlatform()))["DSDT"]
    assert b"PCI0" not in plain and b"COM1" in plain and b"COM2" not in plain


def test_conventional_pci_root() -> None:
    """pc: PCI0 is a PNP0A03 bridge reached through port 0xCF8, with a QWordMemory
    window for 64-bit BARs; no MCFG and no ECAM reservation."""
    tables = _by_sig(build_acpi(PC))
    dsdt = tables["DSDT"]
    assert "MCFG" not in tables and b"MRES" not in dsdt and b"PCI0" in dsdt
    assert struct.pack("<I", aml.eisa_id("PNP0A03")) in dsdt
    assert struct.pack("<I", aml.eisa_id("PNP0A08")) not in dsdt
    # QWordMemory: min and max of the 64-bit window
    assert struct.pack("<QQ", 0x1_0000_0000, 0x8_FFFF_FFFF) in dsdt
    # _PRT: 4 pins of the populated slots only, a GSI rotating with slot and pin
    prt = dsdt[dsdt.index(b"_PRT"):]
    for slot in (1, 3):
        assert aml.package((slot << 16) | 0xFFFF, 0, 0, 16 + slot % 8) in prt
    assert aml.package((3 << 16) | 0xFFFF, 3, 0, 22) in prt
    assert aml.package((2 << 16) | 0xFFFF, 0, 0, 18) not in prt
    assert aml.package(0xFFFF, 0, 0, 16) not in prt


def test_invalid_platforms() -> None:
    for kwargs in ({"cpus": 0}, {"cpus": MAX_CPUS + 1}, {"oem_id": "TOOLONG"},
                   {"ioapic_id": 255}, {"serial_ports": ((0x3F8, 16),)},
                   {"pci_intx_gsis": (24,)}, {"rtc_century": 0x80},
                   {"pci_root": True, "pci_mmio32_end": layout.PCI_MMIO32_START}):
        with pytest.raises(AcpiError):
            AcpiPlatform(**kwargs)  # type: ignore[arg-type]


def test_tables_must_fit() -> None:
    with pytest.raises(AcpiError, match="bytes"):
        build_acpi(FULL, end=layout.ACPI_ADDR + 0x400)
    with pytest.raises(AcpiError):
        build_acpi(AcpiPlatform(), base=layout.ACPI_ADDR + 4)


def test_write_acpi() -> None:
    memory = GuestMemory.from_bytearrays([(0, 16 << 20)])
    rsdp = write_acpi(memory, FULL)
    assert rsdp == layout.ACPI_ADDR
    assert memory.read(rsdp, 8) == b"RSD PTR "
    xsdt = memory.read_u64(rsdp + 24)
    length = memory.read_u32(xsdt + 4)
    assert checksum(memory.read(xsdt, length)) == 0
    for i in range((length - 36) // 8):
        table = memory.read_u64(xsdt + 36 + 8 * i)
        assert memory.read(table, 4) in (b"FACP", b"APIC", b"MCFG")
        assert checksum(memory.read(table, memory.read_u32(table + 4))) == 0


# ---- acpica-tools ---------------------------------------------------------------
def _run(args: list[str], cwd: Path) -> str:
    run = subprocess.run(args, check=False, cwd=cwd, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    return out


@needs_iasl
@pytest.mark.parametrize("platform", [*PLATFORMS, AcpiPlatform(cpus=MAX_CPUS)])
def test_iasl_disassembles_and_recompiles_identically(platform: AcpiPlatform,
                                                      tmp_path: Path) -> None:
    for sig, blob in _by_sig(build_acpi(platform)).items():
        if sig == "RSD PTR ":
            continue  # no header iasl -d recognises; see test_iasl_compiles_same_rsdp
        stem = sig.lower()
        (tmp_path / f"{stem}.dat").write_bytes(blob)
        out = _run(["iasl", "-d", f"{stem}.dat"], tmp_path)
        assert not re.search(r"(?i)\b(error|warning)", out), out
        dsl = (tmp_path / f"{stem}.dsl").read_text()
        assert not re.search(r"(?i)incorrect|invalid|unknown", dsl), sig
        # -oa keeps the disassembled names and integers exactly as written
        out = _run(["iasl", "-oa", f"{stem}.dsl"], tmp_path)
        assert re.search(r"\b0 Errors, 0 Warnings, 0 Remarks", out), out
        again = (tmp_path / f"{stem}.aml").read_bytes()
        if sig == "FACS":
            assert again == blob
        else:  # the compiler stamps its own creator id (and so checksum)
            assert again[:9] + again[10:28] + again[36:] == blob[:9] + blob[10:28] + blob[36:]


@needs_iasl
def test_iasl_compiles_same_rsdp(tmp_path: Path) -> None:
    tables = build_acpi(FULL)
    rsdp = _by_sig(tables)["RSD PTR "]
    rsdt, length, xsdt = struct.unpack_from("<IIQ", rsdp, 16)
    (tmp_path / "rsdp.asl").write_text(
        '[0008] Signature : "RSD PTR "\n[0001] Checksum : 00\n'
        '[0006] Oem ID : "PYHV  "\n[0001] Revision : 02\n'
        f"[0004] RSDT Address : {rsdt:08X}\n[0004] Length : {length:08X}\n"
        f"[0008] XSDT Address : {xsdt:016X}\n[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n")
    out = _run(["iasl", "rsdp.asl"], tmp_path)
    assert re.search(r"\b0 Errors, 0 Warnings", out), out
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


@needs_acpiexec
def test_acpiexec_evaluates_dsdt(tmp_path: Path) -> None:
    sigs = _by_sig(build_acpi(FULL))
    files = []
    for sig in ("FACS", "FACP", "DSDT", "APIC", "MCFG"):
        files.append(f"{sig.lower()}.dat")
        (tmp_path / files[-1]).write_bytes(sigs[sig])
    uuid = "(5b 4d db 33 f7 1f 1c 40 96 57 74 41 c0 3d d7 66)"
    caps = "(00 00 00 00 1f 00 00 00 1d 00 00 00)"
    commands = "; ".join([
        r"evaluate \_S5",
        r"evaluate \_SB.COM1._CRS",
        rf"execute \_SB.PCI0._OSC {uuid} 1 3 {caps}",
        rf"execute \_SB.PCI0._OSC {uuid.replace('5b', '00', 1)} 1 3 {caps}",
    ])
    out = _run(["acpiexec", "-b", commands, *files], tmp_path)
    assert "ACPI Error" not in out and "ACPI Warning" not in out, out
    s5 = out.split(r"Evaluating \_S5", 1)[1]
    values = re.findall(r"\[Integer\] = ([0-9A-F]+)", s5)[:4]
    assert [int(v, 16) for v in values] == [layout.S5_SLP_TYP, layout.S5_SLP_TYP, 0, 0]
    assert "47 01 F8 03 F8 03 01 08 22 10 00 79 00" in out  # IO 0x3F8/8, IRQ 4
    osc = re.findall(r"\[Buffer\] Length 0C = +0000: ([0-9A-F ]{35})", out)
    assert osc == ["00 00 00 00 1F 00 00 00 1D 00 00 00",  # everything granted
                   "04 00 00 00 1F 00 00 00 1D 00 00 00"]  # unrecognised UUID
