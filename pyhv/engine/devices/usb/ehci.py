"""EHCI (Enhanced Host Controller Interface 1.0): ICH9's USB 2.0 controller.

``ich9-usb-ehci1`` (8086:293a, class 0x0c0320, revision 3): 4 KiB of MMIO at
BAR 0, six root hub ports with nothing ever attached, and three UHCI
companions (``ich9-usb-uhci1..3``, two ports each) that own the ports until
the guest sets CONFIGFLAG.

MMIO registers (offsets in BAR 0)::

    capability  0x00 CAPLENGTH 0x20, HCIVERSION 0x0100
                0x04 HCSPARAMS 0x3206: 6 ports, no port power control,
                     2 ports per companion, 3 companions
                0x08 HCCPARAMS 0x6881: 64-bit addressing, isochronous
                     threshold "whole frame" (as QEMU), EECP 0x68
                0x0C HCSP-PORTROUTE (0)
    operational 0x20 USBCMD    RS, HCRESET (done at once: reads 0), PSE, ASE,
                               IAAD (answered at once: IAA status), ITC
                0x24 USBSTS    USBINT, USBERRINT, PCD, FLR, HSE, IAA (write 1
                               to clear); HCHalted = not RS; PSS/ASS follow
                               PSE/ASE while running
                0x28 USBINTR   the six enables
                0x2C FRINDEX   14 bits, writable while halted, advancing every
                               125 us (microframes) from the injected clock
                0x30 CTRLDSSEGMENT  bits 63:32 of every data structure address
                0x34 PERIODICLISTBASE, 0x38 ASYNCLISTADDR
                0x60 CONFIGFLAG  0 -> 1 routes every port to this controller
                0x64 PORTSC0..5  port power (always on), port owner (1 while
                               CONFIGFLAG is 0), no device: no CCS, PED stays 0

Nothing is attached, so the schedules are not walked; when a schedule is
enabled (or its address changes) while running, the controller fetches its
first word once, and a failed fetch is a Host System Error (HSE, RS cleared).
Frame List Rollover is noticed when a register is accessed (no timers); Linux
does not enable its interrupt.

PCI configuration: SBRN 0x20, FLADJ 0x20, and the EHCI extended capability
USBLEGSUP at 0x68 (where HCCPARAMS.EECP points) with USBLEGCTLSTS at 0x6C: no
BIOS ever owns the controller, so the handoff Linux does completes at once.
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
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import Bar, ConfigSpace
from pyhv.engine.pci.device import INTEL, QEMU_SUBSYSTEM, QEMU_SUBSYSTEM_VENDOR

CLASS_EHCI = 0x0C0320
MMIO_BAR = 0
MMIO_SIZE = 0x1000
PORTS = 6
COMPANIONS = 3
PORTS_PER_COMPANION = 2
MICROFRAME = 125e-6

EECP = 0x68
CAPLENGTH = 0x20
HCIVERSION = 0x0100
HCSPARAMS = PORTS | (PORTS_PER_COMPANION << 8) | (COMPANIONS << 12)
HCC_64BIT = 0x1
HCC_IST_FRAME = 0x80
HCCPARAMS = HCC_64BIT | HCC_IST_FRAME | (EECP << 8)

# operational registers (offsets in the BAR)
OP = CAPLENGTH
USBCMD = OP + 0x00
USBSTS = OP + 0x04
USBINTR = OP + 0x08
FRINDEX = OP + 0x0C
CTRLDSSEGMENT = OP + 0x10
PERIODICLISTBASE = OP + 0x14
ASYNCLISTADDR = OP + 0x18
CONFIGFLAG = OP + 0x40
PORTSC = OP + 0x44

CMD_RS = 1 << 0
CMD_HCRESET = 1 << 1
CMD_PSE = 1 << 4
CMD_ASE = 1 << 5
CMD_IAAD = 1 << 6
CMD_ITC = 0xFF << 16
CMD_DEFAULT = 0x08 << 16
CMD_RW = CMD_RS | CMD_PSE | CMD_ASE | CMD_ITC

STS_INT = 1 << 0
STS_ERR = 1 << 1
STS_PCD = 1 << 2
STS_FLR = 1 << 3
STS_HSE = 1 << 4
STS_IAA = 1 << 5
STS_W1C = 0x3F
STS_HALT = 1 << 12
STS_RECL = 1 << 13
STS_PSS = 1 << 14
STS_ASS = 1 << 15

FRINDEX_MASK = 0x3FFF
FRINDEX_ROLL = 1 << 13  # a 1024-entry frame list rolls over as bit 13 toggles

PORT_CCS = 1 << 0
PORT_CSC = 1 << 1
PORT_PED = 1 << 2
PORT_PEDC = 1 << 3
PORT_OCC = 1 << 5
PORT_FPR = 1 << 6
PORT_SUSP = 1 << 7
PORT_PR = 1 << 8
PORT_PP = 1 << 12
PORT_OWNER = 1 << 13
PORT_TEST = 0xF << 16
PORT_WAKE = 0x7 << 20
PORT_RW = PORT_FPR | PORT_PR | PORT_OWNER | PORT_TEST | PORT_WAKE
PORT_W1C = PORT_CSC | PORT_PEDC | PORT_OCC

# PCI configuration: the legacy support extended capability
USBLEGSUP = EECP
USBLEGCTLSTS = EECP + 4
LEGSUP_BIOS_OWNED = 1 << 16
LEGSUP_OS_OWNED = 1 << 24

#: QEMU name → (device id, revision, interrupt pin)
MODELS = {"ich9-usb-ehci1": (0x293A, 0x03, 4)}


def ehci_config(model: str) -> ConfigSpace:
    try:
        device, revision, pin = MODELS[model]
    except KeyError:
        raise ValueError(f"no EHCI controller model {model!r}") from None
    cfg = ConfigSpace(INTEL, device, CLASS_EHCI, revision=revision, interrupt_pin=pin,
                      subsystem_vendor=QEMU_SUBSYSTEM_VENDOR, subsystem=QEMU_SUBSYSTEM,
                      bars=(Bar(MMIO_BAR, MMIO_SIZE),))
    cfg.set8(SBRN, 0x20)   # USB 2.0
    cfg.set8(FLADJ, 0x20)  # 60000 high-speed bit times a frame
    cfg.allow(FLADJ, 1, 0x3F)
    cfg.set32(USBLEGSUP, 0x01)  # capability id 1, last in the list, nobody owns it
    cfg.allow(USBLEGSUP + 2, 1, 0x01)  # HC BIOS Owned Semaphore
    cfg.allow(USBLEGSUP + 3, 1, 0x01)  # HC OS Owned Semaphore
    cfg.allow(USBLEGCTLSTS, 2, 0xE03F)  # SMI enables
    cfg.w1c[USBLEGCTLSTS + 3] = 0xE0    # SMI on OS ownership / PCI command / BAR
    return cfg


class EhciController(UsbHostController):
    """One EHCI function with six empty root hub ports."""

    kind = "usb-ehci"

    def __init__(self, memory: GuestMemory, model: str = "ich9-usb-ehci1", name: str = "",
                 clock: Clock = time.monotonic) -> None:
        self.model = model
        super().__init__(ehci_config(model), memory, name or model, clock, MICROFRAME,
                         FRINDEX_MASK)

    # ---- state -------------------------------------------------------------------------
    def _power_on(self) -> None:
        self.cmd = CMD_DEFAULT
        self.sts = 0
        self.intr = 0
        self.segment = 0
        self.periodic = 0
        self.async_ = 0
        self.configured = 0
        self.ports = [PORT_OWNER] * PORTS
        self._frame.reset()
        self._rolled = 0           # frame list rollovers noticed since the start

    @property
    def frindex(self) -> int:
        return self._frame.value

    def _tick(self) -> None:
        if not self.running:
            return
        start = self._frame.base & FRINDEX_MASK
        rolled = (start + self._frame.elapsed()) // FRINDEX_ROLL - start // FRINDEX_ROLL
        if rolled > self._rolled:
            self._rolled = rolled
            self.sts |= STS_FLR

    def _start(self) -> None:
        self._frame.start()
        self._rolled = 0
        self.cmd |= CMD_RS

    def _stop(self) -> None:
        self._tick()
        self._frame.stop()
        self.cmd &= ~CMD_RS

    def _address(self, low: int) -> int:
        return (self.segment << 32) | low

    def _fetch_schedules(self) -> None:
        """Read the first word of each enabled schedule, as a running controller does."""
        if not self.running:
            return
        try:
            if self.cmd & CMD_PSE:
                entry = (self.frindex >> 3) & 0x3FF
                self._dma_read32(self._address(self.periodic) + 4 * entry)
            if self.cmd & CMD_ASE:
                self._dma_read32(self._address(self.async_))
        except DmaError:
            self.sts |= STS_HSE
            self._stop()

    def _irq_pending(self) -> bool:
        return bool(self.sts & self.intr & STS_W1C)

    # ---- register access ------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        self._tick()
        value = super().bar_read(index, offset, size)
        self._update_irq()
        return value

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self._tick()
        super().bar_write(index, offset, size, value)

    def _reg_read(self, index: int, offset: int) -> int:
        if offset == 0x00:
            return CAPLENGTH | (HCIVERSION << 16)
        if offset == 0x04:
            return HCSPARAMS
        if offset == 0x08:
            return HCCPARAMS
        if offset == USBCMD:
            return self.cmd
        if offset == USBSTS:
            sts = self.sts
            if self.running:
                sts |= (STS_PSS if self.cmd & CMD_PSE else 0) | \
                    (STS_ASS if self.cmd & CMD_ASE else 0)
            else:
                sts |= STS_HALT
            return sts
        if offset == USBINTR:
            return self.intr
        if offset == FRINDEX:
            return self.frindex
        if offset == CTRLDSSEGMENT:
            return self.segment
        if offset == PERIODICLISTBASE:
            return self.periodic
        if offset == ASYNCLISTADDR:
            return self.async_
        if offset == CONFIGFLAG:
            return self.configured
        if PORTSC <= offset < PORTSC + 4 * PORTS:
            return self.ports[(offset - PORTSC) // 4] | PORT_PP
        return 0

    def _reg_write(self, index: int, offset: int, value: int, mask: int) -> None:
        if offset == USBCMD:
            self._write_cmd(value, mask)
        elif offset == USBSTS:
            self.sts &= ~(value & mask & STS_W1C)
        elif offset == USBINTR:
            self.intr = merge(self.intr, value, mask, STS_W1C)
        elif offset == FRINDEX:
            self._frame.write(value, mask)  # written only while halted
        elif offset == CTRLDSSEGMENT:
            self.segment = merge(self.segment, value, mask, 0xFFFFFFFF)
            self._fetch_schedules()
        elif offset == PERIODICLISTBASE:
            self.periodic = merge(self.periodic, value, mask, 0xFFFFF000)
            self._fetch_schedules()
        elif offset == ASYNCLISTADDR:
            self.async_ = merge(self.async_, value, mask, 0xFFFFFFE0)
            self._fetch_schedules()
        elif offset == CONFIGFLAG:
            self._write_configflag(merge(self.configured, value, mask, 0x1))
        elif PORTSC <= offset < PORTSC + 4 * PORTS:
            self._write_port((offset - PORTSC) // 4, value, mask)

    def _write_cmd(self, value: int, mask: int) -> None:
        if value & mask & CMD_HCRESET:
            self._power_on()  # done at once; the bit reads 0 again
            return
        if value & mask & CMD_IAAD:
            self.sts |= STS_IAA  # no cached queue heads: the doorbell is answered at once
        cmd = merge(self.cmd, value, mask, CMD_RW)
        was_running = self.running
        self.cmd = cmd & ~CMD_RS
        if cmd & CMD_RS:
            if was_running:
                self.cmd |= CMD_RS
            else:
                self._start()
            self._fetch_schedules()
        elif was_running:
            self._stop()

    def _write_configflag(self, flag: int) -> None:
        if flag and not self.configured:
            self.ports = [p & ~PORT_OWNER for p in self.ports]
        elif not flag:
            self.ports = [p | PORT_OWNER for p in self.ports]
        self.configured = flag

    def _write_port(self, i: int, value: int, mask: int) -> None:
        port = merge(self.ports[i], value, mask, PORT_RW)
        port &= ~(value & mask & PORT_W1C)
        if mask & PORT_PED and not value & PORT_PED:
            port &= ~PORT_PED  # software may disable, never enable
        if not self.configured:
            port |= PORT_OWNER  # the companions own every port until CONFIGFLAG is set
        if not port & PORT_CCS:
            port &= ~(PORT_PED | PORT_SUSP)
        self.ports[i] = port
