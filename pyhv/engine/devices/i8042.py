"""The i8042 PS/2 controller, with an idle AT keyboard and no AUX port.

Offsets from the device base (port 0x60)::

    +0  data: read the output buffer, write a command parameter or a
        byte for the keyboard                        (port 0x60)
    +4  read the status register, write a controller command  (port 0x64)

Other offsets (ports 0x61..0x63 belong to other devices) read 0xff and
ignore writes.

What is modelled, with Linux's i8042/atkbd probe in mind:

* Controller commands: 0x20-0x3f read internal RAM (0x20: the command byte,
  CTR), 0x60-0x7f write it, 0xaa self-test (0x55), 0xab keyboard interface
  test (0x00), 0xad/0xae and 0xa7/0xa8 disable/enable the keyboard/AUX
  clocks (CTR bits 4/5), 0xd0/0xd1 read/write the output port (a write with
  bit 0 clear requests a reset), 0xd2 echo a byte as keyboard data, 0xca/0xcb
  read/write the controller mode, 0xc0 input port, 0xe0 test inputs, and
  0xf0-0xff pulse output lines (an even command pulses the reset line, so
  0xfe resets).  Unknown commands are ignored.
* There is no AUX (mouse) port, reported so that Linux gives up at once:
  0xa9 (AUX interface test) answers 0x01 ("clock line stuck low") and 0xd3
  (AUX loopback) echoes its byte *without* the AUX-data status bit.  This
  differs from a controller with a mouse (0xa9 -> 0x00) on purpose: with a
  0x00 answer Linux would go on to an AUX interrupt test that can only time out.
* The keyboard acknowledges everything Linux's atkbd sends (reset -> 0xfa
  0xaa, identify -> 0xfa 0xab 0x83, or 0x41 when the controller translates,
  commands taking a parameter acknowledge both bytes, echo -> 0xee) and
  never produces scan codes.
* The status register shows output-buffer-full when a byte is queued; the
  input buffer is never full; the keylock bit reads "unlocked".
* IRQ1 follows "output buffer full and CTR bit 0": the line is driven high
  while a byte waits and low when it is read; when several bytes are queued
  the line drops and rises again on each read so an edge-triggered pin sees
  one edge per byte.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pyhv.engine.devices import InterruptLine

DATA_OFFSET = 0
STATUS_OFFSET = 4

# status register bits
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMD = 0x08
STR_KEYLOCK = 0x10  # set: keyboard not inhibited
STR_AUXDATA = 0x20

# command byte (CTR) bits
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

#: command byte after power-on: keyboard interrupt, system flag, AUX
#: clock off, scan-code translation on (what a PC BIOS leaves behind)
DEFAULT_CTR = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE

OUTPORT_RESET = 0x01  # 0: hold the CPU in reset
OUTPORT_A20 = 0x02

KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ECHO = 0xEE

#: the keyboard's and controller's buffering, in bytes
QUEUE_LIMIT = 16

# controller commands that take a parameter byte on the data port
_CMD_WRITE_OUTPORT = 0xD1
_CMD_WRITE_KBD_OBUF = 0xD2
_CMD_WRITE_AUX_OBUF = 0xD3
_CMD_WRITE_AUX = 0xD4
_CMD_WRITE_MODE = 0xCB
# keyboard commands that take a parameter byte
_KBD_PARAM_CMDS = frozenset((0xED, 0xF0, 0xF3))


class I8042:
    """PS/2 controller register model (keyboard only, no AUX port)."""

    def __init__(
        self,
        irq: InterruptLine,
        reset: Callable[[], None] | None = None,
    ) -> None:
        self.irq = irq
        self.reset = reset
        self._queue: deque[int] = deque()
        self._ram = bytearray(32)
        self._ram[0] = DEFAULT_CTR
        self._outport = OUTPORT_RESET | OUTPORT_A20
        self._mode = 0x01
        self._last_was_cmd = False
        #: controller command waiting for its parameter byte (or None)
        self._pending_cmd: int | None = None
        #: keyboard command waiting for its parameter byte (or None)
        self._kbd_pending: int | None = None
        self._scancode_set = 2
        self._irq_level = False

    @property
    def command_byte(self) -> int:
        """The controller command byte (CTR)."""
        return self._ram[0]

    # ---- bus interface ---------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read the data port (offset 0) or the status register (offset 4)."""
        if offset == DATA_OFFSET:
            return self._read_data()
        if offset == STATUS_OFFSET:
            return self._status()
        return (1 << (8 * size)) - 1 if size > 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a data/parameter byte (offset 0) or a command (offset 4)."""
        value &= 0xFF
        if offset == DATA_OFFSET:
            self._last_was_cmd = False
            self._write_data(value)
        elif offset == STATUS_OFFSET:
            self._last_was_cmd = True
            self._command(value)

    # ---- registers -------------------------------------------------------
    def _status(self) -> int:
        status = STR_KEYLOCK
        if self._queue:
            status |= STR_OBF
        if self._ram[0] & CTR_SYS:
            status |= STR_SYS
        if self._last_was_cmd:
            status |= STR_CMD
        return status

    def _read_data(self) -> int:
        if not self._queue:
            return 0x00
        value = self._queue.popleft()
        if self._queue and self._irq_level:
            # one edge per byte for an edge-triggered interrupt pin
            self._irq_level = False
            self.irq.set_level(False)
        self._update_irq()
        return value

    def _push(self, *data: int) -> None:
        for byte in data:
            if len(self._queue) < QUEUE_LIMIT:
                self._queue.append(byte & 0xFF)
        self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._queue) and bool(self._ram[0] & CTR_KBDINT)
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    def _pulse_reset(self) -> None:
        if self.reset is not None:
            self.reset()

    # ---- controller commands ---------------------------------------------
    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if 0x20 <= cmd <= 0x3F:
            self._push(self._ram[cmd - 0x20])
        elif 0x60 <= cmd <= 0x7F:
            self._pending_cmd = cmd
        elif cmd == 0xAA:  # self-test; also sets the system flag
            self._ram[0] |= CTR_SYS
            self._push(0x55)
        elif cmd == 0xAB:  # keyboard interface test: no error
            self._push(0x00)
        elif cmd == 0xA9:  # AUX interface test: no AUX port
            self._push(0x01)
        elif cmd == 0xAD:
            self._ram[0] |= CTR_KBDDIS
        elif cmd == 0xAE:
            self._ram[0] &= ~CTR_KBDDIS
        elif cmd == 0xA7:
            self._ram[0] |= CTR_AUXDIS
        elif cmd == 0xA8:
            self._ram[0] &= ~CTR_AUXDIS
        elif cmd == 0xC0:  # input port: keyboard not inhibited
            self._push(0x80)
        elif cmd == 0xCA:
            self._push(self._mode)
        elif cmd == 0xD0:
            self._push(self._outport)
        elif cmd == 0xE0:  # test inputs: clock and data low
            self._push(0x00)
        elif cmd in (_CMD_WRITE_OUTPORT, _CMD_WRITE_KBD_OBUF,
                     _CMD_WRITE_AUX_OBUF, _CMD_WRITE_AUX, _CMD_WRITE_MODE):
            self._pending_cmd = cmd
        elif cmd >= 0xF0 and not cmd & OUTPORT_RESET:
            self._pulse_reset()

    def _write_data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd is None:
            self._keyboard(value)
        elif 0x60 <= cmd <= 0x7F:
            self._ram[cmd - 0x60] = value
            self._update_irq()
        elif cmd == _CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & OUTPORT_RESET:
                self._pulse_reset()
        elif cmd in (_CMD_WRITE_KBD_OBUF, _CMD_WRITE_AUX_OBUF):
            # AUX loopback comes back as keyboard data: "no AUX port"
            self._push(value)
        elif cmd == _CMD_WRITE_MODE:
            self._mode = value
        # _CMD_WRITE_AUX: nothing is attached, the byte is lost

    # ---- the keyboard ----------------------------------------------------
    def _keyboard(self, value: int) -> None:
        pending, self._kbd_pending = self._kbd_pending, None
        if pending is not None:
            if pending == 0xF0 and value == 0:
                self._push(KBD_ACK, self._scancode_byte())
                return
            if pending == 0xF0 and 1 <= value <= 3:
                self._scancode_set = value
            self._push(KBD_ACK)
            return
        if value in _KBD_PARAM_CMDS:
            self._kbd_pending = value
            self._push(KBD_ACK)
        elif value == 0xFF:  # reset and self-test (BAT)
            self._scancode_set = 2
            self._push(KBD_ACK, KBD_BAT_OK)
        elif value == 0xF2:  # identify: MF2 keyboard
            second = 0x41 if self._ram[0] & CTR_XLATE else 0x83
            self._push(KBD_ACK, 0xAB, second)
        elif value == 0xEE:
            self._push(KBD_ECHO)
        elif value == 0xF6:  # set defaults
            self._scancode_set = 2
            self._push(KBD_ACK)
        elif 0xF4 <= value <= 0xFE:
            # enable, disable, typematic/make-break modes, resend: accepted
            self._push(KBD_ACK)
        else:
            self._push(KBD_RESEND)

    def _scancode_byte(self) -> int:
        if self._ram[0] & CTR_XLATE:
            # the controller translates the reply like set-2 scan codes
            return {1: 0x43, 2: 0x41, 3: 0x3F}[self._scancode_set]
        return self._scancode_set
