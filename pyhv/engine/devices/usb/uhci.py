"""UHCI (Universal Host Controller Interface 1.1): PIIX3's and ICH9's USB 1.1 controllers.

``piix3-usb-uhci`` (8086:7020, what libvirt gives a ``pc`` machine at 00:01.2)
and the ICH9 companions ``ich9-usb-uhci1..3`` (8086:2934-2936) of
``ich9-usb-ehci1``.  Class 0x0c0300, 32 bytes of port I/O at BAR 4, two root
hub ports with nothing ever attached.

I/O registers (offsets in BAR 4)::

    0x00 USBCMD    RS, HCRESET (done at once: reads 0), GRESET, EGSM, FGR,
                   SWDBG, CF, MAXP
    0x02 USBSTS    USBINT, USBERRINT, RD, HSE, HCPE (write 1 to clear);
                   HCHalted reads 1 whenever RS is 0
    0x04 USBINTR   timeout/CRC, resume, IOC, short packet enables
    0x06 FRNUM     11 bits; writable while halted; while running it advances
                   once a millisecond (frames) from the injected clock
    0x08 FRBASEADD frame list base, 4 KiB aligned
    0x0C SOFMOD    byte, 0x40 after reset
    0x10 PORTSC1   0x0080 with nothing attached: bit 7 reads 1 as on real
    0x12 PORTSC2   hardware, no CCS; PE cannot be set without a device
    0x14..         read 0 (bit 7 clear: Linux counts two ports)

Nothing is ever attached, so the frame list is not walked; when the
controller starts (or is pointed at a new frame list while running) it fetches
the current frame list entry once, and a fetch that fails (not RAM, bus
mastering off) is a Host System Error: HSE set, RS cleared, interrupt raised,
as the specification describes.  HSE and HCPE always interrupt; the other
status bits interrupt when USBINTR enables them.

PCI configuration: SBRN (0x60) is 0x10, and the legacy support register
LEGSUP (0xC0) resets to 0x2000 (PIRQ enabled) with bits 8-11 and 15
write-one-to-clear and 6, 12, 14 read-only, as Linux's uhci_hcd expects (it
writes 0x8f00 to clear the trap bits, then 0x2000).
"""

from __future__ import annotations

import time

from pyhv.engine.devices.usb.common import (
    SBRN,
    Clock,
    DmaError,
    UsbHostController,
    merge,
)
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import Bar, ConfigSpace
from pyhv.engine.pci.device import INTEL, QEMU_SUBSYSTEM, QEMU_SUBSYSTEM_VENDOR

CLASS_UHCI = 0x0C0300
IO_BAR = 4
IO_SIZE = 32
PORTS = 2
FRAME_PERIOD = 1e-3  # one frame a millisecond

# registers
USBCMD = 0x00
USBSTS = 0x02
USBINTR = 0x04
FRNUM = 0x06
FRBASEADD = 0x08
SOFMOD = 0x0C
PORTSC1 = 0x10

CMD_RS = 0x0001
CMD_HCRESET = 0x0002
CMD_GRESET = 0x0004
CMD_EGSM = 0x0008
CMD_FGR = 0x0010
CMD_SWDBG = 0x0020
CMD_CF = 0x0040
CMD_MAXP = 0x0080
CMD_RW = CMD_RS | CMD_GRESET | CMD_EGSM | CMD_FGR | CMD_SWDBG | CMD_CF | CMD_MAXP

STS_USBINT = 0x0001
STS_ERROR = 0x0002
STS_RD = 0x0004
STS_HSE = 0x0008
STS_HCPE = 0x0010
STS_HCH = 0x0020
STS_W1C = STS_USBINT | STS_ERROR | STS_RD | STS_HSE | STS_HCPE

INTR_TIMEOUT = 0x1
INTR_RESUME = 0x2
INTR_IOC = 0x4
INTR_SP = 0x8

FRNUM_MASK = 0x07FF
SOFMOD_DEFAULT = 0x40

PORT_CCS = 0x0001
PORT_CSC = 0x0002
PORT_PE = 0x0004
PORT_PEC = 0x0008
PORT_RD = 0x0040
PORT_ALWAYS_ONE = 0x0080
PORT_PR = 0x0200
PORT_SUSP = 0x1000
PORT_RW = PORT_RD | PORT_PR | PORT_SUSP
PORT_W1C = PORT_CSC | PORT_PEC

# PCI configuration: legacy support
LEGSUP = 0xC0
LEGSUP_DEFAULT = 0x2000
LEGSUP_RWC = 0x8F00
LEGSUP_RO = 0x5040

#: QEMU name → (device id, revision, interrupt pin (1 = INTA))
MODELS = {
    "piix3-usb-uhci": (0x7020, 0x01, 4),
    "ich9-usb-uhci1": (0x2934, 0x03, 1),
    "ich9-usb-uhci2": (0x2935, 0x03, 2),
    "ich9-usb-uhci3": (0x2936, 0x03, 3),
}


def uhci_config(model: str) -> ConfigSpace:
    try:
        device, revision, pin = MODELS[model]
    except KeyError:
        raise ValueError(f"no UHCI controller model {model!r}") from None
    cfg = ConfigSpace(INTEL, device, CLASS_UHCI, revision=revision, interrupt_pin=pin,
                      subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM,
                      bars=(Bar(IO_BAR, IO_SIZE, "io"),))
    cfg.set8(SBRN, 0x10)  # USB 1.0/1.1
    cfg.set16(LEGSUP, LEGSUP_DEFAULT)
    cfg.allow(LEGSUP, 2, 0xFFFF & ~(LEGSUP_RWC | LEGSUP_RO))
    cfg.w1c[LEGSUP:LEGSUP + 2] = LEGSUP_RWC.to_bytes(2, "little")
    return cfg


class UhciController(UsbHostController):
    """One UHCI function with two empty root hub ports."""

    kind = "usb-uhci"

    def __init__(self, memory: GuestMemory, model: str = "piix3-usb-uhci",
                 name: str = "", clock: Clock = time.monotonic) -> None:
        self.model = model
        super().__init__(uhci_config(model), memory, name or model, clock, FRAME_PERIOD,
                         FRNUM_MASK)

    # ---- state ------------------------------------------------------------------------
    def _power_on(self) -> None:
        self.cmd = 0
        self.sts = 0
        self.intr = 0
        self.flbase = 0
        self.sofmod = SOFMOD_DEFAULT
        self.ports = [0] * PORTS
        self._frame.reset()

    @property
    def frnum(self) -> int:
        return self._frame.value

    def _start(self) -> None:
        self._frame.start()
        self.cmd |= CMD_RS
        self._fetch_frame()

    def _stop(self) -> None:
        self._frame.stop()
        self.cmd &= ~CMD_RS

    def _fetch_frame(self) -> None:
        """Read the current frame list entry, as the controller does each frame."""
        if not self.running:
            return
        try:
            self._dma_read32(self.flbase + (self.frnum & 0x3FF) * 4)
        except DmaError:
            self.sts |= STS_HSE
            self._stop()

    def _irq_pending(self) -> bool:
        s, e = self.sts, self.intr
        return bool(s & (STS_HSE | STS_HCPE)
                    or (s & STS_USBINT and e & (INTR_IOC | INTR_SP))
                    or (s & STS_ERROR and e & INTR_TIMEOUT)
                    or (s & STS_RD and e & INTR_RESUME))

    # ---- registers ------------------------------------------------------------------------
    def _read16(self, offset: int) -> int:
        if offset == USBCMD:
            return self.cmd
        if offset == USBSTS:
            return self.sts | (0 if self.running else STS_HCH)
        if offset == USBINTR:
            return self.intr
        if offset == FRNUM:
            return self.frnum
        if offset == FRBASEADD:
            return self.flbase & 0xFFFF
        if offset == FRBASEADD + 2:
            return self.flbase >> 16
        if offset == SOFMOD:
            return self.sofmod
        if PORTSC1 <= offset < PORTSC1 + 2 * PORTS:
            return self.ports[(offset - PORTSC1) // 2] | PORT_ALWAYS_ONE
        return 0

    def _reg_read(self, index: int, offset: int) -> int:
        return self._read16(offset) | (self._read16(offset + 2) << 16)

    def _reg_write(self, index: int, offset: int, value: int, mask: int) -> None:
        if offset == FRBASEADD:
            self.flbase = merge(self.flbase, value, mask, 0xFFFFF000)
            self._fetch_frame()
            return
        for half in (0, 2):
            m = (mask >> (8 * half)) & 0xFFFF
            if m:
                self._write16(offset + half, (value >> (8 * half)) & 0xFFFF, m)

    def _write16(self, offset: int, value: int, mask: int) -> None:
        if offset == USBCMD:
            self._write_cmd(merge(self.cmd, value, mask, CMD_RW | CMD_HCRESET))
        elif offset == USBSTS:
            self.sts &= ~(value & mask & STS_W1C)
        elif offset == USBINTR:
            self.intr = merge(self.intr, value, mask, 0xF)
        elif offset == FRNUM:
            # "cannot be written unless the controller is stopped"
            self._frame.write(value, mask)
        elif offset == SOFMOD:
            self.sofmod = merge(self.sofmod, value, mask, 0x7F)
        elif PORTSC1 <= offset < PORTSC1 + 2 * PORTS:
            i = (offset - PORTSC1) // 2
            port = merge(self.ports[i], value, mask, PORT_RW)
            port &= ~(value & mask & PORT_W1C)
            if not port & PORT_CCS:
                port &= ~PORT_PE  # only a connected port can be enabled
            self.ports[i] = port

    def _write_cmd(self, cmd: int) -> None:
        if cmd & CMD_HCRESET:
            # the reset completes at once: every register back to its default
            self._power_on()
            return
        if cmd & CMD_GRESET:
            if not self.cmd & CMD_GRESET:
                self._power_on()  # global reset: held until software clears the bit
            cmd &= ~CMD_RS        # and nothing runs meanwhile
        was_running = self.running
        self.cmd = cmd & ~CMD_RS
        if cmd & CMD_RS and not was_running:
            self._start()
        elif cmd & CMD_RS:
            self.cmd |= CMD_RS
        elif was_running:
            self._stop()
