"""Run one fuzz target with atheris (coverage-guided, libFuzzer).

    python tests/fuzz/run.py TARGET --seconds N      # or --runs N
    python tests/fuzz/run.py --list
    python tests/fuzz/run.py TARGET --replay FILE... # rerun saved inputs, no fuzzer

The fuzzer runs in a child process (libFuzzer's main never returns); this
process streams its output, then reports.  Exit status: 0 no finding, 1 a
finding (each printed with its input in hex and the traceback; the input is
kept under ``--artifacts``), 2 the run itself failed.

A finding is an exception other than the parser's typed error (the target
decides which), an input that takes longer than ``--slow`` seconds (twice in a
row), or one that does not finish within ``--hang`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

FUZZ = Path(__file__).resolve().parent
TESTS = FUZZ.parent
ROOT = TESTS.parent
for _p in (str(ROOT), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fuzz import SELFTESTS, TARGETS  # noqa: E402

EXIT_FINDING = 1
EXIT_ERROR = 2
#: packages whose code atheris instruments for coverage
INSTRUMENT = ("pyhv", "elftools")
#: artifact file prefixes: libFuzzer's and this runner's
KINDS = ("crash", "slow", "hang", "timeout", "oom", "leak")
#: where targets may keep scratch files (set for the child)
SCRATCH_ENV = "PYHV_FUZZ_SCRATCH"


def module_name(target: str) -> str:
    name = TARGETS.get(target) or SELFTESTS.get(target)
    if name is None:
        raise SystemExit(f"run.py: unknown target {target!r} "
                         f"(known: {', '.join(TARGETS)})")
    return f"fuzz.{name}"


def load_target(target: str) -> ModuleType:
    return importlib.import_module(module_name(target))


def hexdump(data: bytes) -> str:
    return data.hex()


# --------------------------------------------------------------------------- the child


class _Watch:
    """The input being run, and since when (for the hang watchdog)."""

    def __init__(self) -> None:
        self.data = b""
        self.start: Optional[float] = None
        self.lock = threading.Lock()
        #: set by the first reporter: the other stays quiet
        self.reported = False


def _write_artifact(artifacts: Path, kind: str, data: bytes) -> Path:
    path = artifacts / f"{kind}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def _report(watch: _Watch, artifacts: Path, target: str, kind: str, data: bytes,
            detail: str) -> None:
    with watch.lock:
        if watch.reported:
            return
        watch.reported = True
    path = _write_artifact(artifacts, kind, data)
    sys.stdout.flush()
    sys.stderr.write(f"\n=== pyhv fuzz: {kind} in target {target!r} ===\n"
                     f"input ({len(data)} bytes, hex): {hexdump(data)}\n"
                     f"saved as: {path}\n{detail}\n")
    sys.stderr.flush()


def _watchdog(watch: _Watch, artifacts: Path, target: str, hang: float,
              main_id: int) -> None:
    while True:
        time.sleep(min(0.1, hang / 4))
        start = watch.start
        if start is None or time.monotonic() - start < hang:
            continue
        frame = sys._current_frames().get(main_id)
        stack = "".join(traceback.format_stack(frame)) if frame else "(no stack)\n"
        _report(watch, artifacts, target, "hang", watch.data,
                f"still running after {hang:g} s, at:\n{stack}")
        os._exit(EXIT_FINDING)


def worker(args: argparse.Namespace) -> None:
    import atheris

    workdir = Path(args.workdir)
    corpus = Path(args.corpus) if args.corpus else workdir / "corpus"
    artifacts = Path(args.artifacts) if args.artifacts else workdir / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    os.environ[SCRATCH_ENV] = str(workdir)

    with atheris.instrument_imports(include=list(INSTRUMENT)):
        mod = load_target(args.target)
    target: Callable[[bytes], None] = mod.TARGET

    for seed in mod.seeds():
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()}"
        if not path.exists():
            path.write_bytes(seed)
    fuzzer_args = [sys.argv[0], str(corpus), f"-artifact_prefix={artifacts}/",
                   f"-max_len={args.max_len or getattr(mod, 'MAX_LEN', 4096)}",
                   f"-timeout={max(1, int(args.hang * 2 + 0.999))}",
                   "-print_final_stats=1", f"-rss_limit_mb={args.rss_limit_mb}"]
    if args.runs is not None:
        fuzzer_args.append(f"-runs={args.runs}")
    if args.seconds is not None:
        fuzzer_args.append(f"-max_total_time={args.seconds}")
    if args.seed is not None:
        fuzzer_args.append(f"-seed={args.seed}")
    if not args.verbose:
        fuzzer_args.append("-print_pcs=0")
    tokens: list[bytes] = getattr(mod, "dictionary", list)()
    if tokens and not args.no_dict:
        dict_path = workdir / "dict.txt"
        dict_path.write_text("".join(
            '"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                          for b in tok) + '"\n'
            for tok in tokens if tok))
        fuzzer_args.append(f"-dict={dict_path}")

    watch = _Watch()
    threading.Thread(target=_watchdog, daemon=True, name="fuzz-watchdog",
                     args=(watch, artifacts, args.target, args.hang,
                           threading.get_ident())).start()
    slow = args.slow

    def one_input(data: bytes) -> None:
        watch.data = data
        watch.start = time.monotonic()
        try:
            target(data)
        except KeyboardInterrupt:
            raise
        except BaseException:
            watch.start = None
            _report(watch, artifacts, args.target, "crash", data, traceback.format_exc())
            os._exit(EXIT_FINDING)
        elapsed = time.monotonic() - watch.start
        if elapsed > slow:
            # a second run tells a slow input from a pause of the whole machine
            watch.start = time.monotonic()
            try:
                target(data)
            except Exception:
                pass
            again = time.monotonic() - watch.start
            if again > slow:
                watch.start = None
                _report(watch, artifacts, args.target, "slow", data,
                        f"took {elapsed:.3f} s, then {again:.3f} s (limit {slow:g} s)")
                os._exit(EXIT_FINDING)
        watch.start = None

    print(f"run.py: fuzzing {args.target} ({mod.__name__}) with atheris: "
          f"{' '.join(fuzzer_args[1:])}", file=sys.stderr, flush=True)
    atheris.Setup(fuzzer_args, one_input)
    atheris.Fuzz()


# --------------------------------------------------------------------------- the parent


_PROGRESS = re.compile(r"^#\d+\s+(NEW|REDUCE|pulse|INITED|DONE|RELOAD)\b")
_UNITS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_LAST = re.compile(r"^#(\d+)\s")


def _worker_argv(args: argparse.Namespace, workdir: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), args.target, "--worker",
            "--workdir", str(workdir), "--slow", str(args.slow), "--hang", str(args.hang),
            "--rss-limit-mb", str(args.rss_limit_mb)]
    for opt, value in (("--runs", args.runs), ("--seconds", args.seconds),
                       ("--seed", args.seed), ("--max-len", args.max_len),
                       ("--corpus", args.corpus), ("--artifacts", args.artifacts)):
        if value is not None:
            argv += [opt, str(value)]
    if args.no_dict:
        argv.append("--no-dict")
    if args.verbose:
        argv.append("--verbose")
    return argv


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    """Run the child; the result as a dict (also what ``--json`` writes)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pyhv-fuzz-{args.target}-"))
    artifacts = Path(args.artifacts) if args.artifacts else workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in artifacts.iterdir()}
    tail: collections.deque[str] = collections.deque(maxlen=300)
    runs = 0
    final: Optional[int] = None
    started = time.monotonic()
    env = dict(os.environ, PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
    proc = subprocess.Popen(_worker_argv(args, workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True,
                            errors="replace", bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail.append(line)
            if m := _UNITS.search(line):
                final = int(m.group(1))
            elif m := _LAST.match(line):
                runs = max(runs, int(m.group(1)))
            if not args.quiet and (args.verbose or not _PROGRESS.match(line)
                                   or " DONE " in line):
                sys.stderr.write(line)
    except KeyboardInterrupt:
        proc.terminate()
    rc = proc.wait()
    elapsed = time.monotonic() - started
    # libFuzzer's final statistics; a finding ends the run before them, and
    # then the last progress line is what is known
    runs = final if final is not None else runs
    findings = []
    for p in sorted(artifacts.iterdir() if artifacts.is_dir() else ()):
        if p.name in before or not p.name.startswith(KINDS):
            continue
        data = p.read_bytes()
        findings.append({"kind": p.name.split("-", 1)[0], "artifact": str(p),
                         "size": len(data), "hex": hexdump(data)})
    result = {"target": args.target, "runs": runs, "seconds": round(elapsed, 1),
              "returncode": rc, "findings": findings,
              "error": rc != 0 and not findings}
    if (findings or result["error"]) and args.quiet:
        sys.stderr.write("".join(tail))
    for f in findings:
        print(f"FINDING {args.target} {f['kind']}: {f['artifact']}\n"
              f"  input ({f['size']} bytes, hex): {f['hex']}")
    if result["error"]:
        print(f"run.py: the fuzzer exited with status {rc} and no finding (see its output)")
    print(f"{args.target}: {runs} inputs in {elapsed:.1f} s, {len(findings)} finding(s)")
    if args.artifacts or not findings:
        shutil.rmtree(workdir, ignore_errors=True)
    else:  # keep what was found (the report names it), drop the rest
        for child in workdir.iterdir():
            if child != artifacts:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    return result


def replay(args: argparse.Namespace) -> int:
    """Run saved inputs through the target in this process: tracebacks, no fuzzer."""
    mod = load_target(args.target)
    status = 0
    for name in args.replay:
        data = Path(name).read_bytes()
        start = time.monotonic()
        try:
            mod.TARGET(data)
        except Exception:
            status = EXIT_FINDING
            print(f"{name}: FINDING\n  input ({len(data)} bytes, hex): {hexdump(data)}")
            traceback.print_exc()
            continue
        print(f"{name}: ok ({time.monotonic() - start:.3f} s)")
    return status


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", help="what to fuzz (--list shows the targets)")
    ap.add_argument("--list", action="store_true", help="list the targets")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=int, help="run for this long")
    budget.add_argument("--runs", type=int, help="run this many inputs")
    ap.add_argument("--corpus", help="corpus directory to use and grow (default: a scratch one)")
    ap.add_argument("--artifacts", help="directory for the inputs of findings "
                                        "(default: a scratch one, kept when something is found)")
    ap.add_argument("--slow", type=float, default=1.0,
                    help="an input taking longer (twice) is a finding (default 1 s)")
    ap.add_argument("--hang", type=float, default=5.0,
                    help="an input still running after this long is a finding (default 5 s)")
    ap.add_argument("--seed", type=int, help="libFuzzer's random seed")
    ap.add_argument("--max-len", type=int, help="longest input (default: the target's MAX_LEN)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--no-dict", action="store_true", help="do not give libFuzzer the "
                                                           "target's dictionary")
    ap.add_argument("--json", help="write the result as JSON to this file")
    ap.add_argument("--quiet", action="store_true", help="print the fuzzer's output only "
                                                         "when something went wrong")
    ap.add_argument("--verbose", action="store_true", help="also libFuzzer's progress lines")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs, no fuzzer")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if not args.target:
        ap.error("a target is needed (--list shows them)")
    module_name(args.target)
    if args.replay:
        return replay(args)
    if args.worker:
        worker(args)
        return 0
    if args.seconds is None and args.runs is None:
        ap.error("give --seconds N or --runs N")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("run.py: atheris is not installed (pip install atheris)", file=sys.stderr)
        return EXIT_ERROR
    result = fuzz(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if result["findings"]:
        return EXIT_FINDING
    return EXIT_ERROR if result["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
