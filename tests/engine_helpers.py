"""Running a test guest under pyhv's engine and reading its report."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from guests.report import Report, parse_report

from pyhv.config import KernelBoot, SerialConfig, VmConfig
from pyhv.engine.machine import Machine, MachineEvent

MiB = 1 << 20


@dataclass
class Boot:
    config: VmConfig
    event: MachineEvent
    output: str
    report: Report
    machine: Machine


def boot(kernel: Path, out: Path, *, cmdline: str = "", initrd: Optional[Path] = None,
         cpus: int = 1, memory: int = 64 * MiB, protocol: str = "auto",
         on_reboot: str = "restart", timeout: float = 60, control=None) -> Boot:
    """Boot ``kernel`` until it powers off (or crashes); ``control(machine)`` runs
    after start, for tests that press buttons."""
    cfg = VmConfig(KernelBoot(str(kernel), str(initrd) if initrd else None, cmdline,
                              protocol),  # type: ignore[arg-type]
                   memory=memory, vcpus=cpus, serial=SerialConfig("file", str(out)),
                   on_reboot=on_reboot)  # type: ignore[arg-type]
    return run_config(cfg, out, timeout=timeout, control=control)


def run_config(cfg: VmConfig, out: Path, *, timeout: float = 60, control=None) -> Boot:
    """Run a machine built from ``cfg`` (COM1 to the file ``out``) until it ends."""
    m = Machine(cfg)
    try:
        m.start()
        if control is not None:
            control(m)
        ev = m.run(timeout=timeout)
    finally:
        m.close()
    text = out.read_text(errors="replace")
    return Boot(cfg, ev, text, parse_report(text), m)


def wait_for_output(machine: Machine, path: Path, needle: str, timeout: float = 30) -> None:
    """Process machine events until ``needle`` appears in the serial output."""
    import select
    import time

    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in guest output after {timeout} s")
        select.select([machine.event_fd], [], [], 0.05)
        machine.process_events()
        if machine.finished:
            raise AssertionError(f"machine ended before {needle!r}: {machine.last_event}")


def unix_client(path: str, deadline: float) -> socket.socket:
    """A connection to the unix socket a VMM is about to listen on (QMP), tried until
    ``deadline`` (time.monotonic())."""
    import time

    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
