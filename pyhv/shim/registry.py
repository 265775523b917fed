"""What pyhv-qemu offers, as data: machine types, devices and CPU models.

One table serves the command line (``-machine help``, ``-device help``,
``-cpu help``, checking ``-device`` properties) and QMP (``query-machines``,
``qom-list-types``, ``device-list-properties``, ``query-cpu-definitions``), so
the two can never disagree about what exists.  Names, buses and property types
are QEMU 7.2's, because libvirt compares them with what it expects from QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Chipset = Literal["i440fx", "q35", "none"]

#: the QEMU release pyhv-qemu presents itself as
QEMU_VERSION = (7, 2, 0)
QEMU_VERSION_STR = "7.2.0"


# --------------------------------------------------------------------------- machines


@dataclass(frozen=True)
class MachineType:
    name: str
    description: str
    chipset: Chipset
    #: the short name that stands for this version (``pc`` → ``pc-i440fx-7.2``)
    alias: Optional[str] = None
    #: the machine used when no ``-machine`` is given
    is_default: bool = False
    cpu_max: int = 255
    #: pyhv has no CPU hotplug, whatever the machine version
    hotpluggable_cpus: bool = False
    numa_mem_supported: bool = False
    deprecated: bool = False
    #: QOM type of the CPUs when no ``-cpu`` is given (``None``: no CPUs at all)
    #: pyhv gives guests the host CPU unless told otherwise (libvirt: host-passthrough)
    default_cpu_type: Optional[str] = "host-x86_64-cpu"
    #: the id libvirt gives the RAM backend it passes as ``-machine memory-backend=``
    default_ram_id: Optional[str] = "pc.ram"

    @property
    def qom_type(self) -> str:
        return f"{self.name}-machine"

    @property
    def root_bus(self) -> Optional[str]:
        """Id of the root PCI bus: ``pci.0`` (i440fx), ``pcie.0`` (q35), none for ``none``."""
        return {"i440fx": "pci.0", "q35": "pcie.0"}.get(self.chipset)


def _pc_versions(first_minor: dict[int, int]) -> list[str]:
    out = []
    for major in sorted(first_minor, reverse=True):
        last = {7: 2, 6: 2, 5: 2, 4: 2, 3: 1, 2: 12}[major]
        out += [f"{major}.{minor}" for minor in range(last, first_minor[major] - 1, -1)]
    return out


_I440FX = "Standard PC (i440FX + PIIX, 1996)"
_Q35 = "Standard PC (Q35 + ICH9, 2009)"


def _machines() -> tuple[MachineType, ...]:
    out: list[MachineType] = []
    for i, ver in enumerate(_pc_versions({7: 0, 6: 0, 5: 0, 4: 0, 3: 0, 2: 0})):
        out.append(MachineType(f"pc-i440fx-{ver}", _I440FX, "i440fx",
                               alias="pc" if i == 0 else None, is_default=i == 0))
    for i, ver in enumerate(_pc_versions({7: 0, 6: 0, 5: 0, 4: 0, 3: 0, 2: 4})):
        out.append(MachineType(f"pc-q35-{ver}", _Q35, "q35", alias="q35" if i == 0 else None))
    out.append(MachineType("none", "empty machine", "none", cpu_max=1,
                           default_cpu_type=None, default_ram_id="ram"))
    return tuple(out)


MACHINES: tuple[MachineType, ...] = _machines()


def find_machine(name: str) -> Optional[MachineType]:
    """A machine by its name or alias (``pc``, ``q35``, ``pc-i440fx-7.2``...)."""
    for m in MACHINES:
        if name in (m.name, m.alias):
            return m
    return None


def default_machine() -> MachineType:
    return next(m for m in MACHINES if m.is_default)


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class PropInfo:
    """One ``-device`` property as device-list-properties reports it."""

    name: str
    #: QEMU's type name: ``str``, ``bool``, ``uint8``...``uint64``, ``int32``, ``size``,
    #: ``OnOffAuto``, ``link<iothread>``...
    type: str
    description: str = ""
    #: the value used when the property is not given (``None``: no default reported)
    default: object = None


@dataclass(frozen=True)
class DeviceType:
    name: str
    #: the bus the device plugs into (``PCI``, ``ISA``, ``virtio-serial-bus``)
    bus: str
    #: the heading it appears under in ``-device help``
    category: str
    description: str
    #: QOM parent type (for qom-list-types)
    parent: str
    properties: tuple[PropInfo, ...]
    alias: Optional[str] = None
    #: the bus it provides to its children, if any (``PCI``, ``virtio-serial-bus``)
    provides_bus: Optional[str] = None

    def prop(self, name: str) -> Optional[PropInfo]:
        for p in self.properties:
            if p.name == name:
                return p
        return None


_ADDR = PropInfo("addr", "int32", "Slot and optional function number, example: 06.0 or 06", -1)
_PCI_COMMON = (
    PropInfo("acpi-index", "uint32", default=0),
    _ADDR,
    PropInfo("failover_pair_id", "str"),
    PropInfo("multifunction", "bool", "on/off", False),
    PropInfo("rombar", "uint32", default=1),
    PropInfo("romfile", "str"),
    PropInfo("romsize", "uint32", default=0xFFFFFFFF),
)
_VIRTIO_PCI = _PCI_COMMON + (
    PropInfo("aer", "bool", "on/off", False),
    PropInfo("any_layout", "bool", "on/off", True),
    PropInfo("ats", "bool", "on/off", False),
    PropInfo("disable-legacy", "OnOffAuto", "on/off/auto", "auto"),
    PropInfo("disable-modern", "bool", default=False),
    PropInfo("event_idx", "bool", "on/off", True),
    PropInfo("indirect_desc", "bool", "on/off", True),
    PropInfo("ioeventfd", "bool", "on/off", True),
    PropInfo("iommu_platform", "bool", "on/off", False),
    PropInfo("modern-pio-notify", "bool", "on/off", False),
    PropInfo("notify_on_empty", "bool", "on/off", True),
    PropInfo("packed", "bool", "on/off", False),
    PropInfo("page-per-vq", "bool", "on/off", False),
    PropInfo("queue_reset", "bool", "on/off", True),
    PropInfo("vectors", "uint32"),
)
_BOOTINDEX = PropInfo("bootindex", "int32")
_CHARDEV = PropInfo("chardev", "str", "ID of a chardev to use as a backend")
_PORT_PROPS = (_CHARDEV, PropInfo("name", "str"), PropInfo("nr", "uint32", default=0))


def _dev(name: str, bus: str, category: str, description: str, parent: str,
         props: tuple[PropInfo, ...], alias: Optional[str] = None,
         provides_bus: Optional[str] = None) -> DeviceType:
    return DeviceType(name, bus, category, description, parent,
                      tuple(sorted(props, key=lambda p: p.name)), alias, provides_bus)


#: virtio-9p-pci: the -fsdev it serves and the tag the guest mounts
_9P_PROPS = (
    PropInfo("fsdev", "str", "ID of a fsdev to use as a backend"),
    PropInfo("mount_tag", "str"),
)

#: UHCI controllers and companions (``masterbus``/``firstport`` tie a companion to its
#: EHCI)
_UHCI_PROPS = _PCI_COMMON + (
    PropInfo("bandwidth", "uint32", default=1280),
    PropInfo("firstport", "uint32", default=0),
    PropInfo("masterbus", "str"),
    PropInfo("maxframes", "uint32", default=128),
)

_BLK_PROPS = (
    _BOOTINDEX,
    PropInfo("config-wce", "bool", "on/off", True),
    PropInfo("discard", "bool", "on/off", True),
    PropInfo("drive", "str", "Node name or ID of a block device to use as a backend"),
    PropInfo("iothread", "link<iothread>"),
    PropInfo("logical_block_size", "size",
             "A power of two between 512 B and 2 MiB", 0),
    PropInfo("num-queues", "uint16"),
    PropInfo("physical_block_size", "size",
             "A power of two between 512 B and 2 MiB", 0),
    PropInfo("queue-size", "uint16", default=256),
    PropInfo("rerror", "BlockdevOnError",
             "Error handling policy, report/ignore/enospc/stop/auto", "auto"),
    PropInfo("scsi", "bool", "on/off", False),
    PropInfo("serial", "str"),
    PropInfo("share-rw", "bool", default=False),
    PropInfo("werror", "BlockdevOnError",
             "Error handling policy, report/ignore/enospc/stop/auto", "auto"),
    PropInfo("write-cache", "OnOffAuto", "on/off/auto", "auto"),
    PropInfo("write-zeroes", "bool", "on/off", True),
)

_BALLOON_PROPS = (
    PropInfo("deflate-on-oom", "bool", "on/off", False),
    PropInfo("free-page-hint", "bool", "on/off", False),
    PropInfo("free-page-reporting", "bool", "on/off", False),
    PropInfo("guest-stats-polling-interval", "int"),
    PropInfo("iothread", "link<iothread>"),
)

_RNG_PROPS = (
    PropInfo("max-bytes", "uint64"),
    PropInfo("period", "uint32", default=65536),
    PropInfo("rng", "link<rng-backend>"),
)

#: the chipset's power management function: pyhv's ACPI offers S5 only, so S3
#: and S4 are always disabled (libvirt reads these properties for <pm>)
_PM_PROPS = (
    PropInfo("disable_s3", "uint8", default=1),
    PropInfo("disable_s4", "uint8", default=1),
)

DEVICES: dict[str, DeviceType] = {d.name: d for d in (
    _dev("PIIX4_PM", "PCI", "Misc", "ACPI power management (built into pc machines)",
         "pci-device", _PM_PROPS),
    _dev("ICH9-LPC", "PCI", "Misc", "ACPI power management (built into q35 machines)",
         "pci-device", _PM_PROPS),
    _dev("isa-serial", "ISA", "Input", "16550A UART (COM1-COM4)", "isa-device", (
        PropInfo("baudbase", "uint32", default=115200),
        _CHARDEV,
        PropInfo("index", "uint32", default=0xFFFFFFFF),
        PropInfo("iobase", "uint32", default=0xFFFFFFFF),
        PropInfo("irq", "uint32", default=0xFFFFFFFF),
        PropInfo("wakeup", "bool", default=False),
    )),
    _dev("pcie-root-port", "PCI", "Controller/Bridge/Hub", "PCI Express Root Port",
         "pcie-root-port-base", _PCI_COMMON + (
             PropInfo("bus-reserve", "uint32"),
             PropInfo("chassis", "uint8", default=0),
             PropInfo("hotplug", "bool", default=True),
             PropInfo("io-reserve", "size"),
             PropInfo("mem-reserve", "size"),
             PropInfo("port", "uint8", default=0),
             PropInfo("pref32-reserve", "size"),
             PropInfo("pref64-reserve", "size"),
             PropInfo("slot", "uint16", default=0),
         ), provides_bus="PCIE"),
    _dev("pci-bridge", "PCI", "Controller/Bridge/Hub", "Standard PCI Bridge", "base-pci-bridge",
         _PCI_COMMON + (
             PropInfo("chassis_nr", "uint8", default=0),
             PropInfo("msi", "OnOffAuto", "on/off/auto", "auto"),
             PropInfo("shpc", "bool", default=False),
         ), provides_bus="PCI"),
    _dev("piix3-usb-uhci", "PCI", "USB", "PIIX3 UHCI USB 1.1 controller (pc: 00:01.2)",
         "pci-uhci-usb", _UHCI_PROPS, provides_bus="usb-bus"),
    _dev("ich9-usb-uhci1", "PCI", "USB", "ICH9 UHCI USB 1.1 companion", "pci-uhci-usb",
         _UHCI_PROPS, provides_bus="usb-bus"),
    _dev("ich9-usb-uhci2", "PCI", "USB", "ICH9 UHCI USB 1.1 companion", "pci-uhci-usb",
         _UHCI_PROPS, provides_bus="usb-bus"),
    _dev("ich9-usb-uhci3", "PCI", "USB", "ICH9 UHCI USB 1.1 companion", "pci-uhci-usb",
         _UHCI_PROPS, provides_bus="usb-bus"),
    _dev("ich9-usb-ehci1", "PCI", "USB", "ICH9 EHCI USB 2.0 controller", "pci-ehci-usb",
         _PCI_COMMON + (PropInfo("companion-enable", "bool", "on/off", False),
                        PropInfo("maxframes", "uint32", default=128)),
         provides_bus="usb-bus"),
    _dev("qemu-xhci", "PCI", "USB", "xHCI USB 3.0 controller", "base-xhci",
         _PCI_COMMON + (PropInfo("intrs", "uint32", default=16),
                        PropInfo("msi", "OnOffAuto", "on/off/auto", "auto"),
                        PropInfo("msix", "OnOffAuto", "on/off/auto", "auto"),
                        PropInfo("p2", "uint32", default=4),
                        PropInfo("p3", "uint32", default=4),
                        PropInfo("slots", "uint32", default=64),
                        PropInfo("streams", "bool", "on/off", True)),
         provides_bus="usb-bus"),
    _dev("virtio-serial-pci", "PCI", "Input", "virtio serial and console controller",
         "virtio-pci", _VIRTIO_PCI + (
             PropInfo("emergency-write", "bool", "on/off", False),
             PropInfo("max_ports", "uint32", default=31),
         ), alias="virtio-serial", provides_bus="virtio-serial-bus"),
    _dev("virtserialport", "virtio-serial-bus", "Input", "virtio serial port",
         "virtio-serial-port", _PORT_PROPS),
    _dev("virtconsole", "virtio-serial-bus", "Input", "virtio console port",
         "virtserialport", _PORT_PROPS),
    _dev("virtio-9p-pci", "PCI", "Storage", "virtio 9p file system", "virtio-pci",
         _VIRTIO_PCI + _9P_PROPS, alias="virtio-9p"),
    _dev("virtio-9p-pci-non-transitional", "PCI", "Storage",
         "virtio 9p file system (modern only)", "virtio-pci", _VIRTIO_PCI + _9P_PROPS),
    _dev("virtio-rng-pci", "PCI", "Misc", "virtio entropy source", "virtio-pci",
         _VIRTIO_PCI + _RNG_PROPS, alias="virtio-rng"),
    # the modern-only name: what libvirt looks for to place virtio devices on PCI
    # Express ports (and what model='virtio-non-transitional' asks for)
    _dev("virtio-rng-pci-non-transitional", "PCI", "Misc",
         "virtio entropy source (modern only)", "virtio-pci", _VIRTIO_PCI + _RNG_PROPS),
    _dev("virtio-balloon-pci", "PCI", "Misc", "virtio memory balloon", "virtio-pci",
         _VIRTIO_PCI + _BALLOON_PROPS, alias="virtio-balloon"),
    _dev("virtio-balloon-pci-non-transitional", "PCI", "Misc",
         "virtio memory balloon (modern only)", "virtio-pci", _VIRTIO_PCI + _BALLOON_PROPS),
    _dev("virtio-blk-pci", "PCI", "Storage", "virtio block device", "virtio-pci",
         _VIRTIO_PCI + _BLK_PROPS, alias="virtio-blk"),
    _dev("virtio-blk-pci-non-transitional", "PCI", "Storage",
         "virtio block device (modern only)", "virtio-pci", _VIRTIO_PCI + _BLK_PROPS),
    _dev("virtio-net-pci", "PCI", "Network", "virtio network device", "virtio-pci",
         _VIRTIO_PCI + (
             _BOOTINDEX,
             PropInfo("host_mtu", "uint16", default=0),
             PropInfo("mac", "str", "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56"),
             PropInfo("mq", "bool", "on/off", False),
             PropInfo("netdev", "str", "ID of a netdev to use as a backend"),
             PropInfo("rx_queue_size", "uint16", default=256),
             PropInfo("tx", "str"),
             PropInfo("tx_queue_size", "uint16", default=256),
         ), alias="virtio-net"),
    _dev("vmcoreinfo", "", "Misc", "the guest kernel's crash-dump notes, kept in fw_cfg "
         "(accepted, not built: pyhv has no fw_cfg)", "device", ()),
    _dev("vhost-user-blk-pci", "PCI", "Storage", "vhost-user block device", "virtio-pci",
         _VIRTIO_PCI + (
             _BOOTINDEX,
             _CHARDEV,
             PropInfo("num-queues", "uint16"),
             PropInfo("queue-size", "uint32", default=128),
         )),
    _dev("vhost-user-fs-pci", "PCI", "Storage", "vhost-user file system (virtiofs)",
         "virtio-pci", _VIRTIO_PCI + (
             _BOOTINDEX,
             _CHARDEV,
             PropInfo("num-request-queues", "uint16", default=1),
             PropInfo("queue-size", "uint16", default=128),
             PropInfo("tag", "str"),
         )),
)}

#: properties every ``-device`` takes besides its own (not device properties in QOM)
DEVICE_OPTIONS = ("driver", "id", "bus")

_ALIASES = {d.alias: d.name for d in DEVICES.values() if d.alias}


def find_device(name: str) -> Optional[DeviceType]:
    """A device by its driver name or alias (``virtio-blk`` → ``virtio-blk-pci``)."""
    return DEVICES.get(_ALIASES.get(name, name))


# --------------------------------------------------------------------------- CPU models


@dataclass(frozen=True)
class CpuModel:
    name: str
    description: str
    #: QEMU's ``static``: the model never changes with the machine or accelerator
    static: bool = False
    migration_safe: bool = True
    #: models the shim passes straight through to the host CPU's CPUID
    passthrough: bool = False

    @property
    def typename(self) -> str:
        return f"{self.name}-x86_64-cpu"


CPU_MODELS: tuple[CpuModel, ...] = (
    CpuModel("host", "KVM processor with all supported host features",
             migration_safe=False, passthrough=True),
    CpuModel("max", "all features KVM supports on this host", migration_safe=False,
             passthrough=True),
    CpuModel("base", "base CPU model type with no features enabled", static=True),
    CpuModel("qemu64", "QEMU Virtual CPU version 2.5+"),
    CpuModel("qemu32", "QEMU Virtual CPU version 2.5+ (32-bit)"),
    CpuModel("kvm64", "Common KVM processor"),
    CpuModel("kvm32", "Common 32-bit KVM processor"),
    CpuModel("Nehalem", "Intel Core i7 9xx (Nehalem Class Core i7)"),
    CpuModel("Westmere", "Westmere E56xx/L56xx/X56xx (Nehalem-C)"),
    CpuModel("SandyBridge", "Intel Xeon E312xx (Sandy Bridge)"),
    CpuModel("IvyBridge", "Intel Xeon E3-12xx v2 (Ivy Bridge)"),
    CpuModel("Haswell", "Intel Core Processor (Haswell)"),
    CpuModel("Broadwell", "Intel Core Processor (Broadwell)"),
    CpuModel("Skylake-Client", "Intel Core Processor (Skylake)"),
    CpuModel("Skylake-Server", "Intel Xeon Processor (Skylake)"),
    CpuModel("Cascadelake-Server", "Intel Xeon Processor (Cascadelake)"),
    CpuModel("Icelake-Server", "Intel Xeon Processor (Icelake)"),
    CpuModel("EPYC", "AMD EPYC Processor"),
    CpuModel("EPYC-Rome", "AMD EPYC-Rome Processor"),
    CpuModel("EPYC-Milan", "AMD EPYC-Milan Processor"),
)


#: map models QEMU itself does not define (RHEL-only)
_NOT_QEMU_MODELS = ("cpu64-rhel5", "cpu64-rhel6")


def cpu_models() -> tuple[CpuModel, ...]:
    """``host``, ``max``, ``base`` and every model in libvirt's CPU map (read at the
    first call; without the map, the models above with a description)."""
    from pyhv.cpumodel import CpuModelError, cpu_map

    try:
        names = sorted(cpu_map().models)
    except CpuModelError:
        return CPU_MODELS
    known = {m.name for m in CPU_MODELS}
    extra = tuple(CpuModel(n, f"{n} (libvirt CPU map)") for n in names
                  if n not in known and n not in _NOT_QEMU_MODELS)
    inmap = set(names)
    return tuple(m for m in CPU_MODELS if m.passthrough or m.static or m.name in inmap) + extra


def find_cpu_model(name: str) -> Optional[CpuModel]:
    """A model by QEMU's name, or its ``-v1`` version name."""
    models = cpu_models()
    for m in models:
        if m.name == name or f"{m.name}-v1" == name:
            return m
    return None


# --------------------------------------------------------------------------- command line

#: QemuOpts lists and their parameters as ``query-command-line-options`` reports
#: them (QEMU's list names: ``boot-opts``, ``smp-opts``).  libvirt 9.0 decides
#: from this answer whether to pass ``-chardev ...,fd=``, ``-sandbox``,
#: ``-overcommit``, ``-msg timestamp=on``, ``-name guest=,debug-threads=`` and
#: ``-boot strict=on``, so every parameter listed here is one ``pyhv.shim.mapping``
#: accepts.  Lists pyhv refuses (numa, spice, vnc) are absent on purpose.
COMMAND_LINE_OPTIONS: dict[str, tuple[str, ...]] = {
    "name": ("guest", "process", "debug-threads"),
    "machine": ("type", "accel", "usb", "dump-guest-core", "mem-merge", "memory-backend",
                "vmport", "smm", "acpi", "hpet", "kernel_irqchip", "graphics",
                "suppress-vmdesc"),
    "accel": ("accel", "kernel-irqchip", "dirty-ring-size"),
    "boot-opts": ("order", "once", "menu", "splash", "splash-time", "reboot-timeout",
                  "strict"),
    "smp-opts": ("cpus", "sockets", "dies", "cores", "threads", "maxcpus"),
    "memory": ("size", "slots", "maxmem"),
    "chardev": ("backend", "id", "path", "fd", "server", "wait", "append", "logfile",
                "logappend", "host", "port", "nodelay"),
    "mon": ("chardev", "mode", "pretty"),
    "rtc": ("base", "clock", "driftfix"),
    "drive": ("file", "format", "if", "id", "readonly", "cache", "aio", "discard",
              "detect-zeroes", "media", "serial"),
    "add-fd": ("fd", "set", "opaque"),
    "sandbox": ("enable", "obsolete", "elevateprivileges", "spawn", "resourcecontrol"),
    "overcommit": ("mem-lock", "cpu-pm"),
    "msg": ("timestamp", "guest-name"),
    "action": ("reboot", "shutdown", "panic", "watchdog"),
    "display": ("type",),
    "fsdev": ("fsdriver", "id", "path", "security_model", "readonly", "writeout",
              "multidevs", "fmode", "dmode"),
}


#: the devices pyhv builds (or accepts as plumbing): what QMP offers to libvirt, so
#: that domcapabilities lists them and nothing else.  The virtio devices join
#: this set when the engine builds them; until then -device refuses them.
BUILT: frozenset[str] = frozenset({
    "isa-serial",          # COM1
    "PIIX4_PM", "ICH9-LPC",  # the chipset's ACPI PM (S5 only)
    "pcie-root-port", "pci-bridge",  # PCI bridges and PCI Express root ports
    # USB host controllers (empty root hubs: no USB device can be attached yet)
    "piix3-usb-uhci", "ich9-usb-uhci1", "ich9-usb-uhci2", "ich9-usb-uhci3",
    "ich9-usb-ehci1", "qemu-xhci",
    # virtio devices, as the engine builds them: modern only (a "-non-transitional"
    # name tells libvirt so; "-transitional" ones are refused)
    "virtio-rng-pci", "virtio-rng-pci-non-transitional",
    "virtio-blk-pci", "virtio-blk-pci-non-transitional",
    "virtio-balloon-pci", "virtio-balloon-pci-non-transitional",
    "virtio-net-pci", "virtio-serial-pci", "virtserialport", "virtconsole",
    "virtio-9p-pci", "virtio-9p-pci-non-transitional",
    "vhost-user-blk-pci",  # the queues served by another process (vhost-user frontend)
})

#: devices accepted on the command line but not built, each with a note saying so:
#: OpenStack Nova adds vmcoreinfo to every x86 guest, and libvirt only passes it to
#: an emulator that lists it
NOTED: frozenset[str] = frozenset({"vmcoreinfo"})

#: virtio device types (QEMU's proxies' back halves) libvirt probes for: present when
#: the proxy is built
VIRTIO_BACKENDS: dict[str, str] = {"vhost-user-blk-pci": "vhost-user-blk"}
