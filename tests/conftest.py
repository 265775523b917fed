"""Shared fixtures and test tiers.

Tiers (markers): pure tests need nothing; ``kvm`` needs read-write /dev/kvm;
``qemu`` needs qemu-system-x86_64 (and /dev/kvm); ``linux`` boots Debian's
cloud kernel; ``hwvirt`` needs /dev/kvm backed by VT-x/AMD-V (kvm_intel or
kvm_amd).  A tier that cannot run skips with its reason, counted in pytest's
summary (``-ra``).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def hwvirt() -> bool:
    return any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))


#: the newer QEMU scripts/setup unpacks from Debian's backports (not installed)
NEW_QEMU = Path("/var/lib/pyhv/qemu")


def new_qemu() -> tuple[list[str], dict[str, str]]:
    """The backports QEMU as (argv prefix, environment), or skip the test: Debian
    12's QEMU 7.2 has no generic vhost-user front and its TCG dies when a
    vhost-user netdev starts."""
    binary = NEW_QEMU / "usr/bin/qemu-system-x86_64"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"no QEMU from Debian's backports in {NEW_QEMU} (scripts/setup "
                    f"unpacks it when the archive is reachable)")
    env = dict(os.environ, QEMU_MODULE_DIR=str(NEW_QEMU / "usr/lib/x86_64-linux-gnu/qemu"))
    return [str(binary), "-L", str(NEW_QEMU / "usr/share/qemu")], env


def cloud_kernel() -> str | None:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    return found[-1] if found else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {}
    if not kvm_usable():
        reasons["kvm"] = "/dev/kvm is absent or not read-write for this user"
    if not shutil.which("qemu-system-x86_64"):
        reasons["qemu"] = "qemu-system-x86_64 is not installed"
    elif not kvm_usable():
        reasons["qemu"] = "/dev/kvm is absent or not read-write for this user"
    if not cloud_kernel():
        reasons["linux"] = "Debian's linux-image-cloud-amd64 is not installed"
    if not hwvirt():
        reasons["hwvirt"] = ("/dev/kvm is not hardware-backed here (no kvm_intel/kvm_amd: "
                             "PVM emulates guest kernel code, a full Linux boot takes hours)")
    for item in items:
        for mark, why in reasons.items():
            if item.get_closest_marker(mark) is not None:
                item.add_marker(pytest.mark.skip(reason=why))
                break


@pytest.fixture(scope="session")
def guests(tmp_path_factory: pytest.TempPathFactory):
    """The test-guest kit, built from tests/guests with gcc."""
    from guests.build import build_guests

    return build_guests(tmp_path_factory.mktemp("guests"))
