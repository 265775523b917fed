"""Fuzzing in CI: every target of tests/fuzz runs briefly under atheris, with no finding.

Each target runs ``PYHV_FUZZ_SECONDS`` (default 15) seconds in its own process
(libFuzzer's main never returns, so not inside pytest); all together take
about two and a half minutes.  ``pytest -m "not fuzz"`` leaves them out;
``bench/fuzz_long.py`` runs them for a million inputs each.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TESTS
from fuzz import TARGETS

RUN = TESTS / "fuzz" / "run.py"
SECONDS = int(os.environ.get("PYHV_FUZZ_SECONDS", "15"))
#: the fewest inputs a target must get through in its time: the slowest (the
#: kernel loader, a file and three loads per input) runs some 400 a second
#: instrumented on one core
MIN_RUNS = 20 * SECONDS


def _fuzz(target: str, tmp_path: Path, *extra: str, timeout: float) -> tuple[
        subprocess.CompletedProcess[str], dict]:
    result = tmp_path / "result.json"
    # a fixed seed by default: a run here and a run in CI explore the same inputs first,
    # so CI fails only on what a developer's run would have found too
    seed = os.environ.get("PYHV_FUZZ_SEED", "1")
    cmd = [sys.executable, str(RUN), target, "--quiet", "--json", str(result),
           "--artifacts", str(tmp_path / "artifacts"), *extra]
    if seed:
        cmd += ["--seed", seed]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print(p.stdout + p.stderr)
    return p, json.loads(result.read_text()) if result.exists() else {}


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds_pass(target: str) -> None:
    """The seed corpus itself runs clean and fast, without the fuzzer."""
    mod = importlib.import_module(f"fuzz.{TARGETS[target]}")
    seeds = mod.seeds()
    assert len(seeds) >= 5
    for seed in seeds:
        start = time.monotonic()
        mod.TARGET(seed)
        assert time.monotonic() - start < 0.5, seed[:100]


@pytest.mark.fuzz
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    p, result = _fuzz(target, tmp_path, "--seconds", str(SECONDS), timeout=SECONDS + 120)
    assert result, "run.py wrote no result"
    assert result["findings"] == [], f"{target}: finding (input in hex and traceback above)"
    assert p.returncode == 0 and not result["error"]
    assert result["runs"] >= MIN_RUNS, f"{target}: only {result['runs']} inputs in {SECONDS} s"


@pytest.mark.fuzz
@pytest.mark.parametrize(("target", "hex_input", "what"), [
    ("selftest-crash", b"FUZ!".hex(), "ValueError: planted bug"),
    ("selftest-hang", b"HANG".hex(), "still running after 1 s"),
])
def test_runner_reports_findings(target: str, hex_input: str, what: str,
                                 tmp_path: Path) -> None:
    """The runner catches a planted crash and hang: input in hex, traceback, status 1."""
    pytest.importorskip("atheris")
    p, result = _fuzz(target, tmp_path, "--runs", "1000", "--hang", "1", timeout=60)
    assert p.returncode == 1
    (finding,) = result["findings"]
    assert finding["hex"] == hex_input
    assert Path(finding["artifact"]).read_bytes() == bytes.fromhex(hex_input)
    assert hex_input in p.stdout and what in p.stderr
