"""KVM through cffi: handles that mirror the kernel's (system → VM → vCPU).

``Kvm`` wraps ``/dev/kvm``, ``VmFd`` a VM, ``VcpuFd`` a vCPU; each has one
method per ioctl, named after it, and every failure is a :class:`KvmError`
carrying ``errno``.  ``VcpuFd.run()`` returns a tagged exit value
(:mod:`pyhv.engine.kvm.exits`): an exit the engine does not know is a value,
never a crash.
"""

from pyhv.engine.kvm.ioctl import KvmError, KvmUnavailable
from pyhv.engine.kvm.system import Kvm
from pyhv.engine.kvm.vcpu import VcpuFd
from pyhv.engine.kvm.vm import VmFd

__all__ = ["Kvm", "KvmError", "KvmUnavailable", "VcpuFd", "VmFd"]
