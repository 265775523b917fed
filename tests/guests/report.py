"""Parse the test guest's COM1 report (grammar in tests/guests/README.md).

report = parse_report(serial_text)
assert report.complete
assert report.cmdline == "console=ttyS0 hello"
assert report.initrd.csum == initrd_checksum(initrd_bytes)
assert report.pci_function("00:00.0").vendor == 0x8086    # pyhv.pci
assert report.usb_controller("00:01.2").step("run")["usbcmd"] == 0xC1  # pyhv.usb
assert report.barmoves[0]["at_new"] == report.barmoves[0]["sig"]     # pyhv.barmove
assert report.virtio_function("00:02.0").step("requests")["lens"] == [16, 16, 16, 64]  # pyhv.virtio
"""

from __future__ import annotations

import datetime as _dt
import itertools
import re
import struct
from dataclasses import dataclass, field
from typing import Optional, Union

# tags whose line is the tag and one free-text field (the rest of the line)
RAW_TAGS = {"cmdline", "rtc"}
# fields kept as words although they may look like decimal numbers (hex digits
# without 0x, as lspci writes them: class=060400, caps=10)
WORD_FIELDS = {"pci": {"bdf", "id", "class", "caps"}, "usb": {"bdf"}, "barmove": {"bdf"},
               "virtio": {"bdf", "id"}, "virtio-step": {"serial", "name", "data"}}
# @usb-step fields that are lists of hex numbers (``none``: empty)
USB_LIST_FIELDS = {"portsc", "pages"}
# @virtio-step fields that are lists of numbers (each 0x hex or decimal)
VIRTIO_LIST_FIELDS = {"ids", "lens"}

_ESC = re.compile(r"\\x([0-9a-fA-F]{2})")


def unescape(text: str) -> str:
    r"""Undo the guest's escaping: ``\xHH`` stands for byte HH."""
    raw = bytearray()
    pos = 0
    for m in _ESC.finditer(text):
        raw += text[pos : m.start()].encode("latin-1")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("latin-1")
    return raw.decode("latin-1")


def _value(text: str) -> int | str:
    if re.fullmatch(r"0x[0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    return unescape(text)


def initrd_checksum(data: bytes) -> int:
    """The guest's initrd/module checksum: over little-endian 32-bit words
    (the last one zero-padded) a = sum of words, b = sum of the running a
    after each word, both mod 2**32; the checksum is (b << 32) | a."""
    data = bytes(data) + b"\0" * (-len(data) % 4)
    words = struct.unpack(f"<{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    a = sum(words) & mask
    b = sum(itertools.accumulate(words)) & mask
    return (b << 32) | a


def _int(f: dict[str, int | str], key: str, default: int | None = None) -> int:
    v = f.get(key, default)
    if not isinstance(v, int):
        raise TypeError(f"report field {key}={v!r} is not a number")
    return v


def _opt_int(f: dict[str, int | str], key: str) -> int | None:
    v = f.get(key)
    return v if isinstance(v, int) else None


def _opt_str(f: dict[str, int | str], key: str) -> str | None:
    v = f.get(key)
    return None if v is None else str(v)


@dataclass
class Line:
    tag: str
    fields: dict[str, int | str]
    text: str  # the text after the tag (free text for RAW_TAGS)


@dataclass
class E820:
    addr: int
    size: int
    type: int


@dataclass
class Blob:
    addr: int
    size: int
    csum: int | None  # None when the guest could not read it


@dataclass
class AcpiTable:
    sig: str
    addr: int
    len: int
    revision: int
    checksum_ok: bool | None  # None: not checked (unmapped / absurd length)
    parent: str


@dataclass
class PciBar:
    """A BAR as the guest sized it: the programmed register(s), flag bits included
    (both registers of a 64-bit BAR), and the size the all-ones read-back gave."""

    index: int
    value: int
    size: int

    @property
    def kind(self) -> str:
        """``io``, ``mem32`` or ``mem64`` (from the register's low bits)."""
        if self.value & 1:
            return "io"
        return "mem64" if self.value & 0x6 == 0x4 else "mem32"

    @property
    def prefetchable(self) -> bool:
        return self.kind != "io" and bool(self.value & 0x8)

    @property
    def address(self) -> int:
        return self.value & ~(0x3 if self.kind == "io" else 0xF)


#: a bridge window: (base, limit) inclusive, or None when closed (base above limit)
Window = Optional[tuple[int, int]]


@dataclass
class PciFunction:
    """One ``@pci`` line: a function the guest found walking the buses."""

    bus: int
    slot: int
    function: int
    vendor: int
    device: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface
    header_type: int  # the whole register: bit 7 multifunction, bits 0-6 the layout
    pin: int  # 0 none, 1-4 INTA-INTD
    line: int
    command: int
    bars: dict[int, PciBar] = field(default_factory=dict)
    caps: list[int] = field(default_factory=list)  # capability IDs in list order
    # type 1 (bridge) headers only
    primary: Optional[int] = None
    secondary: Optional[int] = None
    subordinate: Optional[int] = None
    windows: dict[str, Window] = field(default_factory=dict)  # io, mem, pref

    @property
    def bdf(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"

    @property
    def devfn(self) -> int:
        return self.slot << 3 | self.function

    @property
    def layout(self) -> int:
        """Header layout: 0 device, 1 PCI-to-PCI bridge, 2 CardBus bridge."""
        return self.header_type & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.header_type & 0x80)

    @property
    def is_bridge(self) -> bool:
        return self.layout == 1


#: the value of a field of a @usb-step or @virtio-step line
StepValue = Union[int, str, list[int]]


class _Steps:
    """Named steps in report order (``steps``: (name, fields) pairs)."""

    steps: list[tuple[str, dict[str, StepValue]]]

    def _what(self) -> str:
        return repr(self)

    def step(self, name: str) -> dict[str, StepValue]:
        """The fields of the first step called ``name`` (KeyError: not reported)."""
        for n, f in self.steps:
            if n == name:
                return f
        raise KeyError(f"{self._what()}: no step {name!r} in the report")

    def steps_named(self, name: str) -> list[dict[str, StepValue]]:
        return [f for n, f in self.steps if n == name]

    @property
    def step_names(self) -> list[str]:
        return [n for n, _f in self.steps]


@dataclass
class UsbController(_Steps):
    """One ``@usb`` line (a USB host controller the walk found) and the
    ``@usb-step`` lines of its bring-up, in order."""

    index: int
    bdf: str
    kind: str  # uhci | ehci | xhci | ohci | other
    bar: int
    space: str  # io | mem32 | mem64
    base: int
    size: int
    steps: list[tuple[str, dict[str, StepValue]]] = field(default_factory=list)

    def _what(self) -> str:
        return f"{self.bdf} ({self.kind})"


@dataclass
class VirtioFunction(_Steps):
    """One ``@virtio`` line (a modern virtio-pci function the guest's driver ran
    on) and its ``@virtio-step`` lines, in order."""

    index: int
    bdf: str
    id: str  # vendor:device, hex digits
    mode: str  # msix | intx
    steps: list[tuple[str, dict[str, StepValue]]] = field(default_factory=list)

    def _what(self) -> str:
        return f"virtio {self.bdf} ({self.mode})"


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    begun: bool = False
    complete: bool = False  # @end seen
    protocol: str | None = None  # pvh | linux64 | linux32
    info_addr: int | None = None
    bootinfo: dict[str, int | str] = field(default_factory=dict)
    cmdline: str | None = None
    memmap_source: str | None = None
    e820: list[E820] = field(default_factory=list)
    initrd: Blob | None = None
    modules: list[Blob] = field(default_factory=list)
    rsdp: dict[str, int | str] = field(default_factory=dict)
    acpi_tables: list[AcpiTable] = field(default_factory=list)
    fadt: dict[str, int | str] = field(default_factory=dict)
    s5: dict[str, int | str] = field(default_factory=dict)
    cpu_entries: list[dict[str, int | str]] = field(default_factory=list)
    cpu_count: int | None = None
    apic_ids: list[int] = field(default_factory=list)
    lapic_addr: int | None = None
    ioapics: list[dict[str, int | str]] = field(default_factory=list)
    irq_overrides: list[dict[str, int | str]] = field(default_factory=list)
    ap_expected: int | None = None
    ap_started: int | None = None
    rtc: _dt.datetime | None = None
    rtc_text: str | None = None
    waiting: dict[str, int | str] | None = None
    powerbutton: bool = False
    poweroff_methods: list[str] = field(default_factory=list)
    poweroff_failed: bool = False
    reset_method: str | None = None
    reset_failed: bool = False
    errors: list[dict[str, int | str]] = field(default_factory=list)
    exceptions: list[dict[str, int | str]] = field(default_factory=list)
    # pyhv.pci: the configuration mechanism (@pci-config), every function in the
    # order found (depth first), and the totals (@pci-end)
    pci_config: dict[str, int | str] = field(default_factory=dict)
    pci: list[PciFunction] = field(default_factory=list)
    pci_end: dict[str, int | str] = field(default_factory=dict)
    # pyhv.usb: each controller and its steps; pyhv.barmove: one dict per move
    usb: list[UsbController] = field(default_factory=list)
    usb_end: dict[str, int | str] = field(default_factory=dict)
    barmoves: list[dict[str, int | str]] = field(default_factory=list)
    barmove_end: dict[str, int | str] = field(default_factory=dict)
    # pyhv.virtio: each function the driver ran on and its steps
    virtio: list[VirtioFunction] = field(default_factory=list)
    virtio_end: dict[str, int | str] = field(default_factory=dict)

    def pci_function(self, bdf: str) -> Optional[PciFunction]:
        """The function the guest found at ``bdf`` (``00:02.0``), if any."""
        return next((f for f in self.pci if f.bdf == bdf), None)

    def usb_controller(self, bdf: str) -> Optional[UsbController]:
        """The USB host controller the guest brought up at ``bdf``, if any."""
        return next((c for c in self.usb if c.bdf == bdf), None)

    def virtio_function(self, bdf: str) -> Optional[VirtioFunction]:
        """The virtio function the guest's driver ran on at ``bdf``, if any."""
        return next((v for v in self.virtio if v.bdf == bdf), None)

    def table(self, sig: str) -> AcpiTable | None:
        """The first ACPI table with that signature."""
        return next((t for t in self.acpi_tables if t.sig == sig), None)

    def tagged(self, tag: str) -> list[Line]:
        return [ln for ln in self.lines if ln.tag == tag]


def parse_line(text: str) -> Line | None:
    """One report line (leading/trailing noise allowed) or None."""
    text = text.lstrip("\r\0 \t").rstrip("\r\n")
    if not text.startswith("@"):
        return None
    text = text[1:]
    tag, _, rest = text.partition(" ")
    if not tag:
        return None
    fields: dict[str, int | str] = {}
    if tag not in RAW_TAGS:
        words = WORD_FIELDS.get(tag, set())
        for tok in rest.split():
            k, eq, v = tok.partition("=")
            if eq:
                fields[k] = unescape(v) if k in words else _value(v)
    return Line(tag, fields, rest)


def parse_report(text: str | bytes) -> Report:
    """Parse the guest's serial output (other text in it is ignored)."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    rep = Report()
    lines = text.splitlines()
    if lines and not text.endswith(("\n", "\r")):
        lines.pop()  # a line still being written (the machine was stopped mid-line)
    for raw in lines:
        # a line belongs to the report when '@' starts it (leading carriage
        # returns, NULs and blanks aside); everything else is noise
        ln = parse_line(raw)
        if ln is None:
            continue
        rep.lines.append(ln)
        f = ln.fields
        t = ln.tag
        if t == "begin":
            rep.begun = True
            rep.protocol = _opt_str(f, "protocol")
            rep.info_addr = _opt_int(f, "info")
        elif t == "bootinfo":
            rep.bootinfo = f
        elif t == "cmdline":
            rep.cmdline = unescape(ln.text)
        elif t == "memmap":
            rep.memmap_source = _opt_str(f, "source")
        elif t == "e820":
            rep.e820.append(E820(_int(f, "addr"), _int(f, "size"), _int(f, "type")))
        elif t == "initrd":
            if f.get("addr") != "none":
                rep.initrd = _blob(f)
        elif t == "module":
            rep.modules.append(_blob(f))
        elif t == "acpi-rsdp":
            rep.rsdp = f
        elif t == "acpi-table":
            if "sig" in f:
                ck = f.get("checksum")
                rep.acpi_tables.append(
                    AcpiTable(
                        sig=str(f["sig"]),
                        addr=_int(f, "addr"),
                        len=_int(f, "len"),
                        revision=_int(f, "revision", 0),
                        checksum_ok=None if ck == "skipped" else ck == "ok",
                        parent=str(f.get("parent")),
                    )
                )
            else:
                rep.errors.append({"what": "acpi-table-unreadable", **f})
        elif t == "acpi-fadt":
            rep.fadt = f
        elif t == "acpi-s5":
            rep.s5 = f
        elif t == "cpu":
            rep.cpu_entries.append(f)
        elif t == "cpus":
            rep.cpu_count = _opt_int(f, "count")
            ids = f.get("apic_ids", "")
            rep.apic_ids = [int(x) for x in str(ids).split(",") if x != ""]
            rep.lapic_addr = _opt_int(f, "lapic")
        elif t == "ioapic":
            rep.ioapics.append(f)
        elif t == "irq-override":
            rep.irq_overrides.append(f)
        elif t == "ap":
            rep.ap_expected = _opt_int(f, "expected")
            rep.ap_started = _opt_int(f, "started")
        elif t == "rtc":
            rep.rtc_text = ln.text.strip()
            try:
                rep.rtc = _dt.datetime.strptime(rep.rtc_text, "%Y-%m-%d %H:%M:%S")
            except ValueError:
                rep.rtc = None
        elif t == "end":
            rep.complete = True
        elif t == "waiting":
            rep.waiting = f
        elif t == "powerbutton":
            rep.powerbutton = True
        elif t == "poweroff":
            rep.poweroff_methods.append(str(f.get("method")))
        elif t == "poweroff-failed":
            rep.poweroff_failed = True
        elif t == "reset":
            rep.reset_method = str(f.get("method"))
        elif t == "reset-failed":
            rep.reset_failed = True
        elif t == "pci-config":
            rep.pci_config = f
        elif t == "pci":
            rep.pci.append(parse_pci(f))
        elif t == "pci-end":
            rep.pci_end = f
        elif t == "usb":
            rep.usb.append(UsbController(
                index=_int(f, "hc"), bdf=str(f["bdf"]), kind=str(f["kind"]),
                bar=_int(f, "bar"), space=str(f["space"]), base=_int(f, "base"),
                size=_int(f, "size")))
        elif t == "usb-step":
            hc = next((c for c in rep.usb if c.index == f.get("hc")), None)
            if hc is None:
                rep.errors.append({"what": "usb-step-without-controller", **f})
            else:
                hc.steps.append((str(f.get("step")),
                                 _step_fields(f, ("hc", "step"), USB_LIST_FIELDS, _hex_list)))
        elif t == "usb-end":
            rep.usb_end = f
        elif t == "barmove":
            rep.barmoves.append(f)
        elif t == "barmove-end":
            rep.barmove_end = f
        elif t == "virtio":
            rep.virtio.append(VirtioFunction(
                index=_int(f, "dev"), bdf=str(f["bdf"]), id=str(f["id"]), mode=str(f["mode"])))
        elif t == "virtio-step":
            dev = next((v for v in rep.virtio if v.index == f.get("dev")), None)
            if dev is None:
                rep.errors.append({"what": "virtio-step-without-function", **f})
            else:
                dev.steps.append((str(f.get("step")), _step_fields(
                    f, ("dev", "step"), VIRTIO_LIST_FIELDS, _list_value)))
        elif t == "virtio-end":
            rep.virtio_end = f
        elif t == "error":
            rep.errors.append(f)
        elif t == "exception":
            rep.exceptions.append(f)
    return rep


def _hex_list(text: str) -> list[int]:
    """``a,b,c`` of hex digits (``0x`` optional)."""
    return [int(x, 16) for x in text.split(",")]


def _list_value(text: str) -> list[int]:
    """``a,b,c`` each ``0x`` hex or decimal."""
    out = []
    for x in text.split(","):
        v = _value(x)
        if not isinstance(v, int):
            raise ValueError(f"list element {x!r} of {text!r} is not a number")
        out.append(v)
    return out


def _step_fields(f: dict[str, int | str], skip: tuple[str, ...], lists: set[str],
                 parse_list) -> dict[str, StepValue]:
    """A step line's fields without ``skip``; ``lists`` fields as lists of numbers
    (``none``: empty; one element arrives already parsed as a number)."""
    out: dict[str, StepValue] = {}
    for k, v in f.items():
        if k in skip:
            continue
        if k in lists:
            if isinstance(v, int):
                out[k] = [v]
            else:
                out[k] = [] if v == "none" else parse_list(v)
        else:
            out[k] = v
    return out


def _blob(f: dict[str, int | str]) -> Blob:
    csum = f.get("csum")
    return Blob(
        _int(f, "addr"), _int(f, "size"), csum if isinstance(csum, int) else None
    )


def _window(text: int | str | None) -> Window:
    if text is None or text == "closed":
        return None
    base, dash, limit = str(text).partition("-")
    if not dash:
        raise ValueError(f"bridge window {text!r} is not BASE-LIMIT or closed")
    return int(base, 16), int(limit, 16)


def parse_pci(f: dict[str, int | str]) -> PciFunction:
    """The fields of one ``@pci`` line as a :class:`PciFunction`."""
    bus, _, rest = str(f["bdf"]).partition(":")
    slot, _, fn = rest.partition(".")
    vendor, _, device = str(f["id"]).partition(":")
    caps = str(f.get("caps", "none"))
    bars = {}
    for k, v in f.items():
        if k.startswith("bar") and k[3:].isdigit():
            value, plus, size = str(v).partition("+")
            if not plus:
                raise ValueError(f"{k}={v!r} is not VALUE+SIZE")
            bars[int(k[3:])] = PciBar(int(k[3:]), int(value, 16), int(size, 16))
    out = PciFunction(
        bus=int(bus, 16), slot=int(slot, 16), function=int(fn),
        vendor=int(vendor, 16), device=int(device, 16),
        class_code=int(str(f["class"]), 16), header_type=_int(f, "hdr"),
        pin=_int(f, "pin"), line=_int(f, "line"), command=_int(f, "cmd"),
        bars=bars, caps=[] if caps == "none" else [int(c, 16) for c in caps.split(",")],
    )
    if "sec" in f:
        out.primary, out.secondary, out.subordinate = (
            _int(f, "pri"), _int(f, "sec"), _int(f, "sub"))
        out.windows = {k: _window(f.get(k)) for k in ("io", "mem", "pref")}
    return out
