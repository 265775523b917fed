"""MSI-X: the capability, the vector table and the pending-bit array of one function.

Pure register model.  The function maps the table and the PBA into one of its
BARs and forwards accesses there to :meth:`Msix.table_read` and friends; it
raises a vector with :meth:`Msix.notify`.  Where the message goes is an
injected :class:`MsiSink`: KVM's GSI routes and irqfds in the engine
(:mod:`pyhv.engine.irq`), a recording list in tests.  The sink hears of every
vector the guest programs (``route``) so a live vector is one eventfd write
away; masked vectors collect their pending bit and fire when unmasked, as the
PCI specification has it.
"""

from __future__ import annotations

import struct
from typing import Optional, Protocol

from pyhv.engine.pci.config import CAP_ID_MSIX, ConfigSpace

ENTRY_SIZE = 16
CTRL_ENABLE = 0x8000
CTRL_FUNCTION_MASK = 0x4000
VECTOR_MASKED = 0x1


class MsiSink(Protocol):
    def route(self, vector: int, address: Optional[int], data: int) -> None:
        """Vector ``vector`` now delivers (address, data); ``address`` None: it is
        masked or disabled, nothing must be delivered for it."""

    def fire(self, vector: int) -> None:
        """Deliver vector ``vector`` as last routed."""


class Msix:
    """``size`` vectors with the table at ``table_offset`` and the PBA at
    ``pba_offset`` of BAR ``bar``."""

    def __init__(self, config: ConfigSpace, size: int, bar: int, table_offset: int = 0,
                 pba_offset: Optional[int] = None) -> None:
        if not 1 <= size <= 2048:
            raise ValueError(f"MSI-X table size {size} is not 1-2048")
        self.size = size
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset if pba_offset is not None else \
            (table_offset + size * ENTRY_SIZE + 0xFFF) & ~0xFFF
        self.config = config
        self.cap = config.add_capability(
            CAP_ID_MSIX,
            struct.pack("<HII", size - 1, table_offset | bar, self.pba_offset | bar),
            wmask=struct.pack("<HII", CTRL_ENABLE | CTRL_FUNCTION_MASK, 0, 0))
        self.table = bytearray(size * ENTRY_SIZE)
        self.pending = [False] * size
        self.sink: Optional[MsiSink] = None
        self._live: list[Optional[tuple[int, int]]] = [None] * size
        self.reset()

    @property
    def region_size(self) -> int:
        """Bytes of the BAR the table and the PBA cover."""
        return self.pba_offset + ((self.size + 63) // 64) * 8 - self.table_offset

    def reset(self) -> None:
        self.table[:] = bytes(len(self.table))
        for v in range(self.size):  # every vector starts masked
            struct.pack_into("<I", self.table, v * ENTRY_SIZE + 12, VECTOR_MASKED)
        self.pending = [False] * self.size
        self.config.set16(self.cap + 2, self.size - 1)
        self._refresh()

    # ---- state ----------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.config.get(self.cap + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CTRL_ENABLE)

    def masked(self, vector: int) -> bool:
        vc = struct.unpack_from("<I", self.table, vector * ENTRY_SIZE + 12)[0]
        return bool(vc & VECTOR_MASKED) or bool(self.control & CTRL_FUNCTION_MASK)

    def message(self, vector: int) -> tuple[int, int]:
        lo, hi, data, _ = struct.unpack_from("<IIII", self.table, vector * ENTRY_SIZE)
        return lo | (hi << 32), data

    # ---- the device side ------------------------------------------------------------
    def notify(self, vector: int) -> None:
        """The device raises ``vector`` (out-of-range vectors are dropped)."""
        if not 0 <= vector < self.size or not self.enabled:
            return
        if self.masked(vector):
            self.pending[vector] = True
        elif self.sink is not None:
            self.sink.fire(vector)

    # ---- the guest side: config writes and table/PBA accesses ------------------------
    def config_written(self) -> None:
        """Call after any write to configuration space (enable or function mask)."""
        self._refresh()

    def covers(self, offset: int) -> bool:
        return self.table_offset <= offset < self.table_offset + self.region_size

    def read(self, offset: int, size: int) -> int:
        """A read at ``offset`` of the BAR (inside the table or the PBA)."""
        t = offset - self.table_offset
        if 0 <= t and t + size <= len(self.table) and size in (4, 8) and not t % size:
            return int.from_bytes(self.table[t:t + size], "little")
        p = offset - self.pba_offset
        if 0 <= p and size in (4, 8) and not p % size:
            bits = 0
            for i in range(size * 8):
                v = p * 8 + i
                if v < self.size and self.pending[v]:
                    bits |= 1 << i
            return bits
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        t = offset - self.table_offset
        if not (0 <= t and t + size <= len(self.table) and size in (4, 8) and not t % size):
            return  # the PBA is read-only; odd sizes are ignored as the spec allows
        first, last = t // ENTRY_SIZE, (t + size - 1) // ENTRY_SIZE
        self.table[t:t + size] = value.to_bytes(size, "little")
        for v in range(first, last + 1):
            self._refresh_vector(v)

    # ---- keeping the sink in step --------------------------------------------------
    def _refresh(self) -> None:
        for v in range(self.size):
            self._refresh_vector(v)

    def _refresh_vector(self, v: int) -> None:
        live = None if not self.enabled or self.masked(v) else self.message(v)
        if live != self._live[v]:
            self._live[v] = live
            if self.sink is not None:
                self.sink.route(v, live[0] if live else None, live[1] if live else 0)
        if live is not None and self.pending[v]:
            self.pending[v] = False
            if self.sink is not None:
                self.sink.fire(v)

    def attach(self, sink: MsiSink) -> None:
        self.sink = sink
        self._live = [None] * self.size
        self._refresh()
