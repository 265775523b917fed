"""A 16550A UART (COM1) as a pure register model.

Register map (offsets from the UART base, all 8 bits wide)::

    +0  RBR (read) / THR (write)       DLL when LCR.DLAB = 1
    +1  IER                            DLM when LCR.DLAB = 1
    +2  IIR (read) / FCR (write)
    +3  LCR
    +4  MCR
    +5  LSR (read only)
    +6  MSR (read only)
    +7  SCR (scratch)

Model choices:

* The transmitter is instantaneous: every THR write hands one byte to the
  injected ``out`` stream (``out.write(bytes([b]))`` then ``out.flush()`` when
  it has one), so THRE and TEMT always read 1.  A stream error drops the byte.
* Receive: a bounded FIFO (``input_capacity`` bytes) fed by
  :meth:`Serial16550.enqueue_input`, which accepts only what fits.  The FIFO
  buffers whether or not FCR enables FIFO mode, so the host never overruns it
  (LSR.OE never sets).  Once the host filled the FIFO (or was refused input),
  ``on_input_space`` is called when the guest has drained the FIFO empty.
* IIR reports "received data available" (0x04) whenever the FIFO holds data;
  FCR trigger levels and the character-timeout source are not modelled.
* Interrupt output follows QEMU, not the PC wiring: the line is asserted
  whenever an enabled interrupt is pending, regardless of MCR.OUT2 (Linux sets
  OUT2 anyway).  The level is driven only when it changes.
* Loopback (MCR bit 4): THR writes go to the receive FIFO instead of ``out``,
  and MSR reflects MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD).  Outside
  loopback MSR reads DCD|DSR|CTS (a connected modem).  Host input is accepted
  in either mode.

Host-side calls (:meth:`enqueue_input`) may come from another thread than the
guest's register accesses, so the model holds its own lock; callbacks run
outside it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from pyhv.engine.devices import InterruptLine

# IER bits
IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MSI = 0x08
# IIR values
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ENABLED = 0xC0
# FCR bits
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
# LCR / MCR bits
LCR_DLAB = 0x80
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
# LSR bits
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
# MSR bits
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

#: default receive buffering, in bytes (a 16550A has 16; the host may use more)
DEFAULT_INPUT_CAPACITY = 64


class OutStream(Protocol):
    """Where transmitted bytes go (``flush`` is optional)."""

    def write(self, data: bytes, /) -> object: ...


class Serial16550:
    """16550A UART register model with a bounded receive FIFO."""

    def __init__(
        self,
        irq: InterruptLine,
        out: OutStream | None = None,
        *,
        on_input_space: Callable[[], None] | None = None,
        input_capacity: int = DEFAULT_INPUT_CAPACITY,
    ) -> None:
        if input_capacity < 1:
            raise ValueError("input_capacity must be at least 1")
        self.irq = irq
        self.out = out
        self.on_input_space = on_input_space
        #: the interrupt enable register changed (its new value; under the lock)
        self.on_ier: Callable[[int], None] | None = None
        self.input_capacity = input_capacity
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._host_waiting = False
        self._irq_level = False
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0x00
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._thr_pending = False
        self._msr_status = self._modem_status()
        self._msr_delta = 0

    # ---- host side -------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes received from the host; returns how many were accepted."""
        with self._lock:
            room = self.input_capacity - len(self._rx)
            taken = data[:max(room, 0)]
            self._rx.extend(taken)
            if len(taken) < len(data) or len(self._rx) >= self.input_capacity:
                self._host_waiting = True
            self._update_irq()
            return len(taken)

    def has_input_space(self) -> bool:
        """Whether :meth:`enqueue_input` would accept at least one byte."""
        with self._lock:
            return len(self._rx) < self.input_capacity

    @property
    def pending_input(self) -> int:
        """Bytes in the receive FIFO not yet read by the guest."""
        return len(self._rx)

    # ---- guest side ------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read the register at ``offset``; wide accesses act on that byte."""
        notify = False
        with self._lock:
            if offset == 0:
                if self._lcr & LCR_DLAB:
                    value = self._dll
                else:
                    value, notify = self._pop_rx()
            elif offset == 1:
                value = self._dlm if self._lcr & LCR_DLAB else self._ier
            elif offset == 2:
                value = self._iir()
                if value & 0x0F == IIR_THRE:
                    self._thr_pending = False
                    self._update_irq()
            elif offset == 3:
                value = self._lcr
            elif offset == 4:
                value = self._mcr
            elif offset == 5:
                value = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
            elif offset == 6:
                value = self._msr_status | self._msr_delta
                self._msr_delta = 0
                self._update_irq()
            elif offset == 7:
                value = self._scr
            else:
                return (1 << (8 * size)) - 1 if size > 0 else 0
        if notify and self.on_input_space is not None:
            self.on_input_space()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the register at ``offset`` (low byte of ``value``)."""
        value &= 0xFF
        notify = False
        with self._lock:
            if offset == 0:
                if self._lcr & LCR_DLAB:
                    self._dll = value
                else:
                    self._transmit(value)
            elif offset == 1:
                if self._lcr & LCR_DLAB:
                    self._dlm = value
                else:
                    self._write_ier(value)
            elif offset == 2:
                notify = self._write_fcr(value)
            elif offset == 3:
                self._lcr = value
            elif offset == 4:
                self._mcr = value & 0x1F
                self._set_modem_status(self._modem_status())
            elif offset == 7:
                self._scr = value
            # LSR, MSR and anything beyond the 8 registers: writes ignored
            self._update_irq()
        if notify and self.on_input_space is not None:
            self.on_input_space()

    # ---- internals (lock held) -------------------------------------------
    def _pop_rx(self) -> tuple[int, bool]:
        if not self._rx:
            return 0, False
        value = self._rx.popleft()
        notify = False
        if not self._rx and self._host_waiting:
            self._host_waiting = False
            notify = True
        self._update_irq()
        return value, notify

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < self.input_capacity:
                self._rx.append(byte)
            if len(self._rx) >= self.input_capacity:
                self._host_waiting = True
        elif self.out is not None:
            try:
                self.out.write(bytes((byte,)))
                flush = getattr(self.out, "flush", None)
                if flush is not None:
                    flush()
            except (OSError, ValueError):
                pass  # a closed or broken host stream loses the byte
        # the byte left at once: THR is empty again (writing THR clears the
        # THRE interrupt, the empty THR raises it anew)
        self._thr_pending = True

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & 0x0F
        if self._ier & IER_THRE and not old & IER_THRE:
            # enabling ETBEI while THR is empty raises the THRE interrupt
            self._thr_pending = True
        if self._ier != old and self.on_ier is not None:
            self.on_ier(self._ier)

    def _write_fcr(self, value: int) -> bool:
        """Apply an FCR write; returns whether receive space was freed."""
        freed = False
        # toggling FIFO mode or an explicit reset empties the receiver
        reset = (value ^ self._fcr) & FCR_ENABLE or value & FCR_CLEAR_RX
        if reset and self._rx:
            self._rx.clear()
            freed = self._host_waiting
            self._host_waiting = False
        self._fcr = value & 0xC1 if value & FCR_ENABLE else 0
        return freed

    def _iir(self) -> int:
        fifo = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0
        if self._ier & IER_RDA and self._rx:
            return fifo | IIR_RDA
        if self._ier & IER_THRE and self._thr_pending:
            return fifo | IIR_THRE
        if self._ier & IER_MSI and self._msr_delta:
            return fifo | IIR_MSI
        return fifo | IIR_NO_INT

    def _modem_status(self) -> int:
        if not self._mcr & MCR_LOOP:
            return MSR_DCD | MSR_DSR | MSR_CTS
        mcr = self._mcr
        return ((MSR_CTS if mcr & MCR_RTS else 0)
                | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0)
                | (MSR_DCD if mcr & MCR_OUT2 else 0))

    def _set_modem_status(self, status: int) -> None:
        changed = status ^ self._msr_status
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if self._msr_status & MSR_RI and not status & MSR_RI:
            self._msr_delta |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        self._msr_status = status

    def _update_irq(self) -> None:
        level = not self._iir() & IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)
