#!/usr/bin/env python3
"""Boot benchmark: launch -> guest power-off of the tiny PVH test guest,
pyhv against QEMU (microvm), in one run.

    .venv/bin/python bench/boot_pvh.py [--runs N] [--json FILE]

What is measured, per run: the wall time from just before the VMM process is
spawned (os.posix_spawn) to just after os.wait4 has reaped it, and the peak
resident set (ru_maxrss, KiB on Linux) that wait4 reports for exactly that
child.  The guest (tests/guests, built with gcc) prints a report on COM1 and
powers off through ACPI; both VMMs must exit with status 0.

The runs alternate (pyhv, qemu, pyhv, qemu, ...) so that drift on the host
(frequency, page cache, other load) hits both alike.  Before timing, each VMM
boots the guest once with COM1 going to a file, and the report must end with
the `@end` line: this proves the guest ran to the end under both.

pyhv runs, by default, with its bytecode cached (PYTHONPYCACHEPREFIX in the
temp dir, PYTHONDONTWRITEBYTECODE unset), as an installed pyhv would; with
--bytecode env it runs in the environment as it is (where
PYTHONDONTWRITEBYTECODE=1 and an editable install mean every run compiles
pyhv's sources again).

ru_maxrss has a floor: at exec, Linux folds the peak RSS of the spawning
process's address space into the child's.  The spawner's peak is reset
(/proc/self/clear_refs) before each spawn and the guest is built in a child
interpreter, so the floor is this script's RSS (~15 MiB, printed as `floor`),
below both VMMs' own peaks.

Then, for pyhv only, a start-up breakdown: the bare interpreter
(`python -c pass`), `import pyhv.cli`, and the ten largest cumulative
imports from `python -X importtime -m pyhv run ...`.

Exit status: 0 on success, 1 when a VMM failed (bad exit status or no
report), 2 when the benchmark cannot run here (no /dev/kvm, no QEMU, no gcc).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from benchstats import percentile

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYHV = REPO / ".venv" / "bin" / "pyhv"
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"
DEFAULT_GUEST_DIR = Path(tempfile.gettempdir()) / "pyhv-bench-guests"


def skip(msg: str) -> NoReturn:
    print(f"boot_pvh: skipped: {msg}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------
# spawning one VMM
# --------------------------------------------------------------------------

class Result:
    __slots__ = ("wall", "maxrss_kib", "status")

    def __init__(self, wall: float, maxrss_kib: int, status: int):
        self.wall = wall
        self.maxrss_kib = maxrss_kib
        self.status = status


def _reset_own_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS.

    posix_spawn is clone(CLONE_VM | CLONE_VFORK) + exec, and at exec Linux
    folds the peak RSS of the mm being dropped (ours) into the child's
    ru_maxrss.  So a child's ru_maxrss is max(our peak RSS, its own): reset
    ours before each spawn so that only our current RSS (~10 MiB) is the
    floor.  Writing 5 to clear_refs does that (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def own_rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, (0, 0) when unknown."""
    rss = hwm = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def spawn_and_wait(argv: list[str], stderr_path: str | None = None,
                   env: dict | None = None) -> Result:
    """Run argv with stdin/stdout on /dev/null (stderr to stderr_path or
    /dev/null) and return its wall time, ru_maxrss and exit code."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, stderr_path or os.devnull,
         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
    ]
    env = os.environ if env is None else env
    _reset_own_peak_rss()
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status, rusage = os.wait4(pid, 0)
    t1 = time.perf_counter()
    return Result(t1 - t0, rusage.ru_maxrss, os.waitstatus_to_exitcode(status))


def pyhv_argv(pyhv: str, kernel: Path, memory_mib: int, serial: str) -> list[str]:
    return [pyhv, "run", "--kernel", str(kernel), "--memory", f"{memory_mib}M",
            "--serial", serial]


def qemu_argv(qemu: str, kernel: Path, memory_mib: int, serial: str) -> list[str]:
    return [qemu, "-accel", "kvm", "-machine", "microvm", "-m", str(memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", serial, "-device", "isa-debug-exit,iobase=0xf4",
            "-kernel", str(kernel)]


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------

def summarise(results: list[Result]) -> dict:
    walls = [r.wall for r in results]
    rss = [r.maxrss_kib for r in results]
    return {
        "runs": len(results),
        "wall_s": {
            "median": statistics.median(walls),
            "p90": percentile(walls, 90),
            "min": min(walls),
            "max": max(walls),
            "mean": statistics.fmean(walls),
            "all": walls,
        },
        "peak_rss_kib": {
            "median": statistics.median(rss),
            "max": max(rss),
            "min": min(rss),
            "all": rss,
        },
    }


# --------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------

_BUILD_CODE = """\
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from guests.build import build_guests
images = build_guests(Path(sys.argv[2]))
sys.stdout.write(f"\\nPVH_ELF={images.pvh_elf}\\n")
"""


def build_guest(outdir: Path) -> Path:
    """Build (or reuse the cached) test guest with tests/guests/build.py.

    The build runs in a child interpreter, not here: compressing the bzImage
    payloads (xz, lzma) takes tens of MiB, and our own resident set is the
    floor of every VMM's ru_maxrss (see spawn_and_wait)."""
    outdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_CODE, str(REPO / "tests"), str(outdir)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("PVH_ELF="):
            return Path(line[len("PVH_ELF="):])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    skip(f"cannot build the test guest with tests/guests/build.py: {last}")


def verify(name: str, argv_for_serial, env: dict, workdir: Path) -> tuple[bool, str]:
    """Boot once with COM1 to a file; the report must reach `@end`."""
    serial_file = workdir / f"verify-{name}.serial"
    stderr_file = workdir / f"verify-{name}.stderr"
    argv = argv_for_serial(f"file:{serial_file}")
    r = spawn_and_wait(argv, str(stderr_file), env=env)
    text = serial_file.read_text(errors="replace") if serial_file.exists() else ""
    lines = text.splitlines()
    poweroff = next((ln for ln in lines if ln.startswith("@poweroff")), "")
    if r.status != 0:
        err = stderr_file.read_text(errors="replace").strip()
        return False, f"exit status {r.status}; stderr: {err[-500:]}"
    if "@end" not in lines:
        return False, f"exit status 0 but no '@end' in the COM1 report ({len(lines)} lines)"
    return True, poweroff or "@end seen"


def python_startup(python: str, code: str, runs: int, env: dict) -> float:
    times = []
    for _ in range(runs):
        r = spawn_and_wait([python, "-c", code], env=env)
        if r.status != 0:
            raise RuntimeError(f"{python} -c {code!r} exited {r.status}")
        times.append(r.wall)
    return statistics.median(times)


def parse_importtime(text: str) -> list[tuple[str, int, int, int]]:
    """-> [(module, self_us, cumulative_us, depth)] from -X importtime output."""
    out = []
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        body = line[len("import time:"):]
        parts = body.split("|")
        if len(parts) != 3:
            continue
        try:
            self_us = int(parts[0])
            cum_us = int(parts[1])
        except ValueError:  # the header line
            continue
        raw = parts[2]
        stripped = raw.lstrip(" ")
        # one leading space, then two spaces per nesting level
        depth = max(0, (len(raw) - len(stripped) - 1) // 2)
        out.append((stripped.strip(), self_us, cum_us, depth))
    return out


def importtime_top(python: str, kernel: Path, memory_mib: int, workdir: Path,
                   repeats: int, top: int, env: dict) -> tuple[list[dict], int, list[str]]:
    """Median over `repeats` runs of -X importtime of `python -m pyhv run`:
    (top cumulative imports, total of the top-level imports in us, the
    top-level modules imported, in order)."""
    per_module: dict[str, list[tuple[int, int, int]]] = {}
    argv = [python, "-X", "importtime", "-m", "pyhv", "run", "--kernel",
            str(kernel), "--memory", f"{memory_mib}M", "--serial", "null"]
    total_us = []
    top_level: list[str] = []
    for i in range(repeats):
        err = workdir / f"importtime-{i}.stderr"
        r = spawn_and_wait(argv, str(err), env=env)
        if r.status != 0:
            raise RuntimeError(f"-X importtime run exited {r.status}")
        rows = parse_importtime(err.read_text(errors="replace"))
        total_us.append(sum(row[2] for row in rows if row[3] == 0))
        for mod, _, _, depth in rows:
            if depth == 0 and not mod.endswith("__main__") and mod not in top_level:
                top_level.append(mod)
        for mod, self_us, cum_us, depth in rows:
            per_module.setdefault(mod, []).append((self_us, cum_us, depth))
    table = []
    for mod, vals in per_module.items():
        table.append({
            "module": mod,
            "self_us": int(statistics.median(v[0] for v in vals)),
            "cumulative_us": int(statistics.median(v[1] for v in vals)),
            "depth": vals[0][2],
        })
    table.sort(key=lambda d: d["cumulative_us"], reverse=True)
    return table[:top], int(statistics.median(total_us)), top_level


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def ms(x: float) -> str:
    return f"{x * 1000:7.1f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:6.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20,
                    help="timed runs per VMM (default 20)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs per VMM before timing (default 1)")
    ap.add_argument("--memory", type=int, default=64, metavar="MIB",
                    help="guest RAM in MiB (default 64)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--pyhv", default=str(DEFAULT_PYHV),
                    help="pyhv console script (default .venv/bin/pyhv)")
    ap.add_argument("--python", default=str(DEFAULT_PYTHON),
                    help="interpreter for the breakdown (default .venv/bin/python)")
    ap.add_argument("--qemu", default=None,
                    help="QEMU binary (default: qemu-system-x86_64 on PATH)")
    ap.add_argument("--guest-dir", type=Path, default=DEFAULT_GUEST_DIR,
                    help=f"where the test guest is built and cached (default {DEFAULT_GUEST_DIR})")
    ap.add_argument("--bytecode", choices=("cached", "env"), default="cached",
                    help="cached (default): run pyhv with a bytecode cache under "
                         "PYTHONPYCACHEPREFIX in the temp dir and PYTHONDONTWRITEBYTECODE "
                         "unset, as an installed pyhv has; env: the environment as it is "
                         "(with PYTHONDONTWRITEBYTECODE=1 every run recompiles pyhv's sources)")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the pyhv start-up breakdown")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    # ---- can we run at all?
    if not os.path.exists("/dev/kvm"):
        skip("/dev/kvm is missing")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip("/dev/kvm is not readable and writable by this user")
    qemu = args.qemu or shutil.which("qemu-system-x86_64")
    if not qemu or not os.access(qemu, os.X_OK):
        skip("qemu-system-x86_64 not found (use --qemu PATH)")
    if not os.access(args.pyhv, os.X_OK):
        skip(f"pyhv console script not found at {args.pyhv} (use --pyhv PATH)")

    kernel = build_guest(args.guest_dir)
    workdir = Path(tempfile.mkdtemp(prefix="pyhv-bench-"))

    vmms = {
        "pyhv": lambda serial: pyhv_argv(args.pyhv, kernel, args.memory, serial),
        "qemu": lambda serial: qemu_argv(qemu, kernel, args.memory, serial),
    }
    py_env = dict(os.environ)
    if args.bytecode == "cached":
        py_env.pop("PYTHONDONTWRITEBYTECODE", None)
        py_env["PYTHONPYCACHEPREFIX"] = str(
            Path(tempfile.gettempdir()) / "pyhv-bench-pycache")
    envs = {"pyhv": py_env, "qemu": dict(os.environ)}
    bytecode_note = (
        f"cached under PYTHONPYCACHEPREFIX={py_env['PYTHONPYCACHEPREFIX']}"
        if args.bytecode == "cached" else
        "environment as is (PYTHONDONTWRITEBYTECODE="
        f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")

    print(f"guest   {kernel}")
    print(f"pyhv    {' '.join(vmms['pyhv']('null'))}")
    print(f"        bytecode: {bytecode_note}")
    print(f"qemu    {' '.join(vmms['qemu']('null'))}")

    # ---- did the guest really run?
    verified = {}
    for name, mk in vmms.items():
        ok, detail = verify(name, mk, envs[name], workdir)
        verified[name] = detail
        print(f"verify  {name}: {'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            print(f"boot_pvh: {name} did not boot the guest to the end", file=sys.stderr)
            return 1

    # ---- the floor of ru_maxrss: what a trivial child reports
    true_bin = shutil.which("true") or "/bin/true"
    rss_floor = max(spawn_and_wait([true_bin]).maxrss_kib for _ in range(3))
    print(f"floor   ru_maxrss of `{true_bin}` spawned from here: {mib(rss_floor).strip()}"
          f" (this process: RSS {mib(own_rss_kib()[0]).strip()})")

    # ---- warm-up, then alternating timed runs
    for _ in range(args.warmup):
        for name, mk in vmms.items():
            spawn_and_wait(mk("null"), env=envs[name])
    results: dict[str, list[Result]] = {name: [] for name in vmms}
    failures: dict[str, list[int]] = {name: [] for name in vmms}
    for _ in range(args.runs):
        for name, mk in vmms.items():
            r = spawn_and_wait(mk("null"), env=envs[name])
            if r.status != 0:
                failures[name].append(r.status)
            results[name].append(r)
    for name, bad in failures.items():
        if bad:
            print(f"boot_pvh: {name}: {len(bad)}/{args.runs} runs exited non-zero "
                  f"(statuses {sorted(set(bad))})", file=sys.stderr)
    if any(failures.values()):
        return 1

    summary = {name: summarise(rs) for name, rs in results.items()}
    print()
    print(f"{'':6} {'runs':>4} {'median':>10} {'p90':>10} {'min':>10} {'max':>10}"
          f" {'peak RSS (median)':>18} {'(max)':>10}")
    for name, s in summary.items():
        w, m = s["wall_s"], s["peak_rss_kib"]
        print(f"{name:6} {s['runs']:>4} {ms(w['median']):>10} {ms(w['p90']):>10}"
              f" {ms(w['min']):>10} {ms(w['max']):>10} {mib(m['median']):>18}"
              f" {mib(m['max']):>10}")
    p, q = summary["pyhv"], summary["qemu"]
    time_ratio = p["wall_s"]["median"] / q["wall_s"]["median"]
    rss_ratio = p["peak_rss_kib"]["median"] / q["peak_rss_kib"]["median"]
    print(f"ratio  pyhv/qemu: time (medians) {time_ratio:.2f}x, "
          f"peak RSS (medians) {rss_ratio:.2f}x")
    for name, s in summary.items():
        if s["peak_rss_kib"]["min"] <= rss_floor + 1024:
            print(f"warning: {name}'s peak RSS is within 1 MiB of the floor "
                  f"({mib(rss_floor).strip()}): its figure may be the floor, not its own")

    # ---- where does pyhv's time go?
    breakdown = None
    if not args.no_breakdown:
        n = max(5, min(args.runs, 15))
        t_pass = python_startup(args.python, "pass", n, py_env)
        t_import = python_startup(args.python, "import pyhv.cli", n, py_env)
        top, imports_us, modules = importtime_top(args.python, kernel, args.memory,
                                                  workdir, repeats=3, top=10, env=py_env)
        # the same imports, timed without -X importtime's own overhead
        import_all = "".join(f"try: import {m}\nexcept Exception: pass\n"
                             for m in modules)
        t_import_all = python_startup(args.python, import_all, n, py_env)
        t_total = p["wall_s"]["median"]
        breakdown = {
            "python_c_pass_s": t_pass,
            "python_c_import_pyhv_cli_s": t_import,
            "import_pyhv_cli_only_s": t_import - t_pass,
            "python_c_import_all_of_pyhv_run_s": t_import_all,
            "imports_of_pyhv_run_only_s": t_import_all - t_pass,
            "rest_of_pyhv_run_s": t_total - t_import_all,
            "top_level_modules_of_pyhv_run": modules,
            "importtime_total_top_level_us": imports_us,
            "importtime_top10_cumulative": top,
        }
        print()
        print("pyhv start-up breakdown (medians):")
        print(f"  python -c pass                    {ms(t_pass)}")
        print(f"  python -c 'import pyhv.cli'       {ms(t_import)}"
              f"   (imports alone: {ms(t_import - t_pass).strip()})")
        print(f"  python -c 'import <all {len(modules)} top-level modules pyhv run imports>'"
              f"\n                                    {ms(t_import_all)}"
              f"   (imports alone: {ms(t_import_all - t_pass).strip()})")
        print(f"  pyhv run, whole (timed runs)      {ms(t_total)}"
              f"   (beyond start-up and imports: {ms(t_total - t_import_all).strip()}:"
              f" VM set-up, guest run, teardown)")
        print(f"  -X importtime, sum of the top-level imports: {imports_us / 1000:.1f} ms"
              f" (includes -X importtime's own overhead)")
        print("  top 10 cumulative imports (python -X importtime -m pyhv run ...):")
        print(f"    {'cumul.':>9} {'self':>9}  module")
        for row in top:
            print(f"    {row['cumulative_us'] / 1000:6.1f} ms {row['self_us'] / 1000:6.1f} ms"
                  f"  {'  ' * row['depth']}{row['module']}")

    pm, qm = p["wall_s"]["median"], q["wall_s"]["median"]
    line = (f"pyhv {pm:.3f} s / qemu {qm:.3f} s = {time_ratio:.2f}x ; "
            f"peak RSS pyhv {p['peak_rss_kib']['median'] / 1024:.0f} MiB / "
            f"qemu {q['peak_rss_kib']['median'] / 1024:.0f} MiB")
    print()
    print(line)

    if args.json:
        doc = {
            "benchmark": "boot_pvh",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "guest": str(kernel),
            "memory_mib": args.memory,
            "pyhv_bytecode": bytecode_note,
            "commands": {name: mk("null") for name, mk in vmms.items()},
            "verify": verified,
            "runs": args.runs,
            "warmup": args.warmup,
            "rss_floor_kib": rss_floor,
            "results": summary,
            "ratio_pyhv_over_qemu": {"wall_median": time_ratio,
                                     "peak_rss_median": rss_ratio},
            "breakdown": breakdown,
            "summary": line,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")

    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
