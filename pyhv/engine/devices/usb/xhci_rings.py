"""xHCI rings: TRB layout, the command ring's consumer, an interrupter and its event ring.

Pure bookkeeping over guest memory reached through two injected callables
(``read(addr, size)`` and ``write(addr, data)``, the controller's DMA, which
raise :class:`~pyhv.engine.devices.usb.common.DmaError`).  An Event Ring
Segment Table the guest made unusable raises :class:`EventRingError`, which the
controller turns into Host Controller Error.

Every TRB is 16 bytes: a 64-bit parameter, a 32-bit status and a 32-bit
control word whose bit 0 is the cycle bit and bits 15:10 the TRB type.
"""

from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Optional

from pyhv.engine.devices.usb.common import UsbError, merge

Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]

TRB_SIZE = 16
_TRB = struct.Struct("<QII")

# TRB types
TRB_NORMAL = 1
TRB_LINK = 6
TRB_ENABLE_SLOT = 9
TRB_DISABLE_SLOT = 10
TRB_ADDRESS_DEVICE = 11
TRB_CONFIGURE_ENDPOINT = 12
TRB_EVALUATE_CONTEXT = 13
TRB_RESET_ENDPOINT = 14
TRB_STOP_ENDPOINT = 15
TRB_SET_TR_DEQUEUE = 16
TRB_RESET_DEVICE = 17
TRB_FORCE_EVENT = 18
TRB_NEGOTIATE_BANDWIDTH = 19
TRB_SET_LATENCY_TOLERANCE = 20
TRB_GET_PORT_BANDWIDTH = 21
TRB_FORCE_HEADER = 22
TRB_NOOP_COMMAND = 23
TRB_TRANSFER_EVENT = 32
TRB_COMMAND_COMPLETION = 33
TRB_PORT_STATUS_CHANGE = 34
TRB_HOST_CONTROLLER_EVENT = 37

# completion codes
CC_SUCCESS = 1
CC_USB_TRANSACTION_ERROR = 4
CC_TRB_ERROR = 5
CC_NO_SLOTS_AVAILABLE = 9
CC_SLOT_NOT_ENABLED = 11
CC_PARAMETER_ERROR = 17
CC_CONTEXT_STATE_ERROR = 19
CC_EVENT_RING_FULL = 21
CC_COMMAND_RING_STOPPED = 24

TRB_CYCLE = 1 << 0
LINK_TOGGLE_CYCLE = 1 << 1

#: the most TRBs one doorbell consumes (a ring of Link TRBs pointing at each other
#: must not hang the vCPU; what is left is consumed at the next doorbell)
MAX_TRBS_PER_DOORBELL = 4096

MASK64 = (1 << 64) - 1


class EventRingError(UsbError):
    """The Event Ring Segment Table or one of its segments is unusable."""


class Trb(NamedTuple):
    parameter: int
    status: int
    control: int

    @property
    def type(self) -> int:
        return (self.control >> 10) & 0x3F

    @property
    def cycle(self) -> int:
        return self.control & TRB_CYCLE

    @property
    def slot(self) -> int:
        return self.control >> 24

    @classmethod
    def parse(cls, data: bytes) -> "Trb":
        return cls(*_TRB.unpack(data))


def trb_type(kind: int) -> int:
    """The control word's TRB type field for ``kind``."""
    return kind << 10


class CommandRing:
    """The controller's view of the command ring: where it reads next, and its cycle state."""

    def __init__(self, read: Read) -> None:
        self._read = read
        self.dequeue = 0
        self.ccs = 0
        self.running = False  # CRCR.CRR

    def reset(self) -> None:
        self.dequeue = 0
        self.ccs = 0
        self.running = False

    def next_command(self, budget: int) -> tuple[Optional[Trb], int]:
        """The next command TRB the guest has given the controller (None: the ring is
        empty, or ``budget`` TRBs were read), following Link TRBs; and the TRBs read."""
        used = 0
        while used < budget:
            trb = Trb.parse(self._read(self.dequeue, TRB_SIZE))
            used += 1
            if trb.cycle != self.ccs:
                return None, used
            if trb.type != TRB_LINK:
                return trb, used
            self.dequeue = trb.parameter & ~0xF & MASK64
            if trb.control & LINK_TOGGLE_CYCLE:
                self.ccs ^= 1
        return None, used

    def advance(self) -> None:
        self.dequeue = (self.dequeue + TRB_SIZE) & MASK64


# interrupter registers (offsets in the interrupter's 32-byte register set)
IMAN = 0x00
IMOD = 0x04
ERSTSZ = 0x08
ERSTBA = 0x10
ERDP = 0x18

IMAN_IP = 1 << 0
IMAN_IE = 1 << 1
IMOD_DEFAULT = 4000  # 4000 x 250 ns = 1 ms
ERDP_DESI = 0x7
ERDP_EHB = 1 << 3
MIN_SEGMENT = 16
MAX_SEGMENT = 4096


class _Producer(NamedTuple):
    segment: int   # ERST index of the enqueue segment
    enqueue: int   # where the next event goes
    left: int      # TRBs from ``enqueue`` to the end of the segment
    cycle: int     # producer cycle state


class Interrupter:
    """One interrupter's registers and the event ring it produces into."""

    def __init__(self, read: Read, write: Write, erst_max: int) -> None:
        self._read = read
        self._write = write
        self.erst_max = erst_max
        self.iman = 0
        self.imod = IMOD_DEFAULT
        self.erstsz = 0
        self.erstba = 0
        self.erdp = 0
        self._at: Optional[_Producer] = None  # None: at the start of segment 0, not read yet
        self.full = False
        self._full_at = 0
        self.reset()

    def reset(self) -> None:
        self.iman = 0
        self.imod = IMOD_DEFAULT
        self.erstsz = 0
        self.erstba = 0
        self.erdp = 0
        self._restart()

    def _restart(self) -> None:
        """Writing ERSTBA puts the producer at the start of segment 0, cycle 1."""
        self._at = None
        self.full = False
        self._full_at = 0

    # ---- registers -----------------------------------------------------------------
    def read(self, offset: int) -> int:
        if offset == IMAN:
            return self.iman
        if offset == IMOD:
            return self.imod
        if offset == ERSTSZ:
            return self.erstsz
        if offset == ERSTBA:
            return self.erstba & 0xFFFFFFFF
        if offset == ERSTBA + 4:
            return self.erstba >> 32
        if offset == ERDP:
            return self.erdp & 0xFFFFFFFF
        if offset == ERDP + 4:
            return self.erdp >> 32
        return 0

    def write(self, offset: int, value: int, mask: int) -> bool:
        """A register write; True when it raised Interrupt Pending."""
        if offset == IMAN:
            self.iman = merge(self.iman, value, mask, IMAN_IE)
            self.iman &= ~(value & mask & IMAN_IP)
        elif offset == IMOD:
            self.imod = merge(self.imod, value, mask, 0xFFFFFFFF)
        elif offset == ERSTSZ:
            self.erstsz = merge(self.erstsz, value, mask, 0xFFFF)
        elif offset in (ERSTBA, ERSTBA + 4):
            shift = 32 if offset != ERSTBA else 0
            writable = 0xFFFFFFFF if shift else 0xFFFFFFC0
            self.erstba = merge(self.erstba, value << shift, mask << shift, writable << shift)
            self._restart()
        elif offset in (ERDP, ERDP + 4):
            shift = 32 if offset != ERDP else 0
            writable = 0xFFFFFFFF if shift else 0xFFFFFFF7
            self.erdp = merge(self.erdp, value << shift, mask << shift, writable << shift)
            busy = self.erdp & ERDP_EHB
            if not shift:
                self.erdp &= ~(value & mask & ERDP_EHB)
            if self.full and self.dequeue != self._full_at:
                self.full = False  # the guest consumed events: there is room again
            if busy and not self.erdp & ERDP_EHB and not self.empty:
                return self.signal()  # events arrived while the handler was busy
        return False

    @property
    def dequeue(self) -> int:
        return self.erdp & ~0xF

    @property
    def pending(self) -> bool:
        """Interrupt pending and enabled: this interrupter asks for the pin."""
        return bool(self.iman & IMAN_IP and self.iman & IMAN_IE)

    @property
    def empty(self) -> bool:
        """No event the guest has not acknowledged with ERDP."""
        if self.full:
            return False
        if self._at is None:
            return True  # nothing posted since ERSTBA was written
        return self._at.enqueue == self.dequeue

    def signal(self) -> bool:
        """An event wants an interrupt: set IP and EHB unless the handler is busy.

        True when IP went from 0 to 1 (USBSTS.EINT follows)."""
        if self.erdp & ERDP_EHB:
            return False  # the guest sees the new event when it clears EHB
        self.erdp |= ERDP_EHB
        rose = not self.iman & IMAN_IP
        self.iman |= IMAN_IP
        return rose

    # ---- the event ring ------------------------------------------------------------
    def _segment(self, index: int) -> tuple[int, int]:
        if not 1 <= self.erstsz <= self.erst_max:
            raise EventRingError(f"event ring segment table size {self.erstsz}")
        entry = self._read(self.erstba + 16 * index, 16)
        base = int.from_bytes(entry[0:8], "little") & ~0x3F
        size = int.from_bytes(entry[8:12], "little") & 0xFFFF
        if not MIN_SEGMENT <= size <= MAX_SEGMENT:
            raise EventRingError(f"event ring segment {index}: {size} TRBs")
        return base, size

    def _current(self) -> _Producer:
        if self._at is None:
            base, size = self._segment(0)
            self._at = _Producer(0, base, size, 1)
        return self._at

    def _after(self, at: _Producer) -> _Producer:
        if at.left > 1:
            return _Producer(at.segment, (at.enqueue + TRB_SIZE) & MASK64, at.left - 1,
                             at.cycle)
        segment, cycle = at.segment + 1, at.cycle
        if segment >= self.erstsz:
            segment, cycle = 0, cycle ^ 1  # back to the first segment: flip the cycle
        base, size = self._segment(segment)
        return _Producer(segment, base, size, cycle)

    def reserve(self) -> bool:
        """Whether an event can be posted now.

        The producer always leaves one TRB free (Enqueue == Dequeue means empty).
        When only the TRB for an Event Ring Full Error event is left beyond that,
        it gets that event, and nothing more is posted until the guest moves
        ERDP: False."""
        if self.full:
            return False
        at = self._current()
        after = self._after(at)
        if after.enqueue != self.dequeue and self._after(after).enqueue != self.dequeue:
            return True
        if after.enqueue != self.dequeue:
            self._put(at, 0, CC_EVENT_RING_FULL << 24, trb_type(TRB_HOST_CONTROLLER_EVENT))
            self._at = after
        self.full = True
        self._full_at = self.dequeue
        return False

    def post(self, parameter: int, status: int, control: int) -> bool:
        """Write one event TRB (``control`` without its cycle bit); False when the
        ring was full (see :meth:`reserve`) and the event was not written."""
        if not self.reserve():
            return False
        at = self._current()
        self._put(at, parameter, status, control)
        self._at = self._after(at)
        return True

    def _put(self, at: _Producer, parameter: int, status: int, control: int) -> None:
        # the cycle bit goes last: a guest polling the ring never sees half an event
        self._write(at.enqueue, struct.pack("<QI", parameter & MASK64, status & 0xFFFFFFFF))
        self._write(at.enqueue + 12, struct.pack("<I", (control & ~TRB_CYCLE & 0xFFFFFFFF)
                                                 | at.cycle))
