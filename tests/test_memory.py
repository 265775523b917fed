"""GuestMemory (pyhv/engine/memory.py) and the guest address map (pyhv/engine/layout.py)."""

from __future__ import annotations

import os
import struct

import pytest

from pyhv.engine import layout
from pyhv.engine.errors import EngineError
from pyhv.engine.layout import GiB, KiB, MiB
from pyhv.engine.memory import GuestMemory, GuestMemoryError, InvalidGuestAddress
from pyhv.errors import PyhvError

# the shape of layout.ram_ranges() above the hole (low run, gap, high run), but small
LO, LO_SIZE = 0x0, 0x1000
HI, HI_SIZE = 0x3000, 0x1000
RANGES = [(LO, LO_SIZE), (HI, HI_SIZE)]

BACKENDS = {
    "bytearray": GuestMemory.from_bytearrays,
    "anonymous": GuestMemory.anonymous,
    "shared_fd": GuestMemory.shared_fd,
}


@pytest.fixture(params=sorted(BACKENDS))
def mem(request: pytest.FixtureRequest):
    m = BACKENDS[request.param](RANGES)
    yield m
    m.close()


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# ---- construction and queries ------------------------------------------------

def test_shape(mem: GuestMemory) -> None:
    assert [(r.guest_addr, r.size) for r in mem.regions] == RANGES
    assert mem.size == LO_SIZE + HI_SIZE
    assert mem.end == HI + HI_SIZE
    assert mem.read(LO, LO_SIZE) == bytes(LO_SIZE)  # fresh memory reads as zero
    assert mem.read(HI, HI_SIZE) == bytes(HI_SIZE)


def test_contains(mem: GuestMemory) -> None:
    assert mem.contains(0)
    assert mem.contains(LO_SIZE - 1)
    assert mem.contains(0, LO_SIZE)
    assert not mem.contains(LO_SIZE)
    assert not mem.contains(0x2000)
    assert mem.contains(HI, HI_SIZE)
    assert not mem.contains(HI + HI_SIZE - 1, 2)
    assert not mem.contains(LO_SIZE - 8, 0x2010)
    assert not mem.contains(-1)


def test_regions_sorted_whatever_the_input_order() -> None:
    m = GuestMemory.from_bytearrays(list(reversed(RANGES)))
    assert [r.guest_addr for r in m.regions] == [LO, HI]
    m.write(HI, b"\x55")
    assert m.read_u8(HI) == 0x55 and m.read_u8(LO) == 0


@pytest.mark.parametrize("ranges", [
    [(0, 0x2000), (0x1000, 0x1000)],           # second starts inside the first
    [(0, 0x1000), (0, 0x1000)],                # identical
    [(0x1000, 0x1000), (0, 0x4000)],           # first (in address order) covers the other
    [(0x3000, 0x1000), (0, 0x1000), (0x800, 0x1000)],  # overlap hidden by input order
])
def test_overlapping_regions_rejected(ranges) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_bytearrays(ranges)


def test_adjacent_regions_accepted() -> None:
    m = GuestMemory.from_bytearrays([(0, 0x1000), (0x1000, 0x1000)])
    m.write(0xFFF, b"\x01")
    m.write(0x1000, b"\x02")
    assert (m.read_u8(0xFFF), m.read_u8(0x1000)) == (1, 2)


def test_error_hierarchy() -> None:
    assert issubclass(InvalidGuestAddress, GuestMemoryError)
    assert issubclass(InvalidGuestAddress, EngineError)
    assert issubclass(InvalidGuestAddress, PyhvError)
    m = GuestMemory.from_bytearrays(RANGES)
    with pytest.raises(PyhvError) as ei:
        m.read(0x2000, 4)
    assert isinstance(ei.value, InvalidGuestAddress)
    assert (ei.value.addr, ei.value.size) == (0x2000, 4)
    assert "0x2000" in str(ei.value)


# ---- round trips at region edges -----------------------------------------------

EDGES = [LO, LO + LO_SIZE - 16, HI, HI + HI_SIZE - 16]


@pytest.mark.parametrize("addr", EDGES)
def test_bytes_round_trip_at_edges(mem: GuestMemory, addr: int) -> None:
    data = pattern(16, addr)
    mem.write(addr, data)
    assert mem.read(addr, 16) == data
    assert bytes(mem.view(addr, 16)) == data
    mem.write(addr, bytearray(b"\xAA\xBB"))
    mem.write(addr + 14, memoryview(b"\xCC\xDD"))
    assert mem.read(addr, 16) == b"\xAA\xBB" + data[2:14] + b"\xCC\xDD"


def test_whole_regions_round_trip(mem: GuestMemory) -> None:
    lo, hi = pattern(LO_SIZE, 1), pattern(HI_SIZE, 2)
    mem.write(LO, lo)
    mem.write(HI, hi)
    assert mem.read(LO, LO_SIZE) == lo
    assert mem.read(HI, HI_SIZE) == hi


@pytest.mark.parametrize("bits", [8, 16, 32, 64])
def test_scalar_round_trip_and_endianness(mem: GuestMemory, bits: int) -> None:
    n = bits // 8
    value = int.from_bytes(pattern(n, 0x80)[::-1], "little") | (1 << (bits - 1))
    write = getattr(mem, f"write_u{bits}")
    read = getattr(mem, f"read_u{bits}")
    for addr in (LO, LO + LO_SIZE - n, HI, HI + HI_SIZE - n):
        write(addr, value)
        assert read(addr) == value
        assert mem.read(addr, n) == value.to_bytes(n, "little")
    mem.write(HI + 1, bytes(range(1, n + 1)))
    assert read(HI + 1) == int.from_bytes(bytes(range(1, n + 1)), "little")


def test_struct_round_trip(mem: GuestMemory) -> None:
    fmt = "<IHBxQ"
    size = struct.calcsize(fmt)
    for addr in (LO, LO + LO_SIZE - size, HI + HI_SIZE - size):
        mem.write_struct(fmt, addr, 0xDEADBEEF, 0x1234, 0x56, 0x0102030405060708)
        assert mem.read_struct(fmt, addr) == (0xDEADBEEF, 0x1234, 0x56, 0x0102030405060708)
        assert mem.read_struct(struct.Struct(fmt), addr) == mem.read_struct(fmt, addr)
    s = struct.Struct("<2H")
    mem.write_struct(s, HI, 0xAAAA, 0xBBBB)
    assert mem.read(HI, 4) == b"\xAA\xAA\xBB\xBB"


def test_fill(mem: GuestMemory) -> None:
    mem.fill(LO + LO_SIZE - 8, 8, 0xEE)
    mem.fill(HI, 4)
    assert mem.read(LO + LO_SIZE - 9, 9) == b"\x00" + b"\xEE" * 8
    mem.write(HI, b"\x11" * 8)
    mem.fill(HI + 2, 4, 0)
    assert mem.read(HI, 8) == b"\x11\x11\x00\x00\x00\x00\x11\x11"


def test_view_is_writable_and_live(mem: GuestMemory) -> None:
    v = mem.view(HI + 0x10, 4)
    v[:] = b"wxyz"
    assert mem.read(HI + 0x10, 4) == b"wxyz"
    mem.write(HI + 0x11, b"Q")
    assert bytes(v) == b"wQyz"
    v.release()


def test_write_accepts_any_memoryview(mem: GuestMemory) -> None:
    import array

    words = array.array("I", [0x04030201, 0x08070605])
    mem.write(HI, memoryview(words))
    assert mem.read(HI, 8) == bytes(range(1, 9))


# ---- bounds: every accessor, every kind of bad range ---------------------------

# (addr, size) ranges that are not wholly inside one region
BAD_RANGES = [
    (LO + LO_SIZE, 1),            # starts just past the low region (in the gap)
    (0x2000, 4),                  # inside the gap
    (HI - 1, 1),                  # the byte just below the high region
    (HI + HI_SIZE, 1),            # starts just past the end of RAM
    (1 << 40, 8),                 # far away
    (LO + LO_SIZE - 1, 2),        # starts inside, ends in the gap
    (HI + HI_SIZE - 4, 8),        # starts inside, ends past RAM
    (HI - 2, 4),                  # starts in the gap, ends inside
    (LO + LO_SIZE - 8, HI - LO_SIZE + 16),  # straddles the gap
    (LO, HI + HI_SIZE),           # covers everything, gap included
    (-1, 1),                      # negative address
    (-0x1000, 0x1008),            # negative address, "ending" inside
]


def sized_accessors(mem: GuestMemory):
    return {
        "read": lambda a, n: mem.read(a, n),
        "view": lambda a, n: mem.view(a, n),
        "write": lambda a, n: mem.write(a, b"\x5A" * n),
        "fill": lambda a, n: mem.fill(a, n, 0x5A),
    }


@pytest.mark.parametrize("addr,size", BAD_RANGES)
@pytest.mark.parametrize("accessor", ["read", "view", "write", "fill"])
def test_sized_accessors_reject_bad_ranges(mem: GuestMemory, accessor: str, addr: int,
                                           size: int) -> None:
    before = (mem.read(LO, LO_SIZE), mem.read(HI, HI_SIZE))
    with pytest.raises(InvalidGuestAddress):
        sized_accessors(mem)[accessor](addr, size)
    assert (mem.read(LO, LO_SIZE), mem.read(HI, HI_SIZE)) == before


@pytest.mark.parametrize("accessor", ["read", "view", "fill"])
@pytest.mark.parametrize("addr", [LO, HI + 8, 0x2000])
def test_negative_sizes_rejected(mem: GuestMemory, accessor: str, addr: int) -> None:
    with pytest.raises(InvalidGuestAddress):
        sized_accessors(mem)[accessor](addr, -1)
    with pytest.raises(InvalidGuestAddress):
        mem.region_index(addr, -4)


SCALARS = [(8, 1), (16, 2), (32, 4), (64, 8)]


def scalar_bad_addrs(n: int) -> list[int]:
    out = [LO + LO_SIZE, 0x2000, HI - n, HI + HI_SIZE, -1, -n, 1 << 48]
    if n > 1:  # starts inside, ends outside
        out += [LO + LO_SIZE - n + 1, HI + HI_SIZE - 1, HI - 1]
    return out


@pytest.mark.parametrize("bits,n", SCALARS)
def test_scalar_accessors_reject_bad_addresses(mem: GuestMemory, bits: int, n: int) -> None:
    mem.fill(LO, LO_SIZE, 0x33)
    mem.fill(HI, HI_SIZE, 0x44)
    for addr in scalar_bad_addrs(n):
        with pytest.raises(InvalidGuestAddress):
            getattr(mem, f"read_u{bits}")(addr)
        with pytest.raises(InvalidGuestAddress):
            getattr(mem, f"write_u{bits}")(addr, (1 << bits) - 1)
    # nothing was written, not even the bytes that were in range
    assert mem.read(LO, LO_SIZE) == b"\x33" * LO_SIZE
    assert mem.read(HI, HI_SIZE) == b"\x44" * HI_SIZE
    # and the last valid address works
    getattr(mem, f"write_u{bits}")(HI + HI_SIZE - n, 1)
    assert getattr(mem, f"read_u{bits}")(HI + HI_SIZE - n) == 1


@pytest.mark.parametrize("fmt", ["<Q", "<IIII", struct.Struct("<HQ")])
def test_struct_accessors_reject_bad_addresses(mem: GuestMemory, fmt) -> None:
    s = fmt if isinstance(fmt, struct.Struct) else struct.Struct(fmt)
    values = tuple(range(1, len(s.unpack(bytes(s.size))) + 1))
    mem.fill(LO, LO_SIZE, 0x66)
    mem.fill(HI, HI_SIZE, 0x77)
    for addr in [LO + LO_SIZE - s.size + 1, 0x2000, HI - 1, HI + HI_SIZE - 1, -1, -s.size]:
        with pytest.raises(InvalidGuestAddress):
            mem.read_struct(fmt, addr)
        with pytest.raises(InvalidGuestAddress):
            mem.write_struct(fmt, addr, *values)
    assert mem.read(LO, LO_SIZE) == b"\x66" * LO_SIZE
    assert mem.read(HI, HI_SIZE) == b"\x77" * HI_SIZE


def test_failed_write_is_all_or_nothing(mem: GuestMemory) -> None:
    mem.write(LO + LO_SIZE - 16, pattern(16))
    with pytest.raises(InvalidGuestAddress):
        mem.write(LO + LO_SIZE - 8, b"\xFF" * 16)  # first 8 bytes would fit
    with pytest.raises(InvalidGuestAddress):
        mem.fill(LO + LO_SIZE - 8, 16, 0xFF)
    with pytest.raises(InvalidGuestAddress):
        mem.write_u64(LO + LO_SIZE - 4, ~0 & (2**64 - 1))
    with pytest.raises(InvalidGuestAddress):
        mem.write_struct("<QQ", LO + LO_SIZE - 8, 1, 2)
    with pytest.raises(InvalidGuestAddress):
        mem.write(HI - 4, b"\xFF" * 8)  # last 4 bytes would fit
    assert mem.read(LO + LO_SIZE - 16, 16) == pattern(16)
    assert mem.read(HI, 8) == bytes(8)


# ---- backends -------------------------------------------------------------------

def test_shared_fd_visible_through_fd() -> None:
    m = GuestMemory.shared_fd(RANGES)
    try:
        fd = m.regions[0].fd
        assert fd >= 0 and m.regions[1].fd == fd
        assert os.fstat(fd).st_size == LO_SIZE + HI_SIZE
        offs = [r.fd_offset for r in m.regions]
        assert offs == [0, LO_SIZE]
        m.write(LO + 0x10, b"low!")
        m.write(HI + 0x20, b"high")
        m.write_u32(HI + HI_SIZE - 4, 0xCAFEF00D)
        assert os.pread(fd, 4, 0x10) == b"low!"
        assert os.pread(fd, 4, offs[1] + 0x20) == b"high"
        assert os.pread(fd, 4, offs[1] + HI_SIZE - 4) == (0xCAFEF00D).to_bytes(4, "little")
        # and the other way round
        os.pwrite(fd, b"from fd", offs[1] + 0x100)
        assert m.read(HI + 0x100, 7) == b"from fd"
    finally:
        m.close()


def test_shared_fd_with_path(tmp_path) -> None:
    path = tmp_path / "ram"
    m = GuestMemory.shared_fd(RANGES, path=str(path))
    try:
        m.write(HI, b"file-backed")
        m.regions[1].buffer.flush()
        data = path.read_bytes()
        assert len(data) == LO_SIZE + HI_SIZE
        assert data[LO_SIZE:LO_SIZE + 11] == b"file-backed"
    finally:
        m.close()


def test_anonymous_is_private() -> None:
    a = GuestMemory.anonymous(RANGES)
    b = GuestMemory.anonymous(RANGES)
    try:
        assert a.regions[0].fd == -1
        a.write(LO, b"only a")
        assert b.read(LO, 6) == bytes(6)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_close_releases(backend: str) -> None:
    m = BACKENDS[backend](RANGES)
    m.write(HI, b"x")
    assert m.read(HI, 1) == b"x"
    buffers = [r.buffer for r in m.regions]
    fds = {r.fd for r in m.regions if r.fd >= 0}
    m.close()
    assert m.regions == ()
    assert m.size == 0
    with pytest.raises(InvalidGuestAddress):
        m.read(HI, 1)
    with pytest.raises(InvalidGuestAddress):
        m.write_u8(LO, 1)
    for b in buffers:
        if hasattr(b, "closed"):
            assert b.closed  # the mmap was unmapped
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_mapping_failure_is_a_guest_memory_error() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory.anonymous([(0, 1 << 62)])


# ---- layout -----------------------------------------------------------------------

RAM_SIZES = [
    layout.MIN_RAM,
    64 * MiB,
    1 * GiB,
    layout.MMIO_HOLE_START - 4 * KiB,
    layout.MMIO_HOLE_START,
    layout.MMIO_HOLE_START + 4 * KiB,
    3 * GiB + 512 * MiB,
    8 * GiB,
    layout.MAX_RAM,
]


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


@pytest.mark.parametrize("size", RAM_SIZES)
def test_ram_ranges(size: int) -> None:
    ranges = layout.ram_ranges(size)
    assert sum(s for _a, s in ranges) == size
    assert all(s > 0 for _a, s in ranges)
    assert ranges == sorted(ranges)
    assert ranges[0][0] == 0
    for (a, s), (b, _t) in zip(ranges, ranges[1:]):
        assert a + s <= b
    for a, s in ranges:
        assert not overlaps(a, a + s, layout.MMIO_HOLE_START, layout.MMIO_HOLE_END)
        assert not overlaps(a, a + s, layout.PCIE_ECAM_START,
                            layout.PCIE_ECAM_START + layout.PCIE_ECAM_SIZE)
        assert not overlaps(a, a + s, layout.IOAPIC_ADDR, layout.IOAPIC_ADDR + 4 * KiB)
        assert not overlaps(a, a + s, layout.LAPIC_ADDR, layout.LAPIC_ADDR + 4 * KiB)
    if size <= layout.MMIO_HOLE_START:
        assert ranges == [(0, size)]
    else:
        assert ranges == [(0, layout.MMIO_HOLE_START),
                          (layout.HIGH_RAM_START, size - layout.MMIO_HOLE_START)]
    # the ranges are acceptable to GuestMemory (sorted, non-overlapping)
    if size <= 8 * GiB:
        m = GuestMemory.anonymous(ranges)
        try:
            assert m.size == size
            assert not m.contains(layout.MMIO_HOLE_START)
            assert not m.contains(layout.PCIE_ECAM_START)
        finally:
            m.close()


@pytest.mark.parametrize("size", RAM_SIZES)
def test_e820_map(size: int) -> None:
    e820 = layout.e820_map(size)
    ranges = layout.ram_ranges(size)
    assert all(e.size > 0 for e in e820)
    assert [e.addr for e in e820] == sorted(e.addr for e in e820)
    for a, b in zip(e820, e820[1:]):
        assert a.end <= b.addr, (a, b)
    ram = [e for e in e820 if e.type == layout.E820_RAM]
    for e in ram:
        # never RAM in the hole or the ECAM window
        assert not overlaps(e.addr, e.end, layout.MMIO_HOLE_START, layout.MMIO_HOLE_END)
        assert not overlaps(e.addr, e.end, layout.PCIE_ECAM_START,
                            layout.PCIE_ECAM_START + layout.PCIE_ECAM_SIZE)
        # every RAM entry is backed by one memory range
        assert any(a <= e.addr and e.end <= a + s for a, s in ranges), e
    # RAM is all of memory except the legacy area from the EBDA to 1 MiB
    legacy = layout.HIMEM_START - layout.EBDA_START
    assert sum(e.size for e in ram) == size - legacy
    # the ECAM window is marked reserved
    assert layout.E820Entry(layout.PCIE_ECAM_START, layout.PCIE_ECAM_SIZE,
                            layout.E820_RESERVED) in e820
    # the MP table and ACPI tables, which the VMM writes, are reserved and backed by RAM
    for addr in (layout.MPTABLE_ADDR, layout.ACPI_ADDR):
        hit = [e for e in e820 if e.addr <= addr < e.end]
        assert len(hit) == 1 and hit[0].type == layout.E820_RESERVED
        assert any(a <= addr < a + s for a, s in ranges)
    # boot structures are in usable low RAM
    for addr in (layout.ZERO_PAGE_ADDR, layout.PAGE_TABLES_ADDR, layout.CMDLINE_ADDR):
        assert any(e.addr <= addr < e.end for e in ram)
    high = [e for e in ram if e.addr >= layout.HIGH_RAM_START]
    if size > layout.MMIO_HOLE_START:
        assert high == [layout.E820Entry(layout.HIGH_RAM_START, size - layout.MMIO_HOLE_START,
                                         layout.E820_RAM)]
    else:
        assert high == []


@pytest.mark.parametrize("bits,n", SCALARS)
def test_the_last_region_hit_still_refuses_what_lies_outside_it(mem: GuestMemory, bits: int,
                                                                 n: int) -> None:
    """After an access to the high region (the accessors' second inline check), each
    bad address is refused all the same, and both regions keep their own bytes."""
    mem.fill(LO, LO_SIZE, 0x33)
    mem.fill(HI, HI_SIZE, 0x44)
    for addr in scalar_bad_addrs(n):
        getattr(mem, f"read_u{bits}")(HI)  # the high region is the last hit
        with pytest.raises(InvalidGuestAddress):
            getattr(mem, f"read_u{bits}")(addr)
        with pytest.raises(InvalidGuestAddress):
            getattr(mem, f"write_u{bits}")(addr, 0)
        with pytest.raises(InvalidGuestAddress):
            mem.view(addr, n)
    for a in (HI, LO, HI + HI_SIZE - n, LO + LO_SIZE - n):
        assert getattr(mem, f"read_u{bits}")(a) == int.from_bytes(
            bytes([0x44 if a >= HI else 0x33]) * n, "little")


READER = r"""
import mmap, struct, sys
fd, offset, fmt, a, b, n = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                            int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
m = mmap.mmap(fd, 4096, offset=offset)
s = struct.Struct(fmt)
print("ready", flush=True)
seen = set()
for _ in range(n):
    seen.add(s.unpack_from(m, 0x100)[0])
print(sorted(seen))
"""


@pytest.mark.parametrize("bits,a,b", [(16, 0x00FF, 0x0100), (32, 0x0000FFFF, 0x00010000),
                                      (64, 0xFFFFFFFF, 1 << 32)])
def test_another_cpu_never_sees_an_index_half_written(bits: int, a: int, b: int) -> None:
    """What a guest CPU (here another process on the same shared memory) reads of a
    ring index pyhv is updating is the old value or the new one, never a mixture or
    a zero (``struct.pack_into`` zero-fills before it stores)."""
    import subprocess
    import sys

    mem = GuestMemory.shared_fd([(0, 1 << 16)])
    write = getattr(mem, f"write_u{bits}")
    write(0x100, a)
    r = mem.regions[0]
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(r.fd), str(r.fd_offset),
         {16: "<H", 32: "<I", 64: "<Q"}[bits], str(a), str(b), "2000000"],
        pass_fds=[r.fd], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        while reader.poll() is None:
            for _ in range(1000):
                write(0x100, b)
                write(0x100, a)
        seen = reader.stdout.read().strip()
    finally:
        reader.kill()
        reader.wait()
        mem.close()
    assert seen == str(sorted({a, b})), seen
