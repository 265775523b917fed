"""QEMU argv → ``ShimPlan``/``VmConfig`` (``pyhv.shim.mapping.build``), as pyhv-qemu runs it.

Input: the arguments, separated by NUL bytes.  Accepted: a plan, or a
:class:`ShimError` with a one-line message.
"""

from __future__ import annotations

import importlib
from typing import Any

from fuzz.common import (
    Finding,
    args_from_bytes,
    bytes_from_args,
    module_path,
    one_line,
    string_constants,
    string_lists,
    test_files,
    unique,
)
from pyhv.shim import argv, mapping, registry
from pyhv.shim.errors import ShimError

MAX_LEN = 8192
#: a fixed clock: ``-rtc base=DATE`` is measured from it
NOW = 1_700_000_000.0


def TARGET(data: bytes) -> None:
    try:
        plan = mapping.build(args_from_bytes(data), now=NOW)
    except ShimError as e:
        one_line(e)
        return
    for line in plan.pending:
        if "\n" in line:
            raise Finding(f"pending note is not one line: {line!r}")


def _libvirt_lines() -> list[list[str]]:
    """Whole libvirt 9.0 command lines, from the mapping tests' builders."""
    try:
        tests: Any = importlib.import_module("test_shim_argv_mapping")
    except Exception:  # the seeds are a help, not a requirement
        return []
    lines = []
    for name in ("PROBE",):
        if isinstance(getattr(tests, name, None), list):
            lines.append(list(getattr(tests, name)))
    head = getattr(tests, "head", None)
    if callable(head):
        base = head()
        lines.append(base)
        for extra in ("FILE_SERIAL", "PTY_SERIAL"):
            part = getattr(tests, extra, None)
            if isinstance(part, list):
                lines.append(base + part + list(getattr(tests, "TAIL", [])))
        lines.append(head("pc-q35-7.2", "qemu64"))
    q35 = getattr(tests, "q35_virtio", None)
    if callable(q35):
        lines.append(q35())
    return lines


def seeds() -> list[bytes]:
    lines = _libvirt_lines()
    base = lines[1] if len(lines) > 1 else ["-kernel", "/k"]
    for args in string_lists(test_files("test_shim_*.py")):
        lines.append(args)
        if "-kernel" not in args:
            lines.append(args + ["-kernel", "/k"])
            lines.append(base + args)
    return unique(bytes_from_args(a) for a in lines)


def dictionary() -> list[bytes]:
    tokens = {f"-{name}" for name in argv.OPTIONS}
    tokens |= set(registry.DEVICES)
    for dev in registry.DEVICES.values():
        tokens |= {p.name for p in dev.properties}
    tokens |= {m.name for m in registry.MACHINES} | {c.name for c in registry.CPU_MODELS}
    tokens |= string_constants([module_path(mapping), module_path(registry)])
    tokens |= {",,", "=on", "=off", "0x", "{\"", "\":", "\"}", "\0"}
    return sorted(t.encode() for t in tokens)
