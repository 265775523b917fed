"""Reading a libvirt domain definition into a :class:`pyhv.config.VmConfig`.

Order of checks: well-formed XML, libvirt's RelaxNG schema (when installed),
then pyhv's mapping.  The mapper marks every element and attribute it reads;
whatever is left unread at the end changes what the guest sees in a way pyhv
does not emulate, and is refused with its path.  Elements known to be harmless
(metadata, title, description, ``<pm>``, addresses, aliases, timers pyhv
provides anyway) are marked read without mapping.

Every error is one line: ``FILE:LINE: /domain/devices/disk[2]/driver: why``.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Optional, TypeVar, cast

from pyhv.config import (
    SMBIOS_FIELDS,
    USB_MODELS,
    BackingFile,
    BalloonConfig,
    ChannelConfig,
    ClockConfig,
    ConfigError,
    ControllerConfig,
    CpuConfig,
    CpuFeature,
    CpuTopology,
    CpuTuneConfig,
    DiskConfig,
    FeaturesConfig,
    FilesystemConfig,
    KernelBoot,
    MemoryBackingConfig,
    MemorySource,
    NetConfig,
    NumaCell,
    NumaTune,
    PciAddress,
    RngConfig,
    SchedConfig,
    SchedPolicy,
    SerialConfig,
    SerialPortConfig,
    SmbiosConfig,
    VmConfig,
    machine_family,
    parse_cpuset,
)
from pyhv.errors import PyhvError
from pyhv.placement import place

#: a device record that sits on PCI (it has an id and an address)
_P = TypeVar("_P", DiskConfig, FilesystemConfig, NetConfig, RngConfig, BalloonConfig)

#: libvirt's scaled-integer units (virScaleInteger): case-insensitive
_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mib": 1 << 20, "mb": 1000 ** 2,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3,
    "t": 1 << 40, "tib": 1 << 40, "tb": 1000 ** 4,
    "p": 1 << 50, "pib": 1 << 50, "pb": 1000 ** 5,
    "e": 1 << 60, "eib": 1 << 60, "eb": 1000 ** 6,
}

#: top-level elements that change nothing the guest sees
_HARMLESS_TOP = {"title", "description", "metadata", "pm", "seclabel", "resource"}
#: clock timers whose device pyhv has anyway (any policy is accepted)
_PROVIDED_TIMERS = {"rtc", "pit", "kvmclock"}
_CHARDEV_TYPES = "pty, file, stdio, unix, null, tcp"


class DomainXmlError(PyhvError):
    """The domain XML is malformed or asks for what pyhv cannot build."""


@dataclass
class DomainMapping:
    """A mapped domain: the machine, plus notes on what was accepted and flattened."""

    config: VmConfig
    notes: list[str] = field(default_factory=list)
    #: where each part of the config came from: ``support.Issue.subject`` →
    #: (line, element path)
    origins: dict[tuple[str, int], tuple[int, str]] = field(default_factory=dict)


def _is_element(el: Any) -> bool:
    return isinstance(el.tag, str)


class _Mapper:
    def __init__(self, root: Any, source: str) -> None:
        self.root = root
        self.tree = root.getroottree()
        self.source = source
        self.seen: set[str] = set()
        self.seen_attrs: set[tuple[str, str]] = set()
        self.notes: list[str] = []
        self.origins: dict[tuple[str, int], tuple[int, str]] = {}
        #: ``<vcpu cpuset>`` (read with the vCPU count, used by ``cputune``)
        self.vcpu_cpuset: Optional[tuple[int, ...]] = None

    def origin(self, kind: str, index: int, el: Any) -> None:
        if el is not None and (kind, index) not in self.origins:
            self.origins[(kind, index)] = (getattr(el, "sourceline", None) or 0, self.path(el))

    # ---- bookkeeping -------------------------------------------------------
    def path(self, el: Any) -> str:
        return str(self.tree.getpath(el))

    def fail(self, el: Any, message: str) -> NoReturn:
        line = getattr(el, "sourceline", None) or 0
        raise DomainXmlError(f"{self.source}:{line}: {self.path(el)}: {message}")

    def mark(self, el: Any) -> Any:
        self.seen.add(self.path(el))
        return el

    def ignore(self, el: Any) -> None:
        """Accept ``el`` and everything under it without mapping."""
        for sub in el.iter():
            if _is_element(sub):
                p = self.path(sub)
                self.seen.add(p)
                for name in sub.attrib:
                    self.seen_attrs.add((p, name))

    def attr(self, el: Any, name: str, default: Optional[str] = None) -> Optional[str]:
        self.seen_attrs.add((self.path(el), name))
        value = el.get(name)
        return default if value is None else value

    def choice(self, el: Any, name: str, allowed: tuple[str, ...], default: Optional[str],
               what: str = "") -> Optional[str]:
        value = self.attr(el, name, default)
        if value is not None and value not in allowed:
            self.fail(el, f"{what or name} {value!r} is not supported "
                          f"(supported: {', '.join(allowed)})")
        return value

    def onoff(self, el: Any, name: str, default: bool = False) -> bool:
        value = self.choice(el, name, ("on", "off", "yes", "no"), None)
        return default if value is None else value in ("on", "yes")

    def child(self, el: Any, tag: str) -> Optional[Any]:
        found = el.find(tag)
        return self.mark(found) if found is not None else None

    def children(self, el: Any, tag: str) -> list[Any]:
        return [self.mark(c) for c in el.findall(tag)]

    def text(self, el: Any) -> str:
        return (el.text or "").strip()

    def integer(self, el: Any, value: Optional[str], what: str, minimum: int = 0) -> int:
        try:
            n = int(value or "", 0) if value and value.lower().startswith("0x") \
                else int(value or "")
        except ValueError:
            self.fail(el, f"{what} {value!r} is not a number")
        if n < minimum:
            self.fail(el, f"{what} {n} must be {minimum} or more")
        return n

    def size(self, el: Any, what: str, default_unit: str = "KiB") -> int:
        unit = self.attr(el, "unit", default_unit) or default_unit
        scale = _UNITS.get(unit.lower())
        if scale is None:
            self.fail(el, f"unknown unit {unit!r} (KiB, MiB, GiB, bytes, ...)")
        return self.integer(el, self.text(el), what) * scale

    def leftovers(self) -> None:
        for el in self.root.iter():
            if not _is_element(el):
                continue
            p = self.path(el)
            if p not in self.seen:
                self.fail(el, f"<{_local(el.tag)}> is not supported by pyhv here "
                              f"{_hint(el)}".rstrip())
            for name in el.attrib:
                if (p, name) not in self.seen_attrs:
                    self.fail(el, f"attribute {_local(name)}={el.get(name)!r} of "
                                  f"<{_local(el.tag)}> is not supported by pyhv")

    # ---- the domain ----------------------------------------------------------
    def map(self) -> VmConfig:
        root = self.mark(self.root)
        dtype = self.attr(root, "type")
        if dtype != "kvm":
            self.fail(root, f"domain type {dtype!r} is not supported: pyhv runs guests "
                            "with KVM (type='kvm')")
        self.attr(root, "id")  # a running domain's id: informational
        for el in root:
            if _is_element(el) and el.tag in _HARMLESS_TOP:
                self.ignore(el)
        name_el = self.child(root, "name")
        name = self.text(name_el) if name_el is not None else "pyhv"
        uuid = None
        uuid_el = self.child(root, "uuid")
        if uuid_el is not None:
            try:
                uuid = str(uuidlib.UUID(self.text(uuid_el)))
            except ValueError:
                self.fail(uuid_el, f"{self.text(uuid_el)!r} is not a UUID")
        max_mem = root.find("maxMemory")
        if max_mem is not None:
            self.fail(max_mem, "memory hotplug is not supported (remove <maxMemory>; "
                               "set <memory> to the guest's RAM)")
        memory, current = self.memory(root)
        backing, shared = self.memory_backing(root)
        vcpus, max_vcpus = self.vcpu(root)
        cputune = self.cputune(root, max_vcpus or vcpus)
        for kind, tags in (("memory", ("memoryBacking", "currentMemory", "memory")),
                           ("vcpu", ("vcpu",)), ("cpu", ("cpu",)),
                           ("features", ("features",)), ("clock", ("clock",)),
                           ("on_poweroff", ("on_poweroff",)), ("on_crash", ("on_crash",)),
                           ("on_reboot", ("on_reboot",))):
            for tag in tags:
                self.origin(kind, 0, root.find(tag))
            self.origin(kind, 0, root)
        os_el = root.find("os")
        if os_el is None:
            self.fail(root, "<os> is missing: pyhv boots a kernel directly (<os><kernel>)")
        boot, machine, boot_order = self.os(self.mark(os_el))
        cpu = self.cpu(root)
        numa = self.numa(root)
        # a cell with memAccess='shared' (vhost-user's need): guest RAM is one backing
        shared = shared or any(c.mem_access == "shared" for c in numa)
        numatune = self.numatune(root)
        features = self.features(root)
        clock = self.clock(root)
        smbios = self.smbios(root, os_el, uuid)
        actions = {}
        for tag, allowed in (("on_poweroff", ("destroy", "restart", "preserve")),
                             ("on_reboot", ("restart", "destroy")),
                             ("on_crash", ("destroy", "restart", "preserve"))):
            el = self.child(root, tag)
            if el is not None:
                value = self.text(el)
                if value not in allowed:
                    self.fail(el, f"{value!r} is not supported (supported: {', '.join(allowed)})")
                actions[tag] = value
        devices = root.find("devices")
        dev = _Devices()
        if devices is not None:
            self.devices(self.mark(devices), dev, machine)
        self.leftovers()
        try:
            return VmConfig(
                boot=boot, name=name, uuid=uuid, memory=memory, vcpus=vcpus,
                serial=dev.com1 if dev.com1 is not None else SerialConfig("null"),
                on_reboot=actions.get("on_reboot", "restart"),  # type: ignore[arg-type]
                shared_memory=shared, machine=machine, current_memory=current,
                memory_backing=backing, max_vcpus=max_vcpus, cpu=cpu, features=features,
                clock=clock, numa=numa, numatune=numatune, cputune=cputune,
                on_poweroff=actions.get("on_poweroff", "destroy"),  # type: ignore[arg-type]
                on_crash=actions.get("on_crash", "destroy"),  # type: ignore[arg-type]
                boot_order=boot_order, emulator=dev.emulator, disks=tuple(dev.disks),
                filesystems=tuple(dev.filesystems), nets=tuple(dev.nets),
                extra_serials=tuple(dev.extra_serials), channels=tuple(dev.channels),
                rngs=tuple(dev.rngs), balloon=dev.balloon,
                controllers=tuple(dev.controllers), smbios=smbios,
            )
        except ConfigError as e:
            self.fail(root, str(e))

    def memory(self, root: Any) -> tuple[int, Optional[int]]:
        mem_el = self.child(root, "memory")
        cur_el = self.child(root, "currentMemory")
        if mem_el is None and cur_el is None:
            self.fail(root, "<memory> is missing")
        memory = current = None
        if mem_el is not None:
            self.attr(mem_el, "dumpCore")  # host core dumps: not guest-visible
            memory = self.size(mem_el, "memory")
        if cur_el is not None:
            current = self.size(cur_el, "currentMemory")
        if memory is None:
            memory = current
        assert memory is not None
        if memory % 4096:
            self.fail(mem_el if mem_el is not None else cur_el,
                      f"{memory} bytes is not a multiple of 4 KiB")
        if current is not None and current > memory:
            self.fail(cur_el, "currentMemory is larger than memory")
        if current == memory or current is None:
            return memory, None
        if current % 4096:
            self.fail(cur_el, f"{current} bytes is not a multiple of 4 KiB")
        return memory, current

    def memory_backing(self, root: Any) -> tuple[MemoryBackingConfig, bool]:
        mb = self.child(root, "memoryBacking")
        if mb is None:
            return MemoryBackingConfig(), False
        hugepages = False
        size = None
        hp = self.child(mb, "hugepages")
        if hp is not None:
            hugepages = True
            pages = self.children(hp, "page")
            if len(pages) > 1:
                self.fail(pages[1], "one hugepage size for all memory is supported")
            if pages:
                page = pages[0]
                if self.attr(page, "nodeset") is not None:
                    self.fail(page, "per-NUMA-node hugepages are not supported")
                unit = self.attr(page, "unit", "KiB") or "KiB"
                scale = _UNITS.get(unit.lower())
                if scale is None:
                    self.fail(page, f"unknown unit {unit!r}")
                size = self.integer(page, self.attr(page, "size"), "page size", 1) * scale
        merge = self.child(mb, "nosharepages") is None  # KSM opt-out
        src = self.child(mb, "source")
        source: MemorySource = "anonymous"
        if src is not None:
            source = cast(MemorySource, self.choice(src, "type", ("anonymous", "memfd", "file"),
                                                    "anonymous", "memory source")
                          or "anonymous")
        shared = False
        acc = self.child(mb, "access")
        if acc is not None:
            shared = self.choice(acc, "mode", ("shared", "private"), "private",
                                 "access mode") == "shared"
        locked = self.child(mb, "locked") is not None
        discard = self.child(mb, "discard") is not None
        alloc = mb.find("allocation")
        mode = None
        if alloc is not None:
            self.mark(alloc)
            mode = self.choice(alloc, "mode", ("immediate", "ondemand"), None,
                               "allocation mode")
            if self.attr(alloc, "threads") is not None:
                self.integer(alloc, alloc.get("threads"), "allocation threads", 1)
        # hugetlb mappings are reserved whole at start anyway (no MAP_NORESERVE)
        prealloc = mode == "immediate"
        try:
            return MemoryBackingConfig(source, hugepages, size, locked, discard, merge=merge,
                                       prealloc=prealloc), shared
        except ConfigError as e:
            self.fail(mb, str(e))

    def cpuset(self, el: Any, name: str) -> Optional[tuple[int, ...]]:
        text = self.attr(el, name)
        if text is None:
            return None
        try:
            return parse_cpuset(text, name)
        except ConfigError as e:
            self.fail(el, str(e))

    def sched(self, el: Any, what: str, vcpus: tuple[int, ...] = ()) -> SchedConfig:
        policy = self.choice(el, "scheduler", ("fifo", "rr", "batch", "idle", "other"), None,
                             f"{what} scheduler")
        if policy is None:
            self.fail(el, f"<{what}> needs a scheduler (fifo, rr, batch, idle, other)")
        prio = self.attr(el, "priority")
        try:
            return SchedConfig(cast(SchedPolicy, policy),
                               self.integer(el, prio, "priority") if prio is not None
                               else None, vcpus)
        except ConfigError as e:
            self.fail(el, str(e))

    def cputune(self, root: Any, total_vcpus: int) -> CpuTuneConfig:
        """``<vcpu cpuset>`` (read by :meth:`vcpu`) and ``<cputune>``: host CPUs and
        scheduling of the vCPU and emulator threads."""
        el = self.child(root, "cputune")
        default = self.vcpu_cpuset
        if el is None:
            return CpuTuneConfig(cpuset=default)
        pins: list[tuple[int, tuple[int, ...]]] = []
        for pin in self.children(el, "vcpupin"):
            vcpu = self.integer(pin, self.attr(pin, "vcpu"), "vcpupin vcpu")
            if vcpu >= total_vcpus:
                self.fail(pin, f"vcpupin vcpu {vcpu}: the domain has {total_vcpus} vCPUs")
            if any(v == vcpu for v, _ in pins):
                self.fail(pin, f"vcpupin vcpu {vcpu} is pinned twice")
            cpus = self.cpuset(pin, "cpuset")
            if cpus is None:
                self.fail(pin, "<vcpupin> needs a cpuset")
            pins.append((vcpu, cpus))
        emulator = None
        epin = self.child(el, "emulatorpin")
        if epin is not None:
            emulator = self.cpuset(epin, "cpuset")
            if emulator is None:
                self.fail(epin, "<emulatorpin> needs a cpuset")
        for tag in ("iothreadpin", "iothreadsched"):
            io = el.find(tag)
            if io is not None:
                self.fail(io, f"<{tag}>: the domain has no I/O threads (pyhv does not "
                              "build <iothreads>)")
        scheds = []
        for vs in self.children(el, "vcpusched"):
            text = self.attr(vs, "vcpus")
            try:
                which = parse_cpuset(text, "vcpusched vcpus") if text is not None \
                    else tuple(range(total_vcpus))
            except ConfigError as e:
                self.fail(vs, str(e))
            if max(which) >= total_vcpus:
                self.fail(vs, f"vcpusched vcpus {text}: the domain has {total_vcpus} vCPUs")
            scheds.append(self.sched(vs, "vcpusched", which))
        esched_el = self.child(el, "emulatorsched")
        esched = self.sched(esched_el, "emulatorsched") if esched_el is not None else None
        shares = el.find("shares")
        if shares is not None:
            # a relative weight (what OpenStack Nova always writes): nothing to enforce
            # without contention's arbiter, the cgroup libvirtd makes
            self.mark(shares)
            self.notes.append(f"{self.path(shares)}: a CPU weight needs cgroups, which "
                              "pyhv run does not use (libvirtd applies it itself): not "
                              "applied")
        for tag in ("period", "quota", "global_period", "global_quota",
                    "emulator_period", "emulator_quota", "iothread_period", "iothread_quota"):
            sub = el.find(tag)
            if sub is not None:
                self.fail(sub, f"<{tag}>: CPU bandwidth control needs cgroups, which pyhv "
                               "run does not use (libvirtd applies it itself)")
        return CpuTuneConfig(cpuset=default, vcpupin=tuple(pins), emulatorpin=emulator,
                             vcpusched=tuple(scheds), emulatorsched=esched)

    def vcpu(self, root: Any) -> tuple[int, Optional[int]]:
        el = self.child(root, "vcpu")
        if el is None:
            return 1, None
        self.choice(el, "placement", ("static", "auto"), "static", "vcpu placement")
        self.vcpu_cpuset = self.cpuset(el, "cpuset")
        count = self.integer(el, self.text(el), "vcpu count", 1)
        current = self.attr(el, "current")
        if current is None:
            return count, None
        online = self.integer(el, current, "current vcpus", 1)
        if online > count:
            self.fail(el, f"current {online} is more than the {count} vCPUs")
        return (online, count) if online != count else (count, None)

    def os(self, os_el: Any) -> tuple[KernelBoot, str, tuple[str, ...]]:
        if self.attr(os_el, "firmware") is not None:
            self.fail(os_el, "firmware boot is not supported: pyhv boots a kernel directly "
                             "(<kernel>, <initrd>, <cmdline>)")
        type_el = os_el.find("type")
        if type_el is None:
            self.fail(os_el, "<type> is missing (supported: <type>hvm</type>)")
        self.mark(type_el)
        if self.text(type_el) != "hvm":
            self.fail(type_el, f"{self.text(type_el)!r} is not supported (supported: hvm)")
        self.choice(type_el, "arch", ("x86_64",), "x86_64", "arch")
        machine = self.attr(type_el, "machine", "pc") or "pc"
        if machine_family(machine) is None:
            self.fail(type_el, f"machine {machine!r} is not supported (supported: pc, q35 "
                               "and their versions, e.g. pc-i440fx-7.2, pc-q35-7.2)")
        for tag in ("loader", "nvram"):
            el = os_el.find(tag)
            if el is not None:
                self.fail(el, f"<{tag}>: firmware is not supported yet: pyhv boots a "
                              "kernel directly (<kernel>, <initrd>, <cmdline>)")
        kernel_el = os_el.find("kernel")
        if kernel_el is None or not self.text(kernel_el):
            line = (kernel_el if kernel_el is not None else os_el).sourceline or 0
            raise DomainXmlError(
                f"{self.source}:{line}: {self.path(os_el)}/kernel: no kernel path: pyhv boots "
                "a kernel directly (add <kernel>PATH</kernel>; firmware boot is not supported)")
        self.mark(kernel_el)
        initrd = cmdline = None
        initrd_el = self.child(os_el, "initrd")
        if initrd_el is not None:
            initrd = self.text(initrd_el) or None
        cmdline_el = self.child(os_el, "cmdline")
        if cmdline_el is not None:
            cmdline = (cmdline_el.text or "").strip()
        order = []
        for b in self.children(os_el, "boot"):
            dev = self.choice(b, "dev", ("hd", "cdrom", "network", "fd"), None, "boot device")
            if dev is not None:
                order.append(dev)
        bm = os_el.find("bootmenu")
        if bm is not None:
            self.ignore(bm)  # firmware's menu: direct kernel boot has none
        for tag in ("bios", "dtb", "acpi", "init", "initarg", "initenv"):
            el = os_el.find(tag)
            if el is not None:
                self.fail(el, f"<{tag}> is not supported by pyhv")
        return KernelBoot(self.text(kernel_el), initrd, cmdline or ""), machine, tuple(order)

    def cpu(self, root: Any) -> CpuConfig:
        el = self.child(root, "cpu")
        if el is None:
            return CpuConfig()
        mode = self.choice(el, "mode", ("host-passthrough", "host-model", "maximum", "custom"),
                           "custom", "cpu mode") or "custom"
        self.choice(el, "match", ("exact", "minimum", "strict"), None, "cpu match")
        check = self.choice(el, "check", ("none", "partial", "full"), None, "cpu check")
        migratable = self.choice(el, "migratable", ("on", "off"), "on",
                                 "cpu migratable") != "off"
        model = None
        vendor_id = None
        model_el = self.child(el, "model")
        if model_el is not None:
            self.choice(model_el, "fallback", ("allow", "forbid"), None, "model fallback")
            vendor_id = self.attr(model_el, "vendor_id")
            if vendor_id is not None and len(vendor_id) != 12:
                self.fail(model_el, f"vendor_id {vendor_id!r} must be 12 characters")
            model = self.text(model_el) or None
        vendor = el.find("vendor")
        if vendor is not None:
            self.ignore(vendor)  # checked against the host by libvirt; not a guest change
        if mode == "custom" and model is None:
            if el.find("topology") is None and not el.findall("feature"):
                return CpuConfig()
            mode = "host-passthrough" if model is None and not el.findall("feature") \
                else mode
            if mode == "custom":
                self.fail(el, "custom cpu mode needs <model> (or use "
                              "mode='host-passthrough')")
        if mode != "custom" and model_el is not None and mode != "host-model":
            self.fail(model_el, f"<model> is only used with mode='custom' (mode is {mode!r})")
        if mode == "host-model":
            model = None
        topology = None
        topo = self.child(el, "topology")
        if topo is not None:
            counts = {}
            for part in ("sockets", "dies", "clusters", "cores", "threads"):
                value = self.attr(topo, part)
                counts[part] = 1 if value is None else self.integer(topo, value, part, 1)
            if counts["clusters"] != 1:
                self.fail(topo, "clusters are not supported (x86 has sockets, dies, cores, "
                                "threads)")
            topology = CpuTopology(counts["sockets"], counts["dies"], counts["cores"],
                                   counts["threads"])
        features = []
        for f in self.children(el, "feature"):
            name = self.attr(f, "name")
            if not name:
                self.fail(f, "a feature needs a name")
            policy = self.choice(f, "policy", ("require", "disable", "force", "forbid",
                                               "optional"), "require", "feature policy")
            features.append(CpuFeature(name, policy))  # type: ignore[arg-type]
        for tag in ("cache", "maxphysaddr"):
            sub = el.find(tag)
            if sub is not None:
                self.fail(sub, f"<cpu><{tag}> is not supported by pyhv")
        try:
            return CpuConfig(mode, model, topology, tuple(features),  # type: ignore[arg-type]
                             # libvirt's check only concerns a model's features
                             check=(check if mode in ("custom", "host-model") and check
                                    else "partial"),  # type: ignore[arg-type]
                             vendor=vendor_id, migratable=migratable)
        except ConfigError as e:
            self.fail(el, str(e))

    def numa(self, root: Any) -> tuple[NumaCell, ...]:
        """``<cpu><numa><cell>``: guest NUMA nodes (checked as a whole by VmConfig)."""
        cpu = root.find("cpu")
        el = cpu.find("numa") if cpu is not None else None
        if el is None:
            return ()
        self.mark(el)
        cells: list[NumaCell] = []
        for cell in self.children(el, "cell"):
            ident = self.integer(cell, self.attr(cell, "id", str(len(cells))), "cell id")
            text = self.attr(cell, "cpus")
            try:
                cpus = parse_cpuset(text, f"cell {ident} cpus") if text else ()
            except ConfigError as e:
                self.fail(cell, str(e))
            unit = self.attr(cell, "unit", "KiB") or "KiB"
            scale = _UNITS.get(unit.lower())
            if scale is None:
                self.fail(cell, f"unknown unit {unit!r} (KiB, MiB, GiB, bytes, ...)")
            memory = self.integer(cell, self.attr(cell, "memory"), f"cell {ident} memory", 1)
            access = self.choice(cell, "memAccess", ("shared", "private"), None, "memAccess")
            discard = self.choice(cell, "discard", ("yes", "no"), "no", "discard") == "yes"
            distances = []
            dist = self.child(cell, "distances")
            if dist is not None:
                for sib in self.children(dist, "sibling"):
                    distances.append((self.integer(sib, self.attr(sib, "id"), "sibling id"),
                                      self.integer(sib, self.attr(sib, "value"),
                                                   "sibling value", 10)))
            for tag in ("cache",):
                sub = cell.find(tag)
                if sub is not None:
                    self.fail(sub, "NUMA cell caches (HMAT) are not supported by pyhv")
            cells.append(NumaCell(ident, cpus, memory * scale, tuple(distances),
                                  access, discard))
        if not cells:
            self.fail(el, "<numa> needs at least one <cell>")
        return tuple(cells)

    def numatune(self, root: Any) -> Optional[NumaTune]:
        """``<numatune>``: host nodes for guest RAM, domain-wide and per cell."""
        el = self.child(root, "numatune")
        if el is None:
            return None
        modes = ("strict", "preferred", "interleave", "restrictive")
        mode, nodeset = "strict", None
        mem = self.child(el, "memory")
        if mem is not None:
            mode = self.choice(mem, "mode", modes, "strict", "numatune mode") or "strict"
            if self.attr(mem, "placement", "static") != "static":
                self.fail(mem, "placement='auto' needs numad; pyhv takes a static nodeset")
            text = self.attr(mem, "nodeset")
            if text is None:
                self.fail(mem, "numatune <memory> needs a nodeset")
            try:
                nodeset = parse_cpuset(text, "numatune nodeset")
            except ConfigError as e:
                self.fail(mem, str(e))
        memnodes = []
        for node in self.children(el, "memnode"):
            cell = self.integer(node, self.attr(node, "cellid"), "memnode cellid")
            nmode = self.choice(node, "mode", modes, "strict", "memnode mode") or "strict"
            text = self.attr(node, "nodeset")
            if text is None:
                self.fail(node, "<memnode> needs a nodeset")
            try:
                memnodes.append((cell, nmode, parse_cpuset(text, "memnode nodeset")))
            except ConfigError as e:
                self.fail(node, str(e))
        return NumaTune(mode, nodeset, tuple(memnodes))

    def features(self, root: Any) -> FeaturesConfig:
        el = self.child(root, "features")
        if el is None:
            # strictly, libvirt without <features> means no ACPI and no APIC; pyhv
            # takes a definition without the element as "the machine's defaults"
            self.notes.append("/domain/features is absent: pyhv's defaults (acpi, apic)")
            return FeaturesConfig()
        acpi = self.child(el, "acpi") is not None
        apic_el = self.child(el, "apic")
        if apic_el is not None:
            self.choice(apic_el, "eoi", ("on",), None, "apic eoi")
        pae = self.child(el, "pae") is not None
        pmu = None
        pmu_el = self.child(el, "pmu")
        if pmu_el is not None:
            pmu = self.onoff(pmu_el, "state", True)
        vmport = el.find("vmport")
        if vmport is not None:
            self.mark(vmport)
            self.choice(vmport, "state", ("off",), "on", "vmport state")
        vmci = el.find("vmcoreinfo")
        if vmci is not None:
            # OpenStack Nova adds it to every x86 guest
            self.mark(vmci)
            if self.onoff(vmci, "state", True):
                self.notes.append(f"{self.path(vmci)}: not built: pyhv has no fw_cfg, so "
                                  "the guest kernel's crash-dump notes have nowhere to go "
                                  "(nothing else changes)")
        kvm_hidden = False
        kvm_el = self.child(el, "kvm")
        if kvm_el is not None:
            hidden = self.child(kvm_el, "hidden")
            if hidden is not None:
                kvm_hidden = self.onoff(hidden, "state", False)
        return FeaturesConfig(acpi, apic_el is not None, pae, pmu, kvm_hidden)

    def smbios(self, root: Any, os_el: Any, uuid: Optional[str]) -> SmbiosConfig:
        """``<os><smbios mode>`` and ``<sysinfo type='smbios'>``."""
        mode_el = self.child(os_el, "smbios")
        mode = None
        if mode_el is not None:
            mode = self.choice(mode_el, "mode", ("emulate", "host", "sysinfo"), None,
                               "smbios mode")
            if mode is None:
                self.fail(mode_el, "missing attribute mode (emulate, host or sysinfo)")
        found: Optional[Any] = None
        for el in self.children(root, "sysinfo"):
            kind = self.attr(el, "type")
            if kind == "fwcfg":
                self.fail(el, "sysinfo type 'fwcfg' is not supported by pyhv (it has no "
                              "fw_cfg device; use type='smbios')")
            if kind != "smbios":
                self.fail(el, f"sysinfo type {kind!r} is not supported (supported: smbios)")
            if found is not None:
                self.fail(el, "more than one <sysinfo type='smbios'>")
            found = el
        fields: dict[str, Any] = {}
        if found is not None:
            tags = {"bios": "bios", "system": "system", "baseBoard": "baseboard",
                    "chassis": "chassis"}
            boards = []
            for sub in found:
                if not _is_element(sub):
                    continue
                tag = _local(sub.tag)
                if tag == "oemStrings":
                    self.mark(sub)
                    fields["oem_strings"] = tuple(
                        (e.text or "") for e in self.children(sub, "entry"))
                    continue
                if tag not in tags:
                    self.fail(sub, f"<{tag}> is not supported in <sysinfo> (supported: "
                                   "bios, system, baseBoard, chassis, oemStrings)")
                if tag != "baseBoard" and tags[tag] in fields:
                    self.fail(sub, f"more than one <{tag}>")
                self.mark(sub)
                kind = tags[tag]
                entries = []
                for e in self.children(sub, "entry"):
                    name = self.attr(e, "name")
                    if name is None:
                        self.fail(e, "missing attribute name")
                    entries.append((name, self.text(e)))
                unknown = [n for n, _v in entries if n not in SMBIOS_FIELDS[kind]]
                if unknown:
                    self.fail(sub, f"unknown entry name(s) {', '.join(unknown)} "
                                   f"(supported: {', '.join(SMBIOS_FIELDS[kind])})")
                if kind == "baseboard":
                    boards.append(tuple(entries))
                else:
                    fields[kind] = tuple(entries)
            fields["baseboards"] = tuple(boards)
            sys_uuid = dict(fields.get("system", ())).get("uuid")
            if sys_uuid is not None and uuid is not None:
                try:
                    same = uuidlib.UUID(sys_uuid) == uuidlib.UUID(uuid)
                except ValueError:
                    self.fail(found, f"system uuid {sys_uuid!r} is not a UUID")
                if not same:
                    self.fail(found, f"system uuid {sys_uuid} differs from the domain's "
                                     f"<uuid> {uuid}")
        if mode == "sysinfo" and found is None:
            self.fail(mode_el, "smbios mode 'sysinfo' needs a <sysinfo type='smbios'>")
        try:
            return SmbiosConfig(mode=mode, **fields)  # type: ignore[arg-type]
        except ConfigError as e:
            self.fail(found if found is not None else root, str(e))

    def clock(self, root: Any) -> ClockConfig:
        el = self.child(root, "clock")
        if el is None:
            return ClockConfig()
        offset = self.choice(el, "offset", ("utc", "localtime", "variable", "timezone"),
                             "utc", "clock offset") or "utc"
        adjustment = 0
        basis = "utc"
        zone = None
        adj = self.attr(el, "adjustment")
        if offset == "variable":
            adjustment = self.integer(el, adj or "0", "adjustment", -(1 << 62))
            basis = self.choice(el, "basis", ("utc", "localtime"), "utc", "basis") or "utc"
        elif offset in ("utc", "localtime") and adj not in (None, "reset"):
            self.fail(el, "an adjustment needs offset='variable'")
        elif offset == "timezone":
            zone = self.attr(el, "timezone")
            if not zone:
                self.fail(el, "offset='timezone' needs a timezone attribute")
        lost = "discard"
        for timer in self.children(el, "timer"):
            name = self.attr(timer, "name")
            present = self.attr(timer, "present", "yes")
            if name == "rtc" and present != "no":
                policy = self.choice(timer, "tickpolicy", ("delay", "catchup"), None,
                                     "rtc tickpolicy")
                if policy == "catchup":
                    lost = "slew"
                self.choice(timer, "track", ("boot", "guest", "wall", "realtime"), None,
                            "rtc track")
                self.ignore(timer)
                continue
            if name in _PROVIDED_TIMERS or present == "no":
                self.ignore(timer)
                continue
            self.fail(timer, f"timer {name!r} is not provided by pyhv (it has rtc, pit, "
                             "kvmclock; others only with present='no')")
        try:
            return ClockConfig(offset, adjustment, basis, zone,  # type: ignore[arg-type]
                               lost)  # type: ignore[arg-type]
        except ConfigError as e:
            self.fail(el, str(e))

    # ---- devices -------------------------------------------------------------
    def devices(self, devices: Any, dev: "_Devices", machine: str) -> None:
        family = machine_family(machine)
        serials: list[Any] = []
        consoles: list[Any] = []
        controllers: list[Any] = []
        for el in devices:
            if not _is_element(el):
                continue
            tag = el.tag
            self.mark(el)
            if tag == "emulator":
                dev.emulator = self.text(el) or None
            elif tag == "disk":
                self.origin("disk", len(dev.disks), el)
                dev.disks.append(self.placed(el, self.disk(el)))
            elif tag == "filesystem":
                self.origin("filesystem", len(dev.filesystems), el)
                dev.filesystems.append(self.placed(el, self.filesystem(el)))
            elif tag == "interface":
                self.origin("net", len(dev.nets), el)
                dev.nets.append(self.placed(el, self.interface(el)))
            elif tag == "serial":
                serials.append(el)
            elif tag == "console":
                consoles.append(el)
            elif tag == "channel":
                self.origin("channel", len(dev.channels), el)
                dev.channels.append(self.channel(el))
            elif tag == "rng":
                self.origin("rng", len(dev.rngs), el)
                dev.rngs.append(self.placed(el, self.rng(el)))
            elif tag == "memballoon":
                self.origin("balloon", 0, el)
                balloon = self.memballoon(el, dev)
                dev.balloon = self.placed(el, balloon) if balloon is not None else None
            elif tag == "controller":
                controllers.append(el)
            elif tag == "input":
                self.input(el)
            elif tag == "video":
                model = el.find("model")
                if model is None or model.get("type") != "none":
                    self.fail(el, "video devices are not supported (pyhv has no display; "
                                  "remove <video> or use <model type='none'/>)")
                self.ignore(el)
            elif tag == "audio":
                if el.get("type") != "none":
                    self.fail(el, "audio backends are not supported (only type='none')")
                self.ignore(el)
            elif tag in ("graphics", "sound"):
                self.fail(el, f"<{tag}> is not supported: pyhv has no display or sound "
                              "(use a serial console)")
            elif tag in ("watchdog", "tpm", "hostdev", "smartcard", "redirdev", "redirfilter",
                         "hub", "panic", "shmem", "iommu", "vsock", "memory", "crypto",
                         "parallel", "lease", "nvram"):
                self.fail(el, f"<{tag}> devices are not supported by pyhv")
            else:
                self.fail(el, f"<{tag}> is not supported by pyhv")
        self.chardevs(serials, consoles, dev)
        for el in controllers:
            self.controller(el, dev, family)

    def common(self, el: Any) -> None:
        """Accept what libvirt adds to every device: its alias and an address (a PCI
        device's are read by :meth:`placed`)."""
        for tag in ("alias", "address"):
            for sub in el.findall(tag):
                self.ignore(sub)

    def alias(self, el: Any) -> Optional[str]:
        alias = el.find("alias")
        return (alias.get("name") or None) if alias is not None else None

    def port_address(self, el: Any) -> tuple[int, Optional[int]]:
        """A virtio console's or channel's ``<address type='virtio-serial'>``: the
        controller's index and the port number (None: placed by pyhv)."""
        addr = el.find("address")
        if addr is None:
            return 0, None
        if addr.get("type") != "virtio-serial":
            self.fail(addr, f"address type {addr.get('type')!r} is not a virtio-serial "
                            "port's (type='virtio-serial')")
        if self.integer(addr, addr.get("bus", "0"), "virtio-serial bus") != 0:
            self.fail(addr, "a virtio-serial controller has one bus (bus='0')")
        controller = self.integer(addr, addr.get("controller", "0"), "controller")
        port = addr.get("port")
        return controller, (self.integer(addr, port, "port") if port is not None else None)

    def placed(self, el: Any, record: _P) -> _P:
        """``record`` with the element's alias and PCI address, when it has them."""
        alias = el.find("alias")
        ident = alias.get("name") if alias is not None else None
        return replace(record, id=ident or None, address=self.pci_address(el))

    def pci_address(self, el: Any) -> Optional[PciAddress]:
        addr = el.find("address")
        if addr is None:
            return None
        kind = addr.get("type")
        if kind != "pci":
            self.fail(addr, f"address type {kind!r} is not supported for this device "
                            "(pyhv puts it on PCI: type='pci')")
        values = {}
        for name in ("domain", "bus", "slot", "function"):
            values[name] = self.integer(addr, addr.get(name, "0"), f"PCI {name}")
        try:
            return PciAddress(values["bus"], values["slot"], values["function"],
                              values["domain"], addr.get("multifunction") == "on")
        except ConfigError as e:
            self.fail(addr, str(e))

    def disk(self, el: Any) -> DiskConfig:
        self.common(el)
        kind = self.choice(el, "type", ("file", "block", "vhostuser"), "file", "disk type")
        self.choice(el, "device", ("disk",), "disk", "disk device")
        self.attr(el, "snapshot")
        drv = self.child(el, "driver")
        fmt = "raw"
        cache = io = discard = dz = policy = rpolicy = None
        queues = 1
        if drv is not None:
            self.choice(drv, "name", ("qemu",), "qemu", "driver name")
            fmt = self.attr(drv, "type", "raw") or "raw"
            if fmt not in ("raw", "qcow2"):
                self.fail(drv, f"image format {fmt!r} is not supported (supported: raw, "
                               "qcow2)")
            cache = self.choice(drv, "cache", ("default", "none", "writethrough", "writeback",
                                               "directsync", "unsafe"), None, "cache mode")
            io = self.choice(drv, "io", ("native", "threads", "io_uring"), None, "io mode")
            discard = self.choice(drv, "discard", ("unmap", "ignore"), None, "discard")
            dz = self.choice(drv, "detect_zeroes", ("off", "on", "unmap"), None,
                             "detect_zeroes")
            if self.attr(drv, "queues") is not None:
                queues = self.integer(drv, self.attr(drv, "queues"), "queues", 1)
            policy = self.choice(drv, "error_policy", ("stop", "report", "ignore", "enospace"),
                                 None, "error_policy")
            rpolicy = self.choice(drv, "rerror_policy", ("stop", "report", "ignore"), None,
                                  "rerror_policy")
        src = self.child(el, "source")
        reconnect = None
        if kind == "vhostuser":
            if src is None or not self.attr(src, "path"):
                self.fail(src if src is not None else el,
                          "a vhostuser disk needs <source type='unix' path='SOCKET'/>")
            assert src is not None
            self.choice(src, "type", ("unix",), "unix", "vhostuser source type")
            if fmt != "raw":
                self.fail(drv, "a vhostuser disk's driver type is raw (the backend serves "
                               "the image)")
            reconnect = self.reconnect(src)
        attr = "file" if kind == "file" else "path" if kind == "vhostuser" else "dev"
        path = self.attr(src, attr) if src is not None else None
        if not path:
            self.fail(src if src is not None else el,
                      f"a {kind} disk needs <source {attr}='PATH'/> (empty drives are not "
                      "supported)")
        assert src is not None
        self.attr(src, "index")  # live XML's block node index
        backing = self.backing_store(el, fmt)
        tgt = self.child(el, "target")
        if tgt is None:
            self.fail(el, "<target dev='vda' bus='virtio'/> is missing")
        target = self.attr(tgt, "dev")
        self.choice(tgt, "bus", ("virtio",), "virtio", "disk bus")
        ro = self.child(el, "readonly") is not None
        shareable = self.child(el, "shareable") is not None
        serial_el = self.child(el, "serial")
        serial = self.text(serial_el) if serial_el is not None else None
        boot = self.child(el, "boot")
        order = None
        if boot is not None:
            order = self.integer(boot, self.attr(boot, "order"), "boot order", 1)
        try:
            return DiskConfig(path, target, fmt, kind, "virtio", ro, shareable,  # type: ignore
                              cache, io, discard, dz, serial, order,  # type: ignore[arg-type]
                              queues, error_policy=policy,  # type: ignore[arg-type]
                              rerror_policy=rpolicy,  # type: ignore[arg-type]
                              backing=backing, reconnect=reconnect)
        except ConfigError as e:
            self.fail(el, str(e))

    def reconnect(self, src: Any) -> Optional[int]:
        """A vhost-user ``<source>``'s ``<reconnect enabled='yes' timeout=N/>``: N
        (libvirt's default 10), or None when absent or disabled."""
        rc = self.child(src, "reconnect")
        if rc is None or self.choice(rc, "enabled", ("yes", "no"), "no", "reconnect") != "yes":
            return None
        return self.integer(rc, self.attr(rc, "timeout") or "10", "reconnect timeout", 1)

    def backing_store(self, disk: Any, fmt: str) -> Optional[tuple[BackingFile, ...]]:
        """A disk's ``<backingStore>`` chain: None when absent (each image's header
        names its backing file), the chain when it ends in an empty
        ``<backingStore/>``.  A chain given only in part also leaves it to the
        headers (libvirt probes the rest the same way)."""
        cur = disk.find("backingStore")
        if cur is None:
            return None
        chain: list[BackingFile] = []
        while True:
            self.mark(cur)
            if not len(cur) and not cur.attrib:
                return tuple(chain)
            if fmt != "qcow2":
                self.fail(cur, f"a {fmt} image has no backing file (only qcow2 images do)")
            self.attr(cur, "index")
            self.choice(cur, "type", ("file",), "file", "backing store type")
            fmt_el = self.child(cur, "format")
            bfmt = self.choice(fmt_el, "type", ("raw", "qcow2"), None, "backing format") \
                if fmt_el is not None else None
            if bfmt is None:
                self.fail(cur, "<format type='raw|qcow2'/> is missing")
            src = self.child(cur, "source")
            path = self.attr(src, "file") if src is not None else None
            if src is None or not path:
                self.fail(cur, "<source file='PATH'/> is missing")
            self.attr(src, "index")
            try:
                chain.append(BackingFile(path, bfmt))  # type: ignore[arg-type]
            except ConfigError as e:
                self.fail(cur, str(e))
            fmt = bfmt
            nxt = cur.find("backingStore")
            if nxt is None:
                return None
            cur = nxt

    def filesystem(self, el: Any) -> FilesystemConfig:
        self.common(el)
        self.choice(el, "type", ("mount",), "mount", "filesystem type")
        mode = self.choice(el, "accessmode", ("passthrough", "mapped", "squash"),
                           "passthrough", "accessmode") or "passthrough"
        driver = "9p"
        drv = self.child(el, "driver")
        if drv is not None:
            kind = self.choice(drv, "type", ("path", "virtiofs"), "path", "driver type")
            driver = "virtiofs" if kind == "virtiofs" else "9p"
            self.choice(drv, "wrpolicy", ("immediate",), None, "wrpolicy")
            if self.attr(drv, "queue") is not None:
                self.integer(drv, drv.get("queue"), "queue size", 1)
        if driver == "virtiofs":
            for tag in ("binary",):
                sub = el.find(tag)
                if sub is not None:
                    self.fail(sub, "virtiofsd options are not supported (pyhv serves "
                                   "virtio-fs itself)")
        src = self.child(el, "source")
        src_path = (self.attr(src, "dir") or self.attr(src, "socket")) if src is not None \
            else None
        if not src_path:
            self.fail(src if src is not None else el, "<source dir='/host/dir'/> is missing")
        tgt = self.child(el, "target")
        mount_tag = self.attr(tgt, "dir") if tgt is not None else None
        if not mount_tag:
            self.fail(tgt if tgt is not None else el, "<target dir='TAG'/> is missing")
        ro = self.child(el, "readonly") is not None
        try:
            fs = FilesystemConfig(src_path, mount_tag, driver, mode, ro)  # type: ignore[arg-type]
            return self.placed(el, fs)
        except ConfigError as e:
            self.fail(el, str(e))

    def interface(self, el: Any) -> NetConfig:
        self.common(el)
        kind = self.choice(el, "type", ("ethernet", "network", "bridge", "vhostuser"), None,
                           "interface type")
        mac = None
        mac_el = self.child(el, "mac")
        if mac_el is not None:
            mac = (self.attr(mac_el, "address") or "").lower() or None
        model_el = self.child(el, "model")
        model = self.attr(model_el, "type") if model_el is not None else None
        if model != "virtio":
            self.fail(model_el if model_el is not None else el,
                      f"NIC model {model!r} is not supported (supported: "
                      "<model type='virtio'/>)")
        tgt = el.find("target")
        ifname = None
        if tgt is not None:
            self.mark(tgt)
            ifname = self.attr(tgt, "dev")
            self.choice(tgt, "managed", ("yes", "no"), None, "managed")
        src = self.child(el, "source")
        bridge = network = socket = None
        server = False
        reconnect: Optional[int] = None
        if kind == "network":
            network = self.attr(src, "network") if src is not None else None
            if src is not None:
                self.attr(src, "portid")
                self.attr(src, "bridge")  # live XML: the network's bridge
            if not network:
                self.fail(src if src is not None else el, "<source network='NAME'/> is missing")
        elif kind == "bridge":
            bridge = self.attr(src, "bridge") if src is not None else None
            if not bridge:
                self.fail(src if src is not None else el, "<source bridge='NAME'/> is missing")
        elif kind == "vhostuser":
            if src is None or self.attr(src, "type", "unix") != "unix":
                self.fail(src if src is not None else el,
                          "vhost-user needs <source type='unix' path='...' mode='...'/>")
            socket = self.attr(src, "path")
            server = self.choice(src, "mode", ("server", "client"), "client",
                                 "vhost-user mode") == "server"
            reconnect = self.reconnect(src)
        elif src is not None:
            self.fail(src, "an ethernet interface has no <source> (name the tap with "
                           "<target dev='tap0'/>)")
        drv = el.find("driver")
        queues = 1
        vhost = None
        if drv is not None:
            self.mark(drv)
            name = self.choice(drv, "name", ("vhost", "qemu"), None, "driver name")
            vhost = None if name is None else name == "vhost"
            if self.attr(drv, "queues") is not None:
                queues = self.integer(drv, drv.get("queues"), "queues", 1)
        link = el.find("link")
        link_up = True
        if link is not None:
            self.mark(link)
            link_up = self.choice(link, "state", ("up", "down"), "up", "link state") == "up"
        mtu = None
        mtu_el = el.find("mtu")
        if mtu_el is not None:
            self.mark(mtu_el)
            mtu = self.integer(mtu_el, self.attr(mtu_el, "size"), "mtu size", 1)
        try:
            return NetConfig("vhost-user" if kind == "vhostuser" else "tap", ifname,
                             bridge=bridge, network=network, socket=socket, server=server,
                             mac=mac, queues=queues, mtu=mtu, link_up=link_up,
                             reconnect=reconnect,
                             vhost=vhost if kind != "vhostuser" else None)
        except ConfigError as e:
            self.fail(el, str(e))

    def chardev(self, el: Any, what: str) -> SerialConfig:
        """The host end of a serial, console or channel element, with its log."""
        log = self.child(el, "log")
        backend = self._chardev_backend(el, what)
        if log is None:
            return backend
        path = self.attr(log, "file")
        if not path:
            self.fail(log, "<log> needs file='...'")
        return replace(backend, log_path=path, log_append=self.onoff(log, "append"))

    def _chardev_backend(self, el: Any, what: str) -> SerialConfig:
        kind = self.attr(el, "type", "pty") or "pty"
        if kind not in ("pty", "file", "stdio", "unix", "null", "tcp"):
            self.fail(el, f"{what} type {kind!r} is not supported (supported: "
                          f"{_CHARDEV_TYPES})")
        self.attr(el, "tty")  # live XML: the pty's path
        sources = el.findall("source")
        if len(sources) > 1:
            self.fail(sources[1], "one <source> is supported")
        src = self.mark(sources[0]) if sources else None
        if kind == "pty":
            if src is not None:
                self.attr(src, "path")  # the pty's path in live XML
            return SerialConfig("pty")
        if kind in ("stdio", "null"):
            return SerialConfig(kind)  # type: ignore[arg-type]
        if kind == "file":
            path = self.attr(src, "path") if src is not None else None
            if not path:
                self.fail(src if src is not None else el, "a file needs <source path='...'/>")
            append = self.onoff(src, "append")
            return SerialConfig("file", path, append=append)
        if kind == "unix":
            path = self.attr(src, "path") if src is not None else None
            mode = self.choice(src, "mode", ("bind", "connect"), "connect", "mode") \
                if src is not None else "bind"
            return SerialConfig("unix", path or None, server=(mode == "bind"))
        # tcp
        if src is None:
            self.fail(el, "tcp needs <source mode='bind|connect' host='...' service='PORT'/>")
        mode = self.choice(src, "mode", ("bind", "connect"), "connect", "mode")
        host = self.attr(src, "host")
        port = self.integer(src, self.attr(src, "service"), "service (port)")
        self.choice(src, "tls", ("no",), None, "tls")
        proto = el.find("protocol")
        if proto is not None:
            self.mark(proto)
            self.choice(proto, "type", ("raw",), "raw", "protocol")
        try:
            return SerialConfig("tcp", host=host, port=port, server=(mode == "bind"))
        except ConfigError as e:
            self.fail(src, str(e))

    def chardevs(self, serials: list[Any], consoles: list[Any], dev: "_Devices") -> None:
        used: set[int] = set()
        isa: list[tuple[int, Any, SerialConfig]] = []
        for el in serials:
            self.common(el)
            tgt = el.find("target")
            port = None
            if tgt is not None:
                self.mark(tgt)
                self.choice(tgt, "type", ("isa-serial",), "isa-serial", "serial target type")
                if self.attr(tgt, "port") is not None:
                    port = self.integer(tgt, tgt.get("port"), "port")
                model = tgt.find("model")
                if model is not None:
                    self.mark(model)
                    self.choice(model, "name", ("isa-serial",), "isa-serial", "serial model")
            if port is None:
                port = next(i for i in range(5) if i not in used)
            if port in used or port > 3:
                self.fail(tgt if tgt is not None else el,
                          f"serial port {port}: isa-serial ports are 0-3, each once")
            used.add(port)
            isa.append((port, el, self.chardev(el, "serial")))
        virtio_index = 0
        virtio: list[tuple[Any, SerialPortConfig]] = []
        for i, el in enumerate(consoles):
            self.common(el)
            tgt = el.find("target")
            ttype = "serial"
            if tgt is not None:
                self.mark(tgt)
                ttype = self.choice(tgt, "type", ("serial", "virtio"), "serial",
                                    "console target type") or "serial"
                self.attr(tgt, "port")
            if ttype == "serial":
                if i != 0:
                    self.fail(el, "only the first console can be a serial port (use "
                                  "<target type='virtio'/>)")
                if serials:
                    # libvirt's alias of the first serial port: its settings are the port's
                    self.ignore(el)
                    continue
                used.add(0)
                isa.append((0, el, self.chardev(el, "console")))
                continue
            chardev = self.chardev(el, "console")
            controller, port = self.port_address(el)
            try:
                virtio.append((el, SerialPortConfig(chardev, "virtio", virtio_index,
                                                    controller, port, self.alias(el))))
            except ConfigError as e:
                self.fail(el, str(e))
            virtio_index += 1
        for port, el, chardev in sorted(isa, key=lambda t: t[0]):
            if port == 0:
                self.origin("com1", 0, el)
                dev.com1 = chardev
            else:
                self.origin("serial", len(dev.extra_serials), el)
                dev.extra_serials.append(SerialPortConfig(chardev, "isa-serial", port))
        # canonical order: COM2-COM4, then virtio consoles hvc0, hvc1, ...
        for el, port_cfg in virtio:
            self.origin("serial", len(dev.extra_serials), el)
            dev.extra_serials.append(port_cfg)

    def channel(self, el: Any) -> ChannelConfig:
        self.common(el)
        tgt = self.child(el, "target")
        if tgt is None:
            self.fail(el, "<target type='virtio' name='...'/> is missing")
        self.choice(tgt, "type", ("virtio",), None, "channel target type")
        self.attr(tgt, "state")  # live XML: whether the guest opened it
        name = self.attr(tgt, "name")
        if not name:
            self.fail(tgt, "a virtio channel needs a name")
        chardev = self.chardev(el, "channel")
        controller, port = self.port_address(el)
        try:
            return ChannelConfig(name, chardev, controller, port, self.alias(el))
        except ConfigError as e:
            self.fail(el, str(e))

    def rng(self, el: Any) -> RngConfig:
        self.common(el)
        if el.get("model") == "virtio-transitional":
            self.fail(el, "model 'virtio-transitional' is not supported: pyhv's virtio "
                          "devices are modern only (use 'virtio' or "
                          "'virtio-non-transitional')")
        self.choice(el, "model", ("virtio", "virtio-non-transitional"), "virtio",
                    "rng model")
        back = self.child(el, "backend")
        if back is None:
            self.fail(el, "<backend model='random'>/dev/urandom</backend> is missing")
        self.choice(back, "model", ("random",), "random", "rng backend")
        source = self.text(back) or "/dev/urandom"
        if source not in ("/dev/urandom", "/dev/random"):
            self.fail(back, f"{source!r} is not supported (supported: /dev/urandom, "
                            "/dev/random)")
        rate_bytes = period = None
        rate = self.child(el, "rate")
        if rate is not None:
            rate_bytes = self.integer(rate, self.attr(rate, "bytes"), "rate bytes", 1)
            if self.attr(rate, "period") is not None:
                period = self.integer(rate, rate.get("period"), "rate period", 1)
        drv = el.find("driver")
        if drv is not None:
            self.fail(drv, "virtio driver options are not supported")
        return RngConfig(source, rate_bytes, period)

    def memballoon(self, el: Any, dev: "_Devices") -> Optional[BalloonConfig]:
        self.common(el)
        model = self.choice(el, "model", ("virtio", "none"), None, "memballoon model")
        if model == "none":
            return None
        autodeflate = self.onoff(el, "autodeflate")
        reporting = self.onoff(el, "freePageReporting")
        stats = self.child(el, "stats")
        period = None
        if stats is not None:
            period = self.integer(stats, self.attr(stats, "period"), "stats period")
        drv = el.find("driver")
        if drv is not None:
            self.fail(drv, "virtio driver options are not supported")
        return BalloonConfig(period, autodeflate, reporting)

    def input(self, el: Any) -> None:
        kind = el.get("type")
        bus = el.get("bus", "ps2")
        if kind in ("mouse", "keyboard") and bus == "ps2":
            # the PS/2 ports of the i8042 pyhv has anyway
            self.ignore(el)
            return
        self.fail(el, f"input device {kind!r} on bus {bus!r} is not supported (pyhv has no "
                      "display; only the i8042's PS/2 keyboard and mouse)")

    def controller(self, el: Any, dev: "_Devices", family: Optional[str]) -> None:
        self.common(el)
        ctype = self.attr(el, "type")
        model = self.attr(el, "model")
        given = self.attr(el, "index")
        index = self.integer(el, given, "controller index") if given is not None else 0
        if ctype == "pci" and given is None and model not in ("pci-root", "pcie-root"):
            # libvirt numbers a PCI controller without an index after the others
            index = 1 + max([c.index for c in dev.controllers if c.type == "pci"], default=0)
        if ctype == "pci":
            if model in ("pci-root", "pcie-root"):
                want = "pcie-root" if family == "q35" else "pci-root"
                if model != want or index != 0:
                    self.fail(el, f"the root of a {family} machine is {want} with index 0")
                self.ignore(el)
                return
            if model in ("pcie-root-port", "pci-bridge"):
                self.ignore(el)
                if model == "pcie-root-port" and family != "q35":
                    self.fail(el, "pcie-root-port controllers need a q35 machine")
                tgt = el.find("target")
                port = chassis = None
                hotplug = True
                if tgt is not None:
                    if tgt.get("hotplug") is not None:
                        hotplug = self.onoff(tgt, "hotplug", True)
                    if tgt.get("port") is not None:
                        port = self.integer(tgt, tgt.get("port"), "root port number")
                    if tgt.get("chassis") is not None:
                        chassis = self.integer(tgt, tgt.get("chassis"), "chassis number")
                    if tgt.get("chassisNr") is not None:
                        chassis = self.integer(tgt, tgt.get("chassisNr"), "chassis number")
                alias = el.find("alias")
                try:
                    dev.controllers.append(ControllerConfig(
                        "pci", model, index, alias.get("name") if alias is not None else None,
                        self.pci_address(el), port, chassis, hotplug=hotplug))
                except ConfigError as e:
                    self.fail(el, str(e))
                return
            self.fail(el, f"PCI controller model {model!r} is not supported (supported: "
                          "pci-root, pcie-root, pcie-root-port, pci-bridge)")
        if ctype == "usb":
            self.ignore(el)
            if model == "none":
                return
            if model is None:  # libvirt's default for the machine
                model = "qemu-xhci" if family == "q35" else "piix3-uhci"
            if model not in USB_MODELS:
                self.fail(el, f"USB controller model {model!r} is not supported (supported: "
                              f"{', '.join(USB_MODELS)}, none)")
            master = el.find("master")
            start = None
            if master is not None:
                start = self.integer(master, master.get("startport"), "master startport")
            ports = el.get("ports")
            if ports is not None and model == "qemu-xhci":
                self.notes.append(f"{self.path(el)}: ports='{ports}': pyhv's xHCI has 4 USB 2 "
                                  "and 4 USB 3 root ports (no USB device can be attached)")
            alias = el.find("alias")
            try:
                dev.controllers.append(ControllerConfig(
                    "usb", model, index, alias.get("name") if alias is not None else None,
                    self.pci_address(el), master_port=start))
            except ConfigError as e:
                self.fail(el, str(e))
            return
        if ctype == "virtio-serial":
            self.ignore(el)
            ports = el.get("ports")
            alias = el.find("alias")
            dev.controllers.append(ControllerConfig(
                "virtio-serial", "virtio-serial", index,
                alias.get("name") if alias is not None else None, self.pci_address(el),
                max_ports=self.integer(el, ports, "ports", 1) if ports else None))
            return
        if (ctype, family) in (("ide", "pc"), ("sata", "q35"), ("fdc", "pc")) and \
                el.get("index", "0") == "0":
            # the chipset's built-in controller, which libvirt lists; no disk uses it
            self.ignore(el)
            return
        self.fail(el, f"{ctype} controllers are not supported (disks use bus='virtio')")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _hint(el: Any) -> str:
    tag = _local(el.tag)
    if tag == "commandline" or tag == "capabilities":
        return "(QEMU passthrough options have no meaning for pyhv)"
    return "(it changes what the guest sees, and pyhv does not emulate it)"


@dataclass
class _Devices:
    emulator: Optional[str] = None
    com1: Optional[SerialConfig] = None
    disks: list[DiskConfig] = field(default_factory=list)
    filesystems: list[FilesystemConfig] = field(default_factory=list)
    nets: list[NetConfig] = field(default_factory=list)
    extra_serials: list[SerialPortConfig] = field(default_factory=list)
    channels: list[ChannelConfig] = field(default_factory=list)
    rngs: list[RngConfig] = field(default_factory=list)
    balloon: Optional[BalloonConfig] = None
    controllers: list[ControllerConfig] = field(default_factory=list)


def map_domain(xml: bytes, source: str = "<domain>", validate: bool = True) -> DomainMapping:
    """Parse, validate (libvirt's schema when installed) and map a domain definition."""
    from lxml import etree

    from pyhv.domxml import schema

    if isinstance(xml, str):
        xml = xml.encode()
    try:
        root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True,
                                                     remove_comments=True))
    except etree.XMLSyntaxError as e:
        line = e.lineno or 0
        msg = " ".join(str(e.msg if hasattr(e, "msg") else e).split(", line ")[0].split())
        raise DomainXmlError(f"{source}:{line}: malformed XML: {msg}") from None
    if root.tag != "domain":
        raise DomainXmlError(f"{source}:{root.sourceline or 0}: /{_local(str(root.tag))}: "
                             "root element must be <domain>")
    if validate:
        err = schema.schema_error(root.getroottree())
        if err is not None:
            line, path, message = err
            raise DomainXmlError(f"{source}:{line}: {path}: libvirt's domain schema: "
                                 f"{message}")
    mapper = _Mapper(root, source)
    cfg = mapper.map()
    try:
        cfg = place(cfg)
    except ConfigError as e:
        devices = root.find("devices")
        mapper.fail(devices if devices is not None else root, str(e))
    return DomainMapping(cfg, list(mapper.notes), dict(mapper.origins))


def parse_domain(xml: bytes, source: str = "<domain>") -> VmConfig:
    return map_domain(xml, source).config


def read_domain_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DomainXmlError(f"{path}: {e.strerror}") from None


def load_domain(path: str, buildable: bool = True) -> VmConfig:
    """The machine ``pyhv run`` builds from a domain XML file.

    With ``buildable`` (the default), a definition that needs something the
    engine cannot build yet (``pyhv.engine.support``) is refused with the first
    such element; ``buildable=False`` returns the full mapping.
    """
    mapping = map_domain(read_domain_file(path), path)
    if buildable:
        from pyhv.engine.support import issues

        found = issues(mapping.config)
        if found:
            line, where = mapping.origins.get(found[0].subject, (0, "/domain"))
            more = f" (and {len(found) - 1} more: pyhv domxml check {path})" \
                if len(found) > 1 else ""
            raise DomainXmlError(f"{path}:{line}: {where}: {found[0]}{more}")
    return mapping.config
