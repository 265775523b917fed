"""A PCI function's configuration space as a register model.

Bytes plus two masks: which bits the guest may write, and which are
write-one-to-clear (status bits).  Base address registers follow the sizing
protocol (write all-ones, read back the size mask), 64-bit BARs span two
registers, and capabilities are chained from offset 0x34 (PCI Express ones
from 0x100 in the extended space).  Everything here is pure: what a write
changes is reported to the owner through :meth:`ConfigSpace.write`'s return
value, and the owner maps or unmaps its BARs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, Optional

# ---- registers of the common header --------------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A
CACHE_LINE = 0x0C
LATENCY = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYS_VENDOR = 0x2C
SUBSYS_ID = 0x2E
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
# type 1 (bridge) header
PRIMARY_BUS = 0x18
SECONDARY_BUS = 0x19
SUBORDINATE_BUS = 0x1A
IO_BASE = 0x1C
IO_LIMIT = 0x1D
SECONDARY_STATUS = 0x1E
MEM_BASE = 0x20
MEM_LIMIT = 0x22
PREF_BASE = 0x24
PREF_LIMIT = 0x26
PREF_BASE_UPPER = 0x28
PREF_LIMIT_UPPER = 0x2C
IO_BASE_UPPER = 0x30
IO_LIMIT_UPPER = 0x32
BRIDGE_CAP_PTR = 0x34
BRIDGE_ROM = 0x38
BRIDGE_CONTROL = 0x3E

CMD_IO = 0x1
CMD_MEMORY = 0x2
CMD_MASTER = 0x4
CMD_INTX_DISABLE = 0x400
STATUS_INTERRUPT = 0x08
STATUS_CAP_LIST = 0x10

HEADER_MULTIFUNCTION = 0x80

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_SSVID = 0x0D
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096

BarKind = Literal["io", "mem32", "mem64"]


@dataclass(frozen=True)
class Bar:
    """A base address register the function decodes: size is a power of two."""

    index: int
    size: int
    kind: BarKind = "mem32"
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5 or (self.kind == "mem64" and self.index == 5):
            raise ValueError(f"BAR {self.index} cannot be a {self.kind} BAR")
        least = 4 if self.kind == "io" else 16
        if self.size < least or self.size & (self.size - 1):
            raise ValueError(f"BAR {self.index}: size {self.size:#x} is not a power of two "
                             f"of at least {least}")

    @property
    def flags(self) -> int:
        """The read-only low bits of the register."""
        if self.kind == "io":
            return 0x1
        return (0x4 if self.kind == "mem64" else 0) | (0x8 if self.prefetchable else 0)


class ConfigSpace:
    """Configuration registers of one PCI function (type 0 or type 1 header)."""

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 header_type: int = 0, subsystem_vendor: int = 0, subsystem: int = 0,
                 interrupt_pin: int = 0, pcie: bool = False, multifunction: bool = False,
                 bars: tuple[Bar, ...] = ()) -> None:
        size = PCIE_CONFIG_SIZE if pcie else CONFIG_SIZE
        self.data = bytearray(size)
        self.wmask = bytearray(size)   # bits the guest may change
        self.w1c = bytearray(size)     # bits a written 1 clears
        self.header_type = header_type
        self.bars: dict[int, Bar] = {}
        self._last_cap = 0
        self._last_ext = 0
        self._next_cap = 0x40
        self._next_ext = 0x100
        self.set16(VENDOR_ID, vendor)
        self.set16(DEVICE_ID, device)
        self.set8(REVISION, revision)
        self.set8(CLASS_PROG, class_code & 0xFF)
        self.set16(CLASS_DEVICE, class_code >> 8)
        self.set8(HEADER_TYPE, header_type | (HEADER_MULTIFUNCTION if multifunction else 0))
        self.allow(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE | 0x140)
        self.w1c[STATUS + 1] = 0xF9  # parity, aborts, SERR: write-one-to-clear
        self.allow(CACHE_LINE, 1, 0xFF)
        self.allow(LATENCY, 1, 0xFF)
        self.allow(INTERRUPT_LINE, 1, 0xFF)
        self.set8(INTERRUPT_PIN, interrupt_pin)
        if header_type == 0:
            self.set16(SUBSYS_VENDOR, subsystem_vendor)
            self.set16(SUBSYS_ID, subsystem)
        else:
            for off in (PRIMARY_BUS, SECONDARY_BUS, SUBORDINATE_BUS, 0x1B):
                self.allow(off, 1, 0xFF)
            self.set8(IO_BASE, 0x01)   # 32-bit I/O addressing
            self.set8(IO_LIMIT, 0x01)
            self.allow(IO_BASE, 2, 0xF0F0)
            self.w1c[SECONDARY_STATUS + 1] = 0xF9
            self.allow(MEM_BASE, 4, 0xFFF0FFF0)
            self.set16(PREF_BASE, 0x1)  # 64-bit prefetchable window
            self.set16(PREF_LIMIT, 0x1)
            self.allow(PREF_BASE, 4, 0xFFF0FFF0)
            self.allow(PREF_BASE_UPPER, 8, 0xFFFFFFFF_FFFFFFFF)
            self.allow(IO_BASE_UPPER, 4, 0xFFFFFFFF)
            self.allow(BRIDGE_CONTROL, 2, 0x0FFF)
        for bar in bars:
            self.add_bar(bar)

    # ---- plain access ------------------------------------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")

    def set8(self, offset: int, value: int) -> None:
        self.set(offset, 1, value)

    def set16(self, offset: int, value: int) -> None:
        self.set(offset, 2, value)

    def set32(self, offset: int, value: int) -> None:
        self.set(offset, 4, value)

    def allow(self, offset: int, size: int, mask: int) -> None:
        """Let the guest write the bits of ``mask`` at ``offset``."""
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    # ---- BARs --------------------------------------------------------------------
    def add_bar(self, bar: Bar) -> None:
        if self.header_type != 0 and bar.index > 1:
            raise ValueError("a bridge has BARs 0 and 1 only")
        off = BAR0 + 4 * bar.index
        if bar.index in self.bars or (bar.index - 1 in self.bars and
                                      self.bars[bar.index - 1].kind == "mem64"):
            raise ValueError(f"BAR {bar.index} is taken")
        self.bars[bar.index] = bar
        mask = ~(bar.size - 1)
        self.set32(off, bar.flags)
        self.allow(off, 4, mask & 0xFFFFFFFF & ~(0x3 if bar.kind == "io" else 0xF))
        if bar.kind == "mem64":
            self.allow(off + 4, 4, (mask >> 32) & 0xFFFFFFFF)

    def bar_address(self, index: int) -> int:
        """Where BAR ``index`` is programmed (0 while unassigned)."""
        bar = self.bars[index]
        off = BAR0 + 4 * index
        low = self.get(off, 4) & (~0x3 if bar.kind == "io" else ~0xF) & 0xFFFFFFFF
        if bar.kind == "mem64":
            return low | (self.get(off + 4, 4) << 32)
        return low

    def set_bar_address(self, index: int, address: int) -> None:
        """Program a BAR as firmware does."""
        bar = self.bars[index]
        if address & (bar.size - 1):
            raise ValueError(f"BAR {index}: {address:#x} is not aligned to {bar.size:#x}")
        off = BAR0 + 4 * index
        self.set32(off, (address & 0xFFFFFFFF) | bar.flags)
        if bar.kind == "mem64":
            self.set32(off + 4, address >> 32)

    def decoding(self, index: int) -> bool:
        """Whether the function answers on BAR ``index`` now (command bit set)."""
        bar = self.bars[index]
        return bool(self.command & (CMD_IO if bar.kind == "io" else CMD_MEMORY))

    # ---- capabilities ------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: Optional[bytes] = None,
                       align: int = 4) -> int:
        """Chain a capability (``body`` after its ID and next bytes); its offset."""
        off = (self._next_cap + align - 1) & ~(align - 1)
        end = off + 2 + len(body)
        if end > CONFIG_SIZE:
            raise ValueError("no room left for a capability")
        self.data[off] = cap_id
        self.data[off + 2:end] = body
        if wmask is not None:
            self.wmask[off + 2:off + 2 + len(wmask)] = wmask
        if self._last_cap:
            self.data[self._last_cap + 1] = off
        else:
            self.set8(CAP_PTR, off)
            self.set16(STATUS, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self._last_cap = off
        self._next_cap = end
        return off

    def add_ext_capability(self, cap_id: int, version: int, body: bytes,
                           wmask: Optional[bytes] = None) -> int:
        """Chain a PCI Express extended capability (from 0x100)."""
        if len(self.data) < PCIE_CONFIG_SIZE:
            raise ValueError("extended capabilities need a PCI Express function")
        off = self._next_ext
        end = off + 4 + len(body)
        self.set32(off, cap_id | (version << 16))
        self.data[off + 4:end] = body
        if wmask is not None:
            self.wmask[off + 4:off + 4 + len(wmask)] = wmask
        if self._last_ext:
            head = self.get(self._last_ext, 4)
            self.set32(self._last_ext, (head & 0xFFFFF) | (off << 20))
        self._last_ext = off
        self._next_ext = (end + 3) & ~3
        return off

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, walking the list as a guest does."""
        out: list[tuple[int, int]] = []
        if not self.get(STATUS, 2) & STATUS_CAP_LIST:
            return out
        off = self.get(CAP_PTR, 1) & 0xFC
        while off and len(out) < 48:
            out.append((off, self.data[off]))
            off = self.data[off + 1] & 0xFC
        return out

    # ---- guest access ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset + size > len(self.data):
            return (1 << (8 * size)) - 1
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> list[int]:
        """Apply a guest write; the BAR indexes whose decoded range may have changed
        (a BAR register or the command register's decode bits were written)."""
        if offset + size > len(self.data):
            return []
        before_cmd = self.command
        for i in range(size):
            off = offset + i
            byte = (value >> (8 * i)) & 0xFF
            wm, w1c = self.wmask[off], self.w1c[off]
            old = self.data[off]
            new = (old & ~wm) | (byte & wm)
            new &= ~(byte & w1c) & 0xFF
            self.data[off] = new
        changed: list[int] = []
        if self.bars:
            end = offset + size
            if offset < BAR0 + 24 and end > BAR0:
                for index, bar in self.bars.items():
                    lo = BAR0 + 4 * index
                    hi = lo + (8 if bar.kind == "mem64" else 4)
                    if offset < hi and end > lo:
                        changed.append(index)
            if offset <= COMMAND < end or offset <= COMMAND + 1 < end:
                if (before_cmd ^ self.command) & (CMD_IO | CMD_MEMORY):
                    changed = sorted(set(changed) | set(self.bars))
        return changed


def pack(fmt: str, *values: int) -> bytes:
    return struct.pack("<" + fmt, *values)
