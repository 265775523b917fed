#!/usr/bin/env python3
"""Soak test under libvirt: many start -> destroy and start -> shutdown cycles of one
pyhv domain, then a count of everything those cycles left behind.

    .venv/bin/python bench/soak.py [--cycles N] [--vcpus 1|2] [--kernel PVH.ELF]

Run it as root (a privileged libvirtd in a private mount namespace, see
tests/libvirt_daemon.py).  One private libvirtd manages one persistent domain:
64 MiB, 2 vCPUs (--vcpus), the PVH test guest as a direct kernel with the command
line `pyhv.wait=powerbutton` (it prints its report on COM1, arms the ACPI power
button, prints `@waiting` and halts until the button is pressed), COM1 a pty with
the console on it, and a `<log file=...>` on that serial port that gets every byte
the guest sends.  The script polls that file to know when the guest waits.
libvirt runs pyhv-qemu from this checkout, so an edit made to pyhv during a soak
reaches the next start; `--freeze head` (or `tree`) runs it on a copy of pyhv taken
at the start instead (git HEAD's, or the working tree's).

Cycles (2 x N in all, interleaved: destroy, shutdown, destroy, shutdown, ...):

* shutdown (N):  `virsh start`, domstate must be `running (booted)`, wait for
  `@waiting` in the serial log, `virsh shutdown`, then domstate must reach
  `shut off (shutdown)` and the serial log must have the guest's `@powerbutton`.
* destroy (N):   every other one right after `virsh start` returns (the guest is
  still printing its report), the others after `running (booted)` and `@waiting`
  as above; then `virsh destroy`, and domstate must be `shut off (destroyed)`.

A cycle that does not reach its state (or whose virsh command fails) is a failure;
the script destroys the domain and goes on.  The first few failures are printed
with the tails of the domain's libvirt log and of the serial log.

Leaks, counted after the last cycle (each must be 0):

* processes:  pyhv-qemu processes that were not there before the daemon started
  and that are ours (in the daemon's mount namespace, or with this domain's
  `-name guest=` on their command line), any other process left in the namespace
  besides libvirtd, virtlogd and their launcher shell, and zombie children of those.
  New pyhv-qemu processes that belong to someone else are listed, not counted.
* libvirtd fds: /proc/PID/fd of libvirtd after the first --warmup cycles (default 5,
  so that whatever libvirtd opens once and keeps is in the baseline) against after the
  last cycle, both taken once the count has been steady for 0.5 s (libvirtd closes
  a departed virsh client's socket asynchronously).  Growth beyond --fd-margin
  (default 0) is a leak; the fds that appeared are listed.
* ptys:  /dev/pts entries created during the run and still present 5 s after the
  last cycle, held by a process of ours (the namespace, this script, or a process
  with the domain's name on its command line); ptys other processes on the host
  opened meanwhile are listed, not counted.
* files:  paths under the private /run/libvirt/qemu and /var/lib/libvirt/qemu
  (which holds the per-start domain-N-NAME directories) that were not there
  before the first start.
* log errors:  `PID: error : ` lines in libvirtd's log (read after it stopped),
  except the known harmless ones of this private set-up (IGNORED_ERRORS; what is
  ignored is printed, by pattern, with counts).
* tracebacks:  `Traceback` lines in the domain's log (the emulator's stderr).

Exit status: 0 when no cycle failed and every leak count is 0; 1 otherwise;
2 when it cannot run here (not root, no libvirtd, virsh, /dev/kvm, pyhv-qemu
or guest kernel); 130 when interrupted (the checks still run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

if TYPE_CHECKING:
    from libvirt_daemon import LibvirtDaemon

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEFAULT_PYHV_QEMU = REPO / ".venv" / "bin" / "pyhv-qemu"
DEFAULT_KERNEL = Path("/var/lib/pyhv/guests/pvh.elf")
DEFAULT_WORKDIR = Path("/var/tmp/pyhv-bench")
CMDLINE = "pyhv.wait=powerbutton"
WAITING = "@waiting"
PRESSED = "@powerbutton"     # the guest's line when the power button reached it
MAX_SHOWN_FAILURES = 5

#: an error line of libvirtd's log: "2026-11-29 14:21:29.568+0000: 18211: error : fn:673 : ..."
ERROR_LINE = re.compile(r"^\S+ \S+: \d+: error : ")
#: libvirtd error lines that this private daemon always logs and that have nothing
#: to do with the domain: (label, regex on the line)
IGNORED_ERRORS: list[tuple[str, str]] = [
    ("D-Bus: no system bus in this container", r"virGDBus|system bus"),
    ("udev: no DMI device", r"udev"),
    ("dmidecode: no /dev/mem", r"dmidecode"),
    ("dnsmasq: not installed (network driver)", r"dnsmasq"),
    ("cgroups: qemu.conf cgroup_controllers = [] in the private daemon",
     r"virCgroupDetectControllers.*cgroup controller is required"),
]


def skip(msg: str) -> NoReturn:
    print(f"SKIP: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# ---------------------------------------------------------------- the domain
def domain_xml(name: str, emulator: Path, kernel: Path, vcpus: int, serial_log: Path) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><cmdline>{CMDLINE}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='pty'><log file='{serial_log}' append='off'/><target port='0'/></serial>
    <console type='pty'><target type='serial'/></console>
    <memballoon model='none'/>
  </devices>
</domain>"""


class Domain:
    """One persistent domain, driven with virsh as a user would."""

    def __init__(self, d: LibvirtDaemon, name: str, serial_log: Path) -> None:
        self.d = d
        self.name = name
        self.serial_log = serial_log

    def virsh(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", self.d.uri, *args], capture_output=True,
                              text=True, timeout=timeout, env=self.d.client_env())

    def must(self, *args: str) -> None:
        p = self.virsh(*args, self.name)
        if p.returncode != 0:
            raise CycleError(f"virsh {args[0]} failed (status {p.returncode}): "
                             f"{p.stderr.strip()}")

    def state(self) -> str:
        p = self.virsh("domstate", "--reason", self.name)
        return p.stdout.strip() if p.returncode == 0 else f"(domstate: {p.stderr.strip()})"

    def wait_state(self, want: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if st == want:
                return
            if time.monotonic() > deadline:
                raise CycleError(f"domstate is {st!r}, expected {want!r} "
                                 f"(waited {timeout:.0f} s)")
            time.sleep(0.1)

    def wait_serial(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if needle in self.serial_log.read_text(errors="replace"):
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise CycleError(f"{needle!r} not in the serial log after {timeout:.0f} s")
            time.sleep(0.02)

    def recover(self) -> None:
        """After a failure: make sure the domain is off before the next cycle."""
        self.virsh("destroy", self.name)
        deadline = time.monotonic() + 30
        while not self.state().startswith("shut off") and time.monotonic() < deadline:
            time.sleep(0.2)


def frozen_emulator(pyhv_qemu: Path, how: str, run_dir: Path) -> Path:
    """A wrapper for <emulator> that runs `pyhv_qemu` on a copy of the pyhv package
    (git HEAD's, or the working tree's as it is now) put first on PYTHONPATH, so that
    edits made to the checkout during the soak do not reach the domains it starts."""
    src = run_dir / "pyhv-src"
    src.mkdir()
    if how == "head":
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "pyhv"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    else:
        shutil.copytree(REPO / "pyhv", src / "pyhv",
                        ignore=shutil.ignore_patterns("__pycache__"))
    with open(pyhv_qemu) as f:
        python = f.readline().removeprefix("#!").strip()   # the console script's python
    wrapper = run_dir / "pyhv-qemu"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={src} exec {python} {pyhv_qemu} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# ---------------------------------------------------------------- cycles
class CycleError(Exception):
    pass


@dataclass
class Cycle:
    index: int
    kind: str            # "shutdown", "destroy" (right after start), "destroy-waiting"
    seconds: float = 0.0
    error: Optional[str] = None


def schedule(cycles: int) -> list[str]:
    kinds = []
    for i in range(cycles):
        kinds.append("destroy" if i % 2 == 0 else "destroy-waiting")
        kinds.append("shutdown")
    return kinds


def run_cycle(dom: Domain, kind: str, timeout: float) -> None:
    dom.serial_log.unlink(missing_ok=True)
    dom.must("start")
    if kind != "destroy":
        st = dom.state()
        if st != "running (booted)":
            raise CycleError(f"after start, domstate is {st!r}, expected 'running (booted)'")
        dom.wait_serial(WAITING, timeout)
    if kind == "shutdown":
        dom.must("shutdown")
        dom.wait_state("shut off (shutdown)", timeout)
        dom.wait_serial(PRESSED, 0)   # the guest saw the button (it is off: no waiting)
    else:
        dom.must("destroy")
        dom.wait_state("shut off (destroyed)", timeout)


# ---------------------------------------------------------------- /proc
def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def mnt_ns(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def stat_fields(pid: int) -> Optional[tuple[str, int]]:
    """(state, ppid) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return rest[0], int(rest[1])


def names_domain(cmdline: str, name: str) -> bool:
    """Whether an emulator command line is this domain's (`-name guest=NAME,...`)."""
    return re.search(rf"guest={re.escape(name)}(,|\s|$)", cmdline) is not None


def pyhv_qemu_processes() -> dict[int, str]:
    out = {}
    for pid in all_pids():
        cmd = read_cmdline(pid)
        if "pyhv-qemu" in cmd:
            out[pid] = cmd
    return out


def fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for n in names:
        try:
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            pass
    return out


def steady_fd_targets(pid: int, steady: float = 0.5, limit: float = 10.0) -> dict[int, str]:
    """libvirtd's fds once their count has not changed for `steady` seconds."""
    deadline = time.monotonic() + limit
    fds = fd_targets(pid)
    since = time.monotonic()
    while time.monotonic() - since < steady and time.monotonic() < deadline:
        time.sleep(0.05)
        now = fd_targets(pid)
        if len(now) != len(fds):
            since = time.monotonic()
        fds = now
    return fds


def pts_entries() -> set[str]:
    return {e for e in os.listdir("/dev/pts") if e.isdigit()}


def pts_holders(index: str) -> list[int]:
    """Processes with /dev/pts/N open, or the master side of it (ptmx, tty-index N)."""
    holders = []
    for pid in all_pids():
        for fd, target in fd_targets(pid).items():
            if target == f"/dev/pts/{index}":
                holders.append(pid)
                break
            if target == "/dev/ptmx":
                try:
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        if f"tty-index:\t{index}\n" in f.read():
                            holders.append(pid)
                            break
                except OSError:
                    pass
    return holders


def tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.add(str(Path(dirpath, n).relative_to(root)))
    return out


# ---------------------------------------------------------------- the soak
@dataclass
class Leak:
    label: str
    count: int
    details: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Daemons:
    libvirtd: int
    virtlogd: Optional[int]
    launcher: int
    ns: str


def daemons(d: LibvirtDaemon) -> Daemons:
    pid = int((d.base / "libvirtd.pid").read_text())
    try:
        logd: Optional[int] = int((d.base / "virtlogd.pid").read_text())
    except (OSError, ValueError):
        logd = None
    st = stat_fields(pid)
    ns = mnt_ns(pid)
    assert st is not None and ns is not None, "libvirtd is not running"
    return Daemons(pid, logd, st[1], ns)


def process_leaks(dm: Daemons, name: str, before: dict[int, str]) -> Leak:
    leak = Leak("leftover processes", 0)
    for pid, cmd in pyhv_qemu_processes().items():
        if pid in before:
            continue
        if mnt_ns(pid) == dm.ns or names_domain(cmd, name):
            leak.details.append(f"pid {pid}: {cmd[:200]}")
        else:
            leak.notes.append(f"not ours, ignored: pid {pid}: {cmd[:160]}")
    known = {dm.libvirtd, dm.virtlogd, dm.launcher}
    for pid in all_pids():
        st = stat_fields(pid)
        if pid in known or st is None:
            continue
        if st[0] == "Z" and st[1] in known:
            leak.details.append(f"pid {pid}: zombie child of {st[1]}")
        elif mnt_ns(pid) == dm.ns and "pyhv-qemu" not in read_cmdline(pid):
            leak.details.append(f"pid {pid} in the namespace: {read_cmdline(pid)[:200]}")
    leak.count = len(leak.details)
    return leak


def fd_leak(base: dict[int, str], end: dict[int, str], margin: int,
            series: list[int]) -> Leak:
    growth = len(end) - len(base)
    leak = Leak("libvirtd fd growth", growth if growth > margin else 0)
    base_targets = sorted(base.values())
    for target in sorted(end.values()):
        if target in base_targets:
            base_targets.remove(target)
        else:
            leak.details.append(f"new fd -> {target}")
    leak.notes.append(f"{len(base)} fds after warm-up, {len(end)} after the last cycle "
                      f"(margin {margin}); right after each cycle: "
                      f"min {min(series, default=0)}, max {max(series, default=0)}")
    if len(leak.details) > 20:
        leak.details[20:] = [f"... {len(leak.details) - 20} more"]
    return leak


def pty_leaks(before: set[str], dm: Daemons, name: str) -> Leak:
    leak = Leak("leftover ptys", 0)
    deadline = time.monotonic() + 5
    while pts_entries() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    for index in sorted(pts_entries() - before, key=int):
        holders = pts_holders(index)
        ours = [p for p in holders
                if p == os.getpid() or mnt_ns(p) == dm.ns or names_domain(read_cmdline(p), name)]
        who = ", ".join(f"{p} ({read_cmdline(p)[:80]})" for p in holders) or "no holder"
        if ours or not holders:
            leak.details.append(f"/dev/pts/{index}: held by {who}")
        elif os.path.exists(f"/dev/pts/{index}"):
            leak.notes.append(f"not ours, ignored: /dev/pts/{index} held by {who}")
    leak.count = len(leak.details)
    return leak


def file_leaks(d: LibvirtDaemon, before: dict[str, set[str]]) -> Leak:
    leak = Leak("leftover files", 0)
    for fixed, paths in before.items():
        for p in sorted(tree(d.host_path(fixed)) - paths):
            leak.details.append(f"{fixed}/{p}")
    leak.count = len(leak.details)
    return leak


def log_errors(path: Path) -> Leak:
    leak = Leak("libvirtd log errors", 0)
    ignored: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        lines = []
        leak.notes.append(f"{path}: {e.strerror}")
    for line in lines:
        if not ERROR_LINE.match(line):
            continue
        label = next((lab for lab, pat in IGNORED_ERRORS if re.search(pat, line)), None)
        if label is None:
            leak.details.append(line)
        else:
            ignored[label] = ignored.get(label, 0) + 1
    for label, n in ignored.items():
        leak.notes.append(f"ignored {n} x {label}")
    leak.count = len(leak.details)
    return leak


def traceback_lines(path: Path) -> Leak:
    leak = Leak("emulator tracebacks", 0)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    leak.details = [line for line in text.splitlines() if "Traceback" in line]
    leak.count = len(leak.details)
    return leak


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def print_summary(cycles: list[Cycle], leaks: list[Leak], wall: float) -> None:
    failures = [c for c in cycles if c.error]
    ok = [c.seconds for c in cycles if not c.error]
    log()
    log("-- summary")
    rows: list[tuple[str, str]] = [("cycles run", str(len(cycles)))]
    for kind in ("destroy", "destroy-waiting", "shutdown"):
        done = [c for c in cycles if c.kind == kind]
        good = [c.seconds for c in done if not c.error]
        med = fmt_s(statistics.median(good)) if good else "-"
        rows.append((f"  {kind}", f"{len(done)} ({sum(1 for c in done if c.error)} failed, "
                                  f"median {med})"))
    rows.append(("failures", str(len(failures))))
    rows += [(lk.label, str(lk.count)) for lk in leaks]
    rows.append(("total wall time", fmt_s(wall)))
    rows.append(("median cycle time", fmt_s(statistics.median(ok)) if ok else "-"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        log(f"  {k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=200,
                    help="start->destroy cycles, and as many start->shutdown (default 200)")
    ap.add_argument("--vcpus", type=int, choices=(1, 2), default=2)
    ap.add_argument("--warmup", type=int, default=5,
                    help="cycles before libvirtd's fd baseline is taken (default 5)")
    ap.add_argument("--fd-margin", type=int, default=0,
                    help="libvirtd fd growth tolerated (default 0)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per step, seconds")
    ap.add_argument("--kernel", type=Path, default=DEFAULT_KERNEL,
                    help=f"PVH guest (default {DEFAULT_KERNEL}; built from tests/guests "
                         "when missing)")
    ap.add_argument("--pyhv-qemu", type=Path, default=DEFAULT_PYHV_QEMU)
    ap.add_argument("--freeze", choices=("head", "tree"),
                    help="run pyhv-qemu on a copy of pyhv taken at the start (git HEAD, or "
                         "the working tree), not on the live checkout")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help="the run's directory is made here (kept afterwards)")
    ap.add_argument("--progress", type=int, default=20, help="a line every N cycles")
    args = ap.parse_args(argv)

    # ---- can it run here?
    if os.geteuid() != 0:
        skip("run it as root: it starts a privileged libvirtd in a private mount namespace")
    if shutil.which("virsh") is None:
        skip("virsh is not installed")
    sys.path.insert(0, str(TESTS))
    from libvirt_daemon import LibvirtDaemon, unavailable_reason
    why = unavailable_reason()
    if why:
        skip(why)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip("/dev/kvm is missing or not readable and writable")
    if not os.access(args.pyhv_qemu, os.X_OK):
        skip(f"{args.pyhv_qemu}: pyhv-qemu is not installed (--pyhv-qemu PATH)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o755)
    kernel: Path = args.kernel
    if not kernel.is_file():
        from guests.build import build_guests
        try:
            kernel = build_guests(args.workdir / "guests").pvh_elf
        except Exception as e:  # noqa: BLE001 - no gcc, no binutils
            skip(f"{args.kernel} is missing and the test guest cannot be built: {e}")
    run_dir = args.workdir / f"soak-{os.getpid()}"
    run_dir.mkdir(mode=0o755)
    name = f"pyhvsoak-{os.getpid()}"
    emulator: Path = args.pyhv_qemu
    if args.freeze:
        emulator = frozen_emulator(args.pyhv_qemu, args.freeze, run_dir)
    serial_log = run_dir / "serial.log"

    started = datetime.datetime.now(datetime.timezone.utc)
    kinds = schedule(args.cycles)
    log(f"soak: {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}")
    log(f"  {len(kinds)} cycles ({args.cycles} destroy, half of them after {WAITING}; "
        f"{args.cycles} shutdown), domain {name}: 64 MiB, {args.vcpus} vCPU(s), "
        f"{kernel} {CMDLINE!r}")
    log(f"  run directory {run_dir}")
    if args.freeze:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True).stdout.strip()[:90]
        log(f"  emulator {emulator}: pyhv frozen from "
            + (f"HEAD {head}" if args.freeze == "head" else f"the working tree of {REPO}"))

    pyhv_before = pyhv_qemu_processes()
    cycles: list[Cycle] = []
    leaks: list[Leak] = []
    interrupted = False
    t_run = time.monotonic()
    d = LibvirtDaemon(run_dir / "libvirt")
    with d:
        dm = daemons(d)
        xml = run_dir / f"{name}.xml"
        xml.write_text(domain_xml(name, emulator, kernel, args.vcpus, serial_log))
        dom = Domain(d, name, serial_log)
        p = dom.virsh("define", str(xml))
        if p.returncode != 0:
            log(f"FAIL: virsh define: {p.stderr.strip()}")
            return 1
        files_before = {f: tree(d.host_path(f))
                        for f in ("/run/libvirt/qemu", "/var/lib/libvirt/qemu")}
        pts_before = pts_entries()
        fds_base = fd_targets(dm.libvirtd)
        fd_series: list[int] = []
        t_run = time.monotonic()
        try:
            for i, kind in enumerate(kinds):
                c = Cycle(i + 1, kind)
                t0 = time.monotonic()
                try:
                    run_cycle(dom, kind, args.timeout)
                except (CycleError, subprocess.TimeoutExpired) as e:
                    c.error = str(e)
                c.seconds = time.monotonic() - t0
                cycles.append(c)
                if c.error:
                    failed = sum(1 for x in cycles if x.error)
                    log(f"  FAIL cycle {c.index} ({kind}): {c.error}")
                    if failed <= MAX_SHOWN_FAILURES:
                        log("    --- domain log tail ---")
                        log("    " + tail(d.domain_log(name), 15).replace("\n", "\n    "))
                        log("    --- serial log tail ---")
                        log("    " + tail(serial_log, 5).replace("\n", "\n    "))
                    dom.recover()
                fd_series.append(len(fd_targets(dm.libvirtd)))
                if c.index == args.warmup:
                    fds_base = steady_fd_targets(dm.libvirtd)
                    log(f"  after {c.index} warm-up cycles: libvirtd has {len(fds_base)} fds")
                if c.index % args.progress == 0 or c.index == len(kinds):
                    ok = [x.seconds for x in cycles if not x.error]
                    med = fmt_s(statistics.median(ok)) if ok else "-"
                    log(f"  cycle {c.index}/{len(kinds)}: "
                        f"{sum(1 for x in cycles if x.error)} failed, median {med}, "
                        f"libvirtd fds {fd_series[-1]}")
        except KeyboardInterrupt:
            interrupted = True
            log(f"  interrupted after {len(cycles)} cycles; checking for leaks")
            dom.recover()
        wall = time.monotonic() - t_run
        fds_end = steady_fd_targets(dm.libvirtd)
        if len(cycles) < args.warmup:
            log(f"  (fewer than {args.warmup} cycles: the fd baseline is from before the "
                "first start)")
        leaks.append(process_leaks(dm, name, pyhv_before))
        leaks.append(fd_leak(fds_base, fds_end, args.fd_margin, fd_series))
        leaks.append(pty_leaks(pts_before, dm, name))
        leaks.append(file_leaks(d, files_before))
        dom.virsh("undefine", name)
    leaks.append(log_errors(d.log_path))
    leaks.append(traceback_lines(d.domain_log(name)))

    log()
    log("-- leaks")
    for lk in leaks:
        log(f"  {lk.label}: {lk.count}")
        for line in lk.details[:20]:
            log(f"    {line}")
        for line in lk.notes:
            log(f"    ({line})")
    print_summary(cycles, leaks, wall)
    failed = any(c.error for c in cycles) or any(lk.count for lk in leaks)
    log(f"RESULT: {'FAIL' if failed else 'OK'} ({run_dir})")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
