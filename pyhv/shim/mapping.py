"""From QEMU's command line to a :class:`ShimPlan`: a ``VmConfig`` plus process settings.

``build(args)`` reads the arguments libvirt 9.0 passes to QEMU 7.2 (argv
without argv[0]) and returns

* ``config``: the :class:`pyhv.config.VmConfig` the engine builds, or ``None``
  for ``-machine none`` (libvirt's capability probe, which runs no guest);
* ``options``: what the pyhv-qemu process itself does (monitors, pidfile,
  daemonize, ``-S``, ``-no-shutdown``, inherited descriptors...);
* device records (disks, NICs, RNGs, virtio-serial ports...) for what
  ``VmConfig`` cannot describe yet, each also listed in ``pending``.

Everything is checked before anything runs: an option, device or value pyhv
cannot honour raises :class:`ShimError` with one line naming it.  Nothing that
changes what the guest sees is dropped without a trace: it is refused, or
recorded and listed in ``pending`` (one line each, for the process to log).
Pure: no file is opened and no descriptor touched.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable, Literal, Optional, Sequence, Union

from pyhv.config import (
    SMBIOS_FIELDS,
    BackingFile,
    BalloonConfig,
    ChannelConfig,
    ClockConfig,
    ConfigError,
    ControllerConfig,
    CpuConfig,
    CpuFeature,
    CpuTopology,
    DiskConfig,
    FeaturesConfig,
    FilesystemConfig,
    KernelBoot,
    MemoryBackingConfig,
    NetConfig,
    NumaCell,
    NumaTune,
    RngConfig,
    SerialConfig,
    SerialPortConfig,
    SmbiosConfig,
    VmConfig,
    parse_cpuset,
)
from pyhv.config import PciAddress as ConfigPciAddress
from pyhv.cpumodel import CpuModelError, cpu_map, parse_cpu_option
from pyhv.engine.fds import close_fds
from pyhv.placement import place
from pyhv.shim import registry
from pyhv.shim.argv import (
    JsonValue,
    Option,
    Opts,
    find,
    merged,
    parse,
    parse_bool,
    parse_int,
    split_list,
)
from pyhv.shim.errors import ShimError, ShimUnsupportedError, ShimUsageError

MiB = 1 << 20

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class FdSetEntry:
    """One ``-add-fd set=N,fd=M,opaque=...``."""

    fd: int
    opaque: Optional[str] = None


@dataclass(frozen=True)
class Chardev:
    """A ``-chardev`` (or the chardev behind ``-qmp``/``-serial``)."""

    id: str
    #: ``socket``, ``pty``, ``file``, ``null`` or ``stdio``
    backend: str
    #: file path (``file``) or unix socket path (``socket``), when not a descriptor
    path: Optional[str] = None
    #: inherited descriptor: socket ``fd=``, or a ``/dev/fdset/N`` file
    fd: Optional[int] = None
    append: bool = False
    server: bool = False
    wait: bool = True
    #: tcp sockets: address and port
    host: Optional[str] = None
    port: Optional[int] = None
    #: where the chardev's output is also logged (``logfile=``), path or descriptor
    logfile: Optional[str] = None
    logfd: Optional[int] = None
    logappend: bool = False
    #: client sockets: seconds between reconnection attempts (0: none)
    reconnect: int = 0
    where: str = ""


@dataclass(frozen=True)
class Monitor:
    """A QMP monitor: ``-mon chardev=ID,mode=control`` or ``-qmp unix:PATH,...``."""

    chardev: Chardev
    pretty: bool = False
    id: Optional[str] = None


@dataclass(frozen=True)
class ShimOptions:
    """What the pyhv-qemu process does, as opposed to what the guest sees."""

    name: Optional[str] = None
    #: ``-name process=``: the process title
    process_name: Optional[str] = None
    debug_threads: bool = False
    monitors: tuple[Monitor, ...] = ()
    pidfile: Optional[str] = None
    daemonize: bool = False
    #: ``-S``: do not start the vCPUs until QMP ``cont``
    start_paused: bool = False
    #: ``-no-shutdown``: on guest power-off stop the vCPUs and keep the process
    no_shutdown: bool = False
    #: ``-no-reboot`` (or ``-action reboot=shutdown``): a guest reset ends the machine
    no_reboot: bool = False
    #: ``-action panic=``: ``shutdown`` (default), ``pause``, ``none``, ``exit-failure``
    panic_action: str = "shutdown"
    #: ``-msg timestamp=on``: prefix messages with the time
    msg_timestamp: bool = False
    sandbox: bool = False
    #: ``-add-fd`` sets by number
    fdsets: dict[int, tuple[FdSetEntry, ...]] = field(default_factory=dict)
    chardevs: dict[str, Chardev] = field(default_factory=dict)
    #: every descriptor named on the command line (keep these open; close the rest)
    inherited_fds: tuple[int, ...] = ()
    #: ``-D FILE``: log file for messages
    logfile: Optional[str] = None
    #: ``-incoming``: never set today (refused), here for the migration work
    incoming: Optional[str] = None


@dataclass(frozen=True)
class PciAddress:
    bus: str
    slot: int
    function: int = 0
    multifunction: bool = False


@dataclass(frozen=True)
class DeviceSpec:
    """Any ``-device``, as given (properties checked against the registry)."""

    driver: str
    id: Optional[str]
    #: the bus it sits on (``pci.0``, ``pci.3``, ``virtio-serial0.0``, ``isa.0``)
    bus: str
    addr: Optional[PciAddress]
    props: dict[str, JsonValue]
    where: str = ""


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk over a raw image or block device."""

    id: Optional[str]
    path: Optional[str]
    fd: Optional[int]
    read_only: bool
    #: O_DIRECT (``cache.direct``): libvirt's cache='none'/'directsync'
    direct: bool = False
    #: ignore flushes (``cache.no-flush``): cache='unsafe'
    no_flush: bool = False
    #: pass guest discards down (``discard=unmap``)
    discard: bool = False
    serial: Optional[str] = None
    bootindex: Optional[int] = None
    num_queues: Optional[int] = None
    queue_size: Optional[int] = None
    addr: Optional[PciAddress] = None
    #: the node name or ``-drive`` id it was built from
    node: str = ""
    #: the file/host_device node under it (``-blockdev`` chains)
    file_node: Optional[str] = None
    #: the image format (``raw`` or ``qcow2``) and, for a ``-blockdev`` backing
    #: chain, its (format node, file node) names, the top's backing file first
    format: str = "raw"
    backing_nodes: tuple[tuple[str, Optional[str]], ...] = ()


@dataclass(frozen=True)
class NicSpec:
    """A virtio-net NIC with its backend."""

    id: Optional[str]
    mac: str
    #: ``tap`` (inherited tap descriptors or an ifname) or ``vhost-user``
    backend: str
    netdev: str
    tap_fds: tuple[int, ...] = ()
    ifname: Optional[str] = None
    #: libvirt's vhost-net descriptors; pyhv's virtio-net runs in userspace and
    #: does not use them (they are still inherited and must be closed)
    vhost_fds: tuple[int, ...] = ()
    vhost: bool = False
    queues: int = 1
    chardev: Optional[Chardev] = None
    bootindex: Optional[int] = None
    host_mtu: Optional[int] = None
    addr: Optional[PciAddress] = None


@dataclass(frozen=True)
class RngSpec:
    id: Optional[str]
    #: host entropy file (``rng-random``), or ``None`` for ``rng-builtin`` (getrandom)
    filename: Optional[str]
    max_bytes: Optional[int] = None
    period_ms: Optional[int] = None
    addr: Optional[PciAddress] = None


@dataclass(frozen=True)
class BalloonSpec:
    id: Optional[str]
    deflate_on_oom: bool = False
    free_page_reporting: bool = False
    addr: Optional[PciAddress] = None


@dataclass(frozen=True)
class PortSpec:
    """A virtserialport or virtconsole on a virtio-serial controller."""

    id: Optional[str]
    nr: int
    chardev: Chardev
    name: Optional[str] = None
    console: bool = False


@dataclass(frozen=True)
class VirtioSerialSpec:
    id: Optional[str]
    bus_name: str
    max_ports: int = 31
    ports: tuple[PortSpec, ...] = ()
    addr: Optional[PciAddress] = None


@dataclass(frozen=True)
class VhostUserSpec:
    """``vhost-user-blk-pci`` and ``vhost-user-fs-pci``: a device served over a socket."""

    driver: str
    id: Optional[str]
    chardev: Chardev
    tag: Optional[str] = None
    num_queues: Optional[int] = None
    queue_size: Optional[int] = None
    bootindex: Optional[int] = None
    addr: Optional[PciAddress] = None


@dataclass(frozen=True)
class BridgeSpec:
    """``pcie-root-port`` or ``pci-bridge``: provides the bus named ``id``."""

    driver: str
    id: str
    addr: Optional[PciAddress]
    chassis: int = 0
    port: int = 0
    slot: int = 0


@dataclass(frozen=True)
class CpuSpec:
    model: str
    #: ``+feat``/``-feat``/``feat=value`` as given (``on``/``off`` for the signs)
    features: dict[str, str]
    #: the host CPU's features pass through (``host``, ``max``)
    passthrough: bool
    sockets: int = 1
    dies: int = 1
    cores: int = 1
    threads: int = 1


@dataclass(frozen=True)
class RtcSpec:
    #: ``utc``, ``localtime`` or a start date ``YYYY-MM-DDTHH:MM:SS``
    base: str = "utc"
    clock: str = "host"
    driftfix: str = "none"


@dataclass(frozen=True)
class ObjectSpec:
    qom_type: str
    id: str
    props: dict[str, JsonValue]


@dataclass(frozen=True)
class ShimPlan:
    #: the machine to build; ``None`` for ``-machine none`` (no guest)
    config: Optional[VmConfig]
    options: ShimOptions
    machine: registry.MachineType
    cpu: Optional[CpuSpec] = None
    rtc: RtcSpec = RtcSpec()
    devices: tuple[DeviceSpec, ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    rngs: tuple[RngSpec, ...] = ()
    balloons: tuple[BalloonSpec, ...] = ()
    virtio_serial: tuple[VirtioSerialSpec, ...] = ()
    vhost_user: tuple[VhostUserSpec, ...] = ()
    bridges: tuple[BridgeSpec, ...] = ()
    objects: dict[str, ObjectSpec] = field(default_factory=dict)
    #: ``-global`` as (driver, property, value)
    globals: tuple[tuple[str, str, str], ...] = ()
    #: accepted but not built yet (or built differently): one line each, for the log
    pending: tuple[str, ...] = ()
    #: the command line's mapping state, which QMP's hotplug commands go on with
    builder: Optional["_Builder"] = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- helpers


def _unsupported(where: Optional[str], detail: str) -> ShimUnsupportedError:
    return ShimUnsupportedError(detail, where)


def _usage(where: Optional[str], detail: str) -> ShimUsageError:
    return ShimUsageError(detail, where)


_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}$")
#: -fsdev security_model → libvirt's accessmode (``none`` is libvirt's squash)
_ACCESSMODES = {"passthrough": "passthrough", "mapped": "mapped",
                "mapped-xattr": "mapped", "none": "squash"}
_SECURITY_MODELS = tuple(_ACCESSMODES)
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_FDSET = re.compile(r"^/dev/fdset/(\d+)$")

#: options pyhv refuses outright, with the reason
_REFUSED = {
    "incoming": "incoming migration is not supported by pyhv",
    "vnc": "graphics (VNC) are not supported by pyhv; use -display none",
    "spice": "graphics (SPICE) are not supported by pyhv; use -display none",
    "bios": "firmware boot is not supported by pyhv; boot with -kernel",
    "dtb": "device trees are not used on x86",
    "tpmdev": "TPMs are not supported by pyhv",
    "iscsi": "iSCSI is not supported by pyhv",
    "preconfig": "the preconfig state is not supported by pyhv",
    "runas": "pyhv-qemu does not change its user; libvirt already runs it as the right one",
    "chroot": "pyhv-qemu does not chroot",
    "parallel": "parallel ports are not supported by pyhv",
    "mem-path": "-mem-path is not supported; use -object memory-backend-memfd",
}

#: machine properties accepted as they are (recorded, or without effect on pyhv)
_MACHINE_PROPS_OK = {
    "type", "accel", "usb", "dump-guest-core", "memory-backend", "vmport", "smm", "acpi",
    "hpet", "kernel_irqchip", "kernel-irqchip", "graphics", "mem-merge", "suppress-vmdesc",
    "pit", "pic", "sata", "smbus", "i8042", "max-ram-below-4g", "nvdimm", "hmat",
    "pcspk-audiodev", "sgx-epc", "pflash0", "pflash1", "confidential-guest-support",
}

_GLOBALS_OK = {
    ("kvm-pit", "lost_tick_policy"), ("PIIX4_PM", "disable_s3"), ("PIIX4_PM", "disable_s4"),
    ("ICH9-LPC", "disable_s3"), ("ICH9-LPC", "disable_s4"), ("ICH9-LPC", "noreboot"),
}

#: -cpu properties the shim applies (the others are noted as not applied)
_CPU_APPLIED = ("migratable", "check", "enforce", "pmu", "kvm", "vendor", "model-id")


#: QEMU's BlockdevOnError values (werror=, rerror=)
ERROR_ACTIONS = ("auto", "report", "ignore", "enospc", "stop")
_COM_PORTS = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))


#: what ``device_add`` can hot-add (into a pcie-root-port)
HOT_DRIVERS = ("virtio-blk-pci", "virtio-blk-pci-non-transitional", "virtio-net-pci",
               "virtio-net-pci-non-transitional")



def _fd_number(value: object, what: str, where: str) -> int:
    fd = parse_int(value, what, where)
    if fd <= 2:
        raise _usage(where, f"{what}={fd}: standard input, output and error cannot be passed")
    return fd


class _Builder:
    """State while reading one command line; ``build()`` assembles the plan."""

    def __init__(self, options: list[Option], now: Optional[float] = None) -> None:
        self.opts = options
        #: the time a ``-rtc base=DATE`` is measured from (seconds since the epoch)
        self.now = time.time() if now is None else now
        self.clock = ClockConfig()
        self.smbios = SmbiosConfig()
        self.boot_order: tuple[str, ...] = ()
        self.pending: list[str] = []
        self.fds: list[int] = []
        self.fdsets: dict[int, list[FdSetEntry]] = {}
        self.chardevs: dict[str, Chardev] = {}
        #: chardev id → what uses it (each may serve one frontend)
        self.chardev_users: dict[str, str] = {}
        self.objects: dict[str, ObjectSpec] = {}
        self.object_where: dict[str, str] = {}
        self.nodes: dict[str, dict[str, JsonValue]] = {}
        self.node_where: dict[str, str] = {}
        self.drives: dict[str, Opts] = {}
        self.used_nodes: dict[str, str] = {}
        self.netdevs: dict[str, Opts] = {}
        #: netdev_add's descriptors by netdev id, until a NIC takes them
        self.hot_fds: dict[str, list[int]] = {}
        #: -fsdev id → its options; each serves one virtio-9p-pci
        self.fsdevs: dict[str, Opts] = {}
        self.used_fsdevs: dict[str, str] = {}
        self.fs_configs: list[FilesystemConfig] = []
        self.used_netdevs: dict[str, str] = {}
        self.shared_memory = False
        # devices
        self.device_ids: set[str] = set()
        #: bus id → (kind, owner) where kind is PCI, PCIE, virtio-serial-bus, ISA
        self.buses: dict[str, str] = {}
        #: PCI bus name -> the index of the controller providing it (0: the root)
        self.bus_index: dict[str, int] = {}
        #: USB bus name -> the USB controller index (companions share their EHCI's)
        self.usb_index: dict[str, int] = {}
        self.machine_usb = False
        self.controllers: list[ControllerConfig] = []
        self.devices: list[DeviceSpec] = []
        self.disks: list[DiskSpec] = []
        self.nics: list[NicSpec] = []
        self.rngs: list[RngSpec] = []
        self.balloons: list[BalloonSpec] = []
        self.vserial: dict[str, VirtioSerialSpec] = {}
        self.ports: dict[str, list[PortSpec]] = {}
        self.vhost_user: list[VhostUserSpec] = []
        self.bridges: list[BridgeSpec] = []
        self.serial: Optional[SerialConfig] = None
        self.serial_given = False
        self.com_ports: set[int] = set()
        self.extra_serials: list[SerialPortConfig] = []
        self.channels: list[ChannelConfig] = []
        self.net_configs: list[NetConfig] = []
        self.disk_configs: list[DiskConfig] = []
        self.rng_configs: list[RngConfig] = []
        self.balloon: Optional[BalloonConfig] = None
        self.backing = MemoryBackingConfig()
        self.acpi = True
        self.cpu_config = CpuConfig()
        self.max_vcpus: Optional[int] = None
        self.topology: Optional[CpuTopology] = None
        self.numa_cells: tuple[NumaCell, ...] = ()
        self.numatune: Optional[NumaTune] = None
        self.mem_lock = False
        #: -machine mem-merge (KSM), the default of each backend's ``merge``
        self.mem_merge = True
        self.pmu: Optional[bool] = None
        self.kvm_hidden = False
        self.nic_count = 0
        self.vcpus = 1

    # ----------------------------------------------------------------- small checks

    def one(self, name: str) -> Optional[Option]:
        found = find(self.opts, name)
        return found[-1] if found else None

    def has(self, name: str) -> bool:
        return bool(find(self.opts, name))

    def note(self, line: str) -> None:
        line = " ".join(line.split())  # one log line, whatever the arguments it quotes hold
        if line not in self.pending:
            self.pending.append(line)

    def inherit(self, fd: int) -> int:
        if fd not in self.fds:
            self.fds.append(fd)
        return fd

    # ----------------------------------------------------------------- fds and chardevs

    def read_fdsets(self) -> None:
        for o in find(self.opts, "add-fd"):
            opts = o.opts
            opts.check_keys(("set", "fd", "opaque"))
            if "fd" not in opts:
                raise _usage(o.where, "parameter 'fd' is missing")
            fd = _fd_number(opts["fd"], "fd", o.where)
            fdset = opts.get_int("set", 0, lo=0)
            assert fdset is not None
            self.fdsets.setdefault(fdset, []).append(FdSetEntry(self.inherit(fd),
                                                                opts.get_str("opaque")))

    def resolve_path(self, path: str, where: str) -> tuple[Optional[str], Optional[int]]:
        """A path, or ``/dev/fdset/N`` → (None, the set's first descriptor)."""
        m = _FDSET.match(path)
        if not m:
            return path, None
        entries = self.fdsets.get(int(m.group(1)))
        if not entries:
            raise _usage(where, f"{path}: no -add-fd set={m.group(1)} was given")
        return None, entries[0].fd

    def read_chardevs(self) -> None:
        for o in find(self.opts, "chardev"):
            cd = self.chardev(o.opts)
            if cd.id in self.chardevs:
                raise _usage(o.where, f"duplicate chardev id '{cd.id}'")
            self.chardevs[cd.id] = cd

    def chardev(self, opts: Opts, ident: Optional[str] = None) -> Chardev:
        where = opts.where
        backend = opts.get_str("backend")
        if not backend:
            raise _usage(where, "parameter 'backend' is missing")
        cid = ident or opts.get_str("id")
        if not cid:
            raise _usage(where, "parameter 'id' is missing")
        common = ("backend", "id", "logfile", "logappend", "mux", "signal")
        logfile, logfd = None, None
        if "logfile" in opts:
            logfile, logfd = self.resolve_path(opts.need_str("logfile"), where)
        logappend = opts.get_bool("logappend")
        if opts.get_bool("mux"):
            raise _unsupported(where, "multiplexed chardevs (mux=on) are not supported by pyhv")
        base = dict(id=cid, backend=backend, logfile=logfile, logfd=logfd,
                    logappend=logappend, where=where)
        if backend == "socket":
            opts.check_keys(common + ("path", "fd", "server", "wait", "nowait", "abstract",
                                      "tight", "reconnect", "nodelay", "host", "port",
                                      "ipv4", "ipv6", "to", "telnet", "websocket",
                                      "tls-creds", "tls-authz"))
            for key in ("telnet", "websocket", "tls-creds", "tls-authz", "to"):
                if key in opts and opts.get_str(key) not in ("off", "false", "no"):
                    raise _unsupported(where, f"'{key}' is not supported by pyhv")
            opts.get_bool("nodelay")
            opts.get_bool("ipv4")
            opts.get_bool("ipv6")
            path = opts.get_str("path")
            fd = None
            if "fd" in opts:
                fd = self.inherit(_fd_number(opts["fd"], "fd", where))
            host, port = opts.get_str("host"), opts.get_int("port", lo=0, hi=65535)
            if "host" in opts and port is None:
                raise _usage(where, "a tcp socket chardev needs 'port'")
            if sum(x is not None for x in (path, fd, port)) != 1:
                raise _usage(where, "a socket chardev needs one of 'path', 'fd' and "
                                    "'host'/'port'")
            reconnect = opts.get_int("reconnect", 0, lo=0) or 0
            if reconnect and (opts.get_bool("server") or path is None):
                raise _usage(where, "'reconnect' is for client unix sockets (path=, no "
                                    "server=on)")
            if opts.get_bool("abstract"):
                raise _unsupported(where, "abstract unix sockets are not supported by pyhv")
            opts.get_bool("tight", True)
            wait = opts.get_bool("wait", True) and not opts.get_bool("nowait")
            return Chardev(path=path, fd=fd, server=opts.get_bool("server"), wait=wait,
                           host=host if port is not None else None, port=port,
                           reconnect=reconnect, **base)  # type: ignore[arg-type]
        if backend == "file":
            opts.check_keys(common + ("path", "append"))
            path, fd = self.resolve_path(opts.need_str("path"), where)
            return Chardev(path=path, fd=fd, append=opts.get_bool("append"),
                           **base)  # type: ignore[arg-type]
        if backend in ("pty", "null", "stdio"):
            opts.check_keys(common + (("path",) if backend == "pty" else ()))
            if opts.get_str("path"):
                raise _unsupported(where, "pty 'path' links are not supported by pyhv")
            return Chardev(**base)  # type: ignore[arg-type]
        raise _unsupported(where, f"chardev backend '{backend}' is not supported by pyhv "
                                  "(socket, pty, file, null and stdio are)")

    def claim_chardev(self, cid: str, user: str, where: str,
                      reconnect_ok: bool = False) -> Chardev:
        cd = self.chardevs.get(cid)
        if cd is None:
            raise _usage(where, f"chardev '{cid}' not found")
        if cd.reconnect and not reconnect_ok:
            raise _unsupported(cd.where, "'reconnect' is supported by pyhv for vhost-user "
                                         "sockets only")
        if cid in self.chardev_users:
            raise _usage(where, f"chardev '{cid}' is already used by "
                                f"{self.chardev_users[cid]}")
        self.chardev_users[cid] = user
        return cd

    def compat_chardev(self, spec: str, ident: str, where: str) -> Chardev:
        """``-qmp``/``-serial`` shorthand: ``unix:PATH,...``, ``stdio``, ``pty``..."""
        if spec.startswith("unix:"):
            pairs = split_list(spec[5:], "path", where)
            opts = Opts({"backend": "socket", **dict(pairs)}, where=where)
            return self.chardev(opts, ident)
        if spec.startswith("file:"):
            opts = Opts({"backend": "file", "path": spec[5:]}, where=where)
            return self.chardev(opts, ident)
        if spec in ("stdio", "pty", "null"):
            return Chardev(ident, spec, where=where)
        if spec.startswith("chardev:"):
            return self.claim_chardev(spec[8:], where, where)
        kind = spec.split(":", 1)[0]
        raise _unsupported(where, f"'{kind}' backends are not supported by pyhv "
                                  "(unix:, file:, stdio, pty, null are)")

    def read_monitors(self) -> list[Monitor]:
        out: list[Monitor] = []
        for o in find(self.opts, "mon"):
            opts = o.opts
            opts.check_keys(("chardev", "mode", "pretty", "id", "default"))
            mode = opts.choice("mode", ("control", "readline"), "readline")
            if mode != "control":
                raise _unsupported(o.where, "the human monitor (mode=readline) is not "
                                            "supported by pyhv; use mode=control (QMP)")
            cd = self.claim_chardev(opts.need_str("chardev"), o.where, o.where)
            if cd.backend not in ("socket", "stdio"):
                raise _unsupported(o.where, f"a QMP monitor needs a socket chardev, not "
                                            f"'{cd.backend}'")
            out.append(Monitor(cd, opts.get_bool("pretty"), opts.get_str("id")))
        for o in self.opts:
            if o.name not in ("qmp", "qmp-pretty"):
                continue
            cd = self.compat_chardev(o.text, f"compat_monitor{len(out)}", o.where)
            out.append(Monitor(cd, o.name == "qmp-pretty"))
        for o in find(self.opts, "monitor"):
            if o.text != "none":
                raise _unsupported(o.where, "the human monitor (HMP) is not supported by "
                                            "pyhv; use -qmp or -mon mode=control")
        return out

    # ----------------------------------------------------------------- machine

    def machine(self) -> tuple[registry.MachineType, Optional[Opts]]:
        opts = merged(self.opts, "machine")
        if opts is None:
            return registry.default_machine(), None
        name = opts.get_str("type") or registry.default_machine().name
        m = registry.find_machine(name)
        if m is None:
            raise _unsupported(f"-machine {name}", "unsupported machine type; "
                                                   "'-machine help' lists pyhv's")
        for key in opts.keys():
            if key not in _MACHINE_PROPS_OK:
                raise _usage(opts.where, f"property '{m.qom_type}.{key}' not found")
        for key in ("pflash0", "pflash1"):
            if key in opts:
                raise _unsupported(opts.where, "firmware boot (pflash) is not supported by "
                                               "pyhv; boot with -kernel")
        if opts.get_str("confidential-guest-support") or opts.get_str("sgx-epc"):
            raise _unsupported(opts.where, "confidential guests and SGX are not supported "
                                           "by pyhv")
        if opts.get_bool("nvdimm"):
            raise _unsupported(opts.where, "NVDIMMs are not supported by pyhv")
        acpi = opts.get_str("acpi", "auto")
        if acpi != "auto" and not parse_bool(acpi, "acpi", opts.where):
            self.acpi = False
        if "max-ram-below-4g" in opts:
            self.note(f"{opts.where}: max-ram-below-4g is not honoured")
        for key in ("usb", "vmport", "smm", "hpet", "graphics", "dump-guest-core",
                    "mem-merge", "suppress-vmdesc", "hmat", "i8042", "pit", "pic", "sata",
                    "smbus"):
            if key in opts and opts.get_str(key) != "auto":
                opts.get_bool(key)
        if "usb" in opts and opts.get_str("usb") != "auto":
            self.machine_usb = opts.get_bool("usb")
        if "mem-merge" in opts and opts.get_str("mem-merge") != "auto":
            self.mem_merge = opts.get_bool("mem-merge")
        return m, opts

    def default_usb(self, machine: registry.MachineType) -> None:
        """``-usb`` (or ``-machine usb=on``): the chipset's own USB controllers, as
        QEMU adds them (pc: PIIX3 UHCI at 00:01.2; q35: ICH9 EHCI with its UHCIs)."""
        if not (self.has("usb") or self.machine_usb) or machine.root_bus is None:
            return
        if any(c.type == "usb" for c in self.controllers):
            return
        models = ("piix3-uhci",) if machine.chipset == "i440fx" else \
            ("ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3")
        for i, model in enumerate(models):
            self.controllers.append(ControllerConfig(
                "usb", model, 0, "usb" if i == 0 else f"usb-companion{i}",
                master_port=None if i == 0 or model == "piix3-uhci" else 2 * (i - 1)))

    def accel(self, machine_opts: Optional[Opts]) -> None:
        wanted: list[tuple[str, str]] = []
        if machine_opts is not None and machine_opts.get_str("accel"):
            text = machine_opts.get_str("accel") or ""
            wanted += [(a, machine_opts.where) for a in text.split(":")]
        for o in self.opts:
            if o.name == "accel":
                o.opts.check_keys(("accel", "kernel-irqchip", "kvm-shadow-mem",
                                   "dirty-ring-size", "notify-vmexit", "notify-window",
                                   "thread", "tb-size", "split-wx", "one-insn-per-tb"))
                wanted.append((o.opts.need_str("accel"), o.where))
                irqchip = o.opts.get_str("kernel-irqchip")
                if irqchip not in (None, "on", "split", "true", "yes"):
                    raise _unsupported(o.where, "pyhv needs the in-kernel irqchip")
            elif o.name == "enable-kvm":
                wanted.append(("kvm", o.where))
        if not wanted:
            return
        names = [w for w, _ in wanted]
        if "kvm" not in names:
            where = wanted[0][1]
            raise _unsupported(where, f"accelerator '{names[0]}': pyhv runs guests only "
                                      "with KVM (libvirt: <domain type='kvm'>)")

    # ----------------------------------------------------------------- memory, cpus

    def read_objects(self) -> None:
        for o in find(self.opts, "object"):
            opts = o.opts
            qom = opts.need_str("qom-type")
            oid = opts.need_str("id")
            if oid in self.objects:
                raise _usage(o.where, f"duplicate object id '{oid}'")
            props = {k: v for k, v in opts.values.items() if k not in ("qom-type", "id")}
            if qom == "secret":
                opts.check_keys(("qom-type", "id", "format", "file", "data", "keyid", "iv"))
            elif qom in ("memory-backend-ram", "memory-backend-memfd", "memory-backend-file"):
                self.memory_backend(opts, qom)
            elif qom == "iothread":
                opts.check_keys(("qom-type", "id", "poll-max-ns", "poll-grow", "poll-shrink",
                                 "aio-max-batch", "thread-pool-min", "thread-pool-max"))
            elif qom == "rng-random":
                opts.check_keys(("qom-type", "id", "filename"))
                props.setdefault("filename", "/dev/urandom")
            elif qom == "rng-builtin":
                opts.check_keys(("qom-type", "id"))
            else:
                raise _unsupported(o.where, f"object type '{qom}' is not supported by pyhv")
            self.objects[oid] = ObjectSpec(qom, oid, props)
            self.object_where[oid] = o.where

    def memory_backend(self, opts: Opts, qom: str) -> None:
        allowed = ["qom-type", "id", "size", "share", "prealloc", "prealloc-threads",
                   "merge", "dump", "policy", "host-nodes", "reserve",
                   "x-use-canonical-path-for-ramblock-id", "prealloc-context"]
        if qom == "memory-backend-memfd":
            allowed += ["hugetlb", "hugetlbsize", "seal"]
        if qom == "memory-backend-file":
            allowed += ["mem-path", "align", "discard-data", "pmem", "readonly", "offset",
                        "rom"]
        opts.check_keys(allowed)
        if opts.get_size("size") is None:
            raise _usage(opts.where, "parameter 'size' is missing")
        opts.get_bool("share")
        opts.get_bool("hugetlb")
        opts.get_size("hugetlbsize")
        if qom == "memory-backend-file":
            opts.need_str("mem-path")
            opts.get_bool("discard-data")
            if opts.get_bool("pmem") or opts.get_bool("readonly"):
                raise _unsupported(opts.where, "pmem and read-only RAM are not supported")
        opts.get_bool("prealloc")
        opts.get_bool("merge")
        if ("host-nodes" in opts or opts.get_str("policy", "default") != "default") and \
                opts.get_str("id") not in self.numa_memdevs():
            self.note(f"{opts.where}: NUMA memory policy is not honoured (it is for the "
                      "memory backends of -numa node)")

    def memory(self, machine: registry.MachineType, machine_opts: Optional[Opts]) -> int:
        size: Optional[int] = None
        mopts = merged(self.opts, "m")
        if mopts is not None:
            mopts.check_keys(("size", "slots", "maxmem"))
            if "slots" in mopts or "maxmem" in mopts:
                if mopts.get_int("slots", 0) or "maxmem" in mopts:
                    raise _unsupported(mopts.where, "memory hotplug (slots, maxmem) is not "
                                                    "supported by pyhv")
            size = mopts.get_size("size", default_shift=20)
        backend_id = machine_opts.get_str("memory-backend") if machine_opts else None
        if backend_id:
            where = machine_opts.where if machine_opts else "-machine"
            obj = self.objects.get(backend_id)
            if obj is None or not obj.qom_type.startswith("memory-backend-"):
                raise _usage(where, f"memory-backend '{backend_id}' not found")
            bsize = _size_of(obj.props.get("size"), self.object_where[backend_id])
            if size is not None and size != bsize:
                raise _usage(where, f"memory-backend '{backend_id}' is {bsize} bytes but "
                                    f"-m asks for {size}")
            size = bsize
            self.backing_from(obj, where)
        else:
            numa_ram = self.numa_memdevs()
            backends = [o for o in self.objects.values()
                        if o.qom_type.startswith("memory-backend-") and o.id not in numa_ram]
            if backends:
                ids = ", ".join(b.id for b in backends)
                self.note(f"-object {ids}: memory backends not named by -machine "
                          "memory-backend= are not used")
            # -m alone: -overcommit mem-lock and -machine mem-merge still apply
            self.backing = replace(self.backing, locked=self.mem_lock, merge=self.mem_merge)
        return size if size is not None else 128 * MiB

    def numa_memdevs(self) -> list[str]:
        """The memory backends ``-numa node,memdev=`` names, in node order."""
        out = []
        for o in find(self.opts, "numa"):
            pairs = dict(split_list(o.arg or "", "type", o.where))
            if pairs.get("type") == "node" and "memdev" in pairs:
                out.append(pairs["memdev"])
        return out

    def numa(self, memory: int) -> None:
        """``-numa node|dist|cpu`` (libvirt 9.0: one memory-backend-ram/-file per node,
        ``cpus=`` given once per range) → guest NUMA cells; the backends' ``policy``/
        ``host-nodes`` → the cells' host binding."""
        options = find(self.opts, "numa")
        if not options:
            return
        nodes: dict[int, dict[str, object]] = {}
        dist: dict[tuple[int, int], int] = {}
        memnodes = []
        total = self.max_vcpus or self.vcpus
        topo = self.topology or CpuTopology(1, 1, total, 1)
        first_backend = None
        for o in options:
            pairs = split_list(o.arg or "", "type", o.where)
            kind = pairs[0][1] if pairs and pairs[0][0] == "type" else "node"
            keys = dict(pairs)
            if kind == "node":
                allowed = {"type", "nodeid", "cpus", "memdev", "mem", "initiator"}
                bad = [k for k, _v in pairs if k not in allowed]
                if bad:
                    raise _usage(o.where, f"invalid parameter '{bad[0]}'")
                if "mem" in keys:
                    raise _unsupported(o.where, "mem= is not supported; give each node a "
                                                "memory backend with memdev=")
                node = parse_int(keys.get("nodeid", str(len(nodes))), "nodeid", o.where, 0,
                                 127)
                if node in nodes:
                    raise _usage(o.where, f"duplicate NUMA nodeid: {node}")
                cpus: list[int] = []
                for k, v in pairs:
                    if k == "cpus":
                        try:
                            cpus += parse_cpuset(v, "cpus")
                        except ConfigError as e:
                            raise _usage(o.where, str(e)) from None
                size = 0
                memdev = keys.get("memdev")
                if memdev is not None:
                    obj = self.objects.get(memdev)
                    if obj is None or not obj.qom_type.startswith("memory-backend-"):
                        raise _usage(o.where, f"memdev '{memdev}' is not a memory backend")
                    size = _size_of(obj.props.get("size"), self.object_where[memdev])
                    policy = str(obj.props.get("policy", "default"))
                    hosts = obj.props.get("host-nodes")
                    if hosts is not None and policy != "default":
                        mode = {"bind": "strict", "preferred": "preferred",
                                "interleave": "interleave"}.get(policy)
                        if mode is None:
                            raise _usage(o.where, f"memdev '{memdev}': policy '{policy}' "
                                                  "(default, preferred, bind, interleave)")
                        text = ",".join(str(h) for h in hosts) if isinstance(hosts, list) \
                            else str(hosts)
                        try:
                            memnodes.append((node, mode, parse_cpuset(text, "host-nodes")))
                        except ConfigError as e:
                            raise _usage(o.where, str(e)) from None
                    if first_backend is None:
                        first_backend = obj
                nodes[node] = {"cpus": cpus, "memory": size}
            elif kind == "dist":
                bad = [k for k in keys if k not in ("type", "src", "dst", "val")]
                if bad:
                    raise _usage(o.where, f"invalid parameter '{bad[0]}'")
                src = parse_int(keys.get("src"), "src", o.where, 0)
                dst = parse_int(keys.get("dst"), "dst", o.where, 0)
                val = parse_int(keys.get("val"), "val", o.where, 10, 255)
                if (src == dst) != (val == 10):
                    raise _usage(o.where, f"invalid distance {val} from node {src} to {dst} "
                                          "(10 to itself, 11-255 to others)")
                dist[(src, dst)] = val
            elif kind == "cpu":
                bad = [k for k in keys if k not in ("type", "node-id", "socket-id", "die-id",
                                                    "core-id", "thread-id")]
                if bad:
                    raise _usage(o.where, f"invalid parameter '{bad[0]}'")
                node = parse_int(keys.get("node-id"), "node-id", o.where, 0)
                ids = [parse_int(keys.get(k, "0"), k, o.where, 0)
                       for k in ("socket-id", "die-id", "core-id", "thread-id")]
                index = ((ids[0] * topo.dies + ids[1]) * topo.cores + ids[2]) \
                    * topo.threads + ids[3]
                if index >= total:
                    raise _usage(o.where, "no CPU with these ids")
                if node not in nodes:
                    raise _usage(o.where, f"NUMA node {node} is not defined")
                nodes[node]["cpus"].append(index)  # type: ignore[attr-defined]
            else:
                raise _unsupported(o.where, f"-numa {kind} is not supported by pyhv "
                                            "(node, dist and cpu are)")
        if sorted(nodes) != list(range(len(nodes))):
            raise _usage("-numa", f"NUMA node ids {sorted(nodes)} must be 0, 1, ...")
        if any(not n["cpus"] for n in nodes.values()):
            empty = next(i for i, n in nodes.items() if not n["cpus"])
            raise _unsupported(f"-numa node,nodeid={empty}", "a NUMA node without CPUs is "
                                                             "not supported by pyhv")
        if all(not n["memory"] for n in nodes.values()):
            # QEMU spreads RAM over nodes given without memory: evenly, in 8 MiB units
            share = memory // len(nodes) & ~(8 * MiB - 1)
            for i in nodes:
                nodes[i]["memory"] = share
            nodes[len(nodes) - 1]["memory"] = memory - share * (len(nodes) - 1)
        cells = []
        for i in range(len(nodes)):
            sib = tuple((b, v) for (a, b), v in sorted(dist.items()) if a == i)
            cells.append(NumaCell(i, tuple(sorted(set(nodes[i]["cpus"]))),  # type: ignore
                                  int(nodes[i]["memory"]), sib))  # type: ignore[call-overload]
        self.numa_cells = tuple(cells)
        if memnodes:
            self.numatune = NumaTune(memnodes=tuple(memnodes))
        machine = merged(self.opts, "machine")
        if first_backend is not None and not (machine and machine.raw("memory-backend")):
            self.backing_from(first_backend, "-numa")

    def backing_from(self, obj: ObjectSpec, where: str) -> None:
        props = obj.props
        qom = obj.qom_type
        self.shared_memory = _truth(props.get("share", qom == "memory-backend-memfd"), where)
        source = {"memory-backend-ram": "anonymous", "memory-backend-memfd": "memfd",
                  "memory-backend-file": "file"}[qom]
        path = props.get("mem-path")
        # libvirt's hugepage backends are files on a hugetlbfs mount (mem-path is a
        # directory there: /dev/hugepages2M/libvirt/qemu/ID-NAME)
        hugepages = _truth(props.get("hugetlb"), where) or (
            isinstance(path, str) and ("hugepages" in path or _on_hugetlbfs(path)))
        page = props.get("hugetlbsize")
        page_size = _size_of(page, where) if page is not None else None
        merge = _truth(props.get("merge", self.mem_merge), where)
        if "host-nodes" in props or props.get("policy", "default") != "default":
            self.note(f"-object {obj.id}: NUMA memory policy is not honoured")
        try:
            self.backing = MemoryBackingConfig(
                source, hugepages, page_size if hugepages else None,  # type: ignore[arg-type]
                locked=self.mem_lock, discard=_truth(props.get("discard-data"), where),
                path=path if isinstance(path, str) else None, merge=merge,
                prealloc=_truth(props.get("prealloc"), where))
        except ConfigError as e:
            raise _usage(where, str(e)) from None

    def cpu(self) -> CpuSpec:
        smp = merged(self.opts, "smp")
        sockets = dies = cores = threads = 1
        cpus = 1
        if smp is not None:
            smp.check_keys(("cpus", "sockets", "dies", "clusters", "cores", "threads",
                            "maxcpus"))
            given = {k: smp.get_int(k, lo=1) for k in
                     ("cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus")}
            if (given["clusters"] or 1) != 1:
                raise _unsupported(smp.where, "clusters are not supported on x86")
            dies = given["dies"] or 1
            cores = given["cores"] or 1
            threads = given["threads"] or 1
            maxcpus = given["maxcpus"] or given["cpus"]
            if given["sockets"]:
                sockets = given["sockets"]
                maxcpus = maxcpus or sockets * dies * cores * threads
            elif maxcpus:
                sockets = max(1, maxcpus // (dies * cores * threads))
            else:
                maxcpus = dies * cores * threads
            cpus = given["cpus"] or maxcpus or 1
            if sockets * dies * cores * threads != maxcpus:
                raise _usage(smp.where, f"invalid CPU topology: sockets ({sockets}) * dies "
                                        f"({dies}) * cores ({cores}) * threads ({threads}) "
                                        f"!= maxcpus ({maxcpus})")
            if cpus > maxcpus:
                raise _usage(smp.where, f"cpus ({cpus}) exceeds maxcpus ({maxcpus})")
            self.max_vcpus = maxcpus if maxcpus != cpus else None
            self.topology = CpuTopology(sockets, dies, cores, threads)
        o = self.one("cpu")
        model, features = "qemu64", {}
        where = "-cpu"
        option = None
        if o is not None:
            where = o.where
            try:
                option = parse_cpu_option(o.text)
            except CpuModelError as e:
                raise _usage(where, str(e).removeprefix("-cpu: ")) from None
            model = option.model
            for name, on in option.flags:
                features[name] = "on" if on else "off"
            features.update(option.props)
        info = registry.find_cpu_model(model)
        if info is None or (info.static and not info.passthrough and model == "base"):
            raise _unsupported(f"-cpu {model}", f"unable to find CPU model '{model}' "
                                                "('-cpu help' lists pyhv's)")
        self.vcpus = cpus
        if o is None or option is None:
            self.note("no -cpu: the guest sees the host CPU (QEMU would give qemu64)")
            self.cpu_config = CpuConfig(topology=self.topology)
            return CpuSpec(model, features, info.passthrough, sockets, dies, cores, threads)
        try:
            enforce = option.enforce
            check = "full" if enforce else "partial" if option.check else "none"
            flags: dict[str, CpuFeature] = {}
            if option.flags:
                cmap = cpu_map()
                for name, on in option.flags:
                    canonical = cmap.feature_name(name, where)
                    flags[canonical] = CpuFeature(
                        canonical, ("require" if enforce else "optional") if on else "disable")
            props = option.props
            if "pmu" in props:
                self.pmu = parse_bool(props["pmu"], "pmu", where)
            if "kvm" in props:
                self.kvm_hidden = not parse_bool(props["kvm"], "kvm", where)
            ignored = [f"{k}={v}" for k, v in props.items() if k not in _CPU_APPLIED]
            if ignored:
                self.note(f"{where}: CPU properties " + ", ".join(ignored) +
                          " are not applied")
            mode = {"host": "host-passthrough", "max": "maximum"}.get(info.name, "custom")
            self.cpu_config = CpuConfig(
                mode, info.name if mode == "custom" else None,  # type: ignore[arg-type]
                self.topology, tuple(flags.values()),
                check=check,  # type: ignore[arg-type]
                vendor=props.get("vendor"), model_id=props.get("model-id"),
                migratable=parse_bool(props.get("migratable", "on"), "migratable", where))
        except CpuModelError as e:
            raise _usage(where, str(e).removeprefix(f"{where}: ")) from None
        except ConfigError as e:
            raise _usage(where, str(e)) from None
        return CpuSpec(model, features, info.passthrough, sockets, dies, cores, threads)

    # ----------------------------------------------------------------- block and net

    def read_blockdevs(self) -> None:
        for o in find(self.opts, "blockdev"):
            self.add_node(o.opts.values, o.where)
        for o in find(self.opts, "drive"):
            opts = o.opts
            opts.check_keys(("id", "file", "format", "if", "readonly", "cache", "aio",
                             "discard", "media", "snapshot", "index", "bus", "unit",
                             "serial", "werror", "rerror", "detect-zeroes", "auto-read-only",
                             "node-name", "copy-on-read", "throttling.iops-total",
                             "throttling.bps-total"))
            if opts.get_bool("snapshot"):
                raise _unsupported(o.where, "snapshot=on is not supported by pyhv")
            iface = opts.choice("if", ("none", "virtio", "ide", "scsi", "floppy", "sd", "pflash",
                                       "mtd", "xen"), "ide")
            if iface not in ("none", "virtio"):
                raise _unsupported(o.where, f"if={iface} disks are not supported by pyhv; "
                                            "use if=none with -device virtio-blk-pci")
            if opts.get_str("media", "disk") != "disk":
                raise _unsupported(o.where, "CD-ROMs are not supported by pyhv")
            if not opts.get_str("file"):
                raise _usage(o.where, "parameter 'file' is missing")
            did = opts.get_str("id") or f"{iface}{len(self.drives)}"
            if did in self.drives:
                raise _usage(o.where, f"duplicate drive id '{did}'")
            self.drives[did] = opts

    def add_node(self, values: dict[str, JsonValue], where: str) -> str:
        name = values.get("node-name")
        if not isinstance(name, str) or not name:
            if where.startswith("-blockdev"):
                raise _usage(where, "parameter 'node-name' is missing")
            name = f"#anon{len(self.nodes)}"
        if name in self.nodes:
            raise _usage(where, f"duplicate node name '{name}'")
        for key in ("file", "backing"):
            child = values.get(key)
            if isinstance(child, dict):
                values = dict(values, **{key: self.add_node(child, where)})
        self.nodes[name] = values
        self.node_where[name] = where
        return name

    def disk_from_node(self, node: str, where: str) -> tuple[dict[str, object], str]:
        """Follow a ``-blockdev`` chain: raw or qcow2 format node → file/host_device
        node (a qcow2 node's ``backing`` chain is read by :meth:`backing_chain`)."""
        chain: list[dict[str, JsonValue]] = []
        cur: JsonValue = node
        fmt: Optional[str] = None
        backing: Optional[tuple[tuple[str, Optional[str], BackingFile], ...]] = None
        l2_cache: Optional[int] = None
        while isinstance(cur, str):
            values = self.nodes.get(cur)
            if values is None:
                raise _usage(where, f"block node '{cur}' not found")
            if len(chain) > 8:
                raise _usage(where, f"block node '{node}': chain too deep")
            chain.append(values)
            driver = values.get("driver")
            if driver in ("raw", "qcow2"):
                if fmt is not None:
                    raise _unsupported(where, f"block node '{cur}': a {driver} node under a "
                                              f"{fmt} node is not supported by pyhv")
                fmt = str(driver)
                if driver == "raw":
                    for key in ("offset", "size"):
                        if key in values:
                            raise _unsupported(where, f"block node '{cur}': raw '{key}' is "
                                                      "not supported by pyhv")
                else:
                    backing = self.backing_chain(cur, where)
                    l2_cache = self.l2_cache_size(cur, where)
                cur = values.get("file")
                if cur is None:
                    raise _usage(where, f"block node '{node}': 'file' is missing")
                continue
            if driver in ("file", "host_device"):
                break
            if driver in ("qed", "vmdk", "vdi", "vpc", "vhdx", "luks"):
                raise _unsupported(where, f"block node '{cur}': image format '{driver}' is "
                                          "not supported by pyhv (raw and qcow2 are)")
            raise _unsupported(where, f"block node '{cur}': driver '{driver}' is not "
                                      "supported by pyhv (file and host_device are)")
        proto = chain[-1]
        filename = proto.get("filename")
        if not isinstance(filename, str) or not filename:
            raise _usage(where, f"block node '{node}': 'filename' is missing")
        read_only = any(_truth(v.get("read-only"), where) for v in chain)
        cache: dict[str, JsonValue] = {}
        for v in chain:
            c = v.get("cache")
            if isinstance(c, dict):
                cache.update(c)
        aio = proto.get("aio")
        if aio not in (None, "native", "threads", "io_uring"):
            raise _usage(where, f"block node '{node}': aio '{aio}' is not native, threads "
                                "or io_uring")
        zeroes = next((v.get("detect-zeroes") for v in chain if "detect-zeroes" in v), None)
        if zeroes not in (None, "off", "on", "unmap"):
            raise _usage(where, f"block node '{node}': detect-zeroes '{zeroes}' is not off, "
                                "on or unmap")
        return {
            "filename": filename,
            "read_only": read_only,
            "cache_given": bool(cache),
            "direct": _truth(cache.get("direct"), where),
            "no_flush": _truth(cache.get("no-flush"), where),
            "discard": any(v.get("discard") == "unmap" for v in chain),
            "block": proto.get("driver") == "host_device",
            "aio": aio,
            "detect_zeroes": zeroes,
            "file_node": cur,
            "format": fmt or "raw",
            "backing": None if backing is None else tuple(b for _, _, b in backing),
            "backing_nodes": tuple((n, f) for n, f, _ in backing or ()),
            "l2_cache_size": l2_cache,
        }, node

    def backing_chain(self, node: str, where: str
                      ) -> Optional[tuple[tuple[str, Optional[str], BackingFile], ...]]:
        """(format node, file node, backing file) down a qcow2 node's ``backing``:
        None when a node has no ``backing`` key (the image header names it), the chain
        when it ends in ``"backing": null`` as libvirt writes it."""
        out: list[tuple[str, Optional[str], BackingFile]] = []
        values = self.nodes[node]
        seen = {node}
        while True:
            if "backing" not in values:
                return None
            ref = values["backing"]
            if ref is None:
                return tuple(out)
            if not isinstance(ref, str):
                raise _usage(where, f"block node '{node}': 'backing' is not a node name")
            if ref in seen or len(out) >= 64:
                raise _usage(where, f"block node '{node}': the backing chain loops at "
                                    f"'{ref}'")
            seen.add(ref)
            values = self.nodes.get(ref, {})
            if not values:
                raise _usage(where, f"block node '{ref}' not found")
            driver = values.get("driver")
            if driver not in ("raw", "qcow2"):
                raise _unsupported(where, f"block node '{ref}': backing format '{driver}' "
                                          "is not supported by pyhv (raw and qcow2 are)")
            proto_name = values.get("file")
            proto = self.nodes.get(proto_name) if isinstance(proto_name, str) else None
            if proto is None or proto.get("driver") != "file":
                raise _unsupported(where, f"block node '{ref}': a backing file must be a "
                                          "file node (driver 'file') in pyhv")
            filename = proto.get("filename")
            if not isinstance(filename, str) or not filename:
                raise _usage(where, f"block node '{proto_name}': 'filename' is missing")
            path, fd = self.resolve_path(filename, where)
            if path is None:
                raise _unsupported(where, f"{filename}: backing files passed as "
                                          "descriptors are not supported by pyhv yet")
            try:
                out.append((ref, str(proto_name), BackingFile(path, driver)))  # type: ignore
            except ConfigError as e:
                raise _usage(where, str(e)) from None
            if driver == "raw":
                return tuple(out)

    def l2_cache_size(self, node: str, where: str) -> Optional[int]:
        """A qcow2 node's ``l2-cache-size`` (or its ``cache-size``, all of it taken
        for L2 tables: pyhv's refcount cache is fixed and small)."""
        values = self.nodes[node]
        for key in ("l2-cache-size", "cache-size"):
            v = values.get(key)
            if v is not None:
                return _size_of_key(v, key, where)
        return None

    def disk_from_drive(self, did: str, where: str) -> dict[str, object]:
        opts = self.drives[did]
        fmt = opts.get_str("format", "raw")
        if fmt not in ("raw", "qcow2"):
            raise _unsupported(where, f"drive '{did}': image format '{fmt}' is not supported "
                                      "by pyhv (raw and qcow2 are)")
        cache = opts.choice("cache", ("none", "writeback", "writethrough", "directsync",
                                      "unsafe"), "writeback")
        filename = opts.need_str("file")
        return {
            "filename": filename,
            "read_only": opts.get_bool("readonly"),
            "cache_given": "cache" in opts,
            "direct": cache in ("none", "directsync"),
            "no_flush": cache == "unsafe",
            "write_through": cache in ("writethrough", "directsync"),
            "discard": opts.get_str("discard", "ignore") in ("unmap", "on"),
            "block": filename.startswith("/dev/"),
            "aio": opts.choice("aio", ("native", "threads", "io_uring")),
            "detect_zeroes": opts.choice("detect-zeroes", ("off", "on", "unmap")),
            "werror": opts.choice("werror", ERROR_ACTIONS),
            "rerror": opts.choice("rerror", ERROR_ACTIONS),
            "format": fmt,
        }

    def read_fsdevs(self) -> None:
        for o in find(self.opts, "fsdev"):
            opts = o.opts
            driver = opts.need_str("fsdriver")
            if driver != "local":
                raise _unsupported(o.where, f"fsdev driver '{driver}' is not supported by "
                                            "pyhv (local is)")
            opts.check_keys(("fsdriver", "id", "path", "security_model", "readonly",
                             "writeout", "multidevs", "fmode", "dmode"))
            fid = opts.need_str("id")
            if fid in self.fsdevs:
                raise _usage(o.where, f"duplicate fsdev id '{fid}'")
            opts.need_str("path")
            opts.choice("security_model", _SECURITY_MODELS)
            self.fsdevs[fid] = opts

    def read_netdevs(self) -> None:
        for o in find(self.opts, "netdev"):
            self.netdev(o.opts)

    def netdev(self, opts: Opts) -> None:
        """One ``-netdev`` (or ``netdev_add``), checked and recorded by id."""
        where = opts.where
        kind = opts.need_str("type")
        nid = opts.need_str("id")
        if nid in self.netdevs:
            raise _usage(where, f"duplicate netdev id '{nid}'")
        if kind == "tap":
            opts.check_keys(("type", "id", "fd", "fds", "vhost", "vhostfd", "vhostfds",
                             "vhostforce", "ifname", "script", "downscript", "queues",
                             "vnet_hdr", "sndbuf", "poll-us"))
            for key in ("script", "downscript"):
                value = opts.get_str(key)
                if value not in (None, "", "no"):
                    raise _unsupported(where, f"{key}={value}: pyhv runs no scripts")
            if not ("fd" in opts or "fds" in opts or "ifname" in opts):
                raise _usage(where, "a tap netdev needs 'fd', 'fds' or 'ifname'")
        elif kind == "vhost-user":
            opts.check_keys(("type", "id", "chardev", "queues", "vhostforce"))
            opts.need_str("chardev")
        elif kind == "user":
            raise _unsupported(where, "user networking (SLIRP) is not supported by "
                                      "pyhv; use a tap interface (bridge or network)")
        else:
            raise _unsupported(where, f"netdev type '{kind}' is not supported by pyhv "
                                      "(tap and vhost-user are)")
        self.netdevs[nid] = opts

    def fd_list(self, opts: Opts, one: str, many: str) -> tuple[int, ...]:
        out: list[int] = []
        if one in opts:
            out.append(_fd_number(opts[one], one, opts.where))
        if many in opts:
            for part in (opts.get_str(many) or "").split(":"):
                out.append(_fd_number(part, many, opts.where))
        return tuple(self.inherit(fd) for fd in out)

    # ----------------------------------------------------------------- devices

    def read_devices(self, machine: registry.MachineType) -> None:
        root = machine.root_bus
        if root is not None:
            self.buses[root] = "PCIE" if machine.chipset == "q35" else "PCI"
            self.bus_index[root] = 0
            self.buses["isa.0"] = "ISA"
        for o in find(self.opts, "device"):
            if root is None:
                raise _usage(o.where, f"machine '{machine.name}' has no buses for devices")
            self.device(o.opts, root)
        for did, opts in self.drives.items():
            if opts.get_str("if") == "virtio":
                values: dict[str, JsonValue] = {"driver": "virtio-blk-pci", "drive": did}
                dev = Opts(values, where=f"{opts.where} (if=virtio)")
                self.device(dev, root or "pci.0")

    def device(self, opts: Opts, root: str) -> None:
        name = opts.need_str("driver")
        dtype = registry.find_device(name)
        if dtype is None and name.endswith("-transitional") and \
                not name.endswith("-non-transitional"):
            raise _unsupported(opts.where, "transitional virtio devices (with a legacy I/O "
                                           "BAR) are not supported: pyhv's virtio devices "
                                           "are modern only")
        if dtype is None:
            raise _unsupported(opts.where, "device is not supported by pyhv")
        where = opts.where
        handler = getattr(self, "dev_" + dtype.name.replace("-", "_"), None)
        if handler is None:  # listed for libvirt's probe, built into the machine
            raise _usage(where, f"device '{dtype.name}' is part of the machine and cannot "
                                "be added with -device")
        did = opts.get_str("id")
        if did is not None:
            if did in self.device_ids:
                raise _usage(where, f"duplicate device id '{did}'")
            self.device_ids.add(did)
        props: dict[str, JsonValue] = {}
        for key, value in opts.values.items():
            if key in registry.DEVICE_OPTIONS:
                continue
            prop = dtype.prop(key)
            if prop is None:
                raise _usage(where, f"property '{dtype.name}.{key}' not found")
            _check_prop(prop, value, where)
            props[key] = value
        bus = self.place(dtype, opts, root)
        addr = None
        if dtype.bus == "PCI":
            addr = self.pci_address(dtype, bus, props, where)
        spec = DeviceSpec(dtype.name, did, bus, addr, props, where)
        self.devices.append(spec)
        handler(spec, opts)

    def place(self, dtype: registry.DeviceType, opts: Opts, root: str) -> str:
        where = opts.where
        bus = opts.get_str("bus")
        if not dtype.bus:  # a device on no bus (QEMU's plain TYPE_DEVICE)
            if bus is not None:
                raise _usage(where, f"device '{dtype.name}' sits on no bus")
            return ""
        if bus is None:
            if dtype.bus == "PCI":
                return root
            if dtype.bus == "ISA":
                return "isa.0"
            for b, b_kind in self.buses.items():
                if b_kind == dtype.bus:
                    return b
            raise _usage(where, f"no '{dtype.bus}' bus found for device '{dtype.name}'")
        kind = self.buses.get(bus)
        if kind is None:
            raise _usage(where, f"bus '{bus}' not found")
        fits = kind == dtype.bus or (dtype.bus == "PCI" and kind == "PCIE")
        if not fits:
            raise _usage(where, f"bus '{bus}' is a {kind} bus, not a {dtype.bus} bus")
        return bus

    def pci_address(self, dtype: registry.DeviceType, bus: str, props: dict[str, JsonValue],
                    where: str) -> Optional[PciAddress]:
        """The ``addr=`` given (None: :mod:`pyhv.placement` assigns one, and checks
        every address against the chipset, the bus and the other devices)."""
        raw = props.get("addr")
        if raw is None:
            return None
        slot, fn = _parse_devfn(raw, where)
        multi = props.get("multifunction")
        return PciAddress(bus, slot, fn, multi is True or multi in ("on", "true"))

    def config_address(self, spec: DeviceSpec) -> Optional[ConfigPciAddress]:
        """A device's address in the config's form: the bus is its controller's index."""
        a = spec.addr
        if a is None:
            if spec.bus in self.bus_index and self.bus_index[spec.bus]:
                return ConfigPciAddress(self.bus_index[spec.bus], 0, 0)
            return None
        return ConfigPciAddress(self.bus_index[a.bus], a.slot, a.function,
                                multifunction=a.multifunction)

    # each dev_<driver> turns a checked DeviceSpec into its record

    def dev_isa_serial(self, spec: DeviceSpec, opts: Opts) -> None:
        where = spec.where
        index = opts.get_int("index", 0, lo=0, hi=3)
        assert index is not None
        iobase, irq = _COM_PORTS[index]
        if opts.get_int("iobase", iobase) != iobase or opts.get_int("irq", irq) != irq:
            raise _unsupported(where, "only COM1's standard I/O port and IRQ are supported")
        if index in self.com_ports:
            raise _usage(where, f"serial port index {index} (COM{index + 1}) is in use")
        self.com_ports.add(index)
        chardev = SerialConfig("null")
        if "chardev" in opts:
            cd = self.claim_chardev(opts.need_str("chardev"), where, where)
            chardev = self.serial_config(cd, where)
        if index == 0:
            self.serial, self.serial_given = chardev, True
        else:
            self.extra_serials.append(SerialPortConfig(chardev, "isa-serial", index))

    def serial_config(self, cd: Chardev, where: str) -> SerialConfig:
        backend = self._serial_backend(cd, where)
        if cd.logfile is None and cd.logfd is None:
            return backend
        return replace(backend, log_path=cd.logfile, log_fd=cd.logfd,
                       log_append=cd.logappend)

    def _serial_backend(self, cd: Chardev, where: str) -> SerialConfig:
        try:
            if cd.backend == "file":
                if cd.fd is not None:
                    return SerialConfig("fd", fd=cd.fd)
                return SerialConfig("file", cd.path, append=cd.append)
            if cd.backend in ("pty", "null", "stdio"):
                return SerialConfig(cd.backend)  # type: ignore[arg-type]
            if cd.backend == "socket" and cd.port is not None:
                return SerialConfig("tcp", host=cd.host, port=cd.port, server=cd.server)
            if cd.backend == "socket":
                # a listening socket libvirt bound already arrives as fd= (path None)
                return SerialConfig("unix", cd.path, fd=cd.fd, server=cd.server)
        except ConfigError as e:
            raise _usage(where, str(e)) from None
        raise _unsupported(where, f"'{cd.backend}' chardevs are not supported here by pyhv")

    def _bus_owner(self, spec: DeviceSpec, kind: str, bus_name: Optional[str] = None) -> str:
        name = bus_name or spec.id
        if not name:
            raise _usage(spec.where, f"{spec.driver} needs an id (it names the bus it provides)")
        if name in self.buses:
            raise _usage(spec.where, f"bus '{name}' already exists")
        self.buses[name] = kind
        return name

    def dev_pcie_root_port(self, spec: DeviceSpec, opts: Opts) -> None:
        if self.buses.get(spec.bus) != "PCIE" or spec.bus != "pcie.0":
            raise _usage(spec.where, "a pcie-root-port must sit on the q35 root bus pcie.0")
        name = self._bus_owner(spec, "PCIE")
        chassis = opts.get_int("chassis", 0) or 0
        port = opts.get_int("port", 0) or 0
        self.bridges.append(BridgeSpec(spec.driver, name, spec.addr, chassis=chassis,
                                       port=port, slot=opts.get_int("slot", 0) or 0))
        self._controller(spec, name, port=port, chassis=chassis,
                         hotplug=opts.get_bool("hotplug", True))

    def dev_pci_bridge(self, spec: DeviceSpec, opts: Opts) -> None:
        chassis = opts.get_int("chassis_nr", 0) or 0
        if chassis == 0:
            raise _usage(spec.where, "a pci-bridge needs a unique chassis_nr above 0")
        name = self._bus_owner(spec, "PCI")
        self.bridges.append(BridgeSpec(spec.driver, name, spec.addr, chassis=chassis))
        self._controller(spec, name, chassis=chassis)

    def _controller(self, spec: DeviceSpec, bus: str, port: Optional[int] = None,
                    chassis: Optional[int] = None, hotplug: bool = True) -> None:
        """A bridge's bus gets libvirt's index: ``pci.N`` is controller N."""
        m = re.fullmatch(r"pci\.(\d+)", bus)
        used = set(self.bus_index.values())
        index = int(m.group(1)) if m and int(m.group(1)) not in used else \
            max(used | {0}) + 1
        self.bus_index[bus] = index
        model = "pcie-root-port" if spec.driver == "pcie-root-port" else "pci-bridge"
        self.controllers.append(ControllerConfig("pci", model, index, spec.id,
                                                 self.config_address(spec), port, chassis,
                                                 hotplug=hotplug))

    def _usb(self, spec: DeviceSpec, opts: Opts, model: str) -> None:
        """A USB host controller: libvirt's model name in the config, its bus named
        ``<id>.0``; a UHCI companion names its EHCI's bus (``masterbus``)."""
        ident = spec.id or f"usb{len(self.usb_index)}"
        self._bus_owner(spec, "usb-bus", f"{ident}.0")
        master = opts.get_str("masterbus")
        first = None
        if master is not None:
            if master not in self.usb_index:
                raise _usage(spec.where, f"masterbus '{master}' not found (the EHCI's "
                                         "bus, usb.0)")
            index = self.usb_index[master]
            first = opts.get_int("firstport", 0, lo=0) or 0
        else:
            index = len({v for v in self.usb_index.values()})
        self.usb_index[f"{ident}.0"] = index
        try:
            self.controllers.append(ControllerConfig(
                "usb", model, index, spec.id, self.config_address(spec), master_port=first))
        except ConfigError as e:
            raise _usage(spec.where, str(e)) from None

    def dev_piix3_usb_uhci(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "piix3-uhci")

    def dev_ich9_usb_ehci1(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "ich9-ehci1")

    def dev_ich9_usb_uhci1(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "ich9-uhci1")

    def dev_ich9_usb_uhci2(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "ich9-uhci2")

    def dev_ich9_usb_uhci3(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "ich9-uhci3")

    def dev_vmcoreinfo(self, spec: DeviceSpec, opts: Opts) -> None:
        self.note(f"{spec.where}: not built: pyhv has no fw_cfg, so the guest kernel's "
                  "crash-dump notes have nowhere to go (nothing else changes)")

    def dev_qemu_xhci(self, spec: DeviceSpec, opts: Opts) -> None:
        self._usb(spec, opts, "qemu-xhci")

    def dev_virtio_serial_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        ident = spec.id or f"virtio-serial{len(self.vserial)}"
        bus = self._bus_owner(spec, "virtio-serial-bus", f"{ident}.0")
        max_ports = opts.get_int("max_ports", 31, lo=1, hi=31)
        assert max_ports is not None
        self.vserial[bus] = VirtioSerialSpec(spec.id, bus, max_ports, (), spec.addr)
        self.controllers.append(ControllerConfig(
            "virtio-serial", "virtio-serial", len(self.vserial) - 1, spec.id,
            self.config_address(spec), max_ports=max_ports))
        self.ports[bus] = []

    def _port(self, spec: DeviceSpec, opts: Opts, console: bool) -> None:
        where = spec.where
        ports = self.ports[spec.bus]
        limit = self.vserial[spec.bus].max_ports
        used = {p.nr for p in ports}
        nr = opts.get_int("nr", lo=0, hi=limit - 1)
        if nr is None:
            start = 0 if console and 0 not in used else 1
            nr = next((n for n in range(start, limit) if n not in used), None)
            if nr is None:
                raise _usage(where, f"bus '{spec.bus}' has no free port")
        if nr == 0 and not console:
            raise _usage(where, "port number 0 is reserved for virtconsole devices")
        if nr in used:
            raise _usage(where, f"port number {nr} on '{spec.bus}' is in use")
        cd = self.claim_chardev(opts.need_str("chardev"), where, where)
        name = opts.get_str("name")
        ports.append(PortSpec(spec.id, nr, cd, name, console))
        chardev = self.serial_config(cd, where)
        controller = list(self.vserial).index(spec.bus)
        try:
            if console:
                index = sum(1 for p in self.extra_serials if p.target == "virtio")
                self.extra_serials.append(SerialPortConfig(chardev, "virtio", index,
                                                           controller, nr, spec.id))
            elif name:
                self.channels.append(ChannelConfig(name, chardev, controller, nr, spec.id))
            else:
                self.note(f"{where}: a port without a name is not built")
        except ConfigError as e:
            raise _usage(where, str(e)) from None

    def dev_virtserialport(self, spec: DeviceSpec, opts: Opts) -> None:
        self._port(spec, opts, False)

    def dev_virtconsole(self, spec: DeviceSpec, opts: Opts) -> None:
        self._port(spec, opts, True)

    def dev_virtio_rng_pci_non_transitional(self, spec: DeviceSpec, opts: Opts) -> None:
        self.dev_virtio_rng_pci(spec, opts)

    def dev_virtio_rng_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        filename: Optional[str] = None
        rid = opts.get_str("rng")
        if rid is not None:
            obj = self.objects.get(rid)
            if obj is None or obj.qom_type not in ("rng-random", "rng-builtin"):
                raise _usage(spec.where, f"rng backend '{rid}' not found")
            if obj.qom_type == "rng-random":
                filename = str(obj.props["filename"])
        max_bytes, period = opts.get_int("max-bytes"), opts.get_int("period")
        self.rngs.append(RngSpec(spec.id, filename, max_bytes, period, spec.addr))
        try:
            self.rng_configs.append(RngConfig(
                filename or "/dev/urandom", max_bytes or None,
                (period or 1000) if max_bytes else None, id=spec.id,
                address=self.config_address(spec)))
        except ConfigError as e:
            raise _unsupported(spec.where, str(e)) from None

    def dev_virtio_balloon_pci_non_transitional(self, spec: DeviceSpec, opts: Opts) -> None:
        self.dev_virtio_balloon_pci(spec, opts)

    def dev_virtio_balloon_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        if self.balloon is not None:
            raise _unsupported(spec.where, "only one memory balloon is supported")
        self.balloons.append(BalloonSpec(spec.id, opts.get_bool("deflate-on-oom"),
                                         opts.get_bool("free-page-reporting"), spec.addr))
        self.balloon = BalloonConfig(
            stats_period=opts.get_int("guest-stats-polling-interval", lo=0),
            autodeflate=opts.get_bool("deflate-on-oom"),
            free_page_reporting=opts.get_bool("free-page-reporting"), id=spec.id,
            address=self.config_address(spec))

    def dev_virtio_blk_pci_non_transitional(self, spec: DeviceSpec, opts: Opts) -> None:
        self.dev_virtio_blk_pci(spec, opts)

    def dev_virtio_blk_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        where = spec.where
        drive = opts.need_str("drive")
        if drive in self.used_nodes:
            raise _usage(where, f"drive '{drive}' is already used by {self.used_nodes[drive]}")
        if drive in self.drives:
            info = self.disk_from_drive(drive, where)
        elif drive in self.nodes:
            info, _ = self.disk_from_node(drive, where)
        else:
            raise _usage(where, f"drive '{drive}' not found")
        self.used_nodes[drive] = where
        path, fd = self.resolve_path(str(info["filename"]), where)
        if fd is not None:
            raise _unsupported(where, f"{info['filename']}: disk images passed as "
                                      "descriptors are not supported by pyhv yet")
        assert path is not None
        bootindex = opts.get_int("bootindex")
        self.disks.append(DiskSpec(
            spec.id, path, fd, bool(info["read_only"]), bool(info["direct"]),
            bool(info["no_flush"]), bool(info["discard"]), opts.get_str("serial"),
            bootindex, opts.get_int("num-queues"), opts.get_int("queue-size"),
            spec.addr, drive, info.get("file_node"),  # type: ignore[arg-type]
            str(info.get("format", "raw")),
            info.get("backing_nodes", ())))  # type: ignore[arg-type]
        write_cache = opts.get_str("write-cache", "auto")
        cache = _cache_mode(info, write_cache != "auto" and not parse_bool(
            write_cache, "write-cache", where))
        werror = opts.choice("werror", ERROR_ACTIONS) or info.get("werror") or "auto"
        rerror = opts.choice("rerror", ERROR_ACTIONS) or info.get("rerror") or "auto"
        if rerror == "enospc":
            raise _usage(where, "rerror=enospc is not supported (enospc is for writes)")
        try:
            self.disk_configs.append(DiskConfig(
                path, format=str(info.get("format", "raw")),
                source_type="block" if info["block"] else "file",
                backing=info.get("backing"),  # type: ignore[arg-type]
                l2_cache_size=info.get("l2_cache_size"),  # type: ignore[arg-type]
                readonly=bool(info["read_only"]), shareable=opts.get_bool("share-rw"),
                cache=cache, io=info["aio"],  # type: ignore[arg-type]
                discard="unmap" if info["discard"] else None,
                detect_zeroes=info["detect_zeroes"],  # type: ignore[arg-type]
                serial=opts.get_str("serial"),
                boot_order=bootindex if bootindex is not None and bootindex >= 1 else None,
                queues=opts.get_int("num-queues") or 1,
                # QEMU's own defaults made explicit: libvirt's rule that error_policy
                # covers reads as well is libvirt's, already applied to this argv
                error_policy="enospace" if werror in ("auto", "enospc")
                else werror,  # type: ignore[arg-type]
                rerror_policy="report" if rerror == "auto" else rerror,  # type: ignore
                id=spec.id, address=self.config_address(spec)))
        except ConfigError as e:
            raise _usage(where, str(e)) from None

    def dev_virtio_net_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        where = spec.where
        nid = opts.need_str("netdev")
        nd = self.netdevs.get(nid)
        if nd is None:
            raise _usage(where, f"netdev '{nid}' not found")
        if nid in self.used_netdevs:
            raise _usage(where, f"netdev '{nid}' is already used by {self.used_netdevs[nid]}")
        self.used_netdevs[nid] = where
        mac = opts.get_str("mac")
        if mac is None:
            mac = f"52:54:00:12:34:{0x56 + self.nic_count:02x}"
        elif not _MAC.match(mac):
            raise _usage(where, f"'{mac}' is not a MAC address (example: 52:54:00:12:34:56)")
        self.nic_count += 1
        kind = nd.need_str("type")
        queues = nd.get_int("queues", 1, lo=1) or 1
        if kind == "tap":
            fds = self.fd_list(nd, "fd", "fds")
            vhost_fds = self.fd_list(nd, "vhostfd", "vhostfds")
            vhost = nd.get_bool("vhost") or nd.get_bool("vhostforce")
            if fds and len(fds) != queues and "queues" in nd:
                raise _usage(nd.where, f"{len(fds)} tap descriptors for {queues} queues")
            queues = max(queues, len(fds))
            ifname = nd.get_str("ifname")
            nic = NicSpec(spec.id, mac.lower(), "tap", nid, fds, ifname,
                          vhost_fds, vhost, queues, None, opts.get_int("bootindex"),
                          opts.get_int("host_mtu"), spec.addr)
            try:
                net = NetConfig("tap", ifname=ifname if not fds else None, fds=fds,
                                vhost_fds=vhost_fds, vhost=vhost, queues=queues,
                                mac=mac.lower(),
                                mtu=opts.get_int("host_mtu"), id=spec.id,
                                address=self.config_address(spec))
            except ConfigError as e:
                raise _usage(where, str(e)) from None
        else:
            cd = self.claim_chardev(nd.need_str("chardev"), nd.where, nd.where,
                                    reconnect_ok=True)
            self.need_shared_memory(where)
            if cd.backend != "socket" or cd.path is None:
                raise _unsupported(where, f"vhost-user netdev '{nid}' needs a unix socket "
                                          "chardev with a path")
            nic = NicSpec(spec.id, mac.lower(), "vhost-user", nid, queues=queues, chardev=cd,
                          bootindex=opts.get_int("bootindex"), addr=spec.addr)
            try:
                net = NetConfig("vhost-user", socket=cd.path, server=cd.server,
                                mac=mac.lower(), queues=queues, mtu=opts.get_int("host_mtu"),
                                reconnect=cd.reconnect or None, id=spec.id,
                                address=self.config_address(spec))
            except ConfigError as e:
                raise _usage(where, str(e)) from None
        self.nics.append(nic)
        self.net_configs.append(net)

    def need_shared_memory(self, where: str) -> None:
        if not self.shared_memory:
            raise _usage(where, "vhost-user needs shared guest memory (a memory-backend with "
                                "share=on; libvirt: <memoryBacking><access mode='shared'/>)")

    def _vhost_user(self, spec: DeviceSpec, opts: Opts) -> None:
        self.need_shared_memory(spec.where)
        cd = self.claim_chardev(opts.need_str("chardev"), spec.where, spec.where,
                                reconnect_ok=spec.driver == "vhost-user-blk-pci")
        if cd.backend != "socket":
            raise _usage(spec.where, f"chardev '{cd.id}' must be a unix socket")
        if spec.driver == "vhost-user-blk-pci":
            self._vhost_user_blk(spec, opts, cd)
            return
        tag = opts.get_str("tag")
        if spec.driver == "vhost-user-fs-pci" and not tag:
            raise _usage(spec.where, "parameter 'tag' is missing")
        queues = opts.get_int("num-queues") or opts.get_int("num-request-queues")
        self.vhost_user.append(VhostUserSpec(spec.driver, spec.id, cd, tag, queues,
                                             opts.get_int("queue-size"),
                                             opts.get_int("bootindex"), spec.addr))
        self.note(f"{spec.where}: vhost-user devices are recorded, not built yet")

    def _vhost_user_blk(self, spec: DeviceSpec, opts: Opts, cd: Chardev) -> None:
        """A virtio-blk disk whose queues a vhost-user backend serves (libvirt's
        ``<disk type='vhostuser'>``): pyhv connects to the backend's socket."""
        if cd.path is None or cd.server:
            raise _unsupported(spec.where, f"chardev '{cd.id}': pyhv connects to a "
                                           "vhost-user-blk backend's unix socket (path=, "
                                           "no server=on)")
        bootindex = opts.get_int("bootindex")
        opts.get_int("queue-size")  # the backend's ring size is pyhv's (128)
        opts.get_bool("config-wce", True)
        try:
            self.disk_configs.append(DiskConfig(
                cd.path, source_type="vhostuser",
                queues=opts.get_int("num-queues") or 1,
                boot_order=bootindex if bootindex is not None and bootindex >= 1 else None,
                reconnect=cd.reconnect or None, id=spec.id,
                address=self.config_address(spec)))
        except ConfigError as e:
            raise _usage(spec.where, str(e)) from None

    dev_vhost_user_blk_pci = _vhost_user
    dev_vhost_user_fs_pci = _vhost_user

    def dev_virtio_9p_pci(self, spec: DeviceSpec, opts: Opts) -> None:
        where = spec.where
        fid = opts.need_str("fsdev")
        fs = self.fsdevs.get(fid)
        if fs is None:
            raise _usage(where, f"fsdev '{fid}' not found")
        if fid in self.used_fsdevs:
            raise _usage(where, f"fsdev '{fid}' is already used by {self.used_fsdevs[fid]}")
        self.used_fsdevs[fid] = where
        tag = opts.need_str("mount_tag")
        model = fs.choice("security_model", _SECURITY_MODELS) or "passthrough"
        try:
            self.fs_configs.append(FilesystemConfig(
                fs.need_str("path"), tag, "9p", _ACCESSMODES[model],  # type: ignore[arg-type]
                fs.get_bool("readonly"), id=spec.id, address=self.config_address(spec)))
        except ConfigError as e:
            raise _usage(where, str(e)) from None

    dev_virtio_9p_pci_non_transitional = dev_virtio_9p_pci

    # ----------------------------------------------------------------- the rest

    def legacy_serial(self) -> None:
        for n, o in enumerate(find(self.opts, "serial")):
            if o.text == "none":
                continue
            if n > 0:
                raise _unsupported(o.where, "only one serial port (COM1) is supported by pyhv")
            if self.serial_given:
                raise _unsupported(o.where, "COM1 is already defined")
            spec = o.text
            if spec == "mon:stdio":
                self.note(f"{o.where}: no human monitor is multiplexed; COM1 is on stdio")
                spec = "stdio"
            cd = self.compat_chardev(spec, f"serial{n}", o.where)
            self.serial, self.serial_given = self.serial_config(cd, o.where), True

    def rtc(self) -> RtcSpec:
        opts = merged(self.opts, "rtc")
        if opts is None:
            return RtcSpec()
        opts.check_keys(("base", "clock", "driftfix"))
        base = opts.get_str("base", "utc") or "utc"
        if base not in ("utc", "localtime") and not re.match(
                r"^\d{4}-\d\d-\d\d(T\d\d:\d\d:\d\d)?$", base):
            raise _usage(opts.where, f"invalid date format '{base}' (valid: "
                                     "2006-06-17T16:01:21 or 2006-06-17)")
        spec = RtcSpec(base, opts.choice("clock", ("host", "rt", "vm"), "host") or "host",
                       opts.choice("driftfix", ("none", "slew"), "none") or "none")
        if spec.clock != "host":
            self.note(f"{opts.where}: clock={spec.clock} is not honoured; the RTC follows "
                      "the host clock")
        lost: Literal["discard", "slew"] = "slew" if spec.driftfix == "slew" else "discard"
        if base == "localtime":
            # libvirt's offset='timezone' sets TZ for the process: localtime follows it
            self.clock = ClockConfig("localtime", rtc_lost_ticks=lost)
        elif base != "utc":
            fmt = "%Y-%m-%dT%H:%M:%S" if "T" in base else "%Y-%m-%d"
            try:
                start = datetime.strptime(base, fmt).replace(tzinfo=timezone.utc)
            except ValueError:
                raise _usage(opts.where, f"invalid date '{base}'") from None
            self.clock = ClockConfig("variable", int(start.timestamp() - self.now),
                                     rtc_lost_ticks=lost)
        else:
            self.clock = ClockConfig(rtc_lost_ticks=lost)
        return spec

    def misc(self) -> None:
        for name, reason in _REFUSED.items():
            o = self.one(name)
            if o is not None and not (name == "parallel" and o.text == "none"):
                raise _unsupported(o.where, reason)
        for o in find(self.opts, "display"):
            o.opts.check_keys(("type",))
            if o.opts.get_str("type") != "none":
                raise _unsupported(o.where, "displays are not supported by pyhv; use "
                                            "-display none")
        for o in find(self.opts, "vga"):
            if o.text != "none":
                raise _unsupported(o.where, "video cards are not supported by pyhv")
        o = self.one("overcommit")
        if o is not None:
            o.opts.check_keys(("mem-lock", "cpu-pm"))
            if o.opts.choice("mem-lock", ("on", "off", "on-fault"), "off") != "off":
                self.mem_lock = True
            if o.opts.get_bool("cpu-pm"):
                self.note(f"{o.where}: cpu-pm is not honoured")
        for o in find(self.opts, "sandbox"):
            o.opts.get_bool("enable")
        self.read_smbios()
        for o in find(self.opts, "fw_cfg"):
            self.note(f"{o.where}: not passed to the guest (not supported yet)")
        if self.has("no-acpi"):
            self.acpi = False
        for o in find(self.opts, "audiodev"):
            o.opts.need_str("id")
            o.opts.need_str("driver")

    def read_smbios(self) -> None:
        """``-smbios type=0|1|2|3|4|11|17,...`` (libvirt's ``<sysinfo>``): fields of
        the guest's SMBIOS tables; later options' keys win, as in QEMU."""
        kinds = {"0": "bios", "1": "system", "2": "baseboard", "3": "chassis",
                 "4": "processor", "17": "memory"}
        merged_fields: dict[str, dict[str, str]] = {k: {} for k in kinds.values()}
        oem: list[str] = []
        for o in find(self.opts, "smbios"):
            kind = o.opts.get_str("type")
            if kind is None:
                raise _unsupported(o.where, "SMBIOS binary files (file=) are not supported "
                                            "by pyhv; give type=N and fields")
            if kind == "11":
                o.opts.check_keys(("type", "value"))
                oem += [v for k, v in split_list(o.arg or "", "type", o.where)
                        if k == "value"]
                continue
            if kind not in kinds:
                raise _unsupported(o.where, f"SMBIOS type {kind} is not supported (supported: "
                                            "0, 1, 2, 3, 4, 11, 17)")
            name = kinds[kind]
            allowed = SMBIOS_FIELDS[name] + (("uefi",) if name == "bios" else ())
            o.opts.check_keys(("type",) + allowed)
            for key in o.opts.keys():
                value = o.opts.get_str(key) or ""
                if key == "uefi":
                    parse_bool(value, key, o.where)  # firmware kind: no UEFI here
                elif key != "type":
                    merged_fields[name][key] = value
        uuid = merged_fields["system"].get("uuid")
        if uuid is not None and not _UUID.match(uuid):
            raise _usage("-smbios type=1", f"invalid UUID '{uuid}' (expected 8-4-4-4-12 "
                                           "hexadecimal digits)")
        f = {k: tuple(v.items()) for k, v in merged_fields.items()}
        self.smbios = SmbiosConfig(
            bios=f["bios"], system=f["system"], chassis=f["chassis"],
            baseboards=(f["baseboard"],) if f["baseboard"] else (),
            processor=f["processor"], memory=f["memory"], oem_strings=tuple(oem))

    def globals(self) -> tuple[tuple[str, str, str], ...]:
        out = []
        for o in find(self.opts, "global"):
            values = o.opts.values
            if set(values) <= {"driver", "property", "value"} and "driver" in values:
                triple = (o.opts.need_str("driver"), o.opts.need_str("property"),
                          o.opts.get_str("value") or "")
            else:
                if len(values) != 1:
                    raise _usage(o.where, "expected driver.property=value")
                key, value = next(iter(values.items()))
                driver, dot, prop = key.partition(".")
                if not dot or not driver or not prop:
                    raise _usage(o.where, "expected driver.property=value")
                triple = (driver, prop, str(value))
            if (triple[0], triple[1]) not in _GLOBALS_OK:
                self.note(f"-global {triple[0]}.{triple[1]}={triple[2]}: not applied")
            if triple[1] in ("disable_s3", "disable_s4") and triple[2] not in ("1", "on"):
                state = "S3 (suspend to RAM)" if triple[1] == "disable_s3" else \
                    "S4 (suspend to disk)"
                raise _unsupported(o.where, f"{state} is not supported (pyhv offers S5 only)")
            out.append(triple)
        return tuple(out)

    def boot(self, machine: registry.MachineType) -> Optional[KernelBoot]:
        opts = merged(self.opts, "boot")
        if opts is not None:
            opts.check_keys(("order", "once", "menu", "splash", "splash-time",
                             "reboot-timeout", "strict"))
            devices = {"c": "hd", "d": "cdrom", "n": "network"}
            order = opts.get_str("order") or ""
            if any(c not in "abcdnop" for c in order):
                raise _usage(opts.where, f"invalid boot device order '{order}'")
            self.boot_order = tuple(devices[c] for c in order if c in devices)
            opts.get_bool("strict")
            opts.get_bool("menu")
            opts.get_int("reboot-timeout")
        kernel = self.one("kernel")
        if machine.chipset == "none":
            return None
        if kernel is None:
            raise _unsupported("-kernel", "pyhv boots guests only from a kernel (direct "
                                          "kernel boot; libvirt: <os><kernel>); firmware "
                                          "and disk boot are not supported")
        initrd = self.one("initrd")
        append = self.one("append")
        return KernelBoot(kernel.text, initrd.text if initrd else None,
                          append.text if append else "")

    def process(self, monitors: list[Monitor]) -> ShimOptions:
        name_opts = merged(self.opts, "name")
        name = process_name = None
        debug_threads = False
        if name_opts is not None:
            name_opts.check_keys(("guest", "process", "debug-threads"))
            name = name_opts.get_str("guest")
            process_name = name_opts.get_str("process")
            debug_threads = name_opts.get_bool("debug-threads")
        no_reboot = self.has("no-reboot")
        panic = "shutdown"
        no_shutdown = self.has("no-shutdown")
        for o in find(self.opts, "action"):
            opts = o.opts
            opts.check_keys(("reboot", "shutdown", "panic", "watchdog"))
            if opts.choice("reboot", ("reset", "shutdown"), "reset") == "shutdown":
                no_reboot = True
            if opts.choice("shutdown", ("poweroff", "pause"), "poweroff") == "pause":
                no_shutdown = True
            panic = opts.choice("panic", ("pause", "shutdown", "none", "exit-failure"),
                                panic) or panic
            opts.choice("watchdog", ("reset", "shutdown", "poweroff", "pause", "debug",
                                     "none", "inject-nmi"))
        msg = merged(self.opts, "msg")
        timestamp = False
        if msg is not None:
            msg.check_keys(("timestamp", "guest-name"))
            timestamp = msg.get_bool("timestamp")
            msg.get_bool("guest-name")
        sandbox = False
        for o in find(self.opts, "sandbox"):
            sandbox = o.opts.get_bool("enable")
        pidfile = self.one("pidfile")
        log = self.one("D")
        return ShimOptions(
            name=name, process_name=process_name, debug_threads=debug_threads,
            monitors=tuple(monitors), pidfile=pidfile.text if pidfile else None,
            daemonize=self.has("daemonize"), start_paused=self.has("S"),
            no_shutdown=no_shutdown, no_reboot=no_reboot, panic_action=panic,
            msg_timestamp=timestamp, sandbox=sandbox,
            fdsets={k: tuple(v) for k, v in self.fdsets.items()},
            chardevs=dict(self.chardevs), inherited_fds=tuple(self.fds),
            logfile=log.text if log else None)


    # ----------------------------------------------------------------- hotplug (QMP)

    def hot_netdev(self, values: dict[str, JsonValue], take_fd: Callable[[str], int]) -> None:
        """``netdev_add``: a netdev a later ``device_add`` uses; descriptors are given
        by the names ``getfd`` gave them (``take_fd`` hands each over, once)."""
        values = dict(values)
        taken: list[int] = []
        try:
            for key in ("fd", "vhostfd", "fds", "vhostfds"):
                value = values.get(key)
                if isinstance(value, str):
                    fds = [int(p) if p.isdigit() else take_fd(p) for p in value.split(":")]
                    taken += fds
                    values[key] = ":".join(str(fd) for fd in fds)
            self.netdev(Opts(values, json=True, where="netdev_add"))
        except BaseException:
            for fd in taken:
                close_fds((fd,))
            raise
        self.hot_fds[str(values["id"])] = taken

    def hot_netdev_del(self, nid: str) -> None:
        """``netdev_del``: the descriptors no NIC took are closed."""
        if nid not in self.netdevs:
            raise _usage("netdev_del", f"netdev '{nid}' not found")
        del self.netdevs[nid]
        self.used_netdevs.pop(nid, None)
        for fd in self.hot_fds.pop(nid, []):
            close_fds((fd,))

    def hot_blockdev(self, values: dict[str, JsonValue]) -> None:
        """``blockdev-add``: a node a later ``device_add`` uses (checked now, as QEMU
        opens it now)."""
        where = "blockdev-add"
        name = values.get("node-name")
        if not isinstance(name, str) or not name:
            raise _usage(where, "parameter 'node-name' is missing")
        driver = values.get("driver")
        if driver not in ("file", "host_device", "raw", "qcow2"):
            raise _unsupported(where, f"driver '{driver}' is not supported by pyhv (file, "
                                      "host_device, raw and qcow2 are)")
        filename = values.get("filename")
        if driver in ("file", "host_device") and \
                (not isinstance(filename, str) or not os.path.exists(filename)):
            raise _usage(where, f"Could not open '{filename}': No such file or directory")
        for key in ("file", "backing"):
            child = values.get(key)
            if isinstance(child, str) and child not in self.nodes:
                raise _usage(where, f"Cannot find device='' nor node-name='{child}'")
        self.add_node(dict(values), where)

    def hot_blockdev_del(self, name: str) -> None:
        where = "blockdev-del"
        if name not in self.nodes:
            raise _usage(where, f"Failed to find node with node-name='{name}'")
        if name in self.used_nodes:
            raise _usage(where, f"Node '{name}' is busy: node is used as guest device")
        if any(v.get("file") == name or v.get("backing") == name
               for v in self.nodes.values()):
            raise _usage(where, f"Node '{name}' is busy: a node above it uses it")
        del self.nodes[name]
        self.node_where.pop(name, None)

    def hot_device(self, values: dict[str, JsonValue], root: str
                   ) -> tuple[Union[DiskConfig, NetConfig], Union[DiskSpec, NicSpec]]:
        """``device_add`` of a disk or NIC: its config and spec, mapped by the same
        code as ``-device``; on an error nothing is kept."""
        where = "device_add"
        driver = values.get("driver")
        if driver not in HOT_DRIVERS:
            raise _unsupported(where, f"hot-adding '{driver}' is not supported by pyhv "
                                      "(virtio-blk-pci and virtio-net-pci are)")
        if values.get("bus") in (None, root):
            raise _usage(where, f"Bus '{root}' does not support hotplugging: pyhv hot-adds "
                                "into a pcie-root-port (bus=)")
        saved = (set(self.device_ids), dict(self.used_nodes), dict(self.used_netdevs),
                 len(self.devices), len(self.disks), len(self.nics),
                 len(self.disk_configs), len(self.net_configs), self.nic_count)
        try:
            self.device(Opts(dict(values), json=True, where=where), root)
        except BaseException:
            (self.device_ids, self.used_nodes, self.used_netdevs, nd, ns, nn, ndc, nnc,
             self.nic_count) = saved
            del self.devices[nd:], self.disks[ns:], self.nics[nn:]
            del self.disk_configs[ndc:], self.net_configs[nnc:]
            raise
        if len(self.disk_configs) > saved[6]:
            return self.disk_configs.pop(), self.disks[-1]
        nic = self.nics[-1]
        self.hot_fds.pop(nic.netdev, None)  # the NIC owns its taps now
        return self.net_configs.pop(), nic

    def hot_forget(self, ident: str) -> None:
        """The guest let go of device ``ident``: its id, drive and netdev are free."""
        self.device_ids.discard(ident)
        for d in [d for d in self.disks if d.id == ident]:
            self.used_nodes.pop(d.node, None)
            self.disks.remove(d)
        for n in [n for n in self.nics if n.id == ident]:
            self.used_netdevs.pop(n.netdev, None)
            self.nics.remove(n)


def _size_of_key(value: object, key: str, where: str) -> int:
    from pyhv.shim.argv import parse_size

    return parse_size(value, key, where)


def _size_of(value: object, where: str) -> int:
    from pyhv.shim.argv import parse_size

    return parse_size(value, "size", where)


def _cache_mode(info: dict[str, object], write_through: bool) -> Optional[str]:
    """libvirt's cache mode back from cache.direct, cache.no-flush and write-cache."""
    write_through = write_through or bool(info.get("write_through"))
    if not info["cache_given"] and not write_through:
        return None
    if info["no_flush"]:
        return "unsafe"
    if info["direct"]:
        return "directsync" if write_through else "none"
    return "writethrough" if write_through else "writeback"


def _truth(value: object, where: str) -> bool:
    return False if value is None else parse_bool(value, "flag", where)


def _on_hugetlbfs(path: str) -> bool:
    import os

    from pyhv.engine.memory import hugetlbfs_page_size

    try:
        return hugetlbfs_page_size(path if os.path.isdir(path) else
                                   os.path.dirname(path) or ".") is not None
    except OSError:
        return False


def _parse_devfn(raw: JsonValue, where: str) -> tuple[int, int]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        slot, fn = raw >> 3, raw & 7
    elif isinstance(raw, str):
        slot_s, _, fn_s = raw.partition(".")
        try:
            slot = int(slot_s, 16)
            fn = int(fn_s, 16) if fn_s else 0
        except ValueError:
            raise _usage(where, f"addr '{raw}': expected slot[.function], e.g. 0x3 or "
                                "0x1.0x2") from None
    else:
        raise _usage(where, "addr: expected slot[.function]")
    if not (0 <= slot < 32 and 0 <= fn < 8):
        raise _usage(where, f"addr '{raw}': slot must be below 32 and function below 8")
    return slot, fn


_INT_RANGES = {
    "uint8": (0, 0xFF), "uint16": (0, 0xFFFF), "uint32": (0, 0xFFFFFFFF),
    "uint64": (0, (1 << 64) - 1), "int32": (-(1 << 31), (1 << 31) - 1),
    "int": (-(1 << 63), (1 << 63) - 1),
}


def _check_prop(prop: registry.PropInfo, value: JsonValue, where: str) -> None:
    """Type-check a ``-device`` property value the way QEMU's visitors would."""
    if prop.name == "addr":
        _parse_devfn(value, where)
    elif prop.type == "bool":
        parse_bool(value, prop.name, where)
    elif prop.type in _INT_RANGES:
        lo, hi = _INT_RANGES[prop.type]
        parse_int(value, prop.name, where, lo, hi)
    elif prop.type == "size":
        _size_of(value, where)
    elif prop.type == "OnOffAuto":
        if str(value).lower() not in ("on", "off", "auto", "true", "false"):
            raise _usage(where, f"parameter '{prop.name}' expects on, off or auto")
    elif prop.type == "BlockdevOnError":
        if value not in ("report", "ignore", "enospc", "stop", "auto"):
            raise _usage(where, f"parameter '{prop.name}' expects report, ignore, enospc, "
                                "stop or auto")
    elif not isinstance(value, (str, int)) or isinstance(value, bool):
        raise _usage(where, f"parameter '{prop.name}' expects a string")


# --------------------------------------------------------------------------- entry points


def build(args: Sequence[str], now: Optional[float] = None) -> ShimPlan:
    """Arguments (without argv[0]) → a checked plan; raises ShimError.

    ``now`` (seconds since the epoch, default the current time) is what a
    ``-rtc base=DATE`` start date is measured from.
    """
    b = _Builder(parse(args), now)
    b.misc()
    machine, machine_opts = b.machine()
    b.accel(machine_opts)
    b.read_fdsets()
    b.read_chardevs()
    monitors = b.read_monitors()
    b.read_objects()
    memory = b.memory(machine, machine_opts)
    cpu = b.cpu()
    b.numa(memory)
    rtc = b.rtc()
    boot = b.boot(machine)
    b.read_blockdevs()
    b.read_netdevs()
    b.read_fsdevs()
    b.read_devices(machine)
    b.default_usb(machine)
    b.legacy_serial()
    global_props = b.globals()
    for cid in b.chardevs:
        if cid not in b.chardev_users:
            b.note(f"-chardev {cid}: not used by any device")
    options = b.process(monitors)
    config = None
    if boot is not None:
        serial = b.serial
        if serial is None:
            serial = SerialConfig("stdio" if b.has("nographic") and not b.has("nodefaults")
                                  else "null")
        try:
            config = VmConfig(
                boot=boot,
                name=options.name or "pyhv",
                uuid=_uuid(b.one("uuid")),
                memory=memory,
                vcpus=b.vcpus,
                serial=serial,
                on_reboot="destroy" if options.no_reboot else "restart",
                shared_memory=b.shared_memory,
                machine=machine.name,
                memory_backing=b.backing,
                max_vcpus=b.max_vcpus,
                cpu=b.cpu_config,
                features=FeaturesConfig(acpi=b.acpi, pmu=b.pmu, kvm_hidden=b.kvm_hidden),
                clock=b.clock,
                numa=b.numa_cells,
                numatune=b.numatune,
                boot_order=b.boot_order,
                disks=tuple(b.disk_configs),
                nets=tuple(b.net_configs),
                filesystems=tuple(b.fs_configs),
                extra_serials=tuple(b.extra_serials),
                channels=tuple(b.channels),
                rngs=tuple(b.rng_configs),
                balloon=b.balloon,
                controllers=tuple(b.controllers),
                smbios=b.smbios,
            )
            config = place(config)
        except ConfigError as e:
            raise ShimError(str(e), _config_where(str(e))) from None
    elif b.one("uuid") is not None:
        _uuid(b.one("uuid"))
    vs = tuple(VirtioSerialSpec(v.id, v.bus_name, v.max_ports, tuple(b.ports[k]), v.addr)
               for k, v in b.vserial.items())
    return ShimPlan(
        config=config, options=options, machine=machine, cpu=cpu, rtc=rtc,
        devices=tuple(b.devices), disks=tuple(b.disks), nics=tuple(b.nics),
        rngs=tuple(b.rngs), balloons=tuple(b.balloons), virtio_serial=vs,
        vhost_user=tuple(b.vhost_user), bridges=tuple(b.bridges), objects=dict(b.objects),
        globals=global_props, pending=tuple(b.pending), builder=b)


def _uuid(o: Optional[Option]) -> Optional[str]:
    if o is None:
        return None
    if not _UUID.match(o.text):
        raise _usage(o.where, "invalid UUID (expected 8-4-4-4-12 hexadecimal digits)")
    return o.text.lower()


def _config_where(message: str) -> str:
    if message.startswith(("numa", "numatune")):
        return "-numa"
    if message.startswith("memory"):
        return "-m"
    if message.startswith(("vcpus", "max vcpus", "cpu")):
        return "-smp"
    if message.startswith("serial"):
        return "-device isa-serial"
    if message.startswith(("disk", "interface", "rng", "memballoon", "controller",
                           "filesystem")):
        return "-device"
    return "-machine"


def parse_and_map(args: Sequence[str], now: Optional[float] = None) -> ShimPlan:
    """The process module's entry point: the same as :func:`build`."""
    return build(args, now)
