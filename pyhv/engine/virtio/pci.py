"""The virtio-pci transport, modern (virtio 1.x) only.

A :class:`VirtioPciFunction` is the PCI face of a :class:`VirtioDevice`:
vendor 0x1af4, device 0x1040 + type, its structures behind vendor-specific
capabilities (common configuration, notifications, ISR, device configuration,
and the PCI configuration access window) in BAR4 (64-bit, 16 KiB), and MSI-X
(one vector per queue plus one for configuration changes) in BAR1; INTx with
the ISR when the driver does not use MSI-X.

The driver's status transitions are checked: features must be a subset of
what is offered and include VERSION_1 before FEATURES_OK sticks; DRIVER_OK
validates every enabled queue; anything the driver breaks sets NEEDS_RESET
(with a configuration interrupt) and the machine goes on.  Writing 0 resets.

Queue notifications never run device work on a vCPU: the notify register
signals the queue's eventfd (KVM signals it by itself once the engine has bound
it with KVM_IOEVENTFD at the BAR's address), and the engine's event loop calls
:meth:`VirtioPciFunction.process` for it.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Callable, Optional

from pyhv.engine.memory import GuestMemory
from pyhv.engine.pci.config import CAP_ID_EXP, CAP_ID_VENDOR, Bar, ConfigSpace
from pyhv.engine.pci.device import (
    PCIE_ENDPOINT,
    QEMU_SUBSYSTEM_VENDOR,
    PciFunction,
    pcie_capability,
)
from pyhv.engine.pci.msix import MsiSink, Msix
from pyhv.engine.virtio.device import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    VirtioDevice,
)
from pyhv.engine.virtio.queue import QueueError, SplitQueue, VirtioError

VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

NO_VECTOR = 0xFFFF

CAP_COMMON = 1
CAP_NOTIFY = 2
CAP_ISR = 3
CAP_DEVICE = 4
CAP_PCI_CFG = 5

MSIX_BAR = 1
MODERN_BAR = 4
MODERN_BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x1000
ISR_OFFSET, ISR_LENGTH = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4

#: the PCI class of each device type (what QEMU gives them)
CLASS_CODES = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00, 5: 0x00FF00,
               9: 0x000200}

#: offers of the transport itself (the device adds its own)
TRANSPORT_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX


class _Interrupts:
    """Queue and configuration interrupts: an MSI-X vector, or INTx and the ISR."""

    def __init__(self, fn: "VirtioPciFunction") -> None:
        self.fn = fn

    def queue(self, index: int) -> None:
        self.fn.raise_interrupt(self.fn.queue_vectors[index], 0x1)

    def config(self) -> None:
        # a driver reading the structure across the change sees the generation move
        self.fn.config_generation = (self.fn.config_generation + 1) & 0xFF
        self.fn.raise_interrupt(self.fn.config_vector, 0x2)


class VirtioPciFunction(PciFunction):
    kind = "virtio-pci"

    def __init__(self, device: VirtioDevice, memory: GuestMemory, name: str = "",
                 express: bool = False, notify: bool = True) -> None:
        t = device.device_type
        cfg = ConfigSpace(VIRTIO_VENDOR, MODERN_DEVICE_BASE + t, CLASS_CODES.get(t, 0xFF0000),
                          revision=1, subsystem_vendor=QEMU_SUBSYSTEM_VENDOR,
                          subsystem=0x1100, interrupt_pin=1, pcie=express,
                          bars=(Bar(MSIX_BAR, 0x1000),
                                Bar(MODERN_BAR, MODERN_BAR_SIZE, "mem64", True)))
        super().__init__(cfg, name or device.kind)
        self.kind = device.kind
        self.device = device
        self.memory = memory
        nq = len(device.queue_sizes)
        self.queues = [SplitQueue(size) for size in device.queue_sizes]
        if express:
            body, wmask = pcie_capability(PCIE_ENDPOINT)
            cfg.add_capability(CAP_ID_EXP, body, wmask)
        self.msix = Msix(cfg, nq + 1, MSIX_BAR, 0, 0x800)
        for cap_type, offset, length in ((CAP_COMMON, COMMON_OFFSET, COMMON_LENGTH),
                                         (CAP_ISR, ISR_OFFSET, ISR_LENGTH),
                                         (CAP_DEVICE, DEVICE_OFFSET, DEVICE_LENGTH)):
            self._vendor_cap(cap_type, offset, length)
        self._vendor_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_LENGTH,
                         struct.pack("<I", NOTIFY_MULTIPLIER))
        # the configuration access window: bar, offset, length are the driver's to set
        # (the mask covers the body: cap_len, cfg_type, bar, id, padding, offset,
        # length, data)
        self.pci_cfg = self._vendor_cap(CAP_PCI_CFG, 0, 0, bytes(4),
                                        wmask=bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 12)
        #: queue index -> eventfd the notify register signals (none in a description:
        #: ``notify=False``, nothing will run)
        self.notify_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                           for _ in range(nq if notify else 0)]
        #: (re)binds the notify addresses to the eventfds when BAR4 moves (KVM ioeventfd)
        self.on_notify_moved: Optional[Callable[[Optional[int], Optional[int]], None]] = None
        # reentrant: host work (a host end's event) may lead to more of it
        self._work = threading.RLock()
        self.broken_reason: Optional[str] = None
        device.guard = self.host_work
        self._reset_transport()
        self.snapshot_as_initial()

    def _vendor_cap(self, cap_type: int, offset: int, length: int, extra: bytes = b"",
                    wmask: Optional[bytes] = None) -> int:
        body = struct.pack("<BBBBBBII", 16 + len(extra), cap_type, MODERN_BAR, 0, 0, 0,
                           offset, length) + extra
        return self.config.add_capability(CAP_ID_VENDOR, body, wmask)

    # ---- state ---------------------------------------------------------------------
    def _reset_transport(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_generation = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self.isr = 0
        for q in self.queues:
            q.reset()
        self.drive_intx(False)

    @property
    def offered(self) -> int:
        return (TRANSPORT_FEATURES | self.device.features) & self.device.offer_mask

    def reset(self) -> None:
        """A platform reset (power cycle): the transport and the device start over."""
        with self._work:
            self.device.reset()
            self._reset_transport()
            self.msix.reset()
        super().reset()

    def attach_msi(self, sink: MsiSink) -> None:
        self.msix.attach(sink)

    # ---- interrupts ----------------------------------------------------------------
    def raise_interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        self.isr |= isr_bit
        self.drive_intx(True)

    def _needs_reset(self, why: str) -> None:
        self.broken_reason = why
        self.status |= STATUS_NEEDS_RESET
        self.raise_interrupt(self.config_vector, 0x2)

    # ---- configuration space: MSI-X control and the access window -------------------
    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        self.msix.config_written()
        data = self.pci_cfg + 16
        if offset == data:
            self._window(write=(size, value))

    def config_read(self, offset: int, size: int) -> int:
        if offset == self.pci_cfg + 16:
            return self._window()
        return super().config_read(offset, size)

    def _window(self, write: Optional[tuple[int, int]] = None) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG: reach the BAR structures through config space."""
        c = self.config
        bar = c.get(self.pci_cfg + 4, 1)
        off = c.get(self.pci_cfg + 8, 4)
        length = c.get(self.pci_cfg + 12, 4)
        if bar != MODERN_BAR or length not in (1, 2, 4):
            return 0
        if write is not None:
            self.bar_write(MODERN_BAR, off, length, write[1] & ((1 << (8 * length)) - 1))
            return 0
        return self.bar_read(MODERN_BAR, off, length)

    # ---- BAR accesses -------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == MSIX_BAR:
            return self.msix.read(offset, size)
        if index != MODERN_BAR:
            return 0
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            return self._common_read(offset - COMMON_OFFSET, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            value, self.isr = self.isr, 0  # reading acknowledges
            self.drive_intx(False)
            return value if offset == ISR_OFFSET else 0
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            cfg = self.device.config_bytes()
            o = offset - DEVICE_OFFSET
            return int.from_bytes(cfg[o:o + size].ljust(size, b"\0"), "little")
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == MSIX_BAR:
            self.msix.write(offset, size, value)
        elif index != MODERN_BAR:
            return
        elif COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            with self._work:
                try:
                    self.device.write_config(offset - DEVICE_OFFSET,
                                             value.to_bytes(size, "little"))
                except VirtioError as e:
                    self._needs_reset(str(e))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            q = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if q < len(self.notify_fds):
                os.eventfd_write(self.notify_fds[q], 1)  # served off the vCPU

    def _queue(self) -> Optional[SplitQueue]:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) \
            else None

    def _common_read(self, off: int, size: int) -> int:
        q = self._queue()
        regs = {
            0x00: (4, self.device_feature_select),
            0x04: (4, (self.offered >> (32 * self.device_feature_select)) & 0xFFFFFFFF
                   if self.device_feature_select < 2 else 0),
            0x08: (4, self.driver_feature_select),
            0x0C: (4, (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                   if self.driver_feature_select < 2 else 0),
            0x10: (2, self.config_vector),
            0x12: (2, len(self.queues)),
            0x14: (1, self.status),
            0x15: (1, self.config_generation),
            0x16: (2, self.queue_select),
            0x18: (2, q.size if q else 0),
            0x1A: (2, self.queue_vectors[self.queue_select] if q else NO_VECTOR),
            0x1C: (2, int(q.ready) if q else 0),
            0x1E: (2, self.queue_select if q else 0),
            0x20: (8, q.desc_addr if q else 0),
            0x28: (8, q.avail_addr if q else 0),
            0x30: (8, q.used_addr if q else 0),
        }
        for base, (width, value) in regs.items():
            if base <= off and off + size <= base + width:
                return (value >> (8 * (off - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        q = self._queue()
        live = bool(self.status & STATUS_DRIVER_OK)
        if off == 0x00 and size == 4:
            self.device_feature_select = value
        elif off == 0x08 and size == 4:
            self.driver_feature_select = value
        elif off == 0x0C and size == 4:
            if self.status & STATUS_FEATURES_OK or self.driver_feature_select > 1:
                return  # features are fixed once accepted
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | \
                (value << shift)
        elif off == 0x10 and size == 2:
            self.config_vector = value if value < self.msix.size else NO_VECTOR
        elif off == 0x14 and size == 1:
            self._set_status(value)
        elif off == 0x16 and size == 2:
            self.queue_select = value
        elif q is None or live:
            return  # queue registers: for an existing queue, before DRIVER_OK
        elif off == 0x18 and size == 2:
            q.size = value
        elif off == 0x1A and size == 2:
            self.queue_vectors[self.queue_select] = value if value < self.msix.size \
                else NO_VECTOR
        elif off == 0x1C and size == 2 and value == 1:
            q.ready = True
        elif off in (0x20, 0x24, 0x28, 0x2C, 0x30, 0x34) and size in (4, 8):
            attr = {0x20: "desc_addr", 0x28: "avail_addr", 0x30: "used_addr"}[off & ~7]
            cur = getattr(q, attr)
            if size == 8:
                cur = value
            elif off & 4:
                cur = (cur & 0xFFFFFFFF) | (value << 32)
            else:
                cur = (cur & ~0xFFFFFFFF) | value
            setattr(q, attr, cur)

    # ---- status and activation ----------------------------------------------------------
    def _set_status(self, value: int) -> None:
        if value == 0:
            with self._work:
                self.device.reset()
                self._reset_transport()
                self.broken_reason = None
            return
        new = value & ~self.status
        if new & STATUS_FEATURES_OK:
            ok = self.driver_features & ~self.offered == 0 and \
                self.driver_features & F_VERSION_1
            if not ok:
                value &= ~STATUS_FEATURES_OK  # the driver reads it back and gives up
        if new & STATUS_DRIVER_OK:
            if not self.status & STATUS_FEATURES_OK and not value & STATUS_FEATURES_OK:
                self.status |= value & ~STATUS_DRIVER_OK
                self._needs_reset("DRIVER_OK before FEATURES_OK")
                return
            self.status |= value
            self._activate()
            return
        self.status |= value

    def _activate(self) -> None:
        event_idx = bool(self.driver_features & F_RING_EVENT_IDX)
        indirect = bool(self.driver_features & F_RING_INDIRECT_DESC)
        try:
            for q in self.queues:
                q.event_idx, q.indirect = event_idx, indirect
                if q.ready:
                    q.validate(self.memory)
        except QueueError as e:
            self._needs_reset(str(e))
            return
        with self._work:
            try:
                self.device.activate(self.memory, self.queues, _Interrupts(self),
                                     self.driver_features)
            except VirtioError as e:  # e.g. a vhost-user backend that cannot be reached
                self._needs_reset(str(e))

    def process(self, index: int) -> None:
        """Serve queue ``index`` (the engine's loop, after its eventfd fired)."""
        try:
            os.eventfd_read(self.notify_fds[index])
        except BlockingIOError:
            pass
        with self._work:
            if not self.status & STATUS_DRIVER_OK or self.status & STATUS_NEEDS_RESET:
                return  # a notification before DRIVER_OK or after a break: nothing to do
            if not self.queues[index].ready:
                return
            try:
                self.device.queue_notify(index)
            except VirtioError as e:
                self._needs_reset(str(e))

    def host_work(self, work: Callable[[], None]) -> None:
        """Run device work the host side started (a timer, input on a host end), as
        :meth:`process` runs queue work: under the lock, not on a broken device."""
        with self._work:
            if self.status & STATUS_NEEDS_RESET:
                return
            try:
                work()
            except VirtioError as e:
                self._needs_reset(str(e))

    # ---- BAR4 moves: the notify addresses follow -----------------------------------------
    def _remap(self, index: int) -> None:
        before = self.mapped.get(index)
        super()._remap(index)
        after = self.mapped.get(index)
        if index == MODERN_BAR and before != after and self.on_notify_moved is not None:
            self.on_notify_moved(None if before is None else before + NOTIFY_OFFSET,
                                 None if after is None else after + NOTIFY_OFFSET)

    def detach(self) -> None:
        at = self.mapped.get(MODERN_BAR)
        super().detach()
        if at is not None and self.on_notify_moved is not None:  # KVM lets go of the fds
            self.on_notify_moved(at + NOTIFY_OFFSET, None)

    def close(self) -> None:
        for fd in self.notify_fds:
            os.close(fd)
        self.notify_fds = []
