#!/usr/bin/env python3
"""Long fuzzing run: every target of tests/fuzz under atheris, a million inputs each.

    .venv/bin/python bench/fuzz_long.py                    # 1,000,000 inputs per target
    .venv/bin/python bench/fuzz_long.py --seconds 600      # or a time budget per target
    .venv/bin/python bench/fuzz_long.py --targets qmp,elf --jobs 2 --corpus-dir /tmp/corpora

Each target runs in its own ``tests/fuzz/run.py`` process (``--jobs`` of them
at a time).  With ``--corpus-dir`` each target's corpus is kept in
``DIR/TARGET`` and grows from one run to the next.  At the end: per target the
inputs run, the time, inputs per second and the findings; then each finding
with its input in hex and where the input was saved (the traceback is in that
target's output above).

Exit status: 0 no finding, 1 a finding, 2 a target could not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "fuzz" / "run.py"
sys.path.insert(0, str(ROOT / "tests"))

from fuzz import TARGETS  # noqa: E402


def run_target(target: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result = workdir / f"{target}.json"
    cmd = [sys.executable, str(RUN), target, "--json", str(result),
           "--artifacts", str(Path(args.artifacts) / target)]
    cmd += ["--seconds", str(args.seconds)] if args.seconds else ["--runs", str(args.runs)]
    if args.corpus_dir:
        cmd += ["--corpus", str(Path(args.corpus_dir) / target)]
    if args.jobs > 1:
        cmd.append("--quiet")
    start = time.monotonic()
    p = subprocess.run(cmd, stdout=sys.stdout if args.jobs == 1 else subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if args.jobs > 1 and p.stdout:
        print(p.stdout, end="", flush=True)
    if result.exists():
        out: dict[str, Any] = json.loads(result.read_text())
    else:
        out = {"target": target, "runs": 0, "findings": [], "error": True,
               "returncode": p.returncode}
    out["seconds"] = round(time.monotonic() - start, 1)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'target':<10} {'inputs':>12} {'seconds':>9} {'inputs/s':>9} {'findings':>9}"]
    for r in results:
        rate = r["runs"] / r["seconds"] if r["seconds"] else 0
        status = str(len(r["findings"])) + (" (run failed)" if r.get("error") else "")
        lines.append(f"{r['target']:<10} {r['runs']:>12,} {r['seconds']:>9.1f} "
                     f"{rate:>9.0f} {status:>9}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    budget.add_argument("--seconds", type=int, help="time per target instead of --runs")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated (default: all: {','.join(TARGETS)})")
    ap.add_argument("--jobs", type=int, default=1, help="targets run at the same time")
    ap.add_argument("--corpus-dir", help="keep and reuse each target's corpus in DIR/TARGET")
    ap.add_argument("--artifacts", help="where findings' inputs go (default: a new temp dir)")
    ap.add_argument("--json", help="write all results as JSON to this file")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)} (known: {', '.join(TARGETS)})")
    scratch_artifacts = not args.artifacts
    args.artifacts = args.artifacts or tempfile.mkdtemp(prefix="pyhv-fuzz-long-")
    budget_text = f"{args.seconds} s" if args.seconds else f"{args.runs:,} inputs"
    print(f"fuzz_long: {len(targets)} target(s), {budget_text} each, {args.jobs} at a time; "
          f"findings go to {args.artifacts}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyhv-fuzz-long-") as tmp:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda t: run_target(t, args, Path(tmp)), targets))
    print("\n" + table(results))
    for r in results:
        for f in r["findings"]:
            print(f"\nFINDING {r['target']} {f['kind']}: {f['artifact']}\n"
                  f"  input ({f['size']} bytes, hex): {f['hex']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if any(r["findings"] for r in results):
        return 1
    if scratch_artifacts:
        shutil.rmtree(args.artifacts, ignore_errors=True)
    return 2 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
