"""Tagged vCPU exit values returned by :meth:`VcpuFd.run`."""

from __future__ import annotations


class VcpuExit:
    """Why KVM_RUN returned."""

    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in names)
        return f"{type(self).__name__}({fields})"


class IoIn(VcpuExit):
    """``in``/``ins``: fill ``data`` (``count`` items of ``size`` bytes) for the guest."""

    __slots__ = ("port", "size", "count", "data")

    def __init__(self, port: int, size: int, count: int, data: memoryview) -> None:
        self.port, self.size, self.count, self.data = port, size, count, data


class IoOut(VcpuExit):
    """``out``/``outs``: ``data`` holds ``count`` items of ``size`` bytes."""

    __slots__ = ("port", "size", "count", "data")

    def __init__(self, port: int, size: int, count: int, data: bytes) -> None:
        self.port, self.size, self.count, self.data = port, size, count, data


class MmioRead(VcpuExit):
    """A load from an unmapped guest-physical address: fill ``data``."""

    __slots__ = ("addr", "size", "data")

    def __init__(self, addr: int, size: int, data: memoryview) -> None:
        self.addr, self.size, self.data = addr, size, data


class MmioWrite(VcpuExit):
    """A store to an unmapped guest-physical address."""

    __slots__ = ("addr", "size", "data")

    def __init__(self, addr: int, size: int, data: bytes) -> None:
        self.addr, self.size, self.data = addr, size, data


class Hlt(VcpuExit):
    """The guest halted with the irqchip in userspace (not with pyhv's setup)."""

    __slots__ = ()


class Shutdown(VcpuExit):
    """Triple fault."""

    __slots__ = ()


class Interrupted(VcpuExit):
    """KVM_RUN returned EINTR/EAGAIN or ``immediate_exit`` was set: a kick."""

    __slots__ = ()


class SystemEvent(VcpuExit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested."""

    __slots__ = ("type", "data")

    def __init__(self, type: int, data: tuple[int, ...]) -> None:
        self.type, self.data = type, data


class InternalError(VcpuExit):
    """KVM could not emulate something (``suberror``, with extra data words)."""

    __slots__ = ("suberror", "data")

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror, self.data = suberror, data


class FailEntry(VcpuExit):
    """The hardware refused to enter the guest."""

    __slots__ = ("reason", "cpu")

    def __init__(self, reason: int, cpu: int) -> None:
        self.reason, self.cpu = reason, cpu


class Unsupported(VcpuExit):
    """An exit reason the engine does not handle."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason
