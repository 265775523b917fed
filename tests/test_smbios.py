"""SMBIOS tables (pyhv/engine/smbios.py), libvirt's <sysinfo>/<os><smbios>, the
shim's -smbios, and what a guest finds in the BIOS scan area."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import uuid as uuidlib
from pathlib import Path

import pytest

from pyhv import __version__
from pyhv.config import ConfigError, KernelBoot, SerialConfig, SmbiosConfig, VmConfig
from pyhv.domxml import DomainXmlError, map_domain, parse_domain, to_xml
from pyhv.domxml import schema as domschema
from pyhv.engine import layout
from pyhv.engine.acpi.tables import build_acpi
from pyhv.engine.builder import acpi_description
from pyhv.engine.smbios import (
    SmbiosError,
    build_smbios,
    dmidecode_dump,
    host_fields,
    smbios_description,
)
from pyhv.placement import place
from pyhv.shim.errors import ShimError
from pyhv.shim.mapping import build

UUID = "1c8a1f6e-4c7a-4a28-9a3c-5e5b1d0f2a77"
NOVA = (("manufacturer", "OpenStack Foundation"), ("product", "OpenStack Nova"),
        ("version", "27.0.0"), ("serial", "1c8a1f6e-serial"), ("uuid", UUID),
        ("family", "Virtual Machine"))
#: CPUID leaf 0 (GenuineIntel) and leaf 1 of the boot vCPU
CPUID = [(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
         (1, 0, 0, 0x906EA, 0x800, 0, 0x1F8BFBFF)]


def nova_cfg(**kw: object) -> VmConfig:
    sm = SmbiosConfig(mode="sysinfo", system=NOVA, chassis=(("asset", "OpenStack Nova"),),
                      oem_strings=("myapp:1", "myapp:1", ""))
    return VmConfig(boot=KernelBoot("/k"), uuid=UUID, smbios=sm, **kw)  # type: ignore[arg-type]


def walk(table: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """(type, handle, formatted area, strings) of every structure; checks the framing."""
    out, pos = [], 0
    while pos < len(table):
        stype, length, handle = struct.unpack_from("<BBH", table, pos)
        assert length >= 4
        end = table.index(b"\0\0", pos + length) + 2
        raw = table[pos + length:end - 2]
        strings = raw.split(b"\0") if raw else []
        assert all(strings), "an empty string in a string set"
        out.append((stype, handle, table[pos:pos + length], strings))
        pos = end
        if stype == 127:
            break
    assert pos == len(table)
    return out


def string(area: bytes, strings: list[bytes], offset: int) -> str:
    n = area[offset]
    return strings[n - 1].decode() if n else ""


# ---- the tables ----------------------------------------------------------------------

def test_entry_points_and_checksums() -> None:
    t = build_smbios(smbios_description(nova_cfg(), 1, 1, 1, CPUID))
    assert t.base == layout.SMBIOS_ADDR and t.base % 16 == 0
    assert layout.SMBIOS_SCAN_START <= t.base < layout.SMBIOS_SCAN_END
    ep = t.entry3
    assert ep[:5] == b"_SM3_" and len(ep) == ep[6] == 0x18 and sum(ep) % 256 == 0
    assert (ep[7], ep[8]) == (3, 0)
    max_size, addr = struct.unpack_from("<IQ", ep, 0xC)
    assert (addr, max_size) == (t.table_addr, len(t.table))
    ep2 = t.entry2
    assert ep2[:4] == b"_SM_" and ep2[0x10:0x15] == b"_DMI_" and len(ep2) == ep2[5] == 0x1F
    assert sum(ep2) % 256 == 0 and sum(ep2[0x10:]) % 256 == 0
    tlen, taddr, count = struct.unpack_from("<HIH", ep2, 0x16)
    assert (tlen, taddr, count) == (len(t.table), t.table_addr, t.count)
    structs = walk(t.table)
    assert len(structs) == t.count
    assert [h for _t, h, _a, _s in structs] == list(range(t.count))
    assert struct.unpack_from("<H", ep2, 8)[0] == max(
        len(a) + sum(len(s) + 1 for s in st) + (1 if st else 2) for _t, _h, a, st in structs)
    # the tables sit above the ACPI tables and inside the reserved e820 range
    assert t.table_addr + len(t.table) <= layout.SMBIOS_END
    acpi = build_acpi(acpi_description(nova_cfg(vcpus=8)))
    assert max(a + len(b) for a, b in acpi.blobs) <= t.base
    reserved = [e for e in layout.e820_map(64 << 20) if e.type == layout.E820_RESERVED]
    assert any(e.addr <= t.base and t.table_addr + len(t.table) <= e.end for e in reserved)


def test_structures() -> None:
    t = build_smbios(smbios_description(nova_cfg(memory=40 << 30, vcpus=8), 2, 2, 2, CPUID))
    structs = walk(t.table)
    types = [s[0] for s in structs]
    assert types == [0, 1, 2, 3, 4, 4, 11, 16, 17, 17, 17, 19, 19, 32, 127]
    lengths = {0: 0x18, 1: 0x1B, 2: 0x0F, 3: 0x16, 4: 0x30, 11: 5, 16: 0x17, 17: 0x28,
               19: 0x1F, 32: 0x0B, 127: 4}
    assert all(len(a) == lengths[ty] for ty, _h, a, _s in structs)
    by = {ty: (a, s) for ty, _h, a, s in reversed(structs)}
    a, s = by[1]
    assert [string(a, s, o) for o in (4, 5, 6, 7, 0x19, 0x1A)] == [
        "OpenStack Foundation", "OpenStack Nova", "27.0.0", "1c8a1f6e-serial", "",
        "Virtual Machine"]
    # SMBIOS 2.6+ byte order: time_low, time_mid, time_hi little-endian
    assert a[8:24] == bytes.fromhex("6e1f8a1c7a4c284a9a3c5e5b1d0f2a77")
    a, s = by[0]
    assert string(a, s, 4) == "pyhv" and a[0x13] & 0x10  # "virtual machine"
    a, s = by[3]
    assert a[5] == 1 and string(a, s, 8) == "OpenStack Nova"
    a2, _s2 = by[2]
    assert struct.unpack_from("<H", a2, 0xB)[0] == 3  # the chassis' handle
    a, s = by[4]
    assert string(a, s, 4) == "CPU 0" and string(a, s, 7) == "Intel"
    assert struct.unpack_from("<II", a, 8) == (0x906EA, 0x1F8BFBFF)
    assert (a[0x23], a[0x25]) == (2, 4)  # cores, threads per socket
    a, s = by[11]
    assert a[4] == 3 and len(s) == 3 and s[:2] == [b"myapp:1", b"myapp:1"]
    a16 = by[16][0]
    assert struct.unpack_from("<IHH", a16, 7) == (40 << 20, 0xFFFE, 3)
    sizes = [struct.unpack_from("<H", a, 0xC)[0] for ty, _h, a, _s in structs if ty == 17]
    assert sizes == [16384, 16384, 8192]
    ranges = [struct.unpack_from("<II", a, 4) for ty, _h, a, _s in structs if ty == 19]
    assert ranges == [(0, (3 << 20) - 1), (4 << 20, (41 << 20) - 1)]


def test_defaults_follow_the_machine() -> None:
    for machine, product in (("pc-i440fx-7.2", "Standard PC (i440FX + PIIX, 1996)"),
                             ("q35", "Standard PC (Q35 + ICH9, 2009)")):
        cfg = VmConfig(boot=KernelBoot("/k"), machine=machine, uuid=UUID)
        d = smbios_description(cfg, 1, 1, 1)
        assert d.system == {"manufacturer": "pyhv", "product": product, "version": machine}
        assert d.uuid == uuidlib.UUID(UUID).bytes
    # no uuid: the field is all zeros ("not set"); sysinfo ignored unless mode says so
    cfg = VmConfig(boot=KernelBoot("/k"), smbios=SmbiosConfig(mode="emulate", system=NOVA))
    d = smbios_description(cfg, 1, 1, 1)
    assert d.system["manufacturer"] == "pyhv" and d.uuid is None
    t = walk(build_smbios(smbios_description(VmConfig(boot=KernelBoot("/k")), 1, 1, 1)).table)
    assert t[1][2][8:24] == bytes(16)


def test_host_mode(tmp_path: Path) -> None:
    (tmp_path / "sys_vendor").write_text("Dell Inc.\n")
    (tmp_path / "product_name").write_text("PowerEdge R650\n")
    (tmp_path / "bios_vendor").write_text("Dell Inc.\n")
    bios, system = host_fields(str(tmp_path))
    assert system == {"manufacturer": "Dell Inc.", "product": "PowerEdge R650"}
    assert bios == {"vendor": "Dell Inc."}
    cfg = VmConfig(boot=KernelBoot("/k"), smbios=SmbiosConfig(mode="host"))
    d = smbios_description(cfg, 1, 1, 1, dmi_dir=str(tmp_path))
    assert d.system["product"] == "PowerEdge R650"
    with pytest.raises(SmbiosError, match="host's DMI values are not readable"):
        smbios_description(cfg, 1, 1, 1, dmi_dir=str(tmp_path / "none"))


def test_too_large_is_refused() -> None:
    sm = SmbiosConfig(mode="sysinfo", oem_strings=tuple("x" * 200 for _ in range(200)))
    with pytest.raises(SmbiosError, match="do not fit"):
        build_smbios(smbios_description(VmConfig(boot=KernelBoot("/k"), smbios=sm), 1, 1, 1))


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="smbios system: unknown field.*colour"):
        SmbiosConfig(system=(("colour", "blue"),))
    with pytest.raises(ConfigError, match="not a UUID"):
        SmbiosConfig(system=(("uuid", "nope"),))


@pytest.mark.skipif(not shutil.which("dmidecode"), reason="dmidecode is not installed "
                    "(scripts/setup installs it)")
def test_dmidecode_reads_the_tables(tmp_path: Path) -> None:
    t = build_smbios(smbios_description(nova_cfg(memory=1 << 30, vcpus=2), 1, 2, 1, CPUID))
    dump = tmp_path / "dmi.bin"
    dump.write_bytes(dmidecode_dump(t))

    def dmi(*args: str) -> str:
        r = subprocess.run(["dmidecode", "--from-dump", str(dump), *args],
                           capture_output=True, text=True, check=True)
        return r.stdout.strip()

    assert dmi("-s", "system-manufacturer") == "OpenStack Foundation"
    assert dmi("-s", "system-product-name") == "OpenStack Nova"
    assert dmi("-s", "system-serial-number") == "1c8a1f6e-serial"
    assert dmi("-s", "system-uuid") == UUID
    assert dmi("-s", "chassis-asset-tag") == "OpenStack Nova"
    assert dmi("-s", "bios-vendor") == "pyhv"
    full = dmi()
    assert "SMBIOS 3.0.0 present." in full and "Invalid" not in full
    assert "String 1: myapp:1" in full and "Core Count: 2" in full
    assert "Maximum Capacity: 1 GB" in full and "Size: 1 GB" in full


# ---- domain XML ----------------------------------------------------------------------

SYSINFO = f"""<sysinfo type='smbios'>
  <bios><entry name='vendor'>ACME</entry><entry name='release'>1.2</entry></bios>
  <system>{''.join(f"<entry name='{k}'>{v}</entry>" for k, v in NOVA)}</system>
  <baseBoard><entry name='manufacturer'>Board Co</entry></baseBoard>
  <chassis><entry name='asset'>OpenStack Nova</entry></chassis>
  <oemStrings><entry>a,b</entry><entry>c</entry></oemStrings>
</sysinfo>"""


def domain(sysinfo: str = SYSINFO, smbios: str = "<smbios mode='sysinfo'/>",
           uuid: str = UUID) -> bytes:
    return f"""<domain type='kvm'><name>nova</name><uuid>{uuid}</uuid>
<memory unit='MiB'>64</memory><vcpu>1</vcpu>{sysinfo}
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k</kernel>{smbios}</os>
</domain>""".encode()


def test_domain_sysinfo_maps_and_round_trips() -> None:
    cfg = parse_domain(domain())
    sm = cfg.smbios
    assert sm.mode == "sysinfo" and sm.system == NOVA
    assert sm.bios == (("vendor", "ACME"), ("release", "1.2"))
    assert sm.baseboards == ((("manufacturer", "Board Co"),),)
    assert sm.oem_strings == ("a,b", "c")
    xml = to_xml(cfg)
    if domschema.available():
        from lxml import etree

        assert domschema.schema_error(etree.fromstring(xml.encode()).getroottree()) is None
    assert parse_domain(xml.encode()) == place(cfg)
    for mode in ("emulate", "host"):
        again = parse_domain(to_xml(parse_domain(domain(smbios=f"<smbios mode='{mode}'/>"))))
        assert again.smbios.mode == mode
    assert parse_domain(domain(sysinfo="", smbios="")).smbios == SmbiosConfig()


@pytest.mark.parametrize("xml,needles", [
    (domain(sysinfo=SYSINFO.replace("name='family'", "name='colour'")),
     ["/domain/sysinfo", "colour"]),
    (domain(sysinfo="<sysinfo type='fwcfg'><entry name='opt/x'>y</entry></sysinfo>"),
     ["/domain/sysinfo", "fwcfg"]),
    (domain(sysinfo=""), ["/domain/os/smbios", "needs a <sysinfo"]),
    (domain(uuid="00000000-0000-0000-0000-000000000001"), ["/domain/sysinfo", "differs"]),
    (domain(smbios="<smbios mode='magic'/>"), ["/domain/os/smbios"]),
])
def test_domain_errors(xml: bytes, needles: list[str]) -> None:
    # pyhv's own checks (libvirt's schema, when installed, answers some first)
    with pytest.raises(DomainXmlError) as e:
        map_domain(xml, validate=False)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    with pytest.raises(DomainXmlError) as e:
        parse_domain(xml)
    assert "\n" not in str(e.value) and "/domain" in str(e.value), str(e.value)


def test_domxml_check_describes_it(tmp_path: Path) -> None:
    import io

    from pyhv.domxml.check import run_check

    path = tmp_path / "nova.xml"
    path.write_bytes(domain())
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(path), out, err) == 0, err.getvalue()
    line = next(x for x in out.getvalue().splitlines() if x.startswith("smbios:"))
    assert "sysinfo" in line and "'OpenStack Nova'" in line and "2 OEM string(s)" in line


# ---- pyhv-qemu -----------------------------------------------------------------------

HEAD = ["-machine", "pc-i440fx-7.2,usb=off", "-accel", "kvm", "-m", "64",
        "-uuid", UUID, "-display", "none", "-nodefaults", "-kernel", "/boot/vmlinuz"]
#: what libvirt 9.0 passes for <sysinfo> (tests/qemuxml2argvdata/smbios.args)
LIBVIRT_SMBIOS = [
    "-smbios", "type=0,vendor=LENOVO,version=6FET82WW (3.12 ),release=1.2",
    "-smbios", "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,"
               f"version=27.0.0,serial=abc,uuid={UUID},family=Virtual Machine",
    "-smbios", "type=2,manufacturer=Hewlett-Packard,product=0B4Ch,location=Upside down",
    "-smbios", "type=3,manufacturer=Lenovo,asset=OpenStack Nova,sku=Type3 SKU",
    "-smbios", "type=11,value=Hello,value=World,value=With,,Commas",
]


def test_shim_maps_libvirt_smbios() -> None:
    cfg = build(HEAD + LIBVIRT_SMBIOS).config
    assert cfg is not None and cfg.uuid == UUID
    sm = cfg.smbios
    assert dict(sm.system)["product"] == "OpenStack Nova"
    assert dict(sm.bios) == {"vendor": "LENOVO", "version": "6FET82WW (3.12 )",
                             "release": "1.2"}
    assert sm.baseboards == ((("manufacturer", "Hewlett-Packard"), ("product", "0B4Ch"),
                              ("location", "Upside down")),)
    assert dict(sm.chassis)["asset"] == "OpenStack Nova"
    assert sm.oem_strings == ("Hello", "World", "With,Commas")
    d = smbios_description(cfg, 1, 1, 1)
    assert d.system["product"] == "OpenStack Nova" and d.chassis["sku"] == "Type3 SKU"
    more = build(HEAD + ["-smbios", "type=4,sock_pfx=Socket,max-speed=3000",
                         "-smbios", "type=17,loc_pfx=Bank,speed=4800",
                         "-smbios", "type=0,uefi=off"]).config
    assert more is not None and dict(more.smbios.memory) == {"loc_pfx": "Bank",
                                                             "speed": "4800"}
    assert dict(more.smbios.processor)["sock_pfx"] == "Socket"


@pytest.mark.parametrize("arg,needle", [
    ("type=1,colour=blue", "invalid parameter 'colour'"),
    ("type=11,value=a,path=/x", "invalid parameter 'path'"),
    ("type=9,foo=bar", "SMBIOS type 9 is not supported"),
    ("file=/tmp/x.bin", "binary files"),
    ("type=1,uuid=zzz", "invalid UUID"),
])
def test_shim_smbios_errors(arg: str, needle: str) -> None:
    with pytest.raises(ShimError) as e:
        build(HEAD + ["-smbios", arg])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- a guest reads them --------------------------------------------------------------

def _system_line(output: str) -> dict[str, str]:
    m = re.search(r"^@smbios-system (.*)$", output, re.M)
    assert m, output[-2000:]
    from guests.report import unescape

    return {k: unescape(v) for k, v in re.findall(r"(\w+)=(\S*)", m.group(1))}


@pytest.mark.kvm
@pytest.mark.parametrize("image", ["pvh_elf", "bzimage"])
def test_guest_finds_the_tables(guests, tmp_path: Path, image: str) -> None:
    from engine_helpers import run_config

    out = tmp_path / "out.txt"
    cfg = nova_cfg(memory=64 << 20, vcpus=2)
    cfg = VmConfig(boot=KernelBoot(str(getattr(guests, image)), None, "pyhv.smbios"),
                   uuid=cfg.uuid, memory=cfg.memory, vcpus=cfg.vcpus, smbios=cfg.smbios,
                   serial=SerialConfig("file", str(out)))
    run = run_config(cfg, out, timeout=120)
    text, report = run.output, run.report
    assert run.event.kind == "powered-off" and report.complete, text[-2000:]
    head = next(ln.fields for ln in report.lines if ln.tag == "smbios")
    t = build_smbios(smbios_description(cfg, 1, 2, 1))
    assert head["addr"] == layout.SMBIOS_ADDR and head["ep"] == "sm3" and head["ep_ok"] == 1
    assert head["version"] == 0x300 and head["table"] == t.table_addr
    assert head["structs"] == t.count and head["end"] == 1
    sysline = _system_line(text)
    assert sysline == {"manufacturer": "OpenStack Foundation", "product": "OpenStack Nova",
                       "serial": "1c8a1f6e-serial",
                       "uuid": uuidlib.UUID(UUID).bytes_le.hex()}


@pytest.mark.qemu
def test_qemu_gives_the_same_system_strings(guests, tmp_path: Path) -> None:
    """QEMU's tables (built by SeaBIOS from -smbios; a 32-bit entry point on pc)
    carry the same type 1 strings."""
    out = tmp_path / "out.txt"
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-m", "64",
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{out}",
           "-device", "isa-debug-exit,iobase=0xf4", "-kernel", str(guests.bzimage),
           "-append", "pyhv.smbios", "-uuid", UUID,
           "-smbios", "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,"
                      f"serial=1c8a1f6e-serial,uuid={UUID}"]
    # SeaBIOS runs in emulated real mode on PVM: seconds, not milliseconds
    subprocess.run(cmd, timeout=300, check=False, capture_output=True)
    text = out.read_text(errors="replace")
    head = re.search(r"^@smbios addr=(\S+) ep=(\S+) ep_ok=1 ", text, re.M)
    assert head and head.group(1) != "0x0", text[-2000:]
    sysline = _system_line(text)
    assert sysline == {"manufacturer": "OpenStack Foundation", "product": "OpenStack Nova",
                       "serial": "1c8a1f6e-serial",
                       "uuid": uuidlib.UUID(UUID).bytes_le.hex()}


# ---- real Linux ----------------------------------------------------------------------

@pytest.mark.linux
@pytest.mark.kvm
@pytest.mark.parametrize("protocol", ["linux", "pvh"])
def test_linux_reads_the_tables(tmp_path: Path, protocol: str) -> None:
    """Debian's cloud kernel (Linux boot protocol or PVH) finds the tables in its early
    dmi_scan and prints what cloud-init later reads from /sys/class/dmi/id."""
    import select
    import sys
    import time

    from conftest import cloud_kernel

    from pyhv.engine.machine import Machine

    vmlinux = tmp_path / "vmlinux"
    subprocess.run([sys.executable, "-m", "pyhv", "extract-vmlinux", str(cloud_kernel()),
                    str(vmlinux)], check=True, capture_output=True)
    out = tmp_path / "console.log"
    base = nova_cfg(memory=128 << 20, vcpus=1)
    cfg = VmConfig(KernelBoot(str(vmlinux), None, "earlyprintk=ttyS0 console=ttyS0",
                              protocol),  # type: ignore[arg-type]
                   uuid=base.uuid, memory=base.memory, smbios=base.smbios,
                   serial=SerialConfig("file", str(out)))
    want = ["SMBIOS 3.0.0 present.",
            "DMI: OpenStack Foundation OpenStack Nova/Standard PC (i440FX + PIIX, 1996), "
            f"BIOS {__version__}"]
    m = Machine(cfg)
    missing = want
    try:
        m.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not m.finished and missing:
            select.select([m.event_fd], [], [], 0.5)
            m.process_events()
            text = out.read_text(errors="replace")
            missing = [w for w in want if w not in text]
    finally:
        m.close()
    assert not missing, out.read_text(errors="replace")[-3000:]
