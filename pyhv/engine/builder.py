"""Building one boot of a machine: a recipe of independent ``attach_*`` steps.

A :class:`Platform` is everything that lives for one boot: the KVM VM and its
vCPUs, the buses and the device register models.  Guest RAM and the host end
of the console outlive it (they belong to :class:`pyhv.engine.machine.Machine`),
so a reset builds a fresh platform over the same memory, as Cloud Hypervisor
does on reboot.
"""

from __future__ import annotations

import errno
import functools
import itertools
import mmap
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from pyhv.config import VmConfig, machine_family
from pyhv.engine import layout
from pyhv.engine.acpi import MPTABLE_MAX_CPUS, AcpiPlatform, write_acpi, write_mptable
from pyhv.engine.boot import (
    EntryState,
    KernelImage,
    configure_boot,
    load_initrd,
    load_kernel,
)
from pyhv.engine.bus import Bus, Sink
from pyhv.engine.chardev import HostEnd
from pyhv.engine.coalesced import PAGE_SIZE, CoalescedPio
from pyhv.engine.console import HostSerial
from pyhv.engine.cpuid import (
    BOOT_MSRS,
    FEATURE_MSRS,
    GuestCpu,
    Topology,
    filtered_warning,
    flat_topology,
    guest_cpu,
)
from pyhv.engine.devices import InterruptLine
from pyhv.engine.devices.acpi_pm import AcpiPm
from pyhv.engine.devices.i8042 import I8042
from pyhv.engine.devices.manager import DeviceManager, DeviceRecord
from pyhv.engine.devices.rtc import CmosRtc, base_offset
from pyhv.engine.devices.serial import Serial16550
from pyhv.engine.errors import EngineError
from pyhv.engine.host import HostResources
from pyhv.engine.irq import GsiRouting, KvmMsiVectors, ResampleLine
from pyhv.engine.kvm import Kvm, KvmError, VmFd, abi
from pyhv.engine.kvm._ffi import ffi
from pyhv.engine.kvm.vm import default_routes
from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.device import PciFunction
from pyhv.engine.pci.platform import (
    PCI_INTX_GSIS,
    PciPlatform,
    mmio64_window,
    pci_from_config,
)
from pyhv.engine.pci.root import bdf_text
from pyhv.engine.pci.rootport import RootPort
from pyhv.engine.smbios import smbios_description, write_smbios
from pyhv.engine.support import unsupported
from pyhv.engine.vcpu import (
    Vcpu,
    VcpuEvent,
    apply_entry_state,
    init_fpu,
    init_lapic_lints,
)
from pyhv.engine.virtio.device import VirtioDevice
from pyhv.engine.virtio.pci import NOTIFY_MULTIPLIER, VirtioPciFunction
from pyhv.placement import pci_functions, place

if TYPE_CHECKING:
    from pyhv.engine.eventloop import EventLoop

#: KVM needs three pages for the TSS and one for the identity map (VMX only),
#: placed in the MMIO hole just below the BIOS area as QEMU does
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000


class IrqLine:
    """An ISA interrupt line of the in-kernel PIC/IOAPIC (KVM_IRQ_LINE)."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.level = False
        self._lock = threading.Lock()

    def set_level(self, asserted: bool) -> None:
        with self._lock:
            if asserted != self.level:
                self.level = asserted
                self.vm.irq_line(self.gsi, asserted)

    def pulse(self) -> None:
        with self._lock:
            self.vm.irq_line(self.gsi, True)
            self.vm.irq_line(self.gsi, False)
            self.level = False


class SharedLine:
    """One ISA line that several devices drive (COM1 and COM3 share IRQ 4, COM2 and
    COM4 IRQ 3): asserted while any of them asserts it."""

    def __init__(self, line: IrqLine) -> None:
        self.line = line
        self._up: set[int] = set()
        self._lock = threading.Lock()

    def source(self) -> "_LineSource":
        return _LineSource(self, next(_SOURCES))

    def _set(self, who: int, asserted: bool) -> None:
        with self._lock:
            if asserted:
                self._up.add(who)
            else:
                self._up.discard(who)
            self.line.set_level(bool(self._up))


_SOURCES = itertools.count(1)


class _LineSource:
    """One device's view of a :class:`SharedLine`."""

    def __init__(self, shared: SharedLine, who: int) -> None:
        self.shared, self.who = shared, who

    def set_level(self, asserted: bool) -> None:
        self.shared._set(self.who, asserted)

    def pulse(self) -> None:
        self.shared._set(self.who, True)
        self.shared._set(self.who, False)


class UartPort:
    """A UART (COM2-COM4) and its host end: output from the vCPU as the end takes it,
    input from the end on the loop into the receive FIFO, with flow control."""

    def __init__(self, serial: Serial16550, end: HostEnd) -> None:
        self.serial, self.end = serial, end
        serial.out = self
        serial.on_input_space = end.resume_soon  # a vCPU drained the FIFO

    def write(self, data: bytes) -> None:
        self.end.output(data)

    # the end's sink
    def receive(self, data: bytes) -> int:
        return self.serial.enqueue_input(data)

    def host_open(self, is_open: bool) -> None:
        return None

    def writable(self) -> None:
        return None

    def start(self, loop: "EventLoop") -> None:
        self.end.start(loop, self)

    def stop(self) -> None:
        self.end.stop()


@dataclass
class Hooks:
    """What the devices tell the machine (called from vCPU threads)."""

    on_sleep: Callable[[int], None]
    on_reset: Callable[[], None]
    on_vcpu_event: Callable[[VcpuEvent], None]
    on_serial_space: Callable[[], None]
    #: a device model raised: it was taken off the buses (id, kind, reason)
    on_device_broken: Callable[[str, str, str], None] = lambda ident, kind, why: None
    #: the guest changed the balloon's size: the memory it now has, in bytes
    on_balloon: Callable[[int], None] = lambda actual: None
    #: a disk request failed on the host (disk id, BlkIoError); called on the loop
    on_block_error: Callable[[str, object], None] = lambda ident, err: None
    #: a write reached past a disk's write threshold (disk id, bytes past, threshold)
    on_block_threshold: Callable[[str, int, int], None] = lambda ident, past, at: None
    #: the guest opened or closed a virtio-serial port (port id, open); on the loop
    on_port_open: Callable[[str, bool], None] = lambda ident, is_open: None
    #: the guest changed a NIC's receive filter (NIC id); on the loop
    on_rx_filter: Callable[[str], None] = lambda ident: None
    #: the guest set its RTC: seconds from the configured base (QMP RTC_CHANGE)
    on_rtc_change: Callable[[int], None] = lambda offset: None


@dataclass
class Platform:
    vm: VmFd
    pio: Bus
    mmio: Bus
    serial: Serial16550
    pm: AcpiPm
    kernel: Optional[KernelImage] = None
    entry: Optional[EntryState] = None
    rsdp_addr: Optional[int] = None
    vcpus: list[Vcpu] = field(default_factory=list)
    #: the CPUID table vCPU 0 was given
    cpuid0: list = field(default_factory=list)
    #: model features the host lacked, left out of that table
    cpu_filtered: tuple[str, ...] = ()
    pci: Optional[PciPlatform] = None
    devices: DeviceManager = field(default_factory=DeviceManager)
    #: the VM's GSI routing table (MSI vectors join it)
    irq: Optional[GsiRouting] = None
    #: (fd, callback, name) the owner's event loop watches: device work off the vCPUs
    watches: list[tuple[int, Callable[[int], None], str]] = field(default_factory=list)
    #: devices that arm timers through the loop (their ``schedule`` attribute)
    timed: list[object] = field(default_factory=list)
    #: devices with host ends the loop serves (their ``start(loop)``/``stop()``)
    served: list[object] = field(default_factory=list)
    #: called when the platform goes away
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: what each virtio function (by id) put on the lists above
    attached: dict[str, "Attached"] = field(default_factory=dict)
    #: the coalesced port-I/O ring (None: this KVM has none)
    coalesced: Optional[CoalescedPio] = None

    def close(self) -> None:
        for v in self.vcpus:
            v.stop()
        for v in self.vcpus:
            v.fd.close()
        self.vcpus = []
        for close in self.closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing must not stop the others
                pass
        self.closers = []
        self.vm.close()


def create_vm(kvm: Kvm) -> VmFd:
    vm = kvm.create_vm()
    vm.set_tss_addr(TSS_ADDR)
    try:
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
    except KvmError:
        pass  # only VMX needs it
    return vm


def attach_memory(vm: VmFd, memory: GuestMemory, host_addrs: list[int]) -> None:
    for slot, (region, host) in enumerate(zip(memory.regions, host_addrs)):
        vm.set_user_memory_region(slot, region.guest_addr, region.size, host)


def host_addresses(memory: GuestMemory) -> tuple[list[int], list[object]]:
    """Host addresses of each region, and the cdata objects that pin them."""
    pins = [ffi.from_buffer(r.buffer) for r in memory.regions]
    return [int(ffi.cast("uintptr_t", p)) for p in pins], pins


def attach_irqchip(vm: VmFd) -> GsiRouting:
    vm.create_irqchip()
    vm.create_pit2()
    routing = GsiRouting(vm)
    vm.set_gsi_routing(default_routes(layout.IOAPIC_PINS))
    return routing


def attach_legacy_devices(vm: VmFd, pio: Bus, cfg: VmConfig, host_serial: HostSerial,
                          hooks: Hooks, devices: DeviceManager,
                          host: Optional[HostResources] = None
                          ) -> tuple[Serial16550, AcpiPm, list[UartPort]]:
    lines = {irq: SharedLine(IrqLine(vm, irq)) for irq in {i for _b, i in layout.COM_PORTS}}
    serial = Serial16550(lines[layout.COM1_IRQ].source(), host_serial.writer,
                         on_input_space=hooks.on_serial_space)
    uarts: list[UartPort] = []
    for p in cfg.extra_serials:
        end = host.serials.get(p.index) if host is not None else None
        if p.target != "isa-serial" or end is None:
            continue
        base, irq = layout.COM_PORTS[p.index]
        uart = UartPort(Serial16550(lines[irq].source()), end)
        pio.insert(base, 8, uart.serial, f"serial{p.index}")  # type: ignore[arg-type]
        devices.add(f"serial{p.index}", "isa-serial", uart.serial, f"isa {base:#x}")
        uarts.append(uart)
    i8042 = I8042(IrqLine(vm, 1), reset=hooks.on_reset)
    pm = AcpiPm(IrqLine(vm, layout.SCI_IRQ), on_sleep=hooks.on_sleep)
    for ident, kind, base, length, dev in (
            ("serial0", "isa-serial", layout.COM1_PORT, 8, serial),
            ("i8042", "i8042", layout.I8042_DATA_PORT, 5, i8042),
            ("rtc", "mc146818rtc", layout.RTC_PORT, 2, make_rtc(vm, cfg, hooks)),
            ("acpi-pm", "acpi-pm", layout.PM1A_EVT_PORT,
             layout.PM_TMR_PORT + layout.PM_TMR_LEN - layout.PM1A_EVT_PORT, pm),
            ("post", "port80", layout.POST_PORT, 1, Sink())):
        pio.insert(base, length, dev, ident)  # type: ignore[arg-type]
        devices.add(ident, kind, dev, f"isa {base:#x}")
    return serial, pm, uarts


def make_rtc(vm: VmFd, cfg: VmConfig, hooks: Hooks) -> CmosRtc:
    """The MC146818 on ISA IRQ 8, its clock at the configured offset."""
    return CmosRtc(offset_seconds=base_offset(cfg.clock), ram_size=cfg.memory,
                   irq=IrqLine(vm, layout.RTC_IRQ), on_change=hooks.on_rtc_change,
                   lost_tick_policy=cfg.clock.rtc_lost_ticks)


def numa_distances(cfg: VmConfig) -> tuple[tuple[int, ...], ...]:
    """The SLIT matrix from the cells' ``<distances>`` (empty when none are given, as
    QEMU builds no SLIT without -numa dist): a missing entry takes the reverse
    direction's value, else 10 to itself and 20 to others."""
    given = {(c.id, other): value for c in cfg.numa for other, value in c.distances}
    if not given:
        return ()
    n = len(cfg.numa)
    return tuple(tuple(given.get((a, b), given.get((b, a), 10 if a == b else 20))
                       for b in range(n)) for a in range(n))


def guest_topology(cfg: VmConfig) -> Topology:
    """The vCPU topology: the configured one, else one socket of single-threaded cores."""
    t = cfg.cpu.topology
    if t is None:
        return flat_topology(cfg.vcpus)
    return Topology(t.sockets * t.dies, t.cores, t.threads)


def intx_line(vm: VmFd, gsi: int, lines: list[ResampleLine]) -> InterruptLine:
    """A PCI function's INTx: a resample irqfd (level semantics kept by KVM), or
    KVM_IRQ_LINE where this KVM has no resample irqfd."""
    try:
        line = ResampleLine(vm, gsi)
    except KvmError:
        return IrqLine(vm, gsi)
    lines.append(line)
    return line


def attach_pci(vm: VmFd, pio: Bus, mmio: Bus, cfg: VmConfig, memory: GuestMemory,
               hooks: Hooks, devices: DeviceManager,
               lines: list[ResampleLine], host: Optional[HostResources]) -> PciPlatform:
    """The chipset's PCI functions and bridges, resources assigned, on the buses;
    the INTx lines made are appended to ``lines`` (their resample fds need a loop)."""
    pci = pci_from_config(cfg, memory, on_reset=hooks.on_reset, host=host)
    for _bus, _dfn, fn, _parent in pci.root.walk():
        if isinstance(fn, VirtioPciFunction):
            fn.on_notify_moved = _ioeventfd_binder(vm, fn)
    pci.attach(pio, mmio, lambda gsi: intx_line(vm, gsi, lines))
    for bus, dfn, fn, _parent in pci.root.walk():
        devices.add(fn.name, fn.kind, fn, bdf_text(bus, dfn))
    return pci


def _ioeventfd_binder(vm: VmFd, fn: VirtioPciFunction) -> Callable[[Optional[int],
                                                                     Optional[int]], None]:
    """KVM signals a queue's eventfd itself when the guest writes its notify address:
    no exit to pyhv; the binding follows BAR4 when the guest moves it."""
    def bind(old: Optional[int], new: Optional[int]) -> None:
        for q, fd in enumerate(fn.notify_fds):
            if old is not None:
                vm.ioeventfd(fd, old + NOTIFY_MULTIPLIER * q, 0, deassign=True)
            if new is not None:
                vm.ioeventfd(fd, new + NOTIFY_MULTIPLIER * q, 0)
    return bind


@dataclass
class Attached:
    """What one virtio function added to its platform's lists (a hot-unplug takes
    it off them again)."""

    watches: list[tuple[int, Callable[[int], None], str]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    timed: list[object] = field(default_factory=list)
    served: list[object] = field(default_factory=list)

    def join(self, plat: Platform) -> None:
        plat.watches += self.watches
        plat.closers += self.closers
        plat.timed += self.timed
        plat.served += self.served

    def leave(self, plat: Platform) -> None:
        plat.watches = [w for w in plat.watches if w not in self.watches]
        plat.closers = [c for c in plat.closers if c not in self.closers]
        plat.timed = [t for t in plat.timed if t not in self.timed]
        plat.served = [s for s in plat.served if s not in self.served]


def attach_virtio(plat: Platform, hooks: Hooks) -> None:
    """MSI-X vectors through KVM, and the queue eventfds the machine's loop serves."""
    assert plat.pci is not None
    for _bus, _dfn, fn, _parent in plat.pci.root.walk():
        if isinstance(fn, VirtioPciFunction):
            att = plat.attached[fn.name] = attach_virtio_function(plat, hooks, fn)
            att.join(plat)


def attach_virtio_function(plat: Platform, hooks: Hooks, fn: VirtioPciFunction) -> Attached:
    """One virtio function's MSI-X vectors, queue eventfds and hooks; what the
    machine's loop must serve for it (not yet on the platform's lists)."""
    assert plat.irq is not None
    out = Attached()
    vectors = KvmMsiVectors(plat.irq, fn.msix.size)
    fn.attach_msi(vectors)
    out.closers.append(vectors.close)
    out.closers.append(fn.close)
    local: Any = range(len(fn.notify_fds))
    if hasattr(fn.device, "kick_fds"):
        # a vhost-user device: its backend reads the kicks (pyhv raises its calls),
        # but for the queues pyhv serves itself
        fn.device.kick_fds = fn.notify_fds
        fn.device.open_calls()  # type: ignore[attr-defined]
        local = fn.device.local_queues  # type: ignore[attr-defined]
    for q, fd in enumerate(fn.notify_fds):
        if q in local:
            out.watches.append((fd, functools.partial(_serve, fn, q), f"{fn.name} queue {q}"))
    if hasattr(fn.device, "close"):
        out.closers.append(fn.device.close)
    if hasattr(fn.device, "schedule"):
        out.timed.append(fn.device)
    if hasattr(fn.device, "start"):
        out.served.append(fn.device)
    _hook_up(fn, hooks)
    return out


def plug_virtio(plat: Platform, hooks: Hooks, memory: GuestMemory, port: RootPort,
                ident: str, device: VirtioDevice) -> Attached:
    """Hot-add a virtio device in ``port``'s slot of the running platform; what it
    added to the platform's lists (the caller's loop must serve ``watches``)."""
    assert plat.pci is not None
    fn = VirtioPciFunction(device, memory, ident, express=True, notify=True)
    fn.on_notify_moved = _ioeventfd_binder(plat.vm, fn)
    att = attach_virtio_function(plat, hooks, fn)
    lines: list[ResampleLine] = []
    try:
        plat.pci.plug(port, fn, lambda gsi: intx_line(plat.vm, gsi, lines))
    except BaseException:
        for close in reversed(att.closers + [line.close for line in lines]):
            close()
        raise
    for line in lines:
        att.watches.append((line.resample_fd, line.resampled, f"INTx GSI {line.gsi}"))
        att.closers.append(line.close)
    plat.devices.add(fn.name, fn.kind, fn, port.name)
    plat.attached[ident] = att
    att.join(plat)
    return att


def unplug_virtio(plat: Platform, port: RootPort) -> list[PciFunction]:
    """Take the card out of ``port``'s slot: off the buses and the platform's lists,
    its fds closed (take its ``attached`` watches off the loop first)."""
    assert plat.pci is not None
    gone = plat.pci.unplug(port)
    for fn in gone:
        plat.devices.remove(fn.name)
        att = plat.attached.pop(fn.name, None)
        if att is None:
            continue
        att.leave(plat)
        for close in att.closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing must not stop the others
                pass
    return gone


def _hook_up(fn: VirtioPciFunction, hooks: Hooks) -> None:
    """A device's notifications to the machine."""
    if hasattr(fn.device, "on_port_open"):
        fn.device.on_port_open = hooks.on_port_open
    if hasattr(fn.device, "on_filter_changed"):
        fn.device.on_filter_changed = functools.partial(hooks.on_rx_filter, fn.name)
    if hasattr(fn.device, "on_actual"):
        fn.device.on_actual = hooks.on_balloon
    if hasattr(fn.device, "on_io_error"):
        fn.device.on_io_error = functools.partial(hooks.on_block_error, fn.name)
    if hasattr(fn.device, "on_threshold"):
        fn.device.on_threshold = functools.partial(hooks.on_block_threshold, fn.name)


def _serve(fn: VirtioPciFunction, queue: int, _fd: int) -> None:
    fn.process(queue)


def isolate_failures(pio: Bus, mmio: Bus, devices: DeviceManager, hooks: Hooks) -> None:
    """A device model that raises is taken off both buses and marked broken; the
    machine and the other devices go on (``hooks.on_device_broken`` tells the owner)."""
    def broken(rec: DeviceRecord) -> None:
        dev = rec.device
        if isinstance(dev, PciFunction):
            dev.broken = True
            dev.detach()
        pio.remove_owner(dev)
        mmio.remove_owner(dev)
        hooks.on_device_broken(rec.id, rec.kind, rec.broken or "")

    def on_error(owner: object, name: str, error: Exception) -> None:
        import traceback

        where = traceback.extract_tb(error.__traceback__)[-1]
        why = f"{type(error).__name__}: {error} ({where.filename}:{where.lineno})"
        if devices.mark_broken(owner, why) is None:  # a range of no registered device
            hooks.on_device_broken(name, type(owner).__name__, why)

    devices.on_broken = broken
    pio.on_error = mmio.on_error = on_error


def acpi_description(cfg: VmConfig) -> AcpiPlatform:
    """What the ACPI tables of a machine built from ``cfg`` describe (pure)."""
    topo = guest_topology(cfg)
    slots = tuple(a.slot for a, _id, _what in pci_functions(place(cfg)) if a.bus == 0)
    return AcpiPlatform(cpus=cfg.vcpus,
                        apic_ids=tuple(topo.apic_id(i) for i in range(cfg.vcpus)),
                        pci_root=True, pci_intx_gsis=PCI_INTX_GSIS, pci_prt_slots=slots,
                        pci_express=machine_family(cfg.machine) == "q35",
                        pci_mmio64=mmio64_window(cfg.memory),
                        numa_nodes=tuple(
                            (tuple(i for i in c.cpus if i < cfg.vcpus), tuple(runs))
                            for c, runs in zip(
                                cfg.numa, layout.numa_ranges([c.memory for c in cfg.numa]))),
                        numa_distances=numa_distances(cfg))


def attach_firmware_tables(memory: GuestMemory, cfg: VmConfig,
                           topo: Topology, cpuid: Optional[list] = None) -> Optional[int]:
    """ACPI tables (unless ACPI is off), an MP table and the SMBIOS tables (``cpuid``:
    the boot vCPU's, for the processor structures); returns the RSDP's address."""
    apic_ids = tuple(topo.apic_id(i) for i in range(cfg.vcpus))
    rsdp = None
    if cfg.features.acpi:
        rsdp = write_acpi(memory, acpi_description(cfg))
    if cfg.vcpus <= MPTABLE_MAX_CPUS:
        write_mptable(memory, cfg.vcpus, apic_ids=apic_ids)
    write_smbios(memory, smbios_description(cfg, topo.sockets, topo.cores, topo.threads,
                                            cpuid))
    return rsdp


def load_guest(memory: GuestMemory, cfg: VmConfig,
               rsdp: Optional[int]) -> tuple[KernelImage, EntryState]:
    kernel = load_kernel(memory, cfg.boot.kernel, cfg.boot.protocol)
    initrd = load_initrd(memory, cfg.boot.initrd, kernel) if cfg.boot.initrd else None
    entry = configure_boot(memory, kernel, cfg.boot.cmdline, initrd,
                           layout.e820_map(cfg.memory), rsdp, cfg.memory)
    return kernel, entry


def machine_cpu(kvm: Kvm, cfg: VmConfig, supported_cpuid: list) -> GuestCpu:
    """The CPU model the vCPUs get (raises :class:`CpuModelRefused` naming what the
    host lacks); warns on stderr, as QEMU does, about features left out."""
    msrs = kvm.get_feature_msrs(list(FEATURE_MSRS)) \
        if cfg.cpu.mode == "custom" or cfg.cpu.features else {}
    cpu = guest_cpu(supported_cpuid, cfg.cpu, cfg.features, feature_msrs=msrs)
    warning = filtered_warning(cpu)
    if warning and cfg.cpu.check != "none":
        print(f"pyhv: {warning}", file=sys.stderr)
    return cpu


def attach_vcpus(kvm: Kvm, vm: VmFd, cfg: VmConfig, topo: Topology,
                 pio: Bus, mmio: Bus, hooks: Hooks, cpu: GuestCpu) -> list[Vcpu]:
    if not cpu.pmu and vm.check_extension(abi.CAP_PMU_CAPABILITY) & abi.PMU_CAP_DISABLE:
        try:
            vm.enable_cap(abi.CAP_PMU_CAPABILITY, abi.PMU_CAP_DISABLE)  # before any vCPU
        except KvmError as e:
            # EINVAL: this KVM has no vPMU to take away (kvm.enable_pmu=0); the
            # guest's CPUID (leaf 0xA) says there is none either way
            if e.errno != errno.EINVAL:
                raise
    vcpus = []
    for i in range(cfg.vcpus):
        fd = vm.create_vcpu(topo.apic_id(i))
        fd.set_cpuid2(cpu.table(i, topo))
        set_boot_msrs(fd)
        if cpu.msrs:
            set_boot_msrs(fd, cpu.msrs)
        init_fpu(fd)
        init_lapic_lints(fd)
        vcpus.append(Vcpu(fd, pio, mmio, hooks.on_vcpu_event))
    return vcpus


def attach_coalesced(vm: VmFd, vcpus: list[Vcpu], pio: Bus, serial: Serial16550,
                     closers: list[Callable[[], None]]) -> Optional[CoalescedPio]:
    """Coalesced port writes where nobody waits for them (see
    :mod:`pyhv.engine.coalesced`): the POST port always, COM1's data register while
    the UART has no interrupt enabled.  None where this KVM cannot."""
    if not vcpus or not vm.check_extension(abi.CAP_COALESCED_PIO):
        return None
    try:
        page = mmap.mmap(vcpus[0].fd.fd, PAGE_SIZE, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=abi.COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE)
    except (OSError, ValueError):
        return None
    co = CoalescedPio(memoryview(page), pio)

    def close() -> None:
        co.ring.release()
        page.close()
    closers.append(close)
    try:
        vm.coalesced_pio(layout.POST_PORT, 1)
    except KvmError:
        return None
    co.ports.add(layout.POST_PORT)

    def on_ier(ier: int) -> None:  # a vCPU wrote IER (the queued bytes went first)
        want, have = ier == 0, layout.COM1_PORT in co.ports
        if want == have:
            return
        try:
            vm.coalesced_pio(layout.COM1_PORT, 1, register=want)
        except KvmError:
            return  # the port keeps exiting: slower, still right
        (co.ports.add if want else co.ports.discard)(layout.COM1_PORT)
    serial.on_ier = on_ier
    on_ier(0)  # interrupts are off after a reset
    for v in vcpus:
        v.coalesced = co
    return co


def set_boot_msrs(fd: object, msrs: Optional[dict[int, int]] = None) -> None:
    """Write :data:`BOOT_MSRS` (or ``msrs``), skipping any this KVM refuses."""
    pending = dict(BOOT_MSRS if msrs is None else msrs)
    while pending:
        n = fd.set_msrs(pending)  # type: ignore[attr-defined]
        keys = list(pending)
        if n >= len(keys):
            return
        pending = {k: pending[k] for k in keys[n + 1:]}


def trace_to_stderr(bus_name: str) -> Callable[[str, int, int, int], None]:
    def trace(op: str, addr: int, size: int, value: int) -> None:
        val = "" if op == "read" else f" = {value:#x}"
        print(f"pyhv: unclaimed {bus_name} {op} {addr:#x}/{size}{val}", file=sys.stderr)
    return trace


def create_platform(kvm: Kvm, memory: GuestMemory, host_addrs: list[int], cfg: VmConfig,
                    host_serial: HostSerial, hooks: Hooks,
                    supported_cpuid: list, host: Optional[HostResources] = None
                    ) -> Platform:
    """Everything the machine is made of, before anything runs in it: the KVM VM and
    its memory and irqchip, the buses, every device, the vCPUs (not yet started).
    A cold boot (:func:`cold_boot`) or, later, a restore then gives it its state.
    ``host`` is what the caller opened on the host for the devices (virtio ports'
    ends, taps): it outlives the platform; without it, a port has no host end."""
    problems = unsupported(cfg)
    if problems:
        raise EngineError(problems[0])
    cpu = machine_cpu(kvm, cfg, supported_cpuid)
    vm = create_vm(kvm)
    try:
        attach_memory(vm, memory, host_addrs)
        routing = attach_irqchip(vm)
        pio, mmio = Bus("port I/O"), Bus("MMIO")
        if cfg.trace_io:
            pio.trace, mmio.trace = trace_to_stderr("port"), trace_to_stderr("MMIO")
        devices = DeviceManager()
        isolate_failures(pio, mmio, devices, hooks)
        serial, pm, uarts = attach_legacy_devices(vm, pio, cfg, host_serial, hooks, devices,
                                                  host)
        lines: list[ResampleLine] = []
        try:
            pci = attach_pci(vm, pio, mmio, cfg, memory, hooks, devices, lines, host)
        except BaseException:
            for line in lines:
                line.close()
            raise
        plat = Platform(vm, pio, mmio, serial, pm, pci=pci, devices=devices, irq=routing)
        plat.served.extend(uarts)
        for line in lines:
            plat.watches.append((line.resample_fd, line.resampled, f"INTx GSI {line.gsi}"))
            plat.closers.append(line.close)
        attach_virtio(plat, hooks)
        topo = guest_topology(cfg)
        plat.vcpus = attach_vcpus(kvm, vm, cfg, topo, pio, mmio, hooks, cpu)
        plat.coalesced = attach_coalesced(vm, plat.vcpus, pio, serial, plat.closers)
        plat.cpuid0 = cpu.table(0, topo)
        plat.cpu_filtered = cpu.filtered
        return plat
    except BaseException:
        vm.close()
        raise


def cold_boot(plat: Platform, memory: GuestMemory, cfg: VmConfig) -> None:
    """What a power-on gives the guest: firmware tables, the kernel (and initrd) in
    RAM, and the boot vCPU at the kernel's entry."""
    rsdp = attach_firmware_tables(memory, cfg, guest_topology(cfg), plat.cpuid0)
    plat.kernel, plat.entry = load_guest(memory, cfg, rsdp)
    plat.rsdp_addr = rsdp
    apply_entry_state(plat.vcpus[0].fd, plat.entry)


def build_platform(kvm: Kvm, memory: GuestMemory, host_addrs: list[int], cfg: VmConfig,
                   host_serial: HostSerial, hooks: Hooks,
                   supported_cpuid: list, host: Optional[HostResources] = None
                   ) -> Platform:
    """:func:`create_platform`, then :func:`cold_boot`."""
    plat = create_platform(kvm, memory, host_addrs, cfg, host_serial, hooks,
                           supported_cpuid, host)
    try:
        cold_boot(plat, memory, cfg)
    except BaseException:
        plat.close()
        raise
    return plat
