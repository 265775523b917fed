"""virtio-serial (the virtio console device): consoles and named ports.

One device per virtio-serial controller, with up to ``max_ports`` ports; each
port is a console (``virtconsole``: the guest's hvcN) or a named port
(``virtserialport``: the guest's /dev/virtio-ports/NAME, e.g. the QEMU guest
agent's ``org.qemu.guest_agent.0``) and has a host end
(:mod:`pyhv.engine.chardev`).

With VIRTIO_CONSOLE_F_MULTIPORT (virtio 1.2, 5.3) the queues are: port 0's
receive and transmit queues, the control receive queue (device to driver) and
control transmit queue (driver to device), then each further port's pair.  The
handshake: the driver sends DEVICE_READY; the device announces each port with
DEVICE_ADD; the driver answers PORT_READY; the device then says which port is a
console (CONSOLE_PORT), names named ports (PORT_NAME) and tells whether the host
side is connected (PORT_OPEN).  The driver's PORT_OPEN says the guest opened or
closed a port; the owner hears it through ``on_port_open`` (QMP's
VSERPORT_CHANGE, libvirt's agent state).  Without MULTIPORT only port 0 exists,
on queues 0 and 1.

Flow control, both ways: host input waits in its end until the guest opened the
port and gave receive buffers (the end stops reading meanwhile); guest output a
socket cannot take now stays in the transmit queue (its chain is not returned)
until the socket drains.  Output to a port whose host side is not connected is
dropped, as QEMU drops it.  A control message the device cannot use (a short
one, an unknown port or event) is ignored; a malformed chain fails alone.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from pyhv.config import VmConfig
from pyhv.engine.chardev import HostEnd
from pyhv.engine.virtio.device import TYPE_CONSOLE, VirtioDevice
from pyhv.engine.virtio.queue import ChainError, SplitQueue

F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

# control events (5.3.6.2)
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CONTROL = struct.Struct("<IHH")
#: queue sizes: a port's queues and the control queues (QEMU's 128 and 32)
PORT_QUEUE_SIZE = 128
CONTROL_QUEUE_SIZE = 32
#: the most bytes taken from one transmit chain (a guest's buffer is a page or so)
MAX_CHAIN_BYTES = 1 << 20
#: the most bytes of one control message read (header and a name)
MAX_CONTROL_BYTES = CONTROL.size + 256


@dataclass
class Port:
    """A port: what it is, its host end, and what the guest has said about it."""

    nr: int
    end: HostEnd
    #: the name a named port announces (None: a console's or an unnamed port's)
    name: Optional[str] = None
    console: bool = False
    #: the id QMP events name it by (``channel0``, ``console1``)
    id: str = ""
    guest_ready: bool = False
    guest_open: bool = False
    #: guest output the end has not taken yet: the chain and the bytes left
    held: Optional[tuple[int, bytes]] = None
    _sink: Optional["_PortSink"] = field(default=None, repr=False)


class VirtioConsole(VirtioDevice):
    device_type = TYPE_CONSOLE
    features = F_MULTIPORT | F_EMERG_WRITE
    kind = "virtio-serial"

    def __init__(self, ports: list[Port], max_ports: int = 31) -> None:
        super().__init__()
        if not 1 <= max_ports <= 31:
            raise ValueError(f"virtio-serial: {max_ports} ports (1-31)")
        if any(not 0 <= p.nr < max_ports for p in ports) or \
                len({p.nr for p in ports}) != len(ports):
            raise ValueError("virtio-serial: port numbers must be distinct and below "
                             f"{max_ports}")
        self.max_ports = max_ports
        self.ports = {p.nr: p for p in ports}
        sizes = []
        for i in range(max_ports + 1):  # port 0, the control pair, ports 1..
            size = CONTROL_QUEUE_SIZE if i == 1 else PORT_QUEUE_SIZE
            sizes += [size, size]
        self.queue_sizes = tuple(sizes)
        self._control_out: deque[bytes] = deque()
        #: the guest opened (True) or closed (False) the port with this id
        self.on_port_open: Optional[Callable[[str, bool], None]] = None

    # ---- queues ------------------------------------------------------------------------
    @property
    def multiport(self) -> bool:
        return bool(self.acked_features & F_MULTIPORT)

    @staticmethod
    def rx_queue(nr: int) -> int:
        return 0 if nr == 0 else 2 * nr + 2

    @staticmethod
    def tx_queue(nr: int) -> int:
        return 1 if nr == 0 else 2 * nr + 3

    def _port_of_queue(self, index: int) -> Optional[tuple[Port, bool]]:
        """(port, is transmit) of a port queue; None for the control queues."""
        if index in (2, 3):
            return None
        nr = 0 if index < 2 else (index - 2) // 2
        port = self.ports.get(nr)
        return None if port is None else (port, index % 2 == 1)

    def _active(self) -> bool:
        return self.memory is not None

    def _notify(self, q: SplitQueue) -> None:
        assert self.memory is not None and self.interrupts is not None
        if q.needs_notification(self.memory):
            self.interrupts.queue(self.queues.index(q))

    # ---- configuration ---------------------------------------------------------------
    def config_bytes(self) -> bytes:
        # cols, rows (F_SIZE is not offered), max_nr_ports, emerg_wr
        return struct.pack("<HHII", 0, 0, self.max_ports, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emergency write: one character for port 0's host end, before any queue works
        if offset == 8 and data and self.acked_features & F_EMERG_WRITE:
            port = self.ports.get(0)
            if port is not None and port.end.connected:
                port.end.write_soon(data[:1])  # a vCPU's write: the loop does the I/O

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, loop: object) -> None:
        """Serve the ports' host ends from the engine's loop."""
        for port in self.ports.values():
            port._sink = _PortSink(self, port)
            port.end.start(loop, port._sink)  # type: ignore[arg-type]

    def activate(self, memory, queues, interrupts, features) -> None:  # type: ignore[no-untyped-def]
        super().activate(memory, queues, interrupts, features)
        if not self.multiport:
            # the single-port device: port 0 is open both ways from the start
            port = self.ports.get(0)
            if port is not None:
                port.guest_ready = port.guest_open = True
                port.end.resume_soon()  # activation runs on a vCPU: input on the loop

    def reset(self) -> None:
        super().reset()
        self._control_out.clear()
        for port in self.ports.values():
            was_open = port.guest_open
            port.guest_ready = port.guest_open = False
            port.held = None
            if was_open and port.id and self.on_port_open is not None:
                self.on_port_open(port.id, False)

    def stop(self) -> None:
        """The loop no longer serves this device (the host ends stay open: they are
        the machine's, and serve the next boot's device)."""
        for port in self.ports.values():
            port.end.stop()
            port._sink = None

    # ---- the driver made buffers available --------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index == 3:
            self._control_messages()
        elif index == 2:
            self._flush_control()
        else:
            which = self._port_of_queue(index)
            if which is None:
                return  # a queue of a port that does not exist: nothing to serve
            port, transmit = which
            if transmit:
                self._transmit(port)
            else:
                port.end.resume()  # room for host input that waits

    # ---- control -------------------------------------------------------------------------
    def _send_control(self, nr: int, event: int, value: int, extra: bytes = b"") -> None:
        self._control_out.append(CONTROL.pack(nr, event, value) + extra)
        self._flush_control()

    def _flush_control(self) -> None:
        if not self._active() or not self.multiport or len(self.queues) < 4:
            return
        assert self.memory is not None
        q = self.queues[2]
        while self._control_out:
            chain = q.pop_valid(self.memory)
            if chain is None:
                break  # the rest waits for the driver's next buffers
            message = self._control_out.popleft()
            w = chain.writer()
            try:
                w.write(message[:w.available])
            except ChainError:
                pass  # a bad buffer: this message is lost, the queue goes on
            q.add_used(self.memory, chain.head, w.written)
        self._notify(q)

    def _control_messages(self) -> None:
        assert self.memory is not None
        q = self.queues[3]
        while (chain := q.pop_valid(self.memory)) is not None:
            r = chain.reader()
            try:
                message = r.read(min(r.available, MAX_CONTROL_BYTES))
            except ChainError:
                message = b""
            q.add_used(self.memory, chain.head, 0)
            if len(message) >= CONTROL.size:
                self._control(*CONTROL.unpack_from(message))
        self._notify(q)

    def _control(self, nr: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if value == 1:
                for port_nr in sorted(self.ports):
                    self._send_control(port_nr, DEVICE_ADD, 1)
            return
        port = self.ports.get(nr)
        if port is None:
            return  # a port that does not exist: ignored, as QEMU does
        if event == PORT_READY:
            if value != 1:
                return  # the driver could not set the port up
            port.guest_ready = True
            if port.console:
                self._send_control(nr, CONSOLE_PORT, 1)
            if port.name is not None:
                self._send_control(nr, PORT_NAME, 1, port.name.encode(errors="surrogateescape"))
            if port.end.connected:
                self._send_control(nr, PORT_OPEN, 1)
        elif event == PORT_OPEN:
            is_open = bool(value)
            if is_open == port.guest_open:
                return
            port.guest_open = is_open
            if port.id and self.on_port_open is not None:
                self.on_port_open(port.id, is_open)
            if is_open:
                port.end.resume()

    # ---- data ------------------------------------------------------------------------------
    def _transmit(self, port: Port) -> None:
        """Guest output of ``port`` to its host end, until the end is full."""
        assert self.memory is not None
        q = self.queues[self.tx_queue(port.nr)]
        while True:
            if port.held is not None:
                head, data = port.held
            else:
                chain = q.pop_valid(self.memory)
                if chain is None:
                    break
                r = chain.reader()
                try:
                    data = r.read(min(r.available, MAX_CHAIN_BYTES))
                except ChainError:
                    q.add_used(self.memory, chain.head, 0)
                    continue
                head = chain.head
            n = port.end.write(data) if port.end.connected else len(data)
            if n < len(data):
                port.held = (head, data[n:])
                port.end.wait_writable()
                break
            port.held = None
            q.add_used(self.memory, head, 0)
        self._notify(q)

    def receive(self, port: Port, data: bytes) -> int:
        """Host input for ``port``: what fits the guest's receive buffers now."""
        if not self._active() or not port.guest_open or \
                (self.multiport and not port.guest_ready):
            return 0
        assert self.memory is not None
        if self.rx_queue(port.nr) >= len(self.queues):
            return 0
        q = self.queues[self.rx_queue(port.nr)]
        taken = 0
        while taken < len(data):
            chain = q.pop_valid(self.memory)
            if chain is None:
                break
            w = chain.writer()
            part = data[taken:taken + w.available]
            try:
                w.write(part)
            except ChainError:
                q.add_used(self.memory, chain.head, 0)
                continue
            q.add_used(self.memory, chain.head, w.written)
            taken += len(part)
        self._notify(q)
        return taken

    def host_open(self, port: Port, is_open: bool) -> None:
        if not is_open:
            port.held = None  # output that waited for the socket is lost with it
        if self._active() and self.multiport and port.guest_ready:
            self._send_control(port.nr, PORT_OPEN, int(is_open))

    def writable(self, port: Port) -> None:
        if self._active() and port.held is not None:
            self._transmit(port)


def console_ports(cfg: VmConfig, controller: int,
                  ends: Mapping[tuple[int, int], HostEnd]) -> list[Port]:
    """The ports of virtio-serial controller ``controller`` in a placed config, each
    with its host end from ``ends`` (a null end where it has none)."""
    ports = [Port(p.port, ends.get((controller, p.port)) or HostEnd(), None, True,
                  p.id or "")
             for p in cfg.extra_serials
             if p.target == "virtio" and p.controller == controller and p.port is not None]
    ports += [Port(c.port, ends.get((controller, c.port)) or HostEnd(), c.name, False,
                   c.id or "")
              for c in cfg.channels if c.controller == controller and c.port is not None]
    return ports


class _PortSink:
    """A port's side of its host end: the end's events as device work, under the
    transport's lock."""

    def __init__(self, device: VirtioConsole, port: Port) -> None:
        self.device, self.port = device, port

    def receive(self, data: bytes) -> int:
        taken = [0]

        def work() -> None:
            taken[0] = self.device.receive(self.port, data)
        self.device.guard(work)
        return taken[0]

    def host_open(self, is_open: bool) -> None:
        self.device.guard(lambda: self.device.host_open(self.port, is_open))

    def writable(self) -> None:
        self.device.guard(lambda: self.device.writable(self.port))
