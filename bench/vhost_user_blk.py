#!/usr/bin/env python3
"""vhost-user-blk from the host side: pyhv's backend against qemu-storage-daemon's.

    .venv/bin/python bench/vhost_user_blk.py [--size 128] [--seconds 1] [--repeat 3]
                                             [--cache writeback|none] [--dir /var/tmp]
                                             [--no-firstwrite] [--profile DIR] [--json FILE]

A frontend driver in this process (no guest, no emulated CPU) speaks vhost-user to a
backend process over its socket, as QEMU would: features, memory table (a memfd,
shared), one split ring of 256 entries with EVENT_IDX, kick and call eventfds.  The
control path is tests/vhost_user_frontend.py's :class:`Frontend`; the data path is
the driver here: fixed request slots (header, data, status descriptors) in the memfd,
a window of ``depth`` requests in flight (a completion frees a slot, which is
refilled at once, one kick per refill), the call eventfd waited for with ``poll``.
The same request streams run against three backends:

* **null**: a backend written for this bench (``--null-backend``, in a process of its
  own) that completes every request without I/O: it walks the chain, writes status
  OK and the used element.  It is the driver's ceiling, not a block device;
* **pyhv**: ``python -m pyhv vhost-user-blk --socket S --disk IMG --format F --cache C``;
* **qsd**: ``qemu-storage-daemon --blockdev driver=file,node-name=f,filename=IMG,
  cache.direct=on|off [--blockdev driver=qcow2,node-name=q,file=f] --export
  type=vhost-user-blk,id=e,node-name=f|q,addr.type=unix,addr.path=S,writable=on``.

Images: ``--size`` MiB of random data (raw), and the same converted by ``qemu-img
convert -O qcow2`` (64 KiB clusters, fully allocated, so reads hit data).  pyhv and
qsd run on the same file, one after the other (both take QEMU's image locks); each
repeat starts a fresh backend per target, alternating pyhv and qsd.  Cases: 1 MiB
sequential reads and writes at QD1, 4 KiB random reads at QD1 and QD32, and, on a
fresh empty qcow2 image, 64 KiB sequential first writes at QD1 (cluster allocation;
it stops at the image's end).  Each figure is the median of ``--repeat`` runs of
``--seconds``.  Backend CPU per request is the backend process's CPU time (all its
threads, from /proc) over the requests.  With the default writeback cache the image
is in the page cache: per-request overheads, not the disk's.  Before timing, each
pyhv/qsd session writes 4 KiB through the backend and reads it back; for raw images
the file is read there too.

No timing is asserted anywhere.  Exit 2 with one line on stderr when the bench cannot
run here (no qemu-storage-daemon or qemu-img).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from benchstats import percentile  # noqa: E402
from vhost_user_frontend import REGION1_GUEST, Frontend  # noqa: E402

from pyhv.engine.memory import memory_fence  # noqa: E402
from pyhv.engine.vhost_user.connection import Connection, Disconnected  # noqa: E402
from pyhv.engine.vhost_user.message import (  # noqa: E402
    F_PROTOCOL_FEATURES,
    PF_REPLY_ACK,
    MemoryTable,
    Request,
    VringAddr,
    VringState,
    encode_reply,
)
from pyhv.engine.virtio.blk import F_FLUSH  # noqa: E402
from pyhv.engine.virtio.device import F_RING_EVENT_IDX, F_VERSION_1  # noqa: E402
from pyhv.engine.virtio.queue import DESC_F_NEXT, DESC_F_WRITE  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
QUEUE = 256
#: the features the driver takes from what the backend offers
WANTED = F_VERSION_1 | F_RING_EVENT_IDX | F_PROTOCOL_FEATURES | F_FLUSH
T_IN, T_OUT = 0, 1
# layout inside region 1 of the Frontend's memfd (guest REGION1_GUEST, 3 MiB): the
# ring is where Frontend.add_ring puts ring 0 (+0x10000), then request headers and
# status bytes, then data buffers (depth * size <= 2 MiB)
SLOTS = 0x40000
DATA = 0x100000
DATA_END = 0x300000
DESC = struct.Struct("<QIHH")
HDR = struct.Struct("<IIQ")
U16 = struct.Struct("<H")


def _store16(mv: memoryview, off: int, value: int) -> None:
    """A ring index the other side may be reading: one copy of the packed value
    (``pack_into`` zero-fills before it stores, and a reader could see 0)."""
    mv[off:off + 2] = U16.pack(value)

U32 = struct.Struct("<I")


@dataclass
class Case:
    name: str
    write: bool
    size: int
    depth: int
    sequential: bool


CASES = [
    Case("1m-seqread-qd1", False, MiB, 1, True),
    Case("1m-seqwrite-qd1", True, MiB, 1, True),
    Case("4k-randread-qd1", False, 4 * KiB, 1, False),
    Case("4k-randread-qd32", False, 4 * KiB, 32, False),
]
FIRSTWRITE = Case("64k-firstwrite-qd1", True, 64 * KiB, 1, True)


def die(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr)
    raise SystemExit(1)


class Stopped(Exception):
    """The backend stopped completing requests."""


# ---- the driver ---------------------------------------------------------------------------

class Driver:
    """A vhost-user-blk frontend on one connected socket: set-up through
    :class:`Frontend`, requests through fixed slots in region 1 of its memfd."""

    def __init__(self, sock_path: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        fe = self.fe = Frontend(s, timeout=10.0)
        offered = fe.get_u64(Request.GET_FEATURES)
        if not offered & F_PROTOCOL_FEATURES:
            die("the backend offers no protocol features")
        fe.send(Request.SET_OWNER)
        pf = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
        if not pf & PF_REPLY_ACK:
            die("the backend offers no REPLY_ACK")
        if fe.ack(Request.SET_PROTOCOL_FEATURES, pf & PF_REPLY_ACK) != 0:
            die("SET_PROTOCOL_FEATURES refused")
        self.features = offered & WANTED
        if fe.ack(Request.SET_FEATURES, self.features) != 0:
            die("SET_FEATURES refused")
        if fe.set_mem_table() != 0:
            die("SET_MEM_TABLE refused")
        self.event_idx = bool(self.features & F_RING_EVENT_IDX)
        d = fe.add_ring(0, size=QUEUE, event_idx=self.event_idx)
        self.mv = fe.memory.view(REGION1_GUEST, DATA_END)
        self.desc = d.desc - REGION1_GUEST
        self.avail = d.avail - REGION1_GUEST
        self.used = d.used - REGION1_GUEST
        self.avail_idx = 0
        self.last_used = 0
        self.kick, self.call = fe.kicks[0], fe.calls[0]
        self.poller = select.poll()
        self.poller.register(self.call, select.POLLIN)
        self.stalls = 0      # waits that ended on the 10 ms timeout (a missed call)

    def slot(self, i: int, size: int) -> tuple[int, int, int]:
        """(header, data, status) offsets in region 1 of slot ``i``."""
        return SLOTS + 32 * i, DATA + size * i, SLOTS + 32 * i + 16

    def prepare(self, depth: int, size: int, write: bool) -> None:
        if DATA + depth * size > DATA_END or 3 * depth > QUEUE:
            die(f"depth {depth} x {size} does not fit the driver's memory")
        mv = self.mv
        for i in range(depth):
            hdr, data, status = self.slot(i, size)
            d = 3 * i
            for k, (off, n, flags) in enumerate((
                    (hdr, 16, DESC_F_NEXT),
                    (data, size, DESC_F_NEXT | (0 if write else DESC_F_WRITE)),
                    (status, 1, DESC_F_WRITE))):
                DESC.pack_into(mv, self.desc + 16 * (d + k), REGION1_GUEST + off, n, flags,
                               d + k + 1)

    def run(self, case: Case, offsets: list[int], seconds: float,
            limit: Optional[int] = None) -> tuple[float, int]:
        """Keep ``case.depth`` requests in flight for ``seconds`` (or ``limit``
        requests): (wall seconds, requests completed)."""
        self.prepare(case.depth, case.size, case.write)
        mv, avail, used = self.mv, self.avail, self.used
        kind = T_OUT if case.write else T_IN
        ring_avail = avail + 4
        used_event = avail + 4 + 2 * QUEUE
        pack_hdr, unpack32 = HDR.pack_into, U32.unpack_from
        pack16 = _store16
        fence = memory_fence
        kick, poll, call = self.kick, self.poller.poll, self.call
        n_off = len(offsets)
        free = list(range(case.depth))
        status_of = [SLOTS + 32 * i + 16 for i in range(case.depth)]
        hdr_of = [SLOTS + 32 * i for i in range(case.depth)]
        nxt = 0
        done = 0
        inflight = 0
        avail_idx, last_used = self.avail_idx, self.last_used
        submitting = True
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            if submitting and free:
                for i in free:
                    pack_hdr(mv, hdr_of[i], kind, 0, offsets[nxt] >> 9)
                    nxt += 1
                    if nxt == n_off:
                        nxt = 0
                    mv[status_of[i]] = 0xFF
                    pack16(mv, ring_avail + 2 * (avail_idx % QUEUE), 3 * i)
                    avail_idx = (avail_idx + 1) & 0xFFFF
                inflight += len(free)
                free = []
                pack16(mv, avail + 2, avail_idx)
                pack16(mv, used_event, last_used)
                fence()  # used_event stored before the used index is loaded below
                os.eventfd_write(kick, 1)
            if inflight == 0:
                break
            idx = U16.unpack_from(mv, used + 2)[0]
            if idx == last_used and not submitting:
                # draining: ask for a call at the next completion, then look again
                pack16(mv, used_event, last_used)
                fence()
                idx = U16.unpack_from(mv, used + 2)[0]
            waited = 0
            while idx == last_used:
                if poll(10):
                    try:
                        os.eventfd_read(call)
                    except BlockingIOError:
                        pass
                else:
                    self.stalls += 1
                    waited += 1
                    if waited > 1000:
                        raise Stopped(f"no completion in 10 s ({inflight} in flight, "
                                      f"{case.name})")
                idx = U16.unpack_from(mv, used + 2)[0]
            while last_used != idx:
                head = unpack32(mv, used + 4 + 8 * (last_used % QUEUE))[0]
                i = head // 3
                if head % 3 or i >= case.depth or mv[status_of[i]] != 0:
                    die(f"request in slot {i} (head {head}) failed: status "
                        f"{mv[status_of[i % case.depth]]:#x}")
                free.append(i)
                last_used = (last_used + 1) & 0xFFFF
                done += 1
                inflight -= 1
            if submitting and (time.perf_counter() >= deadline
                               or (limit is not None and done + inflight >= limit)):
                submitting = False
        wall = time.perf_counter() - t0
        self.avail_idx, self.last_used = avail_idx, last_used
        return wall, done

    def check_roundtrip(self, offset: int) -> bytes:
        """Write 4 KiB of random bytes at ``offset`` and read them back."""
        pattern = os.urandom(4 * KiB)
        data = DATA  # slot 0 of a 4 KiB layout
        self.mv[data:data + 4 * KiB] = pattern
        case = Case("check-write", True, 4 * KiB, 1, True)
        self.run(case, [offset], 10.0, limit=1)
        self.mv[data:data + 4 * KiB] = bytes(4 * KiB)
        self.run(Case("check-read", False, 4 * KiB, 1, True), [offset], 10.0, limit=1)
        if bytes(self.mv[data:data + 4 * KiB]) != pattern:
            die("a 4 KiB write read back differently through the backend")
        return pattern

    def fill(self, size: int, byte: int) -> None:
        self.mv[DATA:DATA + size] = bytes([byte]) * size

    def close(self) -> None:
        self.mv.release()
        self.fe.close()


# ---- the null backend (the driver's ceiling) -----------------------------------------------

def null_backend(sock_path: str) -> int:
    """Serve one frontend at ``sock_path``: every request completes OK, no I/O."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    s, _ = srv.accept()
    srv.close()
    conn = Connection(s)
    regions: list[tuple[int, int, int, mmap.mmap, memoryview]] = []
    ring: dict[str, Any] = {"num": QUEUE}
    features = [0]
    kick: list[int] = []
    call: list[int] = []

    def where(addr: int, user: bool = False) -> tuple[memoryview, int]:
        for guest, size, uaddr, _m, mv in regions:
            base = uaddr if user else guest
            if base <= addr < base + size:
                return mv, addr - base
        raise SystemExit(f"null backend: {addr:#x} is outside the memory table")

    def serve() -> None:
        try:
            os.eventfd_read(kick[0])
        except BlockingIOError:
            pass
        mv, desc = ring["desc"]
        _, avail = ring["avail"]
        _, used = ring["used"]
        num = ring["num"]
        last = ring["last"]
        old = ring["used_idx"]
        new = old
        unpack_desc, unpack16 = DESC.unpack_from, U16.unpack_from
        while True:
            idx = unpack16(mv, avail + 2)[0]
            if idx == last:
                break
            while last != idx:
                head = unpack16(mv, avail + 4 + 2 * (last % num))[0]
                i = head
                while True:
                    addr, _n, flags, nxt = unpack_desc(mv, desc + 16 * i)
                    if not flags & DESC_F_NEXT:
                        break
                    i = nxt
                smv, soff = where(addr)
                smv[soff] = 0
                struct.pack_into("<II", mv, used + 4 + 8 * (new % num), head, 1)
                new = (new + 1) & 0xFFFF
                last = (last + 1) & 0xFFFF
            _store16(mv, used + 2, new)
        ring["last"], ring["used_idx"] = last, new
        if new == old:
            return
        if features[0] & F_RING_EVENT_IDX:
            event = unpack16(mv, avail + 4 + 2 * num)[0]
            if (new - event - 1) & 0xFFFF >= (new - old) & 0xFFFF:
                return
        os.eventfd_write(call[0], 1)

    def handle(m: Any) -> None:
        r, body = m.request, m.body
        reply: Any = None
        if r == Request.GET_FEATURES:
            reply = F_VERSION_1 | F_RING_EVENT_IDX | F_PROTOCOL_FEATURES | F_FLUSH
        elif r == Request.GET_PROTOCOL_FEATURES:
            reply = PF_REPLY_ACK
        elif r == Request.SET_FEATURES:
            features[0] = body
        elif r == Request.SET_MEM_TABLE:
            assert isinstance(body, MemoryTable)
            for reg, fd in zip(body.regions, m.fds):
                mm = mmap.mmap(fd, reg.size, mmap.MAP_SHARED, offset=reg.mmap_offset)
                regions.append((reg.guest_addr, reg.size, reg.user_addr, mm, memoryview(mm)))
            m.close_fds()
        elif r == Request.SET_VRING_NUM:
            assert isinstance(body, VringState)
            ring["num"] = body.num
        elif r == Request.SET_VRING_BASE:
            assert isinstance(body, VringState)
            ring["last"] = ring["used_idx"] = body.num
        elif r == Request.SET_VRING_ADDR:
            assert isinstance(body, VringAddr)
            ring["desc"] = where(body.desc, True)
            ring["avail"] = where(body.avail, True)
            ring["used"] = where(body.used, True)
        elif r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            fd = m.take_fd()
            if r == Request.SET_VRING_KICK and fd is not None:
                kick.append(fd)
            elif r == Request.SET_VRING_CALL and fd is not None:
                call.append(fd)
            elif fd is not None:
                os.close(fd)
        m.close_fds()
        if reply is not None:
            conn.send(encode_reply(r, reply))
        elif m.need_reply:
            conn.send(encode_reply(r, 0))

    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    try:
        while True:
            for fd, _ev in p.poll():
                if fd == conn.fileno():
                    for m in conn.read():
                        handle(m)
                        if m.request == Request.SET_VRING_KICK and kick and \
                                len(kick) == 1 and "registered" not in ring:
                            ring["registered"] = True
                            p.register(kick[0], select.POLLIN)
                else:
                    serve()
    except Disconnected:
        return 0


# ---- backends ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendProcess:
    def __init__(self, target: str, image: str, fmt: str, cache: str, workdir: str,
                 profile: Optional[str] = None, tag: str = "") -> None:
        self.sock = os.path.join(workdir, f"{target}.sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        if target == "null":
            argv = [sys.executable, os.path.abspath(__file__), "--null-backend", self.sock]
        elif target == "pyhv":
            prof = ["-m", "cProfile", "-o", os.path.join(profile, f"pyhv-{fmt}-{tag}.prof")] \
                if profile else []
            argv = [sys.executable, *prof, "-m", "pyhv", "vhost-user-blk", "--socket",
                    self.sock, "--disk", image, "--format", fmt, "--cache", cache]
        else:
            direct = "on" if cache == "none" else "off"
            argv = ["qemu-storage-daemon", "--blockdev",
                    f"driver=file,node-name=f,filename={image},cache.direct={direct}"]
            node = "f"
            if fmt == "qcow2":
                argv += ["--blockdev", "driver=qcow2,node-name=q,file=f"]
                node = "q"
            argv += ["--export", f"type=vhost-user-blk,id=e,node-name={node},"
                     f"addr.type=unix,addr.path={self.sock},writable=on"]
        self.argv = argv
        self.log = open(os.path.join(workdir, f"{target}.log"), "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, cwd=str(ROOT))
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                die(f"{target} exited with {self.proc.returncode} before serving; see "
                    f"{self.log.name}")
            if os.path.exists(self.sock):
                try:
                    self.driver = Driver(self.sock)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() - t0 > 20:
                die(f"{target} did not open {self.sock}")
            time.sleep(0.02)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.log.closed:
            return
        self.driver.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---- streams and runs ---------------------------------------------------------------------

def offsets_for(case: Case, image_size: int, count: int = 1 << 16) -> list[int]:
    blocks = image_size // case.size
    if case.sequential:
        return [(i % blocks) * case.size for i in range(blocks)]
    rng = random.Random(1)
    return [rng.randrange(blocks) * case.size for _ in range(count)]


def timed(b: BackendProcess, case: Case, offsets: list[int], seconds: float,
          limit: Optional[int] = None) -> dict[str, float]:
    c0, d0, s0 = b.cpu(), time.process_time(), b.driver.stalls
    wall, n = b.driver.run(case, offsets, seconds, limit)
    c1, d1 = b.cpu(), time.process_time()
    return {"wall": wall, "requests": n, "rate": n / wall,
            "backend_cpu_us": (c1 - c0) / n * 1e6, "driver_cpu_us": (d1 - d0) / n * 1e6,
            "stalls": b.driver.stalls - s0}


def session(target: str, image: str, fmt: str, args: argparse.Namespace, workdir: str,
            image_size: int, tag: str) -> dict[str, dict[str, float]]:
    b = BackendProcess(target, image, fmt, args.cache, workdir, args.profile, tag)
    out: dict[str, dict[str, float]] = {}
    try:
        check_at = image_size - 64 * KiB
        if target != "null":
            pattern = b.driver.check_roundtrip(check_at)
            if fmt == "raw":
                with open(image, "rb") as f:
                    f.seek(check_at)
                    if f.read(len(pattern)) != pattern:
                        die(f"{target}: the check write is not in {image}")
        for case in CASES:
            if case.write:
                b.driver.fill(case.size * case.depth, 0x5A)
            out[case.name] = timed(b, case, offsets_for(case, image_size), args.seconds)
    except Stopped as e:
        b.close()
        with open(b.log.name, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        die(f"{target} ({fmt}): {e}; exit status {b.proc.returncode}; its log ends:\n{tail}")
    finally:
        b.close()
    return out


def firstwrite(target: str, workdir: str, args: argparse.Namespace, image_size: int,
               tag: str) -> dict[str, float]:
    path = os.path.join(workdir, "fresh.qcow2")
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, str(image_size)], check=True,
                   stdout=subprocess.DEVNULL)
    b = BackendProcess(target, path, "qcow2", args.cache, workdir, args.profile, tag)
    try:
        b.driver.fill(FIRSTWRITE.size, 0x5A)
        offs = offsets_for(FIRSTWRITE, image_size)
        r = timed(b, FIRSTWRITE, offs, args.seconds, limit=len(offs))
    finally:
        b.close()
    r["file_MiB"] = os.path.getsize(path) / MiB
    return r


def med(runs: list[dict[str, float]], key: str) -> float:
    return percentile([r[key] for r in runs], 50)


def fmt_rate(case: Case, rate: Optional[float]) -> str:
    if rate is None:
        return "-"
    if case.size >= 64 * KiB:
        return f"{rate * case.size / MiB:,.0f} MiB/s"
    return f"{rate / 1000:,.1f} k IOPS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128, help="image size in MiB")
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    ap.add_argument("--dir", default="/var/tmp", help="where the images are made")
    ap.add_argument("--no-firstwrite", action="store_true",
                    help="skip the first-write case on an empty qcow2 image")
    ap.add_argument("--profile", metavar="DIR",
                    help="run pyhv under cProfile, one .prof per session in DIR "
                         "(its figures are then not comparable)")
    ap.add_argument("--json", help="also write every run here")
    ap.add_argument("--null-backend", metavar="SOCK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.null_backend:
        return null_backend(args.null_backend)
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)

    image_size = args.size * MiB
    workdir = tempfile.mkdtemp(prefix="pyhv-bench-vub-", dir=args.dir)
    images = {"raw": os.path.join(workdir, "disk.raw"),
              "qcow2": os.path.join(workdir, "disk.qcow2")}
    runs: dict[str, list[dict[str, Any]]] = {}
    t_start = time.perf_counter()
    try:
        with open(images["raw"], "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", images["raw"],
                        images["qcow2"]], check=True)
        for path in images.values():                  # warm the page cache
            with open(path, "rb") as f:
                while f.read(MiB):
                    pass
        print(f"images {args.size} MiB raw and qcow2 in {args.dir}, cache={args.cache}, "
              f"{args.repeat} x {args.seconds:g} s per figure (median)", flush=True)
        for rep in range(args.repeat):
            runs.setdefault("null", []).append(
                session("null", images["raw"], "raw", args, workdir, image_size, f"{rep}"))
            for fmt in ("raw", "qcow2"):
                for target in (("pyhv", "qsd") if rep % 2 == 0 else ("qsd", "pyhv")):
                    runs.setdefault(f"{target}-{fmt}", []).append(
                        session(target, images[fmt], fmt, args, workdir, image_size,
                                f"{rep}"))
            if not args.no_firstwrite:
                for target in ("pyhv", "qsd"):
                    runs.setdefault(f"{target}-firstwrite", []).append(
                        firstwrite(target, workdir, args, image_size, f"fw{rep}"))
            print(f"  repeat {rep + 1}/{args.repeat} done "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def fig(key: str, case: str, what: str = "rate") -> Optional[float]:
        rs = runs.get(key)
        if not rs:
            return None
        return med([r[case] if case in r else r for r in rs], what)

    rows = []
    print()
    print(f"{'case':20} {'format':6} {'null':>14} {'pyhv':>14} {'qsd':>14} "
          f"{'pyhv/qsd':>8} {'cpu us/req pyhv':>15} {'qsd':>7} {'driver':>7}")
    for fmt in ("raw", "qcow2"):
        for case in CASES:
            null = fig("null", case.name)
            mine, theirs = fig(f"pyhv-{fmt}", case.name), fig(f"qsd-{fmt}", case.name)
            assert mine is not None and theirs is not None
            row = {"case": case.name, "format": fmt, "null": null, "pyhv": mine,
                   "qsd": theirs, "ratio": mine / theirs,
                   "pyhv_cpu_us": fig(f"pyhv-{fmt}", case.name, "backend_cpu_us"),
                   "qsd_cpu_us": fig(f"qsd-{fmt}", case.name, "backend_cpu_us"),
                   "driver_cpu_us": fig(f"pyhv-{fmt}", case.name, "driver_cpu_us"),
                   "null_cpu_us": fig("null", case.name, "backend_cpu_us")}
            rows.append(row)
    if not args.no_firstwrite:
        mine, theirs = fig("pyhv-firstwrite", ""), fig("qsd-firstwrite", "")
        assert mine is not None and theirs is not None
        rows.append({"case": FIRSTWRITE.name, "format": "qcow2*", "null": None,
                     "pyhv": mine, "qsd": theirs, "ratio": mine / theirs,
                     "pyhv_cpu_us": fig("pyhv-firstwrite", "", "backend_cpu_us"),
                     "qsd_cpu_us": fig("qsd-firstwrite", "", "backend_cpu_us"),
                     "driver_cpu_us": fig("pyhv-firstwrite", "", "driver_cpu_us"),
                     "null_cpu_us": None})
    for row in rows:
        case = FIRSTWRITE if row["case"] == FIRSTWRITE.name else \
            next(c for c in CASES if c.name == row["case"])
        print(f"{row['case']:20} {row['format']:6} {fmt_rate(case, row['null']):>14} "
              f"{fmt_rate(case, row['pyhv']):>14} {fmt_rate(case, row['qsd']):>14} "
              f"{row['ratio']:8.2f} {row['pyhv_cpu_us']:15.1f} {row['qsd_cpu_us']:7.1f} "
              f"{row['driver_cpu_us']:7.1f}")
    if not args.no_firstwrite:
        print("qcow2*: a fresh empty qcow2 image per run (allocating writes)")
    stalls = sum(v["stalls"] if "stalls" in v else 0 for rs in runs.values() for r in rs
                 for v in (r.values() if "rate" not in r else [r]))
    if stalls:
        print(f"note: {stalls} waits for a call ended on the 10 ms timeout")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
