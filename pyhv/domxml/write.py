"""``VmConfig`` → libvirt domain XML (``<domain type='kvm'>``).

The output validates against libvirt's schema and maps back to an equal
``VmConfig`` (``parse_domain(to_xml(cfg)) == cfg``), with these exceptions a
domain XML cannot express: a tap given by file descriptors (``NetConfig.fds``)
and COM1 on an inherited fd (both come only from libvirt's QEMU argv), a
disk without a target name (one is made up: vda, vdb, ...), ``trace_io`` and
``KernelBoot.protocol``.
"""

from __future__ import annotations

from typing import Any, Optional

from pyhv.config import PciAddress, SerialConfig, VmConfig, format_cpuset


def _sub(parent: Any, tag: str, text: Optional[str] = None, **attrs: Optional[str]) -> Any:
    from lxml import etree

    el = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()
                                        if v is not None})
    if text is not None:
        el.text = text
    return el


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _disk_names() -> Any:
    letters = "abcdefghijklmnopqrstuvwxyz"
    for a in [""] + list(letters):
        for b in letters:
            yield f"vd{a}{b}"


def _chardev(parent: Any, tag: str, c: SerialConfig) -> Any:
    """A serial/console/channel element for the host end ``c``."""
    if c.kind == "fd":
        raise ValueError("an inherited fd chardev has no domain XML form")
    el = _sub(parent, tag, type=c.kind)
    if c.kind == "file":
        _sub(el, "source", path=c.path, append="on" if c.append else None)
    elif c.kind == "unix":
        _sub(el, "source", mode="bind" if c.server else "connect", path=c.path)
    elif c.kind == "tcp":
        _sub(el, "source", mode="bind" if c.server else "connect", host=c.host,
             service=str(c.port))
        _sub(el, "protocol", type="raw")
    if c.log_fd is not None:
        raise ValueError("a log on an inherited fd has no domain XML form")
    if c.log_path is not None:
        _sub(el, "log", file=c.log_path, append="on" if c.log_append else None)
    return el


def _opt(n: Optional[int]) -> Optional[str]:
    return None if n is None else str(n)


def _placed(el: Any, rec: Any) -> None:
    """A device's alias and PCI address, as libvirt writes them."""
    if rec.id:
        _sub(el, "alias", name=rec.id)
    a: Optional[PciAddress] = rec.address
    if a is not None:
        _sub(el, "address", type="pci", domain=f"{a.domain:#06x}", bus=f"{a.bus:#04x}",
             slot=f"{a.slot:#04x}", function=f"{a.function:#x}",
             multifunction="on" if a.multifunction else None)


def _port_placed(el: Any, rec: Any) -> None:
    """A virtio console's or channel's alias and port, as libvirt writes them."""
    if rec.id:
        _sub(el, "alias", name=rec.id)
    if rec.port is not None:
        _sub(el, "address", type="virtio-serial", controller=str(rec.controller), bus="0",
             port=str(rec.port))


def to_xml(cfg: VmConfig) -> str:
    from lxml import etree

    root = etree.Element("domain", type="kvm")
    _sub(root, "name", cfg.name)
    if cfg.uuid:
        _sub(root, "uuid", cfg.uuid)
    _sub(root, "memory", str(cfg.memory >> 10), unit="KiB")
    _sub(root, "currentMemory", str((cfg.current_memory or cfg.memory) >> 10), unit="KiB")
    mb = cfg.memory_backing
    if mb != type(mb)() or cfg.shared_memory:
        back = _sub(root, "memoryBacking")
        if mb.hugepages:
            hp = _sub(back, "hugepages")
            if mb.hugepage_size:
                _sub(hp, "page", size=str(mb.hugepage_size >> 10), unit="KiB")
        if not mb.merge:
            _sub(back, "nosharepages")
        if mb.locked:
            _sub(back, "locked")
        if mb.source != "anonymous":
            _sub(back, "source", type=mb.source)
        if cfg.shared_memory:
            _sub(back, "access", mode="shared")
        if mb.prealloc:
            _sub(back, "allocation", mode="immediate")
        if mb.discard:
            _sub(back, "discard")
    tune = cfg.cputune
    cpuset = {"cpuset": format_cpuset(tune.cpuset)} if tune.cpuset is not None else {}
    if cfg.max_vcpus is not None:
        _sub(root, "vcpu", str(cfg.max_vcpus), current=str(cfg.vcpus), **cpuset)
    else:
        _sub(root, "vcpu", str(cfg.vcpus), **cpuset)
    if tune.vcpupin or tune.emulatorpin is not None or tune.vcpusched or tune.emulatorsched:
        ct = _sub(root, "cputune")
        for i, cpus in tune.vcpupin:
            _sub(ct, "vcpupin", vcpu=str(i), cpuset=format_cpuset(cpus))
        if tune.emulatorpin is not None:
            _sub(ct, "emulatorpin", cpuset=format_cpuset(tune.emulatorpin))
        for sc in tune.vcpusched:
            prio = {"priority": str(sc.priority)} if sc.priority is not None else {}
            _sub(ct, "vcpusched", vcpus=format_cpuset(sc.vcpus), scheduler=sc.policy, **prio)
        es = tune.emulatorsched
        if es is not None:
            prio = {"priority": str(es.priority)} if es.priority is not None else {}
            _sub(ct, "emulatorsched", scheduler=es.policy, **prio)
    sm = cfg.smbios
    if sm.bios or sm.system or sm.baseboards or sm.chassis or sm.oem_strings:
        info = _sub(root, "sysinfo", type="smbios")
        for tag, fields in (("bios", sm.bios), ("system", sm.system),
                            *(("baseBoard", board) for board in sm.baseboards),
                            ("chassis", sm.chassis)):
            if fields:
                part = _sub(info, tag)
                for key, text in fields:
                    _sub(part, "entry", text, name=key)
        if sm.oem_strings:
            oem = _sub(info, "oemStrings")
            for text in sm.oem_strings:
                _sub(oem, "entry", text)
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=cfg.machine)
    _sub(os_el, "kernel", cfg.boot.kernel)
    if cfg.boot.initrd:
        _sub(os_el, "initrd", cfg.boot.initrd)
    if cfg.boot.cmdline:
        _sub(os_el, "cmdline", cfg.boot.cmdline)
    for dev in cfg.boot_order:
        _sub(os_el, "boot", dev=dev)
    if sm.mode is not None:
        _sub(os_el, "smbios", mode=sm.mode)
    f = cfg.features
    feats = _sub(root, "features")
    if f.acpi:
        _sub(feats, "acpi")
    if f.apic:
        _sub(feats, "apic")
    if f.pae:
        _sub(feats, "pae")
    if f.pmu is not None:
        _sub(feats, "pmu", state=_onoff(f.pmu))
    if f.kvm_hidden:
        _sub(_sub(feats, "kvm"), "hidden", state="on")
    cpu = cfg.cpu
    cpu_el = _sub(root, "cpu", mode=cpu.mode)
    if cpu.check != "partial":
        cpu_el.set("check", cpu.check)
    if not cpu.migratable:
        cpu_el.set("migratable", "off")
    if cpu.mode == "custom":
        cpu_el.set("match", "exact")
        model_el = _sub(cpu_el, "model", cpu.model, fallback="forbid")
        if cpu.vendor is not None:
            model_el.set("vendor_id", cpu.vendor)
    if cpu.topology is not None:
        t = cpu.topology
        _sub(cpu_el, "topology", sockets=str(t.sockets), dies=str(t.dies), cores=str(t.cores),
             threads=str(t.threads))
    for feat in cpu.features:
        _sub(cpu_el, "feature", policy=feat.policy, name=feat.name)
    if cfg.numa:
        numa_el = _sub(cpu_el, "numa")
        for cell in cfg.numa:
            attrs = {"id": str(cell.id), "cpus": format_cpuset(cell.cpus),
                     "memory": str(cell.memory // 1024), "unit": "KiB"}
            if cell.mem_access:
                attrs["memAccess"] = cell.mem_access
            if cell.discard:
                attrs["discard"] = "yes"
            cell_el = _sub(numa_el, "cell", **attrs)
            if cell.distances:
                dist_el = _sub(cell_el, "distances")
                for other, value in cell.distances:
                    _sub(dist_el, "sibling", id=str(other), value=str(value))
    if cfg.numatune is not None:
        numatune = cfg.numatune
        numatune_el = _sub(root, "numatune")
        if numatune.nodeset:
            _sub(numatune_el, "memory", mode=numatune.mode,
                 nodeset=format_cpuset(numatune.nodeset))
        for cell_id, mode, nodes in numatune.memnodes:
            _sub(numatune_el, "memnode", cellid=str(cell_id), mode=mode,
                 nodeset=format_cpuset(nodes))
    clock = cfg.clock
    if clock.offset == "variable":
        clock_el = _sub(root, "clock", offset="variable", adjustment=str(clock.adjustment),
                        basis=clock.basis)
    elif clock.offset == "timezone":
        clock_el = _sub(root, "clock", offset="timezone", timezone=clock.timezone or "")
    else:
        clock_el = _sub(root, "clock", offset=clock.offset)
    if clock.rtc_lost_ticks == "slew":
        _sub(clock_el, "timer", name="rtc", tickpolicy="catchup")
    _sub(root, "on_poweroff", cfg.on_poweroff)
    _sub(root, "on_reboot", cfg.on_reboot)
    _sub(root, "on_crash", cfg.on_crash)
    devices = _sub(root, "devices")
    if cfg.emulator:
        _sub(devices, "emulator", cfg.emulator)
    for c in cfg.controllers:
        el = _sub(devices, "controller", type=c.type, index=str(c.index),
                  model=c.model if c.type != "virtio-serial" else None,
                  ports=_opt(c.max_ports))
        if c.master_port is not None:
            _sub(el, "master", startport=str(c.master_port))
        if c.type == "pci" and (c.port is not None or c.chassis is not None
                                or not c.hotplug):
            if c.model == "pci-bridge":
                _sub(el, "target", chassisNr=_opt(c.chassis))
            else:
                _sub(el, "target", chassis=_opt(c.chassis),
                     port=None if c.port is None else f"{c.port:#x}",
                     hotplug=None if c.hotplug else "off")
        _placed(el, c)
    names = _disk_names()
    taken = {d.target for d in cfg.disks if d.target}
    for d in cfg.disks:
        target = d.target
        while target is None:
            candidate = next(names)
            target = candidate if candidate not in taken else None
        el = _sub(devices, "disk", type=d.source_type, device="disk")
        _sub(el, "driver", name="qemu", type=d.format, cache=d.cache, io=d.io,
             discard=d.discard, detect_zeroes=d.detect_zeroes,
             queues=str(d.queues) if d.queues != 1 else None,
             error_policy=d.error_policy, rerror_policy=d.rerror_policy)
        if d.source_type == "vhostuser":
            src = _sub(el, "source", type="unix", path=d.path)
            if d.reconnect is not None:
                _sub(src, "reconnect", enabled="yes", timeout=str(d.reconnect))
        else:
            _sub(el, "source", **{"file" if d.source_type == "file" else "dev": d.path})
        if d.backing is not None:  # the chain, ended by an empty <backingStore/>
            parent = el
            for bf in d.backing:
                parent = _sub(parent, "backingStore", type="file")
                _sub(parent, "format", type=bf.format)
                _sub(parent, "source", file=bf.path)
            _sub(parent, "backingStore")
        _sub(el, "target", dev=target, bus="virtio")
        if d.boot_order is not None:
            _sub(el, "boot", order=str(d.boot_order))
        if d.readonly:
            _sub(el, "readonly")
        if d.shareable:
            _sub(el, "shareable")
        if d.serial is not None:
            _sub(el, "serial", d.serial)
        _placed(el, d)
    virtio_ports = cfg.channels or any(s.target == "virtio" for s in cfg.extra_serials)
    if virtio_ports and not any(c.type == "virtio-serial" for c in cfg.controllers):
        _sub(devices, "controller", type="virtio-serial", index="0")
    for fs in cfg.filesystems:
        el = _sub(devices, "filesystem", type="mount", accessmode=fs.accessmode)
        _sub(el, "driver", type="virtiofs" if fs.driver == "virtiofs" else "path")
        _sub(el, "source", dir=fs.source)
        _sub(el, "target", dir=fs.tag)
        if fs.readonly:
            _sub(el, "readonly")
        _placed(el, fs)
    for n in cfg.nets:
        if n.backend == "vhost-user":
            el = _sub(devices, "interface", type="vhostuser")
        elif n.network:
            el = _sub(devices, "interface", type="network")
        elif n.bridge:
            el = _sub(devices, "interface", type="bridge")
        else:
            el = _sub(devices, "interface", type="ethernet")
        if n.mac:
            _sub(el, "mac", address=n.mac)
        if n.backend == "vhost-user":
            src = _sub(el, "source", type="unix", path=n.socket,
                       mode="server" if n.server else "client")
            if n.reconnect is not None:
                _sub(src, "reconnect", enabled="yes", timeout=str(n.reconnect))
        elif n.network:
            _sub(el, "source", network=n.network)
        elif n.bridge:
            _sub(el, "source", bridge=n.bridge)
        if n.ifname and n.backend == "tap":
            _sub(el, "target", dev=n.ifname)
        _sub(el, "model", type="virtio")
        if n.queues > 1 or n.vhost is not None:
            _sub(el, "driver", queues=str(n.queues) if n.queues > 1 else None,
                 name=None if n.vhost is None else "vhost" if n.vhost else "qemu")
        if n.mtu is not None:
            _sub(el, "mtu", size=str(n.mtu))
        if not n.link_up:
            _sub(el, "link", state="down")
        _placed(el, n)
    com1 = _chardev(devices, "serial", cfg.serial)
    _sub(com1, "target", type="isa-serial", port="0")
    for p in cfg.extra_serials:
        if p.target == "isa-serial":
            el = _chardev(devices, "serial", p.chardev)
            _sub(el, "target", type="isa-serial", port=str(p.index))
    for p in sorted((p for p in cfg.extra_serials if p.target == "virtio"),
                    key=lambda p: p.index):
        el = _chardev(devices, "console", p.chardev)
        _sub(el, "target", type="virtio", port=str(p.index))
        _port_placed(el, p)
    for ch in cfg.channels:
        el = _chardev(devices, "channel", ch.chardev)
        _sub(el, "target", type="virtio", name=ch.name)
        _port_placed(el, ch)
    _sub(devices, "input", type="keyboard", bus="ps2")
    _sub(devices, "input", type="mouse", bus="ps2")
    if cfg.balloon is None:
        _sub(devices, "memballoon", model="none")
    else:
        b = cfg.balloon
        el = _sub(devices, "memballoon", model="virtio",
                  autodeflate="on" if b.autodeflate else None,
                  freePageReporting="on" if b.free_page_reporting else None)
        if b.stats_period is not None:
            _sub(el, "stats", period=str(b.stats_period))
        _placed(el, b)
    for r in cfg.rngs:
        el = _sub(devices, "rng", model="virtio")
        if r.rate_bytes is not None:
            _sub(el, "rate", bytes=str(r.rate_bytes),
                 period=str(r.rate_period_ms) if r.rate_period_ms is not None else None)
        _sub(el, "backend", r.source, model="random")
        _placed(el, r)
    return str(etree.tostring(root, pretty_print=True, encoding="unicode"))
