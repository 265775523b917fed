"""The VM control API: start, pause, resume, reset, power button, power off.

:class:`Machine` owns what lives as long as the VM (guest RAM, the host end of
the console, the open ``/dev/kvm``) and one :class:`Platform` per boot.  vCPU
threads never act on the machine themselves: they post what they saw (the
guest powered off through ACPI, asked for a reset, triple-faulted...) and the
thread that owns the machine applies it in :meth:`Machine.process_events`,
which also tells every subscriber.  ``event_fd`` becomes readable whenever
something is posted, so a front end's epoll loop can wait on it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from pyhv.config import DiskConfig, VmConfig
from pyhv.engine import layout, pinning
from pyhv.engine.builder import Hooks, Platform, build_platform, host_addresses
from pyhv.engine.chardev import PtyEnd
from pyhv.engine.console import HostSerial, SerialInputPump, open_serial
from pyhv.engine.errors import EngineError
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.fds import close_fds
from pyhv.engine.host import HostResources
from pyhv.engine.kvm import Kvm
from pyhv.engine.memory import GuestMemory, GuestMemoryError
from pyhv.engine.numa import bind_guest_ram
from pyhv.engine.pci.rootport import RootPort
from pyhv.engine.vcpu import VcpuEvent, install_kick_handler
from pyhv.placement import place

if TYPE_CHECKING:
    from pyhv.engine.devices.rtc import CmosRtc
    from pyhv.engine.hotplug import HotItem


class MachineState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"   # powered off (by the guest or the host)
    CRASHED = "crashed"     # triple fault, internal error, ...


@dataclass(frozen=True)
class MachineEvent:
    """What happened to the machine, as subscribers see it.

    ``kind`` is one of: ``powered-off`` (detail: ``guest``, ``host`` or
    ``guest-reset`` when a reset ends the machine), ``reset`` (detail: ``guest``
    or ``host``), ``crashed`` (detail: the exit kind, e.g. ``triple-fault``;
    ``message`` and ``registers`` say more), ``paused``, ``resumed``,
    ``power-button``, ``rx-filter-changed`` (detail: the NIC id),
    ``vserport-change`` (detail: a virtio-serial port's id;
    ``data``: whether the guest now has it open), ``device-broken`` (detail: the
    device id; a device model failed and no longer answers, everything else goes
    on), ``block-io-error``
    (detail: the disk id; ``data`` the :class:`~pyhv.engine.virtio.blk.BlkIoError`;
    on action ``stop`` the machine pauses right after), ``block-write-threshold``
    (detail: the disk id; ``data``: (bytes past the threshold, the threshold)),
    ``rtc-change`` (``data``: the guest's RTC offset from the configured base, in
    seconds, after the guest set its clock; kept across resets), ``device-deleted``
    (detail: the id of a disk or NIC the guest let go of after
    :meth:`Machine.remove_device`; it is gone from the machine and its config).
    """

    kind: str
    detail: str = ""
    message: str = ""
    registers: str = ""
    timestamp: float = 0.0
    data: object = None


Subscriber = Callable[[MachineEvent], None]


def _schedule(loop: EventLoop, device: object, delay: float,
              work: Callable[[], None]) -> object:
    """A device's timer: its work runs on ``loop`` as its transport runs queue work
    (the :class:`~pyhv.engine.eventloop.Timer` returned can be cancelled)."""
    guard = getattr(device, "guard", None)
    return loop.call_later(delay, work if guard is None else functools.partial(guard, work))


def _schedule_from_any_thread(loop: EventLoop, delay: float,
                              work: Callable[[], None]) -> None:
    """A timer armed from a vCPU thread as well as from the loop (the RTC's): the
    loop's own thread adds it, so a loop asleep in epoll wakes up for it."""
    def arm() -> None:
        loop.call_later(delay, work, "rtc")

    loop.call_soon_threadsafe(arm)


class Machine:
    """A virtual machine built from a :class:`VmConfig`."""

    def __init__(self, config: VmConfig, *, kvm: Optional[Kvm] = None,
                 host_serial: Optional[HostSerial] = None) -> None:
        self.config = config
        self.state = MachineState.CREATED
        self._posted: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._subscribers: list[Subscriber] = []
        self._terminal = threading.Event()
        self.last_event: Optional[MachineEvent] = None
        self.boots = 0
        self.platform: Optional[Platform] = None
        self._kvm = kvm
        self.memory: Optional[GuestMemory] = None
        self.host_serial = host_serial
        self._own_serial = host_serial is None
        self._pins: list[object] = []
        #: vCPU index → where its thread ran when the platform was last torn down
        self._carried: dict[int, pinning.ThreadPlacement] = {}
        self._host_addrs: list[int] = []
        self._cpuid: list = []
        self._loop: Optional[EventLoop] = None
        self._input: Optional[SerialInputPump] = None
        #: the host ends of virtio consoles and channels (opened at start, kept
        #: across guest resets like the serial backend)
        self.host = HostResources()
        #: the ids of the virtio-serial ports the guest has open
        self.open_ports: set[str] = set()
        #: seconds the guest moved its RTC from the configured base (None: never)
        self.rtc_adjust: Optional[int] = None

    # ---- lifecycle ------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Build the machine and start its vCPUs (held paused if asked)."""
        if self.state is not MachineState.CREATED:
            raise EngineError(f"machine {self.config.name} was already started")
        install_kick_handler()
        if self._kvm is None:
            self._kvm = Kvm()
        self._kvm.require()
        if self.config.vcpus > self._kvm.max_vcpus():
            raise EngineError(f"vcpus {self.config.vcpus}: this KVM allows at most "
                              f"{self._kvm.max_vcpus()}")
        pinning.check_host(self.config.cputune)
        ranges = layout.ram_ranges(self.config.memory)
        backing = self.config.memory_backing
        self.memory = GuestMemory.allocate(ranges, backing, shared=self.config.shared_memory,
                                           settle=False)
        bind_guest_ram(self.memory, self.config)  # <numatune>, before the guest runs
        self.memory.settle(backing)  # KSM, prealloc, mlock: after the binding
        pinning.place_emulator(self.config.cputune)
        self._host_addrs, self._pins = host_addresses(self.memory)
        self._cpuid = self._kvm.get_supported_cpuid()
        if self.host_serial is None:
            self.host_serial = open_serial(self.config.serial)
        if not (self.host.ports or self.host.taps or self.host.serials):
            self.host = HostResources.open(place(self.config))
        self._boot(paused)

    def _hooks(self) -> Hooks:
        return Hooks(on_sleep=lambda typ: self._post("sleep", typ),
                     on_reset=lambda: self._post("reset", "guest"),
                     on_vcpu_event=lambda ev: self._post("vcpu", ev),
                     on_serial_space=lambda: self._post("serial-space", None),
                     on_device_broken=lambda ident, kind, why: self._post(
                         "device-broken", (ident, kind, why)),
                     on_balloon=lambda actual: self._post("balloon", actual),
                     on_block_error=lambda ident, err: self._post("block-io-error",
                                                                  (ident, err)),
                     on_block_threshold=lambda ident, past, at: self._post(
                         "block-threshold", (ident, past, at)),
                     on_port_open=lambda ident, is_open: self._post(
                         "port-open", (ident, is_open)),
                     on_rx_filter=lambda ident: self._post("rx-filter", ident),
                     on_rtc_change=lambda offset: self._post("rtc-change", offset))

    def _boot(self, paused: bool) -> None:
        assert self._kvm is not None and self.memory is not None and self.host_serial
        self.platform = build_platform(self._kvm, self.memory, self._host_addrs,
                                       self.config, self.host_serial, self._hooks(),
                                       self._cpuid, self.host)
        self.boots += 1
        if self.platform.pci is not None:
            for port in self.platform.pci.bridges:
                if isinstance(port, RootPort):
                    port.on_power_off = lambda p: self._post("unplug", p)
        rtc = self.rtc()
        if rtc is not None and self.rtc_adjust is not None:
            rtc.set_offset(rtc.base_offset + self.rtc_adjust)  # the RTC outlives resets
        if self._loop is not None:
            self._watch(self._loop)
        for v in self.platform.vcpus:
            v.placement = self._carried.get(v.index) or \
                pinning.vcpu_placement(self.config.cputune, v.index)
            v.start(paused=paused)
        self.state = MachineState.PAUSED if paused else MachineState.RUNNING

    def attach(self, loop: EventLoop) -> None:
        """Serve this machine's host side from ``loop`` (call after :meth:`start`):
        its events, and console input into COM1 from the backend's input end."""
        self._loop = loop
        loop.add_reader(self.event_fd, lambda fd: self.process_events(), "machine events")
        self._watch(loop)
        hs = self.host_serial
        if hs is not None and hs.input_fd is not None:
            pump = SerialInputPump(loop, hs.input_fd, self.serial_input)
            if pump.start():
                self._input = pump

    def _watch(self, loop: EventLoop) -> None:
        """The platform's device work (queue eventfds, timers) on ``loop``."""
        if self.platform is None:
            return
        for fd, callback, name in self.platform.watches:
            loop.add_reader(fd, callback, name)
        for dev in self.platform.timed:
            dev.schedule = functools.partial(_schedule, loop, dev)  # type: ignore
        rtc = self.rtc()
        if rtc is not None:
            rtc.schedule = functools.partial(_schedule_from_any_thread, loop)
        for dev in self.platform.served:
            dev.start(loop)  # type: ignore
        self._flush_coalesced(loop, self.platform)

    def _flush_coalesced(self, loop: EventLoop, plat: Platform) -> None:
        """Queued port writes reach their devices even while every vCPU idles (a
        vCPU applies them before each exit; this timer between exits)."""
        from pyhv.engine.coalesced import FLUSH_INTERVAL

        co = plat.coalesced
        if co is None:
            return

        def flush() -> None:
            if self.platform is not plat or self._loop is not loop:
                return  # the platform or the loop is gone: so is the timer
            if co.pending():
                co.drain()
            loop.call_later(FLUSH_INTERVAL, flush, "coalesced port writes")
        loop.call_later(FLUSH_INTERVAL, flush, "coalesced port writes")

    def _unwatch(self) -> None:
        rtc = self.rtc()
        if rtc is not None:
            rtc.schedule = None  # its pending timers become no-ops
        if self._loop is not None and self.platform is not None:
            for fd, _cb, _name in self.platform.watches:
                self._loop.remove_reader(fd)
            for dev in self.platform.served:
                dev.stop()  # type: ignore

    def _detach(self) -> None:
        if self._loop is not None:
            if self._input is not None:
                self._input.stop()
                self._input = None
            if self.event_fd >= 0:
                self._loop.remove_reader(self.event_fd)
            self._loop = None

    def _teardown_platform(self) -> None:
        for ident in sorted(self.open_ports):  # the guest's ports close with it
            self._post("port-open", (ident, False))
        self._unwatch()
        if self.platform is not None:
            vcpus = list(self.platform.vcpus)
            self.platform.close()
            for v in vcpus:  # a reset's new threads get the old ones' pins
                if v.final_placement is not None:
                    self._carried[v.index] = v.final_placement
            self.platform = None

    def close(self) -> None:
        """Stop everything and release host resources."""
        self._detach()
        self._teardown_platform()
        if self.state in (MachineState.RUNNING, MachineState.PAUSED, MachineState.CREATED):
            self.state = MachineState.SHUTDOWN
        if self.host_serial is not None and self._own_serial:
            self.host_serial.close()
        self.host.close()
        self._pins = []
        if self.memory is not None:
            try:
                self.memory.close()
            except GuestMemoryError:
                pass  # a mapping still referenced somewhere: unmapped when it is freed
            self.memory = None
        if self.event_fd >= 0:
            os.close(self.event_fd)
            self.event_fd = -1

    # ---- control (the owning thread) ------------------------------------------
    def pause(self) -> None:
        if self.state is MachineState.RUNNING and self.platform:
            for v in self.platform.vcpus:
                v.pause(wait=False)
            for v in self.platform.vcpus:
                v.pause(wait=True)
            self.state = MachineState.PAUSED
            self._emit(MachineEvent("paused"))

    def resume(self) -> None:
        if self.state is MachineState.PAUSED and self.platform:
            self.state = MachineState.RUNNING
            for v in self.platform.vcpus:
                v.resume()
            self._emit(MachineEvent("resumed"))
            for disk in self.disks().values():   # requests held by an error policy
                disk.retry()  # type: ignore[attr-defined]

    def reset(self, source: str = "host") -> None:
        """Reboot: a fresh platform over the same RAM, the kernel loaded anew.

        From a machine that powered off or crashed, this builds it again held
        paused (QEMU's system_reset after -no-shutdown: ``resume`` runs it).
        """
        if self.state is MachineState.CREATED:
            raise EngineError(f"machine {self.config.name} was not started")
        ended = self.state in (MachineState.SHUTDOWN, MachineState.CRASHED)
        paused = ended or self.state is MachineState.PAUSED
        self._teardown_platform()
        if ended:
            self._drain_posted()
            self._terminal.clear()
        self._boot(paused)
        self._emit(MachineEvent("reset", source))

    def _drain_posted(self) -> None:
        while True:
            try:
                self._posted.get_nowait()
            except queue.Empty:
                return

    def power_button(self) -> None:
        """Press the ACPI power button (the guest decides what to do)."""
        if self.platform is not None and self.state in (MachineState.RUNNING,
                                                        MachineState.PAUSED):
            self.platform.pm.press_power_button()
            self._emit(MachineEvent("power-button"))

    def power_off(self, source: str = "host") -> None:
        """Pull the plug."""
        if self.state in (MachineState.RUNNING, MachineState.PAUSED):
            self._teardown_platform()
            self._finish(MachineState.SHUTDOWN, MachineEvent("powered-off", source))

    # ---- queries ------------------------------------------------------------------
    def vcpu_thread_ids(self) -> list[int]:
        """The host thread id of each vCPU (0 before it started)."""
        if self.platform is None:
            return []
        return [v.thread_id for v in self.platform.vcpus]

    def devices(self) -> list[tuple[str, str, str, Optional[str]]]:
        """(id, kind, where, why broken or None) of every device of the running platform."""
        if self.platform is None:
            return []
        return [(r.id, r.kind, r.where, r.broken) for r in self.platform.devices.records()]

    def port_ptys(self) -> list[tuple[str, str]]:
        """(port id, pty path) of every virtio console and channel on a pty."""
        cfg = place(self.config)
        ids = {(p.controller, p.port): p.id for p in cfg.extra_serials}
        ids.update({(c.controller, c.port): c.id for c in cfg.channels})
        return [(ids.get(key) or f"port {key[1]}", end.path)
                for key, end in sorted(self.host.ports.items()) if isinstance(end, PtyEnd)]

    def balloon(self) -> Optional[object]:
        """The virtio-balloon device model of the running platform, if any."""
        from pyhv.engine.virtio.balloon import VirtioBalloon
        from pyhv.engine.virtio.pci import VirtioPciFunction

        if self.platform is not None:
            for rec in self.platform.devices.records():
                fn = rec.device
                if isinstance(fn, VirtioPciFunction) and isinstance(fn.device, VirtioBalloon):
                    return fn.device
        return None

    def nics(self) -> dict[str, object]:
        """The NICs' virtio functions of the running platform (on a tap or a vhost-user
        backend), by NIC id."""
        from pyhv.engine.virtio.device import TYPE_NET
        from pyhv.engine.virtio.pci import VirtioPciFunction

        out: dict[str, object] = {}
        if self.platform is not None:
            for rec in self.platform.devices.records():
                fn = rec.device
                if isinstance(fn, VirtioPciFunction) and fn.device.device_type == TYPE_NET:
                    out[rec.id] = fn
        return out

    def set_link(self, ident: str, up: bool) -> None:
        """Plug or pull NIC ``ident``'s virtual cable (QMP set_link)."""
        from pyhv.engine.virtio.pci import VirtioPciFunction

        fn = self.nics().get(ident)
        if not isinstance(fn, VirtioPciFunction):
            raise EngineError(f"no NIC {ident!r}")
        dev: Any = fn.device
        fn.host_work(lambda: dev.set_link(up))

    # ---- hotplug (the owning thread) ---------------------------------------------
    def add_device(self, item: "HotItem") -> str:
        """Hot-add a disk or NIC into an empty hotplug ``pcie-root-port`` (the one its
        address names, else the first); its id.  The guest sees a card put in its
        slot; a reset keeps the device, as QEMU keeps hot-added devices.  A NIC's
        descriptors (``fds``, ``vhost_fds``) are the machine's from this call: an
        error closes them too."""
        from pyhv.engine import hotplug
        from pyhv.engine.builder import plug_virtio
        from pyhv.engine.pci.platform import disk_device, net_device

        given = () if isinstance(item, DiskConfig) else item.fds + item.vhost_fds
        try:
            plat = self._running_platform()
            new_cfg, placed, ctl = hotplug.admit(self.config, item)
            port = plat.pci.port(ctl.id or f"pci.{ctl.index}") if plat.pci else None
            if port is None or port.present:
                raise EngineError(f"{hotplug.label(placed)}: {ctl.id} is not an empty slot")
            ident = placed.id
            assert ident is not None and self.memory is not None
            if isinstance(placed, DiskConfig):
                self.host.open_disk(placed)
            else:
                self.host.open_nic(placed)
        except BaseException:
            close_fds(given)  # nothing took them
            raise
        try:
            if isinstance(placed, DiskConfig):
                device = disk_device(placed, True, self.host)
            else:
                device = net_device(placed, self.host)
            att = plug_virtio(plat, self._hooks(), self.memory, port, ident, device)
        except BaseException:
            self.host.release(ident)
            raise
        self.config = new_cfg
        if self._loop is not None:
            for fd, callback, name in att.watches:
                self._loop.add_reader(fd, callback, name)
            for dev in att.timed:
                dev.schedule = functools.partial(_schedule, self._loop, dev)  # type: ignore
            for dev in att.served:
                dev.start(self._loop)  # type: ignore
        return ident

    def remove_device(self, ident: str) -> None:
        """Ask the guest to let go of the device ``ident`` (the attention button of
        its slot).  When the guest powers the slot off, the device goes and a
        ``device-deleted`` event says so; a guest that ignores the button keeps it."""
        plat = self._running_platform()
        port = self._port_holding(ident)
        if port is None:
            if plat.devices.get(ident) is None:
                raise EngineError(f"no device {ident!r}")
            raise EngineError(f"device {ident} is not in a hotplug slot (only devices in "
                              "a pcie-root-port with hotplug on can be removed)")
        with port.lock:
            port.press_button()

    def _running_platform(self) -> Platform:
        if self.platform is None or self.state not in (MachineState.RUNNING,
                                                       MachineState.PAUSED):
            raise EngineError(f"machine {self.config.name} is not running")
        return self.platform

    def _port_holding(self, ident: str) -> Optional["RootPort"]:
        if self.platform is None or self.platform.pci is None:
            return None
        for port in self.platform.pci.bridges:
            if isinstance(port, RootPort) and port.hotplug and \
                    any(fn.name == ident for fn in port.children.values()):
                return port
        return None

    def _unplug(self, port: "RootPort") -> None:
        """The guest powered ``port``'s slot off: take the card out."""
        from pyhv.engine.builder import unplug_virtio
        from pyhv.engine.hotplug import without

        plat = self.platform
        if plat is None or plat.pci is None or port not in plat.pci.bridges or \
                not port.present or port.powered:
            return  # a report from before a reset, or the guest powered it on again
        for fn in port.children.values():
            att = plat.attached.get(fn.name)
            if att is not None and self._loop is not None:
                for fd, _cb, _name in att.watches:
                    self._loop.remove_reader(fd)
                for dev in att.served:
                    dev.stop()  # type: ignore
        for fn in unplug_virtio(plat, port):
            self.host.release(fn.name)
            self.config = without(self.config, fn.name)
            self._emit(MachineEvent("device-deleted", fn.name,
                                    f"the guest let go of {fn.name}: it was removed"))

    def disks(self) -> dict[str, object]:
        """The virtio-blk device models of the running platform, by disk id."""
        from pyhv.engine.virtio.blk import VirtioBlk
        from pyhv.engine.virtio.pci import VirtioPciFunction

        out: dict[str, object] = {}
        if self.platform is not None:
            for rec in self.platform.devices.records():
                fn = rec.device
                if isinstance(fn, VirtioPciFunction) and isinstance(fn.device, VirtioBlk):
                    out[rec.id] = fn.device
        return out

    def rtc(self) -> Optional["CmosRtc"]:
        """The RTC of the running platform."""
        from pyhv.engine.devices.rtc import CmosRtc

        rec = self.platform.devices.get("rtc") if self.platform is not None else None
        return rec.device if rec is not None and isinstance(rec.device, CmosRtc) else None

    def rtc_reset_reinjection(self) -> None:
        """Drop the RTC's periodic ticks owed to the guest (QMP rtc-reset-reinjection)."""
        rtc = self.rtc()
        if rtc is not None:
            rtc.reset_reinjection()

    def cpuid(self) -> list:
        """The CPUID table vCPU 0 was given."""
        return list(self.platform.cpuid0) if self.platform is not None else []

    def cpu_filtered(self) -> tuple[str, ...]:
        """CPU model features this host's KVM lacked (left out of the CPUID)."""
        return self.platform.cpu_filtered if self.platform is not None else ()

    # ---- console input ----------------------------------------------------------
    def serial_input(self, data: bytes) -> int:
        """Offer host input to COM1; returns how many bytes it took."""
        if self.platform is None:
            return 0
        return self.platform.serial.enqueue_input(data)

    # ---- events -----------------------------------------------------------------
    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    def _post(self, kind: str, payload: object) -> None:
        """From any thread (vCPUs): queue something for :meth:`process_events`."""
        self._posted.put((kind, payload))
        if self.event_fd >= 0:
            os.eventfd_write(self.event_fd, 1)

    def _emit(self, event: MachineEvent) -> None:
        event = dataclasses.replace(event, timestamp=time.time())
        self.last_event = event
        for cb in list(self._subscribers):
            cb(event)

    def _finish(self, state: MachineState, event: MachineEvent) -> None:
        self.state = state
        self._terminal.set()
        self._emit(event)

    @property
    def finished(self) -> bool:
        return self._terminal.is_set()

    def process_events(self) -> None:
        """Apply everything vCPU threads posted (call from the owning thread)."""
        if self.event_fd >= 0:
            try:
                os.eventfd_read(self.event_fd)
            except BlockingIOError:
                pass
        while True:
            try:
                kind, payload = self._posted.get_nowait()
            except queue.Empty:
                return
            if self.state not in (MachineState.RUNNING, MachineState.PAUSED):
                continue  # the machine already ended: late reports from other vCPUs
            if kind == "sleep":
                if payload == layout.S5_SLP_TYP:
                    self.power_off("guest")
            elif kind == "reset":
                self._guest_reset(str(payload))
            elif kind == "serial-space":
                if self._input is not None:
                    self._input.space()
            elif kind == "vcpu":
                assert isinstance(payload, VcpuEvent)
                self._vcpu_event(payload)
            elif kind == "balloon":
                self._emit(MachineEvent("balloon-change", str(payload)))
            elif kind == "block-io-error":
                assert isinstance(payload, tuple)
                ident, err = payload
                self._emit(MachineEvent("block-io-error", str(ident),
                                        f"disk {ident}: {err.action} on a {err.operation} "
                                        f"error: {err.reason}", data=err))
                if err.action == "stop":
                    self.pause()
            elif kind == "block-threshold":
                assert isinstance(payload, tuple)
                ident, past, at = payload
                self._emit(MachineEvent("block-write-threshold", str(ident),
                                        f"disk {ident}: a write went {past} bytes past the "
                                        f"write threshold {at}", data=(past, at)))
            elif kind == "rtc-change":
                self.rtc_adjust = int(payload)  # type: ignore[call-overload]
                self._emit(MachineEvent("rtc-change", str(payload),
                                        f"the guest set its clock {payload} s from the "
                                        "configured base", data=int(payload)))  # type: ignore
            elif kind == "rx-filter":
                self._emit(MachineEvent("rx-filter-changed", str(payload),
                                        f"NIC {payload}: the guest changed its receive "
                                        "filter"))
            elif kind == "port-open":
                assert isinstance(payload, tuple)
                ident, is_open = payload
                if is_open:
                    self.open_ports.add(str(ident))
                else:
                    self.open_ports.discard(str(ident))
                self._emit(MachineEvent("vserport-change", str(ident),
                                        f"the guest {'opened' if is_open else 'closed'} "
                                        f"port {ident}", data=bool(is_open)))
            elif kind == "unplug":
                assert isinstance(payload, RootPort)
                self._unplug(payload)
            elif kind == "device-broken":
                assert isinstance(payload, tuple)
                ident, dkind, why = (str(x) for x in payload)
                self._emit(MachineEvent("device-broken", ident,
                                        f"{dkind} {ident} failed and was taken off the "
                                        f"bus (the machine goes on): {why}"))

    def _guest_reset(self, source: str) -> None:
        if self.config.on_reboot == "restart":
            self.reset(source)
        else:
            self._teardown_platform()
            self._finish(MachineState.SHUTDOWN, MachineEvent("powered-off", "guest-reset"))

    def _vcpu_event(self, ev: VcpuEvent) -> None:
        if ev.kind == "shutdown":
            self.power_off("guest")
        elif ev.kind == "reset":
            self._guest_reset("guest")
        else:
            self._teardown_platform()
            self._finish(MachineState.CRASHED,
                         MachineEvent("crashed", ev.kind, f"vcpu{ev.vcpu}: {ev.detail}",
                                      ev.registers))

    def run(self, timeout: Optional[float] = None) -> MachineEvent:
        """Serve the machine until it powers off or crashes; the final event.

        For callers without an event loop of their own (tests, benchmarks): a
        private loop serves the machine's events and its devices meanwhile.
        """
        own = self._loop is None
        loop = self._loop if self._loop is not None else EventLoop()
        if own:
            self.attach(loop)

        def stop_when_done(ev: MachineEvent) -> None:
            if self.finished:
                loop.stop()

        self._subscribers.append(stop_when_done)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise EngineError(f"machine {self.config.name} still running after "
                                      f"{timeout} s")
                loop.run(timeout=left)
        finally:
            self._subscribers.remove(stop_when_done)
            if own:
                self._detach()
                loop.close()
        assert self.last_event is not None
        return self.last_event
