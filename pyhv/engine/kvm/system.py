"""``/dev/kvm``: the system handle."""

from __future__ import annotations

import errno
import os

from pyhv.engine.kvm import abi
from pyhv.engine.kvm._ffi import ffi
from pyhv.engine.kvm.ioctl import KvmError, KvmUnavailable, ioctl
from pyhv.engine.kvm.vm import VmFd

#: capabilities the engine cannot run without, with what each is for
REQUIRED_CAPS = {
    abi.CAP_USER_MEMORY: "user memory regions",
    abi.CAP_IRQCHIP: "in-kernel irqchip",
    abi.CAP_PIT2: "in-kernel PIT",
    abi.CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID",
    abi.CAP_IMMEDIATE_EXIT: "immediate_exit",
    abi.CAP_MP_STATE: "vCPU MP state",
    abi.CAP_IRQ_ROUTING: "GSI routing",
}


class Kvm:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailable(f"{path} (is the kvm module loaded?)", errno.ENOENT) from e
        except PermissionError as e:
            raise KvmUnavailable(f"{path} (needs read-write access: root or group kvm)",
                                 errno.EACCES) from e
        except OSError as e:
            raise KvmUnavailable(path, e.errno or errno.EIO) from e
        version = self.get_api_version()
        if version != abi.KVM_API_VERSION:
            raise KvmUnavailable(f"{path}: KVM API version {version}, need "
                                 f"{abi.KVM_API_VERSION}", errno.ENOTSUP)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def get_api_version(self) -> int:
        return ioctl(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def require(self, caps: dict[int, str] = REQUIRED_CAPS) -> None:
        """Raise :class:`KvmUnavailable` naming the first missing capability."""
        for cap, what in caps.items():
            if self.check_extension(cap) <= 0:
                raise KvmUnavailable(f"{self.path} lacks {what} (KVM capability {cap})",
                                     errno.ENOTSUP)

    def get_vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        return (self.check_extension(abi.CAP_MAX_VCPUS)
                or self.check_extension(abi.CAP_NR_VCPUS) or 4)

    def get_supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """Entries as (function, index, flags, eax, ebx, ecx, edx)."""
        n = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            try:
                ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in buf.entries[0:buf.nent]]

    def get_msr_index_list(self) -> list[int]:
        n = 256
        while True:
            buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            try:
                ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", buf)
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 8192:
                    n *= 2
                    continue
                raise
            return list(buf.indices[0:buf.nmsrs])

    def get_feature_msrs(self, indices: list[int]) -> dict[int, int]:
        """Feature MSRs (IA32_ARCH_CAPABILITIES...) as KVM can give them to a vCPU;
        empty where this KVM has no KVM_CAP_GET_MSR_FEATURES."""
        if self.check_extension(abi.CAP_GET_MSR_FEATURES) <= 0 or not indices:
            return {}
        out = {}
        for index in indices:
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": 1, "entries": 1})
            buf.entries[0].index = index
            try:
                if ioctl(self.fd, "KVM_GET_MSRS", buf) == 1:
                    out[index] = int(buf.entries[0].data)
            except KvmError:
                continue
        return out

    def create_vm(self) -> VmFd:
        while True:
            try:
                fd = ioctl(self.fd, "KVM_CREATE_VM", 0)
                break
            except KvmError as e:
                if e.errno != errno.EINTR:
                    raise
        return VmFd(fd, self.get_vcpu_mmap_size())
