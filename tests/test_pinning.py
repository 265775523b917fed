"""vCPU and emulator threads on the host CPUs ``<vcpu cpuset>`` and ``<cputune>`` name,
with their scheduling policies; checked in /proc/PID/task/*/status of a running
``pyhv run``, across a reset, and under libvirt (``virsh vcpupin``/``emulatorpin``
on the real threads of a running domain)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyhv.config import CpuTuneConfig, KernelBoot, SchedConfig, SerialConfig, VmConfig
from pyhv.domxml import DomainXmlError, parse_domain
from pyhv.engine.pinning import PinningError, check_host, host_cpus

REPO = Path(__file__).resolve().parent.parent


def need_two_cpus() -> None:
    if not {0, 1} <= set(host_cpus()) or not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs host CPUs 0 and 1 available to this process")


def dom(kernel: str, vcpu: str = "<vcpu>2</vcpu>", cputune: str = "",
        serial: str = '<serial type="null"/>') -> str:
    return f"""<domain type="kvm">
  <name>pinned</name>
  <memory unit="MiB">32</memory>
  {vcpu}
  {cputune}
  <os><type arch="x86_64" machine="pc">hvm</type><kernel>{kernel}</kernel>
    <cmdline>pyhv.wait=powerbutton</cmdline></os>
  <devices>{serial}<memballoon model="none"/></devices>
</domain>"""


def threads(pid: int) -> dict[str, list[tuple[int, str, int]]]:
    """comm → [(tid, Cpus_allowed_list, policy)] for each thread of ``pid``."""
    out: dict[str, list[tuple[int, str, int]]] = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{t}/status").read_text()
            policy = os.sched_getscheduler(int(t))
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        cpus = next(ln.split(":", 1)[1].strip() for ln in status.splitlines()
                    if ln.startswith("Cpus_allowed_list:"))
        out.setdefault(comm, []).append((int(t), cpus, policy))
    return out


def emulator_threads(table: dict[str, list[tuple[int, str, int]]]) -> list[tuple[int, str, int]]:
    """Every thread pyhv made that is not a vCPU (KVM's own kernel workers excluded)."""
    return [t for comm, ts in table.items() if not comm.startswith(("CPU ", "kvm"))
            for t in ts]


# ---- mapping: domain XML → CpuTuneConfig, one-line refusals -------------------------

def test_cputune_maps():
    cfg = parse_domain(dom("/k", '<vcpu cpuset="0-3,^2">3</vcpu>', """<cputune>
      <vcpupin vcpu="1" cpuset="1"/><emulatorpin cpuset="0"/>
      <vcpusched vcpus="0-1" scheduler="fifo" priority="5"/>
      <emulatorsched scheduler="batch"/></cputune>""").encode())
    t = cfg.cputune
    assert t.cpuset == (0, 1, 3) and t.vcpupin == ((1, (1,)),) and t.emulatorpin == (0,)
    assert t.vcpu_cpus(0) == (0, 1, 3) and t.vcpu_cpus(1) == (1,)
    assert t.vcpu_sched(1) == SchedConfig("fifo", 5, (0, 1)) and t.vcpu_sched(2) is None
    assert t.emulatorsched == SchedConfig("batch")
    from pyhv.domxml.write import to_xml

    assert parse_domain(to_xml(cfg).encode()).cputune == t  # written back as read


@pytest.mark.parametrize("vcpu,cputune,needle", [
    ('<vcpu cpuset="0-">2</vcpu>', "", "cpuset '0-'"),
    ('<vcpu cpuset="a">2</vcpu>', "", "cpuset 'a'"),
    ('<vcpu cpuset="^0">2</vcpu>', "", "cpuset '^0'"),
    ("<vcpu>2</vcpu>", '<cputune><vcpupin vcpu="2" cpuset="0"/></cputune>',
     "vcpupin vcpu 2: the domain has 2 vCPUs"),
    ("<vcpu>2</vcpu>", '<cputune><vcpupin vcpu="0" cpuset="1-0"/></cputune>', "'1-0'"),
    ("<vcpu>2</vcpu>", '<cputune><vcpupin vcpu="0"/></cputune>', "needs a cpuset"),
    ("<vcpu>2</vcpu>", '<cputune><iothreadpin iothread="1" cpuset="0"/></cputune>',
     "iothreadpin"),
    ("<vcpu>2</vcpu>", '<cputune><vcpusched vcpus="0" scheduler="fifo"/></cputune>',
     "priority between 1 and 99"),
    ("<vcpu>2</vcpu>", '<cputune><vcpusched vcpus="0" scheduler="deadline"/></cputune>',
     "scheduler 'deadline'"),
    ("<vcpu>2</vcpu>", "<cputune><quota>50000</quota></cputune>", "<quota>"),
])
def test_bad_cputune_is_one_line(vcpu, cputune, needle):
    with pytest.raises(DomainXmlError) as e:
        parse_domain(dom("/k", vcpu, cputune).encode())
    msg = str(e.value)
    assert "\n" not in msg, msg
    # libvirt's own schema (where installed) may refuse it first, naming the element
    where = "/domain/cputune" if cputune else "/domain/vcpu"
    assert needle in msg or ("libvirt's domain schema" in msg and where in msg), msg


def test_cpu_shares_are_a_note_not_a_refusal():
    """OpenStack Nova writes <cputune><shares> into every domain: a relative weight
    pyhv run cannot apply without cgroups, so it is noted, not refused."""
    from pyhv.domxml import map_domain

    mapped = map_domain(dom("/k", "<vcpu>2</vcpu>",
                            "<cputune><shares>1024</shares></cputune>").encode())
    assert any(n.startswith("/domain/cputune/shares") and "not applied" in n
               for n in mapped.notes), mapped.notes


def test_host_cpus_that_do_not_exist():
    tune = CpuTuneConfig(vcpupin=((0, (0, 7)),))
    with pytest.raises(PinningError, match=r"vcpupin vcpu 0 cpuset 0,7: host CPU 7 does "
                                           r"not exist \(this host has CPUs 0-1\)"):
        check_host(tune, present=(0, 1))
    check_host(CpuTuneConfig(cpuset=(0, 1), emulatorpin=(1,)), present=(0, 1))


def test_domxml_check_shows_pinning(tmp_path):
    f = tmp_path / "d.xml"
    f.write_text(dom("/k", '<vcpu cpuset="0">2</vcpu>',
                     '<cputune><vcpupin vcpu="1" cpuset="1"/>'
                     '<vcpusched vcpus="1" scheduler="idle"/></cputune>'))
    p = subprocess.run([sys.executable, "-m", "pyhv", "domxml", "check", str(f)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "  vCPU 0 thread: host CPUs 0\n" in p.stdout
    assert "  vCPU 1 thread: host CPUs 1, scheduler idle\n" in p.stdout
    assert "  emulator threads: host CPUs 0\n" in p.stdout  # <vcpu cpuset>'s default


# ---- pyhv run ------------------------------------------------------------------------

def run_until_waiting(tmp: Path, xml: str) -> tuple[subprocess.Popen, Path]:
    out = tmp / "serial.log"
    f = tmp / "dom.xml"
    f.write_text(xml.replace('<serial type="null"/>',
                             f'<serial type="file"><source path="{out}"/></serial>'))
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "run", str(f)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while "@waiting" not in (out.read_text(errors="replace") if out.exists() else ""):
        if proc.poll() is not None:
            raise AssertionError(f"pyhv ended early: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "guest did not reach @waiting"
        time.sleep(0.05)
    return proc, out


@pytest.mark.kvm
def test_run_pins_vcpus_and_emulator(guests, tmp_path):
    need_two_cpus()
    xml = dom(str(guests.pvh_elf), '<vcpu cpuset="0">2</vcpu>',
              '<cputune><vcpupin vcpu="0" cpuset="1"/><emulatorpin cpuset="1"/>'
              '<vcpusched vcpus="1" scheduler="batch"/></cputune>')
    proc, _ = run_until_waiting(tmp_path, xml)
    try:
        table = threads(proc.pid)
        (cpu0,), (cpu1,) = table["CPU 0/KVM"], table["CPU 1/KVM"]
        assert cpu0[1] == "1" and cpu0[2] == os.SCHED_OTHER   # vcpupin
        assert cpu1[1] == "0" and cpu1[2] == os.SCHED_BATCH   # <vcpu cpuset>, vcpusched
        emu = emulator_threads(table)
        assert emu and all(cpus == "1" for _, cpus, _ in emu), emu  # emulatorpin
        assert proc.pid in [tid for tid, _, _ in emu]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.kvm
def test_run_refuses_cpus_the_host_lacks(guests, tmp_path):
    missing = max(host_cpus()) + 1
    f = tmp_path / "d.xml"
    f.write_text(dom(str(guests.pvh_elf), "<vcpu>2</vcpu>",
                     f'<cputune><emulatorpin cpuset="0,{missing}"/></cputune>'))
    p = subprocess.run([sys.executable, "-m", "pyhv", "run", str(f)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert f"host CPU {missing} does not exist" in lines[0], lines[0]


@pytest.mark.kvm
def test_pins_outlive_a_reset(guests, tmp_path):
    """A reset builds new vCPU threads; each keeps what its predecessor had, also when
    someone else (libvirt) set it at run time."""
    need_two_cpus()
    from pyhv.engine.machine import Machine

    out = tmp_path / "serial.log"
    cfg = VmConfig(KernelBoot(str(guests.pvh_elf), cmdline="pyhv.wait=powerbutton"),
                   memory=32 << 20, vcpus=2, serial=SerialConfig("file", str(out)),
                   cputune=CpuTuneConfig(vcpupin=((0, (1,)),)))
    m = Machine(cfg)

    def wait_waiting(count: int) -> None:
        deadline = time.monotonic() + 60
        while out.read_text(errors="replace").count("@waiting") < count:
            assert time.monotonic() < deadline and not m.finished, m.last_event
            select.select([m.event_fd], [], [], 0.05)
            m.process_events()

    try:
        m.start()
        wait_waiting(1)
        old = m.vcpu_thread_ids()
        assert os.sched_getaffinity(old[0]) == {1}
        os.sched_setaffinity(old[1], {0})  # as libvirt's virsh vcpupin does
        m.reset()
        wait_waiting(2)
        new = m.vcpu_thread_ids()
        assert set(new).isdisjoint(old)
        assert os.sched_getaffinity(new[0]) == {1} and os.sched_getaffinity(new[1]) == {0}
    finally:
        m.close()


# ---- libvirt: libvirtd pins the threads query-cpus-fast names --------------------------

def _libvirt():
    pytest.importorskip("libvirt")
    import test_libvirt

    return test_libvirt


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from libvirt_daemon import LibvirtDaemon, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(why)
    lv = _libvirt()
    assert os.access(lv.EMULATOR, os.X_OK), f"{lv.EMULATOR}: pyhv-qemu is not installed"
    with LibvirtDaemon(tmp_path_factory.mktemp("libvirt")) as d:
        yield d


def _pins(text: str) -> dict[str, str]:
    """``virsh vcpupin``'s table: vCPU → CPU affinity."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[parts[0]] = parts[1]
    return out


@pytest.mark.libvirt
@pytest.mark.kvm
def test_virsh_vcpupin_and_emulatorpin_move_the_real_threads(daemon, guests, tmp_path):
    need_two_cpus()
    lv = _libvirt()
    name = "pinned"
    xml = lv.domain_xml(name, guests.pvh_elf, "pyhv.wait=powerbutton").replace(
        "<vcpu>2</vcpu>", "<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='1'/>"
                          "<emulatorpin cpuset='0'/></cputune>")
    lv.define(daemon, tmp_path, name, xml)
    try:
        lv.virsh(daemon, "start", name)
        pid = int(daemon.host_path(f"/run/libvirt/qemu/{name}.pid").read_text())
        table = threads(pid)
        assert table["CPU 0/KVM"][0][1] == "1", table  # <vcpupin> as libvirt applied it
        assert threads(pid)["CPU 1/KVM"][0][1] == "0-1"
        assert [c for t, c, _ in emulator_threads(table) if t == pid] == ["0"]
        assert _pins(lv.virsh(daemon, "vcpupin", name).stdout) == {"0": "1", "1": "0-1"}
        # live changes reach the threads query-cpus-fast named
        lv.virsh(daemon, "vcpupin", name, "0", "0")
        lv.virsh(daemon, "vcpupin", name, "1", "1")
        table = threads(pid)
        assert table["CPU 0/KVM"][0][1] == "0" and table["CPU 1/KVM"][0][1] == "1", table
        assert _pins(lv.virsh(daemon, "vcpupin", name).stdout) == {"0": "0", "1": "1"}
        lv.virsh(daemon, "emulatorpin", name, "1")
        assert [c for t, c, _ in emulator_threads(threads(pid)) if t == pid] == ["1"]
        assert "*: 1" in lv.virsh(daemon, "emulatorpin", name).stdout.replace("  ", " ")
        # a reset makes new vCPU threads: they keep the pins libvirt gave the old ones
        old = {t for t, _, _ in table["CPU 0/KVM"] + table["CPU 1/KVM"]}
        lv.virsh(daemon, "reset", name)
        deadline = time.monotonic() + 30
        while True:
            table = threads(pid)
            tids = {t for c in ("CPU 0/KVM", "CPU 1/KVM") for t, _, _ in table.get(c, [])}
            if len(tids) == 2 and tids.isdisjoint(old):
                break
            assert time.monotonic() < deadline, table
            time.sleep(0.1)
        assert table["CPU 0/KVM"][0][1] == "0" and table["CPU 1/KVM"][0][1] == "1", table
    finally:
        lv.virsh(daemon, "destroy", name, check=False)
        lv.virsh(daemon, "undefine", name, check=False)
