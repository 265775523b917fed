"""Tier kvm: PCI Express native hotplug on a q35 machine's empty ``pcie-root-port``,
driven by the test guest's own polling hotplug driver (``pyhv.hotplug``, written from
the PCI Express Base Specification 7.5.3.6-7.5.3.11 and 6.7, in the manner of Linux's
pciehp; see ``tests/guests/README.md``).  The guest finds the first root port whose slot
is hot-plug capable and empty (``scan``), clears stale events and enables Presence
Detect Changed, Attention Button Pressed and Data Link Layer State Changed with the
Hot-Plug Interrupt Enable, power as found (``ready``: the host's cue to add the card);
waits for Presence Detect Changed (``added``; the port's INTx must be pending, seen in
its PCI Status Interrupt Status bit, and gone once the events are cleared; both VMMs
raise Attention Button Pressed with it, the slot being off, which is what Linux's
pciehp waits for on a slot with a button: it enables no presence events); powers the
slot on and waits for the link (``powered``); reads the card, places its BARs in the
port's windows and reads the virtio-blk capacity from the device configuration
(``device``; ``unplug-ready``: the host's cue to ask for the card back); waits for the
Attention Button (``button``), turns the card's decoding off and powers the slot off
with its indicator off, as pciehp does, and waits for Presence Detect State to drop
(``removed``: configuration reads below the port float, vendor 0xffff).

Under pyhv the host side is ``Machine.add_device(DiskConfig(...))`` at ``ready`` and
``Machine.remove_device("hpdisk")`` at ``unplug-ready``, both called on the thread that
runs the machine's event loop (a timer on that loop watches the serial output), and the
machine must tell its subscribers ``MachineEvent("device-deleted", "hpdisk")``.

Tier qemu: the same guest under QEMU (``-device pcie-root-port,...,slot=1``; QMP
``blockdev-add`` and ``device_add`` at ``ready``, ``device_del`` at ``unplug-ready``;
``DEVICE_DELETED`` must arrive) meets the same checks.  QEMU 7.2's q35 hands hotplug on
its root ports to ACPI by default (``ICH9-LPC.acpi-pci-hotplug-with-bridge-support``:
the card is powered by QEMU and announced through a GPE, the slot's registers never
change), so the run turns that off with ``-global`` to get the native slot that pyhv
builds.  pyhv's report must equal QEMU's where the specification fixes it.  Left out of
the comparison, each for its reason (``EXCLUDED``, ``NORMALIZED``):

* timing: every ``polls`` and ``cc_polls`` count;
* firmware (SeaBIOS under QEMU, pyhv's own set-up under pyhv): the port's command
  register as found (``cmd``; after the guest turned memory and bus mastering on,
  ``port_cmd`` is compared in those two bits), the secondary bus number (``sec``) and
  so the card's ``bdf``, the port's I/O, memory and prefetchable windows and the
  addresses the guest gave the card's BARs inside them (each BAR's size and window,
  ``barN_win``, are compared);
* the port model's capability layout (``cap``, the offset of the PCI Express
  capability);
* the physical slot number (``psn``, Slot Capabilities bits 31:19): given on QEMU's
  command line (``slot=1``), while pyhv's ``ControllerConfig`` has none (libvirt writes
  none for a pcie-root-port either);
* two Slot Capabilities the port may declare or not and this driver does not use:
  Hot-Plug Surprise (bit 5, ``hps``) and Electromechanical Interlock Present (bit 17),
  both set by QEMU 7.2, neither by pyhv; the rest of Slot Capabilities (the button,
  power controller, indicators, HPC, NCCS, the power limit) is compared;
* the link's speed and width (Link Capabilities and Link Status apart from Data Link
  Layer Link Active Reporting Capable, bit 20, and Data Link Layer Link Active, bit 13):
  QEMU 7.2's root port reports its own widths and speeds, pyhv an x1 link at 2.5 GT/s;
* where QEMU 7.2 departs from the specification (measured; pyhv is held to the
  specification instead, ``check_strict``): its port reports DLLLARC but keeps Slot
  Control's DLLSCE (bit 12) read-only 0 and never raises Data Link Layer State Changed
  (7.5.3.10-11), so ``dllsc``, Slot Status bit 8 and Slot Control bit 12 are left out
  everywhere, and the port's INTx after power-on (``powered intsts``: pyhv's DLLSC);
  on ``device_add`` it reports the link active although the slot's power is off
  (``added dllla``, ``lnksta``); the Presence Detect Changed of the
  removal does not assert its INTx although PDCE and HPIE are set (``removed intsts``:
  0 under QEMU, 6.7.3.4 asks for 1).

What QEMU 7.2's root port shows (this host, 2026-11-29): Slot Capabilities 0xa007b (ABP,
PCP, AIP, PIP, HPS, HPC, NCCS 0, physical slot 1), Link Capabilities 0x10300604
(DLLLARC); the empty slot's Slot Control 0x7c0 (power off, both indicators off), Slot
Status 0, Link Status 0x204; after ``ready`` Slot Control 0x7e9 (0x17e9 written); on
``device_add`` Slot Status 0x49 (PDS, PDC, ABP), Link Status 0x2011, INTx pending, and
0x40 once the events are cleared; power on (0x1e9 written: PCC 0, power indicator on)
completes at once, the link already up; on ``device_del`` Slot Status 0x41 (ABP); power
off (0x7e9 written) takes the card out within the command: Slot Status 0x8 (PDC), Link
Status 0x204, vendor 0xffff below the port; every command's Command Completed is set
by the time the guest reads Slot Status; ``DEVICE_DELETED`` comes from QEMU's main loop
after the card is finalized, after the guest's power-off if that follows at once, hence
``-no-shutdown`` and a ``quit`` once it came.  A run takes about 3 s under QEMU (SeaBIOS)
and 0.25 s under pyhv.
"""

from __future__ import annotations

import functools
import json
import queue
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from engine_helpers import unix_client
from guests.report import Report, StepValue, parse_report

from pyhv.config import (
    ControllerConfig,
    DiskConfig,
    KernelBoot,
    PciAddress,
    SerialConfig,
    VmConfig,
)
from pyhv.engine.eventloop import EventLoop
from pyhv.engine.machine import Machine, MachineEvent

pytestmark = pytest.mark.kvm

MiB = 1 << 20
SECTOR = 512
IMAGE_SIZE = 1 * MiB
CAPACITY = IMAGE_SIZE // SECTOR
CMDLINE = "console=ttyS0 pyhv.hotplug"
DISK_ID = "hpdisk"
HOST_TIMEOUT = 120.0        # the whole run (QEMU's SeaBIOS alone takes seconds here)
STEPS = ["scan", "ready", "added", "powered", "device", "unplug-ready", "button", "removed"]
POLL_FAIL = 0xFFFFFFFF      # the guest's bound: a poll that never saw its condition
VIRTIO_BLK = (0x1AF4, 0x1042)
CLASS_SCSI = 0x010000       # virtio-blk's class code (mass storage, SCSI)

# Slot Capabilities, Control and Status; Link Capabilities and Status
SLTCAP_ABP, SLTCAP_PCP, SLTCAP_HPC = 1 << 0, 1 << 1, 1 << 6
SLTCAP_HPS, SLTCAP_EIP, SLTCAP_PSN = 1 << 5, 1 << 17, 0x1FFF << 19
SLTCTL_ABPE, SLTCTL_PDCE, SLTCTL_HPIE, SLTCTL_DLLSCE = 1 << 0, 1 << 3, 1 << 5, 1 << 12
SLTCTL_PIC, SLTCTL_PCC = 3 << 8, 1 << 10
PIC_ON, PIC_OFF = 1 << 8, 3 << 8
SLTSTA_EVENTS = 0x011F      # ABP PFD MRLSC PDC CC DLLSC
SLTSTA_ABP, SLTSTA_PDC, SLTSTA_DLLSC = 1 << 0, 1 << 3, 1 << 8
LNKCAP_DLLLARC, LNKSTA_DLLLA = 1 << 20, 1 << 13
ENABLED_ALL = SLTCTL_ABPE | SLTCTL_PDCE | SLTCTL_HPIE   # what every port must take

#: pyhv: the q35 machine's only root port (bus 1), empty
ROOT_PORT = ControllerConfig("pci", "pcie-root-port", 1, address=PciAddress(0, 2, 0),
                             port=0x10, chassis=1)
#: QEMU: the same port, as the task gives it
QEMU_ROOT_PORT = "pcie-root-port,id=rp1,chassis=1,slot=1,port=0x10,bus=pcie.0,addr=0x2"

Steps = list[tuple[str, dict[str, StepValue]]]


def make_image(path: Path) -> None:
    data = bytearray(IMAGE_SIZE)
    data[:SECTOR] = (b"PYHV hotplug disk " * 32)[:SECTOR]
    path.write_bytes(bytes(data))


def hotplug_steps(r: Report) -> Steps:
    """The ``@hotplug`` lines as (step, fields) in order."""
    return [(str(ln.fields.get("step")), {k: v for k, v in ln.fields.items() if k != "step"})
            for ln in r.tagged("hotplug")]


class Cues:
    """Watches the guest's serial output file for complete ``@hotplug`` lines and
    hands out each step name once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: set[str] = set()

    def new(self) -> list[str]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        found = []
        for ln in text.splitlines(keepends=True):
            if ln.startswith("@hotplug step=") and ln.endswith("\n"):
                name = ln.split()[1].partition("=")[2]
                if name not in self.seen:
                    self.seen.add(name)
                    found.append(name)
        return found


@dataclass
class Run:
    output: str
    report: Report
    #: what the host did at each cue, and the answer (QMP reply; pyhv: None or the error)
    actions: list[tuple[str, object]] = field(default_factory=list)
    #: QEMU: QMP events (dicts); pyhv: (kind, detail) of every MachineEvent
    events: list[Any] = field(default_factory=list)
    end: str = ""
    seconds: float = 0.0

    @property
    def steps(self) -> Steps:
        return hotplug_steps(self.report)


# ---- under pyhv ------------------------------------------------------------------------------

def run_pyhv(kernel: Path, tmp: Path) -> Run:
    """The guest on a q35 machine with one empty root port; the card is added and
    removed from a timer on the machine's own event loop (its owning thread)."""
    out, image = tmp / "pyhv.txt", tmp / "hp.img"
    make_image(image)
    cfg = VmConfig(KernelBoot(str(kernel), cmdline=CMDLINE), memory=64 * MiB, vcpus=1,
                   serial=SerialConfig("file", str(out)), machine="q35",
                   controllers=(ROOT_PORT,))
    run = Run("", Report())
    m = Machine(cfg)
    loop = EventLoop()
    cues = Cues(out)
    owner = threading.get_ident()

    def record(ev: MachineEvent) -> None:   # never raises: it runs in the machine's loop
        run.events.append((ev.kind, str(ev.detail)))

    def act(name: str, work: Callable[[], object]) -> None:
        try:
            assert threading.get_ident() == owner
            run.actions.append((name, work()))
        except Exception as e:  # noqa: BLE001 - recorded, the test fails on it
            run.actions.append((name, f"error: {e!r}"))

    def watch() -> None:
        for cue in cues.new():
            if cue == "ready":
                disk = DiskConfig(str(image), id=DISK_ID, address=PciAddress(1, 0))
                act("add_device", functools.partial(m.add_device, disk))
            elif cue == "unplug-ready":
                act("remove_device", functools.partial(m.remove_device, DISK_ID))
        if not m.finished:
            loop.call_later(0.02, watch, "hotplug cues")

    m.subscribe(record)
    start = time.monotonic()
    try:
        m.start()
        m.attach(loop)
        loop.call_later(0.02, watch, "hotplug cues")
        ev = m.run(timeout=HOST_TIMEOUT)
        run.end = f"{ev.kind} {ev.detail}"
    finally:
        m.close()
        loop.close()
    run.seconds = time.monotonic() - start
    run.output = out.read_text(errors="replace")
    run.report = parse_report(run.output)
    return run


# ---- under QEMU ------------------------------------------------------------------------------

class Qmp:
    """QEMU's QMP monitor, capabilities negotiated; a reader thread keeps every event
    (with its data) while ``command`` waits for its own reply."""

    def __init__(self, path: str, deadline: float) -> None:
        self.sock = unix_client(path, deadline)
        self.rfile = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.replies: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self.rfile.readline()                             # the greeting
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.command("qmp_capabilities")

    def seen(self, event: str, device: Optional[str] = None) -> bool:
        """Whether ``event`` came (for ``device``, when given)."""
        return any(e.get("event") == event and
                   (device is None or e.get("data", {}).get("device") == device)
                   for e in list(self.events))

    def _read(self) -> None:
        try:
            for raw in self.rfile:
                msg = json.loads(raw)
                if "event" in msg:
                    self.events.append(msg)
                else:
                    self.replies.put(msg)
        except (OSError, ValueError):
            pass
        self.replies.put(None)

    def command(self, execute: str, arguments: Optional[dict[str, object]] = None) -> object:
        msg: dict[str, object] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self.replies.get(timeout=30)

    def close(self, drain: float = 0.0) -> None:
        """Stop reading: after ``drain`` seconds for QEMU's last words (its events up to
        its exit: a shutdown would drop what the socket still holds)."""
        self.reader.join(drain)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.reader.join(10)
        self.rfile.close()
        self.sock.close()


def run_qemu(kernel: Path, tmp: Path) -> Run:
    out, image = tmp / "qemu.txt", tmp / "hp.img"
    make_image(image)
    run = Run("", Report())
    with tempfile.TemporaryDirectory(prefix="pyhv-hp-") as short:   # sun_path is short
        qmp_path = str(Path(short) / "qmp.sock")
        argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "kvm", "-m", "64",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", f"file:{out}", "-device", "isa-debug-exit,iobase=0xf4",
                "-kernel", str(kernel), "-append", CMDLINE, "-no-shutdown",
                "-qmp", f"unix:{qmp_path},server=on,wait=off",
                "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                "-device", QEMU_ROOT_PORT]
        start = time.monotonic()
        qmp: Optional[Qmp] = None
        with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) as proc:
            try:
                qmp = Qmp(qmp_path, time.monotonic() + 20)
                cues = Cues(out)
                deadline = time.monotonic() + HOST_TIMEOUT
                while proc.poll() is None and time.monotonic() < deadline and \
                        not qmp.seen("SHUTDOWN"):
                    for cue in cues.new():
                        if cue == "ready":
                            run.actions.append(("blockdev-add", qmp.command("blockdev-add", {
                                "driver": "raw", "node-name": "hp0",
                                "file": {"driver": "file", "filename": str(image)}})))
                            run.actions.append(("device_add", qmp.command("device_add", {
                                "driver": "virtio-blk-pci", "id": DISK_ID, "drive": "hp0",
                                "bus": "rp1", "addr": "0x0"})))
                        elif cue == "unplug-ready":
                            run.actions.append(("device_del", qmp.command(
                                "device_del", {"id": DISK_ID})))
                    time.sleep(0.02)
                # -no-shutdown: QEMU stays after the guest's power-off, so that the
                # DEVICE_DELETED it sends once the card is finalized (later, from its
                # main loop) still comes; then it is told to quit
                while proc.poll() is None and time.monotonic() < deadline and \
                        not qmp.seen("DEVICE_DELETED", DISK_ID) and qmp.seen("SHUTDOWN"):
                    time.sleep(0.02)
                if proc.poll() is None and qmp.seen("SHUTDOWN"):
                    run.actions.append(("quit", qmp.command("quit")))
                try:
                    stderr = proc.communicate(timeout=20)[1]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stderr = proc.communicate()[1]
                    run.end = "timeout"
                run.end = run.end or f"exit {proc.returncode} {stderr.strip()}"
            finally:
                if proc.poll() is None:
                    proc.kill()
                if qmp is not None:
                    qmp.close(drain=10)
                    run.events = list(qmp.events)
    run.seconds = time.monotonic() - start
    run.output = out.read_text(errors="replace") if out.exists() else ""
    run.report = parse_report(run.output)
    return run


# ---- what the specification says ----------------------------------------------------------

def num(v: object) -> int:
    assert isinstance(v, int), v
    return v


def check_report(run: Run) -> dict[str, dict[str, StepValue]]:
    """The guest went through every step, and each register it read says what PCI
    Express Base 7.5.3.6-7.5.3.11 and 6.7 require; the steps by name."""
    r = run.report
    assert r.complete, run.output[-3000:]
    assert not r.errors and not r.exceptions, (r.errors, r.exceptions)
    names = [n for n, _f in run.steps]
    assert names == STEPS, (names, run.steps[-1:], run.actions)
    s = dict(run.steps)
    for name, f in run.steps:
        for k in ("polls", "cc_polls"):
            if k in f:
                assert num(f[k]) < POLL_FAIL, (name, k)

    sc = s["scan"]                        # a hot-plug capable, empty slot; no link
    cap = num(sc["slotcap"])
    assert cap & SLTCAP_HPC and sc["hpc"] == 1, sc
    assert cap & SLTCAP_ABP and sc["abp_cap"] == 1, sc   # the removal needs the button
    assert (sc["pds"], sc["dllla"], sc["intsts"]) == (0, 0, 0), sc
    assert sc["psn"] == cap >> 19, sc

    rd = s["ready"]                       # the events enabled, power as found
    ctl = num(rd["slotctl"])
    assert ctl & ENABLED_ALL == ENABLED_ALL, rd     # DLLSCE: see check_strict
    assert ctl & SLTCTL_PCC == num(rd["found"]) & SLTCTL_PCC, rd
    assert num(rd["slotsta"]) & SLTSTA_EVENTS == 0 and rd["intsts"] == 0, rd

    ad = s["added"]                       # 6.7.3.3: presence detected, INTx (HPIE, PDCE)
    assert (ad["pds"], ad["pdc"], ad["intsts"]) == (1, 1, 1), ad
    assert num(ad["slotsta_after"]) & SLTSTA_EVENTS == 0 and ad["intsts_after"] == 0, ad

    pw = s["powered"]                     # power on, indicator on, the link up
    assert pw["pds"] == 1 and num(pw["slotctl"]) & (SLTCTL_PCC | SLTCTL_PIC) == PIC_ON, pw
    if cap & SLTCAP_PCP:
        assert pw["pcc_was"] == 1, pw    # an empty slot with a power controller is off
    if sc["dlllarc"]:
        assert pw["dllla"] == 1, pw
    assert num(pw["slotsta_after"]) & SLTSTA_EVENTS == 0 and pw["intsts_after"] == 0, pw

    dv = s["device"]                      # the card: a virtio-blk with the file's size
    assert (dv["vendor"], dv["device"], dv["class"]) == (*VIRTIO_BLK, CLASS_SCSI), dv
    assert dv["capacity"] == CAPACITY, dv
    wins = {k: v for k, v in dv.items() if k.endswith("_win")}
    assert wins and all(v in ("mem", "pref") for v in wins.values()), dv
    assert num(dv["cmd"]) & 0x6 == 0x6 and num(dv["port_cmd"]) & 0x6 == 0x6, dv

    bt = s["button"]                      # the attention button, the card still there
    assert (bt["abp"], bt["pds"]) == (1, 1), bt
    assert num(bt["slotsta_after"]) & 1 == 0, bt

    rm = s["removed"]                     # powered off and dark; the card gone
    assert num(rm["slotctl"]) & (SLTCTL_PCC | SLTCTL_PIC) == SLTCTL_PCC | PIC_OFF, rm
    assert (rm["pds"], rm["dllla"], rm["vendor"]) == (0, 0, 0xFFFF), rm
    assert num(rm["slotsta_after"]) & SLTSTA_EVENTS == 0 and rm["intsts_after"] == 0, rm
    return s


def check_strict(s: dict[str, dict[str, StepValue]]) -> None:
    """What the specification asks and QEMU 7.2 does not do (see the module docstring):
    a port that reports Data Link Layer Link Active (DLLLARC) takes DLLSCE (7.5.3.10)
    and raises DLL State Changed when the link comes up and goes down (7.5.3.11); every
    enabled event with HPIE asserts the port's INTx (6.7.3.4), the Presence Detect
    Changed of the removal too; no link while the slot has no power (the card is put
    in a powered-off slot)."""
    assert s["scan"]["dlllarc"] == 1, s["scan"]
    assert num(s["ready"]["slotctl"]) & SLTCTL_DLLSCE, s["ready"]
    ad, pw, rm = s["added"], s["powered"], s["removed"]
    assert (ad["dllla"], ad["dllsc"]) == (0, 0), ad
    assert (pw["dllsc"], pw["dllla"], pw["intsts"]) == (1, 1, 1), pw
    assert (rm["pdc"], rm["dllsc"], rm["intsts"]) == (1, 1, 1), rm


def test_hotplug_under_pyhv(guests, tmp_path):
    run = run_pyhv(guests.pvh_elf, tmp_path)
    # add_device answers the device's id, remove_device nothing (the guest decides)
    assert run.actions == [("add_device", DISK_ID), ("remove_device", None)], run.actions
    assert run.end == "powered-off guest", (run.end, run.output[-3000:])
    check_strict(check_report(run))
    assert ("device-deleted", DISK_ID) in run.events, run.events
    print(f"pyhv: {run.seconds:.2f} s; events {run.events}")


@pytest.fixture(scope="module")
def qemu_run(guests, tmp_path_factory) -> Run:
    """QEMU's run, made once for the module's tests."""
    return run_qemu(guests.pvh_elf, tmp_path_factory.mktemp("qemu-hotplug"))


def deleted(run: Run) -> bool:
    return any(e.get("event") == "DEVICE_DELETED" and e.get("data", {}).get("device") == DISK_ID
               for e in run.events)


@pytest.mark.qemu
def test_hotplug_under_qemu(qemu_run):
    """The guest's driver against QEMU's root port: what the specification fixes."""
    run = qemu_run
    assert [a for a, _r in run.actions] == ["blockdev-add", "device_add", "device_del",
                                            "quit"], (run.actions, run.output[-3000:])
    assert all(r == {"return": {}} for _a, r in run.actions), run.actions
    assert run.end.startswith("exit 0"), run.end
    check_report(run)
    assert deleted(run), run.events
    assert any(e.get("event") == "SHUTDOWN" and e.get("data", {}).get("guest")
               for e in run.events), run.events             # the guest powered off
    print(f"QEMU: {run.seconds:.2f} s; QMP events "
          f"{[(e['event'], e.get('data')) for e in run.events]}")
    for name, f in run.steps:
        print(f"  {name}: " + " ".join(f"{k}={hex(v) if isinstance(v, int) else v}"
                                       for k, v in f.items()))


# ---- pyhv against QEMU -----------------------------------------------------------------------

def only_bits(mask: int) -> Callable[[StepValue], StepValue]:
    def keep(v: StepValue) -> StepValue:
        return v & mask if isinstance(v, int) else v
    return keep


def bar_size(v: StepValue) -> StepValue:
    """``ADDR+SIZE`` without the address (the firmware's windows place it)."""
    return v.partition("+")[2] if isinstance(v, str) else v


#: fields left out wherever they appear (reasons: the module docstring)
EXCLUDED_FIELDS = {"polls", "cc_polls", "psn", "hps", "cap", "sec", "io", "mem", "pref",
                   "dllsc"}
#: (step, field) left out
EXCLUDED = {("scan", "bdf"), ("scan", "cmd"), ("device", "bdf"),
            ("added", "dllla"), ("added", "lnksta"),
            ("powered", "intsts"), ("removed", "intsts")}
#: fields compared in part, wherever they appear
NORMALIZED: dict[str, Callable[[StepValue], StepValue]] = {
    "slotcap": only_bits(~(SLTCAP_PSN | SLTCAP_HPS | SLTCAP_EIP) & 0xFFFFFFFF),
    "lnkcap": only_bits(LNKCAP_DLLLARC),
    "lnksta": only_bits(LNKSTA_DLLLA),
    "port_cmd": only_bits(0x6),
    "slotctl": only_bits(~SLTCTL_DLLSCE & 0xFFFF),
    "written": only_bits(~SLTCTL_DLLSCE & 0xFFFF),
    "slotsta": only_bits(~SLTSTA_DLLSC & 0xFFFF),
}
#: (step, field) compared in part (before NORMALIZED)
NORMALIZED_AT: dict[tuple[str, str], Callable[[StepValue], StepValue]] = {}


def comparable(steps: Steps) -> Steps:
    out: Steps = []
    for n, f in steps:
        g: dict[str, StepValue] = {}
        for k, v in f.items():
            if k in EXCLUDED_FIELDS or (n, k) in EXCLUDED:
                continue
            if n == "device" and k.startswith("bar") and not k.endswith("_win"):
                v = bar_size(v)
            v = NORMALIZED_AT.get((n, k), lambda x: x)(v)
            g[k] = NORMALIZED.get(k, lambda x: x)(v)
        out.append((n, g))
    return out


def differences(mine: Steps, theirs: Steps) -> list[str]:
    """Every raw field that differs (the excluded and normalized ones included)."""
    notes = []
    for (sname, f), (_q, g) in zip(mine, theirs):
        for k in sorted(set(f) | set(g)):
            if f.get(k) != g.get(k):
                a, b = f.get(k), g.get(k)
                notes.append(f"{sname} {k}: pyhv {hex(a) if isinstance(a, int) else a} "
                             f"QEMU {hex(b) if isinstance(b, int) else b}")
    return notes


@pytest.mark.qemu
def test_same_answers_as_qemu(qemu_run, guests, tmp_path):
    theirs = qemu_run
    mine = run_pyhv(guests.pvh_elf, tmp_path)
    check_report(theirs)
    check_report(mine)
    assert comparable(mine.steps) == comparable(theirs.steps), \
        differences(comparable(mine.steps), comparable(theirs.steps))
    print("\n".join([f"pyhv {mine.seconds:.2f} s, QEMU {theirs.seconds:.2f} s; "
                     "differences left out:", *differences(mine.steps, theirs.steps)]))


def test_no_hotplug_slot_under_pyhv(guests, tmp_path):
    """A pc machine has no PCI Express root port: ``scan none=1`` and the section ends,
    the rest of the report as usual."""
    out = tmp_path / "pc.txt"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline=CMDLINE), memory=64 * MiB,
                   vcpus=1, serial=SerialConfig("file", str(out)), machine="pc")
    m = Machine(cfg)
    try:
        m.start()
        ev = m.run(timeout=HOST_TIMEOUT)
    finally:
        m.close()
    r = parse_report(out.read_text(errors="replace"))
    assert ev.kind == "powered-off" and r.complete and not r.errors and not r.exceptions
    assert hotplug_steps(r) == [("scan", {"none": 1})]
