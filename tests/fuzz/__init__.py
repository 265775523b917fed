"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser that reads outside input.

One module per target, each defining

* ``TARGET(data: bytes) -> None``: feeds ``data`` to the parser; returns for
  success and for the parser's own typed error, raises anything else (a
  finding);
* ``seeds() -> list[bytes]``: the seed corpus, built from what the unit tests
  feed the same parser;
* ``dictionary() -> list[bytes]``: tokens for libFuzzer's mutator (optional);
* ``MAX_LEN``: the longest input libFuzzer generates.

``python tests/fuzz/run.py TARGET --seconds N`` runs one target;
``tests/test_fuzz.py`` runs each briefly in CI; ``bench/fuzz_long.py`` runs
them all for a million inputs each.
"""

from __future__ import annotations

#: target name → module (in this package)
TARGETS: dict[str, str] = {
    "argv": "fuzz_argv",
    "mapping": "fuzz_mapping",
    "domxml": "fuzz_domxml",
    "qmp": "fuzz_qmp",
    "bzimage": "fuzz_bzimage",
    "elf": "fuzz_elf",
    "kernel": "fuzz_kernel",
    "size": "fuzz_size",
    "virtqueue": "fuzz_virtqueue",
}

#: targets that check the fuzzing machinery itself (a planted crash and hang)
SELFTESTS: dict[str, str] = {
    "selftest-crash": "fuzz_selftest_crash",
    "selftest-hang": "fuzz_selftest_hang",
}
