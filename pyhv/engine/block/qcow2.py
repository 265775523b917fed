"""qcow2 images (QEMU's format, docs/interop/qcow2.txt), with backing chains.

The image file itself is opened as a :class:`~pyhv.engine.block.raw.RawBackend`
(cache modes, O_DIRECT and QEMU's image locking come from there); this module
maps guest offsets onto it.

Format
  Version 2 and 3 headers, the backing file format and feature name table
  extensions (other extensions are skipped; the bitmaps extension is made
  inconsistent by clearing its autoclear bit when the image is opened for
  writing, as the spec asks of a writer that does not maintain it), L1/L2
  tables, refcount tables and blocks of every width (read; written only for
  8 to 64-bit refcounts, 16 being what QEMU creates), cluster sizes 512 B to
  2 MiB, zero clusters (v3), compressed clusters (read: raw deflate).
  Refused with one line naming the file: encryption, external data files,
  extended L2 entries, non-zlib compression, unknown incompatible features,
  and for writing: internal snapshots, sub-byte refcounts, the corrupt bit and
  the dirty bit.  A dirty image (lazy refcounts, not closed cleanly) is
  refused read-write rather than rebuilt here: ``qemu-img check -r all``
  repairs it; read-only it opens, since reading does not use refcounts.
  pyhv itself never sets the dirty bit: it updates refcounts eagerly even when
  the lazy refcounts bit is set (the bit permits laziness, it does not ask for
  it).

Metadata and crash safety
  Metadata is ordered so that a crash at any point leaves at worst leaked
  clusters, never a cluster referenced before its refcount says so, nor a
  refcount dropped while a table on disk still references the cluster:

  * allocating: the data is written at once (with the copy-on-write head and
    tail of partial clusters); the refcounts of the new clusters, the new L2
    entries and the L1 entry of a new L2 table change in memory only, their
    blocks and tables marked dirty.  Dirty metadata is committed on
    ``flush()``, on ``close()``, before any freeing, and when more than a
    bounded number of tables are dirty or a dirty table would leave the cache:
    the dirty refcount blocks, a barrier (fdatasync: the data and refcounts
    the tables point at are stable), the dirty L2 tables, a barrier, then the
    dirty L1 entries.  A dirty refcount block leaving its cache is written
    (before any table that counts on it, since that waits for a barrier).  One commit covers every
    allocating write since the last, where writing through costs a barrier
    each.  QEMU's writeback caches order the same steps (its L2 cache depends
    on the refcount cache, which is flushed before an L2 table is written).
    Writes acknowledged since the last flush may be lost in a crash, as on
    any disk with a volatile cache; what a flush acknowledged is not;
  * freeing (discard, write-zeroes with unmap, overwriting a compressed or
    preallocated-zero cluster): the L2 entries first, a barrier, then the
    refcounts are decremented;
  * a new refcount block is written and made stable before the refcount table
    entry that points at it; a grown refcount table or L1 table is written and
    made stable before the header points at it, and the old one is freed after.

  The barrier is the image's flush, so ``cache='unsafe'`` skips it as QEMU's
  ``cache.no-flush`` does.  ``flush()`` is fdatasync of the image: everything
  acknowledged before it (data and metadata) is then stable.

Backing chains
  The chain comes from the configuration (``backing``: a sequence of records
  with ``path`` and ``format``, the top image's backing file first) or, when
  None, from each image's header (the name is relative to the image's
  directory; a missing format extension means the format is probed).  Backing
  files are opened read-only with shared locks; loops, device nodes and chains
  deeper than :data:`MAX_CHAIN` are refused.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union

from pyhv.engine.block import BlockError, CheckedBackend, UnsupportedFormatError
from pyhv.engine.block.raw import RawBackend, _bytes_views, _slice

MAGIC = b"QFI\xfb"
#: version 2 header (72 bytes): magic, version, backing_file_offset,
#: backing_file_size, cluster_bits, size, crypt_method, l1_size, l1_table_offset,
#: refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: version 3 additions (to 104 bytes): incompatible, compatible and autoclear
#: features, refcount_order, header_length
HEADER_V3 = struct.Struct(">QQQII")
EXT_HEADER = struct.Struct(">II")
_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE |
                  INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: L1 and L2 entries
OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
REFT_RESERVED = 0x1FF

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU's implementation limits, also pyhv's bounds on what it reads
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_CHAIN = 64
#: L2 cache: QEMU's default covers 8 GiB of guest data, at least 1 MiB
DEFAULT_L2_COVERAGE = 8 << 30
MIN_L2_CACHE = 1 << 20
REFCOUNT_CACHE_BYTES = 256 << 10
#: dirty L2 tables held before a commit (and at most half the L2 cache)
DIRTY_L2_MAX = 32

_LITTLE = sys.byteorder == "little"
#: array typecode of each writable refcount order (8, 16, 32, 64-bit)
_REFCOUNT_TYPES = {3: "B", 4: "H", 5: next(t for t in "IL" if array(t).itemsize == 4), 6: "Q"}


class BackingRecord(Protocol):
    """One image of an explicit backing chain (``pyhv.config.BackingFile``)."""

    @property
    def path(self) -> str: ...

    @property
    def format(self) -> str: ...


def _be_array(typecode: str, data: Union[bytes, bytearray, memoryview]) -> "array[int]":
    a = array(typecode)
    a.frombytes(data)
    if _LITTLE and a.itemsize > 1:
        a.byteswap()
    return a


def _be_bytes(a: "array[int]") -> bytes:
    if _LITTLE and a.itemsize > 1:
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


@dataclass
class Qcow2Header:
    """The fields of a qcow2 header and its extensions, as read and checked."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    #: (feature type, bit) → name, from the feature name table
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    has_bitmaps: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_header(path: str, first: bytes, file_size: int) -> Qcow2Header:
    """Parse and check the header in ``first`` (the start of the file, up to one
    cluster); every problem is a :class:`BlockError` naming ``path``."""

    def bad(what: str) -> BlockError:
        return BlockError(f"{path}: not a valid qcow2 image: {what}")

    if len(first) < HEADER_V2.size:
        raise bad(f"the file has {file_size} bytes, less than a header")
    f = HEADER_V2.unpack_from(first)
    if f[0] != MAGIC:
        raise bad("no qcow2 magic")
    h = Qcow2Header(*f[1:])
    if h.version not in (2, 3):
        raise BlockError(f"{path}: qcow2 version {h.version} is not supported (2 and 3 are)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"cluster_bits {h.cluster_bits} is out of range (9 to 21: 512 B to 2 MiB)")
    cs = h.cluster_size
    if h.version == 3:
        if len(first) < HEADER_V2.size + HEADER_V3.size:
            raise bad(f"the file has {file_size} bytes, less than a version 3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = HEADER_V3.unpack_from(first, HEADER_V2.size)
        if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
            raise bad(f"header_length {h.header_length} (a multiple of 8, 104 up to the "
                      f"cluster size)")
        if h.header_length > len(first):
            raise bad(f"header_length {h.header_length} is past the end of the file")
        if h.header_length > 104:
            h.compression_type = first[104]
    if h.refcount_order > 6:
        raise bad(f"refcount_order {h.refcount_order} is more than 6")
    _parse_extensions(path, h, first, bad)
    if h.incompatible & ~INCOMPAT_KNOWN:
        unknown = [h.feature_names.get((0, b), f"bit {b}") for b in range(64)
                   if h.incompatible & ~INCOMPAT_KNOWN & (1 << b)]
        raise UnsupportedFormatError(f"{path}: unsupported qcow2 feature(s): "
                                     f"{', '.join(unknown)}")
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise UnsupportedFormatError(f"{path}: qcow2 images with an external data file are "
                                     f"not supported")
    if h.incompatible & INCOMPAT_EXTL2:
        raise UnsupportedFormatError(f"{path}: qcow2 extended L2 entries (subclusters) are "
                                     f"not supported")
    if h.incompatible & INCOMPAT_COMPRESSION and h.compression_type != 0:
        raise UnsupportedFormatError(f"{path}: qcow2 compression type {h.compression_type} "
                                     f"(zstd) is not supported (zlib is)")
    if h.crypt_method:
        raise UnsupportedFormatError(f"{path}: encrypted qcow2 images are not supported")
    if h.size % 512:
        raise bad(f"virtual size {h.size} is not a multiple of 512")
    # the L1 table must map the whole virtual disk, and lie inside the file
    l2_entries = cs // 8
    needed = -(-h.size // (cs * l2_entries))
    if h.l1_size < needed:
        raise bad(f"l1_size {h.l1_size} is too small for a {h.size}-byte disk")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise bad(f"l1_size {h.l1_size} is more than {MAX_L1_BYTES // 8} entries")
    if h.l1_size:
        if h.l1_table_offset % cs or h.l1_table_offset == 0:
            raise bad(f"l1_table_offset {h.l1_table_offset:#x} is not a cluster past the "
                      f"header")
        if h.l1_table_offset + h.l1_size * 8 > file_size:
            raise bad(f"the L1 table ({h.l1_size} entries at {h.l1_table_offset:#x}) is "
                      f"past the end of the file ({file_size} bytes)")
    if h.refcount_table_offset % cs:
        raise bad(f"refcount_table_offset {h.refcount_table_offset:#x} is not "
                  f"cluster-aligned")
    if h.refcount_table_offset == 0:
        raise bad("the refcount table overlaps the header")
    if not 1 <= h.refcount_table_clusters <= MAX_REFTABLE_BYTES // cs:
        raise bad(f"refcount_table_clusters {h.refcount_table_clusters} is out of range "
                  f"(1 to {MAX_REFTABLE_BYTES // cs})")
    rt_end = h.refcount_table_offset + h.refcount_table_clusters * cs
    if h.refcount_table_offset >= file_size or rt_end > _round_up(file_size, cs):
        raise bad(f"the refcount table at {h.refcount_table_offset:#x} is past the end of "
                  f"the file ({file_size} bytes)")
    l1_end = h.l1_table_offset + h.l1_size * 8
    if h.l1_size and h.l1_table_offset < rt_end and h.refcount_table_offset < l1_end:
        raise bad("the L1 table overlaps the refcount table")
    if h.nb_snapshots and h.snapshots_offset % cs:
        raise bad(f"snapshots_offset {h.snapshots_offset:#x} is not cluster-aligned")
    return h


def _parse_extensions(path: str, h: Qcow2Header, first: bytes, bad: Any) -> None:
    cs = h.cluster_size
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME:
            raise bad(f"the backing file name is {h.backing_file_size} bytes long (at most "
                      f"{MAX_BACKING_NAME})")
        end = h.backing_file_offset + h.backing_file_size
        if end > cs or end > len(first) or h.backing_file_offset < h.header_length:
            raise bad("the backing file name is outside the header cluster")
        name = bytes(first[h.backing_file_offset:end])
        if not name or b"\0" in name:
            raise bad("the backing file name is empty or holds a NUL byte")
        h.backing_file = name.decode("utf-8", "surrogateescape")
    limit = min(len(first), h.backing_file_offset or cs)
    pos = h.header_length
    seen: set[int] = set()
    while pos + EXT_HEADER.size <= limit:
        kind, length = EXT_HEADER.unpack_from(first, pos)
        pos += EXT_HEADER.size
        if kind == EXT_END:
            return
        if length > limit - pos:
            raise bad(f"header extension {kind:#x} of {length} bytes runs past the header "
                      f"area")
        if kind in seen and kind in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_CRYPTO,
                                     EXT_DATA_FILE, EXT_BITMAPS):
            raise bad(f"header extension {kind:#x} appears twice")
        seen.add(kind)
        data = bytes(first[pos:pos + length])
        if kind == EXT_BACKING_FORMAT:
            if length > 16:
                raise bad(f"the backing format name is {length} bytes long")
            h.backing_format = data.decode("ascii", "replace")
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, length - length % 48, 48):
                fname = data[i + 2:i + 48].split(b"\0", 1)[0]
                h.feature_names[(data[i], data[i + 1])] = fname.decode("ascii", "replace")
        elif kind == EXT_BITMAPS:
            h.has_bitmaps = True
        elif kind == EXT_CRYPTO:
            raise UnsupportedFormatError(f"{path}: encrypted qcow2 images are not supported")
        elif kind == EXT_DATA_FILE:
            raise UnsupportedFormatError(f"{path}: qcow2 images with an external data file "
                                         f"are not supported")
        pos += (length + 7) & ~7
    if pos != limit and h.version == 3:
        raise bad("the header extensions have no end marker")


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def probe_format(path: str) -> str:
    """``qcow2`` when ``path`` starts with the qcow2 magic, else ``raw``."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError as e:
        raise BlockError(f"{path}: cannot open the image: {e.strerror}") from e


# ---- L2 entry kinds -----------------------------------------------------------------------
UNALLOCATED, NORMAL, ZERO, COMPRESSED = 0, 1, 2, 3


class Qcow2Backend(CheckedBackend):
    """A qcow2 image open for a disk (see the module's description)."""

    format = "qcow2"

    def __init__(self, path: str, readonly: bool = False, cache: str = "writeback",
                 kind: Optional[str] = None, shared: bool = False, unmap: bool = False,
                 backing: Optional[Sequence[BackingRecord]] = None,
                 l2_cache_size: Optional[int] = None, locking: bool = True,
                 open_backing: bool = True, _seen: frozenset[tuple[int, int]] = frozenset(),
                 _depth: int = 0) -> None:
        self.path = path
        self.readonly = readonly
        self.can_unmap = unmap and not readonly
        self.cache = cache
        self.backing: Optional[Any] = None
        self._lock = threading.RLock()
        self.file = RawBackend(path, readonly=readonly, cache=cache, kind=kind,
                               shared=shared, locking=locking)
        try:
            self._open(backing, l2_cache_size, open_backing, _seen, _depth)
        except BaseException:
            self.close()
            raise

    # ---- opening -----------------------------------------------------------------------
    def _open(self, backing: Optional[Sequence[BackingRecord]], l2_cache_size: Optional[int],
              open_backing: bool, seen: frozenset[tuple[int, int]], depth: int) -> None:
        path, fsize = self.path, self.file.size
        probe = self._read_meta(0, min(fsize, HEADER_V2.size + HEADER_V3.size))
        if len(probe) >= 24 and probe[:4] == MAGIC:
            bits = _BE32.unpack_from(probe, 20)[0]
            first_len = min(fsize, 1 << bits) if MIN_CLUSTER_BITS <= bits <= \
                MAX_CLUSTER_BITS else len(probe)
        else:
            first_len = len(probe)
        first = self._read_meta(0, first_len) if first_len > len(probe) else probe
        h = self.header = parse_header(path, bytes(first), fsize)
        self.cluster_bits = h.cluster_bits
        self.cluster_size = cs = h.cluster_size
        self.size = h.size
        self.l2_bits = h.cluster_bits - 3
        self.l2_entries = cs // 8
        self.request_alignment = self.file.request_alignment
        self.incompatible = h.incompatible
        if not self.readonly:
            self._check_writable_image()
        # the L1 table: every entry aligned, inside the file
        self.l1 = _be_array("Q", self._read_meta(h.l1_table_offset, h.l1_size * 8)) \
            if h.l1_size else array("Q")
        for i, e in enumerate(self.l1):
            if e & L1_RESERVED or (e & OFFSET_MASK) + cs > _round_up(fsize, cs):
                raise BlockError(f"{path}: not a valid qcow2 image: L1 entry {i} "
                                 f"({e:#x}) points past the end of the file or is "
                                 f"malformed")
        # the refcount table
        self.refcount_order = h.refcount_order
        self.refcount_bits = 1 << h.refcount_order
        self.refblock_entries = cs * 8 // self.refcount_bits
        rt_bytes = h.refcount_table_clusters * cs
        self.reftable = _be_array("Q", self._read_meta(
            h.refcount_table_offset, min(rt_bytes, fsize - h.refcount_table_offset) // 8 * 8))
        self.reftable.extend([0] * (rt_bytes // 8 - len(self.reftable)))
        for i, e in enumerate(self.reftable):
            if e & REFT_RESERVED or (e and e + cs > _round_up(fsize, cs)):
                raise BlockError(f"{path}: not a valid qcow2 image: refcount table entry "
                                 f"{i} ({e:#x}) points past the end of the file or is "
                                 f"malformed")
            if e == 0 and i == 0:
                raise BlockError(f"{path}: not a valid qcow2 image: the header's cluster "
                                 f"has no refcount block")
        # caches
        if l2_cache_size is None:
            l2_cache_size = min(max(MIN_L2_CACHE, DEFAULT_L2_COVERAGE // cs * 8),
                                max(h.l1_size, 1) * cs)
        self.l2_cache_max = max(2, l2_cache_size // cs)
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._rb_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._rb_cache_max = max(4, REFCOUNT_CACHE_BYTES // cs)
        #: dirty L2 tables: host offset -> (table, first and last+1 dirty entry)
        self._dirty_l2: dict[int, tuple[array[int], int, int]] = {}
        #: L1 entries changed in memory only (new L2 tables)
        self._dirty_l1: set[int] = set()
        #: dirty refcount blocks: host offset -> (block, first and last+1 dirty entry)
        self._dirty_rb: dict[int, tuple[array[int], int, int]] = {}
        self._dirty_max = max(1, min(DIRTY_L2_MAX, self.l2_cache_max // 2))
        self._compressed: tuple[int, bytes] = (-1, b"")
        self._zero = memoryview(bytes(cs))
        self._free_hint = 0
        # metadata placed where an allocation must never go
        self._fixed = [(0, cs), (h.refcount_table_offset, rt_bytes)]
        if h.l1_size:
            self._fixed.append((h.l1_table_offset, _round_up(h.l1_size * 8, cs)))
        # the backing chain
        st = os.fstat(self.file.fd)
        seen = seen | {(st.st_dev, st.st_ino)}
        if backing is not None:
            if backing:
                self.backing = _open_backing(self, backing[0].path, backing[0].format,
                                             tuple(backing[1:]), seen, depth)
        elif h.backing_file is not None and open_backing:
            name = h.backing_file
            if not os.path.isabs(name):
                name = os.path.join(os.path.dirname(os.path.abspath(path)), name)
            self.backing = _open_backing(self, name, h.backing_format, None, seen, depth)
        if not self.readonly and h.version == 3 and h.autoclear:
            # bitmaps pyhv does not update become inconsistent: clear the bits first
            self._write_meta(88, _BE64.pack(0))
            self._barrier()
            h.autoclear = 0

    def _check_writable_image(self) -> None:
        h, path = self.header, self.path
        if h.incompatible & INCOMPAT_CORRUPT:
            raise BlockError(f"{path}: the qcow2 image is marked corrupt; open it read-only "
                             f"or repair it with qemu-img check -r all")
        if h.incompatible & INCOMPAT_DIRTY:
            raise BlockError(f"{path}: the qcow2 image was not closed cleanly (dirty bit, "
                             f"lazy refcounts); repair it with qemu-img check -r all or "
                             f"open it read-only")
        if h.nb_snapshots:
            raise BlockError(f"{path}: qcow2 images with internal snapshots are opened "
                             f"read-only by pyhv ({h.nb_snapshots} snapshots)")
        if h.refcount_order not in _REFCOUNT_TYPES:
            raise BlockError(f"{path}: {1 << h.refcount_order}-bit refcounts are read-only "
                             f"in pyhv (qemu-img amend -o refcount_bits=16 converts them)")

    # ---- raw metadata I/O ----------------------------------------------------------------
    def _read_meta(self, offset: int, length: int) -> bytearray:
        if offset + length > self.file.size:
            raise BlockError(f"{self.path}: corrupt qcow2 image: metadata at {offset:#x} "
                             f"({length} bytes) is past the end of the file")
        buf = bytearray(length)
        if length:
            self.file.read_into(offset, [memoryview(buf)])
        return buf

    def _ensure_file(self, end: int) -> None:
        if end > self.file.size:
            self.file.resize(end)

    def _write_meta(self, offset: int, data: Union[bytes, bytearray, memoryview]) -> None:
        self._ensure_file(offset + len(data))
        self.file.write_from(offset, [memoryview(data)])

    def _barrier(self) -> None:
        self.file.flush()

    def _corrupt(self, what: str) -> BlockError:
        return BlockError(f"{self.path}: corrupt qcow2 image: {what}")

    # ---- L2 tables ------------------------------------------------------------------------
    def _table(self, l1i: int) -> "Optional[array[int]]":
        """The L2 table of L1 entry ``l1i`` (cached), None when unallocated."""
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return None
        cache = self._l2_cache
        t = cache.get(off)
        if t is not None:
            cache.move_to_end(off)
            return t
        if off + self.cluster_size > self.file.size:
            raise self._corrupt(f"L2 table at {off:#x} is past the end of the file")
        t = _be_array("Q", self._read_meta(off, self.cluster_size))
        cache[off] = t
        self._trim_l2_cache()
        return t

    def _trim_l2_cache(self) -> None:
        """Evict the least recently used tables; a dirty one is committed first (the
        metadata in memory is consistent wherever this is called)."""
        cache = self._l2_cache
        while len(cache) > self.l2_cache_max:
            off = next(iter(cache))
            if off in self._dirty_l2:
                self._commit_meta()
            cache.popitem(last=False)

    def _mark_dirty(self, l2_off: int, table: "array[int]", i: int, j: int) -> None:
        old = self._dirty_l2.get(l2_off)
        if old is not None:
            i, j = min(i, old[1]), max(j, old[2])
        self._dirty_l2[l2_off] = (table, i, j)
        if len(self._dirty_l2) > self._dirty_max:
            self._commit_meta()

    def _commit_meta(self) -> None:
        """Write the dirty metadata in the order the module's description gives:
        refcount blocks, barrier, L2 tables, barrier, L1 entries."""
        if not self._dirty_l2 and not self._dirty_l1 and not self._dirty_rb:
            return
        for off in sorted(self._dirty_rb):
            self._write_refblock(off)
        if not self._dirty_l2 and not self._dirty_l1:
            return
        self._barrier()
        for off in sorted(self._dirty_l2):
            t, i, j = self._dirty_l2[off]
            self._write_meta(off + i * 8, _be_bytes(t[i:j]))
            del self._dirty_l2[off]
        if self._dirty_l1:
            self._barrier()
            l1_off = self.header.l1_table_offset
            for l1i in sorted(self._dirty_l1):
                self._write_meta(l1_off + l1i * 8, _BE64.pack(self.l1[l1i]))
            self._dirty_l1.clear()

    def _kind(self, entry: int) -> int:
        if entry & OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & OFLAG_ZERO and self.header.version >= 3:
            return ZERO
        if entry & OFFSET_MASK:
            return NORMAL
        return UNALLOCATED

    def _host(self, entry: int) -> int:
        if entry & L2_RESERVED:
            raise self._corrupt(f"L2 entry {entry:#x} has reserved bits set")
        host = entry & OFFSET_MASK
        if host + self.cluster_size > _round_up(self.file.size, self.cluster_size):
            raise self._corrupt(f"data cluster at {host:#x} is past the end of the file")
        return host

    # ---- reading ----------------------------------------------------------------------
    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _bytes_views(buffers)
        total = sum(len(v) for v in views)
        with self._lock:
            self._check_range(offset, total, "read")
            self._read(offset, views, total)

    def _read(self, offset: int, views: list[memoryview], total: int) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        mask = self.l2_entries - 1
        within = offset & (cs - 1)
        if within + total <= cs:
            # the common request: inside one allocated cluster, read in one go
            vc = offset >> cb
            table = self._table(vc >> self.l2_bits)
            entry = table[vc & mask] if table is not None else 0
            if entry & OFFSET_MASK and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO):
                self.file.read_views(self._host(entry) + within, views, total)
                return
        pos = 0
        while pos < total:
            off = offset + pos
            vc = off >> cb
            within = off & (cs - 1)
            table = self._table(vc >> self.l2_bits)
            i = vc & mask
            entry = table[i] if table is not None else 0
            kind = self._kind(entry)
            n = cs - within
            # extend over following clusters of the same kind (and contiguous host data)
            if table is not None:
                host = entry & OFFSET_MASK
                j = i + 1
                while pos + n < total and j <= mask and kind != COMPRESSED:
                    e = table[j]
                    if self._kind(e) != kind or (kind == NORMAL and
                                                 e & OFFSET_MASK != host + (j - i) * cs):
                        break
                    n += cs
                    j += 1
            else:
                n += (mask - i) * cs
            n = min(n, total - pos)
            part = views if n == total else _slice(views, pos, n)
            if kind == NORMAL:
                self._host(entry)
                if within + n > cs:  # the run's last cluster is checked too
                    self._host(table[i + (within + n - 1) // cs])  # type: ignore[index]
                self.file.read_into((entry & OFFSET_MASK) + within, part)
            elif kind == UNALLOCATED and self.backing is not None:
                self._read_backing(off, part, n)
            elif kind == COMPRESSED:
                data = self._inflate(entry)
                _fill(part, memoryview(data)[within:within + n])
            else:
                self._fill_zero(part)
            pos += n

    def _read_backing(self, off: int, part: list[memoryview], n: int) -> None:
        backing = self.backing
        assert backing is not None
        have = max(0, min(n, backing.size - off))
        if have:
            backing.read_into(off, _slice(part, 0, have))
        if have < n:
            self._fill_zero(_slice(part, have, n - have))

    def _fill_zero(self, views: list[memoryview]) -> None:
        z = self._zero
        for v in views:
            for s in range(0, len(v), len(z)):
                piece = v[s:s + len(z)]
                piece[:] = z[:len(piece)]

    def _compressed_span(self, entry: int) -> tuple[int, int]:
        """(host offset, length) of a compressed cluster's deflate stream."""
        x = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        length = sectors * 512 - (host & 511)
        if host >= self.file.size or host < self.cluster_size:
            raise self._corrupt(f"compressed cluster at {host:#x} is outside the file")
        return host, min(length, self.file.size - host)

    def _inflate(self, entry: int) -> bytes:
        cached_entry, data = self._compressed
        if cached_entry == entry:
            return data
        host, length = self._compressed_span(entry)
        raw = self._read_meta(host, length)
        try:
            # QEMU writes raw deflate with a 4 KiB window (wbits -12); -15 reads any
            out = zlib.decompressobj(-15).decompress(bytes(raw), self.cluster_size)
        except zlib.error as e:
            raise self._corrupt(f"compressed cluster at {host:#x}: {e}") from e
        if len(out) != self.cluster_size:
            raise self._corrupt(f"compressed cluster at {host:#x} inflates to {len(out)} "
                                f"bytes, not a cluster")
        self._compressed = (entry, out)
        return out

    # ---- refcounts ----------------------------------------------------------------------
    def _refblock(self, t: int) -> "Optional[array[int]]":
        if t >= len(self.reftable):
            return None
        off = self.reftable[t] & ~REFT_RESERVED
        if not off:
            return None
        cache = self._rb_cache
        b = cache.get(off)
        if b is not None:
            cache.move_to_end(off)
            return b
        raw = self._read_meta(off, self.cluster_size)
        if self.refcount_order in _REFCOUNT_TYPES:
            b = _be_array(_REFCOUNT_TYPES[self.refcount_order], raw)
        else:  # sub-byte refcounts, read-only: unpacked once
            bits = self.refcount_bits
            m = (1 << bits) - 1
            b = array("B", ((raw[k * bits // 8] >> (k * bits % 8)) & m
                            for k in range(self.refblock_entries)))
        cache[off] = b
        while len(cache) > self._rb_cache_max:
            old = next(iter(cache))
            if old in self._dirty_rb:
                self._write_refblock(old)
            cache.popitem(last=False)
        return b

    def _write_refblock(self, off: int) -> None:
        """Write a dirty refcount block's changed range (no barrier: the commit's
        first barrier orders refcounts before the tables that count on them)."""
        b, i, j = self._dirty_rb.pop(off)
        self._write_meta(off + i * b.itemsize, _be_bytes(b[i:j]))

    def refcount(self, cluster: int) -> int:
        """The refcount of host cluster ``cluster`` (0 where no block covers it)."""
        t, i = divmod(cluster, self.refblock_entries)
        b = self._refblock(t)
        return b[i] if b is not None else 0

    def _next_free(self, c: int) -> int:
        E = self.refblock_entries
        while True:
            t, i = divmod(c, E)
            b = self._refblock(t)
            if b is None:
                return c
            try:
                return t * E + b.index(0, i)
            except ValueError:
                c = (t + 1) * E

    def _find_free(self, n: int) -> int:
        c = self._free_hint
        while True:
            c = self._next_free(c)
            run = 1
            while run < n and self.refcount(c + run) == 0:
                run += 1
            if run == n:
                return c
            c += run + 1

    def _alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters, their refcounts written (not yet made
        stable: the caller's barrier does that before anything references them);
        returns the host offset."""
        cs, E = self.cluster_size, self.refblock_entries
        while True:
            c = self._find_free(n)
            for t in range(c // E, (c + n - 1) // E + 1):
                if t >= len(self.reftable):
                    self._grow_reftable(t)
                    break
                if not self.reftable[t]:
                    self._new_refblock(t)
                    break
            else:
                break
        start, end = c * cs, (c + n) * cs
        for fs, fl in self._fixed:
            if start < fs + fl and fs < end:
                raise self._corrupt(f"free clusters at {start:#x} overlap metadata at "
                                    f"{fs:#x} (refcounts are wrong)")
        self._add_refcounts(c, n, 1)
        self._free_hint = c + n
        return start

    def _add_refcounts(self, c: int, n: int, delta: int) -> None:
        E = self.refblock_entries
        limit = (1 << self.refcount_bits) - 1
        end = c + n
        while c < end:
            t, i = divmod(c, E)
            b = self._refblock(t)
            if b is None:
                raise self._corrupt(f"cluster {c} has no refcount block")
            j = min(E, i + end - c)
            for k in range(i, j):
                v = b[k] + delta
                if v < 0 or v > limit:
                    raise self._corrupt(f"refcount of cluster {t * E + k} would become {v}")
                b[k] = v
            off = self.reftable[t] & ~REFT_RESERVED
            old = self._dirty_rb.get(off)
            self._dirty_rb[off] = (b, min(i, old[1]), max(j, old[2])) if old else (b, i, j)
            c = t * E + j

    def _new_refblock(self, t: int) -> None:
        """A refcount block for range ``t``, placed in its own first cluster (free:
        no block counted anything there), made stable, then linked."""
        cs, E = self.cluster_size, self.refblock_entries
        off = t * E * cs
        b = array(_REFCOUNT_TYPES[self.refcount_order], bytes(cs))
        b[0] = 1
        self._write_meta(off, _be_bytes(b))
        self._barrier()
        self._write_meta(self.header.refcount_table_offset + t * 8, _BE64.pack(off))
        self.reftable[t] = off
        self._rb_cache[off] = b

    def _grow_reftable(self, t: int) -> None:
        """A larger refcount table, placed with a new refcount block for range ``t``
        (the first range it does not cover): block, table, barrier, header, barrier,
        then the old table is freed."""
        h, cs, E = self.header, self.cluster_size, self.refblock_entries
        old_clusters = h.refcount_table_clusters
        k = max(2 * old_clusters, -(-(t + 1) * 8 // cs))
        if k + 1 > E or k * cs > MAX_REFTABLE_BYTES:
            raise BlockError(f"{self.path}: the qcow2 refcount table cannot grow further")
        base = t * E
        block_off = base * cs
        table_off = block_off + cs
        b = array(_REFCOUNT_TYPES[self.refcount_order], bytes(cs))
        for i in range(k + 1):
            b[i] = 1
        table = array("Q", self.reftable)
        table.extend([0] * (k * cs // 8 - len(table)))
        table[t] = block_off
        self._write_meta(block_off, _be_bytes(b))
        self._write_meta(table_off, _be_bytes(table))
        self._barrier()
        self._write_meta(48, struct.pack(">QI", table_off, k))
        self._barrier()
        old_off = h.refcount_table_offset
        h.refcount_table_offset, h.refcount_table_clusters = table_off, k
        self.reftable = table
        self._rb_cache[block_off] = b
        self._fixed[1] = (table_off, k * cs)
        self._add_refcounts(old_off // cs, old_clusters, -1)
        self._free_hint = min(self._free_hint, old_off // cs)

    def _free_entry(self, entry: int) -> None:
        """Drop the references an L2 entry held (after the entry is gone on disk)."""
        cs = self.cluster_size
        kind = self._kind(entry)
        if kind == COMPRESSED:
            host, length = self._compressed_span(entry)
            first, last = host // cs, (host + length - 1) // cs
        elif entry & OFFSET_MASK:
            first = last = (entry & OFFSET_MASK) // cs
        else:
            return
        self._add_refcounts(first, last - first + 1, -1)
        self._free_hint = min(self._free_hint, first)

    # ---- writing ------------------------------------------------------------------------
    def write_from(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = _bytes_views(buffers)
        total = sum(len(v) for v in views)
        with self._lock:
            self._check_writable()
            self._check_range(offset, total, "write")
            self._write(offset, views, total)

    def _write(self, offset: int, views: list[memoryview], total: int) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        mask = self.l2_entries - 1
        pos = 0
        while pos < total:
            off = offset + pos
            vc = off >> cb
            within = off & (cs - 1)
            l1i, i = vc >> self.l2_bits, vc & mask
            table = self._table(l1i)
            if table is not None and self._in_place(l1i, table[i]):
                host = table[i] & OFFSET_MASK
                n = cs - within
                j = i + 1
                while pos + n < total and j <= mask and table[j] & OFFSET_MASK == \
                        host + (j - i) * cs and self._in_place(l1i, table[j]):
                    n += cs
                    j += 1
                n = min(n, total - pos)
                self.file.write_from(host + within, _slice(views, pos, n))
                pos += n
                continue
            # clusters i..j-1 of this table get new host clusters
            n = cs - within
            j = i + 1
            while pos + n < total and j <= mask and (
                    table is None or not self._in_place(l1i, table[j])):
                n += cs
                j += 1
            n = min(n, total - pos)
            self._allocating_write(l1i, table, i, j, off, _slice(views, pos, n), n)
            pos += n

    def _in_place(self, l1i: int, entry: int) -> bool:
        """Whether a guest cluster is written where it is (a normal cluster only this
        image's active table references)."""
        if self._kind(entry) != NORMAL:
            return False
        if not self.l1[l1i] & OFLAG_COPIED and self.refcount(
                (self.l1[l1i] & OFFSET_MASK) // self.cluster_size) != 1:
            raise self._corrupt(f"L2 table at {self.l1[l1i] & OFFSET_MASK:#x} is shared")
        host = self._host(entry)
        if not entry & OFLAG_COPIED and self.refcount(host // self.cluster_size) != 1:
            raise self._corrupt(f"data cluster at {host:#x} is shared")
        return True

    def _allocating_write(self, l1i: int, table: "Optional[array[int]]", i: int, j: int,
                          off: int, data: list[memoryview], n: int) -> None:
        cs = self.cluster_size
        k = j - i
        vstart = (off >> self.cluster_bits) * cs
        head = bytearray(off - vstart)
        tail = bytearray(vstart + k * cs - off - n)
        # copy-on-write: the old contents of the partial clusters, as read now
        if head:
            self._read(vstart, [memoryview(head)], len(head))
        if tail:
            t_off = off + n
            inside = max(0, min(len(tail), self.size - t_off))
            if inside:
                self._read(t_off, [memoryview(tail)[:inside]], inside)
        old = [table[x] for x in range(i, j)] if table is not None else []
        l2_off = self._alloc(1) if table is None else self.l1[l1i] & OFFSET_MASK
        t = array("Q", bytes(cs)) if table is None else table
        host = self._alloc(k)
        self._ensure_file(host + k * cs)
        self.file.write_from(host, [memoryview(head), *data, memoryview(tail)])
        for x in range(k):
            t[i + x] = (host + x * cs) | OFLAG_COPIED
        if table is None:
            # the whole new table is written at the commit, before the L1 entry
            self.l1[l1i] = l2_off | OFLAG_COPIED
            self._dirty_l1.add(l1i)
            self._l2_cache[l2_off] = t
            self._mark_dirty(l2_off, t, 0, self.l2_entries)
            self._trim_l2_cache()
        else:
            self._mark_dirty(l2_off, t, i, j)
        self._free_entries(old)

    def _link_table(self, l1i: int, l2_off: int, table: "array[int]") -> None:
        """Point L1 entry ``l1i`` at a new L2 table (written and made stable)."""
        self._write_meta(self.header.l1_table_offset + l1i * 8,
                         _BE64.pack(l2_off | OFLAG_COPIED))
        self.l1[l1i] = l2_off | OFLAG_COPIED
        self._l2_cache[l2_off] = table
        self._trim_l2_cache()

    def _write_entries(self, l1i: int, table: "array[int]", i: int, j: int) -> None:
        l2_off = self.l1[l1i] & OFFSET_MASK
        self._write_meta(l2_off + i * 8, _be_bytes(table[i:j]))

    def _free_entries(self, old: Sequence[int]) -> None:
        """After the entries that held them changed on disk: a barrier, then free."""
        if any(self._kind(e) == COMPRESSED or e & OFFSET_MASK for e in old):
            self._commit_meta()
            self._barrier()
            for e in old:
                self._free_entry(e)

    # ---- discard and write-zeroes --------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        with self._lock:
            self._check_writable()
            self._check_range(offset, length, "discard")
            if not self.can_unmap or not length:
                return  # discard='ignore': a hint that is ignored, as QEMU does
            self._commit_meta()
            zero = self.header.version >= 3 and self.backing is not None
            first, last = self._whole_clusters(offset, length)
            self._set_clusters(first, last, "discard", zero)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        with self._lock:
            self._check_writable()
            self._check_range(offset, length, "write-zeroes")
            if not length:
                return
            self._commit_meta()
            cs = self.cluster_size
            first, last = self._whole_clusters(offset, length)
            if self.header.version < 3:
                # no zero flag: whole clusters that read as zeroes anyway stay as
                # they are, the rest gets zero bytes
                self._zero_bytes(offset, length, skip_unallocated=self.backing is None)
                return
            if first < last:
                self._set_clusters(first, last, "zero-unmap" if unmap and self.can_unmap
                                   else "zero", True)
            head_end = min(offset + length, first * cs) if first < last else offset + length
            if head_end > offset:
                self._zero_bytes(offset, head_end - offset)
            if first < last and offset + length > last * cs:
                self._zero_bytes(last * cs, offset + length - last * cs)

    def _whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Guest clusters [first, last) wholly inside the range (the disk's last,
        partial cluster counts as whole when the range reaches the disk's end)."""
        cs = self.cluster_size
        first = -(-offset // cs)
        end = offset + length
        last = (end + cs - 1) // cs if end == self.size else end // cs
        return first, max(first, last)

    def _zero_bytes(self, offset: int, length: int, skip_unallocated: bool = False) -> None:
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            n = min(end, (pos // cs + 1) * cs) - pos
            if skip_unallocated:
                vc = pos >> self.cluster_bits
                table = self._table(vc >> self.l2_bits)
                if table is None or self._kind(table[vc & (self.l2_entries - 1)]) == \
                        UNALLOCATED:
                    pos += n
                    continue
            self._write(pos, [self._zero[:n]], n)
            pos += n

    def _set_clusters(self, first: int, last: int, mode: str, zero: bool) -> None:
        """Guest clusters [first, last) become zero clusters (``zero`` true) or
        unallocated; ``mode`` says what happens to their host clusters: discard and
        zero-unmap free them, zero keeps normal clusters preallocated.  As QEMU's
        discard, a v3 image with a backing file gets zero clusters (tables allocated
        where needed) so that the backing file does not show through."""
        mask = self.l2_entries - 1
        vc = first
        while vc < last:
            l1i, i = vc >> self.l2_bits, vc & mask
            j = min(mask + 1, i + last - vc)
            table = self._table(l1i)
            if table is None:
                if not (zero and self.backing is not None):
                    vc += j - i
                    continue
                # zeroes over a backing file need a table to say so
                l2_off = self._alloc(1)
                t = array("Q", bytes(self.cluster_size))
                for x in range(i, j):
                    t[x] = OFLAG_ZERO
                self._write_meta(l2_off, _be_bytes(t))
                self._barrier()
                self._link_table(l1i, l2_off, t)
                vc += j - i
                continue
            freed: list[int] = []
            lo, hi = j, i
            for x in range(i, j):
                e = table[x]
                kind = self._kind(e)
                if mode == "zero" and kind in (NORMAL, ZERO) and e & OFFSET_MASK:
                    new = (e & OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO
                elif kind == UNALLOCATED and (self.backing is None or not zero):
                    new = e
                elif kind == ZERO and not e & OFFSET_MASK:
                    new = e
                else:
                    new = OFLAG_ZERO if zero else 0
                    freed.append(e)
                if new != e:
                    table[x] = new
                    lo, hi = min(lo, x), max(hi, x + 1)
            if lo < hi:
                self._write_entries(l1i, table, lo, hi)
            self._free_entries(freed)
            vc += j - i

    # ---- the rest of the interface -------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            if self.file.fd < 0:
                raise BlockError(f"{self.path}: the image is closed")
            self._commit_meta()
            self.file.flush()

    def resize(self, size: int) -> None:
        """Grow the disk (the L1 table grows, moving when it must); shrinking is
        refused, as QEMU refuses it unless told the data may go."""
        with self._lock:
            if self.file.fd < 0:
                raise BlockError(f"{self.path}: the image is closed")
            if self.readonly:
                raise BlockError(f"{self.path}: the image is open read-only and cannot be "
                                 f"resized")
            if size < self.size:
                raise BlockError(f"{self.path}: shrinking a qcow2 image is not supported "
                                 f"({self.size} to {size} bytes)")
            if size % 512:
                raise BlockError(f"{self.path}: a qcow2 disk's size must be a multiple of "
                                 f"512 bytes ({size})")
            if size == self.size:
                return
            self._commit_meta()
            h, cs = self.header, self.cluster_size
            need = -(-size // (cs * self.l2_entries))
            if need * 8 > MAX_L1_BYTES:
                raise BlockError(f"{self.path}: {size} bytes is too large for this image's "
                                 f"cluster size")
            l1_off = h.l1_table_offset
            if need > h.l1_size:
                new = array("Q", self.l1)
                new.extend([0] * (need - len(new)))
                if h.l1_size and _round_up(need * 8, cs) <= _round_up(h.l1_size * 8, cs):
                    self._write_meta(l1_off + h.l1_size * 8, bytes((need - h.l1_size) * 8))
                    self._barrier()
                    old = None
                else:
                    clusters = _round_up(need * 8, cs) // cs
                    l1_off = self._alloc(clusters)
                    self._write_meta(l1_off, _be_bytes(new) + bytes(clusters * cs - need * 8))
                    self._barrier()
                    old = (h.l1_table_offset, _round_up(h.l1_size * 8, cs) // cs) \
                        if h.l1_size else None
                self._write_meta(24, struct.pack(">QIIQ", size, h.crypt_method, need, l1_off))
                self._barrier()
                self.l1 = new
                h.l1_size, h.l1_table_offset = need, l1_off
                self._fixed = self._fixed[:2] + [(l1_off, _round_up(need * 8, cs))]
                if old is not None:
                    self._add_refcounts(old[0] // cs, old[1], -1)
                    self._free_hint = min(self._free_hint, old[0] // cs)
            else:
                self._write_meta(24, _BE64.pack(size))
                self._barrier()
            h.size = self.size = size

    def close(self) -> None:
        """Close the image and its backing chain (their locks go with them), dirty
        metadata committed first."""
        try:
            if getattr(self, "_dirty_l2", None) or getattr(self, "_dirty_l1", None) or \
                    getattr(self, "_dirty_rb", None):
                with self._lock:
                    if self.file.fd >= 0:
                        self._commit_meta()
                        self._barrier()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        backing, self.backing = self.backing, None
        if backing is not None:
            backing.close()
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed


def _fill(views: list[memoryview], src: memoryview) -> None:
    pos = 0
    for v in views:
        v[:] = src[pos:pos + len(v)]
        pos += len(v)


def _open_backing(child: Qcow2Backend, path: str, fmt: Optional[str],
                  rest: Optional[Sequence[BackingRecord]],
                  seen: frozenset[tuple[int, int]], depth: int) -> Any:
    """Open the backing file ``path`` of ``child`` read-only with shared locks."""
    what = f"{child.path}: backing file {path}"
    if depth + 1 > MAX_CHAIN:
        raise BlockError(f"{what}: the backing chain is deeper than {MAX_CHAIN} images")
    try:
        st = os.stat(path)
    except OSError as e:
        raise BlockError(f"{what}: cannot open it: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a device node" if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode) \
            else "not a regular file"
        raise BlockError(f"{what} is {kind} (backing files must be regular files)")
    if (st.st_dev, st.st_ino) in seen:
        raise BlockError(f"{what}: the backing chain loops (the file is already in it)")
    if fmt is None:
        fmt = probe_format(path)
    try:
        if fmt == "raw":
            return RawBackend(path, readonly=True, cache=child.cache, kind="file")
        if fmt == "qcow2":
            return Qcow2Backend(path, readonly=True, cache=child.cache, kind="file",
                                backing=rest, _seen=seen, _depth=depth + 1)
    except BlockError as e:
        # one line that starts with the disk's image and walks down the chain
        raise type(e)(f"{child.path}: {e}") from e
    raise UnsupportedFormatError(f"{what}: backing format {fmt!r} is not supported (raw "
                                 f"and qcow2 are)")


def chain(backend: Any) -> list[Any]:
    """The backends of a disk, top first, down its backing chain."""
    out = []
    cur = backend
    while cur is not None:
        out.append(cur)
        cur = getattr(cur, "backing", None)
    return out
