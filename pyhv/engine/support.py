"""What of a :class:`VmConfig` the engine cannot build yet.

A pure function of the config (no KVM): front ends map everything a user can
describe, ``pyhv domxml check`` marks what is listed here, and the builder
refuses to build a machine that needs any of it (``create_platform`` checks,
so a front end that forgets cannot get a machine missing a device).  Today the
engine builds RAM (anonymous, memfd, file, hugepages; locked, shared), vCPUs in any
sockets × cores × threads topology (no dies) with the host's CPUID or a
named model from libvirt's CPU map (:mod:`pyhv.cpumodel`), direct
kernel boot, COM1 as one isa-serial (stdio/file/pty/null/fd, optionally
logged), ACPI, the i8042, the RTC and ACPI PM, the pc/q35 PCI chipset,
pci-bridge and pcie-root-port controllers, the USB host controllers, and
virtio-blk (raw files and block devices) and virtio-rng (virtio-pci).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyhv.config import SerialConfig, VmConfig

NOT_BUILT = "is not built by this engine yet"
#: COM1's host ends the engine's console can serve
BUILT_SERIAL_KINDS = ("stdio", "file", "pty", "null", "fd")


@dataclass(frozen=True)
class Issue:
    """One thing the engine cannot build.

    ``subject`` names the part of the config: ``("disk", 0)`` is ``cfg.disks[0]``;
    other kinds: ``filesystem``, ``net``, ``serial`` (``extra_serials``),
    ``channel``, ``rng``, ``balloon``, ``com1``, ``memory``, ``vcpu``, ``cpu``,
    ``features``, ``clock``, ``on_poweroff``, ``on_reboot``, ``on_crash``.
    """

    subject: tuple[str, int]
    label: str
    message: str

    def __str__(self) -> str:
        return f"{self.label}: {self.message}"


def disk_label(cfg: VmConfig, i: int) -> str:
    d = cfg.disks[i]
    return f"disk {d.target or f'#{i}'}"


def issues(cfg: VmConfig) -> list[Issue]:
    """Every configured thing the engine cannot build yet, in config order."""
    out: list[Issue] = []

    def add(kind: str, index: int, label: str, message: str) -> None:
        out.append(Issue((kind, index), label, message))

    if cfg.current_memory is not None and cfg.current_memory != cfg.memory and \
            cfg.balloon is None:
        add("memory", 0, "memory", "starting below the configured size (currentMemory) "
                                   "needs a balloon (<memballoon model='virtio'>)")
    if cfg.max_vcpus is not None:
        add("vcpu", 0, "vcpu", f"vCPU hotplug ({cfg.vcpus} of {cfg.max_vcpus} online) "
                               f"{NOT_BUILT}")
    cpu = cfg.cpu
    topo = cpu.topology
    if topo is not None and topo.dies != 1:
        add("cpu", 0, "cpu", f"topology with {topo.dies} dies per socket {NOT_BUILT} "
                             "(built: sockets × cores × threads)")
    if cpu.mode in ("custom", "host-model") or cpu.features:
        # named models and feature names come from libvirt's CPU map
        from pyhv.cpumodel import CpuModelError, cpu_map
        try:
            cmap = cpu_map()
            if cpu.mode == "custom" and cpu.model is not None:
                cmap.model(cpu.model, "cpu model")
            for feat in cpu.features:
                cmap.feature_name(feat.name, "cpu feature")
        except CpuModelError as e:
            add("cpu", 0, "cpu", str(e))
    f = cfg.features
    if not f.apic:
        add("features", 0, "features", f"a machine without APIC {NOT_BUILT}")
    if cfg.on_poweroff != "destroy":
        add("on_poweroff", 0, "on_poweroff", f"{cfg.on_poweroff} {NOT_BUILT} (built: "
                                             "destroy)")
    if cfg.on_crash != "destroy":
        add("on_crash", 0, "on_crash", f"{cfg.on_crash} {NOT_BUILT} (built: destroy)")
    if cfg.serial.kind not in BUILT_SERIAL_KINDS:
        add("com1", 0, "serial COM1", f"{cfg.serial.describe()} {NOT_BUILT} (built: "
                                      f"{', '.join(BUILT_SERIAL_KINDS)})")
    for i, fs in enumerate(cfg.filesystems):
        if fs.driver != "9p":
            add("filesystem", i, f"filesystem {fs.tag}", f"virtio-fs {NOT_BUILT}")
    for i, d in enumerate(cfg.disks):
        if d.source_type == "vhostuser" and not cfg.shared_memory:
            add("disk", i, f"disk {d.target or d.id or i}",
                "vhost-user-blk needs guest memory the backend can map: <memoryBacking>"
                "<source type='memfd'/><access mode='shared'/>")
    for i, n in enumerate(cfg.nets):
        if n.backend == "vhost-user" and not cfg.shared_memory:
            add("net", i, net_label(cfg, i), "vhost-user virtio-net needs guest memory the "
                                             "backend can map: <memoryBacking><source "
                                             "type='memfd'/><access mode='shared'/>")
        elif n.network is not None and not n.fds:
            add("net", i, net_label(cfg, i), f"libvirt network {n.network!r} outside "
                                             f"libvirtd {NOT_BUILT} (pyhv run takes "
                                             "<interface type='bridge'> with its bridge)")
    for i, p in enumerate(cfg.extra_serials):
        if _logged(p.chardev):
            what = "a virtio console" if p.target == "virtio" else "COM2-COM4"
            add("serial", i, serial_label(cfg, i), f"a log of {what} {NOT_BUILT}")
    for i, c in enumerate(cfg.channels):
        if _logged(c.chardev):
            add("channel", i, f"channel {c.name}", f"a log of a channel {NOT_BUILT}")
    return out


def _logged(chardev: SerialConfig) -> bool:
    return chardev.log_path is not None or chardev.log_fd is not None


def net_label(cfg: VmConfig, i: int) -> str:
    n = cfg.nets[i]
    return f"interface {n.mac or n.ifname or f'#{i}'}"


def serial_label(cfg: VmConfig, i: int) -> str:
    p = cfg.extra_serials[i]
    if p.target == "virtio":
        return f"console hvc{p.index}"
    return f"serial COM{p.index + 1}"


def unsupported(cfg: VmConfig) -> list[str]:
    """One message per configured thing the engine cannot build yet (empty: it can)."""
    return [str(i) for i in issues(cfg)]
