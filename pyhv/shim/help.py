"""Answers to QEMU's information options: ``-version``, ``-help``, ``... help``.

``handle_info_options(args)`` returns the text to print (and exit 0) when the
command line asks for information, else ``None``.  libvirt 9.0 learns about
the emulator through QMP (query-version, query-machines...), but people and
older tools run ``-version`` and ``-machine help``; the texts keep QEMU 7.2's
layout so that anything parsing them finds what it expects.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyhv
from pyhv.shim import registry
from pyhv.shim.argv import OPTIONS, option_name, split_list
from pyhv.shim.errors import PROG, ShimUnsupportedError

_CATEGORIES = ("Controller/Bridge/Hub", "USB", "Storage", "Network", "Input", "Display",
               "Sound", "Misc", "CPU", "Watchdog", "Uncategorized")


def version_text() -> str:
    return (f"QEMU emulator version {registry.QEMU_VERSION_STR} (pyhv {pyhv.__version__})\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n")


def help_text() -> str:
    lines = [
        version_text().rstrip("\n"),
        f"usage: {PROG} [options]",
        "",
        "pyhv-qemu runs a pyhv machine (KVM, direct kernel boot) from a QEMU command",
        "line, for libvirt.  Options are QEMU 7.2's; those pyhv cannot honour are",
        "refused with a message naming them.",
        "",
        "Information:",
        "-version, -help, -machine help, -device help, -device DRIVER,help, -cpu help",
        "",
        "Options read:",
    ]
    names = sorted(n for n in OPTIONS if n not in ("version", "help", "h"))
    row = ""
    for n in names:
        item = f"-{n}"
        if len(row) + len(item) + 1 > 78:
            lines.append(row.rstrip())
            row = ""
        row += item + " "
    lines.append(row.rstrip())
    return "\n".join(lines) + "\n"


def machine_help() -> str:
    out = ["Supported machines are:"]
    for m in registry.MACHINES:
        if m.alias:
            out.append(f"{m.alias:<20} {m.description} (alias of {m.name})")
        flags = " (default)" if m.is_default else ""
        flags += " (deprecated)" if m.deprecated else ""
        out.append(f"{m.name:<20} {m.description}{flags}")
    return "\n".join(out) + "\n"


def device_help() -> str:
    out: list[str] = []
    for cat in _CATEGORIES:
        out.append(f"{cat} devices:")
        for d in sorted(registry.DEVICES.values(), key=lambda d: d.name):
            if d.category != cat:
                continue
            line = f'name "{d.name}", bus {d.bus}'
            if d.alias:
                line += f', alias "{d.alias}"'
            line += f', desc "{d.description}"'
            out.append(line)
        out.append("")
    return "\n".join(out)


def device_props_help(name: str) -> str:
    d = registry.find_device(name)
    if d is None:
        raise ShimUnsupportedError(f"'{name}' is not a valid device model name", "-device")
    out = [f"{d.name} options:"]
    for p in d.properties:
        head = f"  {p.name}=<{p.type}>"
        tail = p.description
        if isinstance(p.default, bool):
            tail += f" (default: {str(p.default).lower()})"
        elif isinstance(p.default, str):
            tail += f' (default: "{p.default}")'
        elif p.default is not None:
            tail += f" (default: {p.default})"
        out.append(f"{head:<24} - {tail.strip()}" if tail else head)
    return "\n".join(out) + "\n"


def cpu_help() -> str:
    out = ["Available CPUs:"]
    out += [f"x86 {m.name:<20} {m.description}" for m in registry.cpu_models()]
    return "\n".join(out) + "\n"


def accel_help() -> str:
    return "Accelerators supported in QEMU binary:\nkvm\n"


def chardev_help() -> str:
    return "Available chardev backend types: \n  file\n  null\n  pty\n  socket\n  stdio\n"


def _asks_help(text: str, implied: str) -> tuple[bool, Optional[str]]:
    """(help wanted, the implied value) for an ``opts`` argument."""
    if text in ("help", "?"):
        return True, None
    try:
        pairs = split_list(text, implied)
    except Exception:
        return False, None
    first = pairs[0][1] if pairs and pairs[0][0] == implied else None
    wanted = any(k in ("help", "?") and v == "on" for k, v in pairs)
    return wanted, first


def handle_info_options(args: Sequence[str]) -> Optional[str]:
    """The text for ``-version``, ``-help`` or a ``help`` argument, else ``None``.

    Options are read in order, as QEMU does, so the first request wins; an
    unknown option ends the scan (the parser reports it).  Raises ShimError for
    help about a device pyhv does not have.
    """
    i = 0
    while i < len(args):
        name = option_name(args[i])
        spec = OPTIONS.get(name) if name else None
        if spec is None:
            return None
        if name == "version":
            return version_text()
        if name in ("help", "h"):
            return help_text()
        if spec.arg == "none":
            i += 1
            continue
        if i + 1 >= len(args):
            return None
        text = args[i + 1]
        i += 2
        if name == "cpu" and text in ("help", "?"):
            return cpu_help()
        if name in ("machine", "device", "accel", "chardev"):
            if text.lstrip().startswith("{"):
                continue
            wanted, first = _asks_help(text, spec.implied or "")
            if not wanted:
                continue
            if name == "machine":
                return machine_help()
            if name == "accel":
                return accel_help()
            if name == "chardev":
                return chardev_help()
            return device_props_help(first) if first else device_help()
    return None
