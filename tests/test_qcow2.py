"""The qcow2 driver against QEMU's own tools (qemu-img, qemu-io from qemu-utils).

Images QEMU made are read by pyhv and compared with ``qemu-img convert -O raw``;
images pyhv wrote are checked by ``qemu-img check`` and compared by
``qemu-img compare`` with a raw file given the same writes; a writer killed
with SIGKILL at random points leaves no corruption and loses nothing flushed.
qemu-img is required: scripts/setup installs qemu-utils, and without it these
tests fail rather than skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pyhv.config import BackingFile, ConfigError, DiskConfig
from pyhv.engine.block import BlockError, ImageLockedError, open_disk
from pyhv.engine.block.qcow2 import Qcow2Backend
from pyhv.engine.block.qcow2_check import check
from pyhv.engine.block.raw import RawBackend

MiB = 1 << 20


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: the qcow2 tests need QEMU's tools "
                    f"(apt-get install qemu-utils; scripts/setup does it)")
    return path


def qemu_img(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([_tool("qemu-img"), *args], capture_output=True, text=True)
    assert r.returncode in ok, f"qemu-img {' '.join(args)}: {r.returncode} {r.stderr}"
    return r


def qemu_io(image: str, fmt: str, *cmds: str) -> None:
    argv = [_tool("qemu-io"), "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv + [image], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def random_raw(path: Path, size: int, seed: int, pieces: int = 24) -> bytes:
    """A raw file with random runs of random data in it (holes between)."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for _ in range(pieces):
        n = rnd.randrange(1, min(size, 3 * 65536))
        o = rnd.randrange(size - n)
        data[o:o + n] = rnd.randbytes(n)
    path.write_bytes(data)
    return bytes(data)


def pyhv_read_all(path: str, **kw: Any) -> bytes:
    with Qcow2Backend(path, readonly=True, **kw) as img:
        buf = bytearray(img.size)
        # in uneven pieces, so requests start and end inside clusters
        pos, step = 0, 77777
        while pos < img.size:
            n = min(step, img.size - pos)
            img.read_into(pos, [memoryview(buf)[pos:pos + n]])
            pos += n
        return bytes(buf)


def convert_raw(path: str, tmp: Path) -> bytes:
    out = tmp / "converted.raw"
    qemu_img("convert", "-O", "raw", path, str(out))
    return out.read_bytes()


def qemu_check(path: str) -> subprocess.CompletedProcess[str]:
    return qemu_img("check", path, ok=(0, 2, 3))


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- reading what QEMU wrote ------------------------------------------------------------
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
@pytest.mark.parametrize("with_backing", [False, True])
def test_reads_qemu_images_as_qemu_img_convert(tmp_path: Path, compat: str, cluster: int,
                                               with_backing: bool) -> None:
    size = 6 * MiB
    src = tmp_path / "src.raw"
    random_raw(src, size, seed=cluster)
    img = str(tmp_path / "img.qcow2")
    opts = f"compat={compat},cluster_size={cluster}"
    if with_backing:
        base = str(tmp_path / "base.qcow2")
        qemu_img("convert", "-O", "qcow2", "-o", opts, str(src), base)
        # the overlay is larger than its base: the rest reads as zeroes
        qemu_img("create", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
                 img, str(size + 3 * MiB))
        qemu_io(img, "qcow2", "write -P 0x5a 100000 300000", "write -z 1048576 65536",
                "write -P 0x33 7000000 5000")
    else:
        qemu_img("convert", "-O", "qcow2", "-o", opts, str(src), img)
        qemu_io(img, "qcow2", "write -z 2097152 131072", "write -P 0x77 4000 9000")
    assert pyhv_read_all(img) == convert_raw(img, tmp_path)


@pytest.mark.parametrize("cluster", [4096, 65536, 2 * MiB])
def test_reads_compressed_images(tmp_path: Path, cluster: int) -> None:
    src = tmp_path / "src.raw"
    data = bytearray(random_raw(src, 5 * MiB, seed=7, pieces=4))
    for i in range(0, len(data), 4096):  # compressible text between the random runs
        data[i:i + 12] = b"cluster %04d" % (i // 4096)
    src.write_bytes(data)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}", str(src), img)
    info = json.loads(qemu_img("check", "--output", "json", img).stdout)
    assert info.get("compressed-clusters", 0) > 0
    assert pyhv_read_all(img) == bytes(data)


def test_sub_byte_and_wide_refcounts_are_read(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = random_raw(src, 2 * MiB, seed=3)
    for bits in (1, 64):
        img = str(tmp_path / f"r{bits}.qcow2")
        qemu_img("convert", "-O", "qcow2", "-o", f"refcount_bits={bits},cluster_size=4096",
                 str(src), img)
        assert pyhv_read_all(img) == data
        with Qcow2Backend(img, readonly=True) as q:
            assert check(q).exit_status == 0
        if bits == 1:
            with pytest.raises(BlockError, match=r"1-bit refcounts are read-only") as ei:
                Qcow2Backend(img)
            assert str(ei.value).startswith(img)
        else:
            with Qcow2Backend(img) as q:
                q.write_from(12345, [memoryview(b"w" * 70000)])
            assert qemu_check(img).returncode == 0


# ---- writing ----------------------------------------------------------------------------
def _random_ops(q: Any, ref: Any, rnd: random.Random, count: int, cluster: int) -> None:
    """The same random writes, write-zeroes and discards on the qcow2 image ``q`` and
    the raw file ``ref`` (discards only over whole clusters, where qcow2 frees)."""
    for _ in range(count):
        op = rnd.random()
        n = rnd.randrange(1, 3 * cluster if cluster < MiB else 300000)
        o = rnd.randrange(q.size - n)
        if op < 0.55:
            data = rnd.randbytes(n)
            q.write_from(o, [memoryview(data[:n // 3]), memoryview(data[n // 3:])])
            ref.seek(o)
            ref.write(data)
        elif op < 0.75:
            q.write_zeroes(o, n, unmap=rnd.random() < 0.5)
            ref.seek(o)
            ref.write(bytes(n))
        elif op < 0.85:
            start = (o + cluster - 1) // cluster * cluster
            end = (o + n) // cluster * cluster
            if end > start:
                q.discard(start, end - start)
                if q.can_unmap:  # else discard is a hint that is ignored
                    ref.seek(start)
                    ref.write(bytes(end - start))
        else:
            buf = bytearray(n)
            q.read_into(o, [memoryview(buf)])
            ref.seek(o)
            assert ref.read(n) == buf


@pytest.mark.parametrize("compat,cluster", [("0.10", 4096), ("1.1", 4096), ("1.1", 65536),
                                            ("0.10", 65536), ("1.1", 2 * MiB),
                                            ("1.1", 512)])
def test_writes_are_what_qemu_img_sees(tmp_path: Path, compat: str, cluster: int) -> None:
    size = 8 * MiB
    base = tmp_path / "base.raw"
    base_data = random_raw(base, size, seed=cluster)
    img = str(tmp_path / "ov.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}",
             "-b", str(base), "-F", "raw", img, str(size))
    ref_path = tmp_path / "ref.raw"
    ref_path.write_bytes(base_data)
    rnd = random.Random(cluster * 7 + len(compat))
    # discards free clusters; in v2 a freed cluster shows the backing file again,
    # which a raw file cannot model: v2 gets discard='ignore'
    with open(ref_path, "r+b") as ref, Qcow2Backend(img, unmap=compat == "1.1") as q:
        _random_ops(q, ref, rnd, 70, cluster)
        # growth: the disk, and so the file, gets larger; then write at the new end
        q.resize(size + 5 * MiB)
        ref.truncate(size + 5 * MiB)
        tail = rnd.randbytes(10000)
        q.write_from(q.size - 10000, [memoryview(tail)])
        ref.seek(q.size - 10000)
        ref.write(tail)
        _random_ops(q, ref, rnd, 20, cluster)
        q.flush()
    r = qemu_check(img)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, str(ref_path), ok=(0, 1))
    assert cmp.returncode == 0, cmp.stdout
    assert qemu_img("info", "--output", "json", img).stdout.count(str(size + 5 * MiB))
    # pyhv's own check agrees with qemu-img's
    with Qcow2Backend(img, readonly=True) as q:
        assert check(q).exit_status == 0


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB of file; writing
    past that moves the table (a new, larger one; the header points at it)."""
    img = str(tmp_path / "g.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, "32M")
    data = random.Random(1).randbytes(12 * MiB)
    with Qcow2Backend(img) as q:
        before = q.header.refcount_table_offset
        for o in range(0, len(data), MiB):
            q.write_from(o, [memoryview(data[o:o + MiB])])
        assert q.header.refcount_table_offset != before
        assert q.header.refcount_table_clusters >= 2
    assert qemu_check(img).returncode == 0
    assert convert_raw(img, tmp_path)[:len(data)] == data


def test_resize_moves_the_l1_table_and_refuses_shrinking(tmp_path: Path) -> None:
    img = str(tmp_path / "r.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M")
    with Qcow2Backend(img) as q:
        q.write_from(4096, [memoryview(b"a" * 4096)])
        l1_before = q.header.l1_table_offset
        q.resize(4096 * 512 * 600)  # 600 L1 entries: more than one 4 KiB cluster holds
        assert q.header.l1_table_offset != l1_before
        q.write_from(q.size - 4096, [memoryview(b"z" * 4096)])
        with pytest.raises(BlockError, match="shrinking a qcow2 image is not supported"):
            q.resize(1 * MiB)
    assert qemu_check(img).returncode == 0
    info = json.loads(qemu_img("info", "--output", "json", img).stdout)
    assert info["virtual-size"] == 4096 * 512 * 600
    qemu_io(img, "qcow2", "read -P 0x61 4096 4096", f"read -P 0x7a {4096 * 512 * 600 - 4096} "
                                                    "4096")


def test_write_zeroes_and_discard_make_zero_clusters(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xee" * (2 * MiB))
    img = str(tmp_path / "z.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", img, "2M")
    with Qcow2Backend(img, unmap=True) as q:
        q.write_from(0, [memoryview(b"\x11" * (2 * MiB))])
        q.write_zeroes(0, 65536)               # kept allocated, flagged zero
        q.write_zeroes(65536, 65536, unmap=True)  # freed, flagged zero
        q.discard(131072, 65536)               # freed: zero flag, the backing stays hidden
        q.write_zeroes(196608 + 100, 1000)      # partial: zero bytes written
    with Qcow2Backend(img, readonly=True) as q:
        l2 = q._table(0)
        assert l2 is not None
        assert l2[0] & 1 and l2[0] & 0x00FFFFFFFFFFFE00   # zero, still allocated
        assert l2[1] == 1 and l2[2] == 1                   # zero, nothing allocated
    expect = bytearray(b"\x11" * (2 * MiB))
    expect[0:196608] = bytes(196608)
    expect[196708:197708] = bytes(1000)
    assert convert_raw(img, tmp_path) == bytes(expect)
    r = qemu_check(img)
    assert r.returncode == 0, r.stdout


def test_compressed_cluster_rewritten_and_freed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"compress me " * (MiB // 12) + bytes(MiB % 12))
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", str(src), img)
    with Qcow2Backend(img) as q:
        q.write_from(70000, [memoryview(b"N" * 100)])
    data = bytearray(src.read_bytes())
    data[70000:70100] = b"N" * 100
    assert convert_raw(img, tmp_path) == bytes(data)
    assert qemu_check(img).returncode == 0


def test_l2_cache_keeps_metadata_reads_away(tmp_path: Path) -> None:
    img = str(tmp_path / "big.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "64M")
    with Qcow2Backend(img) as q:
        for o in range(0, 64 * MiB, 256 * 1024):
            q.write_from(o, [memoryview(b"d" * 4096)])
    reads = []
    with Qcow2Backend(img, readonly=True) as q:
        real = q._read_meta
        q._read_meta = lambda off, n: (reads.append(off), real(off, n))[1]  # type: ignore
        rnd = random.Random(5)
        buf = memoryview(bytearray(4096))
        for _ in range(400):
            q.read_into(rnd.randrange(64 * MiB // 4096) * 4096, [buf])
        warm = len(reads)
        assert warm <= 32  # one read per L2 table at most (64 MiB / 2 MiB per table)
        for _ in range(400):
            q.read_into(rnd.randrange(64 * MiB // 4096) * 4096, [buf])
        assert len(reads) == warm
    reads.clear()
    with Qcow2Backend(img, readonly=True, l2_cache_size=2 * 4096) as q:
        real2 = q._read_meta
        q._read_meta = lambda off, n: (reads.append(off), real2(off, n))[1]  # type: ignore
        for _ in range(200):
            q.read_into(rnd.randrange(64 * MiB // 4096) * 4096, [buf])
        assert len(reads) > 100  # a two-table cache keeps missing


def test_allocating_writes_share_one_metadata_commit(tmp_path: Path) -> None:
    """Allocating writes change L2/L1 entries in memory; flush commits them with a
    bounded number of barriers (not one per write), and only then does a second
    reader of the file see the data."""
    img = str(tmp_path / "wb.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    barriers = []
    with Qcow2Backend(img) as q:
        real = q.file.flush
        q.file.flush = lambda: (barriers.append(1), real())[1]  # type: ignore[method-assign]
        meta: list[int] = []
        real_meta = q._write_meta
        q._write_meta = lambda off, d: (meta.append(off), real_meta(off, d))[1]  # type: ignore
        for k in range(200):
            q.write_from(k * 8192 + 100, [memoryview(bytes([k % 251 + 1]) * 3000)])
        # nothing made stable yet: no fdatasync, no refcount/L2/L1 write per request
        assert barriers == [] and meta == []
        with Qcow2Backend(img, readonly=True, locking=False) as peek:
            buf = bytearray(3000)
            peek.read_into(100, [memoryview(buf)])
            assert buf == bytes(3000)  # the on-disk tables do not reference it yet
        q.flush()
        assert 1 <= len(barriers) <= 3
        assert 3 <= len(meta) <= 8   # refcount block, L2 tables, L1 entries: once each
        with Qcow2Backend(img, readonly=True, locking=False) as peek:
            for k in (0, 77, 199):
                buf = bytearray(3000)
                peek.read_into(k * 8192 + 100, [memoryview(buf)])
                assert buf == bytes([k % 251 + 1]) * 3000
    assert qemu_check(img).returncode == 0


def test_dirty_tables_leaving_a_small_cache_are_committed(tmp_path: Path) -> None:
    """With a two-table L2 cache, writes across 16 tables evict dirty tables: they
    are committed first, read back right before any flush, and close commits the
    rest; qemu-img agrees byte for byte."""
    img = str(tmp_path / "evict.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "32M")
    expect = bytearray(32 * MiB)
    rnd = random.Random(9)
    with Qcow2Backend(img, l2_cache_size=2 * 4096) as q:
        for _ in range(300):
            off = rnd.randrange(32 * MiB - 5000)
            data = rnd.randbytes(rnd.randrange(1, 5000))
            q.write_from(off, [memoryview(data)])
            expect[off:off + len(data)] = data
            probe = rnd.randrange(32 * MiB - 4096)
            buf = bytearray(4096)
            q.read_into(probe, [memoryview(buf)])
            assert buf == expect[probe:probe + 4096]
    assert convert_raw(img, tmp_path) == bytes(expect)
    assert qemu_check(img).returncode == 0


def test_virtio_blk_on_a_qcow2_overlay(tmp_path: Path) -> None:
    """The device model drives the qcow2 backend as it drives a raw one."""
    from test_virtio_blk import SECTOR, make, pattern, seg

    from pyhv.engine.virtio.blk import S_OK, T_DISCARD, T_FLUSH, T_WRITE_ZEROES

    base = tmp_path / "base.raw"
    base.write_bytes(b"\xaa" * MiB)
    img = str(tmp_path / "ov.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(base), "-F",
             "raw", img, "1M")
    e = make(img, discard=True, backend=open_disk(DiskConfig(img, format="qcow2",
                                                             discard="unmap")))
    try:
        data = pattern(3 * SECTOR)
        assert e.write(5, data) == (S_OK, 1)       # inside a cluster: copy-on-write
        status, _, got = e.read(4, 5)
        assert status == S_OK and got == b"\xaa" * SECTOR + data + b"\xaa" * SECTOR
        assert e.simple(T_WRITE_ZEROES, seg(256, 16, flags=1)) == (S_OK, 1)
        assert e.simple(T_DISCARD, seg(512, 8)) == (S_OK, 1)
        assert e.simple(T_FLUSH) == (S_OK, 1)
        assert e.read(256, 16)[2] == bytes(16 * SECTOR)
        assert e.read(512, 8)[2] == bytes(8 * SECTOR)   # v3: the base stays hidden
    finally:
        e.dev.close()
        e.fn.close()
    expect = bytearray(b"\xaa" * MiB)
    expect[5 * SECTOR:8 * SECTOR] = data
    expect[256 * SECTOR:272 * SECTOR] = bytes(16 * SECTOR)
    expect[512 * SECTOR:520 * SECTOR] = bytes(8 * SECTOR)
    assert convert_raw(img, tmp_path) == bytes(expect)
    assert qemu_check(img).returncode == 0


# ---- crash consistency ------------------------------------------------------------------
SLOT = 5000   # each write has its own slot: unaligned, partial clusters over the backing


def _writer(img: str, seed: int, out: int) -> None:
    rnd = random.Random(seed)
    with Qcow2Backend(img) as q:
        slots = list(range(q.size // SLOT))
        rnd.shuffle(slots)
        for k, slot in enumerate(slots):
            q.write_from(slot * SLOT, [memoryview(_slot_data(seed, k))])
            if k % 3 == 2:
                q.flush()
                os.write(out, struct.pack("<I", k))


def _slot_data(seed: int, k: int) -> bytes:
    return random.Random(seed * 100003 + k).randbytes(SLOT)


def test_kill_9_leaves_no_corruption_and_keeps_flushed_writes(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xbb" * (2 * MiB))
    rounds, deadline = 50, time.monotonic() + 30
    killed_at = []
    for n in range(rounds):
        assert time.monotonic() < deadline, f"only {n} rounds in 30 s"
        img = str(tmp_path / f"c{n}.qcow2")
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", str(base),
                 "-F", "raw", img, "2M")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            code = 0
            try:
                os.close(r)
                _writer(img, n, w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        rnd = random.Random(n)
        # kill after a random number of flushes, a random moment into the next ones
        want = rnd.randrange(1, 20)
        got = b""
        while len(got) < 4 * want:
            chunk = os.read(r, 4 * want - len(got))
            if not chunk:
                break
            got += chunk
        time.sleep(rnd.random() * 0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(r, 4096):
            got += chunk
        os.close(r)
        assert len(got) >= 4 * want, "the writer died before it was killed"
        last_flushed = struct.unpack_from("<I", got, len(got) - 4)[0]
        killed_at.append(last_flushed)
        res = qemu_check(img)
        assert res.returncode in (0, 3), f"round {n}: {res.stdout}"   # leaks allowed
        with Qcow2Backend(img, readonly=True) as q:
            slots = list(range(q.size // SLOT))
            random.Random(n).shuffle(slots)
            for k in range(last_flushed + 1):
                buf = bytearray(SLOT)
                q.read_into(slots[k] * SLOT, [memoryview(buf)])
                assert buf == _slot_data(n, k), f"round {n}: write {k} was flushed but is lost"
            assert check(q).corruptions == 0
        os.unlink(img)
    assert len(set(killed_at)) > 5  # the kills landed at many different points


# ---- bad images -------------------------------------------------------------------------
def _patch(path: str, offset: int, fmt: str, *values: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def _bad_truncated(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    os.truncate(img, 60)


def _bad_l1_past_end(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    _patch(img, 40, ">Q", 1 << 40)


def _bad_l1_entry_past_end(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    with Qcow2Backend(img, readonly=True) as q:
        l1 = q.header.l1_table_offset
    _patch(img, l1, ">Q", (1 << 63) | (1 << 40))


def _bad_reftable_over_header(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    _patch(img, 48, ">Q", 0)


def _bad_cluster_bits_high(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    _patch(img, 20, ">I", 22)


def _bad_cluster_bits_low(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    _patch(img, 20, ">I", 8)


def _bad_loop(tmp: Path, img: str) -> None:
    other = str(tmp / "other.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("create", "-f", "qcow2", "-u", "-b", img, "-F", "qcow2", other, "1M")
    qemu_img("rebase", "-u", "-b", other, "-F", "qcow2", img)


def _bad_device_backing(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", "-u", "-b", "/dev/zero", "-F", "raw", img, "1M")


def _bad_data_file(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp / 'data.raw'}", img, "1M")


def _bad_encrypted(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    _patch(img, 32, ">I", 1)


def _bad_extension_length(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", img, "1M")
    header_length = struct.unpack(">I", Path(img).read_bytes()[100:104])[0]
    _patch(img, header_length + 4, ">I", 0x7FFFFFF0)  # the first extension's length


def _bad_backing_name_length(tmp: Path, img: str) -> None:
    qemu_img("create", "-f", "qcow2", "-u", "-b", "base.raw", "-F", "raw", img, "1M")
    _patch(img, 16, ">I", 5000)


@pytest.mark.parametrize("make,needle", [
    (_bad_truncated, "less than a header"),
    (_bad_l1_past_end, "L1 table .* is past the end of the file"),
    (_bad_l1_entry_past_end, "L1 entry 0 .* points past the end of the file"),
    (_bad_reftable_over_header, "refcount table overlaps the header"),
    (_bad_cluster_bits_high, "cluster_bits 22 is out of range"),
    (_bad_cluster_bits_low, "cluster_bits 8 is out of range"),
    (_bad_loop, "backing chain loops"),
    (_bad_device_backing, "/dev/zero is a device node"),
    (_bad_data_file, "external data file are not supported"),
    (_bad_encrypted, "encrypted qcow2 images are not supported"),
    (_bad_extension_length, "header extension .* runs past the header area"),
    (_bad_backing_name_length, "backing file name is 5000 bytes long"),
])
def test_bad_images_one_line_nothing_written(tmp_path: Path, make: Any, needle: str) -> None:
    img = str(tmp_path / "bad.qcow2")
    make(tmp_path, img)
    before = sha(img)
    for readonly in (False, True):
        with pytest.raises(BlockError, match=needle) as ei:
            open_disk(DiskConfig(img, format="qcow2", readonly=readonly))
        msg = str(ei.value)
        assert msg.startswith(img + ":") and "\n" not in msg, msg
    assert sha(img) == before


@pytest.mark.parametrize("bit,needle", [(0, "not closed cleanly"), (1, "marked corrupt")])
def test_dirty_and_corrupt_images_open_read_only_only(tmp_path: Path, bit: int,
                                                      needle: str) -> None:
    img = str(tmp_path / "d.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io(img, "qcow2", "write -P 0x42 0 4096")
    _patch(img, 72, ">Q", 1 << bit)
    before = sha(img)
    with pytest.raises(BlockError, match=needle) as ei:
        Qcow2Backend(img)
    assert str(ei.value).startswith(img) and "qemu-img check -r all" in str(ei.value)
    with Qcow2Backend(img, readonly=True) as q:
        buf = bytearray(4096)
        q.read_into(0, [memoryview(buf)])
        assert buf == b"\x42" * 4096
    assert sha(img) == before


# ---- backing chains ---------------------------------------------------------------------
def test_three_deep_chain_from_headers_and_explicit(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    os.chdir(tmp_path)
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "2M")
    qemu_io("mid.qcow2", "qcow2", "write -P 0x4d 65536 65536")
    (tmp_path / "sub").mkdir()
    qemu_img("create", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2",
             "sub/top.qcow2", "3M")
    qemu_io("sub/top.qcow2", "qcow2", "write -P 0x54 0 4096")
    top = str(tmp_path / "sub/top.qcow2")
    expect = bytearray(b"B" * MiB + bytes(2 * MiB))
    expect[65536:131072] = b"M" * 65536
    expect[0:4096] = b"T" * 4096
    # names relative to each image's directory, from the headers
    assert pyhv_read_all(top) == bytes(expect)
    # the same chain given explicitly (formats included)
    chain = (BackingFile(str(tmp_path / "mid.qcow2"), "qcow2"), BackingFile(str(base)))
    with open_disk(DiskConfig(top, format="qcow2", backing=chain, readonly=True)) as q:
        buf = bytearray(q.size)
        q.read_into(0, [memoryview(buf)])
        assert buf == expect
        assert [b.path for b in _chain(q)] == [top, *(c.path for c in chain)]
    # an explicit empty chain: no backing file, whatever the header says
    with open_disk(DiskConfig(top, format="qcow2", backing=(), readonly=True)) as q:
        buf = bytearray(4096)
        q.read_into(0, [memoryview(buf)])
        assert buf == b"T" * 4096
        q.read_into(131072, [memoryview(buf)])  # the base's bytes with it
        assert buf == bytes(4096)
    with pytest.raises(ConfigError, match="only a qcow2 image has a backing file"):
        DiskConfig(str(base), backing=())


def _chain(q: Any) -> list[Any]:
    from pyhv.engine.block.qcow2 import chain
    return chain(q)


def test_backing_files_are_shared_read_locks(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    for name in ("a", "b"):
        qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw",
                 str(tmp_path / f"{name}.qcow2"), "1M")
    with Qcow2Backend(str(tmp_path / "a.qcow2")), Qcow2Backend(str(tmp_path / "b.qcow2")):
        # two overlays share their base; nobody may write it meanwhile
        with pytest.raises(ImageLockedError, match=str(base)):
            RawBackend(str(base))
        with pytest.raises(ImageLockedError):
            Qcow2Backend(str(tmp_path / "a.qcow2"))
        r = qemu_img("info", str(base))  # QEMU reads it alongside
        assert "file format: raw" in r.stdout
    RawBackend(str(base)).close()


# ---- pyhv img info / check ----------------------------------------------------------------
def _pyhv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(__file__).parents[1] / ".venv/bin/pyhv"), *args],
                          capture_output=True, text=True)


def test_img_info_and_check(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    img = str(tmp_path / "i.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw",
             img, "2M")
    qemu_io(img, "qcow2", "write -P 1 0 20000")
    r = _pyhv("img", "info", img)
    assert r.returncode == 0, r.stderr
    q = qemu_img("info", img).stdout
    for line in ("file format: qcow2", "virtual size: 2 MiB (2097152 bytes)",
                 "cluster_size: 4096", "backing file: base.raw", "backing file format: raw"):
        assert line in r.stdout and line in q, line
    j = json.loads(_pyhv("img", "info", "--output", "json", img).stdout)
    qj = json.loads(qemu_img("info", "--output", "json", img).stdout)
    for key in ("virtual-size", "cluster-size", "format", "backing-filename",
                "backing-filename-format", "full-backing-filename", "dirty-flag"):
        assert j[key] == qj[key], key
    chain = json.loads(_pyhv("img", "info", "--backing-chain", "--output", "json", img).stdout)
    assert [c["format"] for c in chain] == ["qcow2", "raw"]
    r = _pyhv("img", "check", img)
    assert r.returncode == 0 and r.stdout == qemu_img("check", img).stdout
    # a leak: a refcount raised by hand
    with Qcow2Backend(img) as qq:
        leaked = qq._find_free(1)
        qq._ensure_file((leaked + 1) * 4096)
        qq._add_refcounts(leaked, 1, 1)
    r, qr = _pyhv("img", "check", img), qemu_check(img)
    assert r.returncode == qr.returncode == 3
    assert r.stdout == qr.stdout and r.stderr == qr.stderr == \
        f"Leaked cluster {leaked} refcount=1 reference=0\n"
    assert json.loads(_pyhv("img", "check", "--output", "json", img).stdout)["leaks"] == 1
    # a corruption: an L2 entry to a cluster whose refcount is 0
    with Qcow2Backend(img) as qq:
        free = qq._find_free(1)
        l2 = qq._table(0)
        assert l2 is not None
        qq._ensure_file((free + 1) * 4096)
        _patch(img, (qq.l1[0] & 0x00FFFFFFFFFFFE00) + 8 * 100, ">Q", (1 << 63) | free * 4096)
    r, qr = _pyhv("img", "check", img), qemu_check(img)
    assert r.returncode == qr.returncode == 2
    assert f"ERROR cluster {free} refcount=0 reference=1" in r.stderr
    assert r.stderr == qr.stderr and r.stdout == qr.stdout
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(10))
    r = _pyhv("img", "check", str(bad))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(bad) in r.stderr


def test_open_disk_without_qemu_img_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard the tests above rely on: a missing qemu-img fails, never skips."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="qemu-utils"):
        _tool("qemu-img")
