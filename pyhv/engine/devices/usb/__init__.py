"""USB host controllers as PCI register models: UHCI, EHCI and xHCI.

The controllers libvirt adds to domains by default (``piix3-usb-uhci`` on
``pc``, ``ich9-usb-ehci1`` with its ``ich9-usb-uhci1..3`` companions, or
``qemu-xhci``), modelled closely enough that a guest's driver (Linux's
uhci_hcd, ehci_hcd, xhci_hcd) resets, configures and runs them and finds an
empty root hub: no USB device can be attached yet.

Each is a :class:`~pyhv.engine.pci.device.PciFunction` with QEMU's ids and
class codes, answering its BAR through ``bar_read``/``bar_write``, doing DMA
through an injected :class:`~pyhv.engine.memory.GuestMemory`, raising INTx
(level-triggered) on the line the platform wires, and reading an injected
monotonic clock for its frame counter.  No threads, timers, sockets or KVM.

:func:`usb_controller` builds one by its QEMU device name.
"""

from __future__ import annotations

import time
from typing import Union

from pyhv.engine.devices.usb.common import Clock, DmaError, UsbError, UsbHostController
from pyhv.engine.devices.usb.ehci import EhciController
from pyhv.engine.devices.usb.uhci import UhciController
from pyhv.engine.devices.usb.xhci import XhciController
from pyhv.engine.memory import GuestMemory

UHCI_MODELS = ("piix3-usb-uhci", "ich9-usb-uhci1", "ich9-usb-uhci2", "ich9-usb-uhci3")
EHCI_MODELS = ("ich9-usb-ehci1",)
XHCI_MODELS = ("qemu-xhci",)
MODELS = UHCI_MODELS + EHCI_MODELS + XHCI_MODELS

AnyController = Union[UhciController, EhciController, XhciController]


def usb_controller(model: str, memory: GuestMemory, name: str = "",
                   clock: Clock = time.monotonic, express: bool = False) -> AnyController:
    """The controller QEMU calls ``model`` (``express``: xHCI on a PCI Express port
    gets a PCI Express capability)."""
    if model in UHCI_MODELS:
        return UhciController(memory, model, name, clock)
    if model in EHCI_MODELS:
        return EhciController(memory, model, name, clock)
    if model in XHCI_MODELS:
        return XhciController(memory, name or model, clock, express)
    raise ValueError(f"no USB controller model {model!r} (pyhv has {', '.join(MODELS)})")


__all__ = [
    "AnyController",
    "DmaError",
    "EhciController",
    "MODELS",
    "UhciController",
    "UsbError",
    "UsbHostController",
    "XhciController",
    "usb_controller",
]
