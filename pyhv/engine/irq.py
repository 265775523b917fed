"""Interrupt delivery through KVM: the VM's one GSI routing table, and MSI vectors
as irqfds.

KVM replaces the whole routing table on every KVM_SET_GSI_ROUTING, so one
:class:`GsiRouting` owns it: the irqchip routes the platform starts with plus
an MSI route per live vector.  :class:`KvmMsiVectors` is the
:class:`pyhv.engine.pci.msix.MsiSink` of one function: every vector gets a GSI
and an eventfd bound to it with KVM_IRQFD, so raising a vector from any thread
(a device worker, the event loop) is one ``eventfd_write`` and no vCPU exit.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from pyhv.engine.kvm import KvmError
from pyhv.engine.kvm.vm import IrqRoute, VmFd, default_routes
from pyhv.engine.layout import IOAPIC_PINS
from pyhv.engine.resources import GsiAllocator

#: GSIs for MSI routes: above the IOAPIC's pins
MSI_GSI_BASE = IOAPIC_PINS
MSI_GSI_LIMIT = 1024


class GsiRouting:
    def __init__(self, vm: VmFd) -> None:
        self.vm = vm
        self._base = default_routes(IOAPIC_PINS)
        self._msi: dict[int, IrqRoute] = {}
        self._lock = threading.Lock()
        self.gsis = GsiAllocator(MSI_GSI_BASE, MSI_GSI_LIMIT)

    def set_msi(self, gsi: int, address: Optional[int], data: int) -> None:
        """Route ``gsi`` to an MSI message (``address`` None: remove the route)."""
        with self._lock:
            if address is None:
                if self._msi.pop(gsi, None) is None:
                    return
            else:
                self._msi[gsi] = IrqRoute.msi(gsi, address, data)
            self.vm.set_gsi_routing(self._base + list(self._msi.values()))


class KvmMsiVectors:
    """The MSI-X vectors of one function, delivered by KVM through irqfds."""

    def __init__(self, routing: GsiRouting, count: int) -> None:
        self.routing = routing
        self.gsis = [routing.gsis.allocate() for _ in range(count)]
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        for fd, gsi in zip(self.fds, self.gsis):
            routing.vm.irqfd(fd, gsi)

    def route(self, vector: int, address: Optional[int], data: int) -> None:
        self.routing.set_msi(self.gsis[vector], address, data)

    def fire(self, vector: int) -> None:
        os.eventfd_write(self.fds[vector], 1)

    def close(self) -> None:
        for fd, gsi in zip(self.fds, self.gsis):
            try:
                self.routing.vm.irqfd(fd, gsi, deassign=True)
            except KvmError:
                pass  # the VM is closed already: KVM dropped the binding with it
            os.close(fd)
        self.fds = []


class ResampleLine:
    """A level-triggered INTx line as an irqfd with a resample eventfd.

    Asserting signals the irqfd (KVM raises the GSI: one eventfd write from any
    thread, no ioctl).  KVM lowers the line itself when the guest EOIs it and
    signals the resample eventfd; :meth:`resampled` (the machine's loop) then
    raises it again if the device still asserts it.  Several functions may share
    a GSI (the INTx swizzle): each has its own irqfd, KVM ORs them.
    """

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self.gsi = gsi
        self.level = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            vm.irqfd(self.fd, gsi, resample_fd=self.resample_fd)
        except BaseException:
            self.close()
            raise

    def set_level(self, asserted: bool) -> None:
        self.level = asserted
        if asserted:
            os.eventfd_write(self.fd, 1)

    def pulse(self) -> None:
        os.eventfd_write(self.fd, 1)

    def resampled(self, _fd: int = -1) -> None:
        try:
            os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return
        if self.level:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        for fd in (self.fd, self.resample_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.resample_fd = -1
