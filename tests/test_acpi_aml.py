"""The AML encoder, unit by unit and against iasl's own encoding of the same ASL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.engine.acpi import AcpiError, AcpiPlatform, aml
from pyhv.engine.acpi.tables import sdt

needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None,
                                reason="iasl (acpica-tools) is not installed")


def _decode_pkg_length(raw: bytes) -> tuple[int, int]:
    """(length, bytes used) of an encoded PkgLength."""
    extra = raw[0] >> 6
    if extra == 0:
        return raw[0] & 0x3F, 1
    value = raw[0] & 0x0F
    for i in range(extra):
        value |= raw[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@pytest.mark.parametrize("body_len, size", [
    (0, 1), (0x3E, 1), (0x3F, 2), (0xFFD, 2), (0xFFE, 3),
    ((1 << 20) - 4, 3), ((1 << 20) - 3, 4), ((1 << 28) - 5, 4)])
def test_pkg_length_sizes_and_values(body_len: int, size: int) -> None:
    raw = aml.pkg_length(body_len)
    assert len(raw) == size
    assert _decode_pkg_length(raw) == (body_len + size, size)
    if size > 1:
        assert raw[0] & 0x30 == 0  # bits 5:4 of a multi-byte lead byte are reserved


def test_pkg_length_too_long() -> None:
    with pytest.raises(AcpiError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"),
    (0x100, b"\x0b\x00\x01"), (0x10000, b"\x0c\x00\x00\x01\x00"),
    (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ((1 << 64) - 1, b"\xff")])
def test_integer_encodings(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_integer_range() -> None:
    for bad in (-1, 1 << 64):
        with pytest.raises(AcpiError):
            aml.integer(bad)


def test_names() -> None:
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("^^A.B.C") == b"^^\x2f\x03A___B___C___"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("", "TOOLONG", "1ABC", "a", "A-B", "^"):
        with pytest.raises(AcpiError):
            aml.name_string(bad)


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0A03") == 0x030AD041
    assert aml.eisa_id("PNP0501") == 0x0105D041
    for bad in ("PNP050", "pnp0501", "PNP050G"):
        with pytest.raises(AcpiError):
            aml.eisa_id(bad)


def test_strings_packages_buffers() -> None:
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    assert aml.package(5, 5, 0, 0) == b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    assert aml.resource_template() == aml.buffer(b"\x79\x00")
    with pytest.raises(AcpiError):
        aml.package(*range(256))
    with pytest.raises(AcpiError):
        aml.string("a\x00b")


def test_method_flags() -> None:
    m = aml.method("_OSC", 4, aml.return_(aml.arg(3)), serialized=True, sync_level=2)
    assert m == b"\x14\x08_OSC\x2c\xa4\x6b"
    with pytest.raises(AcpiError):
        aml.method("FOO", 8)


def test_resource_descriptor_lengths() -> None:
    assert len(aml.io(0x3F8, 0x3F8, 1, 8)) == 8
    assert len(aml.irq_no_flags(4)) == 3
    assert len(aml.irq(4, edge=False)) == 4
    assert len(aml.memory32_fixed(0, 0x1000)) == 12
    assert len(aml.word_io(0, 0xCF7)) == 3 + 13
    assert len(aml.dword_memory(0, 0xFFFF)) == 3 + 23
    assert len(aml.qword_memory(0, 0xFFFF)) == 3 + 43
    assert len(aml.interrupt(5, 6)) == 3 + 2 + 8
    with pytest.raises(AcpiError):
        aml.irq_no_flags(16)
    with pytest.raises(AcpiError):
        aml.word_io(0x10, 0x0F)


# ---- cross-check against iasl -------------------------------------------------
_ASL = r"""
DefinitionBlock ("", "DSDT", 2, "PYHV  ", "PYHVMACH", 1)
{
    Name (\_S5, Package () {5, 5, 0, 0})
    Name (BIG, 0x123456789A)
    Name (STR, "hello")
    Name (LONG, Buffer () {LONG_BYTES})
    Scope (\_SB)
    {
        Device (DEV0)
        {
            Name (_HID, EISAID ("PNP0C02"))
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0060, 0x0060, 0x01, 0x01)
                IO (Decode10, 0x0064, 0x0064, 0x00, 0x01)
                IRQNoFlags () {1, 12}
                IRQ (Level, ActiveLow, Shared) {5}
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) {9, 17}
                Interrupt (ResourceConsumer, Edge, ActiveLow, Shared) {20}
                Memory32Fixed (ReadWrite, 0xE0000000, 0x10000000)
                Memory32Fixed (ReadOnly, 0xFED00000, 0x400)
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                    0, 0, 0xFF, 0, 0x100)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0, 0x0D00, 0xFFFF, 0, 0xF300)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed,
                    NonCacheable, ReadWrite, 0, 0xC0000000, 0xDFFFFFFF, 0, 0x20000000)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed,
                    Cacheable, ReadOnly, 0, 0x1000, 0x1FFF, 0, 0x1000)
                QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed,
                    Prefetchable, ReadWrite, 0, 0x100000000, 0x1FFFFFFFF, 0, 0x100000000)
            })
            Method (TEST, 2, Serialized)
            {
                CreateDWordField (Arg1, 4, FLD0)
                If (LNot (LEqual (Arg0, ToUUID ("33DB4D5B-1FF7-401C-9657-7441C03DD766"))))
                {
                    Or (FLD0, 0x04, FLD0)
                }
                Else
                {
                    And (FLD0, 0x02, Local0)
                    Store (Local0, FLD0)
                }
                Return (Arg1)
            }
        }
    }
}
"""


def _encoded_dsdt() -> bytes:
    crs = aml.resource_template(
        aml.io(0x60, 0x60, 1, 1),
        aml.io(0x64, 0x64, 0, 1, decode16=False),
        aml.irq_no_flags(1, 12),
        aml.irq(5, edge=False, active_low=True, shared=True),
        aml.interrupt(9, 17),
        aml.interrupt(20, edge=True, active_low=True, shared=True),
        aml.memory32_fixed(0xE0000000, 0x10000000),
        aml.memory32_fixed(0xFED00000, 0x400, writable=False),
        aml.word_bus_number(0, 0xFF),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(0xC0000000, 0xDFFFFFFF),
        aml.dword_memory(0x1000, 0x1FFF, cacheable=True, writable=False),
        aml.qword_memory(0x100000000, 0x1FFFFFFFF, prefetchable=True),
    )
    fld = aml.ref("FLD0")
    test = aml.method(
        "TEST", 2,
        aml.create_dword_field(aml.arg(1), 4, "FLD0"),
        aml.if_(aml.lnot(aml.lequal(
            aml.arg(0), aml.uuid_buffer("33DB4D5B-1FF7-401C-9657-7441C03DD766"))),
            aml.or_(fld, 4, fld)),
        aml.else_(aml.and_(fld, 2, aml.local(0)), aml.store(aml.local(0), fld)),
        aml.return_(aml.arg(1)),
        serialized=True)
    body = b"".join([
        aml.name("\\_S5", aml.package(5, 5, 0, 0)),
        aml.name("BIG", 0x123456789A),
        aml.name("STR", "hello"),
        aml.name("LONG", aml.buffer(b"\x01" + bytes(0x10FF))),
        aml.scope("\\_SB", aml.device(
            "DEV0", aml.name("_HID", aml.integer(aml.eisa_id("PNP0C02"))),
            aml.name("_CRS", crs), test)),
    ])
    return sdt("DSDT", 2, body, AcpiPlatform())


@needs_iasl
def test_encoder_matches_iasl(tmp_path: Path) -> None:
    long_bytes = ", ".join(["1"] + ["0"] * 0x10FF)
    (tmp_path / "ref.asl").write_text(_ASL.replace("LONG_BYTES", long_bytes))
    # -on: names keep the exact form written above (integers are still shortest)
    run = subprocess.run(["iasl", "-on", "ref.asl"], check=False, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b0 Errors, 0 Warnings", run.stdout), run.stdout
    ref = (tmp_path / "ref.aml").read_bytes()
    ours = _encoded_dsdt()
    assert len(ours) == len(ref)
    assert ours[36:] == ref[36:]  # the header differs only in creator id and checksum
