"""``VmConfig``: the one description of a machine that every front end produces.

``pyhv/domxml`` builds it from libvirt domain XML, ``pyhv/shim`` from QEMU's
command line and the ``pyhv run`` options directly; the engine's builder is
its only consumer.  Frozen dataclasses with checked values: a ``VmConfig`` that
exists is internally consistent.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from pyhv.errors import PyhvError

MiB = 1 << 20
#: the largest size anything can have (a 64-bit byte count)
SIZE_MAX = (1 << 64) - 1

BootProtocol = Literal["auto", "linux", "pvh"]
SerialKind = Literal["stdio", "file", "pty", "null", "fd", "unix", "tcp"]
Action = Literal["destroy", "restart", "preserve"]
MemorySource = Literal["anonymous", "memfd", "file"]


class ConfigError(PyhvError):
    """A value that no machine can be built from."""


@dataclass(frozen=True)
class SerialConfig:
    """Where COM1's output goes and its input comes from."""

    kind: SerialKind = "stdio"
    #: file path for ``file``; unused otherwise
    path: Optional[str] = None
    #: append to ``path`` instead of truncating it
    append: bool = False
    #: an inherited file descriptor for ``fd`` (QEMU's /dev/fdset, libvirt's chardev fds)
    fd: Optional[int] = None
    #: ``tcp``: the address to listen on or connect to (``path`` is the socket for ``unix``)
    host: Optional[str] = None
    port: Optional[int] = None
    #: ``unix``/``tcp``: listen (server) or connect (client)
    server: bool = True
    #: also log everything the guest sends here (QEMU's ``logfile=``, libvirt's
    #: ``<log file=>``), whether or not a client is attached: a path, or an
    #: inherited descriptor (``/dev/fdset``)
    log_path: Optional[str] = None
    log_fd: Optional[int] = None
    #: append to the log instead of truncating it
    log_append: bool = False

    def __post_init__(self) -> None:
        if self.log_fd is not None and (self.log_fd < 0 or self.log_path is not None):
            raise ConfigError("serial: a log is a path or a file descriptor, not both")
        if self.kind == "file" and not self.path:
            raise ConfigError("serial: file output needs a path")
        if self.kind == "fd" and (self.fd is None or self.fd < 0):
            raise ConfigError("serial: fd output needs a file descriptor")
        if self.kind == "tcp" and (self.port is None or not 0 <= self.port <= 65535):
            raise ConfigError("serial: tcp needs a port between 0 and 65535")

    def describe(self) -> str:
        """The backend in a few words (for ``pyhv domxml check`` and error messages)."""
        text = self._describe_backend()
        if self.log_path is not None or self.log_fd is not None:
            text += f", logged to {self.log_path or f'fd {self.log_fd}'}"
            text += " (append)" if self.log_append else ""
        return text

    def _describe_backend(self) -> str:
        if self.kind == "file":
            return f"file {self.path}{' (append)' if self.append else ''}"
        if self.kind == "unix":
            return f"unix socket {self.path or '(path chosen by libvirt)'} " \
                   f"({'listen' if self.server else 'connect'})"
        if self.kind == "tcp":
            return f"tcp {self.host or '*'}:{self.port} " \
                   f"({'listen' if self.server else 'connect'})"
        if self.kind == "fd":
            return f"fd {self.fd}"
        return self.kind


def parse_host_end(spec: str, what: str, unix: bool = False) -> SerialConfig:
    """A host end as the command line names it: ``stdio``, ``file:PATH``, ``pty``,
    ``null`` and, with ``unix``, ``unix:PATH`` (listened on); :class:`ConfigError`
    naming ``what`` otherwise."""
    if spec in ("stdio", "pty", "null"):
        return SerialConfig(spec)  # type: ignore[arg-type]
    kind, _, path = spec.partition(":")
    if kind == "file" and path:
        return SerialConfig("file", path)
    if unix and kind == "unix" and path:
        return SerialConfig("unix", path, server=True)
    kinds = "stdio, file:PATH, unix:PATH, pty or null" if unix else \
        "stdio, file:PATH, pty or null"
    raise ConfigError(f"{what} {spec}: expected {kinds}")


@dataclass(frozen=True)
class PciAddress:
    """Where a PCI function sits, as libvirt writes it: ``bus`` is the index of the
    PCI controller whose bus it is (0: the root bus, pci.0/pcie.0)."""

    bus: int = 0
    slot: int = 0
    function: int = 0
    domain: int = 0
    #: function 0 of a slot whose other functions are in use
    multifunction: bool = False

    def __post_init__(self) -> None:
        if self.domain != 0:
            raise ConfigError(f"PCI domain {self.domain:#x}: only domain 0 exists")
        if not 0 <= self.bus <= 255 or not 0 <= self.slot <= 31 or \
                not 0 <= self.function <= 7:
            raise ConfigError(f"PCI address {self.bus:#x}:{self.slot:#x}.{self.function} "
                              "is out of range (bus 0-255, slot 0-31, function 0-7)")

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"


ControllerType = Literal["pci", "usb", "virtio-serial"]
#: ports per virtio-serial controller (the most pyhv builds; QEMU's default)
MAX_VIRTIO_PORTS = 31
#: queue pairs of one virtio-net device (tap's limit is 256; this keeps MSI-X small)
MAX_NET_QUEUES = 16
#: PCI controller models pyhv builds (the roots are implicit: pci-root, pcie-root)
PCI_BRIDGE_MODELS = ("pcie-root-port", "pci-bridge")
#: USB host controller models pyhv builds (libvirt's names; QEMU's are in the engine)
USB_MODELS = ("piix3-uhci", "qemu-xhci", "ich9-ehci1", "ich9-uhci1", "ich9-uhci2",
              "ich9-uhci3")


@dataclass(frozen=True)
class ControllerConfig:
    """A controller: a PCI bridge or root port (which provides bus ``index``), a USB
    host controller, or a virtio-serial controller."""

    type: ControllerType
    model: str
    index: int = 0
    #: libvirt's alias (``pci.1``, ``usb``); None: generated when the machine is built
    id: Optional[str] = None
    address: Optional[PciAddress] = None
    #: pcie-root-port: ``port`` and ``chassis``; pci-bridge: ``chassis`` (chassisNr)
    port: Optional[int] = None
    chassis: Optional[int] = None
    #: usb: the companion UHCIs' master (``ich9-uhciN`` with the EHCI's index)
    master_port: Optional[int] = None
    #: virtio-serial: ports
    max_ports: Optional[int] = None
    #: pcie-root-port: its slot takes devices while the machine runs (libvirt's
    #: ``<target hotplug='off'/>``, QEMU's ``hotplug=off``: it does not)
    hotplug: bool = True

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ConfigError(f"controller {self.type} index {self.index} is negative")
        if self.type == "pci" and self.model not in PCI_BRIDGE_MODELS:
            raise ConfigError(f"PCI controller model {self.model!r} is not built (built: "
                              f"{', '.join(PCI_BRIDGE_MODELS)}; the root is implicit)")
        if self.type == "usb" and self.model not in USB_MODELS:
            raise ConfigError(f"USB controller model {self.model!r} is not built (built: "
                              f"{', '.join(USB_MODELS)})")
        if self.type == "pci" and self.index == 0:
            raise ConfigError("PCI controller 0 is the root bus (pci-root/pcie-root)")
        for what, value in (("port", self.port), ("chassis", self.chassis)):
            if value is not None and not 0 <= value <= 0xFF:
                raise ConfigError(f"{self.label}: {what} {value} is not 0-255")
        if self.max_ports is not None and not 1 <= self.max_ports <= MAX_VIRTIO_PORTS:
            raise ConfigError(f"virtio-serial controller {self.index}: {self.max_ports} "
                              f"ports (built: 1-{MAX_VIRTIO_PORTS})")

    @property
    def label(self) -> str:
        return f"controller {self.id or f'{self.type}.{self.index}'} ({self.model})"


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot."""

    kernel: str
    initrd: Optional[str] = None
    cmdline: str = ""
    #: ``auto``: PVH when an ELF kernel has the PVH note, else the Linux 64-bit protocol
    protocol: BootProtocol = "auto"

DiskCache = Literal["default", "none", "writethrough", "writeback", "directsync", "unsafe"]
DiskIo = Literal["native", "threads", "io_uring"]
CpuMode = Literal["host-passthrough", "host-model", "maximum", "custom"]
CpuFeaturePolicy = Literal["require", "disable", "force", "forbid", "optional"]

_DISK_CACHES = ("default", "none", "writethrough", "writeback", "directsync", "unsafe")
_MACHINE_FAMILIES = {"pc": "pc", "q35": "q35", "pc-i440fx": "pc", "pc-q35": "q35"}


def machine_family(machine: str) -> Optional[str]:
    """``pc``/``q35`` for pc, q35 and their versioned names (``pc-i440fx-7.2``), else None."""
    if machine in ("pc", "q35"):
        return machine
    for prefix in ("pc-i440fx-", "pc-q35-"):
        rest = machine[len(prefix):]
        if machine.startswith(prefix) and rest and all(p.isdigit() for p in rest.split(".")):
            return "pc" if prefix == "pc-i440fx-" else "q35"
    return None


#: image formats a disk or a backing file may have
DISK_FORMATS = ("raw", "qcow2")


@dataclass(frozen=True)
class BackingFile:
    """One image of a disk's explicit backing chain (libvirt's ``<backingStore>``,
    a ``-blockdev`` format node's ``backing``)."""

    path: str
    format: Literal["raw", "qcow2"] = "raw"

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a backing file needs a path")
        if self.format not in DISK_FORMATS:
            raise ConfigError(f"backing file {self.path}: format {self.format!r} is not "
                              f"one of {', '.join(DISK_FORMATS)}")


@dataclass(frozen=True)
class DiskConfig:
    """A block device the guest sees as a virtio disk, backed by a file or block device."""

    path: str
    #: guest-facing name hint (``vda``); a front end without one leaves None
    target: Optional[str] = None
    #: image format of ``path``: ``raw`` or ``qcow2``
    format: str = "raw"
    #: ``file``, ``block`` (a block device node), or ``vhostuser`` (``path`` is the
    #: unix socket of a vhost-user-blk backend that serves the disk)
    source_type: Literal["file", "block", "vhostuser"] = "file"
    bus: Literal["virtio"] = "virtio"
    readonly: bool = False
    shareable: bool = False
    cache: Optional[DiskCache] = None
    io: Optional[DiskIo] = None
    discard: Optional[Literal["unmap", "ignore"]] = None
    detect_zeroes: Optional[Literal["off", "on", "unmap"]] = None
    #: the serial number the guest reads (virtio-blk GET_ID, up to 20 bytes)
    serial: Optional[str] = None
    #: firmware boot order (1 first); direct kernel boot ignores it
    boot_order: Optional[int] = None
    #: virtio-blk request queues (libvirt's ``<driver queues=>``, QEMU's num-queues)
    queues: int = 1
    #: what a failed write (libvirt's ``error_policy``, QEMU's werror) or read
    #: (``rerror_policy``, rerror) does; None: QEMU's default (see error_policies)
    error_policy: Optional[Literal["report", "ignore", "stop", "enospace"]] = None
    rerror_policy: Optional[Literal["report", "ignore", "stop"]] = None
    #: libvirt's alias (``virtio-disk0``); None: generated when the machine is built
    id: Optional[str] = None
    #: where the device sits; None: placed by :mod:`pyhv.placement`
    address: Optional[PciAddress] = None
    #: a qcow2 image's backing chain, the image's own backing file first; None: each
    #: image's header names its backing file (and format, else it is probed); a
    #: tuple is the chain exactly (empty: no backing file, whatever the header says)
    backing: Optional[tuple[BackingFile, ...]] = None
    #: the qcow2 L2 table cache in bytes (QEMU's ``l2-cache-size``); None: QEMU's
    #: default (enough for 8 GiB of guest data, at least 1 MiB)
    l2_cache_size: Optional[int] = None
    #: vhostuser: seconds between attempts to reach a backend that went away
    #: (``<reconnect enabled='yes' timeout=>``); None: no reconnection
    reconnect: Optional[int] = None

    def __post_init__(self) -> None:
        what = f"disk {self.target or self.path}"
        if not self.path:
            raise ConfigError(f"{what}: needs a source path")
        if self.reconnect is not None and (self.source_type != "vhostuser" or
                                           self.reconnect < 1):
            raise ConfigError(f"{what}: reconnect needs a vhostuser disk and a timeout of "
                              f"1 second or more")
        if self.format not in DISK_FORMATS:
            raise ConfigError(f"{what}: image format {self.format!r} is not one of "
                              f"{', '.join(DISK_FORMATS)}")
        if self.backing is not None and self.format != "qcow2":
            raise ConfigError(f"{what}: only a qcow2 image has a backing file")
        if self.l2_cache_size is not None and self.l2_cache_size < 0:
            raise ConfigError(f"{what}: l2-cache-size {self.l2_cache_size} is negative")
        if self.cache is not None and self.cache not in _DISK_CACHES:
            raise ConfigError(f"{what}: cache {self.cache!r} is not one of "
                              f"{', '.join(_DISK_CACHES)}")
        if self.serial is not None and len(self.serial.encode(errors="surrogateescape")) > 20:
            raise ConfigError(f"{what}: serial {self.serial!r} is longer than 20 bytes")
        if self.boot_order is not None and self.boot_order < 1:
            raise ConfigError(f"{what}: boot order must be 1 or more")
        if not 1 <= self.queues <= 64:
            raise ConfigError(f"{what}: {self.queues} queues (1 to 64)")
        if self.error_policy not in (None, "report", "ignore", "stop", "enospace"):
            raise ConfigError(f"{what}: error policy {self.error_policy!r} is not one of "
                              f"report, ignore, stop, enospace")
        if self.rerror_policy not in (None, "report", "ignore", "stop"):
            raise ConfigError(f"{what}: read error policy {self.rerror_policy!r} is not one "
                              f"of report, ignore, stop")

    def error_policies(self) -> tuple[str, str]:
        """(werror, rerror) in QEMU's words.  As libvirt has it, ``error_policy``
        covers reads too unless ``rerror_policy`` is given (``enospace`` means
        nothing for reads); QEMU's defaults are enospc for writes, report for reads."""
        write = self.error_policy or "enospace"
        read = self.rerror_policy or (self.error_policy if self.error_policy != "enospace"
                                      else None) or "report"
        return ("enospc" if write == "enospace" else write), read


@dataclass(frozen=True)
class FilesystemConfig:
    """A host directory exported to the guest under a mount tag (9p or virtio-fs)."""

    source: str
    #: the mount tag the guest uses (``mount -t 9p TAG /mnt``)
    tag: str
    driver: Literal["9p", "virtiofs"] = "9p"
    #: 9p security model: ``passthrough`` (host ids), ``mapped`` (xattrs), ``squash``
    accessmode: Literal["passthrough", "mapped", "squash"] = "passthrough"
    readonly: bool = False
    #: libvirt's alias (``virtio-disk0``); None: generated when the machine is built
    id: Optional[str] = None
    #: where the device sits; None: placed by :mod:`pyhv.placement`
    address: Optional[PciAddress] = None
    #: 9p: read-only trees under ``source``, the bottom one first (novm's packs:
    #: ``source`` is then the writable top layer, where writes and whiteouts land)
    lower: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.source or not self.tag:
            raise ConfigError("filesystem: needs a source directory and a mount tag")
        if self.lower and (self.driver != "9p" or not all(self.lower)):
            raise ConfigError(f"filesystem {self.tag}: lower trees are for 9p exports, "
                              f"as directory paths")
        if len(self.tag.encode(errors="surrogateescape")) > 255:
            raise ConfigError(f"filesystem {self.tag[:20]}...: mount tag longer than 255 bytes")


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net NIC and its host backend: a tap (by name or fd) or a vhost-user socket."""

    backend: Literal["tap", "vhost-user"] = "tap"
    #: tap: interface name (created or opened by name), or None with ``fds``
    ifname: Optional[str] = None
    #: tap: inherited, already-opened tap file descriptors, one per queue pair
    fds: tuple[int, ...] = ()
    #: tap: inherited vhost-net descriptors (libvirt's), one per queue pair
    vhost_fds: tuple[int, ...] = ()
    #: tap: the kernel's vhost-net data path: True asked for (libvirt's ``<driver
    #: name='vhost'>``, QEMU's ``vhost=on``), False not (``name='qemu'``), None where
    #: the host has it; without a usable one pyhv's userspace data path serves
    vhost: Optional[bool] = None
    #: queue pairs (``<driver queues=N>``, QEMU's ``mq``/``queues``)
    queues: int = 1
    #: the MTU the guest is told (``<mtu size=>``, ``host_mtu``); None: not offered
    mtu: Optional[int] = None
    #: ``<link state='down'/>``: the guest sees the cable pulled
    link_up: bool = True
    #: tap: attach the tap to this host bridge (libvirt's type=bridge)
    bridge: Optional[str] = None
    #: tap: a libvirt virtual network resolves it (libvirt's type=network)
    network: Optional[str] = None
    #: vhost-user: the unix socket path, and whether pyhv listens on it
    socket: Optional[str] = None
    server: bool = False
    #: vhost-user, pyhv connecting: seconds between attempts to reach a backend that
    #: went away (``<reconnect enabled='yes' timeout=>``); None: no reconnection
    reconnect: Optional[int] = None
    mac: Optional[str] = None
    model: Literal["virtio"] = "virtio"
    #: libvirt's alias (``virtio-disk0``); None: generated when the machine is built
    id: Optional[str] = None
    #: where the device sits; None: placed by :mod:`pyhv.placement`
    address: Optional[PciAddress] = None

    def __post_init__(self) -> None:
        if self.backend == "vhost-user" and not self.socket:
            raise ConfigError("net: vhost-user needs a socket path")
        if self.reconnect is not None and (self.backend != "vhost-user" or self.server or
                                           self.reconnect < 1):
            raise ConfigError("net: reconnect needs a vhost-user client socket and a "
                              "timeout of 1 second or more")
        if any(fd < 0 for fd in self.fds + self.vhost_fds):
            raise ConfigError("net: tap fds must not be negative")
        if not 1 <= self.queues <= MAX_NET_QUEUES:
            raise ConfigError(f"net: {self.queues} queue pairs (1-{MAX_NET_QUEUES})")
        if self.fds and len(self.fds) != self.queues:
            raise ConfigError(f"net: {len(self.fds)} tap fds for {self.queues} queue pairs")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ConfigError(f"net: MTU {self.mtu} is not 68-65535")
        if self.ifname is not None and not 0 < len(os.fsencode(self.ifname)) < 16:
            raise ConfigError(f"net: interface name {self.ifname!r} is not 1-15 bytes")
        if self.mac is not None:
            parts = self.mac.split(":")
            if len(parts) != 6 or not all(len(p) == 2 and _is_hex(p) for p in parts):
                raise ConfigError(f"net: mac {self.mac!r} is not like 52:54:00:12:34:56")
            if int(parts[0], 16) & 1:
                raise ConfigError(f"net: mac {self.mac!r} is a multicast address")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


@dataclass(frozen=True)
class SerialPortConfig:
    """A serial port besides COM1: ``isa-serial`` COM2-COM4 (index 1-3) or a virtio console."""

    chardev: SerialConfig
    target: Literal["isa-serial", "virtio"] = "isa-serial"
    #: isa-serial: the COM port index (1 = COM2); virtio: the console number (hvcN)
    index: int = 1
    #: virtio: the virtio-serial controller (its index) and the port number on it
    #: (None: placed by :mod:`pyhv.placement`; the first console gets port 0)
    controller: int = 0
    port: Optional[int] = None
    #: virtio: libvirt's alias (``console1``), the port's id in QMP events
    id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port < MAX_VIRTIO_PORTS:
            raise ConfigError(f"virtio console port {self.port}: ports are 0-"
                              f"{MAX_VIRTIO_PORTS - 1}")
        if self.target == "isa-serial" and not 1 <= self.index <= 3:
            raise ConfigError(f"serial port {self.index}: isa-serial ports are 1-3 "
                              "besides COM1 (0)")
        if self.index < 0:
            raise ConfigError("serial port index must not be negative")


@dataclass(frozen=True)
class ChannelConfig:
    """A named virtio-serial port (``org.qemu.guest_agent.0``) and its host end."""

    name: str
    chardev: SerialConfig = field(default_factory=lambda: SerialConfig("pty"))
    #: the virtio-serial controller (its index) and the port number on it (None:
    #: placed by :mod:`pyhv.placement`, from 1: port 0 is a console's)
    controller: int = 0
    port: Optional[int] = None
    #: libvirt's alias (``channel0``), the port's id in QMP events
    id: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("channel: needs a name")
        if len(self.name.encode(errors="surrogateescape")) > 255:
            raise ConfigError(f"channel {self.name[:20]}...: name longer than 255 bytes")
        if self.port is not None and not 1 <= self.port < MAX_VIRTIO_PORTS:
            raise ConfigError(f"channel {self.name}: port {self.port}: channels use ports "
                              f"1-{MAX_VIRTIO_PORTS - 1} (0 is a console's)")
        if self.chardev.kind not in ("unix", "pty", "file", "null", "fd", "tcp"):
            raise ConfigError(f"channel {self.name}: {self.chardev.kind} is not a channel "
                              "backend (unix, pty, file, null, fd, tcp)")


@dataclass(frozen=True)
class RngConfig:
    """virtio-rng fed from a host random device, optionally rate limited."""

    source: str = "/dev/urandom"
    #: at most ``rate_bytes`` per ``rate_period_ms`` (None: unlimited)
    rate_bytes: Optional[int] = None
    rate_period_ms: Optional[int] = None
    #: libvirt's alias (``virtio-disk0``); None: generated when the machine is built
    id: Optional[str] = None
    #: where the device sits; None: placed by :mod:`pyhv.placement`
    address: Optional[PciAddress] = None

    def __post_init__(self) -> None:
        if self.source not in ("/dev/urandom", "/dev/random"):
            raise ConfigError(f"rng: source {self.source!r} is not /dev/urandom or /dev/random")
        if self.rate_bytes is not None and self.rate_bytes <= 0:
            raise ConfigError("rng: rate bytes must be positive")
        if self.rate_period_ms is not None and self.rate_period_ms <= 0:
            raise ConfigError("rng: rate period must be positive")
        if self.rate_period_ms is not None and self.rate_bytes is None:
            raise ConfigError("rng: a rate period needs a byte count")


@dataclass(frozen=True)
class BalloonConfig:
    """virtio-balloon."""

    #: seconds between guest memory statistics updates (None or 0: off)
    stats_period: Optional[int] = None
    autodeflate: bool = False
    free_page_reporting: bool = False
    #: libvirt's alias (``virtio-disk0``); None: generated when the machine is built
    id: Optional[str] = None
    #: where the device sits; None: placed by :mod:`pyhv.placement`
    address: Optional[PciAddress] = None

    def __post_init__(self) -> None:
        if self.stats_period is not None and self.stats_period < 0:
            raise ConfigError("balloon: stats period must not be negative")


@dataclass(frozen=True)
class CpuTopology:
    sockets: int = 1
    dies: int = 1
    cores: int = 1
    threads: int = 1

    @property
    def cpus(self) -> int:
        return self.sockets * self.dies * self.cores * self.threads

    def __post_init__(self) -> None:
        for name in ("sockets", "dies", "cores", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cpu topology: {name} must be 1 or more")


@dataclass(frozen=True)
class CpuFeature:
    """A CPUID feature flag (libvirt/QEMU name, e.g. ``vmx``, ``avx2``) and its policy."""

    name: str
    policy: CpuFeaturePolicy = "require"


@dataclass(frozen=True)
class CpuConfig:
    """What CPU the guest sees: the host's (passthrough) or a named model, and its topology."""

    mode: CpuMode = "host-passthrough"
    #: ``custom``: the model name (``Skylake-Server``); None otherwise
    model: Optional[str] = None
    #: None: the engine's flat topology (1 socket × vcpus cores)
    topology: Optional[CpuTopology] = None
    features: tuple[CpuFeature, ...] = ()
    #: how a model feature the host lacks is treated: ``full`` refuses to start
    #: (QEMU's ``enforce``), ``partial`` drops it and refuses only explicitly
    #: required features, ``none`` drops anything the host lacks
    check: Literal["none", "partial", "full"] = "partial"
    #: CPUID vendor string (QEMU's ``vendor=``; None: the model's)
    vendor: Optional[str] = None
    #: CPUID brand string (QEMU's ``model-id=``; None: the model's)
    model_id: Optional[str] = None
    #: host-passthrough: leave out what blocks migration (the invariant TSC), as
    #: QEMU's ``-cpu host`` does unless ``migratable=off``
    migratable: bool = True

    def __post_init__(self) -> None:
        if self.vendor is not None and len(self.vendor) != 12:
            raise ConfigError(f"cpu: vendor {self.vendor!r} must be 12 characters")
        if self.mode == "custom" and not self.model:
            raise ConfigError("cpu: custom mode needs a model name")
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"cpu: feature {sorted(dup)[0]!r} is given twice")


@dataclass(frozen=True)
class MemoryBackingConfig:
    """How guest RAM is allocated on the host (sharing: ``VmConfig.shared_memory``)."""

    source: MemorySource = "anonymous"
    hugepages: bool = False
    #: hugepage size in bytes (None: the host's default size)
    hugepage_size: Optional[int] = None
    #: mlock guest RAM
    locked: bool = False
    #: discard RAM contents when the guest stops (file-backed memory)
    discard: bool = False
    #: file-backed RAM: a directory (a hugetlbfs mount, libvirt's memory backing
    #: directory: an unlinked file is made in it) or a file (None: pyhv picks)
    path: Optional[str] = None
    #: offer guest RAM to KSM (MADV_MERGEABLE); ``<nosharepages/>``, ``mem-merge=off``
    merge: bool = True
    #: allocate every page at start (``<allocation mode='immediate'>``, ``prealloc=on``)
    prealloc: bool = False

    def __post_init__(self) -> None:
        if self.path is not None and self.source != "file":
            raise ConfigError("memory backing: a path needs source type 'file'")
        if self.hugepage_size is not None and not self.hugepages:
            raise ConfigError("memory backing: a hugepage size needs hugepages")
        if self.hugepage_size is not None and (self.hugepage_size <= 0 or
                                               self.hugepage_size & (self.hugepage_size - 1)):
            raise ConfigError("memory backing: hugepage size must be a power of two")


SchedPolicy = Literal["fifo", "rr", "batch", "idle", "other"]


@dataclass(frozen=True)
class SchedConfig:
    """A host scheduling policy for threads (``<vcpusched>``, ``<emulatorsched>``)."""

    policy: SchedPolicy
    #: 1-99 for the real-time policies fifo and rr (None for the others)
    priority: Optional[int] = None
    #: the vCPUs it applies to (``<vcpusched vcpus=>``; empty for the emulator)
    vcpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        realtime = self.policy in ("fifo", "rr")
        if realtime and (self.priority is None or not 1 <= self.priority <= 99):
            raise ConfigError(f"scheduler {self.policy} needs a priority between 1 and 99")
        if not realtime and self.priority is not None:
            raise ConfigError(f"scheduler {self.policy} takes no priority")


@dataclass(frozen=True)
class CpuTuneConfig:
    """Host CPUs and scheduling of the machine's threads (``<vcpu cpuset>``,
    ``<cputune>``); ``None`` cpusets leave the threads where the host puts them."""

    #: ``<vcpu cpuset>``: every vCPU thread (and the emulator threads) by default
    cpuset: Optional[tuple[int, ...]] = None
    #: ``<vcpupin>``: (vCPU index, host CPUs)
    vcpupin: tuple[tuple[int, tuple[int, ...]], ...] = ()
    #: ``<emulatorpin>``: the threads that are not vCPUs
    emulatorpin: Optional[tuple[int, ...]] = None
    vcpusched: tuple[SchedConfig, ...] = ()
    emulatorsched: Optional[SchedConfig] = None

    def vcpu_cpus(self, index: int) -> Optional[tuple[int, ...]]:
        for i, cpus in self.vcpupin:
            if i == index:
                return cpus
        return self.cpuset

    def vcpu_sched(self, index: int) -> Optional[SchedConfig]:
        for s in self.vcpusched:
            if index in s.vcpus:
                return s
        return None

    def emulator_cpus(self) -> Optional[tuple[int, ...]]:
        return self.emulatorpin if self.emulatorpin is not None else self.cpuset

    def host_cpus_named(self) -> tuple[int, ...]:
        """Every host CPU some cpuset names, in order."""
        sets = [self.cpuset, self.emulatorpin, *(c for _, c in self.vcpupin)]
        return tuple(sorted({c for s in sets if s is not None for c in s}))


@dataclass(frozen=True)
class ClockConfig:
    """The RTC's time base: UTC, host local time, a time zone, or a fixed offset in
    seconds (see :func:`pyhv.engine.devices.rtc.base_offset`)."""

    offset: Literal["utc", "localtime", "variable", "timezone"] = "utc"
    #: ``variable``: seconds added to ``basis``
    adjustment: int = 0
    basis: Literal["utc", "localtime"] = "utc"
    #: ``timezone``: an IANA zone name (``Europe/Paris``)
    timezone: Optional[str] = None
    #: RTC periodic ticks the guest missed: dropped, or delivered later (QEMU's
    #: driftfix=slew, libvirt's ``<timer name='rtc' tickpolicy='catchup'>``)
    rtc_lost_ticks: Literal["discard", "slew"] = "discard"

    def __post_init__(self) -> None:
        if self.offset != "variable" and (self.adjustment or self.basis != "utc"):
            raise ConfigError("clock: an adjustment needs offset 'variable'")
        if (self.offset == "timezone") != (self.timezone is not None):
            raise ConfigError("clock: offset 'timezone' needs a timezone (and only it)")
        if self.timezone is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"clock: unknown time zone {self.timezone!r}") from None


#: the fields of each SMBIOS structure a user may set (libvirt's ``<sysinfo>`` entry
#: names; ``processor`` and ``memory`` are QEMU's ``-smbios type=4|17`` keys)
SMBIOS_FIELDS: dict[str, tuple[str, ...]] = {
    "bios": ("vendor", "version", "date", "release"),
    "system": ("manufacturer", "product", "version", "serial", "uuid", "sku", "family"),
    "baseboard": ("manufacturer", "product", "version", "serial", "asset", "location"),
    "chassis": ("manufacturer", "version", "serial", "asset", "sku"),
    "processor": ("sock_pfx", "manufacturer", "version", "serial", "asset", "part",
                  "max-speed", "current-speed"),
    "memory": ("loc_pfx", "bank", "manufacturer", "serial", "asset", "part", "speed"),
}
SmbiosFields = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SmbiosConfig:
    """What the guest's SMBIOS (DMI) tables say: libvirt's ``<os><smbios mode>`` and
    ``<sysinfo type='smbios'>`` (QEMU's ``-smbios``).  ``mode`` None or ``emulate``:
    pyhv's defaults; ``sysinfo``: the fields below over the defaults; ``host``: the
    host's own values (read from /sys/class/dmi/id when the machine is built)."""

    mode: Optional[Literal["emulate", "sysinfo", "host"]] = None
    bios: SmbiosFields = ()
    system: SmbiosFields = ()
    baseboards: tuple[SmbiosFields, ...] = ()
    chassis: SmbiosFields = ()
    processor: SmbiosFields = ()
    memory: SmbiosFields = ()
    oem_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in (None, "emulate", "sysinfo", "host"):
            raise ConfigError(f"smbios: unknown mode {self.mode!r} "
                              "(supported: emulate, sysinfo, host)")
        for kind, fields in (("bios", self.bios), ("system", self.system),
                             ("chassis", self.chassis), ("processor", self.processor),
                             ("memory", self.memory),
                             *(("baseboard", b) for b in self.baseboards)):
            unknown = [k for k, _v in fields if k not in SMBIOS_FIELDS[kind]]
            if unknown:
                raise ConfigError(f"smbios {kind}: unknown field(s) {', '.join(unknown)} "
                                  f"(supported: {', '.join(SMBIOS_FIELDS[kind])})")
        uuid = dict(self.system).get("uuid")
        if uuid is not None:
            import uuid as uuidlib

            try:
                uuidlib.UUID(uuid)
            except ValueError:
                raise ConfigError(f"smbios system: uuid {uuid!r} is not a UUID") from None


@dataclass(frozen=True)
class NumaCell:
    """One guest NUMA node (libvirt ``<cpu><numa><cell>``): its vCPUs and memory."""

    id: int
    cpus: tuple[int, ...]
    memory: int
    #: distance to each other cell by id (SLIT); absent: 10 to itself, 20 elsewhere
    distances: tuple[tuple[int, int], ...] = ()
    #: ``shared``/``private`` memory access (recorded; RAM is shared per VmConfig)
    mem_access: Optional[str] = None
    discard: bool = False


@dataclass(frozen=True)
class NumaTune:
    """Where guest RAM lives on the host (libvirt ``<numatune>``)."""

    #: ``strict``, ``preferred``, ``interleave`` or ``restrictive``
    mode: str = "strict"
    #: host nodes for all of guest RAM (None: no binding)
    nodeset: Optional[tuple[int, ...]] = None
    #: per guest cell: (cell id, mode, host nodes)
    memnodes: tuple[tuple[int, str, tuple[int, ...]], ...] = ()


def parse_cpuset(text: str, what: str = "cpus") -> tuple[int, ...]:
    """``0-3,^2,8`` → (0, 1, 3, 8): libvirt's and QEMU's CPU/node list syntax."""
    out: set[int] = set()
    drop: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        target = drop if part.startswith("^") else out
        part = part.lstrip("^")
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise ConfigError(f"{what} {text!r}: not a list like 0-3,5") from None
        if a < 0 or b < a or b > 4095:
            raise ConfigError(f"{what} {text!r}: bad range {part!r}")
        target.update(range(a, b + 1))
    result = tuple(sorted(out - drop))
    if not result:
        raise ConfigError(f"{what} {text!r}: empty")
    return result


def format_cpuset(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) → ``0-2,5``."""
    parts: list[str] = []
    for v in sorted(values):
        if parts and v == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ",".join(parts)


def check_numa(cells: tuple[NumaCell, ...], vcpus: int, memory: int) -> None:
    """Cells must cover every vCPU once and add up to the memory; one-line errors."""
    ids = [c.id for c in cells]
    if ids != list(range(len(cells))):
        raise ConfigError(f"numa cell ids {ids}: must be 0, 1, ... in order")
    seen: dict[int, int] = {}
    for c in cells:
        if c.memory <= 0 or c.memory % 4096:
            raise ConfigError(f"numa cell {c.id}: memory {c.memory} bytes is not a "
                              "positive multiple of 4 KiB")
        for cpu in c.cpus:
            if cpu >= vcpus:
                raise ConfigError(f"numa cell {c.id}: vCPU {cpu} does not exist (the "
                                  f"machine has {vcpus})")
            if cpu in seen:
                raise ConfigError(f"numa cell {c.id}: vCPU {cpu} is already in cell "
                                  f"{seen[cpu]}")
            seen[cpu] = c.id
        for other, value in c.distances:
            if other not in ids:
                raise ConfigError(f"numa cell {c.id}: distance to cell {other}, which "
                                  "does not exist")
            if not 10 <= value <= 254 or (other == c.id) != (value == 10):
                raise ConfigError(f"numa cell {c.id}: distance {value} to cell {other} "
                                  "(10 to itself, 11-254 to others)")
    missing = [i for i in range(vcpus) if i not in seen]
    if missing:
        raise ConfigError(f"numa cell {len(cells) - 1}: vCPU {missing[0]} is in no cell "
                          "(the cells must list every vCPU)")
    total = sum(c.memory for c in cells)
    if total != memory:
        raise ConfigError(f"numa cell {len(cells) - 1}: the cells have {_size(total)} of "
                          f"memory, the machine {_size(memory)}")


@dataclass(frozen=True)
class FeaturesConfig:
    """Platform features (the engine always has ACPI, local APICs + IOAPIC and PAE)."""

    acpi: bool = True
    apic: bool = True
    pae: bool = True
    #: expose the performance monitoring unit (None: engine default)
    pmu: Optional[bool] = None
    #: hide KVM's CPUID signature (libvirt's <kvm><hidden state='on'/>, QEMU's kvm=off)
    kvm_hidden: bool = False


@dataclass(frozen=True)
class VmConfig:
    boot: KernelBoot
    name: str = "pyhv"
    uuid: Optional[str] = None
    memory: int = 256 * MiB
    vcpus: int = 1
    serial: SerialConfig = field(default_factory=SerialConfig)
    #: what happens when the guest asks for a reset: ``restart`` reboots it,
    #: ``destroy`` ends the machine as if powered off (QEMU's -no-reboot)
    on_reboot: Action = "restart"
    #: share guest RAM through a memfd (what vhost-user backends need)
    shared_memory: bool = False
    #: print unclaimed port and MMIO accesses to stderr
    trace_io: bool = False
    #: ``pc``, ``q35`` or a versioned name of one (``pc-q35-7.2``)
    machine: str = "pc"
    #: memory the guest starts with when a balloon takes some back (None: ``memory``)
    current_memory: Optional[int] = None
    memory_backing: MemoryBackingConfig = field(default_factory=MemoryBackingConfig)
    #: host CPUs and scheduling of the vCPU and emulator threads
    cputune: CpuTuneConfig = field(default_factory=CpuTuneConfig)
    #: most vCPUs (hotplug); ``vcpus`` are online at start (None: same as ``vcpus``)
    max_vcpus: Optional[int] = None
    cpu: CpuConfig = field(default_factory=CpuConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    #: guest NUMA nodes (empty: one node, no SRAT)
    numa: tuple[NumaCell, ...] = ()
    #: host NUMA binding of guest RAM (None: the host's default policy)
    numatune: Optional[NumaTune] = None
    #: what happens when the guest powers off / crashes (panic device or triple fault)
    on_poweroff: Action = "destroy"
    on_crash: Action = "destroy"
    #: firmware boot device order (``hd``, ``cdrom``, ``network``); kernel boot ignores it
    boot_order: tuple[str, ...] = ()
    #: the emulator binary libvirt names (recorded, informational)
    emulator: Optional[str] = None
    disks: tuple[DiskConfig, ...] = ()
    filesystems: tuple[FilesystemConfig, ...] = ()
    nets: tuple[NetConfig, ...] = ()
    #: COM2-COM4 and virtio consoles (COM1 is ``serial``)
    extra_serials: tuple[SerialPortConfig, ...] = ()
    channels: tuple[ChannelConfig, ...] = ()
    rngs: tuple[RngConfig, ...] = ()
    balloon: Optional[BalloonConfig] = None
    #: PCI bridges and root ports, USB and virtio-serial controllers
    controllers: tuple[ControllerConfig, ...] = ()
    #: SMBIOS/DMI tables (``<sysinfo>``, ``<os><smbios>``)
    smbios: SmbiosConfig = field(default_factory=SmbiosConfig)

    def __post_init__(self) -> None:
        from pyhv.engine.layout import MAX_RAM, MIN_RAM

        if self.memory < MIN_RAM:
            raise ConfigError(f"memory {_size(self.memory)} is too small "
                              f"(at least {_size(MIN_RAM)})")
        if self.memory > MAX_RAM:
            raise ConfigError(f"memory {_size(self.memory)} is too large "
                              f"(at most {_size(MAX_RAM)})")
        if self.memory % 4096:
            raise ConfigError(f"memory {self.memory} bytes is not a multiple of 4 KiB")
        if not 1 <= self.vcpus <= 255:
            raise ConfigError(f"vcpus {self.vcpus}: must be between 1 and 255")
        if self.max_vcpus is not None and not self.vcpus <= self.max_vcpus <= 255:
            raise ConfigError(f"max vcpus {self.max_vcpus}: must be between vcpus "
                              f"({self.vcpus}) and 255")
        topo = self.cpu.topology
        if topo is not None and topo.cpus != self.total_vcpus:
            raise ConfigError(
                f"cpu topology {topo.sockets} sockets × {topo.dies} dies × {topo.cores} "
                f"cores × {topo.threads} threads = {topo.cpus} vCPUs, but the machine has "
                f"{self.total_vcpus}")
        if machine_family(self.machine) is None:
            raise ConfigError(f"machine {self.machine!r}: supported are pc, q35 and their "
                              "versioned names (pc-i440fx-7.2, pc-q35-7.2)")
        for i, _cpus in self.cputune.vcpupin:
            if not 0 <= i < self.total_vcpus:
                raise ConfigError(f"vcpupin: vCPU {i} does not exist (the machine has "
                                  f"{self.total_vcpus})")
        pinned = [i for i, _ in self.cputune.vcpupin]
        if len(set(pinned)) != len(pinned):
            raise ConfigError("vcpupin: a vCPU is pinned twice")
        for sched in self.cputune.vcpusched:
            if not sched.vcpus or max(sched.vcpus) >= self.total_vcpus:
                raise ConfigError(f"vcpusched vcpus {format_cpuset(sched.vcpus) or '(none)'}:"
                                  f" the machine has vCPUs 0-{self.total_vcpus - 1}")
        if self.current_memory is not None and not 0 < self.current_memory <= self.memory:
            raise ConfigError(f"current memory {_size(self.current_memory)} must not exceed "
                              f"memory {_size(self.memory)}")
        if self.on_reboot == "preserve":
            raise ConfigError("on_reboot: preserve is not an action for a reset")
        tags = [f.tag for f in self.filesystems]
        dup = {t for t in tags if tags.count(t) > 1}
        if dup:
            raise ConfigError(f"filesystem tag {sorted(dup)[0]!r} is used twice")
        ports = [(p.target, p.index) for p in self.extra_serials]
        if len(set(ports)) != len(ports):
            raise ConfigError("two serial ports have the same target and index")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ConfigError("two channels have the same name")
        # USB companions share their EHCI's index (told apart by their master port)
        pci = [(c.type, c.index, c.master_port) for c in self.controllers]
        if len(set(pci)) != len(pci):
            twice = next(k for k in pci if pci.count(k) > 1)
            raise ConfigError(f"controller {twice[0]} index {twice[1]} is given twice")
        for c in self.controllers:
            bus = c.address.bus if c.address is not None else 0
            if bus and not any(p.type == "pci" and p.index == bus for p in self.controllers):
                raise ConfigError(f"{c.label}: PCI bus {bus} has no controller")
        targets = [d.target for d in self.disks if d.target]
        dup = {t for t in targets if targets.count(t) > 1}
        if dup:
            raise ConfigError(f"disk target {sorted(dup)[0]!r} is used twice")
        if self.numa:
            check_numa(self.numa, self.total_vcpus, self.memory)
        if self.numatune is not None:
            for cell, _mode, _nodes in self.numatune.memnodes:
                if not 0 <= cell < len(self.numa):
                    raise ConfigError(f"numatune memnode cellid {cell}: no such numa cell")

    @property
    def total_vcpus(self) -> int:
        """vCPUs the machine can have (online at start plus hotpluggable)."""
        return self.max_vcpus if self.max_vcpus is not None else self.vcpus


def _size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def format_size(n: int) -> str:
    """``64 MiB``, ``3 GiB``, ``4097 bytes``: sizes as people read them."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def parse_size(text: str, default_unit: str = "M", what: str = "memory") -> int:
    """``256M``, ``1G``, ``65536K``, ``1048576`` (in ``default_unit``) → bytes."""
    units = {"": default_unit, "B": "B", "K": "K", "M": "M", "G": "G", "T": "T"}
    shifts = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}
    t = text.strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    elif t.endswith("B") and len(t) > 1 and t[-2] in "KMGT":
        t = t[:-1]
    num, suffix = t, ""
    if t and t[-1] in "BKMGT":
        num, suffix = t[:-1], t[-1]
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: not a size (examples: 256M, 1G)") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what} {text!r}: not a finite size (examples: 256M, 1G)")
    if value < 0:
        raise ConfigError(f"{what} {text!r}: negative size")
    scale = 1 << shifts[units[suffix]]
    if value > SIZE_MAX / scale:  # checked before multiplying: the float would overflow
        raise ConfigError(f"{what} {text!r}: larger than 16 EiB")
    return int(value * scale)
