"""What firmware does to PCI before the OS runs, done by pyhv at build time.

There is no BIOS: pyhv numbers the buses behind bridges, gives every BAR an
address (port I/O, the 32-bit MMIO window, the 64-bit window for 64-bit
prefetchable BARs), opens each bridge's windows over what is behind it, enables
decoding, and writes each function's interrupt line, so a guest that does not
reassign resources finds every device where ACPI and the registers say.

INTx: a function at slot ``s`` of bus 0 with pin ``p`` (0 = INTA) is wired to
``gsis[(s + p) % len(gsis)]`` (the ``_PRT`` of ``\\_SB.PCI0`` says the same);
behind a bridge the pin is swizzled, ``(p + slot) % 4`` per bridge, up to bus 0,
as the PCI-to-PCI bridge specification has it and as guests compute without
a ``_PRT`` of the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from pyhv.engine.pci.config import (
    CMD_IO,
    CMD_MASTER,
    CMD_MEMORY,
    COMMAND,
    INTERRUPT_PIN,
    IO_BASE,
    IO_BASE_UPPER,
    IO_LIMIT,
    IO_LIMIT_UPPER,
    MEM_BASE,
    MEM_LIMIT,
    PREF_BASE,
    PREF_BASE_UPPER,
    PREF_LIMIT,
    PREF_LIMIT_UPPER,
    PRIMARY_BUS,
    SECONDARY_BUS,
    SUBORDINATE_BUS,
)
from pyhv.engine.pci.device import PciBridge, PciFunction
from pyhv.engine.pci.root import PciRoot
from pyhv.engine.resources import AddressAllocator, ResourceError

IO_GRANULE = 0x1000
MEM_GRANULE = 0x10_0000
#: what a PCI Express root port gets even when nothing is behind it yet (room for
#: a device hotplugged later, as QEMU's firmware reserves)
ROOT_PORT_RESERVE = (0, 2 * MEM_GRANULE, 2 * MEM_GRANULE)


def intx_gsi(gsis: tuple[int, ...], root_slot: int, swizzle: int, pin: int) -> int:
    """The GSI of INTx pin ``pin`` (1 = INTA) of a function whose path from bus 0
    starts at slot ``root_slot`` and is swizzled by ``swizzle`` below it."""
    return gsis[(root_slot + (pin - 1 + swizzle) % 4) % len(gsis)]


class PciFirmwareError(ResourceError):
    """The devices do not fit in the machine's PCI windows."""


@dataclass
class _Need:
    """Sizes of the three kinds of space a bus needs (each a multiple of its granule)."""

    io: int = 0
    mem: int = 0
    pref: int = 0
    #: (alignment, size, assign) of each item on this bus, per kind
    items: dict[str, list[tuple[int, int, Callable[[int], None]]]] = field(
        default_factory=lambda: {"io": [], "mem": [], "pref": []})


def _kind_of(bar_kind: str, prefetchable: bool) -> str:
    if bar_kind == "io":
        return "io"
    return "pref" if bar_kind == "mem64" and prefetchable else "mem"


def _round(size: int, granule: int) -> int:
    return (size + granule - 1) & ~(granule - 1)


def _packed(items: list[tuple[int, int, Callable[[int], None]]], granule: int) -> int:
    """The size of a window holding ``items`` packed largest-alignment first."""
    cursor = 0
    for align, size, _ in sorted(items, key=lambda t: -t[0]):
        cursor = (cursor + align - 1) & ~(align - 1)
        cursor += size
    return _round(cursor, granule) if cursor else 0


class PciFirmware:
    def __init__(self, root: PciRoot, io: AddressAllocator, mem32: AddressAllocator,
                 mem64: AddressAllocator, gsis: tuple[int, ...]) -> None:
        self.root = root
        self.io = io
        self.mem32 = mem32
        self.mem64 = mem64
        self.gsis = gsis
        self.next_bus = 1
        #: (function, GSI) of every function with an INTx pin
        self.intx: list[tuple[PciFunction, int]] = []

    def run(self) -> None:
        self._number(self.root.functions, 0)
        need = self._size(self.root.functions)
        self._place(need, {"io": self.io, "mem": self.mem32, "pref": self.mem64})
        self._enable_and_route(self.root.functions, None, 0)
        for _bus, _dfn, fn, _parent in self.root.walk():
            fn.snapshot_as_initial()

    # ---- bus numbers -----------------------------------------------------------------
    def _number(self, table: dict[int, PciFunction], bus: int) -> None:
        for dfn in sorted(table):
            fn = table[dfn]
            if isinstance(fn, PciBridge):
                if self.next_bus > 255:
                    raise PciFirmwareError("more than 255 PCI buses")
                sec = self.next_bus
                self.next_bus += 1
                fn.config.set8(PRIMARY_BUS, bus)
                fn.config.set8(SECONDARY_BUS, sec)
                fn.config.set8(SUBORDINATE_BUS, 0xFF)
                self._number(fn.children, sec)
                fn.config.set8(SUBORDINATE_BUS, self.next_bus - 1)

    # ---- sizes, bottom up ---------------------------------------------------------------
    def _size(self, table: dict[int, PciFunction]) -> _Need:
        need = _Need()
        for dfn in sorted(table):
            fn = table[dfn]
            for bar in fn.config.bars.values():
                kind = _kind_of(bar.kind, bar.prefetchable)
                need.items[kind].append((bar.size, bar.size, self._bar_setter(fn, bar.index)))
            if isinstance(fn, PciBridge):
                inner = self._size(fn.children)
                reserve = ROOT_PORT_RESERVE if fn.kind == "pcie-root-port" else (0, 0, 0)
                for kind, granule, minimum in (("io", IO_GRANULE, reserve[0]),
                                               ("mem", MEM_GRANULE, reserve[1]),
                                               ("pref", MEM_GRANULE, reserve[2])):
                    size = max(_packed(inner.items[kind], granule), minimum)
                    align = max([granule] + [a for a, _, _ in inner.items[kind]])
                    if size:
                        need.items[kind].append(
                            (align, size, self._window_setter(fn, kind, size, inner)))
                    else:
                        self._close_window(fn, kind)
        return need

    def _bar_setter(self, fn: PciFunction, index: int) -> Callable[[int], None]:
        return lambda base: fn.config.set_bar_address(index, base)

    def _window_setter(self, bridge: PciBridge, kind: str, size: int,
                       inner: _Need) -> Callable[[int], None]:
        def assign(base: int) -> None:
            self._open_window(bridge, kind, base, size)
            cursor = base
            for align, isize, setter in sorted(inner.items[kind], key=lambda t: -t[0]):
                cursor = (cursor + align - 1) & ~(align - 1)
                setter(cursor)
                cursor += isize
        return assign

    # ---- placement, top down -------------------------------------------------------------
    def _place(self, need: _Need, windows: dict[str, AddressAllocator]) -> None:
        for kind, alloc in windows.items():
            for align, size, setter in sorted(need.items[kind], key=lambda t: -t[0]):
                try:
                    base = alloc.allocate(size, align)
                except ResourceError as e:
                    raise PciFirmwareError(f"PCI devices need more {kind} space than the "
                                           f"machine has: {e}") from None
                setter(base)

    def _open_window(self, bridge: PciBridge, kind: str, base: int, size: int) -> None:
        c = bridge.config
        last = base + size - 1
        if kind == "io":
            c.set8(IO_BASE, ((base >> 8) & 0xF0) | 0x1)
            c.set8(IO_LIMIT, ((last >> 8) & 0xF0) | 0x1)
            c.set16(IO_BASE_UPPER, base >> 16)
            c.set16(IO_LIMIT_UPPER, last >> 16)
        elif kind == "mem":
            c.set16(MEM_BASE, (base >> 16) & 0xFFF0)
            c.set16(MEM_LIMIT, (last >> 16) & 0xFFF0)
        else:
            c.set16(PREF_BASE, ((base >> 16) & 0xFFF0) | 0x1)
            c.set16(PREF_LIMIT, ((last >> 16) & 0xFFF0) | 0x1)
            c.set32(PREF_BASE_UPPER, base >> 32)
            c.set32(PREF_LIMIT_UPPER, last >> 32)

    def _close_window(self, bridge: PciBridge, kind: str) -> None:
        """Base above limit: the bridge forwards nothing of this kind."""
        c = bridge.config
        if kind == "io":
            c.set8(IO_BASE, 0xF1)
            c.set8(IO_LIMIT, 0x01)
        elif kind == "mem":
            c.set16(MEM_BASE, 0xFFF0)
            c.set16(MEM_LIMIT, 0x0000)
        else:
            c.set16(PREF_BASE, 0xFFF1)
            c.set16(PREF_LIMIT, 0x0001)
            c.set32(PREF_BASE_UPPER, 0)
            c.set32(PREF_LIMIT_UPPER, 0)

    # ---- decoding and interrupt lines --------------------------------------------------------
    def _enable_and_route(self, table: dict[int, PciFunction], parent: Optional[PciBridge],
                          root_slot: int, swizzle: int = 0) -> None:
        for dfn in sorted(table):
            fn = table[dfn]
            slot = dfn >> 3
            cmd = 0
            kinds = {b.kind for b in fn.config.bars.values()}
            if "io" in kinds or isinstance(fn, PciBridge):
                cmd |= CMD_IO
            if kinds - {"io"} or isinstance(fn, PciBridge):
                cmd |= CMD_MEMORY
            if isinstance(fn, PciBridge) or fn.config.bars:
                cmd |= CMD_MASTER
            fn.config.set16(COMMAND, fn.config.command | cmd)
            at_root = root_slot if parent is not None else slot
            pin = fn.config.get(INTERRUPT_PIN, 1)
            extra = swizzle + (slot if parent is not None else 0)
            if pin and self.gsis:
                self.intx.append((fn, intx_gsi(self.gsis, at_root, extra, pin)))
            if isinstance(fn, PciBridge):
                child_swizzle = extra if parent is not None else 0
                self._enable_and_route(fn.children, fn, at_root, child_swizzle)
