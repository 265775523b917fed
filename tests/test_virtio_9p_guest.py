"""Tier kvm: the test guest's own modern virtio-pci driver for virtio-9p
(``pyhv.virtio-9p=msix`` and ``=intx``) runs on the virtio-9p function (1af4:1049)
pyhv builds for a ``FilesystemConfig`` (tag ``hostshare``, passthrough), on a pc
machine (the function on the root bus) and on a q35 machine (behind a
``pcie-root-port``).  The guest (virtio 1.2 5.11) negotiates VERSION_1 and MOUNT_TAG,
reads the tag from the device configuration, sets up queue 0 and talks 9P2000.L, one
request at a time (a chain of the T-message, readable, and room for the R-message,
writable): Tversion (msize 8192), Tattach (fid 1), Twalk to ``hello.txt``, Tlopen,
Tread (the data's checksum, compared with the file this test put there), Tclunk, a
Twalk clone of the root, Tlcreate ``from-guest.txt`` and Twrite (its payload a
second readable buffer), Tfsync, Tclunk, Tgetattr of the root, Twalk
``.. .. etc`` (which must stay at the export root: ``etc`` is not there, so Rwalk
with two qids, both the root's), Treaddir of the root, then a Tgetattr whose size
field claims 16 bytes more than the chain holds (pyhv answers nothing: used length 0)
and the same request told truthfully, then a reset.  The host directory is checked
afterwards: ``from-guest.txt`` holds the guest's bytes.  On a read-only export the
Tlcreate comes back as Rlerror EROFS (30), the guest skips the write and fsync, and
nothing appears on the host.

Tier qemu: the same guest under QEMU (``-fsdev local,security_model=passthrough
-device virtio-9p-pci,disable-legacy=on,mount_tag=hostshare``) meets the same checks
and gives the same answers where the protocol fixes them.

Left out of the comparison, each for its reason (``EXCLUDED``, ``NORMALIZED``):

* as for virtio-rng (``test_virtio_guest.py``): poll counts, the firmware's command
  register, BAR placement and interrupt line, features offered beyond those the
  driver takes (QEMU 7.2 also offers RING_RESET);
* qids' ``qid_version`` and ``qid_path``: a server's choice (QEMU 7.2 derives the
  version from the mtime, pyhv sends 0; both derive the path from the inode, QEMU
  remapping device bits); the walk's ``at_root`` (qids with the root's type and path)
  is compared instead;
* ``iounit`` (Rlopen, Rlcreate): a server's hint (QEMU 7.2: the file's st_blksize,
  4096 here, 0 for a directory; pyhv: msize - 24);
* the order of Treaddir's entries (``names``): the host's readdir order, compared as
  a set;
* interrupt counts (``irqs``, ``hits`` at ``stop``), the device's timing;
* the request whose size field lies (``lie``): QEMU 7.2 reads the fields it needs
  and ignores the size, so it answers Rgetattr (used length 160); pyhv takes a chain
  whose readable bytes are not exactly one message as broken and returns it with used
  length 0 (the request fails alone).  Both answer the next request.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from guests.report import Report, StepValue, VirtioFunction, initrd_checksum, parse_report
from test_virtio_guest import (
    ASKED_QUEUE_SIZE,
    MODES,
    NO_VECTOR,
    POLL_LIMIT,
    RING_OFFSETS,
    ROOT_PORT,
    VERSION_1_HI,
    check_bring_up,
    check_vectors,
    num,
    only_bits,
)

from pyhv.config import (
    ControllerConfig,
    FilesystemConfig,
    KernelBoot,
    PciAddress,
    SerialConfig,
    VmConfig,
)
from pyhv.engine.machine import Machine, MachineEvent
from pyhv.engine.pci.root import bdf_text
from pyhv.engine.virtio.pci import VirtioPciFunction

pytestmark = pytest.mark.kvm

MiB = 1 << 20
DEVICE_ID = "1af4:1049"
TAG = "hostshare"
MOUNT_TAG_LO = 1 << 0  # VIRTIO_9P_MOUNT_TAG
HELLO = b"hello from the host, for the 9p test\n"
WRITTEN = b"written by the guest\n"
MSIZE = 8192
EROFS = 30
QTDIR = 0x80
# 9P2000.L R-message types
RLERROR, RLOPEN, RLCREATE, RGETATTR, RREADDIR, RFSYNC = 7, 13, 15, 25, 41, 51
RVERSION, RATTACH, RWALK, RREAD, RWRITE, RCLUNK = 101, 105, 111, 117, 119, 121
GETATTR_BASIC = 0x7FF
NOTAG = 0xFFFF

#: machine type, controllers, where the 9p function goes, where the guest finds it
MACHINES: dict[str, tuple[str, tuple[ControllerConfig, ...], PciAddress, str]] = {
    "pc": ("pc", (), PciAddress(0, 2, 0), "00:02.0"),
    "q35": ("q35", (ROOT_PORT,), PciAddress(1, 0), "01:00.0"),
}
QEMU_DEVICES = {
    "pc": ["-device", f"virtio-9p-pci,fsdev=f,mount_tag={TAG},disable-legacy=on,bus=pci.0,"
                      "addr=0x2"],
    "q35": ["-device", "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2",
            "-device", f"virtio-9p-pci,fsdev=f,mount_tag={TAG},disable-legacy=on,bus=pci.1,"
                       "addr=0x0"],
}
CASES = [(name, mode) for name in MACHINES for mode in MODES]
CASE_IDS = [f"{name}-{mode}" for name, mode in CASES]

#: each request step, the R-message it must bring (read-write export)
REPLIES = {
    "version": RVERSION, "attach": RATTACH, "walk": RWALK, "lopen": RLOPEN, "read": RREAD,
    "clunk-file": RCLUNK, "walk-new": RWALK, "lcreate": RLCREATE, "write": RWRITE,
    "fsync": RFSYNC, "clunk-new": RCLUNK, "getattr": RGETATTR, "walk-dotdot": RWALK,
    "walk-dir": RWALK, "lopen-dir": RLOPEN, "readdir": RREADDIR, "clunk-dir": RCLUNK,
    "after-lie": RGETATTR,
}


def steps(mode: str, readonly: bool = False) -> list[str]:
    created = [] if readonly else ["write", "fsync"]
    return ["caps", "map", "enable", "reset", "acknowledge", "driver", "features",
            "features-ok", mode, "p9-config", "queue", "driver-ok", "version", "attach",
            "walk", "lopen", "read", "clunk-file", "walk-new", "lcreate", *created,
            "clunk-new", "getattr", "walk-dotdot", "walk-dir", "lopen-dir", "readdir",
            "clunk-dir", "lie", "after-lie", "stop"]


def cmdline(mode: str) -> str:
    return f"console=ttyS0 pyhv.pci pyhv.virtio-9p={mode}"


def make_export(root: Path) -> Path:
    export = root / "export"
    export.mkdir()
    export.chmod(0o755)
    (export / "hello.txt").write_bytes(HELLO)
    return export


# ---- running the guest -------------------------------------------------------------------

@dataclass
class Run:
    output: str
    report: Report
    export: Path
    bdf: str
    seconds: float
    event: Optional[MachineEvent] = None
    fn: Optional[VirtioPciFunction] = None
    stderr: str = ""


def run_pyhv(kernel: Path, tmp: Path, name: str, mode: str, readonly: bool = False,
             cmd: str = "", upper: Optional[Path] = None) -> Run:
    """With ``upper``: the export is a read-only lower tree under that writable top
    layer (novm's packs, what ``pyhv create`` builds for several trees)."""
    machine, controllers, address, _bdf = MACHINES[name]
    out, export = tmp / "pyhv.txt", make_export(tmp)
    fs = FilesystemConfig(str(export), TAG, accessmode="passthrough", readonly=readonly,
                          address=address)
    if upper is not None:
        fs = FilesystemConfig(str(upper), TAG, accessmode="passthrough", readonly=readonly,
                              address=address, lower=(str(export),))
    cfg = VmConfig(
        KernelBoot(str(kernel), cmdline=cmd or cmdline(mode)), memory=64 * MiB, vcpus=1,
        serial=SerialConfig("file", str(out)), machine=machine, controllers=controllers,
        filesystems=(fs,))
    m = Machine(cfg)
    start = time.monotonic()
    try:
        m.start(paused=True)
        plat = m.platform
        assert plat is not None and plat.pci is not None
        (bdf, fn), = [(bdf_text(b, d), f) for b, d, f, _p in plat.pci.root.walk()
                      if isinstance(f, VirtioPciFunction)]
        m.resume()
        event = m.run(timeout=60)
    finally:
        m.close()
    text = out.read_text(errors="replace")
    return Run(text, parse_report(text), export, bdf, time.monotonic() - start, event=event,
               fn=fn)


def run_qemu(kernel: Path, tmp: Path, name: str, mode: str, readonly: bool = False) -> Run:
    out, export = tmp / "qemu.txt", make_export(tmp)
    ro = ",readonly=on" if readonly else ""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-machine", MACHINES[name][0],
            "-m", "64", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", f"file:{out}", "-device", "isa-debug-exit,iobase=0xf4",
            "-kernel", str(kernel), "-append", cmdline(mode),
            "-fsdev", f"local,id=f,path={export},security_model=passthrough{ro}",
            *QEMU_DEVICES[name]]
    start = time.monotonic()
    # SeaBIOS runs in emulated real mode on PVM: seconds before the guest starts
    done = subprocess.run(argv, timeout=300, check=False, capture_output=True, text=True)
    text = out.read_text(errors="replace")
    return Run(text, parse_report(text), export, MACHINES[name][3], time.monotonic() - start,
               stderr=done.stderr)


def the_function(r: Report, output: str, name: str, mode: str,
                 readonly: bool = False) -> VirtioFunction:
    """The report is complete and clean, with the virtio-9p function where it belongs,
    having taken the steps ``steps(mode, readonly)``."""
    assert r.complete, output[-3000:]
    assert not r.errors and not r.exceptions, (r.errors, r.exceptions)
    assert [(v.bdf, v.id, v.mode) for v in r.virtio] == [(MACHINES[name][3], DEVICE_ID, mode)]
    assert r.virtio_end == {"devices": 1, "mode": mode}
    v = r.virtio[0]
    assert v.step_names == steps(mode, readonly), v.step_names
    for step_name, f in v.steps:
        for k, val in f.items():
            if k == "polls" or k.endswith("_polls"):
                assert isinstance(val, int) and val < POLL_LIMIT, \
                    f"{step_name}: the poll for {k} never saw its condition"
    return v


# ---- what the specifications say ------------------------------------------------------------

def check_transport(v: VirtioFunction, mode: str) -> None:
    """virtio 1.2 4.1 (the PCI transport) and 5.11 (the 9P device)."""
    s = v.step
    check_bring_up(s, mode)
    f = s("features")
    assert num(f["device_lo"]) & MOUNT_TAG_LO and num(f["device_hi"]) & VERSION_1_HI
    assert (f["accepted_lo"], f["accepted_hi"]) == (MOUNT_TAG_LO, VERSION_1_HI)
    assert (f["driver_lo"], f["driver_hi"]) == (MOUNT_TAG_LO, VERSION_1_HI)
    check_vectors(s, mode)
    c = s("p9-config")
    assert (c["tag_len"], c["tag"], c["mount_tag"], c["stable"]) == (len(TAG), TAG, 1, 1)
    q = s("queue")
    ring = num(q["ring"])
    assert (q["index"], q["num_queues"], q["vector_before"], q["enable"]) == \
        (0, 1, NO_VECTOR, 1)
    assert q["size"] == min(num(q["max_size"]), ASKED_QUEUE_SIZE)
    assert q["vector"] == (0 if mode == "msix" else NO_VECTOR)
    assert (q["desc"], q["driver"], q["device"]) == tuple(ring + o for o in RING_OFFSETS)
    d = s("driver-ok")
    assert (d["status"], d["pcicfg_status"], d["intsts"]) == (0xF, 0xF, 0)
    st = s("stop")
    assert st["status"] == 0 and num(st["msix_control"]) & 0x8000 == 0
    assert st["cfg_irqs"] == 0
    if mode == "msix":
        assert num(st["irqs"]) >= 1 and st["isr_all"] == 0
    else:
        assert num(st["hits"]) >= 1 and st["isr_all"] == 0x1


def check_9p(v: VirtioFunction, readonly: bool = False) -> None:
    """9P2000.L as the guest sees it: every request answered in turn, with its tag and
    the R-message of its type, the file's bytes, confinement at the export root."""
    s = v.step
    requests = [(n, f) for n, f in v.steps if "ttag" in f]
    tags = [f["ttag"] for _n, f in requests]
    assert tags == [NOTAG, *range(1, len(requests))], tags
    size = num(s("queue")["size"])
    for i, (n, f) in enumerate(requests, 1):
        assert (f["used_idx"], f["used_id"]) == (i, 0), (n, f)
        assert f["descs"] == (3 if n == "write" else 2), (n, f)
        assert i <= 0xFFFF and size >= 3
        if n == "lie":
            continue
        want = RLERROR if (readonly and n == "lcreate") else REPLIES[n]
        assert (f["type"], f["tag"]) == (want, f["ttag"]), (n, f)
        assert f["size"] == f["used_len"], (n, f)         # one message, all of it written
    vs = s("version")
    assert (vs["msize"], vs["version"]) == (MSIZE, "9P2000.L")
    root = s("attach")
    assert root["qid_type"] == QTDIR
    w = s("walk")
    assert (w["nwqid"], w["at_root"], w["qid_type"]) == (1, 0, 0)
    assert s("lopen")["qid_type"] == 0
    r = s("read")
    assert (r["count"], r["csum"]) == (len(HELLO), initrd_checksum(HELLO))
    assert r["data"] == HELLO.decode()
    assert (s("walk-new")["nwqid"], s("walk-dir")["nwqid"]) == (0, 0)
    lc = s("lcreate")
    if readonly:
        assert lc["ecode"] == EROFS, lc
    else:
        assert lc["qid_type"] == 0
        assert s("write")["count"] == len(WRITTEN)
    g = s("getattr")
    assert (g["valid"], g["qid_type"], g["ftype"]) == (GETATTR_BASIC, QTDIR, 4)
    assert num(g["mode"]) & 0o7777 == 0o755 and stat.S_ISDIR(num(g["mode"]))
    assert (g["qid_path"], g["uid"], g["gid"]) == (root["qid_path"], os.getuid(), os.getgid())
    # '..' at the export root is the root: two qids, both the root's, then no "etc"
    dd = s("walk-dotdot")
    assert (dd["type"], dd["nwqid"], dd["at_root"], dd["qid_type"]) == (RWALK, 2, 2, QTDIR), dd
    assert s("lopen-dir")["qid_type"] == QTDIR
    rd = s("readdir")
    names = sorted(str(rd["names"]).split(","))
    listed = [".", "..", "hello.txt"] + ([] if readonly else ["from-guest.txt"])
    assert names == sorted(listed) and rd["entries"] == len(listed), rd
    after = s("after-lie")
    assert (after["type"], after["mode"], after["qid_path"]) == \
        (RGETATTR, g["mode"], root["qid_path"])


def check_host(run: Run, readonly: bool) -> None:
    """The export directory afterwards."""
    files = sorted(os.listdir(run.export))
    assert (run.export / "hello.txt").read_bytes() == HELLO
    if readonly:
        assert files == ["hello.txt"], files
    else:
        assert files == ["from-guest.txt", "hello.txt"], files
        assert (run.export / "from-guest.txt").read_bytes() == WRITTEN


# ---- under pyhv ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "mode"), CASES, ids=CASE_IDS)
def test_virtio_9p_driver_under_pyhv(guests, tmp_path, name, mode):
    run = run_pyhv(guests.pvh_elf, tmp_path, name, mode)
    assert run.event is not None and run.event.kind == "powered-off", run.output[-3000:]
    v = the_function(run.report, run.output, name, mode)
    assert run.bdf == v.bdf
    check_transport(v, mode)
    check_9p(v)
    # pyhv: a chain whose size field lies is returned empty, and the session goes on
    lie = v.step("lie")
    assert (lie["used_len"], lie["type"]) == (0, "none"), lie
    assert v.step("lcreate")["iounit"] == MSIZE - 24
    check_host(run, readonly=False)
    fn = run.fn
    assert fn is not None
    f = v.step("features")
    assert num(f["device_lo"]) | num(f["device_hi"]) << 32 == fn.offered
    assert fn.status == 0 and not fn.msix.enabled            # the guest reset it
    print(f"{name}-{mode}: {run.seconds:.2f} s under pyhv")


def test_virtio_9p_driver_over_layered_trees(guests, tmp_path):
    """The export as a read-only lower tree under a writable top layer: the guest
    reads hello.txt from the lower tree, its new file lands in the top layer, and
    the lower tree is left as it was."""
    upper = tmp_path / "upper"
    upper.mkdir()
    run = run_pyhv(guests.pvh_elf, tmp_path, "pc", "msix", upper=upper)
    assert run.event is not None and run.event.kind == "powered-off", run.output[-3000:]
    v = the_function(run.report, run.output, "pc", "msix")
    check_9p(v)
    assert sorted(os.listdir(run.export)) == ["hello.txt"]
    assert (run.export / "hello.txt").read_bytes() == HELLO
    assert sorted(os.listdir(upper)) == ["from-guest.txt"]
    assert (upper / "from-guest.txt").read_bytes() == WRITTEN


@pytest.mark.parametrize("mode", MODES)
def test_virtio_9p_readonly_under_pyhv(guests, tmp_path, mode):
    run = run_pyhv(guests.pvh_elf, tmp_path, "q35", mode, readonly=True)
    assert run.event is not None and run.event.kind == "powered-off", run.output[-3000:]
    v = the_function(run.report, run.output, "q35", mode, readonly=True)
    check_transport(v, mode)
    check_9p(v, readonly=True)
    check_host(run, readonly=True)


def test_rng_switch_leaves_the_9p_device_alone(guests, tmp_path):
    """``pyhv.virtio=msix`` without ``pyhv.virtio-9p``: the 9p function is listed as
    skipped (type 9), nothing is written to the export."""
    run = run_pyhv(guests.pvh_elf, tmp_path, "q35", "msix",
                   cmd="console=ttyS0 pyhv.pci pyhv.virtio=msix")
    r = run.report
    assert r.complete and not r.errors and not r.exceptions, run.output[-3000:]
    assert [(v.bdf, v.id, v.mode) for v in r.virtio] == [("01:00.0", DEVICE_ID, "none")]
    assert r.virtio[0].steps == [("skipped", {"type": 9})]
    assert sorted(os.listdir(run.export)) == ["hello.txt"]


# ---- under QEMU --------------------------------------------------------------------------------

QEMU_CASES = [(name, mode, False) for name, mode in CASES] + [("q35", "msix", True)]
QEMU_IDS = [f"{name}-{mode}{'-ro' if ro else ''}" for name, mode, ro in QEMU_CASES]


@pytest.fixture(scope="module")
def qemu_runs(guests, tmp_path_factory) -> Callable[[str, str, bool], Run]:
    """QEMU's run of each case, made once for the module's tests."""
    done: dict[tuple[str, str, bool], Run] = {}

    def get(name: str, mode: str, readonly: bool) -> Run:
        if (name, mode, readonly) not in done:
            tmp = tmp_path_factory.mktemp(f"qemu-{name}-{mode}")
            done[name, mode, readonly] = run_qemu(guests.pvh_elf, tmp, name, mode, readonly)
        return done[name, mode, readonly]
    return get


#: (step, field) left out of the pyhv/QEMU comparison (reasons: the module docstring)
EXCLUDED = {
    ("map", "base"), ("map", "map"), ("enable", "cmd"), ("intx", "line"),
    ("intx", "ioapic_pin"), ("reset", "queue_size"), ("queue", "max_size"),
    ("stop", "irqs"), ("stop", "hits"), ("readdir", "names"),
}
EXCLUDED_KEYS = {"qid_version", "qid_path", "iounit"}

#: (step, field) compared in part
NORMALIZED: dict[tuple[str, str], Callable[[StepValue], StepValue]] = {
    ("enable", "now"): only_bits(0x406),
    ("features", "device_lo"): only_bits(MOUNT_TAG_LO),
    ("features", "device_hi"): only_bits(VERSION_1_HI),
    ("msix", "control"): only_bits(0xC000),
    ("intx", "msix_control"): only_bits(0xC000),
    ("stop", "msix_control"): only_bits(0xC000),
}


def comparable(v: VirtioFunction) -> list[tuple[str, dict[str, StepValue]]]:
    out = []
    for step_name, fields in v.steps:
        if step_name == "lie":
            continue
        kept: dict[str, StepValue] = {}
        for k, val in fields.items():
            if k == "polls" or k.endswith("_polls") or (step_name, k) in EXCLUDED or \
                    k in EXCLUDED_KEYS:
                continue
            kept[k] = NORMALIZED.get((step_name, k), lambda x: x)(val)
        if step_name == "readdir" and "names" in fields:
            kept["names"] = ",".join(sorted(str(fields["names"]).split(",")))
        out.append((step_name, kept))
    return out


def differences(mine: VirtioFunction, theirs: VirtioFunction) -> list[str]:
    """Every raw field that differs (the excluded and normalized ones included)."""
    notes = []
    for (sname, f), (_m, g) in zip(mine.steps, theirs.steps):
        for k in sorted(set(f) | set(g)):
            if f.get(k) != g.get(k) and k != "polls" and not k.endswith("_polls"):
                notes.append(f"{sname} {k}: pyhv {f.get(k)!r} QEMU {g.get(k)!r}")
    return notes


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "mode", "readonly"), QEMU_CASES, ids=QEMU_IDS)
def test_virtio_9p_driver_under_qemu(qemu_runs, name, mode, readonly):
    """The guest's driver against QEMU's device: what the protocol fixes."""
    run = qemu_runs(name, mode, readonly)
    v = the_function(run.report, run.output, name, mode, readonly)
    check_transport(v, mode)
    check_9p(v, readonly)
    check_host(run, readonly)
    print(f"{name}-{mode}: {run.seconds:.2f} s under QEMU")


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "mode", "readonly"), QEMU_CASES, ids=QEMU_IDS)
def test_same_answers_as_qemu(qemu_runs, guests, tmp_path, name, mode, readonly):
    theirs_run = qemu_runs(name, mode, readonly)
    mine_run = run_pyhv(guests.pvh_elf, tmp_path, name, mode, readonly)
    theirs = the_function(theirs_run.report, theirs_run.output, name, mode, readonly)
    mine = the_function(mine_run.report, mine_run.output, name, mode, readonly)
    assert comparable(mine) == comparable(theirs)
    # both answer the request after the lie; QEMU also answers the lie itself
    assert theirs.step("lie")["type"] == RGETATTR and mine.step("lie")["used_len"] == 0
    print("\n".join([f"{name}-{mode}: pyhv {mine_run.seconds:.2f} s, "
                     f"QEMU {theirs_run.seconds:.2f} s; differences left out:",
                     *differences(mine, theirs)]))
