"""MSI vectors through KVM: the GSI routing table and irqfds (tier kvm: a real VM,
no guest)."""

from __future__ import annotations

import os

import pytest

from pyhv.engine.irq import MSI_GSI_BASE, GsiRouting, KvmMsiVectors

pytestmark = pytest.mark.kvm


@pytest.fixture
def vm():
    from pyhv.engine.kvm import Kvm

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs read-write /dev/kvm")
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    yield vm
    vm.close()
    kvm.close()


def test_msi_vectors_get_gsis_irqfds_and_routes(vm) -> None:
    routing = GsiRouting(vm)
    a = KvmMsiVectors(routing, 3)
    b = KvmMsiVectors(routing, 2)
    try:
        assert a.gsis == [MSI_GSI_BASE, MSI_GSI_BASE + 1, MSI_GSI_BASE + 2]
        assert b.gsis == [MSI_GSI_BASE + 3, MSI_GSI_BASE + 4]
        calls: list[int] = []
        real = vm.set_gsi_routing
        vm.set_gsi_routing = lambda routes: (calls.append(len(list(routes))), real(routes))
        a.route(0, 0xFEE0_0000, 0x30)
        b.route(1, 0xFEE0_1000, 0x31)
        a.route(0, 0xFEE0_0000, 0x32)     # reprogrammed: the table is replaced
        a.route(2, None, 0)               # never routed: nothing to remove
        a.route(0, None, 0)
        base = len(routing._base)
        assert calls == [base + 1, base + 2, base + 2, base + 1]
        a.fire(1)                          # an unrouted vector's irqfd: KVM drops it
        b.fire(1)
    finally:
        a.close()
        b.close()


def test_resample_line_raises_the_ioapic_pin(vm) -> None:
    """INTx through a resample irqfd: asserting raises the IOAPIC pin (its IRR bit);
    the resample eventfd is what KVM signals at the guest's EOI."""
    import time

    from pyhv.engine.irq import ResampleLine
    from pyhv.engine.kvm import abi

    vm.set_gsi_routing(GsiRouting(vm)._base)
    line = ResampleLine(vm, 20)
    try:
        def irr() -> int:
            return vm.get_irqchip(abi.IRQCHIP_IOAPIC).chip.ioapic.irr

        assert not irr() & (1 << 20)
        line.set_level(True)
        deadline = time.monotonic() + 2
        while not irr() & (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)  # KVM injects from its irqfd worker
        assert irr() & (1 << 20)
        line.resampled()  # nothing signalled yet: no second assertion, no error
    finally:
        line.close()
