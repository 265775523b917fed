"""What a virtio device is to its transport: features, configuration space, queues.

Device logic lives in subclasses of :class:`VirtioDevice` and knows nothing of
PCI: the transport (:mod:`pyhv.engine.virtio.pci`) negotiates features, sets
up the :class:`SplitQueue` objects, and at DRIVER_OK calls :meth:`activate`
with guest memory and an :class:`Interrupts` to raise; a queue notification
(an ioeventfd the engine's loop watches, or a direct call in tests) reaches
:meth:`VirtioDevice.queue_notify`.  A device that finds the driver broke the
protocol raises :class:`QueueError`; the transport then sets NEEDS_RESET.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from pyhv.engine.memory import GuestMemory
from pyhv.engine.virtio.queue import SplitQueue

# device-independent feature bits
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33

# device types (virtio 1.x, section 5)
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_CONSOLE = 3
TYPE_RNG = 4
TYPE_BALLOON = 5
TYPE_9P = 9


class Interrupts(Protocol):
    def queue(self, index: int) -> None:
        """The device used buffers of queue ``index`` (the transport decides whether
        and how the driver is interrupted)."""

    def config(self) -> None:
        """The device configuration changed."""


class VirtioDevice:
    """A device's logic; subclasses fill in the class attributes and the hooks."""

    device_type: int = 0
    #: the largest size of each queue (one entry per queue)
    queue_sizes: tuple[int, ...] = ()
    #: device-specific feature bits offered (VERSION_1 and the ring features are the
    #: transport's)
    features: int = 0
    #: what this device is, in one line (``pyhv domxml check``)
    kind: str = "virtio"
    #: the transport's own offers this device can honour (a vhost-user backend may
    #: lack a ring feature)
    offer_mask: int = ~0

    def __init__(self) -> None:
        self.memory: Optional[GuestMemory] = None
        self.queues: list[SplitQueue] = []
        self.interrupts: Optional[Interrupts] = None
        self.acked_features = 0
        #: runs host-side work (a timer, a host end's event) as the transport runs
        #: queue work: under its lock, a broken device set to NEEDS_RESET
        self.guard: Callable[[Callable[[], None]], None] = lambda work: work()

    # ---- configuration space -------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device configuration structure as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote the configuration space (most fields are read-only)."""
        return None

    # ---- lifecycle -----------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: list[SplitQueue],
                 interrupts: Interrupts, features: int) -> None:
        """DRIVER_OK: the queues are set up; start serving them."""
        self.memory, self.queues, self.interrupts = memory, queues, interrupts
        self.acked_features = features

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index``."""
        return None

    def reset(self) -> None:
        """The driver wrote 0 to the device status: back to the initial state."""
        self.memory, self.queues, self.interrupts = None, [], None
        self.acked_features = 0
