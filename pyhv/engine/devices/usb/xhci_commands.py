"""What qemu-xhci's command ring commands do, with nothing attached to any root hub port.

:func:`execute_command` takes one command TRB and returns the completion code
and slot id for its Command Completion Event.  It reads and writes guest
memory through the controller's DMA (a failure raises
:class:`~pyhv.engine.devices.usb.common.DmaError`: Host System Error, and no
completion).  Device slots only ever reach the Enabled state: Address Device
fails (no device answers on the port), so every command that needs an
addressed slot or a running endpoint fails with Context State Error.
"""

from __future__ import annotations

from typing import Protocol

from pyhv.engine.devices.usb.xhci_rings import (
    CC_CONTEXT_STATE_ERROR,
    CC_NO_SLOTS_AVAILABLE,
    CC_PARAMETER_ERROR,
    CC_SLOT_NOT_ENABLED,
    CC_SUCCESS,
    CC_TRB_ERROR,
    CC_USB_TRANSACTION_ERROR,
    TRB_ADDRESS_DEVICE,
    TRB_CONFIGURE_ENDPOINT,
    TRB_DISABLE_SLOT,
    TRB_ENABLE_SLOT,
    TRB_EVALUATE_CONTEXT,
    TRB_GET_PORT_BANDWIDTH,
    TRB_NOOP_COMMAND,
    TRB_RESET_DEVICE,
    TRB_RESET_ENDPOINT,
    TRB_SET_TR_DEQUEUE,
    TRB_STOP_ENDPOINT,
    Trb,
)

#: commands that need a slot past the Enabled state (or a configured endpoint)
_NEED_ADDRESSED = (TRB_CONFIGURE_ENDPOINT, TRB_EVALUATE_CONTEXT, TRB_RESET_ENDPOINT,
                   TRB_STOP_ENDPOINT, TRB_SET_TR_DEQUEUE, TRB_RESET_DEVICE)

# port speeds (the Protocol Speed ID defaults)
SPEED_FULL = 1
SPEED_LOW = 2
SPEED_HIGH = 3
SPEED_SUPER = 4

#: input context: control context, then the slot context (32-byte contexts)
CONTEXT_SIZE = 32
ADD_A0_A1 = 0x3


class Host(Protocol):
    """What the commands need of the controller."""

    slots: set[int]
    max_slots_en: int
    max_slots: int
    #: the USB major revision (2 or 3) of each root hub port, port 1 first
    port_majors: tuple[int, ...]

    def _dma_read(self, addr: int, size: int) -> bytes: ...

    def _dma_write(self, addr: int, data: bytes) -> None: ...


def execute_command(hc: Host, trb: Trb) -> tuple[int, int]:
    """(completion code, slot id) of one command."""
    kind, slot = trb.type, trb.slot
    if kind == TRB_NOOP_COMMAND:
        return CC_SUCCESS, 0
    if kind == TRB_ENABLE_SLOT:
        return _enable_slot(hc, trb)
    if kind == TRB_DISABLE_SLOT:
        if slot not in hc.slots:
            return CC_SLOT_NOT_ENABLED, slot
        hc.slots.discard(slot)
        return CC_SUCCESS, slot
    if kind == TRB_ADDRESS_DEVICE:
        return _address_device(hc, trb), slot
    if kind in _NEED_ADDRESSED:
        if slot not in hc.slots:
            return CC_SLOT_NOT_ENABLED, slot
        return CC_CONTEXT_STATE_ERROR, slot
    if kind == TRB_GET_PORT_BANDWIDTH:
        return _get_port_bandwidth(hc, trb)
    # optional commands pyhv does not offer (Force Event, Negotiate Bandwidth, Set
    # Latency Tolerance, Force Header, ...), and TRB types that are not commands
    return CC_TRB_ERROR, 0


def _enable_slot(hc: Host, trb: Trb) -> tuple[int, int]:
    if (trb.control >> 16) & 0x1F:
        return CC_TRB_ERROR, 0  # both Supported Protocol capabilities say slot type 0
    for slot in range(1, min(hc.max_slots_en, hc.max_slots) + 1):
        if slot not in hc.slots:
            hc.slots.add(slot)
            return CC_SUCCESS, slot
    return CC_NO_SLOTS_AVAILABLE, 0


def _address_device(hc: Host, trb: Trb) -> int:
    if trb.slot not in hc.slots:
        return CC_SLOT_NOT_ENABLED
    context = trb.parameter & ~0xF
    control = hc._dma_read(context, 8)
    drop = int.from_bytes(control[0:4], "little")
    add = int.from_bytes(control[4:8], "little")
    if drop or add != ADD_A0_A1:
        return CC_PARAMETER_ERROR
    slot_ctx = hc._dma_read(context + CONTEXT_SIZE, 8)
    port = slot_ctx[6]  # Root Hub Port Number: bits 23:16 of dword 1
    if not 1 <= port <= len(hc.port_majors):
        return CC_PARAMETER_ERROR
    # nothing is attached to any port: the SET_ADDRESS (or, with BSR, the default
    # control endpoint's set-up) gets no answer
    return CC_USB_TRANSACTION_ERROR


def _get_port_bandwidth(hc: Host, trb: Trb) -> tuple[int, int]:
    hub, speed = trb.slot, (trb.control >> 16) & 0xF
    if hub:
        # no hub can be attached, so no slot is one
        return (CC_SLOT_NOT_ENABLED if hub not in hc.slots else CC_PARAMETER_ERROR), hub
    if speed == SPEED_SUPER:
        major = 3
    elif speed in (SPEED_FULL, SPEED_LOW, SPEED_HIGH):
        major = 2
    else:
        return CC_PARAMETER_ERROR, 0
    # the Port Bandwidth Context: a reserved byte, then each port's free bandwidth (%)
    free = bytes([0] + [100 if m == major else 0 for m in hc.port_majors])
    hc._dma_write(trb.parameter & ~0xF, free)
    return CC_SUCCESS, 0
