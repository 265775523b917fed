"""pyhv-qemu's QMP schema: its commands, events and types, as data.

The one description serves three ends, so they cannot disagree:

* ``query-qmp-schema`` answers with :func:`introspect`, the QAPI introspection
  format (``SchemaInfo`` entries of meta-type builtin, enum, array, object,
  alternate, command and event, every name defined exactly once);
* :func:`check_arguments` checks a command's arguments against its definition,
  with QEMU's error messages;
* ``pyhv.shim.commands`` has exactly one handler per command defined here.

Only what pyhv implements is described.  libvirt reads capabilities out of the
schema (``virQEMUCapsQMPSchemaQueries``); the parts it looks for and pyhv
wants it to find are:

* ``object-add/arg-type/qom-type/^secret``: ``-object`` takes JSON;
* ``device_add/$json-cli-hotplug``: ``-device`` takes JSON;
* ``netdev_add/arg-type/type/^dgram``: ``-netdev`` takes JSON;
* ``blockdev-add/arg-type/+file/$dynamic-auto-read-only`` and
  ``human-monitor-command/$savevm-monitor-nodes``: (with ``scsi-hd``'s
  ``device_id`` property) what older libvirt needs before using ``-blockdev``;
* ``query-named-block-nodes/arg-type/flat``.

and it deliberately leaves out what would make libvirt use features pyhv
lacks: ``query-display-options``, ``query-hotpluggable-cpus``'s ``die-id``,
``chardev-add``, migration parameters, NBD, ``screendump``.
``query-cpu-model-expansion`` answers from libvirt's CPU map and this host's
KVM (:mod:`pyhv.shim.cpus`), so libvirt's host-model is what KVM can give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Iterable, Iterator, Optional, Union

from pyhv.shim.qmp import SHUTDOWN_CAUSES, QmpError

# --------------------------------------------------------------------------- the DSL


@dataclass(frozen=True)
class Member:
    name: str
    #: a builtin (``str``, ``int``, ``bool``, ``uint64``...), a defined type or
    #: ``[T]`` for an array of ``T``
    type: str
    optional: bool = False
    features: tuple[str, ...] = ()


def req(name: str, type_: str) -> Member:
    return Member(name, type_)


def opt(name: str, type_: str) -> Member:
    return Member(name, type_, optional=True)


@dataclass(frozen=True)
class Enum:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Struct:
    name: str
    members: tuple[Member, ...]
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Union_:
    """A flat union: common members, one of them (``tag``) an enum selecting the variant."""

    name: str
    members: tuple[Member, ...]
    tag: str
    #: tag value -> name of the struct with the variant's extra members
    variants: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Alternate:
    name: str
    choices: tuple[str, ...]


TypeDef = Union[Enum, Struct, Union_, Alternate]


@dataclass(frozen=True)
class CommandDef:
    name: str
    #: inline argument members, or the name of a struct/union (QAPI's ``boxed``)
    args: Union[tuple[Member, ...], str] = ()
    returns: Optional[str] = None
    features: tuple[str, ...] = ()
    #: extra arguments are passed through unchecked (QAPI's ``gen: false``)
    open_args: bool = False


@dataclass(frozen=True)
class EventDef:
    name: str
    data: tuple[Member, ...] = ()


#: builtin type -> JSON type, as introspection reports it
BUILTINS: Final[dict[str, str]] = {
    "str": "string", "number": "number", "bool": "boolean", "null": "null", "any": "value",
    "int": "int", "int8": "int", "int16": "int", "int32": "int", "int64": "int",
    "uint8": "int", "uint16": "int", "uint32": "int", "uint64": "int", "size": "int",
}

_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "int": (-(1 << 63), (1 << 63) - 1), "int64": (-(1 << 63), (1 << 63) - 1),
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1), "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1), "size": (0, (1 << 64) - 1),
}

EMPTY: Final = "q_empty"

# --------------------------------------------------------------------------- pyhv's choices

#: ``-object`` types pyhv builds (libvirt always passes a ``secret`` master key
#: and, with ``default-ram-id``, the guest RAM as a ``memory-backend-ram``)
OBJECT_TYPES: Final = ("memory-backend-file", "memory-backend-memfd", "memory-backend-ram",
                       "rng-builtin", "rng-random", "secret")
#: ``-netdev`` types; ``dgram`` is what libvirt checks for before passing JSON
NETDEV_TYPES: Final = ("dgram", "tap", "user", "vhost-user")
#: ``-blockdev`` drivers
BLOCKDEV_DRIVERS: Final = ("file", "host_device", "qcow2", "raw")
RUN_STATES: Final = (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
    "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
    "suspended", "watchdog", "guest-panicked", "colo",
)
#: migration capabilities: only "events", which libvirt always turns on (pyhv never
#: migrates, so it never sends migration events)
MIGRATION_CAPABILITIES: Final[tuple[str, ...]] = ("events",)

TYPES: Final[tuple[TypeDef, ...]] = (
    # ---- basics
    Struct("VersionTriple", (req("major", "int"), req("minor", "int"), req("micro", "int"))),
    Struct("VersionInfo", (req("qemu", "VersionTriple"), req("package", "str"))),
    Enum("SysEmuTarget", ("x86_64",)),
    Struct("TargetInfo", (req("arch", "SysEmuTarget"),)),
    Struct("KvmInfo", (req("enabled", "bool"), req("present", "bool"))),
    Struct("NameInfo", (opt("name", "str"),)),
    Struct("UuidInfo", (req("UUID", "str"),)),
    Struct("CommandInfo", (req("name", "str"),)),
    Struct("EventInfo", (req("name", "str"),)),
    Enum("RunState", RUN_STATES),
    Struct("StatusInfo", (req("running", "bool"), req("singlestep", "bool"),
                          req("status", "RunState"))),
    Enum("QMPCapability", ("oob",)),
    Enum("ShutdownCause", SHUTDOWN_CAUSES),
    Enum("GuestPanicAction", ("pause", "poweroff", "run")),
    Enum("IoOperationType", ("read", "write")),
    Enum("BlockErrorAction", ("ignore", "report", "stop")),
    Enum("BlockDeviceIoStatus", ("ok", "failed", "nospace")),
    # ---- QOM and machine description
    Struct("ObjectTypeInfo", (req("name", "str"), opt("abstract", "bool"), opt("parent", "str"))),
    Struct("ObjectPropertyInfo", (req("name", "str"), req("type", "str"),
                                  opt("description", "str"), opt("default-value", "any"))),
    Struct("MachineInfo", (
        req("name", "str"), opt("alias", "str"), opt("is-default", "bool"),
        req("cpu-max", "int"), req("hotpluggable-cpus", "bool"),
        req("numa-mem-supported", "bool"), req("deprecated", "bool"),
        opt("default-cpu-type", "str"), opt("default-ram-id", "str"))),
    Struct("CpuDefinitionInfo", (
        req("name", "str"), opt("migration-safe", "bool"), req("static", "bool"),
        opt("unavailable-features", "[str]"), req("typename", "str"),
        opt("alias-of", "str"), req("deprecated", "bool"))),
    Struct("CpuModelInfo", (req("name", "str"), opt("props", "any"))),
    Enum("CpuModelExpansionType", ("static", "full")),
    Struct("CpuModelExpansionInfo", (req("model", "CpuModelInfo"),
                                     opt("deprecated-props", "[str]"))),
    Enum("CpuModelCompareResult", ("incompatible", "identical", "superset", "subset")),
    Struct("CpuModelCompareInfo", (req("result", "CpuModelCompareResult"),
                                   req("responsible-properties", "[str]"))),
    Struct("CpuModelBaselineInfo", (req("model", "CpuModelInfo"),)),
    Enum("TpmModel", ()),
    Enum("TpmType", ()),
    Struct("CommandLineParameterInfo", (req("name", "str"), req("type", "str"),
                                        opt("help", "str"), opt("default", "str"))),
    Struct("CommandLineOptionInfo", (req("option", "str"),
                                     req("parameters", "[CommandLineParameterInfo]"))),
    Struct("CpuInstanceProperties", (
        opt("node-id", "int"), opt("socket-id", "int"), opt("core-id", "int"),
        opt("thread-id", "int"))),
    Struct("HotpluggableCPU", (req("type", "str"), req("vcpus-count", "int"),
                               req("props", "CpuInstanceProperties"), opt("qom-path", "str"))),
    Struct("CpuInfoFast", (req("cpu-index", "int"), req("qom-path", "str"),
                           req("thread-id", "int"), opt("props", "CpuInstanceProperties"),
                           req("target", "SysEmuTarget"))),
    Struct("IOThreadInfo", (req("id", "str"), req("thread-id", "int"),
                            req("poll-max-ns", "int"), req("poll-grow", "int"),
                            req("poll-shrink", "int"), req("aio-max-batch", "int"))),
    Struct("ChardevInfo", (req("label", "str"), req("filename", "str"),
                           req("frontend-open", "bool"))),
    Struct("BalloonInfo", (req("actual", "int"),)),
    Enum("RxState", ("normal", "none", "all")),
    Struct("RxFilterInfo", (req("name", "str"), req("promiscuous", "bool"),
                            req("multicast", "RxState"), req("unicast", "RxState"),
                            req("vlan", "RxState"), req("broadcast-allowed", "bool"),
                            req("multicast-overflow", "bool"),
                            req("unicast-overflow", "bool"), req("main-mac", "str"),
                            req("vlan-table", "[int]"), req("unicast-table", "[str]"),
                            req("multicast-table", "[str]"))),
    Enum("MigrationCapability", MIGRATION_CAPABILITIES),
    Struct("MigrationCapabilityStatus", (req("capability", "MigrationCapability"),
                                         req("state", "bool"))),
    Struct("SevCapability", (req("pdh", "str"), req("cert-chain", "str"),
                             req("cbitpos", "int"), req("reduced-phys-bits", "int"))),
    Struct("SGXInfo", (req("sgx", "bool"), req("sgx1", "bool"), req("sgx2", "bool"),
                       req("flc", "bool"))),
    # ---- jobs and migration: none ever runs in pyhv, but libvirt asks (reconnect)
    Enum("JobType", ("commit", "stream", "mirror", "backup", "create", "amend",
                     "snapshot-load", "snapshot-save", "snapshot-delete")),
    Enum("JobStatus", ("undefined", "created", "running", "paused", "ready", "standby",
                       "waiting", "pending", "aborting", "concluded", "null")),
    Struct("JobInfo", (req("id", "str"), req("type", "JobType"), req("status", "JobStatus"),
                       req("current-progress", "int"), req("total-progress", "int"),
                       opt("error", "str"))),
    Struct("BlockJobInfo", (req("type", "str"), req("device", "str"), req("len", "int"),
                            req("offset", "int"), req("busy", "bool"), req("paused", "bool"),
                            req("speed", "int"), req("ready", "bool"),
                            req("status", "JobStatus"), req("auto-finalize", "bool"),
                            req("auto-dismiss", "bool"))),
    Enum("MigrationStatus", ("none", "setup", "cancelling", "cancelled", "active",
                             "postcopy-active", "postcopy-paused", "postcopy-recover",
                             "completed", "failed", "colo", "pre-switchover", "device",
                             "wait-unplug")),
    Struct("MigrationInfo", (opt("status", "MigrationStatus"),)),
    Struct("FdsetFdInfo", (req("fd", "int"), opt("opaque", "str"))),
    Struct("FdsetInfo", (req("fdset-id", "int"), req("fds", "[FdsetFdInfo]"))),
    Struct("AddfdInfo", (req("fdset-id", "int"), req("fd", "int"))),
    # ---- block layer (pyhv's -blockdev subset)
    Enum("BlockdevDriver", BLOCKDEV_DRIVERS),
    Enum("BlockdevDiscardOptions", ("ignore", "unmap")),
    Enum("BlockdevDetectZeroesOptions", ("off", "on", "unmap")),
    Enum("BlockdevAioOptions", ("threads", "native")),
    Struct("BlockdevCacheOptions", (opt("direct", "bool"), opt("no-flush", "bool"))),
    Struct("BlockdevOptionsFile", (
        req("filename", "str"), opt("aio", "BlockdevAioOptions"), opt("locking", "str")),
        features=("dynamic-auto-read-only",)),
    Alternate("BlockdevRef", ("BlockdevOptions", "str")),
    Struct("BlockdevOptionsRaw", (req("file", "BlockdevRef"), opt("offset", "int"),
                                  opt("size", "int"))),
    Alternate("BlockdevRefOrNull", ("BlockdevOptions", "str", "null")),
    Struct("BlockdevOptionsQcow2", (
        req("file", "BlockdevRef"), opt("backing", "BlockdevRefOrNull"),
        opt("lazy-refcounts", "bool"), opt("pass-discard-request", "bool"),
        opt("pass-discard-snapshot", "bool"), opt("pass-discard-other", "bool"),
        opt("cache-size", "int"), opt("l2-cache-size", "int"),
        opt("l2-cache-entry-size", "int"), opt("refcount-cache-size", "int"),
        opt("cache-clean-interval", "int"))),
    Union_("BlockdevOptions", (
        req("driver", "BlockdevDriver"), opt("node-name", "str"),
        opt("discard", "BlockdevDiscardOptions"), opt("cache", "BlockdevCacheOptions"),
        opt("read-only", "bool"), opt("auto-read-only", "bool"), opt("force-share", "bool"),
        opt("detect-zeroes", "BlockdevDetectZeroesOptions")),
        "driver", (("file", "BlockdevOptionsFile"), ("host_device", "BlockdevOptionsFile"),
                   ("qcow2", "BlockdevOptionsQcow2"), ("raw", "BlockdevOptionsRaw"))),
    Struct("ImageInfo", (req("filename", "str"), req("format", "str"),
                         req("virtual-size", "int"), opt("actual-size", "int"),
                         opt("cluster-size", "int"), opt("dirty-flag", "bool"),
                         opt("backing-filename", "str"), opt("full-backing-filename", "str"),
                         opt("backing-filename-format", "str"),
                         opt("backing-image", "ImageInfo"))),
    Struct("BlockDeviceInfo", (req("node-name", "str"), req("file", "str"),
                               opt("backing_file", "str"), opt("backing_file_depth", "int"),
                               opt("image", "ImageInfo"),
                               req("ro", "bool"), req("drv", "str"),
                               req("write_threshold", "int"))),
    Struct("BlockInfo", (req("device", "str"), opt("qdev", "str"), req("type", "str"),
                         req("removable", "bool"), req("locked", "bool"),
                         opt("inserted", "BlockDeviceInfo"),
                         opt("io-status", "BlockDeviceIoStatus"))),
    Struct("BlockDeviceStats", (opt("rd_total_time_ns", "int"), opt("wr_total_time_ns", "int"),
                                opt("flush_total_time_ns", "int"),
                                opt("wr_highest_offset", "int"),
                                req("rd_bytes", "int"), req("wr_bytes", "int"),
                                req("rd_operations", "int"), req("wr_operations", "int"),
                                req("flush_operations", "int"))),
    Struct("BlockStats", (opt("device", "str"), opt("qdev", "str"), opt("node-name", "str"),
                          req("stats", "BlockDeviceStats"))),
    # ---- objects (-object / object-add)
    Enum("ObjectType", OBJECT_TYPES),
    Enum("QCryptoSecretFormat", ("raw", "base64")),
    Struct("SecretProperties", (opt("data", "str"), opt("file", "str"),
                                opt("format", "QCryptoSecretFormat"), opt("keyid", "str"),
                                opt("iv", "str"))),
    Struct("MemoryBackendProperties", (req("size", "size"), opt("share", "bool"),
                                       opt("prealloc", "bool"), opt("merge", "bool"),
                                       opt("dump", "bool"),
                                       opt("x-use-canonical-path-for-ramblock-id", "bool"))),
    Struct("MemoryBackendFileProperties", (req("size", "size"), req("mem-path", "str"),
                                           opt("share", "bool"), opt("prealloc", "bool"),
                                           opt("merge", "bool"), opt("dump", "bool"),
                                           opt("discard-data", "bool"),
                                           opt("readonly", "bool"))),
    Struct("MemoryBackendMemfdProperties", (req("size", "size"), opt("share", "bool"),
                                            opt("prealloc", "bool"), opt("hugetlb", "bool"),
                                            opt("seal", "bool"))),
    Struct("RngProperties", (opt("opened", "bool"),)),
    Struct("RngRandomProperties", (opt("opened", "bool"), opt("filename", "str"))),
    Union_("ObjectOptions", (req("qom-type", "ObjectType"), req("id", "str")), "qom-type", (
        ("memory-backend-file", "MemoryBackendFileProperties"),
        ("memory-backend-memfd", "MemoryBackendMemfdProperties"),
        ("memory-backend-ram", "MemoryBackendProperties"),
        ("rng-builtin", "RngProperties"),
        ("rng-random", "RngRandomProperties"),
        ("secret", "SecretProperties"))),
    # ---- netdevs (-netdev / netdev_add)
    Enum("NetClientDriver", NETDEV_TYPES),
    Struct("NetdevTapOptions", (opt("ifname", "str"), opt("fd", "str"), opt("fds", "str"),
                                opt("script", "str"), opt("downscript", "str"),
                                opt("vhost", "bool"), opt("vhostfd", "str"),
                                opt("vhostfds", "str"), opt("queues", "uint32"))),
    Struct("NetdevUserOptions", (opt("ipv4", "bool"), opt("ipv6", "bool"),
                                 opt("net", "str"), opt("hostname", "str"))),
    Struct("NetdevVhostUserOptions", (req("chardev", "str"), opt("vhostforce", "bool"),
                                      opt("queues", "int"))),
    Union_("Netdev", (req("id", "str"), req("type", "NetClientDriver")), "type", (
        ("tap", "NetdevTapOptions"), ("user", "NetdevUserOptions"),
        ("vhost-user", "NetdevVhostUserOptions"))),
    # ---- CPU QOM properties (qom-get on a vCPU)
    Enum("X86CPURegister32", ("EAX", "EBX", "ECX", "EDX", "ESP", "EBP", "ESI", "EDI")),
    Struct("X86CPUFeatureWordInfo", (req("cpuid-input-eax", "int"),
                                     opt("cpuid-input-ecx", "int"),
                                     req("cpuid-register", "X86CPURegister32"),
                                     req("features", "int"))),
)

COMMANDS: Final[tuple[CommandDef, ...]] = (
    CommandDef("qmp_capabilities", (opt("enable", "[QMPCapability]"),)),
    CommandDef("query-version", returns="VersionInfo"),
    CommandDef("query-target", returns="TargetInfo"),
    CommandDef("query-qmp-schema", returns="[SchemaInfo]"),
    CommandDef("query-commands", returns="[CommandInfo]"),
    CommandDef("query-events", returns="[EventInfo]"),
    CommandDef("query-kvm", returns="KvmInfo"),
    CommandDef("query-name", returns="NameInfo"),
    CommandDef("query-uuid", returns="UuidInfo"),
    CommandDef("query-status", returns="StatusInfo"),
    CommandDef("qom-list-types", (opt("implements", "str"), opt("abstract", "bool")),
               returns="[ObjectTypeInfo]"),
    CommandDef("qom-list", (req("path", "str"),), returns="[ObjectPropertyInfo]"),
    CommandDef("qom-get", (req("path", "str"), req("property", "str")), returns="any"),
    CommandDef("qom-set", (req("path", "str"), req("property", "str"), req("value", "any"))),
    CommandDef("qom-list-properties", (req("typename", "str"),),
               returns="[ObjectPropertyInfo]"),
    CommandDef("device-list-properties", (req("typename", "str"),),
               returns="[ObjectPropertyInfo]"),
    CommandDef("query-machines", (opt("compat-props", "bool"),), returns="[MachineInfo]"),
    CommandDef("query-cpu-definitions", returns="[CpuDefinitionInfo]"),
    CommandDef("query-cpu-model-expansion", (req("type", "CpuModelExpansionType"),
                                             req("model", "CpuModelInfo")),
               returns="CpuModelExpansionInfo"),
    CommandDef("query-cpu-model-baseline", (req("modela", "CpuModelInfo"),
                                            req("modelb", "CpuModelInfo")),
               returns="CpuModelBaselineInfo"),
    CommandDef("query-cpu-model-comparison", (req("modela", "CpuModelInfo"),
                                              req("modelb", "CpuModelInfo")),
               returns="CpuModelCompareInfo"),
    CommandDef("query-tpm-models", returns="[TpmModel]"),
    CommandDef("query-tpm-types", returns="[TpmType]"),
    CommandDef("query-command-line-options", (opt("option", "str"),),
               returns="[CommandLineOptionInfo]"),
    CommandDef("query-migrate-capabilities", returns="[MigrationCapabilityStatus]"),
    CommandDef("migrate-set-capabilities",
               (req("capabilities", "[MigrationCapabilityStatus]"),)),
    CommandDef("query-sev-capabilities", returns="SevCapability"),
    CommandDef("query-sgx-capabilities", returns="SGXInfo"),
    CommandDef("query-hotpluggable-cpus", returns="[HotpluggableCPU]"),
    CommandDef("query-cpus-fast", returns="[CpuInfoFast]"),
    CommandDef("query-iothreads", returns="[IOThreadInfo]"),
    CommandDef("query-named-block-nodes", (opt("flat", "bool"),), returns="[BlockDeviceInfo]"),
    CommandDef("query-block", returns="[BlockInfo]"),
    CommandDef("query-blockstats", (opt("query-nodes", "bool"),), returns="[BlockStats]"),
    CommandDef("query-chardev", returns="[ChardevInfo]"),
    CommandDef("query-balloon", returns="BalloonInfo"),
    CommandDef("query-jobs", returns="[JobInfo]"),
    CommandDef("query-block-jobs", returns="[BlockJobInfo]"),
    CommandDef("query-migrate", returns="MigrationInfo"),
    CommandDef("query-fdsets", returns="[FdsetInfo]"),
    CommandDef("getfd", (req("fdname", "str"),)),
    CommandDef("add-fd", (opt("fdset-id", "int"), opt("opaque", "str")), "AddfdInfo"),
    CommandDef("remove-fd", (req("fdset-id", "int"), opt("fd", "int"))),
    CommandDef("closefd", (req("fdname", "str"),)),
    CommandDef("balloon", (req("value", "int"),)),
    CommandDef("block_resize", (opt("device", "str"), opt("node-name", "str"),
                                req("size", "int"))),
    CommandDef("block-set-write-threshold", (req("node-name", "str"),
                                             req("write-threshold", "int"))),
    CommandDef("set_link", (req("name", "str"), req("up", "bool"))),
    CommandDef("query-rx-filter", (opt("name", "str"),), "[RxFilterInfo]"),
    CommandDef("cont"),
    CommandDef("stop"),
    CommandDef("system_powerdown"),
    CommandDef("system_reset"),
    CommandDef("rtc-reset-reinjection"),
    CommandDef("quit"),
    CommandDef("human-monitor-command", (req("command-line", "str"), opt("cpu-index", "int")),
               returns="str", features=("savevm-monitor-nodes",)),
    CommandDef("device_add", (req("driver", "str"), opt("bus", "str"), opt("id", "str")),
               features=("json-cli", "json-cli-hotplug"), open_args=True),
    CommandDef("device_del", (req("id", "str"),)),
    CommandDef("object-add", "ObjectOptions"),
    CommandDef("object-del", (req("id", "str"),)),
    CommandDef("netdev_add", "Netdev"),
    CommandDef("netdev_del", (req("id", "str"),)),
    CommandDef("blockdev-add", "BlockdevOptions"),
    CommandDef("blockdev-del", (req("node-name", "str"),)),
)

EVENTS: Final[tuple[EventDef, ...]] = (
    EventDef("SHUTDOWN", (req("guest", "bool"), req("reason", "ShutdownCause"))),
    EventDef("POWERDOWN"),
    EventDef("RESET", (req("guest", "bool"), req("reason", "ShutdownCause"))),
    EventDef("STOP"),
    EventDef("RESUME"),
    EventDef("GUEST_PANICKED", (req("action", "GuestPanicAction"),)),
    EventDef("BALLOON_CHANGE", (req("actual", "int"),)),
    EventDef("BLOCK_IO_ERROR", (req("device", "str"), opt("node-name", "str"),
                                req("operation", "IoOperationType"),
                                req("action", "BlockErrorAction"), opt("nospace", "bool"),
                                req("reason", "str"))),
    EventDef("BLOCK_WRITE_THRESHOLD", (req("node-name", "str"), req("amount-exceeded", "int"),
                                       req("write-threshold", "int"))),
    EventDef("VSERPORT_CHANGE", (req("id", "str"), req("open", "bool"))),
    EventDef("RTC_CHANGE", (req("offset", "int"), req("qom-path", "str"))),
    EventDef("NIC_RX_FILTER_CHANGED", (opt("name", "str"), req("path", "str"))),
    EventDef("DEVICE_DELETED", (opt("device", "str"), req("path", "str"))),
)

#: the introspection types themselves (``query-qmp-schema``'s return type)
_SCHEMA_TYPES: Final[tuple[TypeDef, ...]] = (
    Enum("SchemaMetaType", ("builtin", "enum", "array", "object", "alternate",
                            "command", "event")),
    Enum("JSONType", ("string", "number", "int", "boolean", "null", "object", "array",
                      "value")),
    Struct("SchemaInfoBuiltin", (req("json-type", "JSONType"),)),
    Struct("SchemaInfoEnumMember", (req("name", "str"), opt("features", "[str]"))),
    Struct("SchemaInfoEnum", (req("members", "[SchemaInfoEnumMember]"),
                              req("values", "[str]"))),
    Struct("SchemaInfoArray", (req("element-type", "str"),)),
    Struct("SchemaInfoObjectMember", (req("name", "str"), req("type", "str"),
                                      opt("default", "any"), opt("features", "[str]"))),
    Struct("SchemaInfoObjectVariant", (req("case", "str"), req("type", "str"))),
    Struct("SchemaInfoObject", (req("members", "[SchemaInfoObjectMember]"),
                                opt("tag", "str"),
                                opt("variants", "[SchemaInfoObjectVariant]"))),
    Struct("SchemaInfoAlternateMember", (req("type", "str"),)),
    Struct("SchemaInfoAlternate", (req("members", "[SchemaInfoAlternateMember]"),)),
    Struct("SchemaInfoCommand", (req("arg-type", "str"), req("ret-type", "str"),
                                 opt("allow-oob", "bool"))),
    Struct("SchemaInfoEvent", (req("arg-type", "str"),)),
    Union_("SchemaInfo", (req("name", "str"), req("meta-type", "SchemaMetaType"),
                          opt("features", "[str]")), "meta-type", (
        ("builtin", "SchemaInfoBuiltin"), ("enum", "SchemaInfoEnum"),
        ("array", "SchemaInfoArray"), ("object", "SchemaInfoObject"),
        ("alternate", "SchemaInfoAlternate"), ("command", "SchemaInfoCommand"),
        ("event", "SchemaInfoEvent"))),
)

# --------------------------------------------------------------------------- lookups


@dataclass
class Schema:
    types: dict[str, TypeDef] = field(default_factory=dict)
    commands: dict[str, CommandDef] = field(default_factory=dict)
    events: dict[str, EventDef] = field(default_factory=dict)

    def command_arg_type(self, cmd: CommandDef) -> str:
        if isinstance(cmd.args, str):
            return cmd.args
        return f"q_obj_{cmd.name}-arg" if cmd.args else EMPTY

    def event_arg_type(self, ev: EventDef) -> str:
        return f"q_obj_{ev.name}-arg" if ev.data else EMPTY


def build_schema() -> Schema:
    s = Schema()
    for t in TYPES + _SCHEMA_TYPES:
        if t.name in s.types or t.name in BUILTINS:
            raise ValueError(f"type {t.name} defined twice")
        s.types[t.name] = t
    s.types[EMPTY] = Struct(EMPTY, ())
    for c in COMMANDS:
        if c.name in s.commands:
            raise ValueError(f"command {c.name} defined twice")
        s.commands[c.name] = c
        if isinstance(c.args, tuple) and c.args:
            s.types[s.command_arg_type(c)] = Struct(s.command_arg_type(c), c.args)
    for e in EVENTS:
        s.events[e.name] = e
        if e.data:
            s.types[s.event_arg_type(e)] = Struct(s.event_arg_type(e), e.data)
    return s


SCHEMA: Final = build_schema()

# --------------------------------------------------------------------------- introspection


def _referenced(type_name: str) -> Iterator[str]:
    yield type_name
    if type_name.startswith("["):
        yield from _referenced(type_name[1:-1])


def _type_refs(t: TypeDef) -> Iterator[str]:
    if isinstance(t, (Struct, Union_)):
        for m in t.members:
            yield m.type
    if isinstance(t, Union_):
        for _, v in t.variants:
            yield v
    if isinstance(t, Alternate):
        yield from t.choices


def _members_json(members: Iterable[Member]) -> list[dict[str, Any]]:
    out = []
    for m in members:
        d: dict[str, Any] = {"name": m.name, "type": m.type}
        if m.optional:
            d["default"] = None
        if m.features:
            d["features"] = list(m.features)
        out.append(d)
    return out


def _entry(name: str, t: TypeDef) -> dict[str, Any]:
    if isinstance(t, Enum):
        return {"name": name, "meta-type": "enum", "values": list(t.values),
                "members": [{"name": v} for v in t.values]}
    if isinstance(t, Alternate):
        return {"name": name, "meta-type": "alternate",
                "members": [{"type": c} for c in t.choices]}
    d: dict[str, Any] = {"name": name, "meta-type": "object",
                         "members": _members_json(t.members)}
    if isinstance(t, Union_):
        d["tag"] = t.tag
        d["variants"] = [{"case": c, "type": v} for c, v in t.variants]
    elif t.features:
        d["features"] = list(t.features)
    return d


def introspect(schema: Schema = SCHEMA) -> list[dict[str, Any]]:
    """``query-qmp-schema``'s answer: every entity reachable from a command or event."""
    out: list[dict[str, Any]] = []
    wanted: list[str] = []
    for c in schema.commands.values():
        d: dict[str, Any] = {"name": c.name, "meta-type": "command",
                             "arg-type": schema.command_arg_type(c),
                             "ret-type": c.returns or EMPTY}
        if c.features:
            d["features"] = list(c.features)
        out.append(d)
        wanted += [d["arg-type"], d["ret-type"]]
    for e in schema.events.values():
        out.append({"name": e.name, "meta-type": "event",
                    "arg-type": schema.event_arg_type(e)})
        wanted.append(schema.event_arg_type(e))
    seen: set[str] = set()
    while wanted:
        name = wanted.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("["):
            out.append({"name": name, "meta-type": "array", "element-type": name[1:-1]})
            wanted.append(name[1:-1])
        elif name in BUILTINS:
            out.append({"name": name, "meta-type": "builtin", "json-type": BUILTINS[name]})
        else:
            t = schema.types[name]
            out.append(_entry(name, t))
            for ref in _type_refs(t):
                wanted.extend(_referenced(ref))
    return out


# --------------------------------------------------------------------------- argument checks

_EXPECTED: Final = {"string": "string", "int": "integer", "boolean": "boolean",
                    "number": "number", "null": "null"}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check_value(value: Any, type_name: str, path: str, schema: Schema = SCHEMA) -> None:
    """Raise :class:`QmpError` unless ``value`` is a valid ``type_name``."""
    shown = path or "null"
    if type_name.startswith("["):
        if not isinstance(value, list):
            raise QmpError(f"Invalid parameter type for '{shown}', expected: array")
        for i, item in enumerate(value):
            check_value(item, type_name[1:-1], f"{path}[{i}]", schema)
        return
    if type_name in BUILTINS:
        want = BUILTINS[type_name]
        if want == "value":
            return
        kind = _json_kind(value)
        if want == "number" and kind == "int":
            return
        if kind != want:
            raise QmpError(f"Invalid parameter type for '{shown}', expected: {_EXPECTED[want]}")
        if type_name in _INT_RANGES:
            lo, hi = _INT_RANGES[type_name]
            if not lo <= value <= hi:
                raise QmpError(f"Parameter '{shown}' expects {type_name}")
        return
    t = schema.types[type_name]
    if isinstance(t, Enum):
        if not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{shown}', expected: string")
        if value not in t.values:
            raise QmpError(f"Parameter '{shown}' does not accept value '{value}'")
        return
    if isinstance(t, Alternate):
        kind = _json_kind(value)
        for choice in t.choices:
            ck = BUILTINS.get(choice) or ("string" if isinstance(schema.types.get(choice), Enum)
                                         else "object")
            if ck == kind or (ck == "number" and kind == "int"):
                check_value(value, choice, path, schema)
                return
        raise QmpError(f"Invalid parameter type for '{shown}', expected: {t.name}")
    check_object(value, t, path, schema)


def check_object(value: Any, t: Union[Struct, Union_], path: str, schema: Schema = SCHEMA,
                 open_members: bool = False) -> None:
    if not isinstance(value, dict):
        raise QmpError(f"Invalid parameter type for '{path or 'null'}', expected: object")
    members = list(t.members)
    if isinstance(t, Union_):
        tag = value.get(t.tag)
        for m in members:
            if m.name == t.tag:
                if tag is None:
                    raise QmpError(f"Parameter '{_join(path, m.name)}' is missing")
                check_value(tag, m.type, _join(path, m.name), schema)
        variant = dict(t.variants).get(tag) if isinstance(tag, str) else None
        if variant is not None:
            extra = schema.types[variant]
            assert isinstance(extra, Struct)
            members += extra.members
    for m in members:
        if m.name in value:
            check_value(value[m.name], m.type, _join(path, m.name), schema)
        elif not m.optional:
            raise QmpError(f"Parameter '{_join(path, m.name)}' is missing")
    if not open_members:
        known = {m.name for m in members}
        for key in value:
            if key not in known:
                raise QmpError(f"Parameter '{_join(path, key)}' is unexpected")


def check_arguments(name: str, args: dict[str, Any], schema: Schema = SCHEMA) -> None:
    """Check a command's arguments as QEMU's input visitor would."""
    cmd = schema.commands[name]
    t = schema.types[schema.command_arg_type(cmd)]
    assert isinstance(t, (Struct, Union_))
    check_object(args, t, "", schema, open_members=cmd.open_args)
