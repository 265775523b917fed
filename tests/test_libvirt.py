"""Tier libvirt: a real libvirtd (private, started for these tests) runs pyhv-qemu as
its emulator, and unmodified virsh, virt-install and libvirt-python manage the
test guests.  The guests print their report on COM1 and power off when the ACPI
power button is pressed (``pyhv.wait=powerbutton``)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests.report import parse_report
from libvirt_daemon import LibvirtDaemon, unavailable_reason

pytestmark = [pytest.mark.libvirt, pytest.mark.kvm]

EMULATOR = str(Path(sys.executable).with_name("pyhv-qemu"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    assert os.access(EMULATOR, os.X_OK), f"{EMULATOR}: pyhv-qemu is not installed"
    with LibvirtDaemon(tmp_path_factory.mktemp("libvirt")) as d:
        yield d


def virsh(d: LibvirtDaemon, *args: str, check: bool = True,
          timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(["virsh", "-c", d.uri, *args], capture_output=True, text=True,
                       timeout=timeout, env=d.client_env())
    if check:
        assert p.returncode == 0, f"virsh {' '.join(args)}: {p.stderr}\n{log_tail(d, args)}"
    return p


def log_tail(d: LibvirtDaemon, args: tuple[str, ...]) -> str:
    for a in args:
        path = d.domain_log(a)
        if path.exists():
            return "--- domain log ---\n" + path.read_text(errors="replace")[-3000:]
    return ""


def domain_xml(name: str, kernel: Path, cmdline: str, serial: str = "<serial type='pty'>"
               "<target port='0'/></serial><console type='pty'><target type='serial'/>"
               "</console>", vcpus: int = 2) -> str:
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><cmdline>{cmdline}</cmdline></os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>
  <devices>
    <emulator>{EMULATOR}</emulator>
    {serial}
    <memballoon model='none'/>
  </devices>
</domain>"""


def define(d: LibvirtDaemon, tmp: Path, name: str, xml: str) -> None:
    f = tmp / f"{name}.xml"
    f.write_text(xml)
    virsh(d, "define", str(f))


def state(d: LibvirtDaemon, name: str) -> str:
    return virsh(d, "domstate", "--reason", name).stdout.strip()


def wait_state(d: LibvirtDaemon, name: str, want: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = state(d, name)
        if st == want or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


class Console:
    """The guest's serial console through libvirt (what `virsh console` uses): a
    blocking console stream drained by a thread."""

    def __init__(self, d: LibvirtDaemon, name: str, devname: str | None = None) -> None:
        import threading

        import libvirt

        self.conn = libvirt.open(d.uri)
        self.dom = self.conn.lookupByName(name)
        self.stream = self.conn.newStream(0)
        self.dom.openConsole(devname, self.stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.text = ""
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        import libvirt

        while True:
            try:
                data = self.stream.recv(4096)
            except libvirt.libvirtError:
                return
            if not isinstance(data, bytes) or not data:
                return
            self.text += data.decode("latin-1")

    def send(self, data: bytes) -> None:
        """Type into the console (what a person does in `virsh console`)."""
        view = memoryview(data)
        while view:
            n = self.stream.send(bytes(view))
            view = view[max(n, 0):]

    def read_until(self, needle: str, timeout: float = 60, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while self.text.count(needle) < count:
            assert time.monotonic() < deadline, f"{needle!r} not seen:\n{self.text[-2000:]}"
            time.sleep(0.05)
        return self.text

    def close(self) -> None:
        """Abort the stream and close the connection, from a thread of their own: the
        drain thread's blocking recv() can hold libvirt's client lock, and abort()
        racing it has been seen to wait forever.  A close that does not finish in 10 s
        is left behind (daemon threads; the private libvirtd's end unblocks them)."""
        import threading

        def close() -> None:
            try:
                self.stream.abort()
            except Exception:  # noqa: BLE001 - the stream may already be closed
                pass
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
        t = threading.Thread(target=close, daemon=True)
        t.start()
        t.join(timeout=10)


def test_domcapabilities(daemon):
    caps = virsh(daemon, "domcapabilities", "--emulatorbin", EMULATOR, "--virttype",
                 "kvm").stdout
    assert "<path>" + EMULATOR + "</path>" in caps
    assert re.search(r"<machine>pc-i440fx-7\.2</machine>", caps)
    assert "<domain>kvm</domain>" in caps
    # what pyhv does not have is not offered
    assert "<tpm supported='no'/>" in caps and "<sev supported='no'/>" in caps
    assert re.search(r"<graphics supported='yes'>\s*<enum name='type'/>", caps) or \
        "<graphics supported='no'/>" in caps
    virsh(daemon, "capabilities")


def test_lifecycle(daemon, guests, tmp_path):
    name = "lifecycle"
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf,
                                              "pyhv.wait=powerbutton via-libvirt"))
    assert re.search(rf"-\s+{name}\s+shut off", virsh(daemon, "list", "--all").stdout)
    virsh(daemon, "start", name)
    try:
        assert state(daemon, name) == "running (booted)"
        info = virsh(daemon, "dominfo", name).stdout
        assert re.search(r"State:\s+running", info) and re.search(r"CPU\(s\):\s+2", info)
        assert re.search(rf"\d+\s+{name}\s+running", virsh(daemon, "list").stdout)

        con = Console(daemon, name)
        text = con.read_until("@waiting")
        report = parse_report(text)
        assert report.cmdline == "pyhv.wait=powerbutton via-libvirt"
        assert report.cpu_count == 2 and report.ap_started == 1

        virsh(daemon, "suspend", name)
        assert state(daemon, name) == "paused (user)"
        virsh(daemon, "resume", name)
        assert state(daemon, name) == "running (unpaused)"

        # reboot: libvirt presses the power button, the guest powers off, libvirt
        # resets the machine and continues it: the guest boots a second time
        virsh(daemon, "reboot", name)
        con.read_until("@waiting", count=2)
        assert con.text.count("@begin") == 2
        # (libvirt records the reason as "booted" or "unpaused" depending on whether
        # the RESUME event or cont's reply reaches it first)
        assert state(daemon, name) in ("running (booted)", "running (unpaused)")

        virsh(daemon, "shutdown", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        con.close()

        virsh(daemon, "start", name)
        virsh(daemon, "destroy", name)
        assert state(daemon, name) == "shut off (destroyed)"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
    assert name not in virsh(daemon, "list", "--all", "--name").stdout.split()
    log = daemon.domain_log(name).read_text()
    assert "Traceback" not in log


def test_serial_to_file(daemon, guests, tmp_path):
    name = "serialfile"
    out = tmp_path / "serial.log"
    serial = f"<serial type='file'><source path='{out}'/><target port='0'/></serial>"
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf, "to-a-file", serial))
    try:
        virsh(daemon, "start", name)
        # the guest powers off by itself after its report: libvirt ends the domain
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        report = parse_report(out.read_text())
        assert report.complete and report.cmdline == "to-a-file"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_serial_log_file(daemon, guests, tmp_path):
    """``<serial type='pty'><log file=.../>`` (OpenStack Nova's console.log): the log
    gets everything the guest sends, with no console client attached."""
    name = "seriallog"
    log = tmp_path / "console.log"
    serial = (f"<serial type='pty'><log file='{log}' append='off'/><target port='0'/>"
              "</serial><console type='pty'><target type='serial'/></console>")
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf, "nova-console", serial))
    try:
        virsh(daemon, "start", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        report = parse_report(log.read_text())
        assert report.complete and report.cmdline == "nova-console"
        assert "logfile" in daemon.domain_log(name).read_text()  # libvirt passed it
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_emulator_killed_is_crashed(daemon, guests, tmp_path):
    name = "killed"
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf, "pyhv.wait=powerbutton"))
    try:
        virsh(daemon, "start", name)
        pidfile = daemon.host_path(f"/run/libvirt/qemu/{name}.pid")
        pid = int(pidfile.read_text())
        tty = virsh(daemon, "ttyconsole", name).stdout.strip()
        assert tty.startswith("/dev/pts/")
        os.kill(pid, signal.SIGKILL)
        assert wait_state(daemon, name, "shut off (crashed)") == "shut off (crashed)"
        # nothing stale: no process, no pid file, no monitor socket, no pty
        assert not os.path.exists(f"/proc/{pid}")
        assert not pidfile.exists()
        qemu_lib = daemon.host_path("/var/lib/libvirt/qemu")
        assert list(qemu_lib.iterdir()), "the private libvirt directory is not visible"
        assert not list(qemu_lib.glob(f"domain-*-{name}/*.sock")), list(qemu_lib.rglob("*"))
        assert not list(qemu_lib.glob(f"domain-*-{name}/*.monitor"))
        deadline = time.monotonic() + 5
        while os.path.exists(tty) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(tty), f"{tty} is still there"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_libvirt_python(daemon, guests):
    import libvirt

    conn = libvirt.open(daemon.uri)
    try:
        dom = conn.defineXML(domain_xml("pyapi", guests.pvh_elf, "pyhv.wait=powerbutton"))
        dom.create()
        assert dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        info = dom.info()
        assert info[3] == 2  # vCPUs
        con = Console(daemon, "pyapi")
        con.read_until("@waiting")  # the guest has armed its power button
        con.close()
        dom.shutdown()
        deadline = time.monotonic() + 60
        while dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN]
        dom.create()
        dom.destroy()
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
        dom.undefine()
    finally:
        conn.close()


def test_virt_install(daemon, guests, tmp_path):
    if not shutil.which("virt-install"):
        pytest.skip("virt-install is not installed")
    name = "vinstall"
    p = subprocess.run(
        ["virt-install", "--connect", daemon.uri, "--name", name, "--memory", "64",
         "--vcpus", "2", "--osinfo", "linux2022",
         "--boot", f"kernel={guests.pvh_elf},kernel_args=pyhv.wait=powerbutton installed,"
                   f"emulator={EMULATOR}",
         "--import", "--disk", "none", "--graphics", "none", "--noautoconsole",
         # virtio-net is not built yet; the default USB controller (qemu-xhci),
         # pcie-root-ports, virtio-rng, the balloon and the agent channel are
         "--network", "none"],
        capture_output=True, text=True, timeout=180, env=daemon.client_env())
    try:
        assert p.returncode == 0, p.stdout + p.stderr + log_tail(daemon, (name,))
        assert state(daemon, name) == "running (booted)"
        xml = virsh(daemon, "dumpxml", name).stdout
        assert "model='qemu-xhci'" in xml and "model='pcie-root-port'" in xml
        assert "<rng model='virtio'>" in xml
        con = Console(daemon, name)
        report = parse_report(con.read_until("@waiting"))
        assert report.cmdline == "pyhv.wait=powerbutton installed"
        con.close()
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_virsh_console(daemon, guests, tmp_path):
    """`virsh console` itself (it insists on a terminal: script(1) gives it one)."""
    if not shutil.which("script"):
        pytest.skip("script(1) (util-linux) is not installed")
    name = "console"
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf,
                                              "pyhv.wait=powerbutton on-the-console"))
    try:
        virsh(daemon, "start", name)
        p = subprocess.run(["timeout", "8", "script", "-qfec",
                            f"virsh -c '{daemon.uri}' console {name} --force", "/dev/null"],
                           capture_output=True, text=True, env=daemon.client_env(),
                           timeout=60)
        out = p.stdout.replace("\r", "")
        assert f"Connected to domain '{name}'" in out, out
        report = parse_report(out[out.index("@begin"):])
        assert report.cmdline == "pyhv.wait=powerbutton on-the-console"
        assert report.waiting is not None
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_console_input_reaches_the_guest(daemon, guests, tmp_path):
    """What a user types in `virsh console` (libvirt's console stream onto the pty)
    reaches the guest's COM1: the echo guest sends the line back."""
    name = "typing"
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf, "pyhv.wait=echo"))
    line = "typed into virsh console: " + "0123456789" * 8  # more than the UART's FIFO
    try:
        virsh(daemon, "start", name)
        con = Console(daemon, name)
        con.read_until("@echo-ready")
        con.send(line.encode() + b"\r")
        text = con.read_until("@poweroff")  # after the echo, the guest powers off
        con.close()
        assert f"@echo {line}" in text.replace("\r", ""), text[-2000:]
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_as_libvirt_qemu_user(guests, tmp_path_factory):
    """libvirt's default deployment: the emulator runs as libvirt-qemu in a private
    /dev namespace (which is how it reaches /dev/kvm), not as root."""
    why = unavailable_reason()
    if why:
        pytest.skip(why)
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        pytest.skip("no libvirt-qemu user (Debian's libvirt-daemon-system creates it)")
    reach = subprocess.run(["runuser", "-u", "libvirt-qemu", "--", "test", "-x", EMULATOR])
    if reach.returncode != 0:
        pytest.skip(f"{EMULATOR} is not reachable by libvirt-qemu (a checkout under a "
                    "private home directory)")
    public = Path("/var/tmp") / f"pyhv-test-{os.getpid()}"
    public.mkdir(mode=0o755, exist_ok=True)
    kernel = public / "pvh.elf"
    shutil.copy(guests.pvh_elf, kernel)
    kernel.chmod(0o644)
    name = "unprivileged"
    try:
        with LibvirtDaemon(tmp_path_factory.mktemp("libvirt-user"), qemu_user="libvirt-qemu",
                           qemu_group="libvirt-qemu", namespaces=["mount"]) as d:
            define(d, tmp_path_factory.mktemp("xml"), name,
                   domain_xml(name, kernel, "pyhv.wait=powerbutton as-libvirt-qemu"))
            virsh(d, "start", name)
            pid = int(d.host_path(f"/run/libvirt/qemu/{name}.pid").read_text())
            with open(f"/proc/{pid}/status") as f:
                uid = next(line.split()[1] for line in f if line.startswith("Uid:"))
            assert int(uid) == pwd.getpwnam("libvirt-qemu").pw_uid
            con = Console(d, name)
            report = parse_report(con.read_until("@waiting"))
            assert report.cmdline == "pyhv.wait=powerbutton as-libvirt-qemu"
            con.close()
            virsh(d, "shutdown", name)
            assert wait_state(d, name, "shut off (shutdown)") == "shut off (shutdown)"
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_domains_survive_a_libvirtd_restart(daemon, guests, tmp_path):
    """libvirtd restarts on every package upgrade: it reconnects to each running
    emulator over QMP, and a running or paused pyhv domain must stay as it was and
    stay manageable (console, reboot, shutdown, resume, destroy)."""
    running, paused = "survivor", "survivor-paused"
    for name in (running, paused):
        define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf,
                                                  f"pyhv.wait=powerbutton {name}"))
    try:
        virsh(daemon, "start", running)
        virsh(daemon, "start", paused)
        con = Console(daemon, running)
        con.read_until("@waiting")
        con.close()
        virsh(daemon, "suspend", paused)
        pids = {n: int(daemon.host_path(f"/run/libvirt/qemu/{n}.pid").read_text())
                for n in (running, paused)}

        daemon.restart_libvirtd()

        assert state(daemon, running) == "running (booted)"
        assert state(daemon, paused) == "paused (user)"
        for n, pid in pids.items():
            assert os.path.exists(f"/proc/{pid}"), f"{n}: the emulator is gone"
            assert int(daemon.host_path(f"/run/libvirt/qemu/{n}.pid").read_text()) == pid
        # the console works through the new daemon: a reboot shows a second boot on it
        con = Console(daemon, running)
        virsh(daemon, "reboot", running)
        report = parse_report(con.read_until("@waiting"))
        assert report.cmdline == f"pyhv.wait=powerbutton {running}"
        con.close()
        virsh(daemon, "shutdown", running)
        assert wait_state(daemon, running, "shut off (shutdown)") == "shut off (shutdown)"

        virsh(daemon, "resume", paused)
        assert state(daemon, paused) == "running (unpaused)"
        virsh(daemon, "destroy", paused)
        assert state(daemon, paused) == "shut off (destroyed)"
        assert not os.path.exists(f"/proc/{pids[paused]}")
    finally:
        for name in (running, paused):
            virsh(daemon, "destroy", name, check=False)
            virsh(daemon, "undefine", name, check=False)
    for name in (running, paused):
        assert "Traceback" not in daemon.domain_log(name).read_text()


def _controller_addresses(xml: str) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    """(type, model, index) -> (bus, slot, function) of each controller on PCI."""
    from lxml import etree

    out = {}
    for c in etree.fromstring(xml.encode()).iter("controller"):
        a = c.find("address")
        if a is not None and a.get("type") == "pci":
            out[(c.get("type"), c.get("model") or "", c.get("index"))] = (
                int(a.get("bus"), 0), int(a.get("slot"), 0), int(a.get("function"), 0))
    return out


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit-addresses", "libvirt-placed"])
def test_guest_sees_the_pci_addresses_libvirt_shows(daemon, guests, tmp_path, explicit):
    """virsh dumpxml's PCI addresses are where the guest finds the functions: a q35
    domain whose root ports and xHCI have explicit <address>es, and a pc domain
    whose USB controller libvirt placed itself."""
    from guests.report import parse_report

    name = "pciview" + ("-explicit" if explicit else "-placed")
    if explicit:
        ports = "".join(
            f"<controller type='pci' index='{i}' model='pcie-root-port'>"
            f"<target chassis='{i}' port='{0x10 + i - 1:#x}'/>"
            f"<address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='{i - 1:#x}'"
            f"{' multifunction=' + chr(39) + 'on' + chr(39) if i == 1 else ''}/></controller>"
            for i in (1, 2, 3))
        usb = ("<controller type='usb' index='0' model='qemu-xhci'>"
               "<address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>"
               "</controller>")
        xml = domain_xml(name, guests.pvh_elf, "pyhv.pci pyhv.wait=powerbutton")
        xml = xml.replace("machine='pc'", "machine='q35'").replace(
            "<memballoon model='none'/>", ports + usb + "<memballoon model='none'/>")
    else:
        xml = domain_xml(name, guests.pvh_elf, "pyhv.pci pyhv.wait=powerbutton")
    define(daemon, tmp_path, name, xml)
    try:
        virsh(daemon, "start", name)
        con = Console(daemon, name)
        report = parse_report(con.read_until("@waiting"))
        con.close()
        dumped = _controller_addresses(virsh(daemon, "dumpxml", name).stdout)
        by_bdf = {(f.bus, f.slot, f.function): f for f in report.pci}
        # a root port's secondary bus, as the guest found it, for libvirt's bus index
        secondary = {0: 0}
        for (_ctype, model, index), (bus, slot, fn) in dumped.items():
            if model == "pcie-root-port":
                port = by_bdf[(0, slot, fn)]
                assert port.class_code == 0x060400 and bus == 0
                secondary[int(index)] = port.secondary
        usb = [(k, v) for k, v in dumped.items() if k[0] == "usb"]
        assert usb, dumped
        for (_ctype, model, _index), (bus, slot, fn) in usb:
            f = by_bdf[(secondary[bus], slot, fn)]
            assert f.class_code >> 8 == 0x0C03, (model, f)
            want = {"qemu-xhci": 0x30, "piix3-uhci": 0x00}[model]
            assert f.class_code & 0xFF == want
        if not explicit:  # libvirt's own choice on pc: the PIIX3 UHCI at 00:01.2
            assert usb[0][1] == (0, 1, 2)
        virsh(daemon, "shutdown", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_virt_install_with_a_disk(daemon, guests, tmp_path):
    """virt-install --disk path=IMG (q35, root ports, xHCI, rng as it chooses): the raw
    disk is built, and virsh domblklist/domblkinfo/domblkstat answer from pyhv."""
    if not shutil.which("virt-install"):
        pytest.skip("virt-install is not installed")
    name = "withdisk"
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (8 << 20))
    p = subprocess.run(
        ["virt-install", "--connect", daemon.uri, "--name", name, "--memory", "64",
         "--vcpus", "1", "--osinfo", "debian11",
         "--boot", f"kernel={guests.pvh_elf},kernel_args=pyhv.wait=powerbutton,"
                   f"emulator={EMULATOR}",
         "--import", "--disk", f"path={image}", "--graphics", "none", "--noautoconsole",
         # still to come: virtio-net
         "--network", "none"],
        capture_output=True, text=True, timeout=180, env=daemon.client_env())
    try:
        assert p.returncode == 0, p.stdout + p.stderr + log_tail(daemon, (name,))
        assert state(daemon, name) == "running (booted)"
        assert str(image) in virsh(daemon, "domblklist", name).stdout
        # the guest agent channel virt-install adds: a virtio-serial port on the unix
        # socket libvirt opened; this guest has no agent, so libvirt shows it closed
        xml = virsh(daemon, "dumpxml", name).stdout
        assert re.search(r"<channel type='unix'>.*?name='org.qemu.guest_agent.0' "
                         r"state='disconnected'", xml, re.S), xml
        assert "<controller type='virtio-serial'" in xml
        info = virsh(daemon, "domblkinfo", name, "vda").stdout
        assert re.search(r"Capacity:\s+8388608", info), info
        # virsh blockresize: libvirt's block_resize reaches the image and the device
        virsh(daemon, "blockresize", name, "vda", "16M")
        assert image.stat().st_size == 16 << 20
        info = virsh(daemon, "domblkinfo", name, "vda").stdout
        assert re.search(r"Capacity:\s+16777216", info), info
        stat = virsh(daemon, "domblkstat", name, "vda").stdout
        assert re.search(r"rd_req\s+\d+", stat) and re.search(r"flush_operations\s+\d+", stat)
        # the balloon virt-install adds: libvirt reads and sets it over QMP
        mem = virsh(daemon, "dommemstat", name).stdout
        assert re.search(r"actual\s+65536", mem), mem
        virsh(daemon, "setmem", name, "49152")  # the guest has no balloon driver to obey
        virsh(daemon, "dommemstat", name, "--period", "2", "--live")
        # the image is locked as QEMU locks it: a second writer is refused
        q = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)],
                           capture_output=True, text=True, timeout=60)
        assert q.returncode != 0 and "lock" in (q.stdout + q.stderr).lower()
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_a_full_disk_pauses_the_domain_until_resume(daemon, guests, tmp_path):
    """QEMU's default werror=enospc under libvirt: the image lives on a tmpfs that is
    full, so the guest's first write (the test guest's virtio-blk driver) fails with
    ENOSPC.  pyhv holds the request and sends BLOCK_IO_ERROR then STOP: libvirt shows
    "paused (I/O error)" and virsh domblkerror "no space".  Room is made, virsh resume
    retries the write, the guest finishes its report and the sector is on disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    # mounted where libvirtd and the emulator see it; reached from here through /proc
    mounted = daemon.in_namespace("mount", "-t", "tmpfs", "-o", "size=256k", "pyhv-test",
                                  str(mnt))
    assert mounted.returncode == 0, mounted.stderr
    name = "fulldisk"
    try:
        image = mnt / "disk.img"
        here = daemon.namespace_path(mnt)
        with open(here / "disk.img", "wb") as f:
            f.truncate(1 << 20)                      # sparse: every write needs a page
        filler = here / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\xff" * 4096):
                pass
        except OSError:
            pass                                     # ENOSPC: the tmpfs is full
        finally:
            os.close(fd)
        out = tmp_path / "serial.log"
        devices = (f"<serial type='file'><source path='{out}'/><target port='0'/></serial>"
                   "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                   f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>")
        define(daemon, tmp_path, name,
               domain_xml(name, guests.pvh_elf, "pyhv.pci pyhv.virtio=msix", devices))
        virsh(daemon, "start", name)
        st = wait_state(daemon, name, "paused (I/O error)")
        assert st == "paused (I/O error)", st + log_tail(daemon, (name,))
        assert re.search(r"vda:\s+no space", virsh(daemon, "domblkerror", name).stdout)
        filler.unlink()
        virsh(daemon, "resume", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        report = parse_report(out.read_text())
        assert report.complete and not report.errors, report.errors
        steps = dict(report.virtio[0].steps)
        assert steps["write"]["status"] == 0 and steps["read"]["diff"] == 0
        with open(here / "disk.img", "rb") as f:
            f.seek(512)
            assert f.read(512) == bytes((i * 7 + 3) & 0xFF for i in range(512))
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
        daemon.in_namespace("umount", "-l", str(mnt))


def test_block_write_threshold_event(daemon, guests, tmp_path):
    """virsh domblkthreshold arms QMP block-set-write-threshold (domstats shows it);
    the guest's first write past it (the test guest's virtio-blk driver writes sector
    1, bytes 512-1023) becomes BLOCK_WRITE_THRESHOLD, which virsh event reports with
    the threshold and the excess."""
    name = "threshold"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    devices = ("<serial type='file'><source path='/dev/null'/><target port='0'/></serial>"
               "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
               f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>")
    define(daemon, tmp_path, name,
           domain_xml(name, guests.pvh_elf, "pyhv.pci pyhv.virtio=msix pyhv.wait=powerbutton",
                      devices))
    events = None
    try:
        virsh(daemon, "start", "--paused", name)
        virsh(daemon, "domblkthreshold", name, "vda", "600")
        stats = virsh(daemon, "domstats", "--block", name).stdout
        assert re.search(r"block\.0\.threshold=600\b", stats), stats
        events = subprocess.Popen(["virsh", "-c", daemon.uri, "event", name,
                                   "--event", "block-threshold", "--timeout", "60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=daemon.client_env())
        time.sleep(1)                                # virsh event registers first
        virsh(daemon, "resume", name)
        out, err = events.communicate(timeout=90)
        assert "block-threshold" in out and "vda" in out, out + err
        assert re.search(r"\b600\b.*\b424\b", out), out
        stats = virsh(daemon, "domstats", "--block", name).stdout
        assert not re.search(r"block\.0\.threshold=", stats), stats   # disarmed
    finally:
        if events is not None and events.poll() is None:
            events.kill()
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_virtio_console_and_channel(daemon, guests, tmp_path):
    """A virtio console (`virsh console --devname console1` reads the guest's hvc0
    through the pty query-chardev named) and a named channel on a unix socket: the
    guest opening the port shows in libvirt's live XML (state='connected', from
    VSERPORT_CHANGE), bytes go both ways, and the close shows too."""
    import socket

    name = "vserial"
    sock = tmp_path / "test.sock"
    devices = ("<serial type='pty'><target port='0'/></serial>"
               "<console type='pty'><target type='serial'/></console>"
               "<console type='pty'><target type='virtio'/></console>"
               f"<channel type='unix'><source mode='bind' path='{sock}'/>"
               "<target type='virtio' name='org.pyhv.test.0'/></channel>")
    define(daemon, tmp_path, name, domain_xml(
        name, guests.pvh_elf, "console=ttyS0 pyhv.pci pyhv.virtio-console=msix", devices))
    client = socket.socket(socket.AF_UNIX)
    try:
        virsh(daemon, "start", "--paused", name)
        xml = virsh(daemon, "dumpxml", name).stdout
        # the pty pyhv made, as query-chardev named it
        assert re.search(r"<console type='pty'>\s*<source path='/dev/pts/\d+'/>\s*"
                         r"<target type='virtio' port='1'/>", xml), xml
        assert "name='org.pyhv.test.0' state='disconnected'" in xml, xml
        hvc = Console(daemon, name, "console1")
        client.connect(str(sock))
        client.settimeout(30)
        virsh(daemon, "resume", name)
        hvc.read_until("hello hvc0\n", timeout=30)
        got = b""
        while not got.endswith(b"\n"):
            got += client.recv(100)
        assert got == b"hello port1\n"
        # the guest opened port 1 before writing: libvirt heard VSERPORT_CHANGE
        xml = virsh(daemon, "dumpxml", name).stdout
        assert "name='org.pyhv.test.0' state='connected'" in xml, xml
        client.sendall(b"ping\n")
        got = b""
        while not got.endswith(b"\n"):
            got += client.recv(100)
        assert got == b"echo:ping\n"
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        hvc.close()
    finally:
        client.close()
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_virt_install_qcow2_volume_in_a_pool(daemon, guests, tmp_path):
    """virt-install --disk pool=P,size=1: libvirt's storage driver makes a qcow2
    volume (qemu-img create) and the domain starts on it under pyhv-qemu; the
    image is the qcow2 libvirt made, and query-block reports it as such."""
    if not shutil.which("virt-install"):
        pytest.skip("virt-install is not installed")
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    virsh(daemon, "pool-define-as", "pyhvpool", "dir", "--target", str(pool_dir))
    virsh(daemon, "pool-start", "pyhvpool")
    name = "qcow2vol"
    try:
        p = subprocess.run(
            ["virt-install", "--connect", daemon.uri, "--name", name, "--memory", "64",
             "--vcpus", "1", "--osinfo", "debian11",
             "--boot", f"kernel={guests.pvh_elf},kernel_args=pyhv.wait=powerbutton,"
                       f"emulator={EMULATOR}",
             "--import", "--disk", "pool=pyhvpool,size=1", "--graphics", "none",
             "--noautoconsole", "--network", "none"],
            capture_output=True, text=True, timeout=180, env=daemon.client_env())
        assert p.returncode == 0, p.stdout + p.stderr + log_tail(daemon, (name,))
        assert state(daemon, name) == "running (booted)"
        (image,) = pool_dir.glob("*.qcow2")
        assert image.read_bytes()[:4] == b"QFI\xfb"
        xml = virsh(daemon, "dumpxml", name).stdout
        assert "<driver name='qemu' type='qcow2'" in xml, xml
        info = virsh(daemon, "domblkinfo", name, "vda").stdout
        assert re.search(r"Capacity:\s+1073741824", info), info
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, "--remove-all-storage", check=False)
        virsh(daemon, "pool-destroy", "pyhvpool", check=False)
        virsh(daemon, "pool-undefine", "pyhvpool", check=False)


def test_9p_filesystem(daemon, guests, tmp_path):
    """<filesystem type='mount'> (libvirt's -fsdev local + virtio-9p-pci): the domain
    starts with pyhv's virtio-9p device on the directory, in the access mode asked."""
    share = tmp_path / "share"
    share.mkdir()
    name = "ninep"
    fs = (f"<filesystem type='mount' accessmode='mapped'><source dir='{share}'/>"
          "<target dir='hostshare'/><readonly/></filesystem>")
    xml = domain_xml(name, guests.pvh_elf, "pyhv.wait=powerbutton")
    define(daemon, tmp_path, name, xml.replace("<memballoon", fs + "<memballoon"))
    try:
        virsh(daemon, "start", name)
        assert state(daemon, name) == "running (booted)", log_tail(daemon, (name,))
        argv = daemon.domain_log(name).read_text()
        assert "-fsdev" in argv and "security_model=mapped" in argv and \
            "virtio-9p-pci" in argv and "hostshare" in argv, argv[-3000:]
        xml = virsh(daemon, "dumpxml", name).stdout
        assert re.search(r"<filesystem type='mount' accessmode='mapped'>.*?"
                         r"<alias name='fs0'/>\s*<address type='pci'", xml, re.S), xml
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_com2_on_a_pty(daemon, guests, tmp_path):
    """<serial type='pty'><target port='1'/>: COM2 on a pty libvirt learns from
    query-chardev (live XML shows its path), beside COM1."""
    name = "com2"
    serials = ("<serial type='pty'><target port='0'/></serial>"
               "<serial type='pty'><target port='1'/></serial>"
               "<console type='pty'><target type='serial'/></console>")
    define(daemon, tmp_path, name, domain_xml(name, guests.pvh_elf, "pyhv.wait=powerbutton",
                                              serials))
    try:
        virsh(daemon, "start", name)
        assert state(daemon, name) == "running (booted)", log_tail(daemon, (name,))
        xml = virsh(daemon, "dumpxml", name).stdout
        ptys = re.findall(r"<serial type='pty'>\s*<source path='(/dev/pts/\d+)'/>", xml)
        assert len(ptys) == 2 and ptys[0] != ptys[1], xml
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def test_vhostuser_disk(daemon, guests, tmp_path):
    """<disk type='vhostuser'> (libvirt's -chardev socket + vhost-user-blk-pci, shared
    memfd memory): pyhv-qemu connects to a pyhv vhost-user-blk backend and the test
    guest's virtio-blk driver reads and writes through it."""
    import sys

    image = tmp_path / "disk.img"
    image.write_bytes(b"PYHV" * 256 + bytes((1 << 20) - 1024))
    sock = tmp_path / "blk.sock"
    backend = subprocess.Popen([sys.executable, "-m", "pyhv", "vhost-user-blk", "--socket",
                                str(sock), "--disk", str(image)], stderr=subprocess.PIPE,
                               text=True)
    name = "vhostuserdisk"
    out = tmp_path / "serial.log"
    serial = f"<serial type='file'><source path='{out}'/><target port='0'/></serial>"
    disk = (f"<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>"
            f"<source type='unix' path='{sock}'><reconnect enabled='yes' timeout='5'/>"
            "</source><target dev='vda' bus='virtio'/></disk>")
    xml = domain_xml(name, guests.pvh_elf, "pyhv.pci pyhv.virtio=msix", serial)
    xml = xml.replace("<devices>", "<memoryBacking><source type='memfd'/><access "
                                   "mode='shared'/></memoryBacking><devices>")
    define(daemon, tmp_path, name, xml.replace("<memballoon", disk + "<memballoon"))
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert backend.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        virsh(daemon, "start", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        argv = daemon.domain_log(name).read_text()
        assert "vhost-user-blk-pci" in argv and "reconnect=5" in argv, argv[-3000:]
        text = out.read_text()
        report = parse_report(text)
        assert report.complete and not report.errors, text[-3000:]
        steps = {name: f for v in report.virtio for name, f in v.steps}
        assert steps["blk-config"]["capacity"] == (1 << 20) // 512
        assert steps["read0"]["status"] == 0 and steps["write"]["status"] == 0
        assert image.read_bytes()[512:1024] != (b"PYHV" * 256)[512:1024]  # the write landed
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
        backend.terminate()
        backend.communicate(timeout=20)


def test_sysinfo_smbios_reaches_the_guest(daemon, guests, tmp_path):
    """OpenStack Nova's <sysinfo type='smbios'> with <smbios mode='sysinfo'/>: libvirt
    passes -smbios type=1,... and the guest reads them from pyhv's SMBIOS tables."""
    name = "sysinfo"
    out = tmp_path / "serial.log"
    serial = f"<serial type='file'><source path='{out}'/><target port='0'/></serial>"
    xml = domain_xml(name, guests.pvh_elf, "pyhv.smbios", serial)
    xml = xml.replace("<os>", "<uuid>1c8a1f6e-4c7a-4a28-9a3c-5e5b1d0f2a77</uuid>"
                              "<sysinfo type='smbios'><system>"
                              "<entry name='manufacturer'>OpenStack Foundation</entry>"
                              "<entry name='product'>OpenStack Nova</entry>"
                              "<entry name='serial'>nova-serial-1</entry>"
                              "</system></sysinfo><os>")
    xml = xml.replace("</os>", "<smbios mode='sysinfo'/></os>")
    # Nova adds <vmcoreinfo/> to every x86 guest: libvirt passes -device vmcoreinfo
    xml = xml.replace("<apic/>", "<apic/><vmcoreinfo/>")
    define(daemon, tmp_path, name, xml)
    try:
        virsh(daemon, "start", name)
        assert wait_state(daemon, name, "shut off (shutdown)") == "shut off (shutdown)"
        argv = daemon.domain_log(name).read_text()
        assert "-smbios" in argv and "OpenStack Nova" in argv, argv[-3000:]
        assert "vmcoreinfo" in argv, argv[-3000:]
        text = out.read_text()
        m = re.search(r"^@smbios-system (.*)$", text, re.M)
        assert m, text[-3000:]
        assert "manufacturer=OpenStack" in m.group(1) and "serial=nova-serial-1" in m.group(1)
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)


def _q35_with_spare_ports(name: str, kernel: Path, cmdline: str, ports: int = 2) -> str:
    spare = "".join(f"<controller type='pci' index='{i}' model='pcie-root-port'/>"
                    for i in range(1, ports + 1))
    xml = domain_xml(name, kernel, cmdline, vcpus=1)
    xml = xml.replace("machine='pc'", "machine='q35'")
    return xml.replace("<memballoon model='none'/>", spare + "<memballoon model='none'/>")


def test_disk_hotplug(daemon, guests, tmp_path):
    """`virsh attach-disk --live` / `detach-disk --live` on a q35 domain with a spare
    root port, the guest running the test kit's hotplug driver (``pyhv.hotplug``:
    pciehp's steps): libvirt's blockdev-add + device_add put a virtio-blk disk into
    the empty root port, the guest powers the slot on and reads the disk's capacity;
    on detach the guest powers the slot off, pyhv sends DEVICE_DELETED and libvirt
    drops the disk from the live XML (and its nodes with blockdev-del)."""
    name = "hotdisk"
    image = tmp_path / "hot.img"
    image.write_bytes(b"\0" * (1 << 20))
    define(daemon, tmp_path, name, _q35_with_spare_ports(
        name, guests.pvh_elf, "pyhv.pci pyhv.hotplug pyhv.wait=echo"))
    try:
        virsh(daemon, "start", name)
        con = Console(daemon, name)
        con.read_until("@hotplug step=ready")
        virsh(daemon, "attach-disk", name, str(image), "vdb", "--targetbus", "virtio",
              "--live")
        assert "<target dev='vdb' bus='virtio'/>" in virsh(daemon, "dumpxml", name).stdout
        qom = virsh(daemon, "qemu-monitor-command", name,
                    '{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}').stdout
        assert "virtio-disk" in qom, qom
        blocks = virsh(daemon, "qemu-monitor-command", name,
                       '{"execute":"query-named-block-nodes"}').stdout
        assert str(image) in blocks, blocks
        text = con.read_until("@hotplug step=unplug-ready")
        device = next(ln for ln in text.splitlines() if "@hotplug step=device" in ln)
        assert "device=0x1042" in device and "capacity=2048" in device, device
        virsh(daemon, "detach-disk", name, "vdb", "--live")
        text = con.read_until("@echo-ready")  # the guest waits after its report
        con.close()
        assert "@hotplug step=removed" in text, text[-2000:]
        assert str(image) not in virsh(daemon, "domblklist", name).stdout
        blocks = virsh(daemon, "qemu-monitor-command", name,
                       '{"execute":"query-named-block-nodes"}').stdout
        assert str(image) not in blocks, blocks  # libvirt's blockdev-del went through
        assert "running" in state(daemon, name)
    finally:
        virsh(daemon, "destroy", name, check=False)
        virsh(daemon, "undefine", name, check=False)
