"""xHCI (eXtensible Host Controller Interface; specification 1.2, interface 1.0): qemu-xhci.

``qemu-xhci`` (1b36:000d, class 0x0c0330, revision 1): 16 KiB of 64-bit MMIO at
BAR 0, eight root hub ports (1-4 USB 3.0, 5-8 USB 2.0, QEMU's order) with
nothing ever attached, one interrupter on INTx (MSI and MSI-X are not offered).

BAR 0 layout::

    0x0000 capability   CAPLENGTH 0x40, HCIVERSION 0x0100,
                        HCSPARAMS1 64 slots / 1 interrupter / 8 ports,
                        HCSPARAMS2 ERST Max 2^4 segments, 2 scratchpad buffers,
                        HCCPARAMS1 64-bit, no port power control, xECP 0x20,
                        DBOFF 0x2000, RTSOFF 0x1000
    0x0020 extended     Supported Protocol: USB 3.0 ports 1-4, USB 2.0 ports 5-8
    0x0040 operational  USBCMD (R/S, HCRST, INTE, HSEE, EWE, EU3S), USBSTS
                        (HCH, HSE, EINT, PCD, SRE, HCE; CNR is clear at once),
                        PAGESIZE (4 KiB), DNCTRL, CRCR, DCBAAP, CONFIG
    0x0440 ports        PORTSC/PORTPMSC/PORTLI/PORTHLPMC per port: powered, no
                        device (no CCS), link state RxDetect, change bits W1C
    0x1000 runtime      MFINDEX (125 us microframes from the injected clock while
                        running), interrupter 0 at 0x1020
    0x2000 doorbells    0: the command ring; 1-64: device slots

The command ring is consumed when doorbell 0 is rung: No-Op, Enable Slot and
Disable Slot work; Address Device fails with USB Transaction Error (no device
answers on any port); the endpoint and device commands on an enabled slot
fail with Context State Error (the slot never leaves Enabled); Get Port
Bandwidth reports every port free; everything else is a TRB Error.  Each
completion is posted to interrupter 0's event ring, which raises IMAN.IP and
USBSTS.EINT and asserts INTx when IMAN.IE and USBCMD.INTE are set.  A full
event ring stalls the command ring (after an Event Ring Full Error event)
until the guest moves ERDP.

Guest memory that cannot be read or written (or bus mastering off) is a Host
System Error: USBSTS.HSE, R/S cleared (and PCI SERR# when HSEE and the
command register's SERR enable are set).  An unusable Event Ring Segment
Table (ERSTSZ 0 or above ERST Max, a segment outside 16..4096 TRBs) is a Host
Controller Error.  Both halt the controller until the guest resets it.
"""

from __future__ import annotations

import time

from pyhv.engine.devices.usb.common import (
    FLADJ,
    SBRN,
    Clock,
    DmaError,
    UsbHostController,
    merge,
)
from pyhv.engine.devices.usb.xhci_commands import execute_command
from pyhv.engine.devices.usb.xhci_rings import (
    CC_COMMAND_RING_STOPPED,
    MAX_TRBS_PER_DOORBELL,
    TRB_COMMAND_COMPLETION,
    CommandRing,
    EventRingError,
    Interrupter,
    trb_type,
)
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import CAP_ID_EXP, STATUS, Bar, ConfigSpace
from pyhv.engine.pci.device import (
    PCIE_ENDPOINT,
    QEMU_SUBSYSTEM,
    QEMU_SUBSYSTEM_VENDOR,
    REDHAT,
    pcie_capability,
)

CLASS_XHCI = 0x0C0330
DEVICE_QEMU_XHCI = 0x000D
MMIO_BAR = 0
MMIO_SIZE = 0x4000

MAX_SLOTS = 64
MAX_INTRS = 1
USB3_PORTS = 4              # ports 1..4
USB2_PORTS = 4              # ports 5..8
MAX_PORTS = USB3_PORTS + USB2_PORTS
ERST_MAX_EXP = 4            # up to 16 event ring segments
SCRATCHPADS = 2
MICROFRAME = 125e-6

# capability registers
CAPLENGTH = 0x40
HCIVERSION = 0x0100
XECP = 0x20
HCSPARAMS1 = MAX_SLOTS | (MAX_INTRS << 8) | (MAX_PORTS << 24)
HCSPARAMS2 = (ERST_MAX_EXP << 4) | ((SCRATCHPADS & 0x1F) << 27) | ((SCRATCHPADS >> 5) << 21)
HCSPARAMS3 = 0
HCC_AC64 = 1 << 0
HCCPARAMS1 = HCC_AC64 | ((XECP // 4) << 16)
DBOFF = 0x2000
RTSOFF = 0x1000
HCCPARAMS2 = 0
NAME_USB = 0x20425355  # "USB "
#: the extended capabilities: Supported Protocol for USB 3.0 then USB 2.0
EXT_CAPS = (
    0x03000002 | (4 << 8), NAME_USB, 1 | (USB3_PORTS << 8), 0,
    0x02000002, NAME_USB, (USB3_PORTS + 1) | (USB2_PORTS << 8), 0,
)

# operational registers
OP = CAPLENGTH
USBCMD = OP + 0x00
USBSTS = OP + 0x04
PAGESIZE = OP + 0x08
DNCTRL = OP + 0x14
CRCR = OP + 0x18
DCBAAP = OP + 0x30
CONFIG = OP + 0x38
PORTS_BASE = OP + 0x400
PORT_STRIDE = 0x10

CMD_RS = 1 << 0
CMD_HCRST = 1 << 1
CMD_INTE = 1 << 2
CMD_HSEE = 1 << 3
CMD_CSS = 1 << 8
CMD_CRS = 1 << 9
CMD_EWE = 1 << 10
CMD_EU3S = 1 << 11
CMD_RW = CMD_RS | CMD_INTE | CMD_HSEE | CMD_EWE | CMD_EU3S

STS_HCH = 1 << 0
STS_HSE = 1 << 2
STS_EINT = 1 << 3
STS_PCD = 1 << 4
STS_SRE = 1 << 10
STS_CNR = 1 << 11
STS_HCE = 1 << 12
STS_W1C = STS_HSE | STS_EINT | STS_PCD | STS_SRE

CRCR_RCS = 1 << 0
CRCR_CS = 1 << 1
CRCR_CA = 1 << 2
CRCR_CRR = 1 << 3

PORT_CCS = 1 << 0
PORT_PED = 1 << 1
PORT_PR = 1 << 4
PORT_PLS_SHIFT = 5
PORT_PLS = 0xF << PORT_PLS_SHIFT
PORT_PP = 1 << 9
PORT_LWS = 1 << 16
PORT_CHANGES = 0x7F << 17  # CSC, PEC, WRC, OCC, PRC, PLC, CEC
PORT_WAKE = 0x7 << 25      # WCE, WDE, WOE
PORT_WPR = 1 << 31
PLS_DISABLED = 4
PLS_RXDETECT = 5
PORTPMSC_USB3 = 0x0001FFFF
PORTPMSC_USB2 = 0xF001FFF8

# runtime registers
MFINDEX = RTSOFF
MFINDEX_MASK = 0x3FFF
IR0 = RTSOFF + 0x20
IR_SIZE = 0x20

PCI_CMD_SERR = 0x100
PCI_STATUS_SIGNALED_SERR = 0x4000


def xhci_config(express: bool = False) -> ConfigSpace:
    cfg = ConfigSpace(REDHAT, DEVICE_QEMU_XHCI, CLASS_XHCI, revision=0x01, interrupt_pin=1,
                      subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM,
                      pcie=express, bars=(Bar(MMIO_BAR, MMIO_SIZE, "mem64"),))
    cfg.set8(SBRN, 0x30)   # USB 3.0
    cfg.set8(FLADJ, 0x20)
    cfg.allow(FLADJ, 1, 0x3F)
    if express:
        cfg.add_capability(CAP_ID_EXP, *pcie_capability(PCIE_ENDPOINT))
    return cfg


class XhciController(UsbHostController):
    """qemu-xhci with eight empty root hub ports."""

    kind = "usb-xhci"

    def __init__(self, memory: GuestMemory, name: str = "qemu-xhci",
                 clock: Clock = time.monotonic, express: bool = False) -> None:
        self.model = "qemu-xhci"
        self.max_slots = MAX_SLOTS
        self.port_majors = (3,) * USB3_PORTS + (2,) * USB2_PORTS
        self.cmd_ring = CommandRing(self._dma_read)
        self.interrupter = Interrupter(self._dma_read, self._dma_write, 1 << ERST_MAX_EXP)
        super().__init__(xhci_config(express), memory, name, clock, MICROFRAME, MFINDEX_MASK)

    # ---- state -------------------------------------------------------------------------
    def _power_on(self) -> None:
        self.cmd = 0
        self.sts = 0
        self.dnctrl = 0
        self.dcbaap = 0
        self.max_slots_en = 0
        self.ports = [PORT_PP | (PLS_RXDETECT << PORT_PLS_SHIFT)] * MAX_PORTS
        self.portpmsc = [0] * MAX_PORTS
        self.slots: set[int] = set()
        #: what the guest's scratchpad buffer array held when the controller started
        self.scratchpad: list[int] = []
        self.cmd_ring.reset()
        self.interrupter.reset()
        self._frame.reset()
        self._stalled = False

    @property
    def mfindex(self) -> int:
        return self._frame.value

    def _start(self) -> None:
        if self.sts & STS_HCE:
            return  # only a reset recovers from a Host Controller Error
        self._frame.start()
        self.cmd |= CMD_RS
        try:
            self.scratchpad = []
            if SCRATCHPADS:
                array = self._dma_read64(self.dcbaap) & ~0x3F
                self.scratchpad = [self._dma_read64(array + 8 * i) & ~0xFFF
                                   for i in range(SCRATCHPADS)]
        except DmaError:
            self._host_system_error()

    def _stop(self) -> None:
        self._frame.stop()
        self.cmd &= ~CMD_RS
        self.cmd_ring.running = False
        self._stalled = False

    def _host_system_error(self) -> None:
        self.sts |= STS_HSE
        self._stop()
        if self.cmd & CMD_HSEE and self.config.command & PCI_CMD_SERR:
            self.config.set16(STATUS, self.config.get(STATUS, 2) | PCI_STATUS_SIGNALED_SERR)

    def _host_controller_error(self) -> None:
        self.sts |= STS_HCE
        self._stop()

    def _irq_pending(self) -> bool:
        return bool(self.cmd & CMD_INTE) and self.interrupter.pending

    def _signal(self) -> None:
        if self.interrupter.signal():
            self.sts |= STS_EINT

    # ---- the command ring --------------------------------------------------------------
    def _run_commands(self) -> None:
        ring, ir = self.cmd_ring, self.interrupter
        self._stalled = False
        budget = MAX_TRBS_PER_DOORBELL
        try:
            while self.running and ring.running and budget > 0:
                trb, used = ring.next_command(budget)
                budget -= used
                if trb is None:
                    return
                if not ir.reserve():
                    self._stalled = True  # resumed when the guest moves ERDP
                    self._signal()
                    return
                code, slot = execute_command(self, trb)
                ir.post(ring.dequeue, code << 24, trb_type(TRB_COMMAND_COMPLETION) | slot << 24)
                ring.advance()
                self._signal()
        except DmaError:
            self._host_system_error()
        except EventRingError:
            self._host_controller_error()

    def _stop_command_ring(self) -> None:
        """CRCR.CS or CA while the ring runs: nothing is in progress, so it stops now."""
        self.cmd_ring.running = False
        self._stalled = False
        try:
            if self.interrupter.post(self.cmd_ring.dequeue, CC_COMMAND_RING_STOPPED << 24,
                                     trb_type(TRB_COMMAND_COMPLETION)):
                self._signal()
        except DmaError:
            self._host_system_error()
        except EventRingError:
            self._host_controller_error()

    # ---- registers ------------------------------------------------------------------------
    def _reg_read(self, index: int, offset: int) -> int:
        if offset < CAPLENGTH:
            return self._cap_read(offset)
        if offset < PORTS_BASE:
            return self._op_read(offset)
        if offset < PORTS_BASE + PORT_STRIDE * MAX_PORTS:
            i, reg = divmod(offset - PORTS_BASE, PORT_STRIDE)
            if reg == 0:
                return self.ports[i]
            return self.portpmsc[i] if reg == 4 else 0
        if offset == MFINDEX:
            return self.mfindex
        if IR0 <= offset < IR0 + IR_SIZE:
            return self.interrupter.read(offset - IR0)
        return 0  # other interrupters, doorbells (read 0), reserved space

    def _cap_read(self, offset: int) -> int:
        if offset >= XECP:
            return EXT_CAPS[(offset - XECP) // 4]
        return (CAPLENGTH | (HCIVERSION << 16), HCSPARAMS1, HCSPARAMS2, HCSPARAMS3,
                HCCPARAMS1, DBOFF, RTSOFF, HCCPARAMS2)[offset // 4]

    def _op_read(self, offset: int) -> int:
        if offset == USBCMD:
            return self.cmd
        if offset == USBSTS:
            return self.sts | (0 if self.running else STS_HCH)
        if offset == PAGESIZE:
            return 1  # 4 KiB pages
        if offset == DNCTRL:
            return self.dnctrl
        if offset == CRCR:
            return CRCR_CRR if self.cmd_ring.running else 0  # the pointer reads 0
        if offset == DCBAAP:
            return self.dcbaap & 0xFFFFFFFF
        if offset == DCBAAP + 4:
            return self.dcbaap >> 32
        if offset == CONFIG:
            return self.max_slots_en
        return 0

    def _reg_write(self, index: int, offset: int, value: int, mask: int) -> None:
        if OP <= offset < PORTS_BASE:
            self._op_write(offset, value, mask)
        elif PORTS_BASE <= offset < PORTS_BASE + PORT_STRIDE * MAX_PORTS:
            i, reg = divmod(offset - PORTS_BASE, PORT_STRIDE)
            if reg == 0:
                self._port_write(i, value, mask)
            elif reg == 4:
                writable = PORTPMSC_USB3 if i < USB3_PORTS else PORTPMSC_USB2
                self.portpmsc[i] = merge(self.portpmsc[i], value, mask, writable)
        elif IR0 <= offset < IR0 + IR_SIZE:
            if self.interrupter.write(offset - IR0, value, mask):
                self.sts |= STS_EINT
            if self._stalled and not self.interrupter.full:
                self._run_commands()
        elif DBOFF <= offset <= DBOFF + 4 * MAX_SLOTS:
            self._doorbell((offset - DBOFF) // 4, value, mask)

    def _op_write(self, offset: int, value: int, mask: int) -> None:
        if offset == USBCMD:
            self._write_cmd(value, mask)
        elif offset == USBSTS:
            self.sts &= ~(value & mask & STS_W1C)
        elif offset == DNCTRL:
            self.dnctrl = merge(self.dnctrl, value, mask, 0xFFFF)
        elif offset in (CRCR, CRCR + 4):
            self._crcr_write(offset == CRCR + 4, value, mask)
        elif offset in (DCBAAP, DCBAAP + 4):
            shift = 32 if offset == DCBAAP + 4 else 0
            writable = 0xFFFFFFFF if shift else 0xFFFFFFC0
            self.dcbaap = merge(self.dcbaap, value << shift, mask << shift, writable << shift)
        elif offset == CONFIG:
            self.max_slots_en = merge(self.max_slots_en, value, mask, 0xFF)

    def _write_cmd(self, value: int, mask: int) -> None:
        if value & mask & CMD_HCRST:
            self._power_on()  # done at once: HCRST and CNR read 0
            return
        # CSS / CRS: nothing of the controller's state is lost while halted, so saving
        # and restoring finish at once (SSS and RSS never read busy)
        cmd = merge(self.cmd, value, mask, CMD_RW)
        was_running = self.running
        self.cmd = cmd & ~CMD_RS
        if cmd & CMD_RS:
            if was_running:
                self.cmd |= CMD_RS
            else:
                self._start()
        elif was_running:
            self._stop()

    def _crcr_write(self, high: bool, value: int, mask: int) -> None:
        ring = self.cmd_ring
        if ring.running:
            # pointer and cycle state are ignored while the ring runs
            if not high and value & mask & (CRCR_CS | CRCR_CA):
                self._stop_command_ring()
            return
        if high:
            ring.dequeue = merge(ring.dequeue, value << 32, mask << 32, 0xFFFFFFFF << 32)
        else:
            ring.dequeue = merge(ring.dequeue, value, mask, 0xFFFFFFC0)
            if mask & CRCR_RCS:
                ring.ccs = value & CRCR_RCS

    def _port_write(self, i: int, value: int, mask: int) -> None:
        port = self.ports[i]
        port &= ~(value & mask & PORT_CHANGES)
        port = merge(port, value, mask, PORT_WAKE)
        if i < USB3_PORTS and value & mask & PORT_LWS and mask & PORT_PLS == PORT_PLS:
            # with nothing attached, a USB 3 port may only be disabled or re-enabled
            pls = (value & PORT_PLS) >> PORT_PLS_SHIFT
            if pls in (PLS_DISABLED, PLS_RXDETECT):
                port = (port & ~PORT_PLS) | (pls << PORT_PLS_SHIFT)
        # PED (write 1 to disable) is 0 already; PR and WPR need a device to reset
        self.ports[i] = port

    def _doorbell(self, target: int, value: int, mask: int) -> None:
        if not mask & 0xFF:
            return
        if target == 0:
            if value & 0xFF == 0 and self.running:  # DB target 0: the command ring
                self.cmd_ring.running = True
                self._run_commands()
        # device slot doorbells: no endpoint is ever running (no device can be
        # addressed), and a doorbell for a disabled endpoint is ignored
