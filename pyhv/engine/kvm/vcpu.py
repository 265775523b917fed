"""A KVM vCPU handle."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from typing import Iterable

from pyhv.engine.kvm import abi
from pyhv.engine.kvm._ffi import ffi
from pyhv.engine.kvm.exits import (
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unsupported,
    VcpuExit,
)
from pyhv.engine.kvm.ioctl import NUMBERS, KvmError, libc

_KVM_RUN = ffi.cast("unsigned long", NUMBERS["KVM_RUN"])
_ZERO = ffi.cast("unsigned long", 0)
_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTERRUPTED = Interrupted()
#: ``kvm_run.io``: direction, size, port, count, data_offset
_IO = struct.Struct("=BBHIQ")
_IO_OFFSET = int(ffi.offsetof("struct kvm_run", "io"))


class VcpuFd:
    """A vCPU: register state and KVM_RUN."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._mem = memoryview(self._map)
        self._buf = ffi.from_buffer(self._map)
        #: the shared ``struct kvm_run``
        self.run_struct = ffi.cast("struct kvm_run *", self._buf)

    def close(self) -> None:
        if self.fd >= 0:
            self.run_struct = None
            del self._buf
            self._mem.release()
            self._map.close()
            os.close(self.fd)
            self.fd = -1

    # ---- running --------------------------------------------------------
    def set_immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = int(value)

    def run(self) -> VcpuExit:
        """Enter the guest until it exits to userspace; return why."""
        ret = libc.ioctl(self.fd, _KVM_RUN, _ZERO)
        run = self.run_struct
        if ret < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):
                return _INTERRUPTED
            raise KvmError("KVM_RUN", err)
        reason = run.exit_reason
        if reason == abi.EXIT_IO:
            # one unpack instead of five cffi attribute reads (port I/O is the
            # commonest exit: every UART byte)
            direction, size, port, count, off = _IO.unpack_from(self._mem, _IO_OFFSET)
            n = size * count
            if direction == abi.EXIT_IO_OUT:
                return IoOut(port, size, count, bytes(self._mem[off:off + n]))
            return IoIn(port, size, count, self._mem[off:off + n])
        if reason == abi.EXIT_MMIO:
            m = run.mmio
            n = m.len
            if m.is_write:
                return MmioWrite(m.phys_addr, n, bytes(ffi.buffer(m.data, n)))
            off = 32 + 8  # offsetof(kvm_run, mmio.data)
            return MmioRead(m.phys_addr, n, self._mem[off:off + n])
        if reason == abi.EXIT_HLT:
            return _HLT
        if reason == abi.EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == abi.EXIT_INTR:
            return _INTERRUPTED
        if reason == abi.EXIT_SYSTEM_EVENT:
            ev = run.system_event
            return SystemEvent(ev.type, tuple(ev.data[0:min(ev.ndata, 16)]))
        if reason == abi.EXIT_INTERNAL_ERROR:
            ie = run.internal
            return InternalError(ie.suberror, tuple(ie.data[0:min(ie.ndata, 16)]))
        if reason == abi.EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        return Unsupported(reason)

    # ---- state ------------------------------------------------------------
    def _get(self, name: str, ctype: str) -> "ffi.CData":
        obj = ffi.new(ctype)
        self._call(name, obj)
        return obj

    def _call(self, name: str, arg: "ffi.CData") -> None:
        if libc.ioctl(self.fd, ffi.cast("unsigned long", NUMBERS[name]), arg) < 0:
            raise KvmError(name, ffi.errno)

    def get_regs(self) -> "ffi.CData":
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: "ffi.CData") -> None:
        self._call("KVM_SET_REGS", regs)

    def get_sregs(self) -> "ffi.CData":
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: "ffi.CData") -> None:
        self._call("KVM_SET_SREGS", sregs)

    def get_fpu(self) -> "ffi.CData":
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: "ffi.CData") -> None:
        self._call("KVM_SET_FPU", fpu)

    def get_lapic(self) -> "ffi.CData":
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic: "ffi.CData") -> None:
        self._call("KVM_SET_LAPIC", lapic)

    def get_mp_state(self) -> int:
        return int(self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state)

    def set_mp_state(self, state: int) -> None:
        self._call("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_vcpu_events(self) -> "ffi.CData":
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events: "ffi.CData") -> None:
        self._call("KVM_SET_VCPU_EVENTS", events)

    def set_cpuid2(self, entries: Iterable[tuple[int, int, int, int, int, int, int]]) -> None:
        entries = list(entries)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for slot, (fn, idx, flags, a, b, c, d) in zip(buf.entries, entries):
            slot.function, slot.index, slot.flags = fn, idx, flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = a, b, c, d
        self._call("KVM_SET_CPUID2", buf)

    def set_msrs(self, msrs: dict[int, int]) -> int:
        """Write MSRs; returns how many the kernel accepted (it stops at the first
        it refuses)."""
        items = list(msrs.items())
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for e, (index, value) in zip(buf.entries, items):
            e.index, e.data = index, value
        n: int = libc.ioctl(self.fd, ffi.cast("unsigned long", NUMBERS["KVM_SET_MSRS"]), buf)
        if n < 0:
            raise KvmError("KVM_SET_MSRS", ffi.errno)
        return n

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        indices = list(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for e, index in zip(buf.entries, indices):
            e.index = index
        n: int = libc.ioctl(self.fd, ffi.cast("unsigned long", NUMBERS["KVM_GET_MSRS"]), buf)
        if n < 0:
            raise KvmError("KVM_GET_MSRS", ffi.errno)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def get_tsc_khz(self) -> int:
        n: int = libc.ioctl(self.fd, ffi.cast("unsigned long", NUMBERS["KVM_GET_TSC_KHZ"]), _ZERO)
        if n < 0:
            raise KvmError("KVM_GET_TSC_KHZ", ffi.errno)
        return n
