"""A KVM virtual machine handle."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Iterable, Optional

from pyhv.engine.kvm import abi
from pyhv.engine.kvm._ffi import ffi
from pyhv.engine.kvm.ioctl import KvmError, ioctl
from pyhv.engine.kvm.vcpu import VcpuFd


class IrqRoute:
    """One GSI routing entry: to an irqchip pin or an MSI message."""

    __slots__ = ("gsi", "kind", "a", "b", "c")

    def __init__(self, gsi: int, kind: int, a: int, b: int, c: int = 0) -> None:
        self.gsi, self.kind, self.a, self.b, self.c = gsi, kind, a, b, c

    @classmethod
    def irqchip(cls, gsi: int, chip: int, pin: int) -> "IrqRoute":
        return cls(gsi, abi.IRQ_ROUTING_IRQCHIP, chip, pin)

    @classmethod
    def msi(cls, gsi: int, address: int, data: int) -> "IrqRoute":
        return cls(gsi, abi.IRQ_ROUTING_MSI, address & 0xFFFFFFFF, address >> 32, data)


def default_routes(pins: int = 24) -> list[IrqRoute]:
    """The PC routing KVM installs with its irqchip: GSI 0-15 to both PICs and
    the IOAPIC (GSI 2 only to the IOAPIC), GSI 16-23 to the IOAPIC."""
    routes = []
    for gsi in range(pins):
        if gsi < 16 and gsi != 2:
            chip = abi.IRQCHIP_PIC_MASTER if gsi < 8 else abi.IRQCHIP_PIC_SLAVE
            routes.append(IrqRoute.irqchip(gsi, chip, gsi % 8))
        routes.append(IrqRoute.irqchip(gsi, abi.IRQCHIP_IOAPIC, gsi))
    return routes


class VmFd:
    """A VM: memory slots, irqchip, PIT, interrupts, vCPU creation."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        #: the size of each vCPU's shared ``struct kvm_run`` mapping
        self.vcpu_mmap_size = vcpu_mmap_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int,
                               host_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_addr,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        ioctl(self.fd, "KVM_CREATE_IRQCHIP", 0)

    def create_pit2(self, flags: int = abi.PIT_SPEAKER_DUMMY) -> None:
        ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, "KVM_IRQ_LINE",
              ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def get_irqchip(self, chip_id: int) -> "ffi.CData":
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: "ffi.CData") -> None:
        ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def set_gsi_routing(self, routes: Iterable[IrqRoute]) -> None:
        routes = list(routes)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for e, r in zip(table.entries, routes):
            e.gsi, e.type = r.gsi, r.kind
            if r.kind == abi.IRQ_ROUTING_IRQCHIP:
                e.u.irqchip.irqchip, e.u.irqchip.pin = r.a, r.b
            else:
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = r.a, r.b, r.c
        ioctl(self.fd, "KVM_SET_GSI_ROUTING", table)

    def irqfd(self, fd: int, gsi: int, resample_fd: Optional[int] = None,
              deassign: bool = False) -> None:
        flags = (abi.IRQFD_FLAG_DEASSIGN if deassign else 0) | \
            (abi.IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0)
        ioctl(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": flags, "resamplefd": resample_fd or 0}))

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: Optional[int] = None, deassign: bool = False) -> None:
        flags = (abi.IOEVENTFD_FLAG_PIO if pio else 0) | \
            (abi.IOEVENTFD_FLAG_DEASSIGN if deassign else 0) | \
            (abi.IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
        ioctl(self.fd, "KVM_IOEVENTFD", ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd,
            "flags": flags}))

    def signal_msi(self, address: int, data: int) -> int:
        return ioctl(self.fd, "KVM_SIGNAL_MSI", ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data}))

    def enable_cap(self, cap: int, *args: int) -> None:
        ioctl(self.fd, "KVM_ENABLE_CAP", ffi.new("struct kvm_enable_cap *", {
            "cap": cap, "args": list(args) + [0] * (4 - len(args))}))

    def coalesced_pio(self, port: int, size: int, register: bool = True) -> None:
        """Queue guest writes to ``[port, port+size)`` in the coalesced ring instead
        of exiting (``register`` False: exit again)."""
        request = abi.REGISTER_COALESCED_MMIO if register else abi.UNREGISTER_COALESCED_MMIO
        try:
            fcntl.ioctl(self.fd, request, struct.pack("=QII", port, size, 1))
        except OSError as e:
            raise KvmError("KVM_(UN)REGISTER_COALESCED_MMIO", e.errno or 0) from None

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = ioctl(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        return VcpuFd(fd, vcpu_id, self.vcpu_mmap_size)
