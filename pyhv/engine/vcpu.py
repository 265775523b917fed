"""vCPU threads: one thread per vCPU, an explicit state machine, exit dispatch.

A :class:`Vcpu` is CREATED, then RUNNING in its own thread, PAUSED on request
and EXITED when stopped or when the guest ends (power-off, reset, crash).
Requests come from other threads; they kick the vCPU out of KVM_RUN with
``immediate_exit`` plus a signal, which covers both "about to enter" and
"inside the guest".  Port and MMIO exits go to the buses; everything the VMM
must decide (power-off, reset, a crash) goes to the ``on_event`` callback as a
:class:`VcpuEvent`, never silently ignored.
"""

from __future__ import annotations

import enum
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from pyhv.engine.boot import EntryState, Segment
from pyhv.engine.bus import Bus
from pyhv.engine.coalesced import CoalescedPio
from pyhv.engine.kvm import KvmError, VcpuFd, abi
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
)
from pyhv.engine.pinning import PinningError, ThreadPlacement, snapshot

KICK_SIGNAL = signal.SIGUSR1

_kick_installed = False


def install_kick_handler() -> None:
    """Give the kick signal a no-op handler (from the main thread, once).

    With a handler installed, the signal only interrupts KVM_RUN (EINTR); the
    default action would end the process.
    """
    global _kick_installed
    if not _kick_installed:
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


@dataclass(frozen=True)
class VcpuEvent:
    """Something a vCPU saw that the machine must act on."""

    #: "shutdown" (guest asked for power-off), "reset", "triple-fault",
    #: "internal-error", "fail-entry", "unsupported-exit", "kvm-error",
    #: "vmm-error" (an exception in pyhv's own device code)
    kind: str
    vcpu: int
    detail: str = ""
    registers: str = ""


def _set_segment(dst: "abi.object", seg: Segment) -> None:  # type: ignore[name-defined]
    dst.base, dst.limit, dst.selector, dst.type = seg.base, seg.limit, seg.selector, seg.type
    dst.present, dst.dpl, dst.db, dst.s = seg.present, seg.dpl, seg.db, seg.s
    dst.l, dst.g, dst.avl, dst.unusable = seg.l, seg.g, seg.avl, seg.unusable


def apply_entry_state(fd: VcpuFd, st: EntryState) -> None:
    """Load the boot loader's entry state into a vCPU (the BSP)."""
    sregs = fd.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _set_segment(getattr(sregs, name), getattr(st, name))
    sregs.gdt.base, sregs.gdt.limit = st.gdt_base, st.gdt_limit
    sregs.idt.base, sregs.idt.limit = st.idt_base, st.idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = st.cr0, st.cr3, st.cr4, st.efer
    fd.set_sregs(sregs)
    regs = fd.get_regs()
    regs.rip, regs.rsp, regs.rbp = st.rip, st.rsp, st.rbp
    regs.rsi, regs.rbx, regs.rflags = st.rsi, st.rbx, st.rflags
    fd.set_regs(regs)


def init_fpu(fd: VcpuFd) -> None:
    fpu = fd.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    fd.set_fpu(fpu)


def init_lapic_lints(fd: VcpuFd) -> None:
    """LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as firmware leaves them."""
    lapic = fd.get_lapic()
    regs = ffi.buffer(lapic.regs)
    for off, mode in ((0x350, 7), (0x360, 4)):
        v = int.from_bytes(regs[off:off + 4], "little")
        v = (v & ~0x700) | (mode << 8)
        regs[off:off + 4] = v.to_bytes(4, "little")
    fd.set_lapic(lapic)


def register_dump(fd: VcpuFd) -> str:
    """The vCPU's registers as one line (for crash reports)."""
    try:
        r = fd.get_regs()
        s = fd.get_sregs()
    except KvmError as e:
        return f"(registers unavailable: {e})"
    return (f"rip={r.rip:#x} rsp={r.rsp:#x} rflags={r.rflags:#x} rax={r.rax:#x} "
            f"rbx={r.rbx:#x} rcx={r.rcx:#x} rdx={r.rdx:#x} rsi={r.rsi:#x} rdi={r.rdi:#x} "
            f"cs={s.cs.selector:#x} cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} "
            f"cr4={s.cr4:#x} efer={s.efer:#x}")


class Vcpu:
    """One vCPU and the thread that runs it."""

    def __init__(self, fd: VcpuFd, pio: Bus, mmio: Bus,
                 on_event: Callable[[VcpuEvent], None]) -> None:
        self.fd = fd
        self.index = fd.id
        self.pio = pio
        self.mmio = mmio
        self.on_event = on_event
        self.state = VcpuState.CREATED
        self._cond = threading.Condition()
        self._want_pause = False
        self._want_stop = False
        self._thread: Optional[threading.Thread] = None
        #: host CPUs and scheduler the thread gives itself before running the guest
        self.placement: Optional[ThreadPlacement] = None
        self._placed = threading.Event()
        self._place_error: Optional[PinningError] = None
        #: the placement the thread had when it ended (whoever set it: a successor
        #: thread after a reset gets the same)
        self.final_placement: Optional[ThreadPlacement] = None
        #: the VM's coalesced port-I/O ring (queued writes applied before each exit)
        self.coalesced: Optional[CoalescedPio] = None

    @property
    def thread_id(self) -> int:
        """The host thread id running this vCPU (0 before it started)."""
        t = self._thread
        return (t.native_id or 0) if t is not None else 0

    # ---- control (any thread) ---------------------------------------------
    def start(self, paused: bool = False) -> None:
        self._want_pause = paused
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}",
                                        daemon=True)
        self._thread.start()
        if self.placement is not None:  # placed before any guest code runs
            self._placed.wait()
            if self._place_error is not None:
                self._thread.join()
                raise self._place_error

    def _kick(self) -> None:
        self.fd.set_immediate_exit(True)
        t = self._thread
        if t is not None and t.ident is not None and t is not threading.current_thread():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, wait: bool = True) -> None:
        with self._cond:
            if self.state is VcpuState.EXITED:
                return
            self._want_pause = True
        self._kick()
        if wait:
            with self._cond:
                self._cond.wait_for(lambda: self.state in (VcpuState.PAUSED, VcpuState.EXITED)
                                    or self.state is VcpuState.CREATED and not self._thread)

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Ask the thread to exit (does not wait: callable from a vCPU thread)."""
        with self._cond:
            self._want_stop = True
            self._cond.notify_all()
        self._kick()

    def stop(self) -> None:
        self.request_stop()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    # ---- the thread ---------------------------------------------------------
    def _checkpoint(self) -> bool:
        """Honour pause/stop requests; False when the thread must end."""
        with self._cond:
            if self._want_pause and not self._want_stop:
                self.state = VcpuState.PAUSED
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._want_pause or self._want_stop)
            if self._want_stop:
                return False
            self.state = VcpuState.RUNNING
            return True

    def _main(self) -> None:
        try:  # the name QEMU gives it (debug-threads=on): ps, top and tests tell them apart
            with open("/proc/thread-self/comm", "w") as f:
                f.write(f"CPU {self.index}/KVM")
        except OSError:
            pass
        if self.placement is not None:
            try:
                self.placement.apply(0, f"vCPU {self.index}")
            except PinningError as e:
                self._place_error = e
                with self._cond:
                    self.state = VcpuState.EXITED
                    self._cond.notify_all()
                return
            finally:
                self._placed.set()
        try:
            self._loop()
        except Exception as e:  # a fault in pyhv itself (a device model): report it
            import traceback

            where = traceback.extract_tb(e.__traceback__)[-1]
            self._report("vmm-error", f"pyhv error: {type(e).__name__}: {e} "
                                      f"({where.filename}:{where.lineno})")
        finally:
            self.final_placement = snapshot(0)
            with self._cond:
                self.state = VcpuState.EXITED
                self._cond.notify_all()

    def _report(self, kind: str, detail: str = "", regs: bool = True) -> None:
        self.on_event(VcpuEvent(kind, self.index, detail,
                                register_dump(self.fd) if regs else ""))

    def _loop(self) -> None:
        pio, mmio, fd = self.pio, self.mmio, self.fd
        co = self.coalesced
        if not self._checkpoint():
            return
        while True:
            # requests are rare: look without the lock, take it only to honour one
            # (a request set after this look also set immediate_exit: KVM_RUN
            # returns at once and the next look sees it)
            if (self._want_pause or self._want_stop) and not self._checkpoint():
                return
            try:
                ex = fd.run()
            except KvmError as e:
                self._report("kvm-error", str(e))
                return
            if co is not None and co.pending():  # earlier writes before this exit
                co.drain()
            if isinstance(ex, IoOut):
                size, data = ex.size, ex.data
                if ex.count == 1:  # ``out`` (not ``outs``): no item loop
                    pio.write(ex.port, size, int.from_bytes(data, "little"))
                    continue
                for i in range(0, size * ex.count, size):
                    pio.write(ex.port, size, int.from_bytes(data[i:i + size], "little"))
            elif isinstance(ex, IoIn):
                size, buf = ex.size, ex.data
                for i in range(0, size * ex.count, size):
                    buf[i:i + size] = pio.read(ex.port, size).to_bytes(size, "little")
            elif isinstance(ex, MmioWrite):
                mmio.write(ex.addr, ex.size, int.from_bytes(ex.data, "little"))
            elif isinstance(ex, MmioRead):
                ex.data[:] = mmio.read(ex.addr, ex.size).to_bytes(ex.size, "little")
            elif isinstance(ex, Interrupted):
                fd.set_immediate_exit(False)
            elif isinstance(ex, Hlt):
                continue
            elif isinstance(ex, Shutdown):
                self._report("triple-fault", "the guest triple-faulted")
                return
            elif isinstance(ex, SystemEvent):
                kinds = {abi.SYSTEM_EVENT_SHUTDOWN: "shutdown",
                         abi.SYSTEM_EVENT_RESET: "reset",
                         abi.SYSTEM_EVENT_CRASH: "guest-panicked"}
                self._report(kinds.get(ex.type, "unsupported-exit"),
                             f"system event {ex.type}", regs=ex.type == abi.SYSTEM_EVENT_CRASH)
                return
            elif isinstance(ex, InternalError):
                self._report("internal-error", f"KVM internal error, suberror {ex.suberror}, "
                             f"data {' '.join(hex(x) for x in ex.data)}")
                return
            elif isinstance(ex, FailEntry):
                self._report("fail-entry", f"VM entry failed, hardware reason {ex.reason:#x}")
                return
            elif isinstance(ex, Unsupported):
                self._report("unsupported-exit", f"unhandled KVM exit reason {ex.reason}")
                return
