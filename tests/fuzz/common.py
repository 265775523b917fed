"""Helpers shared by the fuzz targets: input framing, oracles, seed and token harvesting."""

from __future__ import annotations

import ast
import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FUZZ = Path(__file__).resolve().parent
TESTS = FUZZ.parent
ROOT = TESTS.parent


class Finding(AssertionError):
    """An input made a parser do something other than succeed or fail with its typed error."""


# --------------------------------------------------------------------------- framing


def args_from_bytes(data: bytes) -> list[str]:
    """An argv (without argv[0]): the arguments are separated by NUL bytes.

    Bytes that are not UTF-8 become lone surrogates, as ``sys.argv`` has them.
    """
    if not data:
        return []
    return data.decode("utf-8", "surrogateescape").split("\0")


def bytes_from_args(args: Iterable[str]) -> bytes:
    return "\0".join(args).encode("utf-8", "surrogateescape")


def text_from_bytes(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def scratch_dir() -> str:
    """A directory for a target's scratch files: the runner's work directory, or a new one."""
    if not _SCRATCH:
        base = os.environ.get("PYHV_FUZZ_SCRATCH")
        if base:
            _SCRATCH.append(tempfile.mkdtemp(prefix="scratch-", dir=base))
        else:
            _SCRATCH.append(tempfile.mkdtemp(prefix="pyhv-fuzz-"))
            atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


_SCRATCH: list[str] = []


# --------------------------------------------------------------------------- oracles


def one_line(err: BaseException) -> None:
    """A typed error's message is one non-empty line (what the front ends print)."""
    text = str(err)
    if not text.strip() or "\n" in text or "\r" in text:
        raise Finding(f"{type(err).__name__} message is not one line: {text!r}")


# --------------------------------------------------------------------------- harvesting


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), str(path))


def test_files(pattern: str) -> list[Path]:
    return sorted(TESTS.glob(pattern))


def _const_str(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def string_lists(paths: Iterable[Path]) -> Iterator[list[str]]:
    """List literals of string constants that look like an argv (first item ``-opt``)."""
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.List) and node.elts:
                items = [_const_str(e) for e in node.elts]
                if all(s is not None for s in items) and str(items[0]).startswith("-"):
                    yield [str(s) for s in items]


def bytes_constants(paths: Iterable[Path]) -> Iterator[bytes]:
    """Every bytes literal (implicitly concatenated ones come as one)."""
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
                yield node.value


def calls(paths: Iterable[Path], methods: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``x.METHOD("name", key=constant, ...)`` calls: (name, keyword arguments)."""
    wanted = set(methods)
    for path in paths:
        for node in ast.walk(_tree(path)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in wanted and node.args):
                continue
            name = _const_str(node.args[0])
            if name is None:
                continue
            kwargs: dict[str, Any] = {}
            for kw in node.keywords:
                if kw.arg is None:
                    continue
                try:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    continue
            yield name, kwargs


def string_constants(paths: Iterable[Path], lo: int = 2, hi: int = 48) -> set[str]:
    """String literals of a module's source (dictionary tokens): no spaces, ``lo``..``hi`` long."""
    out = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            s = _const_str(node)
            if s is not None and lo <= len(s) <= hi and not any(c.isspace() for c in s):
                out.add(s)
    return out


def module_path(module: Any) -> Path:
    return Path(module.__file__)


def unique(items: Iterable[bytes]) -> list[bytes]:
    seen: dict[bytes, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
