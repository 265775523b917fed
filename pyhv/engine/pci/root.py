"""The PCI hierarchy and the host bridge's two ways in: port 0xCF8/0xCFC and ECAM.

:class:`PciRoot` holds the functions on bus 0 (bridges hold theirs) and routes a
configuration access for (bus, device, function) the way hardware does: bus 0
is the root's, any other bus is reached through the bridge whose
secondary..subordinate range contains it, as the guest (or pyhv, acting as the
firmware) numbered them.  Nobody there: all-ones, writes dropped.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from pyhv.engine.pci.device import PciBridge, PciFunction


def devfn(slot: int, function: int) -> int:
    return (slot << 3) | function


def bdf_text(bus: int, dfn: int) -> str:
    return f"{bus:02x}:{dfn >> 3:02x}.{dfn & 7}"


class PciRoot:
    """Bus 0 of segment 0 and everything below it."""

    def __init__(self) -> None:
        self.functions: dict[int, PciFunction] = {}

    # ---- building ------------------------------------------------------------------
    def add(self, bus_owner: Optional[PciBridge], slot: int, function: int,
            fn: PciFunction) -> None:
        """Put ``fn`` at ``slot.function`` on the root bus or behind ``bus_owner``."""
        table = self.functions if bus_owner is None else bus_owner.children
        where = devfn(slot, function)
        if not 0 <= slot < 32 or not 0 <= function < 8:
            raise ValueError(f"no PCI address {slot:#x}.{function}")
        if where in table:
            raise ValueError(f"slot {slot:#04x} function {function} is taken by "
                             f"{table[where].name}")
        table[where] = fn

    def walk(self) -> Iterator[tuple[int, int, PciFunction, Optional[PciBridge]]]:
        """(bus number, devfn, function, parent bridge) of every function, depth first."""
        yield from self._walk(0, self.functions, None)

    def _walk(self, bus: int, table: dict[int, PciFunction],
              parent: Optional[PciBridge]) -> Iterator[tuple[int, int, PciFunction,
                                                              Optional[PciBridge]]]:
        for dfn in sorted(table):
            fn = table[dfn]
            yield bus, dfn, fn, parent
            if isinstance(fn, PciBridge):
                yield from self._walk(fn.secondary, fn.children, fn)

    # ---- routing a configuration access ---------------------------------------------
    def lookup(self, bus: int, dfn: int) -> Optional[PciFunction]:
        table = self.functions
        current = 0
        for _ in range(256):
            if bus == current:
                fn = table.get(dfn)
                if fn is not None and dfn & 7 and devfn(dfn >> 3, 0) not in table:
                    return None  # no function 0: the slot is empty to a guest
                return fn
            for child in table.values():
                if isinstance(child, PciBridge) and \
                        0 < child.secondary <= bus <= child.subordinate:
                    if not child.visible:
                        return None
                    table, current = child.children, child.secondary
                    break
            else:
                return None
        return None

    def config_read(self, bus: int, dfn: int, offset: int, size: int) -> int:
        fn = self.lookup(bus, dfn)
        if fn is None:
            return (1 << (8 * size)) - 1
        with fn.lock:
            return fn.config_read(offset, size)

    def config_write(self, bus: int, dfn: int, offset: int, size: int, value: int) -> None:
        fn = self.lookup(bus, dfn)
        if fn is None:
            return
        with fn.lock:
            fn.config_write(offset, size, value)

    def reset(self) -> None:
        for fn in self.functions.values():
            with fn.lock:
                fn.reset()


class ConfigIo:
    """Configuration mechanism #1 at port 0xCF8 (address), 0xCF9 (the reset control
    register of PIIX3/ICH9) and 0xCFC-0xCFF (data), mapped as 8 ports at 0xCF8."""

    def __init__(self, root: PciRoot, on_reset: Optional[Callable[[], None]] = None) -> None:
        self.root = root
        self.on_reset = on_reset
        self.address = 0
        self.rcr = 0

    def _target(self, offset: int) -> Optional[tuple[int, int, int]]:
        a = self.address
        if not a & 0x8000_0000:
            return None
        return (a >> 16) & 0xFF, (a >> 8) & 0xFF, (a & 0xFC) + (offset - 4)

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        if offset == 1 and size == 1:
            return self.rcr
        if offset >= 4 and offset + size <= 8:
            t = self._target(offset)
            if t is not None:
                return self.root.config_read(t[0], t[1], t[2], size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & 0x80FF_FFFC
        elif offset == 1 and size == 1:
            # bit 2 starts a reset (bit 1 says hard or soft: both reboot here)
            if value & 0x04 and not self.rcr & 0x04 and self.on_reset is not None:
                self.on_reset()
            self.rcr = value & 0x0A
        elif offset >= 4 and offset + size <= 8:
            t = self._target(offset)
            if t is not None:
                self.root.config_write(t[0], t[1], t[2], size, value)


class Ecam:
    """PCI Express enhanced configuration access (MMCONFIG): 4 KiB per function."""

    def __init__(self, root: PciRoot, buses: int = 256) -> None:
        self.root = root
        self.size = buses << 20

    def read(self, offset: int, size: int) -> int:
        reg = offset & 0xFFF
        if reg + size > 0x1000:
            return (1 << (8 * size)) - 1
        return self.root.config_read(offset >> 20, (offset >> 12) & 0xFF, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        reg = offset & 0xFFF
        if reg + size <= 0x1000:
            self.root.config_write(offset >> 20, (offset >> 12) & 0xFF, reg, size, value)
