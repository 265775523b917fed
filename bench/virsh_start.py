#!/usr/bin/env python3
"""Start benchmark under libvirt: `virsh start` -> first guest console byte,
pyhv (pyhv-qemu) against QEMU, both driven by the SAME private libvirtd.

    .venv/bin/python bench/virsh_start.py [--runs N] [--json FILE]

Run it as root (a privileged libvirtd in a private mount namespace, see
tests/libvirt_daemon.py).  The guest is the tiny PVH test guest
(tests/guests, built with gcc) booted as a direct kernel with the command
line `pyhv.wait=powerbutton`: it prints its report on COM1 at once and then
halts, waiting for the ACPI power button, so the domain stays running until
it is destroyed.

Variants (one persistent domain each, identical XML but for <emulator>, the
machine type and, for qboot, a <loader>):

* pyhv            pyhv-qemu, machine 'pc'
* qemu-pc         qemu-system-x86_64, machine 'pc' (SeaBIOS, then the PVH option ROM)
* qemu-q35        machine 'q35' (SeaBIOS as well)
* qemu-microvm    machine 'microvm' (qboot-based bios-microvm.bin); libvirt 9.0
                  defines and starts it.  Its ACPI is hardware-reduced, so the
                  guest cannot arm a power button: after its report it powers
                  off by itself (`@poweroff method=sleep-control`)
* qemu-pc-qboot   machine 'pc' with <loader type='rom'>qboot.rom</loader>
                  (QEMU's -bios) instead of SeaBIOS, when qboot.rom exists
                  (--no-qboot skips it)

A machine type libvirt refuses is reported with libvirt's message and left out.

Primary figure (mode "file"): the serial port is a `type='file'` backend.  A
thread polls the file's size every millisecond from just before
`virDomainCreate` (`dom.create()`, what `virsh start` calls) is entered; the
figure is the time from that call until the file is non-empty.  The same
thread also records when the report is complete (its last line, `@end`), and
that line must appear in every run: a variant whose cold run lacks it is left
out, a timed run without it is a failure (exit 1).  `create()` alone is
libvirt's whole start path (spawn, QMP handshake, `cont`).

Secondary check (mode "console", --console): the serial port is a pty, and
right after `create()` returns the libvirt console stream is opened
(`openConsole(..., VIR_DOMAIN_CONSOLE_FORCE)`) and drained by a thread doing
blocking `stream.recv()`; the figure is the time from `create()` start to the
first byte received.  Output the guest wrote before the console was opened
is only seen if the emulator's pty kept it, so the first bytes are printed.

Runs alternate between the variants (pyhv, qemu-pc, qemu-q35, pyhv, ...).
The first run of each variant is a warm-up, reported separately as "cold";
the domain's `defineXML` time is reported too (the first domain of an
emulator pays libvirt's capability probe there).  Between runs the domain is
destroyed and the script waits until it is inactive, then settles briefly.

Exit status: 0 on success, 1 when a run failed (no report, timeout, libvirt
error), 2 when the benchmark cannot run here (no libvirt, QEMU, /dev/kvm,
pyhv-qemu, gcc, or not root).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn, Optional

from benchstats import percentile

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
DEFAULT_PYHV_QEMU = REPO / ".venv" / "bin" / "pyhv-qemu"
DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_WORKDIR = Path("/var/tmp/pyhv-bench")
QBOOT = "/usr/share/qemu/qboot.rom"
CMDLINE = "pyhv.wait=powerbutton"
REPORT_DONE = "@end"     # the report's last line (the pty may turn \n into \r\n)


def report_done(data: bytes) -> bool:
    return b"\n@end\n" in data or b"\n@end\r" in data
NAME_PREFIX = "pyhvbench-"


def skip(msg: str) -> NoReturn:
    print(f"SKIP: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- statistics
def stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"runs": len(values), "median": statistics.median(values),
            "p90": percentile(values, 90), "min": min(values), "max": max(values)}


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.2f} s"


def fmt_stats(s: dict) -> str:
    if not s:
        return "-"
    return f"{fmt_s(s['median'])} / {fmt_s(s['p90'])} / {fmt_s(s['min'])}"


# ---------------------------------------------------------------- domains
class Variant:
    def __init__(self, label: str, emulator: str, machine: str,
                 loader: Optional[str] = None) -> None:
        self.label = label
        self.emulator = emulator
        self.machine = machine
        self.loader = loader
        self.dom = None           # libvirt.virDomain, per mode
        self.serial_path: Optional[Path] = None
        self.define_s: dict[str, float] = {}
        self.canonical_machine = machine

    def name(self, mode: str) -> str:
        return f"{NAME_PREFIX}{self.label}-{mode}"


def domain_xml(name: str, v: Variant, kernel: Path, serial_xml: str) -> str:
    loader = f"<loader type='rom'>{v.loader}</loader>" if v.loader else ""
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{v.machine}'>hvm</type>{loader}
    <kernel>{kernel}</kernel><cmdline>{CMDLINE}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{v.emulator}</emulator>
    <controller type='usb' model='none'/>
    {serial_xml}
    <memballoon model='none'/>
  </devices>
</domain>"""


def file_serial_xml(path: Path) -> str:
    # libvirt adds the matching <console type='file'> itself
    return f"<serial type='file'><source path='{path}'/><target port='0'/></serial>"


PTY_SERIAL_XML = ("<serial type='pty'><target port='0'/></serial>"
                  "<console type='pty'><target type='serial'/></console>")


def wait_inactive(dom, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while dom.isActive():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dom.name()} still active {timeout:.0f} s after destroy")
        time.sleep(0.02)


def stop_domain(dom, settle: float) -> None:
    import libvirt
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    wait_inactive(dom)
    time.sleep(settle)


# ---------------------------------------------------------------- one run
class FilePoller(threading.Thread):
    """Polls the serial file: when it first has bytes, and when the report is done."""

    def __init__(self, path: Path, interval: float) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.interval = interval
        self.first: Optional[float] = None
        self.done: Optional[float] = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        path = str(self.path)
        while not self.stop_flag.is_set():
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = 0
            if size:
                now = time.perf_counter()
                if self.first is None:
                    self.first = now
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    data = b""
                if report_done(data):
                    self.done = time.perf_counter() if self.done is None else self.done
                    return
            time.sleep(self.interval)


def run_file(v: Variant, timeout: float, interval: float) -> dict:
    """Mode "file": create() with a polling thread on the serial file."""
    assert v.serial_path is not None
    v.serial_path.unlink(missing_ok=True)
    poller = FilePoller(v.serial_path, interval)
    poller.start()
    t0 = time.perf_counter()
    v.dom.create()
    t1 = time.perf_counter()
    poller.join(timeout)
    poller.stop_flag.set()
    poller.join(1)
    text = v.serial_path.read_bytes() if v.serial_path.exists() else b""
    r = {"create_s": t1 - t0,
         "first_byte_s": None if poller.first is None else poller.first - t0,
         "report_s": None if poller.done is None else poller.done - t0,
         "bytes": len(text), "head": text[:16].decode("latin-1")}
    if poller.done is None:
        r["error"] = f"no {REPORT_DONE} line within {timeout:.0f} s " \
                     f"({len(text)} bytes: {text[-200:]!r})"
    else:
        r.update(power_off(v.dom, t0, timeout))
    return r


def power_off(dom, t0: float, timeout: float) -> dict:
    """``virsh shutdown`` (the ACPI power button the guest waits for) once the
    report is done: the time until libvirt sees the domain shut off, from the
    request and from the start of create()."""
    import libvirt
    t2 = time.perf_counter()
    try:
        dom.shutdown()
    except libvirt.libvirtError as e:
        return {"poweroff_error": str(e)}
    deadline = t2 + timeout
    while dom.isActive():
        if time.perf_counter() > deadline:
            return {"poweroff_error": f"still running {timeout:.0f} s after shutdown()"}
        time.sleep(0.002)
    t3 = time.perf_counter()
    return {"shutdown_s": t3 - t2, "start_to_off_s": t3 - t0}


class ConsoleReader(threading.Thread):
    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.first: Optional[float] = None
        self.done: Optional[float] = None
        self.data = b""

    def run(self) -> None:
        import libvirt
        while True:
            try:
                chunk = self.stream.recv(4096)
            except libvirt.libvirtError:
                return
            if not isinstance(chunk, bytes) or not chunk:
                return
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.data += chunk
            if self.done is None and report_done(self.data):
                self.done = now


def run_console(v: Variant, conn, timeout: float) -> dict:
    """Mode "console": create(), then open the console stream at once."""
    import libvirt
    t0 = time.perf_counter()
    v.dom.create()
    t1 = time.perf_counter()
    stream = conn.newStream(0)
    v.dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    t2 = time.perf_counter()
    reader = ConsoleReader(stream)
    reader.start()
    deadline = time.monotonic() + timeout
    while reader.done is None and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        stream.abort()
    except libvirt.libvirtError:
        pass
    r = {"create_s": t1 - t0, "open_console_s": t2 - t1,
         "first_byte_s": None if reader.first is None else reader.first - t0,
         "report_s": None if reader.done is None else reader.done - t0,
         "bytes": len(reader.data), "head": reader.data[:16].decode("latin-1")}
    if reader.done is None:
        r["error"] = f"no {REPORT_DONE} line on the console within {timeout:.0f} s " \
                     f"({len(reader.data)} bytes: {reader.data[-200:]!r})"
    return r


# ---------------------------------------------------------------- benchmark
def define_variant(conn, v: Variant, mode: str, kernel: Path, workdir: Path) -> None:
    from xml.etree import ElementTree as ET
    if mode == "file":
        v.serial_path = workdir / f"{v.label}.serial"
        serial = file_serial_xml(v.serial_path)
    else:
        serial = PTY_SERIAL_XML
    t0 = time.perf_counter()
    v.dom = conn.defineXML(domain_xml(v.name(mode), v, kernel, serial))
    v.define_s[mode] = time.perf_counter() - t0
    os_type = ET.fromstring(v.dom.XMLDesc(0)).find("os/type")
    if os_type is not None:
        v.canonical_machine = os_type.get("machine", v.machine)


def run_mode(conn, mode: str, variants: list[Variant], kernel: Path, serial_dir: Path,
             args: argparse.Namespace) -> tuple[list[Variant], dict, dict[str, str]]:
    """Define each variant, one cold run each (it must print the report, or the
    variant is dropped), then `args.runs` alternating rounds over the rest."""
    import libvirt
    results: dict[str, dict] = {}
    dropped: dict[str, str] = {}

    def one(v: Variant, tag: str) -> dict:
        try:
            if mode == "file":
                r = run_file(v, args.timeout, args.poll)
            else:
                r = run_console(v, conn, args.timeout)
        except Exception as e:  # noqa: BLE001 - libvirt errors end up in the table
            r = {"error": f"{type(e).__name__}: {e}"}
        finally:
            stop_domain(v.dom, args.settle)
        log(f"  [{mode}] {tag:>5} {v.label:<14} create {fmt_s(r.get('create_s')):>9}"
            f"  first byte {fmt_s(r.get('first_byte_s')):>9}"
            f"  report {fmt_s(r.get('report_s')):>9}  head {r.get('head', '')!r}"
            + (f"  ERROR {r['error']}" if "error" in r else ""))
        return r

    active: list[Variant] = []
    for v in variants:
        try:
            define_variant(conn, v, mode, kernel, serial_dir)
        except libvirt.libvirtError as e:
            dropped[v.label] = f"libvirt refuses the domain: {e.get_error_message()}"
            log(f"  {v.label}: {dropped[v.label]}")
            continue
        log(f"  defined {v.name(mode)}: {v.emulator} machine {v.canonical_machine}"
            + (f" loader {v.loader}" if v.loader else "")
            + f" (defineXML {fmt_s(v.define_s[mode])})")
        active.append(v)
    for v in list(active):
        cold = one(v, "cold")
        results[v.label] = {"cold": cold, "runs": []}
        if "error" in cold:
            dropped[v.label] = f"the cold run failed: {cold['error']}"
            log(f"  {v.label}: dropped, {dropped[v.label]}")
            active.remove(v)
            v.dom.undefine()
    for i in range(args.runs):
        for v in active:
            results[v.label]["runs"].append(one(v, f"{i + 1}/{args.runs}"))
    for v in active:
        v.dom.undefine()
    return active, results, dropped


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for label, res in results.items():
        ok = [r for r in res["runs"] if "error" not in r]
        out[label] = {key: stats([r[key] for r in ok if r.get(key) is not None])
                      for key in ("create_s", "first_byte_s", "report_s", "open_console_s",
                                  "shutdown_s", "start_to_off_s")}
        out[label]["errors"] = sum(1 for r in res["runs"] if "error" in r)
    return out


def print_table(mode: str, variants: list[Variant], results: dict, summary: dict) -> None:
    log()
    title = {"file": "serial type='file': create() start -> serial file non-empty",
             "console": "serial pty + console stream opened after create()"}[mode]
    log(f"-- results, mode {mode}: {title}")
    log("   figures: median / p90 / min over the timed runs (cold = first run, not counted)")
    log(f"{'variant':<14} {'machine':<16} {'create()':>30} {'first byte':>30} "
        f"{'report (@end)':>30} {'cold create/first':>22} {'define':>8}")
    for v in variants:
        s = summary[v.label]
        cold = results[v.label]["cold"] or {}
        log(f"{v.label:<14} {v.canonical_machine:<16} {fmt_stats(s['create_s']):>30} "
            f"{fmt_stats(s['first_byte_s']):>30} {fmt_stats(s['report_s']):>30} "
            f"{fmt_s(cold.get('create_s')) + ' / ' + fmt_s(cold.get('first_byte_s')):>22} "
            f"{fmt_s(v.define_s.get(mode)):>8}")
        if s.get("shutdown_s"):
            log(f"{'':<14} {'':<16} shutdown() -> shut off {fmt_stats(s['shutdown_s'])}; "
                f"create() -> shut off {fmt_stats(s['start_to_off_s'])}")
        if s["errors"]:
            log(f"   {v.label}: {s['errors']} failed run(s)")


def ratios(summary: dict, key: str) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    p = summary.get("pyhv", {}).get(key)
    for label, s in summary.items():
        if label == "pyhv" or not s.get(key) or not p:
            continue
        out[label] = p["median"] / s[key]["median"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per variant (default 7)")
    ap.add_argument("--machines", default="pc,q35,microvm",
                    help="QEMU machine types, comma-separated (default pc,q35,microvm)")
    ap.add_argument("--no-qboot", action="store_true",
                    help=f"skip QEMU pc with {QBOOT} as its BIOS (measured when present)")
    ap.add_argument("--console", action="store_true",
                    help="also the secondary mode: pty + libvirt console stream")
    ap.add_argument("--no-file", action="store_true", help="skip the primary (file) mode")
    ap.add_argument("--qemu", default=DEFAULT_QEMU)
    ap.add_argument("--pyhv-qemu", default=str(DEFAULT_PYHV_QEMU))
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help="world-readable dir: guest images, serial files, the daemon's dir")
    ap.add_argument("--timeout", type=float, default=90.0, help="per run, seconds")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="pause after each destroy, seconds (default 0.5)")
    ap.add_argument("--poll", type=float, default=0.001,
                    help="serial file poll interval, seconds (default 0.001)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args(argv)

    # ---- can it run here?
    try:
        import libvirt
    except ImportError:
        skip("libvirt-python is not importable (apt install python3-libvirt, or "
             "pip install libvirt-python)")
    sys.path.insert(0, str(TESTS))
    from libvirt_daemon import LibvirtDaemon, unavailable_reason
    why = unavailable_reason()
    if why:
        skip(why)
    if not os.path.exists("/dev/kvm"):
        skip("/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip("/dev/kvm is not readable and writable")
    if not os.access(args.qemu, os.X_OK):
        skip(f"{args.qemu}: QEMU is not installed (--qemu PATH)")
    if not os.access(args.pyhv_qemu, os.X_OK):
        skip(f"{args.pyhv_qemu}: pyhv-qemu is not installed (--pyhv-qemu PATH)")
    from guests.build import build_guests
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o755)
    try:
        images = build_guests(args.workdir / "guests")
    except Exception as e:  # noqa: BLE001 - no gcc, no binutils
        skip(f"cannot build the test guest: {e}")
    kernel = images.pvh_elf
    run_dir = args.workdir / f"run-{os.getpid()}"
    serial_dir = run_dir / "serial"
    serial_dir.mkdir(parents=True)
    for d in (run_dir, serial_dir):
        os.chmod(d, 0o755)

    variants = [Variant("pyhv", args.pyhv_qemu, "pc")]
    for m in [m.strip() for m in args.machines.split(",") if m.strip()]:
        variants.append(Variant(f"qemu-{m}", args.qemu, m))
    if not args.no_qboot and os.path.exists(QBOOT):
        variants.append(Variant("qemu-pc-qboot", args.qemu, "pc", QBOOT))

    started = datetime.datetime.now(datetime.timezone.utc)
    log(f"virsh_start: {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, kernel {platform.release()}")
    log(f"  libvirt {libvirt.getVersion() // 1000000}.{libvirt.getVersion() // 1000 % 1000}."
        f"{libvirt.getVersion() % 1000}, guest {kernel} (cmdline {CMDLINE!r}), "
        f"{args.runs} runs per variant, alternating")
    report: dict = {"started": started.isoformat(), "runs": args.runs, "kernel": str(kernel),
                    "argv": sys.argv, "modes": {}}
    failed = False
    with LibvirtDaemon(run_dir / "libvirt") as d:
        conn = libvirt.open(d.uri)
        # a recv() on a console stream that abort() closed is expected; keep stderr clean
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        log(f"  private libvirtd in {run_dir / 'libvirt'}")
        try:
            modes = ([] if args.no_file else ["file"]) + (["console"] if args.console else [])
            for mode in modes:
                log()
                log(f"== mode {mode}")
                active, results, dropped = run_mode(conn, mode, variants, kernel, serial_dir,
                                                    args)
                summary = summarise(results)
                print_table(mode, active, results, summary)
                for label, why in dropped.items():
                    log(f"   {label}: not measured, {why}")
                rat = {k: ratios(summary, k) for k in ("first_byte_s", "create_s", "report_s",
                                                       "start_to_off_s")}
                for key, rs in rat.items():
                    if rs:
                        log(f"   pyhv/QEMU {key[:-2]} (medians): " + ", ".join(
                            f"{label} {r:.3f}x" for label, r in rs.items()))
                report["modes"][mode] = {
                    "variants": {v.label: {"emulator": v.emulator, "machine": v.machine,
                                           "canonical_machine": v.canonical_machine,
                                           "loader": v.loader,
                                           "define_s": v.define_s.get(mode)}
                                 for v in variants},
                    "dropped": dropped, "results": results, "summary": summary,
                    "ratios": rat}
                if ("pyhv" in dropped or not any(v.label != "pyhv" for v in active)
                        or any(s["errors"] for s in summary.values())):
                    failed = True
        finally:
            conn.close()

    # ---- summary line (primary mode when it ran)
    mode = "file" if "file" in report["modes"] else next(iter(report["modes"]), None)
    if mode is not None:
        summ = report["modes"][mode]["summary"]
        p = summ.get("pyhv", {}).get("first_byte_s")
        qemus = {k: s["first_byte_s"]["median"] for k, s in summ.items()
                 if k != "pyhv" and s.get("first_byte_s")}
        if p and qemus:
            best = min(qemus, key=qemus.get)
            parts = [f"{k} {fmt_s(t)} ({p['median'] / t:.3f}x)" for k, t in qemus.items()]
            verdicts = []
            for ref in dict.fromkeys(["qemu-pc", best]):
                if ref in qemus:
                    ok = p["median"] <= 0.5 * qemus[ref]
                    verdicts.append(f"vs {ref} {'met' if ok else 'NOT met'}")
            line = (f"SUMMARY [{mode}] start -> first console byte, medians of {args.runs}: "
                    f"pyhv {fmt_s(p['median'])} vs " + ", ".join(parts)
                    + " ; target pyhv <= 0.5x: " + ", ".join(verdicts))
            log()
            log(line)
            report["summary_line"] = line
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        log(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
