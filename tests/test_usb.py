"""USB host controllers (pyhv/engine/devices/usb): UHCI, EHCI and xHCI register models
driven as Linux's uhci_hcd, ehci_hcd and xhci_hcd drive them, on bytearray guest memory."""

from __future__ import annotations

import random
import struct

import pytest

from pyhv.engine.bus import Bus
from pyhv.engine.devices import RecordingLine
from pyhv.engine.devices.usb import (
    MODELS,
    EhciController,
    UhciController,
    XhciController,
    usb_controller,
)
from pyhv.engine.devices.usb import ehci as E
from pyhv.engine.devices.usb import uhci as U
from pyhv.engine.devices.usb import xhci as X
from pyhv.engine.devices.usb import xhci_rings as R
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import (
    BAR0,
    CAP_ID_MSI,
    CAP_ID_MSIX,
    CMD_INTX_DISABLE,
    CMD_IO,
    CMD_MASTER,
    CMD_MEMORY,
    COMMAND,
    STATUS,
)
from pyhv.engine.pci.device import HostBridge, IsaBridge, PciBuses
from pyhv.engine.pci.firmware import PciFirmware
from pyhv.engine.pci.platform import PCI_INTX_GSIS
from pyhv.engine.pci.root import ConfigIo, PciRoot, devfn
from pyhv.engine.resources import AddressAllocator

RAM = 1 << 20


class Clock:
    """A monotonic clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def memory() -> GuestMemory:
    return GuestMemory.from_bytearrays([(0, RAM)])


def enable(fn, *, master: bool = True) -> None:
    """What pci_enable_device + pci_set_master do."""
    fn.config_write(COMMAND, 2, CMD_IO | CMD_MEMORY | (CMD_MASTER if master else 0))


def wired(fn):
    line = RecordingLine()
    fn.set_intx(line, 11)
    return line


def trb(mem: GuestMemory, addr: int) -> R.Trb:
    return R.Trb.parse(mem.read(addr, 16))


# ---- PCI configuration -------------------------------------------------------------

IDS = {
    "piix3-usb-uhci": (0x8086, 0x7020, 0x0C0300, 0x01, 4),
    "ich9-usb-uhci1": (0x8086, 0x2934, 0x0C0300, 0x03, 1),
    "ich9-usb-uhci2": (0x8086, 0x2935, 0x0C0300, 0x03, 2),
    "ich9-usb-uhci3": (0x8086, 0x2936, 0x0C0300, 0x03, 3),
    "ich9-usb-ehci1": (0x8086, 0x293A, 0x0C0320, 0x03, 4),
    "qemu-xhci": (0x1B36, 0x000D, 0x0C0330, 0x01, 1),
}


@pytest.mark.parametrize("model", sorted(IDS))
def test_config_ids_class_and_no_msi(model: str) -> None:
    fn = usb_controller(model, memory())
    vendor, device, cls, rev, pin = IDS[model]
    assert fn.config_read(0, 2) == vendor and fn.config_read(2, 2) == device
    assert fn.config_read(8, 4) == (cls << 8) | rev
    assert fn.config_read(0x3D, 1) == pin
    assert fn.config_read(0x2C, 4) == 0x1100_1AF4  # QEMU's subsystem ids
    assert fn.config_read(0x60, 1) == {0x0C0300: 0x10, 0x0C0320: 0x20, 0x0C0330: 0x30}[cls]
    ids = [cap for _off, cap in fn.config.capabilities()]
    assert CAP_ID_MSI not in ids and CAP_ID_MSIX not in ids
    assert set(MODELS) == set(IDS)


@pytest.mark.parametrize("model,index,sized", [
    ("piix3-usb-uhci", 4, [0xFFFFFFE1]),              # 32 bytes of I/O
    ("ich9-usb-uhci2", 4, [0xFFFFFFE1]),
    ("ich9-usb-ehci1", 0, [0xFFFFF000]),              # 4 KiB, 32-bit memory
    ("qemu-xhci", 0, [0xFFFFC004, 0xFFFFFFFF]),       # 16 KiB, 64-bit memory
])
def test_bar_sizing(model: str, index: int, sized: list[int]) -> None:
    fn = usb_controller(model, memory())
    for i, want in enumerate(sized):
        off = BAR0 + 4 * (index + i)
        fn.config_write(off, 4, 0xFFFFFFFF)
        assert fn.config_read(off, 4) == want
    others = [i for i in range(6) if not index <= i < index + len(sized)]
    for i in others:
        fn.config_write(BAR0 + 4 * i, 4, 0xFFFFFFFF)
        assert fn.config_read(BAR0 + 4 * i, 4) == 0


def test_xhci_on_pcie_has_an_express_capability_only() -> None:
    fn = usb_controller("qemu-xhci", memory(), express=True)
    assert [cap for _o, cap in fn.config.capabilities()] == [0x10]
    with pytest.raises(ValueError, match="no USB controller model"):
        usb_controller("nec-usb-xhci", memory())


def test_uhci_legsup_as_linux_writes_it() -> None:
    fn = UhciController(memory())
    assert fn.config_read(U.LEGSUP, 2) == 0x2000
    # the BIOS left trap status and an SMI enable behind
    fn.config.set16(U.LEGSUP, 0x2000 | 0x0F00 | 0x8000 | 0x0010)
    fn.config_write(U.LEGSUP, 2, U.LEGSUP_RWC)        # uhci_reset_hc
    assert fn.config_read(U.LEGSUP, 2) == 0x0000       # RWC cleared, PIRQ/SMI enables off
    fn.config_write(U.LEGSUP, 2, 0xFFFF & ~U.LEGSUP_RWC)
    assert fn.config_read(U.LEGSUP, 2) & U.LEGSUP_RO == 0   # read-only bits stay 0
    fn.config_write(U.LEGSUP, 2, U.LEGSUP_DEFAULT)      # uhci_pci_resume / configure_hc
    assert fn.config_read(U.LEGSUP, 2) == 0x2000


def test_ehci_bios_handoff_completes_at_once() -> None:
    """quirk_usb_disable_ehci: EECP from HCCPARAMS, then the USBLEGSUP semaphores."""
    fn = EhciController(memory())
    enable(fn)
    hcc = fn.bar_read(0, 0x08, 4)
    assert hcc & 1                                      # 64-bit addressing
    offset = (hcc >> 8) & 0xFF
    assert offset == 0x68
    cap = fn.config_read(offset, 4)
    assert cap & 0xFF == 1 and (cap >> 8) & 0xFF == 0   # USBLEGSUP, last capability
    assert not cap & E.LEGSUP_BIOS_OWNED
    fn.config_write(offset + 3, 1, 1)                   # OS owned
    cap = fn.config_read(offset, 4)
    assert cap & E.LEGSUP_OS_OWNED and not cap & E.LEGSUP_BIOS_OWNED
    fn.config_write(offset + 4, 4, 0)                   # disable SMIs
    assert fn.config_read(offset + 4, 4) == 0
    fn.config_write(offset + 4, 4, 0xFFFFFFFF)
    assert fn.config_read(offset + 4, 4) == 0xE03F      # enables stick, status is W1C
    assert fn.config_read(0x61, 1) == 0x20              # FLADJ


# ---- UHCI ----------------------------------------------------------------------------

def uhci_started(clock: Clock) -> tuple[UhciController, GuestMemory, RecordingLine]:
    mem = memory()
    hc = UhciController(mem, clock=clock)
    line = wired(hc)
    enable(hc)
    # the frame list: 1024 terminating link pointers
    mem.write(0x4000, struct.pack("<1024I", *([1] * 1024)))
    hc.bar_write(4, U.SOFMOD, 1, 64)
    hc.bar_write(4, U.FRBASEADD, 4, 0x4000)
    hc.bar_write(4, U.FRNUM, 2, 0)
    hc.bar_write(4, U.USBCMD, 2, U.CMD_RS | U.CMD_CF | U.CMD_MAXP)
    hc.bar_write(4, U.USBINTR, 2, 0xF)
    return hc, mem, line


def test_uhci_linux_probe_reset_and_ports() -> None:
    hc = UhciController(memory(), "ich9-usb-uhci1")
    enable(hc)
    # uhci_count_ports: PORTSC registers read with bit 7 set, the first one without ends it
    ports = 0
    while ports < 8 and hc.bar_read(4, U.PORTSC1 + 2 * ports, 2) & 0x80:
        ports += 1
    assert ports == 2
    assert hc.bar_read(4, U.PORTSC1, 2) == 0x0080      # nothing attached
    # uhci_check_and_reset_hc finds it needs a reset (not configured), uhci_reset_hc
    assert not hc.bar_read(4, U.USBCMD, 2) & U.CMD_CF
    hc.bar_write(4, U.USBCMD, 2, U.CMD_HCRESET)
    assert hc.bar_read(4, U.USBCMD, 2) == 0             # HCRESET completed
    hc.bar_write(4, U.USBINTR, 2, 0)
    hc.bar_write(4, U.USBCMD, 2, 0)
    assert hc.bar_read(4, U.USBSTS, 2) == U.STS_HCH
    assert hc.bar_read(4, U.SOFMOD, 1) == 0x40
    # port writes: PE cannot be set without a device, W1C bits, reset and suspend stored
    hc.bar_write(4, U.PORTSC1, 2, U.PORT_PE | U.PORT_CSC | U.PORT_PEC)
    assert hc.bar_read(4, U.PORTSC1, 2) == 0x0080
    hc.bar_write(4, U.PORTSC1 + 2, 2, U.PORT_PR)
    assert hc.bar_read(4, U.PORTSC1, 4) == 0x0080 | ((0x0080 | U.PORT_PR) << 16)
    hc.bar_write(4, U.PORTSC1 + 2, 2, 0)
    assert hc.bar_read(4, 0x14, 4) == 0


def test_uhci_frame_counter_runs_only_while_running() -> None:
    clock = Clock()
    hc = UhciController(memory(), clock=clock)
    enable(hc)
    hc.bar_write(4, U.FRNUM, 2, 0x7FC)
    clock.advance(1.0)
    assert hc.bar_read(4, U.FRNUM, 2) == 0x7FC          # halted: frozen
    hc.bar_write(4, U.USBCMD, 2, U.CMD_RS)
    assert not hc.bar_read(4, U.USBSTS, 2) & U.STS_HCH
    clock.advance(0.0025)
    assert hc.bar_read(4, U.FRNUM, 2) == 0x7FE
    hc.bar_write(4, U.FRNUM, 2, 0x100)                  # ignored while running
    clock.advance(0.003)
    assert hc.bar_read(4, U.FRNUM, 2) == 0x001          # 11 bits wrap
    hc.bar_write(4, U.USBCMD, 2, U.CMD_CF)              # stop
    assert hc.bar_read(4, U.USBSTS, 2) & U.STS_HCH      # halted at once (suspend_rh)
    clock.advance(5.0)
    assert hc.bar_read(4, U.FRNUM, 2) == 0x001
    hc.bar_write(4, U.FRNUM, 2, 0x234)
    assert hc.bar_read(4, U.USBINTR, 4) == 0x234 << 16  # dword read: USBINTR | FRNUM


def test_uhci_interrupts_and_host_system_error() -> None:
    clock = Clock()
    hc, mem, line = uhci_started(clock)
    assert hc.running and not line.level
    # an interrupt condition (as a completed TD would raise), enabled by USBINTR
    hc.sts |= U.STS_USBINT
    hc.bar_write(4, U.USBINTR, 2, 0xF)
    assert line.level and hc.config_read(STATUS, 2) & 0x08
    hc.config_write(COMMAND, 2, CMD_IO | CMD_MASTER | CMD_INTX_DISABLE)
    assert not line.level                               # Interrupt Disable masks the pin
    enable(hc)
    assert line.level
    status = hc.bar_read(4, U.USBSTS, 2)
    hc.bar_write(4, U.USBSTS, 2, status)                # uhci_irq acknowledges what it read
    assert not line.level and hc.running
    # the guest points the frame list outside RAM while running: Host System Error
    hc.bar_write(4, U.FRBASEADD, 4, 0xFFFF_F000)
    status = hc.bar_read(4, U.USBSTS, 2)
    assert status & U.STS_HSE and status & U.STS_HCH and not hc.running
    assert not hc.bar_read(4, U.USBCMD, 2) & U.CMD_RS
    assert line.level                                   # HSE always interrupts
    hc.bar_write(4, U.USBSTS, 2, U.STS_HSE)
    assert not line.level
    # bus mastering off: the first frame list fetch fails the same way
    hc.bar_write(4, U.FRBASEADD, 4, 0x4000)
    hc.config_write(COMMAND, 2, CMD_IO)
    hc.bar_write(4, U.USBCMD, 2, U.CMD_RS)
    assert hc.bar_read(4, U.USBSTS, 2) & U.STS_HSE and not hc.running
    # reset: power-on state, the line low
    hc.reset()
    assert not line.level and hc.bar_read(4, U.USBSTS, 2) == U.STS_HCH
    assert hc.bar_read(4, U.FRBASEADD, 4) == 0 and hc.bar_read(4, U.SOFMOD, 1) == 0x40


def test_uhci_global_reset_holds_the_controller() -> None:
    clock = Clock()
    hc, _mem, _line = uhci_started(clock)
    hc.bar_write(4, U.USBCMD, 2, U.CMD_GRESET | U.CMD_RS)
    assert not hc.running and hc.bar_read(4, U.USBCMD, 2) == U.CMD_GRESET
    assert hc.bar_read(4, U.FRBASEADD, 4) == 0
    hc.bar_write(4, U.USBCMD, 2, 0)
    assert hc.bar_read(4, U.USBSTS, 2) == U.STS_HCH


# ---- EHCI ------------------------------------------------------------------------------

def ehci_started(clock: Clock) -> tuple[EhciController, GuestMemory, RecordingLine]:
    """ehci_setup / ehci_reset / ehci_run, roughly in Linux's order."""
    mem = memory()
    hc = EhciController(mem, clock=clock)
    line = wired(hc)
    enable(hc)
    op = hc.bar_read(0, 0, 1)
    assert op == 0x20
    hc.bar_write(0, E.USBCMD, 4, hc.bar_read(0, E.USBCMD, 4) & ~E.CMD_RS)
    assert hc.bar_read(0, E.USBSTS, 4) & E.STS_HALT
    hc.bar_write(0, E.USBCMD, 4, E.CMD_HCRESET)
    assert not hc.bar_read(0, E.USBCMD, 4) & E.CMD_HCRESET
    mem.write(0x8000, struct.pack("<1024I", *([1] * 1024)))  # periodic list: all terminate
    mem.write(0x9000, struct.pack("<12I", 0x9002, *([0] * 11)))  # the async head QH
    hc.bar_write(0, E.CTRLDSSEGMENT, 4, 0)
    hc.bar_write(0, E.PERIODICLISTBASE, 4, 0x8000)
    hc.bar_write(0, E.ASYNCLISTADDR, 4, 0x9000)
    hc.bar_write(0, E.USBCMD, 4, (1 << 16) | E.CMD_RS)
    hc.bar_write(0, E.CONFIGFLAG, 4, 1)
    hc.bar_write(0, E.USBINTR, 4, E.STS_IAA | E.STS_HSE | E.STS_PCD | E.STS_ERR | E.STS_INT)
    return hc, mem, line


def test_ehci_capabilities_and_reset_state() -> None:
    hc = EhciController(memory())
    enable(hc)
    assert hc.bar_read(0, 0x00, 1) == 0x20 and hc.bar_read(0, 0x02, 2) == 0x0100
    hcs = hc.bar_read(0, 0x04, 4)
    assert hcs & 0xF == 6 and (hcs >> 8) & 0xF == 2 and (hcs >> 12) & 0xF == 3
    assert not hcs & 0x10                              # no port power control: always on
    assert hc.bar_read(0, E.USBCMD, 4) == 0x00080000
    assert hc.bar_read(0, E.USBSTS, 4) == E.STS_HALT
    for i in range(6):
        # powered, owned by the companion UHCIs until CONFIGFLAG, nothing attached
        assert hc.bar_read(0, E.PORTSC + 4 * i, 4) == E.PORT_PP | E.PORT_OWNER
    assert hc.bar_read(0, E.PORTSC + 4 * 6, 4) == 0


def test_ehci_run_schedules_ports_and_configflag() -> None:
    clock = Clock()
    hc, _mem, line = ehci_started(clock)
    sts = hc.bar_read(0, E.USBSTS, 4)
    assert not sts & (E.STS_HALT | E.STS_PSS | E.STS_ASS)
    for i in range(6):
        assert hc.bar_read(0, E.PORTSC + 4 * i, 4) == E.PORT_PP   # routed here, empty
    cmd = hc.bar_read(0, E.USBCMD, 4)
    hc.bar_write(0, E.USBCMD, 4, cmd | E.CMD_PSE | E.CMD_ASE)
    sts = hc.bar_read(0, E.USBSTS, 4)
    assert sts & E.STS_PSS and sts & E.STS_ASS and not sts & E.STS_HSE
    hc.bar_write(0, E.USBCMD, 4, cmd)
    assert not hc.bar_read(0, E.USBSTS, 4) & (E.STS_PSS | E.STS_ASS)
    # port writes with nothing attached: PED cannot be set, W1C bits, owner and reset stored
    p = E.PORTSC + 4
    hc.bar_write(0, p, 4, E.PORT_PP | E.PORT_PED | E.PORT_CSC | E.PORT_SUSP)
    assert hc.bar_read(0, p, 4) == E.PORT_PP
    hc.bar_write(0, p, 4, E.PORT_PP | E.PORT_PR)
    assert hc.bar_read(0, p, 4) == E.PORT_PP | E.PORT_PR
    hc.bar_write(0, p, 4, E.PORT_PP | E.PORT_OWNER)
    assert hc.bar_read(0, p, 4) == E.PORT_PP | E.PORT_OWNER
    # CONFIGFLAG back to 0 hands every port to the companions
    hc.bar_write(0, E.CONFIGFLAG, 4, 0)
    assert all(hc.bar_read(0, E.PORTSC + 4 * i, 4) & E.PORT_OWNER for i in range(6))
    hc.bar_write(0, E.CONFIGFLAG, 4, 1)
    assert not any(hc.bar_read(0, E.PORTSC + 4 * i, 4) & E.PORT_OWNER for i in range(6))
    assert not line.level


def test_ehci_frindex_runs_only_while_running() -> None:
    clock = Clock()
    hc = EhciController(memory(), clock=clock)
    line = wired(hc)
    enable(hc)
    hc.bar_write(0, E.FRINDEX, 4, 0x1FF0)
    clock.advance(2.0)
    assert hc.bar_read(0, E.FRINDEX, 4) == 0x1FF0
    hc.bar_write(0, E.USBINTR, 4, E.STS_FLR)
    hc.bar_write(0, E.USBCMD, 4, E.CMD_DEFAULT | E.CMD_RS)
    clock.advance(0.001)                                # 8 microframes
    assert hc.bar_read(0, E.FRINDEX, 4) == 0x1FF8
    hc.bar_write(0, E.FRINDEX, 4, 0)                    # ignored while running
    assert not hc.bar_read(0, E.USBSTS, 4) & E.STS_FLR and not line.level
    clock.advance(0.002)                                # bit 13 toggles: the list rolled over
    assert hc.bar_read(0, E.FRINDEX, 4) == 0x2008
    assert hc.bar_read(0, E.USBSTS, 4) & E.STS_FLR and line.level
    hc.bar_write(0, E.USBSTS, 4, E.STS_FLR)
    assert not line.level
    clock.advance(8192 * 125e-6)                        # the whole counter wraps once more
    assert hc.bar_read(0, E.FRINDEX, 4) == 0x0008 and line.level
    hc.bar_write(0, E.USBSTS, 4, E.STS_FLR)
    hc.bar_write(0, E.USBCMD, 4, E.CMD_DEFAULT)
    assert hc.bar_read(0, E.USBSTS, 4) & E.STS_HALT
    clock.advance(3.0)
    assert hc.bar_read(0, E.FRINDEX, 4) == 0x0008 and not line.level


def test_ehci_doorbell_interrupts_and_host_system_error() -> None:
    clock = Clock()
    hc, _mem, line = ehci_started(clock)
    cmd = hc.bar_read(0, E.USBCMD, 4)
    hc.bar_write(0, E.USBCMD, 4, cmd | E.CMD_ASE | E.CMD_IAAD)
    assert hc.bar_read(0, E.USBSTS, 4) & E.STS_IAA and line.level
    assert not hc.bar_read(0, E.USBCMD, 4) & E.CMD_IAAD
    hc.bar_write(0, E.USBSTS, 4, E.STS_IAA)
    assert not line.level
    # the async list moved outside RAM (a 64-bit segment no RAM backs): Host System Error
    hc.bar_write(0, E.CTRLDSSEGMENT, 4, 0x1)
    sts = hc.bar_read(0, E.USBSTS, 4)
    assert sts & E.STS_HSE and sts & E.STS_HALT and line.level
    assert not hc.bar_read(0, E.USBCMD, 4) & E.CMD_RS
    hc.bar_write(0, E.USBSTS, 4, 0x3F)
    assert not line.level
    hc.reset()
    assert hc.bar_read(0, E.CONFIGFLAG, 4) == 0 and hc.bar_read(0, E.USBSTS, 4) == E.STS_HALT
    assert hc.bar_read(0, E.PERIODICLISTBASE, 4) == 0


# ---- xHCI ------------------------------------------------------------------------------

DCBAA = 0x10000
SCRATCH_ARRAY = 0x11000
SCRATCH_PAGES = (0x30000, 0x31000)
CMD_RING = 0x12000
ERST = 0x13000
EVENT_RING = 0x14000
INPUT_CTX = 0x18000
IR = X.IR0


class XhciDriver:
    """The part of Linux's xhci_hcd that sets the controller up and issues commands."""

    def __init__(self, hc: XhciController, mem: GuestMemory, *, cmd_trbs: int = 16,
                 segments: tuple[int, ...] = (16,)) -> None:
        self.hc, self.mem = hc, mem
        self.cmd_trbs = cmd_trbs
        self.cmd_enq, self.cmd_cycle = CMD_RING, 1
        self.segments = segments
        self.evt_seg, self.evt_deq, self.evt_cycle = 0, EVENT_RING, 1

    def r32(self, off: int) -> int:
        return self.hc.bar_read(0, off, 4)

    def w32(self, off: int, value: int) -> None:
        self.hc.bar_write(0, off, 4, value)

    def w64(self, off: int, value: int) -> None:
        self.w32(off, value & 0xFFFFFFFF)       # lo_hi_writeq
        self.w32(off + 4, value >> 32)

    def seg_base(self, i: int) -> int:
        return EVENT_RING + 0x1000 * i

    def reset(self) -> None:
        self.w32(X.USBCMD, self.r32(X.USBCMD) & ~X.CMD_RS)
        assert self.r32(X.USBSTS) & X.STS_HCH
        self.w32(X.USBCMD, X.CMD_HCRST)
        assert not self.r32(X.USBCMD) & X.CMD_HCRST
        assert not self.r32(X.USBSTS) & X.STS_CNR

    def init(self, *, start: bool = True) -> None:
        self.reset()
        self.mem.fill(CMD_RING, 16 * self.cmd_trbs)
        self.mem.fill(EVENT_RING, 0x1000 * len(self.segments))
        self.cmd_enq, self.cmd_cycle = CMD_RING, 1
        self.evt_seg, self.evt_deq, self.evt_cycle = 0, EVENT_RING, 1
        self.w32(X.CONFIG, 64)
        self.mem.write_u64(DCBAA, SCRATCH_ARRAY)
        for i, page in enumerate(SCRATCH_PAGES):
            self.mem.write_u64(SCRATCH_ARRAY + 8 * i, page)
        self.w64(X.DCBAAP, DCBAA)
        link = CMD_RING + 16 * (self.cmd_trbs - 1)
        self.mem.write(link, struct.pack("<QII", CMD_RING, 0,
                                         R.trb_type(R.TRB_LINK) | R.LINK_TOGGLE_CYCLE))
        self.w64(X.CRCR, CMD_RING | 1)
        for i, size in enumerate(self.segments):
            self.mem.write(ERST + 16 * i, struct.pack("<QII", self.seg_base(i), size, 0))
        self.w32(IR + R.ERSTSZ, len(self.segments))
        self.w64(IR + R.ERDP, EVENT_RING)
        self.w64(IR + R.ERSTBA, ERST)
        self.w32(IR + R.IMOD, 160)
        self.w32(IR + R.IMAN, R.IMAN_IE)
        self.w32(X.USBCMD, X.CMD_INTE | X.CMD_HSEE)
        if start:
            self.w32(X.USBCMD, X.CMD_RS | X.CMD_INTE | X.CMD_HSEE)
            assert not self.r32(X.USBSTS) & X.STS_HCH

    def queue(self, control: int, parameter: int = 0, status: int = 0) -> int:
        """Put a command TRB on the ring (not rung yet); its address."""
        at = self.cmd_enq
        self.mem.write(at, struct.pack("<QII", parameter, status, control | self.cmd_cycle))
        self.cmd_enq += 16
        if self.cmd_enq == CMD_RING + 16 * (self.cmd_trbs - 1):
            link_control = self.mem.read_u32(self.cmd_enq + 12) & ~1
            self.mem.write_u32(self.cmd_enq + 12, link_control | self.cmd_cycle)
            self.cmd_enq, self.cmd_cycle = CMD_RING, self.cmd_cycle ^ 1
        return at

    def doorbell(self) -> None:
        self.w32(X.DBOFF, 0)

    def command(self, kind: int, parameter: int = 0, slot: int = 0, extra: int = 0) -> R.Trb:
        """Issue one command and take its completion event."""
        at = self.queue(R.trb_type(kind) | slot << 24 | extra, parameter)
        self.doorbell()
        events = self.handle_interrupt()
        assert len(events) == 1, events
        ev = events[0]
        assert ev.type == R.TRB_COMMAND_COMPLETION and ev.parameter == at
        return ev

    def events(self) -> list[R.Trb]:
        out = []
        while True:
            ev = trb(self.mem, self.evt_deq)
            if ev.cycle != self.evt_cycle:
                return out
            out.append(ev)
            self.evt_deq += 16
            if self.evt_deq == self.seg_base(self.evt_seg) + 16 * self.segments[self.evt_seg]:
                self.evt_seg += 1
                if self.evt_seg == len(self.segments):
                    self.evt_seg, self.evt_cycle = 0, self.evt_cycle ^ 1
                self.evt_deq = self.seg_base(self.evt_seg)

    def handle_interrupt(self) -> list[R.Trb]:
        """xhci_irq: acknowledge EINT and IP, take the events, move ERDP clearing EHB."""
        status = self.r32(X.USBSTS)
        assert not status & (X.STS_HSE | X.STS_HCE), hex(status)
        self.w32(X.USBSTS, X.STS_EINT)
        self.w32(IR + R.IMAN, self.r32(IR + R.IMAN) | R.IMAN_IP)
        events = self.events()
        self.w64(IR + R.ERDP, self.evt_deq | self.evt_seg | R.ERDP_EHB)
        return events


def xhci(clock: Clock | None = None, **kw) -> tuple[XhciController, XhciDriver, RecordingLine]:
    mem = memory()
    hc = XhciController(mem, clock=clock or Clock())
    line = wired(hc)
    enable(hc)
    return hc, XhciDriver(hc, mem, **kw), line


def ext_caps(hc: XhciController) -> list[tuple[int, int, int, int]]:
    """xhci_find_next_ext_cap over the list: (id, major, first port, count) of each."""
    out = []
    off = ((hc.bar_read(0, 0x10, 4) >> 16) & 0xFFFF) * 4
    while off:
        head = hc.bar_read(0, off, 4)
        ports = hc.bar_read(0, off + 8, 4)
        assert hc.bar_read(0, off + 4, 4) == 0x20425355  # "USB "
        out.append((head & 0xFF, head >> 24, ports & 0xFF, (ports >> 8) & 0xFF))
        nxt = (head >> 8) & 0xFF
        off = off + 4 * nxt if nxt else 0
    return out


def test_xhci_capability_registers() -> None:
    hc, d, _line = xhci()
    assert hc.bar_read(0, 0, 1) == 0x40 and hc.bar_read(0, 2, 2) == 0x0100
    p1 = d.r32(0x04)
    assert p1 & 0xFF == 64 and (p1 >> 8) & 0x7FF == 1 and p1 >> 24 == 8
    p2 = d.r32(0x08)
    assert ((p2 >> 21) & 0x1F) << 5 | (p2 >> 27) == 2   # scratchpad buffers
    assert (p2 >> 4) & 0xF == 4                          # ERST Max
    c1 = d.r32(0x10)
    assert c1 & 1 and not c1 & 0x4 and not c1 & 0x8     # 64-bit, 32-byte contexts, no PPC
    assert d.r32(0x14) == 0x2000 and d.r32(0x18) == 0x1000
    assert ext_caps(hc) == [(2, 3, 1, 4), (2, 2, 5, 4)]
    assert d.r32(X.PAGESIZE) == 1
    assert hc.bar_read(0, 0x10, 8) == c1 | (0x2000 << 32)  # a 64-bit read spans two


def test_xhci_reset_ports_and_mfindex() -> None:
    clock = Clock()
    hc, d, _line = xhci(clock)
    assert d.r32(X.USBSTS) == X.STS_HCH                 # CNR already clear
    d.reset()
    for i in range(8):
        # powered, RxDetect, no device (no CCS, no PED), no change
        assert d.r32(X.PORTS_BASE + 0x10 * i) == 0x2A0
    assert d.r32(X.PORTS_BASE + 0x80) == 0
    p = X.PORTS_BASE
    hc.ports[0] |= 0x7F << 17                           # as if changes had been seen
    d.w32(p, 0x2A0 | X.PORT_PR | X.PORT_PED | (1 << 17) | (1 << 21) | X.PORT_WAKE)
    assert d.r32(p) == 0x2A0 | (0x7F << 17 & ~(1 << 17 | 1 << 21)) | X.PORT_WAKE
    d.w32(p, 0x2A0 | (0x7F << 17))
    assert d.r32(p) == 0x2A0
    # a USB 3 port may be disabled and enabled again through PLS with LWS
    d.w32(p, X.PORT_PP | X.PORT_LWS | (X.PLS_DISABLED << 5))
    assert d.r32(p) == X.PORT_PP | (X.PLS_DISABLED << 5)
    d.w32(p, X.PORT_PP | X.PORT_LWS | (X.PLS_RXDETECT << 5))
    assert d.r32(p) == 0x2A0
    d.w32(p + 0x10 * 5, X.PORT_PP | X.PORT_LWS | (X.PLS_DISABLED << 5))  # USB 2: no
    assert d.r32(p + 0x10 * 5) == 0x2A0
    d.w32(p + 4, 0xFFFFFFFF)
    assert d.r32(p + 4) == X.PORTPMSC_USB3
    # MFINDEX counts microframes only while running
    d.init(start=False)
    clock.advance(1.0)
    assert d.r32(X.MFINDEX) == 0
    d.w32(X.USBCMD, X.CMD_RS)
    clock.advance(0.001)
    assert d.r32(X.MFINDEX) == 8
    clock.advance(2.048)                                # 16384 microframes: a full wrap
    assert d.r32(X.MFINDEX) == 8
    d.w32(X.USBCMD, 0)
    clock.advance(0.5)
    assert d.r32(X.MFINDEX) == 8
    assert hc.scratchpad == list(SCRATCH_PAGES)


def test_xhci_noop_posts_completion_and_interrupts() -> None:
    hc, d, line = xhci()
    d.init()
    assert d.r32(X.CRCR) == 0 and not line.level
    at = d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    assert d.r32(X.CRCR) == X.CRCR_CRR                  # the ring runs, pointer reads 0
    ev = trb(d.mem, EVENT_RING)
    assert ev == (at, R.CC_SUCCESS << 24, R.trb_type(R.TRB_COMMAND_COMPLETION) | 1)
    assert d.r32(X.USBSTS) & X.STS_EINT
    assert d.r32(IR + R.IMAN) == R.IMAN_IE | R.IMAN_IP
    assert d.r32(IR + R.ERDP) & R.ERDP_EHB
    assert line.level and line.events == ["high"]
    # xhci_irq: EINT, then IP (the pin drops), then ERDP with EHB
    d.w32(X.USBSTS, X.STS_EINT)
    assert line.level
    d.w32(IR + R.IMAN, R.IMAN_IE | R.IMAN_IP)
    assert not line.level
    assert d.events() == [ev]
    d.w64(IR + R.ERDP, d.evt_deq | R.ERDP_EHB)
    assert not d.r32(IR + R.ERDP) & R.ERDP_EHB and not line.level
    assert d.r32(IR + R.ERDP) == EVENT_RING + 16
    # nothing new on a second doorbell
    d.doorbell()
    assert trb(d.mem, EVENT_RING + 16).control == 0 and not line.level


def test_xhci_interrupt_enables_gate_the_pin() -> None:
    hc, d, line = xhci()
    d.init()
    d.w32(IR + R.IMAN, 0)                               # IE off: IP still set, no pin
    d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    assert d.r32(IR + R.IMAN) == R.IMAN_IP and not line.level
    d.w32(IR + R.IMAN, R.IMAN_IE)
    assert line.level
    d.w32(X.USBCMD, X.CMD_RS)                           # INTE off
    assert not line.level
    d.w32(X.USBCMD, X.CMD_RS | X.CMD_INTE)
    assert line.level
    d.handle_interrupt()
    assert not line.level


def test_xhci_events_while_the_handler_is_busy_interrupt_again() -> None:
    hc, d, line = xhci()
    d.init()
    d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    d.w32(X.USBSTS, X.STS_EINT)
    d.w32(IR + R.IMAN, R.IMAN_IE | R.IMAN_IP)           # handler running, EHB still set
    assert not line.level
    d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()                                        # posted while EHB: no new IP
    assert not line.level and not d.r32(X.USBSTS) & X.STS_EINT
    first = d.events()
    assert len(first) == 2
    d.w64(IR + R.ERDP, EVENT_RING + 16)                 # partial update, EHB kept
    assert not line.level
    d.w64(IR + R.ERDP, EVENT_RING + 16 | R.ERDP_EHB)    # one event still unread: again
    assert line.level and d.r32(X.USBSTS) & X.STS_EINT
    d.w32(IR + R.IMAN, R.IMAN_IE | R.IMAN_IP)
    d.w64(IR + R.ERDP, d.evt_deq | R.ERDP_EHB)
    assert not line.level


def test_xhci_slot_commands() -> None:
    hc, d, _line = xhci()
    d.init()
    d.w32(X.CONFIG, 2)                                  # MaxSlotsEn
    ev = d.command(R.TRB_ENABLE_SLOT)
    assert ev.status >> 24 == R.CC_SUCCESS and ev.slot == 1
    assert d.command(R.TRB_ENABLE_SLOT).slot == 2
    ev = d.command(R.TRB_ENABLE_SLOT)
    assert ev.status >> 24 == R.CC_NO_SLOTS_AVAILABLE and ev.slot == 0
    ev = d.command(R.TRB_DISABLE_SLOT, slot=1)
    assert ev.status >> 24 == R.CC_SUCCESS and ev.slot == 1
    assert d.command(R.TRB_DISABLE_SLOT, slot=1).status >> 24 == R.CC_SLOT_NOT_ENABLED
    assert d.command(R.TRB_DISABLE_SLOT, slot=200).status >> 24 == R.CC_SLOT_NOT_ENABLED
    assert d.command(R.TRB_ENABLE_SLOT).slot == 1       # the freed id comes back
    assert d.command(R.TRB_ENABLE_SLOT, extra=3 << 16).status >> 24 == R.CC_TRB_ERROR
    # Address Device: the input context names port 5, where nobody answers
    d.mem.write(INPUT_CTX, struct.pack("<II", 0, 0x3))
    d.mem.write(INPUT_CTX + 0x20, struct.pack("<II", 1 << 27, 5 << 16))
    ev = d.command(R.TRB_ADDRESS_DEVICE, INPUT_CTX, slot=2)
    assert ev.status >> 24 == R.CC_USB_TRANSACTION_ERROR and ev.slot == 2
    d.mem.write(INPUT_CTX + 0x20, struct.pack("<II", 1 << 27, 9 << 16))
    assert d.command(R.TRB_ADDRESS_DEVICE, INPUT_CTX, slot=2).status >> 24 == \
        R.CC_PARAMETER_ERROR
    assert d.command(R.TRB_ADDRESS_DEVICE, INPUT_CTX, slot=7).status >> 24 == \
        R.CC_SLOT_NOT_ENABLED
    for kind in (R.TRB_CONFIGURE_ENDPOINT, R.TRB_EVALUATE_CONTEXT, R.TRB_RESET_DEVICE,
                 R.TRB_STOP_ENDPOINT, R.TRB_RESET_ENDPOINT, R.TRB_SET_TR_DEQUEUE):
        assert d.command(kind, INPUT_CTX, slot=2).status >> 24 == R.CC_CONTEXT_STATE_ERROR
        assert d.command(kind, INPUT_CTX, slot=9).status >> 24 == R.CC_SLOT_NOT_ENABLED
    # anything else: TRB Error
    for kind in (0, R.TRB_NORMAL, R.TRB_FORCE_EVENT, R.TRB_FORCE_HEADER, 40, 63):
        assert d.command(kind).status >> 24 == R.CC_TRB_ERROR
    # Get Port Bandwidth: every port of the speed's protocol is free
    ev = d.command(R.TRB_GET_PORT_BANDWIDTH, INPUT_CTX + 0x100, extra=3 << 16)
    assert ev.status >> 24 == R.CC_SUCCESS
    assert d.mem.read(INPUT_CTX + 0x100, 9) == bytes([0, 0, 0, 0, 0, 100, 100, 100, 100])
    assert d.command(R.TRB_GET_PORT_BANDWIDTH, INPUT_CTX, extra=9 << 16).status >> 24 == \
        R.CC_PARAMETER_ERROR
    assert hc.slots == {1, 2}


def test_xhci_command_ring_follows_links_and_cycle() -> None:
    """A 4-TRB ring (3 commands and a Link with Toggle Cycle) used around three times."""
    hc, d, _line = xhci(cmd_trbs=4)
    d.init()
    seen = []
    for _ in range(10):
        ev = d.command(R.TRB_NOOP_COMMAND)
        seen.append(ev.parameter)
    assert seen == [CMD_RING + 16 * (i % 3) for i in range(10)]
    # two at once (a 3-TRB ring holds two pending), across the link
    for _ in range(3):
        ats = [d.queue(R.trb_type(R.TRB_NOOP_COMMAND)) for _ in range(2)]
        d.doorbell()
        assert [ev.parameter for ev in d.handle_interrupt()] == ats


def test_xhci_event_ring_wraps_across_segments() -> None:
    hc, d, line = xhci(segments=(16, 32))
    d.init()
    cycles = []
    for _ in range(100):
        d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
        d.doorbell()
        pos = d.evt_deq
        ev = trb(d.mem, pos)
        cycles.append((pos, ev.cycle))
        assert line.level
        assert [e.parameter for e in d.handle_interrupt()] == [ev.parameter]
        assert not line.level
    # 16 in segment 0, 32 in segment 1, then back to segment 0 with cycle 0, ...
    assert cycles[0] == (EVENT_RING, 1) and cycles[15] == (EVENT_RING + 0xF0, 1)
    assert cycles[16] == (EVENT_RING + 0x1000, 1) and cycles[47] == (EVENT_RING + 0x11F0, 1)
    assert cycles[48] == (EVENT_RING, 0) and cycles[96] == (EVENT_RING, 1)


def test_xhci_full_event_ring_stalls_the_command_ring() -> None:
    hc, d, line = xhci(cmd_trbs=64, segments=(16,))
    d.init()
    ats = [d.queue(R.trb_type(R.TRB_NOOP_COMMAND)) for _ in range(20)]
    d.doorbell()
    events = d.events()
    # 14 completions, then the Event Ring Full Error event; one TRB stays free
    assert [e.parameter for e in events[:14]] == ats[:14]
    assert events[14].type == R.TRB_HOST_CONTROLLER_EVENT
    assert events[14].status >> 24 == R.CC_EVENT_RING_FULL
    assert len(events) == 15 and line.level
    d.doorbell()                                        # still full: nothing more
    assert trb(d.mem, EVENT_RING).cycle == 1 and d.events() == []
    d.w32(IR + R.IMAN, R.IMAN_IE | R.IMAN_IP)
    d.w64(IR + R.ERDP, d.evt_deq | R.ERDP_EHB)          # the guest caught up: the rest
    rest = d.events()
    assert [e.parameter for e in rest] == ats[14:] and line.level
    assert [e.cycle for e in rest] == [1, 0, 0, 0, 0, 0]  # the last TRB, then lap two


def test_xhci_command_ring_abort() -> None:
    hc, d, _line = xhci()
    d.init()
    d.command(R.TRB_NOOP_COMMAND)
    assert d.r32(X.CRCR) & X.CRCR_CRR
    d.w64(X.CRCR, 0x5000 | X.CRCR_CA)                   # pointer ignored while running
    events = d.handle_interrupt()
    assert len(events) == 1 and events[0].status >> 24 == R.CC_COMMAND_RING_STOPPED
    assert events[0].parameter == CMD_RING + 16         # where the ring stopped
    assert d.r32(X.CRCR) == 0
    ev = d.command(R.TRB_NOOP_COMMAND)                  # the doorbell restarts it
    assert ev.parameter == CMD_RING + 16


def test_xhci_self_linked_ring_does_not_hang() -> None:
    hc, d, _line = xhci()
    d.init()
    d.mem.write(CMD_RING, struct.pack("<QII", CMD_RING, 0,
                                      R.trb_type(R.TRB_LINK) | R.LINK_TOGGLE_CYCLE | 1))
    d.doorbell()                                        # 4096 Link TRBs, then it gives up
    assert trb(d.mem, EVENT_RING).control == 0
    assert d.r32(X.CRCR) & X.CRCR_CRR and not d.r32(X.USBSTS) & (X.STS_HSE | X.STS_HCE)
    d.mem.write(CMD_RING, struct.pack("<QII", CMD_RING, 0, R.trb_type(R.TRB_LINK) | 1))
    d.doorbell()
    assert trb(d.mem, EVENT_RING).control == 0


@pytest.mark.parametrize("breakage", ["command ring", "erst", "event segment", "dcbaap",
                                      "bus master", "input context", "bandwidth context"])
def test_xhci_bad_guest_addresses_are_host_system_errors(breakage: str) -> None:
    hc, d, line = xhci()
    d.init(start=False)
    if breakage == "dcbaap":
        d.w64(X.DCBAAP, 0x7FFF_FFC0)
    if breakage == "bus master":
        hc.config_write(COMMAND, 2, CMD_MEMORY)
    d.w32(X.USBCMD, X.CMD_RS | X.CMD_INTE | X.CMD_HSEE)
    if breakage not in ("dcbaap", "bus master"):
        assert not d.r32(X.USBSTS) & X.STS_HCH
    if breakage == "command ring":
        d.w32(X.USBCMD, 0)
        d.w64(X.CRCR, 0xFFFF_FFFF_FFFF_FFC1)
        d.w32(X.USBCMD, X.CMD_RS)
    elif breakage == "erst":
        d.w64(IR + R.ERSTBA, 0x4000_0000)
    elif breakage == "event segment":
        d.mem.write_u64(ERST, (1 << 63) | 0x40)
    if breakage == "input context":
        d.queue(R.trb_type(R.TRB_ENABLE_SLOT))
        d.queue(R.trb_type(R.TRB_ADDRESS_DEVICE) | 1 << 24, 0xDEAD_0000)
    elif breakage == "bandwidth context":
        d.queue(R.trb_type(R.TRB_GET_PORT_BANDWIDTH) | 4 << 16, (1 << 64) - 16)
    else:
        d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    sts = d.r32(X.USBSTS)
    assert sts & X.STS_HSE and sts & X.STS_HCH and not sts & X.STS_HCE
    assert not d.r32(X.USBCMD) & X.CMD_RS and d.r32(X.CRCR) == 0
    if breakage != "bus master":
        # HSEE with SERR# enabled in the command register: Signaled System Error
        hc.config_write(COMMAND, 2, CMD_MEMORY | CMD_MASTER | 0x100)
        d.w32(X.USBCMD, X.CMD_RS | X.CMD_HSEE)
        d.doorbell()                                    # the same fault again
        assert d.r32(X.USBSTS) & X.STS_HCH and hc.config_read(STATUS, 2) & 0x4000
    # HCRST recovers
    d.reset()
    assert d.r32(X.USBSTS) == X.STS_HCH


@pytest.mark.parametrize("erstsz,size", [(0, 16), (17, 16), (1, 8), (1, 5000)])
def test_xhci_unusable_event_ring_is_a_host_controller_error(erstsz: int, size: int) -> None:
    hc, d, _line = xhci()
    d.init()
    d.mem.write(ERST + 8, struct.pack("<I", size))
    d.w32(IR + R.ERSTSZ, erstsz)
    d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    sts = d.r32(X.USBSTS)
    assert sts & X.STS_HCE and sts & X.STS_HCH
    d.w32(X.USBCMD, X.CMD_RS)                           # only a reset recovers
    assert d.r32(X.USBSTS) & X.STS_HCH
    d.init()
    assert d.command(R.TRB_NOOP_COMMAND).status >> 24 == R.CC_SUCCESS


def test_xhci_reset_hook_returns_to_power_on() -> None:
    hc, d, line = xhci()
    d.init()
    d.command(R.TRB_ENABLE_SLOT)
    d.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    d.doorbell()
    assert line.level
    hc.reset()
    assert not line.level and hc.slots == set()
    assert d.r32(X.USBSTS) == X.STS_HCH and d.r32(X.USBCMD) == 0
    assert d.r32(X.CONFIG) == 0 and d.r32(X.DCBAAP) == 0 and d.r32(X.CRCR) == 0
    assert d.r32(IR + R.IMAN) == 0 and d.r32(IR + R.IMOD) == 4000
    assert d.r32(IR + R.ERSTSZ) == 0 and d.r32(IR + R.ERDP) == 0
    assert hc.config_read(COMMAND, 2) == 0              # config space as at power-on too


# ---- on the buses --------------------------------------------------------------------------

def test_controllers_answer_at_their_bars_on_the_buses() -> None:
    pio, mmio = Bus("pio"), Bus("mmio")
    mem = memory()
    clock = Clock()
    uhci = UhciController(mem, clock=clock)
    ehci = EhciController(mem, clock=clock)
    xhc = XhciController(mem, clock=clock)
    uhci.config.set_bar_address(4, 0xC040)
    ehci.config.set_bar_address(0, 0xFEBF_0000)
    xhc.config.set_bar_address(0, 0x8_0000_0000)
    for fn in (uhci, ehci, xhc):
        fn.attach(PciBuses(pio, mmio))
        enable(fn)
    assert pio.read(0xC040 + U.USBSTS, 2) == U.STS_HCH
    assert pio.read(0xC040 + U.PORTSC1, 2) == 0x80
    pio.write(0xC040 + U.USBCMD, 2, U.CMD_RS)
    clock.advance(0.004)
    assert pio.read(0xC040 + U.FRNUM, 2) == 4
    assert mmio.read(0xFEBF_0000, 4) == 0x0100_0020
    assert mmio.read(0xFEBF_0000 + E.PORTSC, 4) == E.PORT_PP | E.PORT_OWNER
    base = 0x8_0000_0000
    assert mmio.read(base, 4) == 0x0100_0040
    assert mmio.read(base + X.PORTS_BASE + 0x70, 4) == 0x2A0
    mmio.write(base + X.DCBAAP, 8, 0x1234_5678_9ABC_DEF0)  # one 8-byte access
    assert mmio.read(base + X.DCBAAP, 8) == 0x1234_5678_9ABC_DEC0
    # the guest moves the xHCI BAR (low then high half): it answers at the new place only
    xhc.config_write(BAR0, 4, 0xFE00_0004)
    xhc.config_write(BAR0 + 4, 4, 0)
    assert mmio.read(0xFE00_0000, 4) == 0x0100_0040 and mmio.read(base, 4) == 0xFFFFFFFF


def test_firmware_places_a_pc_usb_set_and_config_cycles_reach_them() -> None:
    """A pc machine's piix3-usb-uhci at 00:01.2 next to an xHCI and the ICH9 EHCI set,
    placed by the firmware; the guest finds them through port 0xCF8."""
    mem = memory()
    root = PciRoot()
    root.add(None, 0, 0, HostBridge(0x1237))
    root.add(None, 1, 0, IsaBridge(0x7000, "PIIX3", multifunction=True))
    uhci = usb_controller("piix3-usb-uhci", mem)
    root.add(None, 1, 2, uhci)
    ehci = usb_controller("ich9-usb-ehci1", mem)
    root.add(None, 0x1D, 7, ehci)
    companions = [usb_controller(f"ich9-usb-uhci{i}", mem) for i in (1, 2, 3)]
    for i, c in enumerate(companions):
        root.add(None, 0x1D, i, c)
    xhc = usb_controller("qemu-xhci", mem)
    root.add(None, 5, 0, xhc)
    fw = PciFirmware(root, AddressAllocator("io", 0xC000, 0x10000),
                     AddressAllocator("mem", 0xC000_0000, 0xE000_0000),
                     AddressAllocator("mem64", 1 << 36, (1 << 36) + (1 << 30)), PCI_INTX_GSIS)
    fw.run()
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.insert(0xCF8, 8, ConfigIo(root), "pci-config")
    lines: dict[int, RecordingLine] = {}
    for fn, gsi in fw.intx:
        fn.set_intx(lines.setdefault(gsi, RecordingLine()), gsi)
    for fn in (uhci, ehci, xhc, *companions):
        fn.attach(PciBuses(pio, mmio))

    def cfg(slot: int, fn: int, reg: int) -> int:
        pio.write(0xCF8, 4, 0x8000_0000 | devfn(slot, fn) << 8 | reg)
        return pio.read(0xCFC, 4)

    assert cfg(1, 2, 0) == 0x7020_8086 and cfg(5, 0, 0) == 0x000D_1B36
    assert cfg(0x1D, 7, 8) >> 8 == 0x0C0320
    io = cfg(1, 2, BAR0 + 16) & ~0x3
    assert 0xC000 <= io < 0x10000 and pio.read(io + U.PORTSC1, 2) == 0x80
    x_bar = cfg(5, 0, BAR0) & ~0xF
    assert 0xC000_0000 <= x_bar and mmio.read(x_bar + 0x18, 4) == 0x1000
    # the xHCI works through the bus: reset, rings, a No-Op, its interrupt on its GSI
    gsi = dict((id(f), g) for f, g in fw.intx)[id(xhc)]
    drv = XhciDriver(xhc, mem)
    drv.r32 = lambda off: mmio.read(x_bar + off, 4)            # type: ignore[method-assign]
    drv.w32 = lambda off, v: mmio.write(x_bar + off, 4, v)     # type: ignore[method-assign]
    drv.init()
    drv.queue(R.trb_type(R.TRB_NOOP_COMMAND))
    drv.doorbell()
    assert lines[gsi].level
    assert [e.status >> 24 for e in drv.handle_interrupt()] == [R.CC_SUCCESS]
    assert not lines[gsi].level
    # a system reset puts the controllers back as the firmware left them
    root.reset()
    assert xhc.mapped[0] == x_bar and mmio.read(x_bar + X.USBSTS, 4) == X.STS_HCH


# ---- whatever the guest writes -----------------------------------------------------------

@pytest.mark.parametrize("model", ["piix3-usb-uhci", "ich9-usb-ehci1", "qemu-xhci"])
def test_random_guest_writes_never_raise(model: str) -> None:
    rng = random.Random(f"usb-{model}")
    mem = GuestMemory.from_bytearrays([(0, 0x10000)])
    clock = Clock()
    for _round in range(20):
        fn = usb_controller(model, mem, clock=clock)
        line = wired(fn)
        enable(fn)
        index = next(iter(fn.config.bars))
        size = fn.config.bars[index].size
        view = mem.view(0, 0x10000)
        view[:] = rng.randbytes(0x10000)
        if isinstance(fn, XhciController):
            # a guest that half knows what it does: small pointers, cycle bits, doorbells
            for reg, value in ((X.CONFIG, 64), (X.CRCR, rng.randrange(0x10000) | 1),
                               (IR + R.ERSTSZ, rng.randrange(4)),
                               (IR + R.ERSTBA, rng.randrange(0x10000)),
                               (X.USBCMD, X.CMD_RS | X.CMD_INTE)):
                fn.bar_write(0, reg, 4, value)
        for _ in range(300):
            clock.advance(rng.random() / 100)
            width = rng.choice((1, 2, 4, 8) if size > 32 else (1, 2, 4))
            off = rng.randrange(size - width + 1)
            if rng.random() < 0.3 and isinstance(fn, XhciController):
                off = rng.choice((X.DBOFF, X.USBCMD, X.CRCR, IR, IR + R.ERDP, X.USBSTS))
                width = 4
            if rng.random() < 0.5:
                fn.bar_write(index, off, width, rng.getrandbits(8 * width))
            else:
                assert 0 <= fn.bar_read(index, off, width) < 1 << (8 * width)
        fn.reset()
        assert not line.level
