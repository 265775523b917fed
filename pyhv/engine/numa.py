"""Host NUMA binding of guest RAM (libvirt ``<numatune>``).

Guest RAM of each guest NUMA cell (:func:`pyhv.engine.layout.numa_ranges`) is
bound to host nodes with ``mbind(2)`` right after it is mapped and before the
guest touches it: ``strict`` is MPOL_BIND, ``preferred`` MPOL_PREFERRED,
``interleave`` MPOL_INTERLEAVE; ``restrictive`` (libvirt restricts such a
domain with cgroups only) binds like ``strict``.  A ``<memnode>`` overrides the
domain-wide ``<memory>`` for its cell.  Naming a host node that is not online
is refused with one line before anything is bound.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import TYPE_CHECKING, Optional

from pyhv.engine import layout
from pyhv.engine.errors import EngineError

if TYPE_CHECKING:
    from pyhv.config import VmConfig
    from pyhv.engine.memory import GuestMemory

MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 1, 2, 3
#: move pages already placed elsewhere (strict binding)
MPOL_MF_MOVE = 1 << 1
MODES = {"strict": MPOL_BIND, "restrictive": MPOL_BIND, "preferred": MPOL_PREFERRED,
         "interleave": MPOL_INTERLEAVE}
_SYS_MBIND = 237  # x86_64
_NODES_ONLINE = "/sys/devices/system/node/online"
_MASK_BITS = 1024


class NumaError(EngineError):
    """Guest RAM could not be bound to the host nodes asked for."""


def host_nodes(path: str = _NODES_ONLINE) -> tuple[int, ...]:
    """The host's online NUMA nodes (``0`` where the kernel has no NUMA)."""
    from pyhv.config import parse_cpuset

    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return (0,)
    return parse_cpuset(text, "host nodes") if text else (0,)


def binding_plan(cfg: "VmConfig") -> list[tuple[int, int, str, tuple[int, ...]]]:
    """(guest address, size, mode, host nodes) of every run of guest RAM to bind;
    pure.  Without guest cells all RAM is one cell."""
    tune = cfg.numatune
    if tune is None:
        return []
    if cfg.numa:
        runs = layout.numa_ranges([c.memory for c in cfg.numa])
    else:
        runs = [layout.ram_ranges(cfg.memory)]
    per_cell = {cell: (mode, nodes) for cell, mode, nodes in tune.memnodes}
    plan = []
    for cell, cell_runs in enumerate(runs):
        mode, nodes = per_cell.get(cell, (tune.mode, tune.nodeset or ()))
        if not nodes:
            continue
        for addr, size in cell_runs:
            plan.append((addr, size, mode, nodes))
    return plan


def check_nodes(cfg: "VmConfig", online: Optional[tuple[int, ...]] = None) -> None:
    """Refuse a nodeset naming host nodes that are not online (one line)."""
    tune = cfg.numatune
    if tune is None:
        return
    online = host_nodes() if online is None else online
    wanted = [("numatune memory", tune.nodeset or ())]
    wanted += [(f"numatune memnode cellid {c}", n) for c, _m, n in tune.memnodes]
    for what, nodes in wanted:
        missing = [n for n in nodes if n not in online]
        if missing:
            raise NumaError(f"{what}: host NUMA node {missing[0]} does not exist (this "
                            f"host has node{'s' if len(online) > 1 else ''} "
                            f"{','.join(map(str, online))})")


def _mbind(addr: int, size: int, mode: int, nodes: tuple[int, ...]) -> None:
    mask = (ctypes.c_ulong * (_MASK_BITS // 64))()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    flags = MPOL_MF_MOVE if mode == MPOL_BIND else 0
    rc = libc.syscall(ctypes.c_long(_SYS_MBIND), ctypes.c_void_p(addr), ctypes.c_ulong(size),
                      ctypes.c_int(mode), mask, ctypes.c_ulong(_MASK_BITS + 1),
                      ctypes.c_uint(flags))
    if rc != 0:
        err = ctypes.get_errno()
        import os

        raise NumaError(f"numatune: binding guest RAM to host nodes "
                        f"{','.join(map(str, nodes))} failed: {os.strerror(err)}")


def _host_address(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def bind_guest_ram(memory: "GuestMemory", cfg: "VmConfig") -> int:
    """Apply ``cfg.numatune`` to ``memory``; returns how many runs were bound."""
    plan = binding_plan(cfg)
    if not plan:
        return 0
    check_nodes(cfg)
    bound = 0
    for addr, size, mode, nodes in plan:
        index = memory.region_index(addr, size)
        region = memory.regions[index]
        if not isinstance(region.buffer, mmap.mmap):
            continue  # bytearray RAM (tests): nothing to bind
        host = _host_address(region.buffer) + (addr - region.guest_addr)
        _mbind(host, size, MODES[mode], nodes)
        bound += 1
    return bound
