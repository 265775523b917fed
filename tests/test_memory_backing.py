"""Guest RAM as ``<memoryBacking>`` and QEMU's memory backends ask: hugepages (memfd
with MFD_HUGETLB, or a file on hugetlbfs), ``<locked/>`` (mlock), KSM
(MADV_MERGEABLE by default, ``<nosharepages/>``), file-backed RAM and
``discard-data``; the host's answers are read back from /proc."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from pyhv.config import MemoryBackingConfig
from pyhv.domxml import load_domain
from pyhv.engine.memory import GuestMemory, GuestMemoryError, free_hugepages

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
HUGE_2M = 2 * MiB
NR_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
#: 2 MiB hugepages the tests want free (40 MiB)
WANT_FREE = 20


def vm_flags(addr: int, pid: str = "self") -> tuple[int, set[str]]:
    """(size in KiB, VmFlags) of the mapping that starts at ``addr`` in /proc/PID/smaps."""
    size, found = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-[0-9a-f]+ ", line)
            if m:
                found = int(m.group(1), 16) == addr
            elif found and line.startswith("Size:"):
                size = int(line.split()[1])
            elif found and line.startswith("VmFlags:"):
                return size, set(line.split()[1:])
    raise AssertionError(f"no mapping at {addr:#x}")


def rss_kib(addr: int) -> int:
    """Resident KiB of this process's mapping that starts at ``addr``."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-[0-9a-f]+ ", line)
            if m:
                found = int(m.group(1), 16) == addr
            elif found and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping at {addr:#x}")


def mappings_of_size(pid: int, kib: int) -> list[set[str]]:
    """VmFlags of every mapping of ``pid`` that is exactly ``kib`` KiB."""
    out, size = [], -1
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and size == kib:
                out.append(set(line.split()[1:]))
    return out


def address(mem: GuestMemory, i: int = 0) -> int:
    import ctypes

    buf = mem.regions[i].buffer
    view = ctypes.c_char.from_buffer(buf)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(view)
    finally:
        del view


def status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


# ---- KSM, sources, discard (no KVM needed) ---------------------------------------

def test_ksm_mergeable_by_default_and_off_with_nosharepages():
    mem = GuestMemory.allocate([(0, 8 * MiB)], MemoryBackingConfig())
    try:
        size, flags = vm_flags(address(mem))
        assert size == 8192 and "mg" in flags, flags  # QEMU's mem-merge=on default
    finally:
        mem.close()
    mem = GuestMemory.allocate([(0, 8 * MiB)], MemoryBackingConfig(merge=False))
    try:
        _, flags = vm_flags(address(mem))
        assert "mg" not in flags, flags
    finally:
        mem.close()


def test_memfd_private_and_shared():
    priv = GuestMemory.allocate([(0, 4 * MiB), (8 * MiB, 4 * MiB)],
                                MemoryBackingConfig(source="memfd"))
    shared = GuestMemory.allocate([(0, 4 * MiB)], MemoryBackingConfig(source="memfd"),
                                  shared=True)
    try:
        assert all(r.fd == -1 for r in priv.regions)  # a private mapping is not shared out
        assert shared.regions[0].fd >= 0
        target = os.readlink(f"/proc/self/fd/{shared.regions[0].fd}")
        assert target.startswith("/memfd:pyhv-guest-ram"), target
        _, flags = vm_flags(address(shared))
        assert "sh" in flags, flags
        priv.write_u64(8 * MiB + 8, 0x1122334455667788)
        assert priv.read_u64(8 * MiB + 8) == 0x1122334455667788
        with pytest.raises(GuestMemoryError):  # bounds still checked
            priv.read_u64(4 * MiB)
    finally:
        priv.close()
        shared.close()


def test_file_backing_in_a_directory_is_unlinked(tmp_path):
    mem = GuestMemory.allocate([(0, 4 * MiB)], MemoryBackingConfig(source="file",
                                                                  path=str(tmp_path)),
                               shared=True)
    try:
        assert list(tmp_path.iterdir()) == []  # O_TMPFILE: nothing left behind
        target = os.readlink(f"/proc/self/fd/{mem.regions[0].fd}")
        assert target.startswith(str(tmp_path)), target
    finally:
        mem.close()


@pytest.mark.parametrize("discard", [False, True], ids=["kept", "discarded"])
def test_file_backing_discard_data(tmp_path, discard):
    path = tmp_path / "pc.ram"
    mem = GuestMemory.allocate([(0, 4 * MiB)], MemoryBackingConfig(
        source="file", path=str(path), discard=discard), shared=True)
    mem.write(1 * MiB, b"guest data")
    mem.close()
    data = path.read_bytes()
    assert len(data) == 4 * MiB
    if discard:  # QEMU's discard-data=on: the contents go when the guest stops
        assert data[1 * MiB:1 * MiB + 10] == bytes(10) and os.stat(path).st_blocks == 0
    else:
        assert data[1 * MiB:1 * MiB + 10] == b"guest data"


@pytest.mark.parametrize("prealloc", [False, True], ids=["on-demand", "immediate"])
def test_prealloc_faults_pages_in(prealloc):
    mem = GuestMemory.allocate([(0, 16 * MiB)], MemoryBackingConfig(prealloc=prealloc))
    try:
        rss = rss_kib(address(mem))
        assert rss == 16 * 1024 if prealloc else rss < 1024, rss
    finally:
        mem.close()


def test_locked_in_process():
    if not os.access("/proc/self/status", os.R_OK):
        pytest.skip("no /proc")
    before = status_kib("self", "VmLck")
    mem = GuestMemory.allocate([(0, 8 * MiB)], MemoryBackingConfig(locked=True))
    try:
        if status_kib("self", "VmLck") - before < 8192:
            raise AssertionError("guest RAM is not locked")
        _, flags = vm_flags(address(mem))
        assert "lo" in flags
    finally:
        mem.close()
    assert status_kib("self", "VmLck") <= before + 4


# ---- hugepages ---------------------------------------------------------------------

@pytest.fixture
def hugepages_2m():
    """Make sure a few 2 MiB hugepages are free (reserving them when root), restoring
    the host's setting afterwards; yields how many are free."""
    free = free_hugepages(HUGE_2M)
    if free is None:
        pytest.skip("this kernel has no 2 MiB hugepages")
    old: Optional[int] = None
    if free < WANT_FREE:
        if os.geteuid() != 0 or not os.access(NR_2M, os.W_OK):
            pytest.skip(f"only {free} free 2 MiB hugepages and not root to reserve more")
        old = int(Path(NR_2M).read_text())
        Path(NR_2M).write_text(str(old + WANT_FREE - free))
        free = free_hugepages(HUGE_2M) or 0
        if free < WANT_FREE:
            Path(NR_2M).write_text(str(old))
            pytest.skip(f"the host could only make {free} 2 MiB hugepages free")
    try:
        yield free
    finally:
        if old is not None:
            Path(NR_2M).write_text(str(old))


def test_hugepages_memfd(hugepages_2m):
    free = hugepages_2m
    backing = MemoryBackingConfig(hugepages=True, hugepage_size=HUGE_2M)
    mem = GuestMemory.allocate([(0, 4 * MiB), (16 * MiB, 4 * MiB)], backing)
    try:
        assert free_hugepages(HUGE_2M) == free - 4  # reserved at mmap
        size, flags = vm_flags(address(mem, 1))
        assert size == 4096 and "ht" in flags, flags
        mem.write_u32(16 * MiB + 3 * MiB, 0xCAFE)
        assert mem.read_u32(16 * MiB + 3 * MiB) == 0xCAFE
    finally:
        mem.close()
    assert free_hugepages(HUGE_2M) == free


def test_hugepages_too_few_free_is_one_line(hugepages_2m):
    free = hugepages_2m
    need = free + 1
    with pytest.raises(GuestMemoryError) as e:
        GuestMemory.allocate([(0, need * HUGE_2M)],
                             MemoryBackingConfig(hugepages=True, hugepage_size=HUGE_2M))
    msg = str(e.value)
    assert "\n" not in msg and "2 MiB" in msg and f"needs {need}" in msg, msg
    assert f"{free} free" in msg, msg


def test_hugepages_none_free_is_one_line():
    """The real host state: asks for more 2 MiB pages than are free right now."""
    free = free_hugepages(HUGE_2M)
    if free is None:
        pytest.skip("this kernel has no 2 MiB hugepages")
    with pytest.raises(GuestMemoryError) as e:
        GuestMemory.allocate([(0, (free + 1) * HUGE_2M)],
                             MemoryBackingConfig(hugepages=True, hugepage_size=HUGE_2M))
    assert "\n" not in str(e.value) and "2 MiB" in str(e.value)


def test_hugepage_size_the_host_lacks():
    with pytest.raises(GuestMemoryError, match=r"no hugepages of 4 MiB \(sizes it has: "):
        GuestMemory.allocate([(0, 8 * MiB)],
                             MemoryBackingConfig(hugepages=True, hugepage_size=4 * MiB))


def test_hugepages_size_mismatch():
    with pytest.raises(GuestMemoryError, match="not a multiple of the 2 MiB hugepage size"):
        GuestMemory.allocate([(0, 3 * MiB)],
                             MemoryBackingConfig(hugepages=True, hugepage_size=HUGE_2M))


def test_hugetlbfs_path_as_libvirt_passes_it(hugepages_2m, tmp_path):
    """``memory-backend-file,mem-path=/dev/hugepages2M/libvirt/qemu/…``: a directory on
    hugetlbfs (mounted here in a private mount namespace)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount hugetlbfs privately")
    mnt = tmp_path / "hugepages2M"
    mnt.mkdir()
    code = (
        "import sys\n"
        "from pyhv.config import MemoryBackingConfig as B\n"
        "from pyhv.engine.memory import GuestMemory, free_hugepages\n"
        f"d = {str(mnt)!r} + '/libvirt/qemu/-1-guest'\n"
        "import os; os.makedirs(d)\n"
        "before = free_hugepages(2 << 20)\n"
        "m = GuestMemory.allocate([(0, 8 << 20)], B(source='file', hugepages=True, path=d,"
        " prealloc=True), shared=False)\n"
        "m.write(7 << 20, b'x'); print('used', before - free_hugepages(2 << 20),"
        " 'left', len(os.listdir(d)))\n"
        "m.close()\n"
        "try:\n"
        "    GuestMemory.allocate([(0, 8 << 20)], B(source='file', hugepages=True, path=d,"
        " hugepage_size=1 << 30))\n"
        "except Exception as e: print('mismatch:', e)\n"
        "try:\n"
        "    GuestMemory.allocate([(0, 8 << 20)], B(source='file', hugepages=True,"
        f" path={str(tmp_path)!r}))\n"
        "except Exception as e: print('notfs:', e)\n")
    script = f"mount -t hugetlbfs -o pagesize=2M none {mnt} && exec {sys.executable} -c \"$0\""
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                        code], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert "used 4 left 0" in p.stdout, p.stdout
    assert "has 2 MiB hugepages, not the 1 GiB asked for" in p.stdout, p.stdout
    assert "is not on hugetlbfs" in p.stdout, p.stdout


# ---- pyhv run: a guest with locked memory, KSM off, and the RLIMIT_MEMLOCK error ----

def domain(tmp: Path, kernel: Path, backing: str, out: Path) -> Path:
    f = tmp / "dom.xml"
    f.write_text(f"""<domain type="kvm">
  <name>membacking</name>
  <memory unit="MiB">32</memory>
  <memoryBacking>{backing}</memoryBacking>
  <vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type><kernel>{kernel}</kernel>
    <cmdline>pyhv.wait=powerbutton</cmdline></os>
  <devices><serial type="file"><source path="{out}"/></serial>
    <memballoon model="none"/></devices>
</domain>""")
    return f


def wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while needle not in (path.read_text(errors="replace") if path.exists() else ""):
        if proc.poll() is not None:
            raise AssertionError(f"pyhv ended: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, f"{needle!r} not seen"
        time.sleep(0.05)


@pytest.mark.kvm
def test_run_locked_without_ksm(guests, tmp_path):
    out = tmp_path / "serial.log"
    xml = domain(tmp_path, guests.pvh_elf, "<locked/><nosharepages/>", out)
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "run", str(xml)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, "@waiting", proc)
        assert status_kib(proc.pid, "VmLck") >= 32 * 1024
        ram = mappings_of_size(proc.pid, 32 * 1024)
        assert ram and all("lo" in f and "mg" not in f for f in ram), ram
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.kvm
def test_run_mergeable_by_default(guests, tmp_path):
    out = tmp_path / "serial.log"
    xml = domain(tmp_path, guests.pvh_elf, "<access mode='private'/>", out)
    proc = subprocess.Popen([sys.executable, "-m", "pyhv", "run", str(xml)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, "@waiting", proc)
        ram = mappings_of_size(proc.pid, 32 * 1024)
        assert ram and all("mg" in f and "lo" not in f for f in ram), ram
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_run_memlock_limit_too_low_is_one_line(guests, tmp_path):
    """RLIMIT_MEMLOCK below guest RAM (and no CAP_IPC_LOCK, which would ignore it)."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root ignores RLIMIT_MEMLOCK; setpriv(1) is needed to drop CAP_IPC_LOCK")
    xml = domain(tmp_path, guests.pvh_elf, "<locked/>", tmp_path / "serial.log")
    limit = 1 * MiB

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

    cmd = [sys.executable, "-m", "pyhv", "run", str(xml)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                       preexec_fn=lower)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "RLIMIT_MEMLOCK is 1 MiB" in lines[0] and "32 MiB" in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_smp_topology_example_names_the_missing_size():
    """examples/domains/smp-topology.xml keeps 2 MiB hugepages: on a host without 2048
    free, pyhv run's error names the size and how many are free."""
    cfg = load_domain(str(REPO / "examples/domains/smp-topology.xml"))
    assert cfg.memory_backing.hugepages and cfg.memory_backing.hugepage_size == HUGE_2M
    free = free_hugepages(HUGE_2M)
    if free is None or free >= cfg.memory // HUGE_2M:
        pytest.skip("this host has enough free 2 MiB hugepages for the example")
    from pyhv.engine import layout

    with pytest.raises(GuestMemoryError) as e:
        GuestMemory.allocate(layout.ram_ranges(cfg.memory), cfg.memory_backing)
    assert f"needs 2048 hugepages of 2 MiB, the host has {free} free" in str(e.value)


# ---- pyhv-qemu: what libvirt 9.0 passes for these domains ---------------------------

def shim_backing(*args: str) -> tuple[MemoryBackingConfig, bool, tuple[str, ...]]:
    from pyhv.shim.mapping import build

    plan = build(["-kernel", "/k", *args])
    assert plan.config is not None
    return plan.config.memory_backing, plan.config.shared_memory, plan.pending


def test_shim_hugepage_file_backend_as_libvirt_writes_it():
    # <memoryBacking><hugepages/><locked/><nosharepages/></memoryBacking> in libvirt 9.0
    backing, shared, notes = shim_backing(
        "-machine", "pc,usb=off,dump-guest-core=off,mem-merge=off,memory-backend=pc.ram",
        "-m", "214",
        "-object", '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":'
                   '"/dev/hugepages2M/libvirt/qemu/-1-QEMUGuest1",'
                   '"x-use-canonical-path-for-ramblock-id":false,"prealloc":true,'
                   '"size":224395264}',
        "-overcommit", "mem-lock=on")
    assert backing == MemoryBackingConfig(
        "file", hugepages=True, locked=True, path="/dev/hugepages2M/libvirt/qemu/-1-QEMUGuest1",
        merge=False, prealloc=True)
    assert not shared and not any("prealloc" in n for n in notes)


def test_shim_memfd_hugetlb_and_discard():
    backing, shared, _ = shim_backing(
        "-machine", "q35,memory-backend=pc.ram", "-m", "64",
        "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram","hugetlb":true,'
                   '"hugetlbsize":2097152,"share":true,"size":67108864}')
    assert backing == MemoryBackingConfig("memfd", hugepages=True, hugepage_size=HUGE_2M)
    assert shared
    backing, _, _ = shim_backing(
        "-machine", "pc,memory-backend=pc.ram", "-m", "64",
        "-object", '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":'
                   '"/var/lib/libvirt/qemu/ram/1-g/pc.ram","discard-data":true,'
                   '"share":true,"size":67108864}')
    assert backing.source == "file" and backing.discard and not backing.hugepages
    assert backing.path == "/var/lib/libvirt/qemu/ram/1-g/pc.ram"


def test_shim_lock_and_merge_without_a_backend():
    backing, _, _ = shim_backing("-m", "64", "-overcommit", "mem-lock=on",
                                 "-machine", "pc,mem-merge=off")
    assert backing.locked and not backing.merge
    backing, _, _ = shim_backing("-m", "64", "-overcommit", "mem-lock=off")
    assert not backing.locked and backing.merge  # KSM by default, as QEMU


@pytest.mark.kvm
def test_shim_runs_a_guest_on_hugepages(hugepages_2m, guests, tmp_path):
    """pyhv-qemu with the memfd hugetlb backend, mem-lock and mem-merge=off as libvirt
    writes them: guest RAM is 16 shared hugepages of 2 MiB while the guest waits."""
    emulator = Path(sys.executable).with_name("pyhv-qemu")
    if not os.access(emulator, os.X_OK):
        pytest.skip(f"{emulator}: pyhv-qemu is not installed")
    free = hugepages_2m
    out = tmp_path / "serial.log"
    proc = subprocess.Popen(
        [str(emulator), "-machine", "pc,accel=kvm,mem-merge=off,memory-backend=pc.ram",
         "-m", "32", "-object", '{"qom-type":"memory-backend-memfd","id":"pc.ram",'
         '"hugetlb":true,"hugetlbsize":2097152,"share":true,"prealloc":true,'
         '"size":33554432}', "-overcommit", "mem-lock=on", "-nodefaults",
         "-display", "none", "-kernel", str(guests.pvh_elf), "-append",
         "pyhv.wait=powerbutton", "-serial", f"file:{out}"],
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(out, "@waiting", proc)
        assert free_hugepages(HUGE_2M) == free - 16
        ram = mappings_of_size(proc.pid, 32 * 1024)
        # hugetlb pages are never swapped: mlock leaves them without "lo" (the kernel
        # skips hugetlb VMAs in mlock_fixup)
        assert ram and all("ht" in f and "sh" in f for f in ram), sorted(ram[0])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert free_hugepages(HUGE_2M) == free


# ---- libvirt: <locked/> and <nosharepages/> through pyhv-qemu ---------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from libvirt_daemon import LibvirtDaemon, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(why)
    import test_libvirt

    assert os.access(test_libvirt.EMULATOR, os.X_OK), "pyhv-qemu is not installed"
    with LibvirtDaemon(tmp_path_factory.mktemp("libvirt")) as d:
        yield d


def can_raise_memlock_limit() -> bool:
    """Whether a process here may raise its hard RLIMIT_MEMLOCK (libvirtd does, for
    <locked/>: to unlimited, or to <memtune><hard_limit>)."""
    code = ("import resource as r; r.setrlimit(r.RLIMIT_MEMLOCK, "
            "(r.RLIM_INFINITY, r.RLIM_INFINITY))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.libvirt
@pytest.mark.kvm
@pytest.mark.parametrize("locked", [False, True], ids=["nosharepages", "locked"])
def test_libvirt_memory_backing(daemon, guests, tmp_path, locked):
    import test_libvirt as lv

    if locked and not can_raise_memlock_limit():
        pytest.skip("this host does not let processes raise RLIMIT_MEMLOCK (libvirtd "
                    "must, to start a domain with <locked/>)")
    name = "lockedmem" if locked else "nosharepages"
    backing = "<nosharepages/>" + ("<locked/>" if locked else "")
    xml = lv.domain_xml(name, guests.pvh_elf, "pyhv.wait=powerbutton").replace(
        "<memory unit='MiB'>64</memory>", "<memory unit='MiB'>64</memory><memoryBacking>"
        f"{backing}</memoryBacking>")
    lv.define(daemon, tmp_path, name, xml)
    try:
        lv.virsh(daemon, "start", name)
        pid = int(daemon.host_path(f"/run/libvirt/qemu/{name}.pid").read_text())
        args = daemon.domain_log(name).read_text()
        assert "mem-merge=off" in args  # what libvirt passed
        assert ("mem-lock=on" in args) == locked
        assert (status_kib(pid, "VmLck") >= 64 * 1024) == locked
        ram = mappings_of_size(pid, 64 * 1024)
        assert ram and all(("lo" in f) == locked and "mg" not in f for f in ram), ram
    finally:
        lv.virsh(daemon, "destroy", name, check=False)
        lv.virsh(daemon, "undefine", name, check=False)


def test_memory_backing_domxml_round_trip():
    from pyhv.config import KernelBoot, VmConfig
    from pyhv.domxml import parse_domain, to_xml

    mb = MemoryBackingConfig("memfd", True, HUGE_2M, locked=True, discard=True, merge=False,
                             prealloc=True)
    cfg = VmConfig(KernelBoot("/k"), memory_backing=mb, shared_memory=True)
    xml = to_xml(cfg)
    assert "<nosharepages/>" in xml and '<allocation mode="immediate"/>' in xml
    back = parse_domain(xml.encode())
    assert back.memory_backing == mb and back.shared_memory
