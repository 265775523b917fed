"""A small encoder for ACPI Machine Language (AML), the DSDT's byte code.

Every function returns the encoded bytes of one AML term; terms compose by
passing their bytes to an enclosing term (``scope``, ``device``, ``method``).
Data arguments (:data:`DataLike`) may be Python ``int`` (encoded as the
smallest integer form), ``str`` (an AML string) or already-encoded ``bytes``.
The grammar is that of the ACPI specification, section 20 ("ACPI Machine
Language Specification"); resource descriptors follow section 6.4.
"""

from __future__ import annotations

import struct

from pyhv.engine.errors import EngineError


class AcpiError(EngineError):
    """ACPI or MP tables could not be built (bad input, tables do not fit)."""


DataLike = int | str | bytes

# ---- opcodes (ACPI spec 20.3) ---------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
CREATE_DWORD_FIELD_OP = 0x8A
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4

_MAX_PKG_LENGTH = (1 << 28) - 1
_NAME_LEAD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _NAME_LEAD | frozenset("0123456789")


# ---- package length and names ---------------------------------------------
def pkg_length(body_len: int) -> bytes:
    """The PkgLength for ``body_len`` bytes that follow it (length counts itself)."""
    for n in (1, 2, 3, 4):
        total = body_len + n
        if n == 1 and total <= 0x3F:
            return bytes([total])
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            rest = (total >> 4).to_bytes(n - 1, "little")
            return bytes([((n - 1) << 6) | (total & 0x0F)]) + rest
    raise AcpiError(f"AML package too long ({body_len} bytes, max {_MAX_PKG_LENGTH})")


def _with_pkg_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg; shorter names are padded with ``_``."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _NAME_LEAD or not set(seg) <= _NAME_CHARS:
        raise AcpiError(f"invalid ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: ``\\`` for the root, ``^`` per parent, segments joined by ``.``."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    if not rest:
        if prefix == bytes([ROOT_CHAR]):
            return prefix + b"\x00"  # the root itself: RootChar NullName
        raise AcpiError(f"invalid ACPI name {path!r}")
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AcpiError(f"ACPI name {path!r} has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# ---- data objects -----------------------------------------------------------
def integer(value: int) -> bytes:
    """An integer in its shortest form (Zero, One, Ones, Byte..QWord prefix)."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 0 or value >= 1 << 64:
        raise AcpiError(f"AML integer {value} out of range")
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A null-terminated ASCII string."""
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise AcpiError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def data(value: DataLike) -> bytes:
    """Encode an ``int`` or ``str``; ``bytes`` pass through as encoded AML."""
    if isinstance(value, bool):
        return integer(int(value))
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


def buffer(contents: bytes) -> bytes:
    """A Buffer object initialised with ``contents``."""
    return bytes([BUFFER_OP]) + _with_pkg_length(integer(len(contents)) + contents)


def package(*elements: DataLike) -> bytes:
    """A Package of up to 255 data elements."""
    if len(elements) > 255:
        raise AcpiError("AML Package has more than 255 elements")
    body = bytes([len(elements)]) + b"".join(data(e) for e in elements)
    return bytes([PACKAGE_OP]) + _with_pkg_length(body)


def eisa_id(text: str) -> int:
    """The 32-bit compressed EISA id of e.g. ``"PNP0A08"`` (ASL ``EISAID``)."""
    if (len(text) != 7 or not all("A" <= c <= "Z" for c in text[:3])
            or any(c not in "0123456789ABCDEF" for c in text[3:])):
        raise AcpiError(f"invalid EISA id {text!r}")
    vendor = 0
    for c in text[:3]:
        vendor = (vendor << 5) | (ord(c) - 0x40)
    raw = vendor.to_bytes(2, "big") + int(text[3:], 16).to_bytes(2, "big")
    return int.from_bytes(raw, "little")


def uuid_buffer(text: str) -> bytes:
    """A 16-byte Buffer holding a UUID in ACPI (``ToUUID``) byte order: the first
    three fields little-endian, the rest as written (``uuid.UUID(text).bytes_le``,
    without importing :mod:`uuid`, which costs ~2 ms of start-up)."""
    parts = text.split("-")
    digits = "".join(parts)
    if ([len(p) for p in parts] != [8, 4, 4, 4, 12]
            or any(c not in "0123456789abcdefABCDEF" for c in digits)):
        raise AcpiError(f"invalid UUID {text!r}")
    raw = bytes.fromhex(digits)
    return buffer(raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:])


# ---- named objects and scopes ----------------------------------------------
def name(path: str, value: DataLike) -> bytes:
    """``Name(path, value)``."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope(path) { terms }``."""
    return bytes([SCOPE_OP]) + _with_pkg_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """``Device(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _with_pkg_length(body)


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """``Method(path, nargs, Serialized?, sync_level) { terms }``."""
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise AcpiError(f"invalid Method {path!r}: {nargs} args, sync level {sync_level}")
    flags = nargs | (0x08 if serialized else 0) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + _with_pkg_length(body)


# ---- a few statements and expressions --------------------------------------
def arg(n: int) -> bytes:
    """``ArgN`` (0..6)."""
    if not 0 <= n <= 6:
        raise AcpiError(f"invalid Arg{n}")
    return bytes([ARG0_OP + n])


def local(n: int) -> bytes:
    """``LocalN`` (0..7)."""
    if not 0 <= n <= 7:
        raise AcpiError(f"invalid Local{n}")
    return bytes([LOCAL0_OP + n])


def ref(path: str) -> bytes:
    """A reference to a named object (a bare NameString)."""
    return name_string(path)


def return_(value: DataLike) -> bytes:
    """``Return(value)``."""
    return bytes([RETURN_OP]) + data(value)


def store(source: DataLike, target: bytes) -> bytes:
    """``Store(source, target)``."""
    return bytes([STORE_OP]) + data(source) + target


def _binary(op: int, a: DataLike, b: DataLike, target: bytes | None) -> bytes:
    return bytes([op]) + data(a) + data(b) + (target if target is not None else b"\x00")


def or_(a: DataLike, b: DataLike, target: bytes | None = None) -> bytes:
    """``Or(a, b, target)``; no target means the result is only returned."""
    return _binary(OR_OP, a, b, target)


def and_(a: DataLike, b: DataLike, target: bytes | None = None) -> bytes:
    """``And(a, b, target)``."""
    return _binary(AND_OP, a, b, target)


def lequal(a: DataLike, b: DataLike) -> bytes:
    """``LEqual(a, b)``."""
    return bytes([LEQUAL_OP]) + data(a) + data(b)


def lnot(a: DataLike) -> bytes:
    """``LNot(a)``."""
    return bytes([LNOT_OP]) + data(a)


def if_(predicate: bytes, *terms: bytes) -> bytes:
    """``If(predicate) { terms }``."""
    return bytes([IF_OP]) + _with_pkg_length(predicate + b"".join(terms))


def else_(*terms: bytes) -> bytes:
    """``Else { terms }`` (place right after an ``if_``)."""
    return bytes([ELSE_OP]) + _with_pkg_length(b"".join(terms))


def create_dword_field(source: bytes, byte_index: DataLike, field: str) -> bytes:
    """``CreateDWordField(source, byte_index, field)``."""
    return bytes([CREATE_DWORD_FIELD_OP]) + source + data(byte_index) + name_string(field)


# ---- resource descriptors (ACPI spec 6.4) -----------------------------------
#: general flags of address space descriptors: MinFixed | MaxFixed (producer, positive decode)
_ADDR_FIXED = 0x0C
_RES_MEMORY, _RES_IO, _RES_BUS = 0, 1, 2


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate() { descriptors }``: a Buffer closed by an End Tag."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


def io(minimum: int, maximum: int, alignment: int, length: int, *,
       decode16: bool = True) -> bytes:
    """``IO(Decode16|Decode10, min, max, alignment, length)``."""
    if not (0 <= minimum <= maximum <= 0xFFFF and 0 <= alignment <= 0xFF
            and 0 <= length <= 0xFF):
        raise AcpiError(f"invalid IO descriptor 0x{minimum:x}-0x{maximum:x}")
    return struct.pack("<BBHHBB", 0x47, int(decode16), minimum, maximum, alignment, length)


def _irq_mask(irqs: tuple[int, ...]) -> int:
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise AcpiError(f"ISA IRQ {irq} out of range")
        mask |= 1 << irq
    return mask


def irq_no_flags(*irqs: int) -> bytes:
    """``IRQNoFlags() {irqs}``: ISA IRQs, edge triggered, active high, exclusive."""
    return struct.pack("<BH", 0x22, _irq_mask(irqs))


def irq(*irqs: int, edge: bool = True, active_low: bool = False,
        shared: bool = False) -> bytes:
    """``IRQ(Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {irqs}``."""
    flags = int(edge) | (int(active_low) << 3) | (int(shared) << 4)
    return struct.pack("<BHB", 0x23, _irq_mask(irqs), flags)


def interrupt(*gsis: int, edge: bool = False, active_low: bool = False,
              shared: bool = False, consumer: bool = True) -> bytes:
    """``Interrupt(ResourceConsumer, Level|Edge, ...) {gsis}`` (extended IRQ)."""
    if not 1 <= len(gsis) <= 255 or any(not 0 <= g < 1 << 32 for g in gsis):
        raise AcpiError(f"invalid Interrupt descriptor {gsis}")
    flags = int(consumer) | (int(edge) << 1) | (int(active_low) << 2) | (int(shared) << 3)
    body = bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", g) for g in gsis)
    return struct.pack("<BH", 0x89, len(body)) + body


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed(ReadWrite|ReadOnly, base, length)``."""
    if not (0 <= base < 1 << 32 and 0 <= length < 1 << 32):
        raise AcpiError(f"invalid Memory32Fixed 0x{base:x}+0x{length:x}")
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def _address(tag: int, fmt: str, rtype: int, general: int, specific: int,
             minimum: int, maximum: int, translation: int = 0) -> bytes:
    length = maximum - minimum + 1
    limit = 1 << (8 * struct.calcsize(fmt))
    if not (0 <= minimum <= maximum < limit and 0 <= translation < limit and length <= limit):
        raise AcpiError(f"invalid address descriptor 0x{minimum:x}-0x{maximum:x}")
    body = bytes([rtype, general, specific]) + struct.pack(
        "<" + fmt * 5, 0, minimum, maximum, translation, length % limit)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """``WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, ...)``."""
    return _address(0x88, "H", _RES_BUS, _ADDR_FIXED, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """``WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``."""
    return _address(0x88, "H", _RES_IO, _ADDR_FIXED, 0x03, minimum, maximum)


def _mem_flags(cacheable: bool, prefetchable: bool, writable: bool) -> int:
    kind = 3 if prefetchable else (1 if cacheable else 0)
    return int(writable) | (kind << 1)


def dword_memory(minimum: int, maximum: int, *, cacheable: bool = False,
                 prefetchable: bool = False, writable: bool = True) -> bytes:
    """``DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)``."""
    return _address(0x87, "I", _RES_MEMORY, _ADDR_FIXED,
                    _mem_flags(cacheable, prefetchable, writable), minimum, maximum)


def qword_memory(minimum: int, maximum: int, *, cacheable: bool = False,
                 prefetchable: bool = False, writable: bool = True) -> bytes:
    """``QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)``."""
    return _address(0x8A, "Q", _RES_MEMORY, _ADDR_FIXED,
                    _mem_flags(cacheable, prefetchable, writable), minimum, maximum)
