"""Coalesced port I/O: writes KVM queues without an exit, applied in order later.

For a port registered as coalesced (``KVM_REGISTER_COALESCED_MMIO`` with the
``pio`` flag), KVM appends each ``out`` to a ring in a page every vCPU maps
(``KVM_COALESCED_MMIO_PAGE_OFFSET``) and lets the guest go on; only when the ring
is full does the write exit as usual.  pyhv applies the queued writes, oldest
first, before it handles any exit of any vCPU (so a device never sees a later
access before an earlier write) and on a timer (so output reaches the host while
the guest idles).

Only writes whose effect nobody waits for may be coalesced:

* the POST port 0x80, where nothing listens (Linux writes it for I/O delays);
* COM1's data register while the UART has every interrupt disabled: the guest
  then polls the line status register, and that read exits and applies the
  queued bytes first.  With any interrupt enabled (Linux's 8250 driver waits for
  THRE), the port exits again, so the interrupt comes when the byte is taken.
"""

from __future__ import annotations

import struct
import threading
from typing import Optional

from pyhv.engine.bus import Bus

#: ``struct kvm_coalesced_mmio_ring``: first (pyhv's), last (KVM's), then entries of
#: ``struct kvm_coalesced_mmio``: phys_addr (the port), len, pio, data[8]
_HEAD = struct.Struct("=II")
_ENTRY = struct.Struct("=QII")
ENTRY_SIZE = 24
PAGE_SIZE = 4096
#: entries in the ring (KVM_COALESCED_MMIO_MAX)
MAX_ENTRIES = (PAGE_SIZE - _HEAD.size) // ENTRY_SIZE
#: how often the loop applies what is queued (the guest may be idle meanwhile)
FLUSH_INTERVAL = 0.01


class CoalescedPio:
    """The ring of one VM and the port bus its writes go to."""

    def __init__(self, ring: memoryview, pio: Bus) -> None:
        self.ring = ring
        self.pio = pio
        self.lock = threading.Lock()
        #: ports registered now (the UART's IER hook changes only what it must)
        self.ports: set[int] = set()

    def drain(self) -> None:
        """Apply every queued write, oldest first (any thread)."""
        ring = self.ring
        with self.lock:
            first, last = _HEAD.unpack_from(ring, 0)
            while first != last:
                if first >= MAX_ENTRIES or last >= MAX_ENTRIES:
                    ring[0:4] = last.to_bytes(4, "little")  # not KVM's: skip it all
                    return
                off = _HEAD.size + ENTRY_SIZE * first
                port, length, _pio = _ENTRY.unpack_from(ring, off)
                if length in (1, 2, 4):
                    data = ring[off + _ENTRY.size:off + _ENTRY.size + length]
                    self.pio.write(port, length, int.from_bytes(data, "little"))
                first = (first + 1) % MAX_ENTRIES
                ring[0:4] = first.to_bytes(4, "little")  # the entry is free again

    def pending(self) -> bool:
        first, last = _HEAD.unpack_from(self.ring, 0)
        return first != last


def ring_of(vcpu_map: memoryview, page_offset: int) -> Optional[memoryview]:
    """The ring's page in a vCPU's mapping (None where the mapping has none)."""
    start = page_offset * PAGE_SIZE
    if len(vcpu_map) < start + PAGE_SIZE:
        return None
    return vcpu_map[start:start + PAGE_SIZE]


__all__ = ["CoalescedPio", "FLUSH_INTERVAL", "ring_of"]
