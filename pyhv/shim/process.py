"""The running pyhv-qemu process: machine, monitors, events, signals."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from pyhv.engine.errors import EngineError
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.fds import close_fds
from pyhv.placement import place
from pyhv.shim.commands import (
    BlockDevice,
    Commands,
    CpuidWord,
    ImageDesc,
    QmpSession,
    VcpuInfo,
)
from pyhv.shim.errors import ShimError
from pyhv.shim.mapping import DiskSpec, FdSetEntry, NicSpec
from pyhv.shim.qmp import DEVICE_NOT_FOUND, QmpError

if TYPE_CHECKING:
    from pyhv.engine.machine import Machine, MachineEvent
    from pyhv.shim.mapping import ShimPlan
    from pyhv.shim.monitor import MonitorServer

_REGISTERS = ("EAX", "EBX", "ECX", "EDX")  # QEMU's X86CPURegister32 names
#: the QOM path RTC_CHANGE names for the machine's MC146818
RTC_QOM_PATH = "/machine/rtc"


class PidFile:
    """QEMU's pidfile: our pid, locked while we run, removed at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


class ShimMachine:
    """What QMP's handlers see: the engine's :class:`Machine` with QEMU's run states."""

    def __init__(self, plan: "ShimPlan", machine: "Machine",
                 emit: Callable[[str, Optional[dict]], None],
                 stop_process: Callable[[], None]) -> None:
        self.plan = plan
        self.machine = machine
        self.emit = emit
        self.stop_process = stop_process
        #: disk id -> the node its write threshold was set through
        self._threshold_nodes: dict[str, str] = {}
        cfg = plan.config
        assert cfg is not None
        #: NICs whose next receive filter change is announced (QEMU: once per query)
        self._rx_notify: set[str] = {n.id for n in place(cfg).nets if n.id is not None}
        self.name = plan.options.name
        self.uuid = cfg.uuid
        model = cfg.cpu.model if cfg.cpu.mode == "custom" else \
            "max" if cfg.cpu.mode == "maximum" else "host"
        self.cpu_type = f"{model}-x86_64-cpu"
        #: QEMU's prelaunch: vCPUs built but never run since start or reset-from-shutdown
        self.prelaunch = plan.options.start_paused
        self.internal_error = False

    # ---- run state -----------------------------------------------------------
    def status(self) -> str:
        st = self.machine.state.value
        if st == "running":
            return "running"
        if st in ("paused", "created"):
            return "prelaunch" if self.prelaunch else "paused"
        if st == "crashed" or self.internal_error:
            return "internal-error"
        return "shutdown"

    def cont(self) -> None:
        st = self.machine.state.value
        if st in ("shutdown", "crashed"):
            raise QmpError("Resetting the Virtual Machine is required")
        if st == "paused":
            self.prelaunch = False
            self.machine.resume()

    def stop(self) -> None:
        if self.machine.state.value == "running":
            self.machine.pause()

    def powerdown(self) -> None:
        self.emit("POWERDOWN", None)
        self.machine.power_button()

    def reset(self) -> None:
        was_ended = self.machine.state.value in ("shutdown", "crashed")
        self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
        self.machine.reset("host-qmp")
        self.internal_error = False
        if was_ended:
            self.prelaunch = True

    def quit(self) -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.stop_process()

    # ---- queries -------------------------------------------------------------
    def chardevs(self) -> Sequence[tuple[str, str, bool]]:
        out = []
        com1 = self._com1_chardev()
        hs = self.machine.host_serial
        ports = self._port_chardevs()
        coms = self._com_chardevs()
        for cid, cd in self.plan.options.chardevs.items():
            port = ports.get(cid)
            end = self.machine.host.ports.get(port[1]) if port is not None else None
            if end is not None:
                assert port is not None
                out.append((cid, end.filename, port[0] in self.machine.open_ports))
                continue
            com_end = self.machine.host.serials.get(coms[cid]) if cid in coms else None
            if com_end is not None:
                out.append((cid, com_end.filename, True))
                continue
            if cid == com1 and hs is not None and hs.pty_path:
                filename = f"pty:{hs.pty_path}"
            elif cd.backend == "socket":
                where = cd.path or (f"fd:{cd.fd}" if cd.fd is not None else "")
                filename = f"disconnected:unix:{where},server=on" if cd.server \
                    else f"unix:{where}"
            elif cd.backend == "file":
                filename = f"file:{cd.path}" if cd.path else "file"
            else:
                filename = cd.backend
            out.append((cid, filename, cid == com1))
        return out

    def _port_chardevs(self) -> dict[str, tuple[str, tuple[int, int]]]:
        """chardev id → (port id, (controller index, port number)) of every virtio
        console and channel."""
        out = {}
        for index, vs in enumerate(self.plan.virtio_serial):
            for p in vs.ports:
                out[p.chardev.id] = (p.id or "", (index, p.nr))
        return out

    def _com_chardevs(self) -> dict[str, int]:
        """chardev id → COM index (1-3) of each isa-serial besides COM1."""
        out = {}
        for d in self.plan.devices:
            index = int(str(d.props.get("index", 0)))
            cd = d.props.get("chardev")
            if d.driver == "isa-serial" and index > 0 and cd is not None:
                out[str(cd)] = index
        return out

    def _com1_chardev(self) -> Optional[str]:
        for d in self.plan.devices:
            if d.driver == "isa-serial" and int(str(d.props.get("index", 0))) == 0:
                cd = d.props.get("chardev")
                return str(cd) if cd is not None else None
        return None

    def vcpus(self) -> Sequence[VcpuInfo]:
        return [VcpuInfo(i, tid, 0, i, 0)
                for i, tid in enumerate(self.machine.vcpu_thread_ids())]

    def cpuid_words(self) -> Sequence[CpuidWord]:
        words: list[CpuidWord] = []
        for fn, idx, flags, *regs in self.machine.cpuid():
            sub = idx if flags & 1 else None
            for name, value in zip(_REGISTERS, regs):
                words.append((fn, sub, name, value))
        return words

    def cpuid_filtered(self) -> Sequence[CpuidWord]:
        """The CPUID bits of model features the host lacked (QEMU's filtered-features)."""
        names = self.machine.cpu_filtered()
        if not names:
            return []
        from pyhv.cpumodel import cpu_map
        bits = cpu_map().bits(n for n in names if cpu_map().features[n].cpuid)
        return [(fn, idx if fn in (7, 0xD, 0x14) else None, _REGISTERS[reg], mask)
                for (fn, idx, reg), mask in sorted(bits.items())]

    # ---- hotplug -----------------------------------------------------------------
    def _builder(self, what: str) -> Any:
        if self.plan.builder is None or self.plan.machine.root_bus is None:
            raise QmpError(f"{what}: this machine takes no devices while it runs")
        return self.plan.builder

    def device_add(self, args: dict[str, Any]) -> None:
        """Map the device as ``-device`` would and put it in its root port's slot."""
        b = self._builder("device_add")
        try:
            config, spec = b.hot_device(args, self.plan.machine.root_bus)
        except ShimError as e:
            raise QmpError(e.detail) from None
        try:
            self.machine.add_device(config)
        except EngineError as e:
            b.hot_forget(spec.id)
            raise QmpError(str(e)) from None
        self.plan = dataclasses.replace(
            self.plan, devices=self.plan.devices + (b.devices[-1],),
            disks=self.plan.disks + ((spec,) if isinstance(spec, DiskSpec) else ()),
            nics=self.plan.nics + ((spec,) if isinstance(spec, NicSpec) else ()))
        if isinstance(spec, NicSpec) and spec.id is not None:
            self._rx_notify.add(spec.id)

    def device_del(self, ident: str) -> None:
        if ident not in {d.id for d in self.plan.devices}:
            raise QmpError(f"Device '{ident}' not found", DEVICE_NOT_FOUND)
        try:
            self.machine.remove_device(ident)
        except EngineError as e:
            raise QmpError(str(e)) from None

    def device_deleted(self, ident: str) -> None:
        """The guest let go of ``ident``: the shim forgets it too."""
        if self.plan.builder is not None:
            self.plan.builder.hot_forget(ident)
        self.plan = dataclasses.replace(
            self.plan, devices=tuple(d for d in self.plan.devices if d.id != ident),
            disks=tuple(d for d in self.plan.disks if d.id != ident),
            nics=tuple(n for n in self.plan.nics if n.id != ident))
        self._rx_notify.discard(ident)

    def netdev_add(self, args: dict[str, Any], take_fd: Callable[[str], int]) -> None:
        try:
            self._builder("netdev_add").hot_netdev(args, take_fd)
        except ShimError as e:
            raise QmpError(e.detail) from None

    def netdev_del(self, ident: str) -> None:
        try:
            self._builder("netdev_del").hot_netdev_del(ident)
        except ShimError:
            raise QmpError(f"Device '{ident}' not found", DEVICE_NOT_FOUND) from None

    def blockdev_add(self, args: dict[str, Any]) -> None:
        try:
            self._builder("blockdev-add").hot_blockdev(args)
        except ShimError as e:
            raise QmpError(e.detail) from None

    def blockdev_del(self, name: str) -> None:
        try:
            self._builder("blockdev-del").hot_blockdev_del(name)
        except ShimError as e:
            raise QmpError(e.detail) from None

    def peripherals(self) -> Sequence[tuple[str, str]]:
        return [(d.id, d.driver) for d in self.plan.devices if d.id]

    def _balloon(self) -> Any:
        return self.machine.balloon()

    def balloon_actual(self) -> Optional[int]:
        b = self._balloon()
        return b.actual_bytes() if b is not None else None

    def set_balloon(self, target: int) -> None:
        b = self._balloon()
        if b is None:
            raise QmpError("No balloon device has been activated", "DeviceNotActive")
        b.set_target(target)

    def balloon_path(self) -> Optional[str]:
        cfg = self.plan.config
        if cfg is None or cfg.balloon is None or self._balloon() is None:
            return None
        return f"/machine/peripheral/{cfg.balloon.id}"

    def balloon_stats(self) -> dict[str, Any]:
        b = self._balloon()
        return b.guest_stats() if b is not None else {"stats": {}, "last-update": 0}

    def set_balloon_stats_period(self, seconds: int) -> None:
        b = self._balloon()
        if b is not None:
            b.set_stats_period(seconds)

    def block_devices(self) -> Sequence[BlockDevice]:
        import dataclasses

        models = self.machine.disks()
        out = []
        for spec in self.plan.disks:
            if spec.id is None or spec.path is None:
                continue
            model = models.get(spec.id)
            stats = dataclasses.asdict(model.stats) if model is not None else {}  # type: ignore
            size = model.backend.size if model is not None else 0  # type: ignore
            try:
                actual: Optional[int] = os.stat(spec.path).st_blocks * 512
            except OSError:
                actual = None
            out.append(BlockDevice(
                self._qdev(spec.id), spec.node or spec.id,
                spec.file_node, spec.path, spec.read_only,
                "host_device" if spec.path.startswith("/dev/") else "file", size, actual,
                stats or {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0,
                          "wr_operations": 0, "flush_operations": 0},
                model.io_status if model is not None and model.can_stop  # type: ignore
                else None,
                model.write_threshold if model is not None else 0,  # type: ignore
                self._threshold_nodes.get(spec.id), spec.format,
                _image_chain(model.backend, spec) if model is not None  # type: ignore
                else ()))
        return out

    @staticmethod
    def _qdev(disk_id: str) -> str:
        return f"/machine/peripheral/{disk_id}/virtio-backend"

    def _disk(self, qdev: str) -> tuple[str, Any]:
        """(disk id, VirtioBlk) of the disk whose device is ``qdev``."""
        models = self.machine.disks()
        for spec in self.plan.disks:
            if spec.id is not None and qdev == self._qdev(spec.id) and spec.id in models:
                return spec.id, models[spec.id]
        raise QmpError(f"Cannot find device={qdev}", "DeviceNotFound")

    def set_write_threshold(self, qdev: str, node: str, threshold: int) -> None:
        disk_id, model = self._disk(qdev)
        model.write_threshold = threshold
        self._threshold_nodes[disk_id] = node

    def _nic(self, name: str) -> tuple[str, Any]:
        """(NIC id, device function) of the NIC whose device or netdev id is ``name``."""
        nets = place(self.machine.config).nets
        for spec, net in zip(self.plan.nics, nets):
            if name in (spec.id, spec.netdev, net.id):
                assert net.id is not None
                fn = self.machine.nics().get(net.id)
                if fn is not None:
                    return net.id, fn
        raise QmpError(f"Device '{name}' not found", DEVICE_NOT_FOUND)

    def set_link(self, name: str, up: bool) -> None:
        nic_id, _fn = self._nic(name)
        self.machine.set_link(nic_id, up)

    def rtc_reset_reinjection(self) -> None:
        self.machine.rtc_reset_reinjection()

    def rx_filters(self, name: Optional[str]) -> list[dict[str, Any]]:
        if name is not None:
            targets = [self._nic(name)]
        else:
            targets = list(self.machine.nics().items())
        out = []
        for nic_id, fn in targets:
            self._rx_notify.add(nic_id)  # the next change is announced again
            out.append({"name": nic_id, **fn.device.filter.describe()})
        return out

    def rx_filter_changed(self, nic_id: str) -> bool:
        """Whether NIC_RX_FILTER_CHANGED goes out now (once until the next query)."""
        if nic_id not in self._rx_notify:
            return False
        self._rx_notify.discard(nic_id)
        return True

    def threshold_node(self, disk_id: str) -> Optional[str]:
        """The node a write threshold of disk ``disk_id`` was set through."""
        return self._threshold_nodes.get(disk_id)

    def resize_block(self, qdev: str, size: int) -> None:
        from pyhv.engine.block import BlockError

        _disk_id, model = self._disk(qdev)
        try:
            model.resize(size)
        except BlockError as e:
            raise QmpError(str(e)) from None

    def fdsets(self) -> Sequence[tuple[int, Sequence[tuple[int, Optional[str]]]]]:
        return [(n, [(e.fd, e.opaque) for e in entries])
                for n, entries in sorted(self.plan.options.fdsets.items())]

    def add_fd(self, fdset: Optional[int], fd: int, opaque: Optional[str]) -> int:
        """A descriptor into fd set ``fdset`` (None: the lowest free set); the set."""
        sets = self.plan.options.fdsets
        if fdset is None:
            fdset = next(n for n in range(len(sets) + 1) if n not in sets)
        sets[fdset] = sets.get(fdset, ()) + (FdSetEntry(fd, opaque),)
        if self.plan.builder is not None:  # /dev/fdset/N paths of later blockdev-adds
            self.plan.builder.fdsets[fdset] = list(sets[fdset])
        return fdset

    def remove_fd(self, fdset: int, fd: Optional[int]) -> None:
        sets = self.plan.options.fdsets
        entries = sets.get(fdset, ())
        gone = [e for e in entries if fd is None or e.fd == fd]
        if not gone:
            what = f"fdset-id={fdset}" + (f" fd={fd}" if fd is not None else "")
            raise QmpError(f"File descriptor named '{what}' not found")
        close_fds(e.fd for e in gone)
        left = tuple(e for e in entries if e not in gone)
        if left:
            sets[fdset] = left
        else:
            del sets[fdset]
        if self.plan.builder is not None:
            self.plan.builder.fdsets[fdset] = list(left)


class ShimProcess:
    def __init__(self, plan: "ShimPlan", log: Callable[[str], None]) -> None:
        self.plan = plan
        self.log = log
        self.loop = EventLoop()
        self.monitors: list["MonitorServer"] = []
        self.machine: Optional["Machine"] = None
        self.control: Optional[ShimMachine] = None
        self.commands: Optional[Commands] = None
        self.pidfile: Optional[PidFile] = None
        self.exit_status = 0
        self._signal: list[int] = []
        self._wake_r = self._wake_w = -1

    # ---- set-up --------------------------------------------------------------
    def setup(self) -> None:
        opts = self.plan.options
        if opts.pidfile:
            try:
                self.pidfile = PidFile(opts.pidfile)
            except OSError as e:
                raise ShimError(f"cannot create PID file: {e.strerror}", opts.pidfile) from e
        self._signals()
        cfg = self.plan.config
        if cfg is not None:
            self._check_buildable(cfg)
            from pyhv.engine.machine import Machine

            self.machine = Machine(cfg)
            self.machine.subscribe(self._on_machine_event)
            self.control = ShimMachine(self.plan, self.machine, self.broadcast, self.stop)
            self.machine.start(paused=opts.start_paused)
            hs = self.machine.host_serial
            if hs is not None and hs.pty_path:
                self.log(f"char device redirected to {hs.pty_path} (label "
                         f"{self.control._com1_chardev() or 'serial0'})")
            self.machine.attach(self.loop)
        self.commands = Commands(self.control)
        self._monitors()

    def _check_buildable(self, cfg: object) -> None:
        try:
            from pyhv.engine.support import unsupported
        except ImportError:
            return
        problems = unsupported(cfg)  # type: ignore[arg-type]
        if problems:
            raise ShimError(problems[0])

    def _monitors(self) -> None:
        from pyhv.shim.monitor import MonitorServer

        assert self.commands is not None
        commands = self.commands

        def new_session() -> QmpSession:
            return QmpSession(commands)

        for mon in self.plan.options.monitors:
            cd = mon.chardev
            if cd.backend != "socket" or not cd.server:
                raise ShimError(f"monitor chardev {cd.id}: only a listening socket "
                                "(server=on) is supported")
            try:
                if cd.fd is not None:
                    server = MonitorServer.from_fd(self.loop, cd.fd, new_session)
                elif cd.path:
                    server = MonitorServer.unix(self.loop, cd.path, new_session)
                else:
                    raise ShimError(f"monitor chardev {cd.id}: needs fd= or path=")
            except OSError as e:
                raise ShimError(f"monitor chardev {cd.id}: {e.strerror}") from e
            server.after_commands = self._after_commands
            self.monitors.append(server)

    def _signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)

        def on_signal(signum: int, frame: object) -> None:
            self._signal.append(signum)

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, on_signal)
        self.loop.add_reader(self._wake_r, self._on_wakeup)

    # ---- events --------------------------------------------------------------
    def broadcast(self, name: str, data: Optional[dict] = None) -> None:
        for m in self.monitors:
            m.broadcast(name, data)

    def _on_wakeup(self, fd: int) -> None:
        try:
            os.read(fd, 512)
        except BlockingIOError:
            pass
        if self._signal:
            signum = self._signal[0]
            self._signal.clear()
            self.log(f"terminating on signal {signum}")
            self.broadcast("SHUTDOWN", {"guest": False, "reason": "host-signal"})
            self.stop()

    def _after_commands(self) -> None:
        if self.commands is not None and self.commands.quit_requested:
            self.stop()

    def _on_machine_event(self, ev: "MachineEvent") -> None:
        opts = self.plan.options
        assert self.machine is not None and self.control is not None
        if ev.kind == "device-broken":
            self.log(ev.message)
        elif ev.kind == "balloon-change":
            self.broadcast("BALLOON_CHANGE", {"actual": int(ev.detail)})
        elif ev.kind == "block-io-error":
            self.log(ev.message)
            err: Any = ev.data
            spec = next((d for d in self.control.plan.disks if d.id == ev.detail), None)
            data = {"device": "", "operation": err.operation, "action": err.action,
                    "reason": err.reason}
            if spec is not None:
                data["node-name"] = spec.node or spec.id
            if err.action == "stop" or err.nospace:
                data["nospace"] = err.nospace
            self.broadcast("BLOCK_IO_ERROR", data)
        elif ev.kind == "block-write-threshold":
            amounts: Any = ev.data
            past, at = amounts
            node = self.control.threshold_node(ev.detail)
            if node is not None:
                self.broadcast("BLOCK_WRITE_THRESHOLD", {"node-name": node,
                                                         "amount-exceeded": past,
                                                         "write-threshold": at})
        elif ev.kind == "rx-filter-changed":
            if self.control.rx_filter_changed(ev.detail):
                self.broadcast("NIC_RX_FILTER_CHANGED", {
                    "name": ev.detail,
                    "path": f"/machine/peripheral/{ev.detail}/virtio-backend"})
        elif ev.kind == "device-deleted":
            self.control.device_deleted(ev.detail)
            self.broadcast("DEVICE_DELETED", {"device": ev.detail,
                                              "path": f"/machine/peripheral/{ev.detail}"})
        elif ev.kind == "vserport-change":
            self.broadcast("VSERPORT_CHANGE", {"id": ev.detail, "open": bool(ev.data)})
        elif ev.kind == "rtc-change":
            # QEMU's offset: the guest's RTC minus the -rtc base, in seconds
            self.broadcast("RTC_CHANGE", {"offset": int(ev.detail), "qom-path": RTC_QOM_PATH})
        elif ev.kind == "paused":
            self.broadcast("STOP")
        elif ev.kind == "resumed":
            self.broadcast("RESUME")
        elif ev.kind == "reset" and ev.detail == "guest":
            self.broadcast("RESET", {"guest": True, "reason": "guest-reset"})
        elif ev.kind == "powered-off" and ev.detail in ("guest", "guest-reset"):
            reason = "guest-shutdown" if ev.detail == "guest" else "guest-reset"
            self._guest_ended(reason, opts.no_shutdown)
        elif ev.kind == "crashed":
            if ev.detail == "triple-fault":
                self.log("guest triple fault: resetting")
                if opts.no_reboot:
                    self._guest_ended("guest-reset", opts.no_shutdown)
                else:
                    self.broadcast("RESET", {"guest": True, "reason": "guest-reset"})
                    self.machine.reset("guest")
                    self.machine.resume()
            else:
                self.log(f"KVM internal error: {ev.message}")
                if ev.registers:
                    self.log(ev.registers)
                self.control.internal_error = True
                self.broadcast("STOP")

    def _guest_ended(self, reason: str, stay: bool) -> None:
        self.broadcast("SHUTDOWN", {"guest": True, "reason": reason})
        if stay:
            self.broadcast("STOP")
        else:
            self.stop()

    # ---- run -----------------------------------------------------------------
    def stop(self) -> None:
        self.loop.stop()

    def run(self) -> int:
        try:
            self.loop.run()
        finally:
            self.cleanup()
        return self.exit_status

    def cleanup(self) -> None:
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        for m in self.monitors:
            m.close()
        self.monitors = []
        if self.pidfile is not None:
            self.pidfile.remove()
            self.pidfile = None


def _image_chain(backend: Any, spec: Any) -> tuple[ImageDesc, ...]:
    """The images of a disk's backend, top first, down its backing chain (node
    names from the ``-blockdev`` chain where it gave them)."""
    from pyhv.engine.block.qcow2 import chain

    images = chain(backend)
    nodes = [(spec.node, spec.file_node), *spec.backing_nodes]
    out = []
    for i, b in enumerate(images):
        below = images[i + 1] if i + 1 < len(images) else None
        header = getattr(b, "header", None)
        name = header.backing_file if header is not None else None
        if below is not None and (name is None or spec.backing_nodes):
            name = below.path  # a configured chain: QEMU names the node's file
        try:
            st = os.stat(b.path)
            actual: Optional[int] = st.st_blocks * 512
            length: Optional[int] = st.st_size
        except OSError:
            actual = length = None
        node, file_node = nodes[i] if i < len(nodes) else (None, None)
        out.append(ImageDesc(
            b.path, getattr(b, "format", "raw"), b.size, actual,
            getattr(b, "cluster_size", None), name,
            getattr(below, "format", "raw") if below is not None else
            (header.backing_format if header is not None else None),
            bool(header is not None and header.incompatible & 1), length, node, file_node))
    return tuple(out)

