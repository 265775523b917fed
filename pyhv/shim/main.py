"""``pyhv-qemu``: the process libvirt launches in place of qemu-system-x86_64.

It reads QEMU's command line (:mod:`pyhv.shim.mapping`), builds the machine
with pyhv's engine, and serves QMP on every monitor (:mod:`pyhv.shim.monitor`)
with QEMU's run-state semantics:

- ``-S`` holds the vCPUs (``prelaunch``) until ``cont``;
- a guest power-off sends SHUTDOWN; with ``-no-shutdown`` the process stays,
  paused in ``shutdown``, until ``system_reset`` + ``cont`` (libvirt's reboot)
  or ``quit``; without it the process exits;
- a guest reset sends RESET and reboots, or ends the machine with ``-no-reboot``;
  a triple fault is a guest reset, as in QEMU;
- a KVM internal error stops the machine in ``internal-error`` (STOP) with the
  registers in the log; nothing here ever looks like a clean shutdown;
- SIGTERM/SIGINT/SIGHUP send SHUTDOWN (``host-signal``) before the monitors close.

The domain log is stderr: QEMU-style ``pyhv-qemu: ...`` lines, prefixed with a
timestamp under ``-msg timestamp=on``.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from typing import Optional, Sequence

PROG = "pyhv-qemu"


class Log:
    """QEMU-style lines on stderr (libvirt's per-domain log)."""

    def __init__(self, timestamps: bool = False) -> None:
        self.timestamps = timestamps

    def __call__(self, message: str) -> None:
        prefix = ""
        if self.timestamps:
            now = _dt.datetime.now(_dt.timezone.utc)
            prefix = now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z "
        try:
            sys.stderr.write(f"{prefix}{PROG}: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _daemonize() -> int:
    """Fork; the parent waits until the child says it is ready (or failed).

    Returns the write end of the readiness pipe in the child (the parent exits).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        status = os.read(r, 1)
        sys.exit(0 if status == b"0" else 1)
    os.close(r)
    os.setsid()
    return w


def _daemon_ready(w: int, ok: bool) -> None:
    os.write(w, b"0" if ok else b"1")
    os.close(w)
    if ok:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from pyhv.shim.help import handle_info_options

    text = handle_info_options(args)
    if text is not None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    from pyhv.errors import PyhvError
    from pyhv.shim.mapping import parse_and_map

    try:
        plan = parse_and_map(args)
    except PyhvError as e:
        print(str(e) if str(e).startswith(PROG) else f"{PROG}: {e}", file=sys.stderr)
        return 1
    log = Log(plan.options.msg_timestamp)
    for note in plan.pending:
        log(f"warning: {note}")
    ready_fd = _daemonize() if plan.options.daemonize else None
    try:
        from pyhv.shim.process import ShimProcess

        proc = ShimProcess(plan, log)
        try:
            proc.setup()
        except PyhvError as e:
            log(str(e).removeprefix(f"{PROG}: "))
            proc.cleanup()
            if ready_fd is not None:
                _daemon_ready(ready_fd, False)
            return 1
        if ready_fd is not None:
            _daemon_ready(ready_fd, True)
            ready_fd = None
        return proc.run()
    finally:
        if ready_fd is not None:
            _daemon_ready(ready_fd, False)


if __name__ == "__main__":
    sys.exit(main())
