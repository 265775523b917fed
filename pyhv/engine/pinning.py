"""Host CPUs and scheduling of the machine's threads (``<cputune>``, ``<vcpu cpuset>``).

A :class:`ThreadPlacement` is what one thread gets: the host CPUs it may run on
(``sched_setaffinity``) and a scheduling policy (``sched_setscheduler``).  vCPU
threads apply theirs to themselves before running guest code; the emulator's
(every thread that is not a vCPU) is applied from the main thread before the
vCPUs start, so the threads made later inherit it.  Under libvirt nothing is
configured here: libvirtd pins the threads ``query-cpus-fast`` names.  A reset
builds new vCPU threads, so :func:`snapshot` keeps what each had (whoever set
it) for its successor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

from pyhv.config import CpuTuneConfig, SchedConfig, format_cpuset
from pyhv.engine.errors import EngineError

_POLICIES = {"fifo": os.SCHED_FIFO, "rr": os.SCHED_RR, "batch": os.SCHED_BATCH,
             "idle": os.SCHED_IDLE, "other": os.SCHED_OTHER}
_NAMES = {v: k for k, v in _POLICIES.items()}


class PinningError(EngineError):
    """A thread could not be placed as configured."""


@dataclass(frozen=True)
class ThreadPlacement:
    cpus: Optional[tuple[int, ...]] = None
    policy: Optional[str] = None
    priority: int = 0
    #: a thread's predecessor's placement (after a reset): applied as far as allowed
    best_effort: bool = False

    @classmethod
    def of(cls, cpus: Optional[tuple[int, ...]],
           sched: Optional[SchedConfig]) -> Optional["ThreadPlacement"]:
        if cpus is None and sched is None:
            return None
        return cls(cpus, sched.policy if sched else None,
                   (sched.priority or 0) if sched else 0)

    def apply(self, tid: int, what: str) -> None:
        """Place thread ``tid`` (0: the calling thread); one-line errors naming ``what``."""
        if self.cpus is not None:
            try:
                os.sched_setaffinity(tid, self.cpus)
            except OSError as e:
                if self.best_effort:
                    return
                raise PinningError(f"{what}: cannot run on host CPUs "
                                   f"{format_cpuset(self.cpus)}: {e.strerror}") from e
        if self.policy is not None:
            try:
                os.sched_setscheduler(tid, _POLICIES[self.policy],
                                      os.sched_param(self.priority))
            except OSError as e:
                if self.best_effort:
                    return
                raise PinningError(f"{what}: cannot set scheduler {self.policy}"
                                   f"{f' priority {self.priority}' if self.priority else ''}:"
                                   f" {e.strerror}") from e


def snapshot(tid: int) -> Optional[ThreadPlacement]:
    """What thread ``tid`` has now (None: it is gone)."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(tid)))
        policy = os.sched_getscheduler(tid) & 0xFF  # without SCHED_RESET_ON_FORK
        priority = os.sched_getparam(tid).sched_priority
    except OSError:
        return None
    return ThreadPlacement(cpus, _NAMES.get(policy, "other"), priority, best_effort=True)


def host_cpus() -> tuple[int, ...]:
    """The host CPUs that exist (``/sys/devices/system/cpu/present``)."""
    from pyhv.config import parse_cpuset
    from pyhv.errors import PyhvError

    try:
        with open("/sys/devices/system/cpu/present") as f:
            return parse_cpuset(f.read().strip(), "present CPUs")
    except (OSError, PyhvError):
        return tuple(range(os.cpu_count() or 1))


def check_host(tune: CpuTuneConfig, present: Optional[Iterable[int]] = None) -> None:
    """Refuse cpusets that name host CPUs this host does not have (one line)."""
    have = set(present if present is not None else host_cpus())
    named: list[tuple[str, Optional[tuple[int, ...]]]] = [
        ("vcpu cpuset", tune.cpuset), ("emulatorpin cpuset", tune.emulatorpin)]
    named += [(f"vcpupin vcpu {i} cpuset", cpus) for i, cpus in tune.vcpupin]
    for what, cpus in named:
        if cpus is None:
            continue
        missing = [c for c in cpus if c not in have]
        if missing:
            raise PinningError(f"{what} {format_cpuset(cpus)}: host CPU "
                               f"{format_cpuset(tuple(missing))} does not exist (this host "
                               f"has CPUs {format_cpuset(tuple(sorted(have)))})")


def vcpu_placement(tune: CpuTuneConfig, index: int) -> Optional[ThreadPlacement]:
    return ThreadPlacement.of(tune.vcpu_cpus(index), tune.vcpu_sched(index))


def emulator_placement(tune: CpuTuneConfig) -> Optional[ThreadPlacement]:
    return ThreadPlacement.of(tune.emulator_cpus(), tune.emulatorsched)


def place_emulator(tune: CpuTuneConfig, exclude: Iterable[int] = ()) -> None:
    """Apply the emulator's placement to every thread of this process but ``exclude``
    (call from the main thread before vCPU threads exist: later threads inherit it)."""
    placement = emulator_placement(tune)
    if placement is None:
        return
    skip = set(exclude)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        if tid not in skip:
            try:
                placement.apply(tid, "emulatorpin")
            except PinningError:
                if tid == os.getpid() or tid == 0:
                    raise
                # a helper thread that ended meanwhile: nothing to place
