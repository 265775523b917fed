"""QMP command handlers: pyhv-qemu's answers, from its registry and its machine.

:class:`Commands` has one handler per command of :mod:`pyhv.shim.schema`
(a test checks both directions) and checks every command's arguments against
the same definitions before the handler runs.  The probe commands libvirt
sends to learn what the "emulator" can do are answered from
:mod:`pyhv.shim.registry`; the rest go to a :class:`MachineControl`, the small
interface the machine-running code implements (``None`` while probing, when
QEMU would run ``-machine none`` paused).

:class:`QmpSession` puts a :class:`~pyhv.shim.qmp.QmpConnection` and a
:class:`Commands` together: bytes in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Final, Optional, Protocol, Sequence

from pyhv.engine.fds import close_fds
from pyhv.shim import registry as default_registry
from pyhv.shim import schema as qapi
from pyhv.shim.qmp import (
    COMMAND_NOT_FOUND,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    NEED_DATA,
    Command,
    QmpConnection,
    QmpError,
    Rejected,
)

CPU_QOM_PATH: Final = "/machine/unattached/device[{}]"


@dataclass(frozen=True)
class VcpuInfo:
    index: int
    #: the host thread running this vCPU (libvirt pins and accounts it)
    thread_id: int
    socket_id: int = 0
    core_id: int = 0
    thread_in_core: int = 0

    @property
    def qom_path(self) -> str:
        return CPU_QOM_PATH.format(self.index)


#: (CPUID leaf, subleaf or None, register name, value) -- QEMU's X86CPUFeatureWordInfo
CpuidWord = tuple[int, Optional[int], str, int]


class MachineControl(Protocol):
    """What the QMP handlers need from a running pyhv machine."""

    #: ``-name guest=``; ``None`` when not given
    name: Optional[str]
    #: ``-uuid``; ``None`` when not given
    uuid: Optional[str]
    #: QOM type of the vCPUs (``host-x86_64-cpu``, ``qemu64-x86_64-cpu``...)
    cpu_type: str

    def status(self) -> str:
        """QEMU's RunState: ``prelaunch``, ``running``, ``paused``, ``shutdown``,
        ``guest-panicked``, ``internal-error``..."""
        ...

    def cont(self) -> None: ...

    def stop(self) -> None: ...

    def powerdown(self) -> None:
        """Press the ACPI power button."""
        ...

    def reset(self) -> None: ...

    def quit(self) -> None:
        """End the machine; the session is closed after the reply is written."""
        ...

    def chardevs(self) -> Sequence[tuple[str, str, bool]]:
        """(label, filename, frontend open) per chardev; a pty's filename is
        ``pty:/dev/pts/N``, which libvirt reads for ``virsh console``."""
        ...

    def vcpus(self) -> Sequence[VcpuInfo]: ...

    def cpuid_words(self) -> Sequence[CpuidWord]:
        """The CPUID feature words the vCPUs were given."""
        ...

    def peripherals(self) -> Sequence[tuple[str, str]]:
        """(id, QOM type) of each ``-device`` with an ``id=``."""
        ...

    def balloon_actual(self) -> Optional[int]:
        """Guest RAM in bytes as the balloon sees it; ``None``: no balloon device."""
        ...

    def set_balloon(self, target: int) -> None: ...

    def balloon_path(self) -> Optional[str]:
        """``/machine/peripheral/ID`` of the balloon device (None: no balloon)."""
        ...

    def balloon_stats(self) -> dict[str, Any]:
        """QEMU's ``guest-stats`` of the balloon: {"stats": {...}, "last-update": s}."""
        ...

    def set_balloon_stats_period(self, seconds: int) -> None: ...

    def fdsets(self) -> Sequence[tuple[int, Sequence[tuple[int, Optional[str]]]]]:
        """(set id, ((fd, opaque), ...)) of each ``-add-fd`` set."""
        ...

    def block_devices(self) -> Sequence["BlockDevice"]:
        """The disks, as query-block and query-blockstats describe them."""
        ...

    def resize_block(self, qdev: str, size: int) -> None:
        """Resize the disk whose device is ``qdev`` (a :class:`BlockDevice`'s) to
        ``size`` bytes; a failure raises :class:`QmpError`."""
        ...

    def set_write_threshold(self, qdev: str, node: str, threshold: int) -> None:
        """Arm (0: disarm) the write threshold of the disk ``qdev``, set through
        ``node`` (the node BLOCK_WRITE_THRESHOLD names)."""
        ...

    def set_link(self, name: str, up: bool) -> None:
        """Plug or pull the cable of the NIC whose device or netdev id is ``name``
        (:class:`QmpError` when there is none)."""
        ...

    def rx_filters(self, name: Optional[str]) -> list[dict[str, Any]]:
        """QMP's RxFilterInfo of every NIC, or of the one named (re-arms its
        NIC_RX_FILTER_CHANGED)."""
        ...

    def rtc_reset_reinjection(self) -> None:
        """Drop the RTC periodic interrupts still owed to the guest (driftfix=slew)."""
        ...

    def device_add(self, args: dict[str, Any]) -> None:
        """Hot-add a device (QmpError when it cannot go in)."""
        ...

    def device_del(self, ident: str) -> None:
        """Ask the guest to let go of device ``ident`` (DEVICE_DELETED when it did)."""
        ...

    def netdev_add(self, args: dict[str, Any], take_fd: Callable[[str], int]) -> None:
        """A netdev for a later device_add; ``take_fd`` hands over getfd's fds."""
        ...

    def netdev_del(self, ident: str) -> None: ...

    def add_fd(self, fdset: Optional[int], fd: int, opaque: Optional[str]) -> int:
        """Put ``fd`` in fd set ``fdset`` (None: a new one); the set's id."""
        ...

    def remove_fd(self, fdset: int, fd: Optional[int]) -> None: ...

    def blockdev_add(self, args: dict[str, Any]) -> None: ...

    def blockdev_del(self, name: str) -> None: ...


@dataclass(frozen=True)
class ImageDesc:
    """One image of a disk's chain, as query-block's ``image`` describes it."""

    path: str
    format: str
    size: int
    actual_size: Optional[int] = None
    cluster_size: Optional[int] = None
    #: the backing file as the image names it (header or configuration), its format
    backing_name: Optional[str] = None
    backing_format: Optional[str] = None
    dirty: bool = False
    #: the length of the image file (its file node's size); None: ``size``
    file_length: Optional[int] = None
    #: its format and file node names (``-blockdev`` chains); None: not named
    node: Optional[str] = None
    file_node: Optional[str] = None


@dataclass(frozen=True)
class BlockDevice:
    """One disk: its device (``qdev``), its format node and the file node below."""

    qdev: str
    node: str
    file_node: Optional[str]
    path: str
    readonly: bool
    file_driver: str
    #: bytes the guest sees, and bytes the image takes on the host
    size: int
    actual_size: Optional[int]
    stats: dict[str, int]
    #: QMP's io-status ("ok", "failed", "nospace"); None: errors never stop this disk
    io_status: Optional[str] = None
    #: the armed write threshold (0: none) and the node it was set on
    write_threshold: int = 0
    threshold_node: Optional[str] = None
    #: the format of the top image, and every image of the chain (the top first;
    #: empty: only what the fields above say)
    format: str = "raw"
    chain: tuple[ImageDesc, ...] = ()

    @property
    def qdev_id(self) -> str:
        """The ``-device`` id (``/machine/peripheral/ID/...``)."""
        parts = self.qdev.split("/")
        return parts[3] if len(parts) > 3 and parts[2] == "peripheral" else self.qdev


# ------------------------------------------------------------------ QOM types

#: abstract QOM types pyhv's concrete types descend from: name -> parent
_ABSTRACT: Final[dict[str, Optional[str]]] = {
    "object": None, "device": "object", "pci-device": "device", "isa-device": "device",
    "sys-bus-device": "device", "virtio-pci": "pci-device", "base-pci-bridge": "pci-device",
    "pcie-port": "base-pci-bridge", "pcie-root-port-base": "pcie-port",
    "virtio-serial-port": "device", "cpu": "device", "x86_64-cpu": "cpu",
    "machine": "object", "x86-machine": "machine", "generic-pc-machine": "x86-machine",
    "memory-backend": "object", "rng-backend": "object", "accel": "object",
    "pci-uhci-usb": "pci-device", "pci-ehci-usb": "pci-device", "base-xhci": "pci-device",
}
_OBJECT_PARENTS: Final = {"memory-backend-file": "memory-backend",
                          "memory-backend-memfd": "memory-backend",
                          "memory-backend-ram": "memory-backend",
                          "rng-builtin": "rng-backend", "rng-random": "rng-backend",
                          "secret": "object"}

#: QOM property type names for schema builtins (qom-list-properties of -object types)
_QOM_TYPE: Final = {"str": "string", "bool": "bool", "int": "int", "size": "size",
                    "uint32": "uint32", "uint64": "uint64", "number": "number"}

_CPU_PROPS: Final = (
    ("type", "string"), ("family", "int"), ("model", "int"), ("stepping", "int"),
    ("vendor", "string"), ("model-id", "string"), ("migratable", "bool"),
    ("feature-words", "X86CPUFeatureWordInfo"), ("filtered-features", "X86CPUFeatureWordInfo"),
)
_MACHINE_PROPS: Final = (
    ("type", "string"), ("kernel", "string"), ("initrd", "string"), ("append", "string"),
    ("memory-backend", "link<memory-backend>"), ("dump-guest-core", "bool"),
    ("mem-merge", "bool"), ("usb", "bool"), ("graphics", "bool"),
)


@dataclass(frozen=True)
class _QomType:
    name: str
    parent: Optional[str]
    abstract: bool
    #: (name, type, description, default) per property
    props: tuple[tuple[str, str, str, object], ...] = ()
    is_device: bool = False


def _qom_types(reg: Any) -> dict[str, _QomType]:
    out: dict[str, _QomType] = {}
    for name, parent in _ABSTRACT.items():
        out[name] = _QomType(name, parent, True)
    built = getattr(reg, "BUILT", None)
    if built is not None:
        built = built | getattr(reg, "NOTED", frozenset())
    for dev in reg.DEVICES.values():
        if built is not None and dev.name not in built:
            continue  # known to the command line (for a clear refusal), not offered
        if dev.parent not in out:
            out[dev.parent] = _QomType(dev.parent, "device", True)
        out[dev.name] = _QomType(dev.name, dev.parent, False, tuple(
            (p.name, p.type, p.description, p.default) for p in dev.properties), True)
        backend = getattr(reg, "VIRTIO_BACKENDS", {}).get(dev.name)
        if backend is not None:
            out.setdefault("virtio-device", _QomType("virtio-device", "device", True))
            out[backend] = _QomType(backend, "virtio-device", False)
    cpu_props = tuple((n, t, "", None) for n, t in _CPU_PROPS)
    for cpu in getattr(reg, "cpu_models", lambda: reg.CPU_MODELS)():
        out[cpu.typename] = _QomType(cpu.typename, "x86_64-cpu", False, cpu_props)
    machine_props = tuple((n, t, "", None) for n, t in _MACHINE_PROPS)
    for m in reg.MACHINES:
        parent = "machine" if m.chipset == "none" else "generic-pc-machine"
        out[m.qom_type] = _QomType(m.qom_type, parent, False, machine_props)
    options = qapi.SCHEMA.types["ObjectOptions"]
    assert isinstance(options, qapi.Union_)
    for case, variant in options.variants:
        t = qapi.SCHEMA.types[variant]
        assert isinstance(t, qapi.Struct)
        props = tuple((m.name, _QOM_TYPE.get(m.type, m.type), "", None) for m in t.members)
        out[case] = _QomType(case, _OBJECT_PARENTS.get(case, "object"), False,
                             (("type", "string", "", None),) + props)
    out["kvm-accel"] = _QomType("kvm-accel", "accel", False)
    return out


def _ancestors(qom: dict[str, _QomType], name: str) -> list[str]:
    chain = []
    cur: Optional[str] = name
    while cur is not None and cur in qom and cur not in chain:
        chain.append(cur)
        cur = qom[cur].parent
    return chain


def _prop_info(name: str, type_: str, description: str, default: object) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "type": type_}
    if description:
        d["description"] = description
    if default is not None:
        d["default-value"] = default
    return d


# ------------------------------------------------------------------ dispatcher

Handler = Callable[[dict[str, Any], QmpConnection], Any]


class Commands:
    """The handlers, bound to one machine (or none, for a capabilities probe)."""

    def __init__(self, machine: Optional[MachineControl] = None, *,
                 registry: Any = default_registry, kvm: bool = True) -> None:
        self.machine = machine
        self.registry = registry
        self.kvm = kvm
        #: ``quit`` was executed: close the connection once its reply is written
        self.quit_requested = False
        #: descriptors ``getfd`` named, until a command takes them or ``closefd``
        self.named_fds: dict[str, int] = {}
        self._qom = _qom_types(registry)
        self._handlers: dict[str, Handler] = {
            name: getattr(self, "cmd_" + name.replace("-", "_"))
            for name in qapi.SCHEMA.commands
        }

    @property
    def handlers(self) -> dict[str, Handler]:
        return dict(self._handlers)

    def execute(self, name: str, args: dict[str, Any], conn: QmpConnection) -> Any:
        """Run one command; raises :class:`QmpError` for an error reply."""
        handler = self._handlers.get(name)
        if handler is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        qapi.check_arguments(name, args)
        return handler(args, conn)

    def dispatch(self, conn: QmpConnection, command: Command) -> bytes:
        """The reply to ``command``, as bytes to write."""
        try:
            result = self.execute(command.name, command.arguments, conn)
        except QmpError as e:
            return conn.error_to(command, e)
        except Exception as e:  # a bug or a machine failure must not end the session
            return conn.error_to(command, QmpError(f"{type(e).__name__}: {e}"))
        return conn.reply_to(command, {} if result is None else result)

    # ------------------------------------------------------------ protocol

    def cmd_qmp_capabilities(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if conn.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           COMMAND_NOT_FOUND)
        for cap in args.get("enable", []):
            raise QmpError(f"Capability '{cap}' not available")
        conn.complete_negotiation()

    def cmd_query_version(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        major, minor, micro = conn.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": conn.package}

    def cmd_query_target(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return {"arch": "x86_64"}

    def cmd_query_qmp_schema(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return qapi.introspect()

    def cmd_query_commands(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return [{"name": n} for n in qapi.SCHEMA.commands]

    def cmd_query_events(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return [{"name": n} for n in qapi.SCHEMA.events]

    def cmd_query_kvm(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return {"enabled": self.kvm, "present": self.kvm}

    # ------------------------------------------------------------ QOM, registry

    def cmd_qom_list_types(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        implements = args.get("implements")
        abstract = args.get("abstract", False)
        out = []
        for t in self._qom.values():
            if t.abstract and not abstract:
                continue
            if implements is not None and implements not in _ancestors(self._qom, t.name):
                continue
            d: dict[str, Any] = {"name": t.name}
            if t.abstract:
                d["abstract"] = True
            if t.parent:
                d["parent"] = t.parent
            out.append(d)
        return out

    def cmd_device_list_properties(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        name = args["typename"]
        t = self._qom.get(name)
        if t is None:
            raise QmpError(f"Device '{name}' not found", DEVICE_NOT_FOUND)
        if "device" not in _ancestors(self._qom, name):
            raise QmpError("Parameter 'typename' expects device")
        if t.abstract:
            raise QmpError("Parameter 'typename' expects non-abstract device")
        return [_prop_info(*p) for p in t.props]

    def cmd_qom_list_properties(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        name = args["typename"]
        t = self._qom.get(name)
        if t is None:
            raise QmpError(f"Class '{name}' not found", DEVICE_NOT_FOUND)
        return [_prop_info(*p) for p in t.props]

    def cmd_query_machines(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        out = []
        for m in self.registry.MACHINES:
            d: dict[str, Any] = {"name": m.name}
            if m.alias:
                d["alias"] = m.alias
            if m.is_default:
                d["is-default"] = True
            d.update({"cpu-max": m.cpu_max, "hotpluggable-cpus": m.hotpluggable_cpus,
                      "numa-mem-supported": m.numa_mem_supported,
                      "deprecated": m.deprecated})
            if m.default_cpu_type:
                d["default-cpu-type"] = m.default_cpu_type
            if m.default_ram_id:
                d["default-ram-id"] = m.default_ram_id
            out.append(d)
        return out

    def cmd_query_cpu_definitions(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        from pyhv.shim import cpus
        models = getattr(self.registry, "cpu_models", lambda: self.registry.CPU_MODELS)()
        return cpus.definitions(models)

    def cmd_query_cpu_model_expansion(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        from pyhv.shim import cpus
        return cpus.expansion(args["type"], args["model"])

    def cmd_query_cpu_model_baseline(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        from pyhv.shim import cpus
        return cpus.baseline(args["modela"], args["modelb"])

    def cmd_query_cpu_model_comparison(self, args: dict[str, Any],
                                       conn: QmpConnection) -> Any:
        from pyhv.shim import cpus
        return cpus.comparison(args["modela"], args["modelb"])

    def cmd_query_tpm_models(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return []

    def cmd_query_tpm_types(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return []

    def cmd_query_command_line_options(self, args: dict[str, Any],
                                       conn: QmpConnection) -> Any:
        options = getattr(self.registry, "COMMAND_LINE_OPTIONS", {})
        wanted = args.get("option")
        if wanted is not None and wanted not in options:
            raise QmpError(f"invalid option name: {wanted}")
        return [{"option": name, "parameters": [{"name": p, "type": "string"} for p in params]}
                for name, params in options.items() if wanted in (None, name)]

    def cmd_query_migrate_capabilities(self, args: dict[str, Any],
                                       conn: QmpConnection) -> Any:
        return [{"capability": c, "state": False} for c in qapi.MIGRATION_CAPABILITIES]

    def cmd_migrate_set_capabilities(self, args: dict[str, Any], conn: QmpConnection) -> None:
        return None  # every capability named passed the enum check: there are none

    def cmd_query_sev_capabilities(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        raise QmpError("SEV feature is not available")

    def cmd_query_sgx_capabilities(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        raise QmpError("SGX is not enabled in KVM")

    # ------------------------------------------------------------ machine state

    def _status(self) -> str:
        return self.machine.status() if self.machine else "prelaunch"

    def _vcpus(self) -> Sequence[VcpuInfo]:
        return self.machine.vcpus() if self.machine else ()

    def cmd_query_status(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        status = self._status()
        return {"status": status, "singlestep": False, "running": status == "running"}

    def cmd_query_name(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        name = self.machine.name if self.machine else None
        return {"name": name} if name is not None else {}

    def cmd_query_uuid(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        uuid = self.machine.uuid if self.machine else None
        return {"UUID": uuid or "00000000-0000-0000-0000-000000000000"}

    def cmd_query_hotpluggable_cpus(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        cpu_type = self.machine.cpu_type if self.machine else "qemu64-x86_64-cpu"
        return [{"type": cpu_type, "vcpus-count": 1, "props": _cpu_props(v),
                 "qom-path": v.qom_path} for v in self._vcpus()]

    def cmd_query_cpus_fast(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return [{"cpu-index": v.index, "qom-path": v.qom_path, "thread-id": v.thread_id,
                 "props": _cpu_props(v), "target": "x86_64"} for v in self._vcpus()]

    def cmd_query_iothreads(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return []

    def _disks(self) -> Sequence[BlockDevice]:
        return self.machine.block_devices() if self.machine else ()

    @staticmethod
    def _image(chain: Sequence[ImageDesc]) -> dict[str, Any]:
        """QEMU's ImageInfo of ``chain[0]``, its backing images nested under it."""
        top = chain[0]
        image: dict[str, Any] = {"filename": top.path, "format": top.format,
                                 "virtual-size": top.size}
        if top.actual_size is not None:
            image["actual-size"] = top.actual_size
        if top.cluster_size is not None:
            image["cluster-size"] = top.cluster_size
        if top.format == "qcow2":
            image["dirty-flag"] = top.dirty
        if top.backing_name is not None:
            image["backing-filename"] = top.backing_name
            image["full-backing-filename"] = chain[1].path if len(chain) > 1 \
                else top.backing_name
            if top.backing_format is not None:
                image["backing-filename-format"] = top.backing_format
        if len(chain) > 1:
            image["backing-image"] = Commands._image(chain[1:])
        return image

    @staticmethod
    def _node(d: BlockDevice, node: str, drv: str, level: int = 0) -> dict[str, Any]:
        """A node of disk ``d``: the format node of chain image ``level`` (``drv`` its
        format) or, with ``drv`` a protocol driver, the file node under it."""
        chain = d.chain or (ImageDesc(d.path, d.format, d.size, d.actual_size),)
        if drv in ("file", "host_device"):
            img = chain[level]
            length = img.file_length if img.file_length is not None else img.size
            image: dict[str, Any] = {"filename": img.path, "format": drv,
                                     "virtual-size": length}
            if img.actual_size is not None:
                image["actual-size"] = img.actual_size
        else:
            image = Commands._image(chain[level:])
        threshold = d.write_threshold if node == d.threshold_node else 0
        out = {"node-name": node, "file": chain[level].path, "ro": d.readonly or level > 0,
               "drv": drv, "image": image, "write_threshold": threshold}
        if drv not in ("file", "host_device"):
            backing = chain[level].backing_name
            if backing is not None:
                out["backing_file"] = backing
            out["backing_file_depth"] = len(chain) - level - 1
        return out

    def cmd_query_named_block_nodes(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        out = []
        for d in self._disks():
            out.append(self._node(d, d.node, d.format))
            if d.file_node:
                out.append(self._node(d, d.file_node, d.file_driver))
            for level, img in enumerate(d.chain[1:], 1):
                if img.node is not None:
                    out.append(self._node(d, img.node, img.format, level))
                if img.file_node is not None:
                    out.append(self._node(d, img.file_node, "file", level))
        return out

    def cmd_query_block(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        out = []
        for d in self._disks():
            info = {"device": "", "qdev": d.qdev, "type": "unknown", "removable": False,
                    "locked": False, "inserted": self._node(d, d.node, d.format)}
            if d.io_status is not None:
                info["io-status"] = d.io_status
            out.append(info)
        return out

    def cmd_query_blockstats(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        if args.get("query-nodes"):
            out = []
            for d in self._disks():
                out.append({"node-name": d.node, "stats": dict(d.stats)})
                if d.file_node:
                    out.append({"node-name": d.file_node, "stats": dict(d.stats)})
            return out
        return [{"device": "", "qdev": d.qdev, "node-name": d.node, "stats": dict(d.stats)}
                for d in self._disks()]

    def cmd_block_resize(self, args: dict[str, Any], conn: QmpConnection) -> None:
        device, node = args.get("device"), args.get("node-name")
        if device is None and node is None:
            raise QmpError("Either 'device' or 'node-name' must be set")
        size = args["size"]
        if size < 0:
            raise QmpError("Parameter 'size' expects a >0 size")
        for d in self._disks():
            names = (d.node, d.file_node) if node is not None else (d.qdev_id,)
            if (node if node is not None else device) in names:
                assert self.machine is not None
                self.machine.resize_block(d.qdev, size)
                return
        raise QmpError(f"Cannot find device={device or ''} nor node-name={node or ''}")

    def cmd_block_set_write_threshold(self, args: dict[str, Any],
                                      conn: QmpConnection) -> None:
        node, threshold = args["node-name"], args["write-threshold"]
        if threshold < 0:
            raise QmpError("Parameter 'write-threshold' expects uint64")
        for d in self._disks():
            if node in (d.node, d.file_node):
                assert self.machine is not None
                self.machine.set_write_threshold(d.qdev, node, threshold)
                return
        raise QmpError(f"Device '{node}' not found")

    def cmd_set_link(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine is None:
            raise QmpError(f"Device '{args['name']}' not found", DEVICE_NOT_FOUND)
        self.machine.set_link(args["name"], bool(args["up"]))

    def cmd_rtc_reset_reinjection(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine is not None:
            self.machine.rtc_reset_reinjection()

    def cmd_query_rx_filter(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return self.machine.rx_filters(args.get("name")) if self.machine else []

    def cmd_query_chardev(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        chardevs = self.machine.chardevs() if self.machine else ()
        return [{"label": label, "filename": filename, "frontend-open": bool(is_open)}
                for label, filename, is_open in chardevs]

    # jobs and migration: pyhv runs no block jobs and never migrates; the empty
    # answers are what QEMU gives when none was ever started

    def cmd_query_jobs(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return []

    def cmd_query_block_jobs(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return []

    def cmd_query_migrate(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return {}

    def cmd_query_fdsets(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        sets = self.machine.fdsets() if self.machine else ()
        return [{"fdset-id": n, "fds": [{"fd": fd, **({"opaque": o} if o else {})}
                                        for fd, o in fds]} for n, fds in sets]

    def _balloon(self) -> MachineControl:
        if self.machine is None or self.machine.balloon_actual() is None:
            raise QmpError("No balloon device has been activated", DEVICE_NOT_ACTIVE)
        return self.machine

    def cmd_query_balloon(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        return {"actual": self._balloon().balloon_actual()}

    def cmd_balloon(self, args: dict[str, Any], conn: QmpConnection) -> None:
        machine = self._balloon()
        if args["value"] <= 0:
            raise QmpError("Parameter 'target' expects a size")
        machine.set_balloon(args["value"])

    def cmd_cont(self, args: dict[str, Any], conn: QmpConnection) -> None:
        status = self._status()
        if status in ("shutdown", "guest-panicked", "internal-error"):
            raise QmpError("Resetting the Virtual Machine is required")
        if self.machine and status != "running":
            self.machine.cont()

    def cmd_stop(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine and self._status() == "running":
            self.machine.stop()

    def cmd_system_powerdown(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine:
            self.machine.powerdown()

    def cmd_system_reset(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine:
            self.machine.reset()

    def cmd_quit(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self.quit_requested = True
        if self.machine:
            self.machine.quit()

    # ------------------------------------------------------------ QOM tree

    def _cpu(self, path: str) -> Optional[VcpuInfo]:
        for v in self._vcpus():
            if v.qom_path == path:
                return v
        return None

    def cmd_qom_list(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        path = args["path"].rstrip("/") or "/"
        if path == "/":
            return [{"name": "type", "type": "string"},
                    {"name": "machine", "type": "child<container>"}]
        if path == "/machine":
            return [{"name": "type", "type": "string"},
                    {"name": "peripheral", "type": "child<container>"},
                    {"name": "unattached", "type": "child<container>"}]
        if path == "/machine/peripheral":
            devices = self.machine.peripherals() if self.machine else ()
            return [{"name": "type", "type": "string"}] + [
                {"name": dev_id, "type": f"child<{qom_type}>"} for dev_id, qom_type in devices]
        if path == "/machine/unattached":
            return [{"name": "type", "type": "string"}] + [
                {"name": f"device[{v.index}]", "type": f"child<{self._cpu_type()}>"}
                for v in self._vcpus()]
        if self._cpu(path):
            return [{"name": n, "type": t} for n, t in _CPU_PROPS]
        if self.machine is not None and path == self.machine.balloon_path():
            return [{"name": "type", "type": "string"},
                    {"name": "guest-stats-polling-interval", "type": "int"},
                    {"name": "guest-stats", "type": "guest-stats"}]
        raise QmpError(f"Device '{args['path']}' not found", DEVICE_NOT_FOUND)

    def _cpu_type(self) -> str:
        return self.machine.cpu_type if self.machine else "qemu64-x86_64-cpu"

    def cmd_qom_set(self, args: dict[str, Any], conn: QmpConnection) -> None:
        path, prop, value = args["path"].rstrip("/"), args["property"], args["value"]
        if self.machine is None or path != self.machine.balloon_path():
            raise QmpError(f"Device '{args['path']}' not found", DEVICE_NOT_FOUND)
        if prop != "guest-stats-polling-interval":
            raise QmpError(f"Property 'virtio-balloon-pci.{prop}' not found")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
            raise QmpError("balloon statistics polling interval must be a non-negative "
                           "number of seconds")
        self.machine.set_balloon_stats_period(value)

    def cmd_qom_get(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        path, prop = args["path"], args["property"]
        if self.machine is not None and path.rstrip("/") == self.machine.balloon_path():
            if prop == "guest-stats":
                return self.machine.balloon_stats()
            if prop == "type":
                return "virtio-balloon-pci"
            raise QmpError(f"Property 'virtio-balloon-pci.{prop}' not found")
        cpu = self._cpu(path)
        if cpu is None or self.machine is None:
            raise QmpError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
        if prop == "type":
            return self._cpu_type()
        if prop in ("feature-words", "filtered-features"):
            # filtered: model features the host's KVM lacked (left out, as QEMU does)
            filtered = {(leaf, sub, reg): value for leaf, sub, reg, value in
                        getattr(self.machine, "cpuid_filtered", lambda: ())()}
            words = []
            for leaf, subleaf, reg, value in self.machine.cpuid_words():
                w: dict[str, Any] = {"cpuid-input-eax": leaf}
                if subleaf is not None:
                    w["cpuid-input-ecx"] = subleaf
                w["cpuid-register"] = reg
                w["features"] = value if prop == "feature-words" else \
                    filtered.pop((leaf, subleaf, reg), 0)
                words.append(w)
            if prop == "filtered-features":
                for (leaf, subleaf, reg), value in sorted(filtered.items(),
                                                         key=lambda kv: str(kv[0])):
                    w = {"cpuid-input-eax": leaf, "cpuid-register": reg, "features": value}
                    if subleaf is not None:
                        w["cpuid-input-ecx"] = subleaf
                    words.append(w)
            return words
        raise QmpError(f"Property '{self._cpu_type()}.{prop}' not found")

    # ------------------------------------------------------------ HMP

    def cmd_human_monitor_command(self, args: dict[str, Any], conn: QmpConnection) -> str:
        words = args["command-line"].split()
        if not words:
            return ""
        if words[0] == "info" and len(words) > 1:
            if words[1] == "status":
                status = self._status()
                if status == "running":
                    return "VM status: running\r\n"
                return f"VM status: paused ({status})\r\n"
            if words[1] == "cpus":
                return "".join(
                    f"{'*' if i == 0 else ' '} CPU #{v.index}: thread_id={v.thread_id}\r\n"
                    for i, v in enumerate(self._vcpus()))
            if words[1] == "name":
                name = self.machine.name if self.machine else None
                return f"{name}\r\n" if name else ""
        return f"unknown command: '{' '.join(words[:2])}'\r\n"

    # ------------------------------------------------------------ hotplug

    def _no_hotplug(self, what: str) -> None:
        raise QmpError(f"{what} is not supported by pyhv: objects are fixed at start")

    def _hot(self, what: str) -> MachineControl:
        if self.machine is None:
            raise QmpError(f"{what}: there is no machine (-machine none)")
        return self.machine

    def cmd_device_add(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if args["driver"] not in self._qom:
            raise QmpError(f"'{args['driver']}' is not a valid device model name")
        self._hot("device_add").device_add(args)

    def cmd_device_del(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine is None:
            raise QmpError(f"Device '{args['id']}' not found", DEVICE_NOT_FOUND)
        self.machine.device_del(args["id"])

    def cmd_object_add(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._no_hotplug("object-add")

    def cmd_object_del(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._no_hotplug("object-del")

    def cmd_netdev_add(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._hot("netdev_add").netdev_add(args, self._take_fd)

    def cmd_netdev_del(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._hot("netdev_del").netdev_del(args["id"])

    def cmd_blockdev_add(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._hot("blockdev-add").blockdev_add(args)

    def cmd_blockdev_del(self, args: dict[str, Any], conn: QmpConnection) -> None:
        self._hot("blockdev-del").blockdev_del(args["node-name"])

    # ------------------------------------------------------------ descriptors (getfd)

    def cmd_getfd(self, args: dict[str, Any], conn: QmpConnection) -> None:
        """Name the descriptor that came with this command (SCM_RIGHTS)."""
        name = args["fdname"]
        if name[:1].isdigit():
            raise QmpError("Parameter 'fdname' may not start with a digit")
        fd = conn.take_fd()
        if fd is None:
            raise QmpError("No file descriptor supplied via SCM_RIGHTS")
        old = self.named_fds.pop(name, None)
        if old is not None:
            close_fds((old,))
        self.named_fds[name] = fd

    def cmd_add_fd(self, args: dict[str, Any], conn: QmpConnection) -> Any:
        """Put the descriptor that came with this command in an fd set."""
        fd = conn.take_fd()
        if fd is None:
            raise QmpError("No file descriptor supplied via SCM_RIGHTS")
        if self.machine is None:
            close_fds((fd,))
            raise QmpError("add-fd: there is no machine (-machine none)")
        fdset = self.machine.add_fd(args.get("fdset-id"), fd, args.get("opaque"))
        return {"fdset-id": fdset, "fd": fd}

    def cmd_remove_fd(self, args: dict[str, Any], conn: QmpConnection) -> None:
        if self.machine is None:
            raise QmpError(f"File descriptor named 'fdset-id={args['fdset-id']}' not found")
        self.machine.remove_fd(args["fdset-id"], args.get("fd"))

    def cmd_closefd(self, args: dict[str, Any], conn: QmpConnection) -> None:
        fd = self.named_fds.pop(args["fdname"], None)
        if fd is None:
            raise QmpError(f"File descriptor named '{args['fdname']}' not found")
        close_fds((fd,))

    def _take_fd(self, name: str) -> int:
        """A named descriptor, handed over (the name is free again)."""
        fd = self.named_fds.pop(name, None)
        if fd is None:
            raise QmpError(f"File descriptor named '{name}' has not been found")
        return fd



def _cpu_props(v: VcpuInfo) -> dict[str, int]:
    return {"socket-id": v.socket_id, "core-id": v.core_id, "thread-id": v.thread_in_core}


# ------------------------------------------------------------------ a whole session


class QmpSession:
    """A :class:`QmpConnection` answered by :class:`Commands`: bytes in, bytes out."""

    def __init__(self, commands: Commands, conn: Optional[QmpConnection] = None) -> None:
        self.commands = commands
        self.conn = conn or QmpConnection()

    def start(self) -> bytes:
        return self.conn.greeting()

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the peer; the replies to every complete command in them."""
        self.conn.receive_data(data)
        out = bytearray()
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                return bytes(out)
            if isinstance(ev, Rejected):
                out += self.conn.reject(ev)
            elif isinstance(ev, Command):
                out += self.commands.dispatch(self.conn, ev)
                if self.commands.quit_requested:
                    return bytes(out)

    def event(self, name: str, data: Optional[dict[str, Any]] = None) -> bytes:
        """An event to send (nothing before capabilities negotiation is over)."""
        return self.conn.event(name, data)

    @property
    def done(self) -> bool:
        """``quit`` was answered or the peer closed: close the connection."""
        return self.commands.quit_requested or self.conn.closed


__all__ = ["Commands", "CpuidWord", "MachineControl", "QmpSession", "VcpuInfo"]
