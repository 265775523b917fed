"""``pyhv domxml check DOMAIN.xml``: the machine pyhv would build, or why not.

Exit status 0 when the XML maps onto a ``VmConfig`` (devices the engine cannot
build yet are marked, and ``pyhv run`` would refuse them), 2 on errors (one
line on stderr).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from pyhv.config import SchedConfig, VmConfig, format_cpuset, format_size, machine_family
from pyhv.engine import layout
from pyhv.engine.pci.platform import pci_from_config
from pyhv.engine.support import Issue, issues, net_label, serial_label
from pyhv.placement import place

#: legacy COM ports: (I/O base, IRQ)
_E820_NAMES = {layout.E820_RAM: "RAM", layout.E820_RESERVED: "reserved",
               layout.E820_ACPI: "ACPI"}


@dataclass(frozen=True)
class PlannedDevice:
    """One device of the machine and the address it gets."""

    address: str
    description: str
    subject: Optional[tuple[str, int]] = None


def plan_devices(cfg: VmConfig) -> list[PlannedDevice]:
    """Every device with its address: ISA ports, then the PCI tree the engine builds
    (chipset, bridges, root ports), then the PCI devices where :mod:`pyhv.placement`
    puts them, then virtio-serial ports."""
    out = [PlannedDevice(f"isa 0x{layout.COM_PORTS[0][0]:x} irq {layout.COM_PORTS[0][1]}",
                         f"serial COM1: isa-serial, {cfg.serial.describe()}", ("com1", 0))]
    for i, p in enumerate(cfg.extra_serials):
        if p.target == "isa-serial":
            base, irq = layout.COM_PORTS[p.index]
            out.append(PlannedDevice(f"isa 0x{base:x} irq {irq}",
                                     f"{serial_label(cfg, i)}: isa-serial, "
                                     f"{p.chardev.describe()}", ("serial", i)))
    out.append(PlannedDevice(f"isa 0x{layout.I8042_DATA_PORT:x}", "i8042 (keyboard "
                                                                  "controller: reset)"))
    out.append(PlannedDevice(f"isa 0x{layout.RTC_PORT:x} irq {layout.RTC_IRQ}",
                             "RTC (MC146818)"))
    out.append(PlannedDevice(f"isa 0x{layout.PM1A_EVT_PORT:x} irq {layout.SCI_IRQ}",
                             "ACPI PM (PM1a, PM timer)"))
    out += _pci_devices(place(cfg))
    return out


def _pci_devices(cfg: VmConfig) -> list[PlannedDevice]:
    """The PCI tree the engine builds (BDFs as the guest finds them, ids, BARs, INTx),
    then the devices at their placed addresses (libvirt's form: the bus is the
    controller's index)."""
    pci = pci_from_config(cfg)
    out = [PlannedDevice("pci " + line.split(" ", 1)[0].strip() if not line.startswith(" ")
                         else "  pci " + line.strip().split(" ", 1)[0],
                         line.strip().split(" ", 1)[1]) for line in pci.tree()]
    for i, c in enumerate(cfg.controllers):
        if c.type == "virtio-serial" and c.address is not None:
            out.append(PlannedDevice(f"pci {c.address}", f"{c.label}", ("controller", i)))
    rows: list[tuple[Any, str, Optional[tuple[str, int]]]] = []
    for i, d in enumerate(cfg.disks):
        flags = [d.format]
        flags += [n for n, on in (("readonly", d.readonly), ("shareable", d.shareable)) if on]
        flags += [f"{k}={v}" for k, v in (("cache", d.cache), ("io", d.io),
                                          ("discard", d.discard),
                                          ("detect_zeroes", d.detect_zeroes),
                                          ("error_policy", d.error_policy),
                                          ("rerror_policy", d.rerror_policy),
                                          ("serial", d.serial), ("boot", d.boot_order))
                  if v is not None]
        if d.source_type == "vhostuser":
            rc = f", reconnect every {d.reconnect} s" if d.reconnect else ""
            rows.append((d, f"disk {d.target or f'#{i}'}: vhost-user-blk, unix socket "
                            f"{d.path} (backend's queues: {d.queues}{rc})", ("disk", i)))
            continue
        rows.append((d, f"disk {d.target or f'#{i}'}: virtio-blk, {d.source_type} {d.path} "
                        f"({', '.join(flags)})", ("disk", i)))
    for i, fs in enumerate(cfg.filesystems):
        kind = "virtio-9p" if fs.driver == "9p" else "virtio-fs"
        layers = f" over {', '.join(reversed(fs.lower))} (read-only)" if fs.lower else ""
        rows.append((fs, f"filesystem {fs.tag}: {kind}, {fs.source}{layers} ({fs.accessmode}"
                         f"{', readonly' if fs.readonly else ''})", ("filesystem", i)))
    for i, n in enumerate(cfg.nets):
        if n.backend == "vhost-user":
            back = f"vhost-user {n.socket} ({'server' if n.server else 'client'})"
        else:
            back = "tap " + (n.ifname or (f"fd {','.join(map(str, n.fds))}" if n.fds
                                          else "(new)"))
            if n.queues > 1:
                back += f", {n.queues} queue pairs"
            if n.mtu is not None:
                back += f", mtu {n.mtu}"
            if not n.link_up:
                back += ", link down"
            if n.bridge:
                back += f" on bridge {n.bridge}"
            if n.network:
                back += f" on libvirt network {n.network}"
        rows.append((n, f"{net_label(cfg, i)}: virtio-net, {back}", ("net", i)))
    for i, r in enumerate(cfg.rngs):
        rate = f", {r.rate_bytes} bytes per {r.rate_period_ms or 1000} ms" \
            if r.rate_bytes else ""
        rows.append((r, f"rng #{i}: virtio-rng, {r.source}{rate}", ("rng", i)))
    if cfg.balloon is not None:
        b = cfg.balloon
        extra = f", stats every {b.stats_period} s" if b.stats_period else ""
        rows.append((b, f"memballoon: virtio-balloon{extra}", ("balloon", 0)))
    for rec, desc, subject in rows:
        out.append(PlannedDevice(f"pci {rec.address}", f"{desc} [{rec.id}]", subject))
    # the ports, by controller and number, with their ids
    ports: list[tuple[int, int, str, Optional[tuple[str, int]]]] = []
    for i, p in enumerate(cfg.extra_serials):
        if p.target == "virtio" and p.port is not None:
            ports.append((p.controller, p.port, f"{serial_label(cfg, i)}: virtio-console, "
                                                f"{p.chardev.describe()} [{p.id}]",
                          ("serial", i)))
    for i, ch in enumerate(cfg.channels):
        if ch.port is not None:
            ports.append((ch.controller, ch.port, f"channel {ch.name}: "
                                                  f"{ch.chardev.describe()} [{ch.id}]",
                          ("channel", i)))
    for controller, port, desc, subject in sorted(ports):
        out.append(PlannedDevice(f"  virtio-serial{controller} port {port}", desc, subject))
    return out


def _pinning_lines(cfg: VmConfig) -> list[str]:
    """``<vcpu cpuset>`` and ``<cputune>``: where each thread may run."""
    tune = cfg.cputune
    out = []

    def sched(s: Optional[SchedConfig]) -> str:
        if s is None:
            return ""
        return f", scheduler {s.policy}" + (f" priority {s.priority}" if s.priority else "")

    for i in range(cfg.total_vcpus):
        cpus, sc = tune.vcpu_cpus(i), tune.vcpu_sched(i)
        if cpus is not None or sc is not None:
            where = f"host CPUs {format_cpuset(cpus)}" if cpus is not None else "any host CPU"
            out.append(f"  vCPU {i} thread: {where}{sched(sc)}")
    cpus = tune.emulator_cpus()
    if cpus is not None or tune.emulatorsched is not None:
        where = f"host CPUs {format_cpuset(cpus)}" if cpus is not None else "any host CPU"
        out.append(f"  emulator threads: {where}{sched(tune.emulatorsched)}")
    return out


def _smbios_line(cfg: VmConfig) -> str:
    from pyhv.engine.smbios import smbios_description

    sm = cfg.smbios
    where = f"tables at 0x{layout.SMBIOS_ADDR:x} (SMBIOS 3.0)"
    if sm.mode == "host":
        return f"smbios: host (BIOS and system values from /sys/class/dmi/id), {where}"
    d = smbios_description(cfg, 1, 1, 1)
    sysinfo = ", ".join(f"{k} {v!r}" for k, v in d.system.items())
    extra = f", {len(sm.oem_strings)} OEM string(s)" if sm.oem_strings else ""
    asset = d.chassis.get("asset")
    extra += f", chassis asset {asset!r}" if asset else ""
    return f"smbios: {sm.mode or 'emulate'}: system {sysinfo}{extra}; {where}"


def describe(cfg: VmConfig, notes: Optional[list[str]] = None) -> list[str]:
    """The report ``pyhv domxml check`` prints, line by line."""
    found = issues(cfg)
    by_subject: dict[tuple[str, int], list[Issue]] = {}
    for issue in found:
        by_subject.setdefault(issue.subject, []).append(issue)
    lines = [f"domain {cfg.name}" + (f" (uuid {cfg.uuid})" if cfg.uuid else "")]
    lines.append(f"machine: {cfg.machine} ({machine_family(cfg.machine)}), KVM"
                 + (f", emulator {cfg.emulator}" if cfg.emulator else ""))
    mb = cfg.memory_backing
    backing = mb.source + (", shared" if cfg.shared_memory else ", private")
    if mb.hugepages:
        backing += ", hugepages" + (f" {format_size(mb.hugepage_size)}" if mb.hugepage_size else "")
    if mb.locked:
        backing += ", locked"
    if mb.path:
        backing += f", in {mb.path}"
    if not mb.merge:
        backing += ", no KSM"
    if mb.prealloc:
        backing += ", preallocated"
    mem = f"memory: {format_size(cfg.memory)} ({backing})"
    if cfg.current_memory is not None:
        mem += f", starting at {format_size(cfg.current_memory)}"
    lines.append(mem)
    for addr, size in layout.ram_ranges(cfg.memory):
        lines.append(f"  RAM   0x{addr:010x}-0x{addr + size - 1:010x}  {format_size(size)}")
    for e in layout.e820_map(cfg.memory):
        lines.append(f"  e820  0x{e.addr:010x}-0x{e.end - 1:010x}  "
                     f"{_E820_NAMES.get(e.type, str(e.type))}")
    for issue in by_subject.get(("memory", 0), []):
        lines.append(f"  ! {issue.message}")
    cpu = cfg.cpu
    t = cpu.topology
    topo = (f"{t.sockets} sockets × {t.dies} dies × {t.cores} cores × {t.threads} threads"
            if t else f"1 socket × {cfg.total_vcpus} cores (flat)")
    vcpu = f"vcpus: {cfg.vcpus}" + (f" of {cfg.max_vcpus}" if cfg.max_vcpus else "")
    model = cpu.mode + (f" {cpu.model}" if cpu.model else "")
    feats = "".join(f", {f.policy} {f.name}" for f in cpu.features)
    if cpu.mode in ("custom", "host-model"):
        feats += f", check {cpu.check}"
    if cpu.vendor:
        feats += f", vendor {cpu.vendor}"
    lines.append(f"{vcpu}, topology {topo}, cpu {model}{feats}")
    lines += _numa_lines(cfg)
    for key in (("vcpu", 0), ("cpu", 0)):
        for issue in by_subject.get(key, []):
            lines.append(f"  ! {issue.message}")
    lines += _pinning_lines(cfg)
    b = cfg.boot
    boot = f"boot: direct kernel {b.kernel}"
    if b.initrd:
        boot += f", initrd {b.initrd}"
    lines.append(boot)
    lines.append(f"  cmdline: {b.cmdline!r}")
    f = cfg.features
    on = [n for n, v in (("acpi", f.acpi), ("apic", f.apic), ("pae", f.pae)) if v]
    if f.pmu is not None:
        on.append(f"pmu={'on' if f.pmu else 'off'}")
    if f.kvm_hidden:
        on.append("kvm-hidden")
    clock = cfg.clock.offset + (f" {cfg.clock.adjustment:+d} s from {cfg.clock.basis}"
                                if cfg.clock.offset == "variable" else "")
    if cfg.clock.timezone:
        clock += f" {cfg.clock.timezone}"
    if cfg.clock.rtc_lost_ticks == "slew":
        clock += ", rtc catchup"
    lines.append(f"features: {' '.join(on) or '(none)'}; clock {clock}")
    lines.append(_smbios_line(cfg))
    lines.append(f"on_poweroff {cfg.on_poweroff}, on_reboot {cfg.on_reboot}, "
                 f"on_crash {cfg.on_crash}")
    for key in (("features", 0), ("clock", 0), ("on_poweroff", 0), ("on_reboot", 0),
                ("on_crash", 0)):
        for issue in by_subject.get(key, []):
            lines.append(f"  ! {issue.label}: {issue.message}")
    lines.append("devices:")
    for dev in plan_devices(cfg):
        mark = ""
        if dev.subject is not None and dev.subject in by_subject:
            mark = "  -- " + "; ".join(i.message for i in by_subject[dev.subject])
        lines.append(f"  {dev.address:<20} {dev.description}{mark}")
    if notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in notes]
    if found:
        lines.append(f"not built by this engine yet: {len(found)} item(s); pyhv run "
                     "refuses this domain until they are")
    else:
        lines.append("pyhv run can build this machine")
    return lines


def run_check(path: str, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    from pyhv.domxml.parse import map_domain, read_domain_file
    from pyhv.errors import PyhvError

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        mapping = map_domain(read_domain_file(path), path)
    except PyhvError as e:
        print(f"pyhv: {e}", file=err)
        return e.exit_status
    notes = list(mapping.notes)
    for line in describe(mapping.config, notes):
        print(line, file=out)
    return 0


def _numa_lines(cfg: VmConfig) -> list[str]:
    """The guest NUMA cells (their vCPUs and guest RAM) and the host binding."""
    from pyhv.config import format_cpuset

    lines = []
    runs = layout.numa_ranges([c.memory for c in cfg.numa]) if cfg.numa else []
    for cell, cell_runs in zip(cfg.numa, runs):
        where = ", ".join(f"0x{a:x}-0x{a + n - 1:x}" for a, n in cell_runs)
        lines.append(f"  numa cell {cell.id}: vcpus {format_cpuset(cell.cpus)}, "
                     f"{format_size(cell.memory)} at {where}")
    tune = cfg.numatune
    if tune is not None:
        if tune.nodeset:
            lines.append(f"  numatune: {tune.mode} on host nodes "
                         f"{format_cpuset(tune.nodeset)}")
        for cell_id, mode, nodes in tune.memnodes:
            lines.append(f"  numatune cell {cell_id}: {mode} on host nodes "
                         f"{format_cpuset(nodes)}")
        from pyhv.engine.numa import NumaError, check_nodes

        try:
            check_nodes(cfg)
        except NumaError as e:
            lines.append(f"  ! {e}")
    return lines
