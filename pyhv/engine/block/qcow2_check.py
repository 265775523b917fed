"""Consistency check of a qcow2 image, reported as ``qemu-img check`` reports it.

Every host cluster's references are counted from the metadata (the header
cluster, the L1 table and the L2 tables and data clusters it reaches, the
refcount table and its blocks, the snapshot table and each snapshot's tables)
and compared with the refcount the image stores: a refcount lower than the
references is a corruption (``ERROR cluster N refcount=R reference=F``), a
higher one a leak (``Leaked cluster N refcount=R reference=F``).  Entries that
point outside the file or are misaligned, and COPIED flags that disagree with
the refcount, are corruptions too.  Nothing is written (no repair).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

from pyhv.engine.block import BlockError
from pyhv.engine.block.qcow2 import (
    COMPRESSED,
    L1_RESERVED,
    L2_RESERVED,
    NORMAL,
    OFFSET_MASK,
    OFLAG_COPIED,
    REFT_RESERVED,
    ZERO,
    Qcow2Backend,
    _be_array,
)

#: a snapshot table entry's fixed part: l1_table_offset, l1_size, id_str_size,
#: name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
#: pyhv's bounds on what a snapshot table may make it read
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024


@dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0

    @property
    def exit_status(self) -> int:
        """qemu-img check's: 0 clean, 2 corruptions, 3 leaks only."""
        return 2 if self.corruptions else 3 if self.leaks else 0

    def human(self) -> str:
        """The summary qemu-img check prints on stdout (the messages go to stderr)."""
        out = []
        if self.corruptions or self.leaks:
            out.append("")
        if self.corruptions:
            out += [f"{self.corruptions} errors were found on the image.",
                    "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            if self.corruptions:
                out.append("")
            out += [f"{self.leaks} leaked clusters were found on the image.",
                    "This means waste of disk space, but no harm to data."]
        if not self.corruptions and not self.leaks:
            out.append("No errors were found on the image.")
        if self.total_clusters and self.allocated_clusters:
            t = self.total_clusters
            out.append(f"{self.allocated_clusters}/{t} = "
                       f"{self.allocated_clusters * 100 / t:.2f}% allocated, "
                       f"{_pct(self.fragmented_clusters, self.allocated_clusters)} "
                       f"fragmented, {_pct(self.compressed_clusters, self.allocated_clusters)} "
                       f"compressed clusters")
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(out) + "\n"

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image-end-offset": self.image_end_offset,
                               "total-clusters": self.total_clusters, "check-errors": 0,
                               "filename": self.filename, "format": "qcow2"}
        for key, value in (("leaks", self.leaks), ("corruptions", self.corruptions),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        return out


def _pct(part: int, whole: int) -> str:
    return f"{part * 100 / whole:.2f}%" if whole else "0.00%"


class _Checker:
    def __init__(self, img: Qcow2Backend, result: CheckResult) -> None:
        self.img = img
        self.r = result
        self.cs = img.cluster_size
        self.file_size = img.file.size
        self.nb = -(-self.file_size // self.cs)
        self.refs = array("I", bytes(4 * self.nb))

    def error(self, message: str) -> None:
        self.r.messages.append(message)
        self.r.corruptions += 1

    def inc(self, offset: int, length: int, what: str) -> bool:
        """Count one reference to each cluster of ``[offset, offset + length)``."""
        if length <= 0:
            return True
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        if last >= self.nb:
            self.error(f"ERROR: {what} at {offset:#x} is past the end of the image file")
            return False
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True

    def read(self, offset: int, length: int) -> bytearray:
        return self.img._read_meta(offset, length)

    def walk_l1(self, l1: "array[int]", active: bool) -> None:
        img, cs = self.img, self.cs
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if e & L1_RESERVED or off % cs:
                self.error(f"ERROR l2_offset={off:x}: Table is not cluster aligned; L1 "
                           f"entry corrupted")
                continue
            if not self.inc(off, cs, "L2 table"):
                continue
            table = _be_array("Q", self.read(off, cs))
            last_host = -1  # fragmentation counts within a table, as qemu-img's
            for entry in table:
                kind = img._kind(entry)
                if kind == COMPRESSED:
                    try:
                        host, length = img._compressed_span(entry)
                    except BlockError:
                        self.error(f"ERROR compressed cluster entry {entry:#x} points "
                                   f"outside the image")
                        continue
                    self.inc(host, length, "compressed cluster")
                    if active:
                        self.r.allocated_clusters += 1
                        self.r.compressed_clusters += 1
                        self.r.fragmented_clusters += 1
                    continue
                host = entry & OFFSET_MASK
                if kind not in (NORMAL, ZERO) or not host:
                    continue
                if entry & L2_RESERVED:
                    self.error(f"ERROR offset={host:x}: Cluster is not properly aligned; "
                               f"L2 entry corrupted")
                    continue
                if not self.inc(host, cs, "data cluster"):
                    continue
                if active and kind == NORMAL:
                    self.r.allocated_clusters += 1
                    if last_host >= 0 and host != last_host + cs:
                        self.r.fragmented_clusters += 1
                    last_host = host
            if active:
                self.copied_l2.append((i, e, table))

    def snapshots(self) -> None:
        h, img = self.img.header, self.img
        if not h.nb_snapshots:
            return
        if h.nb_snapshots > MAX_SNAPSHOTS:
            self.error(f"ERROR snapshot table: {h.nb_snapshots} snapshots (more than "
                       f"{MAX_SNAPSHOTS})")
            return
        pos = h.snapshots_offset
        for n in range(h.nb_snapshots):
            try:
                fixed = self.read(pos, SNAPSHOT_ENTRY.size)
            except BlockError:
                self.error(f"ERROR snapshot table entry {n} is past the end of the file")
                return
            (l1_off, l1_size, id_len, name_len, *_rest, extra) = SNAPSHOT_ENTRY.unpack(fixed)
            if extra > MAX_SNAPSHOT_EXTRA or l1_size * 8 > 32 << 20 or l1_off % self.cs:
                self.error(f"ERROR snapshot {n}: malformed table entry")
                return
            entry_len = (SNAPSHOT_ENTRY.size + extra + id_len + name_len + 7) & ~7
            try:
                l1 = _be_array("Q", img._read_meta(l1_off, l1_size * 8))
            except BlockError:
                self.error(f"ERROR snapshot {n}: L1 table past the end of the file")
                l1 = array("Q")
            self.inc(l1_off, l1_size * 8, "snapshot L1 table")
            self.walk_l1(l1, active=False)
            pos += entry_len
        self.inc(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")

    def run(self) -> None:
        img, h, cs = self.img, self.img.header, self.cs
        self.copied_l2: list[tuple[int, int, "array[int]"]] = []
        self.r.total_clusters = -(-h.size // cs)
        self.inc(0, cs, "header")
        self.inc(h.l1_table_offset, h.l1_size * 8, "L1 table")
        self.walk_l1(img.l1, active=True)
        self.snapshots()
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
        for t, e in enumerate(img.reftable):
            off = e & ~REFT_RESERVED
            if not off:
                continue
            if off % cs:
                self.error(f"ERROR refcount block {t} is not cluster aligned; refcount "
                           f"table corrupted")
                continue
            self.inc(off, cs, "refcount block")
        # refcounts against references
        end = 0
        E = img.refblock_entries
        covered = len(img.reftable) * E
        for c in range(max(self.nb, 0)):
            stored = img.refcount(c) if c < covered else 0
            want = self.refs[c]
            if stored or want:
                end = c + 1
            if stored == want:
                continue
            if stored < want:
                self.error(f"ERROR cluster {c} refcount={stored} reference={want}")
            else:
                self.r.messages.append(f"Leaked cluster {c} refcount={stored} "
                                       f"reference={want}")
                self.r.leaks += 1
        self.r.image_end_offset = end * cs
        # COPIED flags of the active tables
        for i, e, table in self.copied_l2:
            off = e & OFFSET_MASK
            rc = img.refcount(off // cs)
            if (rc == 1) != bool(e & OFLAG_COPIED):
                self.error(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} "
                           f"refcount={rc}")
            for entry in table:
                kind = img._kind(entry)
                host = entry & OFFSET_MASK
                if kind not in (NORMAL, ZERO) or not host or entry & L2_RESERVED:
                    continue
                if host // cs >= self.nb:
                    continue
                rc = img.refcount(host // cs)
                if (rc == 1) != bool(entry & OFLAG_COPIED):
                    self.error(f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} "
                               f"refcount={rc}")


def check(img: Qcow2Backend) -> CheckResult:
    """Check ``img`` (open, read-only is enough)."""
    result = CheckResult(img.path)
    with img._lock:
        _Checker(img, result).run()
    return result
