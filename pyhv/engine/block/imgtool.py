"""``pyhv img info`` and ``pyhv img check``: what qemu-img prints, for the formats
pyhv reads.

Images are opened read-only with QEMU's locks (an image a running writer holds
is refused, as qemu-img refuses it).  ``info`` reads only headers (the backing
chain is opened with ``--backing-chain``); ``check`` is
:mod:`~pyhv.engine.block.qcow2_check`.  Exit status of ``check`` as
qemu-img's: 0 clean, 1 the check could not be done (the image does not open),
2 corruptions, 3 leaked clusters only, 63 a format without checks (raw).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional, TextIO

from pyhv.engine.block import BlockError
from pyhv.engine.block.qcow2 import (
    COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Qcow2Backend,
    probe_format,
)
from pyhv.engine.block.raw import RawBackend

EXIT_NOT_CHECKED = 1
EXIT_NO_CHECKS = 63


def size_to_str(n: int) -> str:
    """QEMU's size_to_str: three significant digits, binary units below 1000."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    if n <= 0:
        return "0 B"
    i = min(int(math.log2(n * 1024 / 1000)) // 10, len(units) - 1) if n >= 1000 else 0
    return f"{n / (1 << (10 * i)):0.3g} {units[i]}"


def _open(path: str, fmt: Optional[str], chain: bool) -> Any:
    fmt = fmt or probe_format(path)
    if fmt == "qcow2":
        return Qcow2Backend(path, readonly=True, open_backing=chain)
    if fmt == "raw":
        return RawBackend(path, readonly=True)
    raise BlockError(f"{path}: image format {fmt!r} is not supported (raw and qcow2 are)")


def _full_backing(img: Qcow2Backend) -> Optional[str]:
    name = img.header.backing_file
    if name is None or os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(img.path), name)


def image_info(img: Any) -> dict[str, Any]:
    """One image as ``qemu-img info --output json`` describes it."""
    try:
        actual: Optional[int] = os.stat(img.path).st_blocks * 512
    except OSError:
        actual = None
    out: dict[str, Any] = {"virtual-size": img.size, "filename": img.path}
    if isinstance(img, Qcow2Backend):
        h = img.header
        out["cluster-size"] = img.cluster_size
        out["format"] = "qcow2"
        if actual is not None:
            out["actual-size"] = actual
        data: dict[str, Any] = {"compat": "0.10" if h.version == 2 else "1.1",
                                "compression-type": "zlib"}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
        data["refcount-bits"] = img.refcount_bits
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible & INCOMPAT_CORRUPT)
            data["extended-l2"] = False
        out["format-specific"] = {"type": "qcow2", "data": data}
        if h.backing_file is not None:
            if h.backing_format:
                out["backing-filename-format"] = h.backing_format
            out["full-backing-filename"] = _full_backing(img)
            out["backing-filename"] = h.backing_file
        out["dirty-flag"] = bool(h.incompatible & INCOMPAT_DIRTY)
    else:
        out["format"] = "raw"
        if actual is not None:
            out["actual-size"] = actual
        out["dirty-flag"] = False
    return out


def _human(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} "
             f"({info['virtual-size']} bytes)"]
    if "actual-size" in info:
        lines.append(f"disk size: {size_to_str(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    spec = info.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for key, value in spec["data"].items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"    {key.replace('-', ' ')}: {text}")
    return "\n".join(lines) + "\n"


def info(path: str, fmt: Optional[str] = None, output: str = "human",
         backing_chain: bool = False, out: TextIO = sys.stdout) -> int:
    """``pyhv img info``; errors are :class:`BlockError` (one line)."""
    img = _open(path, fmt, backing_chain)
    try:
        infos = []
        cur: Any = img
        while cur is not None:
            infos.append(image_info(cur))
            cur = getattr(cur, "backing", None) if backing_chain else None
    finally:
        img.close()
    if output == "json":
        out.write(json.dumps(infos if backing_chain else infos[0], indent=4) + "\n")
    else:
        out.write("\n".join(_human(i) for i in infos))
    return 0


def check(path: str, fmt: Optional[str] = None, output: str = "human",
          out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``pyhv img check``: the report on ``out``, qemu-img's exit status."""
    from pyhv.engine.block import qcow2_check

    try:
        img = _open(path, fmt, chain=False)
    except BlockError as e:
        err.write(f"pyhv: {e}\n")
        return EXIT_NOT_CHECKED
    try:
        if not isinstance(img, Qcow2Backend):
            err.write(f"pyhv: {path}: this image format (raw) does not support checks\n")
            return EXIT_NO_CHECKS
        try:
            result = qcow2_check.check(img)
        except BlockError as e:
            err.write(f"pyhv: {e}\n")
            return EXIT_NOT_CHECKED
    finally:
        img.close()
    if output == "json":
        out.write(json.dumps(result.json(), indent=4) + "\n")
    else:
        for line in result.messages:
            err.write(line + "\n")
        out.write(result.human())
    return result.exit_status
