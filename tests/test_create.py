"""``pyhv create`` and ``virsh-fsvm``: VMs built from directory trees.

- the VmConfig create builds and the domain XML virsh-fsvm writes, read back
  through pyhv's own describe path and domain-XML parser;
- one-line errors for bad arguments;
- the bundle's init for real, under ``qemu-system-x86_64 -accel tcg`` with QEMU's
  own virtio-9p and virtio-serial (Linux cannot boot to userspace under pyhv's KVM
  on a PVM host): the kernel command line ``pyhv create`` gives, the command runs in
  the trees and its exit status comes back on the ``org.pyhv.exit`` port;
- ``pyhv create`` under pyhv itself (tier ``hwvirt``);
- virsh-fsvm through a private libvirtd (tier ``libvirt``).
"""

from __future__ import annotations

import base64
import glob
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from pyhv import bundle
from pyhv.config import MiB

REPO = Path(__file__).resolve().parent.parent
FSVM = REPO / "virsh-plugins" / "virsh-fsvm"
GENERIC = sorted(glob.glob(f"{bundle.GENERIC_KERNELS}/linux-image-*-amd64/boot/vmlinuz-*"))
QEMU = shutil.which("qemu-system-x86_64")


def pyhv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def fsvm_module() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("virsh_fsvm", str(FSVM))
    spec = importlib.util.spec_from_loader("virsh_fsvm", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_bundle(tmp_path: Path) -> bundle.Bundle:
    """A bundle's layout (its files are not booted by the tests that use it)."""
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "vmlinux").write_bytes(b"\x7fELF")
    (b / "initramfs.img").write_bytes(b"")
    (b / "release").write_text("6.1.0-test\n")
    return bundle.Bundle.open(b)


@pytest.fixture(scope="module")
def generic_bundle(tmp_path_factory: pytest.TempPathFactory) -> bundle.Bundle:
    if not GENERIC:
        pytest.skip(f"Debian's generic kernel is not unpacked under {bundle.GENERIC_KERNELS} "
                    "(scripts/setup does it)")
    out = tmp_path_factory.mktemp("bundle")
    p = pyhv("import-kernel", "--kernel", GENERIC[-1], "--output", str(out))
    assert p.returncode == 0, p.stderr
    return bundle.Bundle.open(out)


def busybox_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    return root


def decoded_argv(cmdline: str) -> list[str]:
    cmd = next(w for w in cmdline.split() if w.startswith("pyhv.cmd="))[len("pyhv.cmd="):]
    return shlex.split(base64.b64decode(cmd).decode())


# --- the machine create builds ---------------------------------------------------------

def test_create_config(tmp_path: Path, fake_bundle: bundle.Bundle) -> None:
    from pyhv.domxml.check import describe

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    up = tmp_path / "up"
    up.mkdir()
    argv = ["/bin/ls", "-l", "a dir"]
    cfg = bundle.create_config([str(a), str(b)], argv, fake_bundle, str(tmp_path / "exit"),
                               cpus=2, memory="512M", upper=str(up))
    assert cfg.vcpus == 2 and cfg.memory == 512 * MiB
    assert cfg.boot.kernel == str(fake_bundle.vmlinux)
    assert cfg.boot.initrd == str(fake_bundle.initramfs)
    cmdline = cfg.boot.cmdline
    assert decoded_argv(cmdline) == argv
    assert "console=hvc0" in cmdline.split() and "pyhv.roots=1" in cmdline.split()
    text = "\n".join(describe(cfg))
    # the trees are one export: pyhv's 9P server layers them, writes land in up/
    assert f"filesystem pyhvroot0: virtio-9p, {up} over {b}, {a} (read-only) " \
        "(passthrough)" in text
    assert len(cfg.filesystems) == 1 and cfg.filesystems[0].lower == (str(a), str(b))
    with pytest.raises(bundle.BundleError, match="--upper"):
        bundle.create_config([str(a), str(b)], argv, fake_bundle, str(tmp_path / "exit"))
    with pytest.raises(bundle.BundleError, match="also given as --root"):
        bundle.check_upper(str(a), [str(a), str(b)])
    assert f"port 1 channel org.pyhv.exit: file {tmp_path / 'exit'}" in text
    assert "port 0 console hvc0: virtio-console, stdio" in text
    assert "serial COM1: isa-serial, null" in text
    assert text.endswith("pyhv run can build this machine")
    # one tree, --com1: the tree is writable, the console is COM1 on stdio
    cfg = bundle.create_config([str(a)], ["true"], fake_bundle, str(tmp_path / "exit"),
                               com1=True)
    text = "\n".join(describe(cfg))
    assert f"filesystem pyhvroot0: virtio-9p, {a} (passthrough)" in text
    assert "serial COM1: isa-serial, stdio" in text
    assert "console=ttyS0" in cfg.boot.cmdline.split()
    assert not cfg.extra_serials


def test_create_errors(tmp_path: Path, fake_bundle: bundle.Bundle) -> None:
    tree = str(tmp_path)
    kb = str(fake_bundle.path)
    one_line_error(pyhv("create", "--kernel", kb, "--", "/bin/ls"), "--root")
    one_line_error(pyhv("create", "--root", str(tmp_path / "nope"), "--kernel", kb, "--", "ls"),
                   f"--root {tmp_path / 'nope'}: no such directory")
    one_line_error(pyhv("create", "--root", tree, "--kernel", kb), "no command")
    one_line_error(pyhv("create", "--root", tree, "--kernel", kb, "--"), "no command")
    one_line_error(pyhv("create", "--root", tree, "--kernel", kb, "--memory", "lots", "--",
                        "ls"), "--memory")
    one_line_error(pyhv("create", "--root", tree, "--kernel", kb, "--memory", "1M", "--",
                        "ls"), "memory", "too small")
    one_line_error(pyhv("create", "--root", tree, "--kernel", str(tmp_path), "--", "ls"),
                   "not a kernel bundle", "pyhv import-kernel")


def test_create_takes_the_command_after_the_double_dash() -> None:
    from pyhv.cli import build_parser

    ns = build_parser().parse_args(["create", "--root", "x", "--", "ls", "--com1", "-l"])
    assert ns.argv == ["--", "ls", "--com1", "-l"] and not ns.com1
    ns = build_parser().parse_args(["create", "--com1", "--root", "x", "--root", "y", "ls"])
    assert ns.argv == ["ls"] and ns.com1 and ns.root == ["x", "y"]


def test_create_reports_a_kernel_the_engine_cannot_load(tmp_path: Path,
                                                        fake_bundle: bundle.Bundle) -> None:
    one_line_error(pyhv("create", "--kernel", str(fake_bundle.path), "--root", str(tmp_path),
                        "--", "ls"), str(fake_bundle.vmlinux))


# --- virsh-fsvm's domain ---------------------------------------------------------------

def test_fsvm_domain_xml_parses(tmp_path: Path, fake_bundle: bundle.Bundle) -> None:
    from pyhv.domxml import parse_domain

    fsvm = fsvm_module()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    exit_file = str(tmp_path / "exit")
    xml = fsvm.domain_xml("fsvm-t", [str(a), str(b)], ["/bin/echo", "hi there"], fake_bundle,
                          "/usr/bin/pyhv-qemu", exit_file, cpus=2, memory_mib=128)
    cfg = parse_domain(xml)
    assert cfg.name == "fsvm-t" and cfg.vcpus == 2 and cfg.memory == 128 * MiB
    assert cfg.emulator == "/usr/bin/pyhv-qemu"
    assert cfg.boot.kernel == str(fake_bundle.vmlinux.resolve())
    assert cfg.boot.initrd == str(fake_bundle.initramfs.resolve())
    assert decoded_argv(cfg.boot.cmdline) == ["/bin/echo", "hi there"]
    assert "console=ttyS0" in cfg.boot.cmdline.split()
    assert [(f.source, f.tag, f.readonly, f.accessmode) for f in cfg.filesystems] == [
        (str(a), "pyhvroot0", True, "passthrough"), (str(b), "pyhvroot1", True, "passthrough")]
    assert [(c.name, c.chardev.kind, c.chardev.path) for c in cfg.channels] == [
        ("org.pyhv.exit", "file", exit_file)]
    assert cfg.serial.kind == "pty"
    assert cfg.on_poweroff == cfg.on_reboot == cfg.on_crash == "destroy"
    one = parse_domain(fsvm.domain_xml("fsvm-1", [str(a)], ["true"], fake_bundle, "/x",
                                       exit_file))
    assert [f.readonly for f in one.filesystems] == [False]


def test_fsvm_print_xml_and_errors(tmp_path: Path, fake_bundle: bundle.Bundle) -> None:
    run = [sys.executable, str(FSVM), "--kernel", str(fake_bundle.path),
           "--emulator", sys.executable]
    p = subprocess.run([*run, "--root", str(tmp_path), "--print-xml", "--", "/bin/true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    xml = tmp_path / "d.xml"
    xml.write_text(p.stdout)
    check = pyhv("domxml", "check", str(xml))
    assert check.returncode == 0, check.stderr
    assert "filesystem pyhvroot0: virtio-9p" in check.stdout
    for args, needle in (([], "--root"), (["--root", str(tmp_path)], "no command"),
                         (["--root", str(tmp_path / "x"), "--", "ls"], "no such directory")):
        p = subprocess.run([*run, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert needle in p.stderr and "Traceback" not in p.stderr


# --- the bundle's init under QEMU TCG --------------------------------------------------

def qemu_boot(b: bundle.Bundle, tmp: Path, cmdline: str, trees: list[tuple[Path, bool]],
              exit_port: bool = True, virtio_console: bool = False
              ) -> tuple[subprocess.CompletedProcess, str, str]:
    """Boot the bundle under QEMU TCG; (process, serial output, exit-port file)."""
    exit_file = tmp / "exit"
    console = tmp / "console"
    args = [QEMU or "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "256",
            "-nographic", "-no-reboot", "-kernel", str(b.vmlinux), "-initrd", str(b.initramfs),
            "-append", cmdline]
    for i, (tree, ro) in enumerate(trees):
        args += ["-virtfs", f"local,path={tree},mount_tag=pyhvroot{i},"
                 f"security_model=passthrough{',readonly=on' if ro else ''}"]
    if exit_port or virtio_console:
        args += ["-device", "virtio-serial"]
    if virtio_console:
        args += ["-chardev", f"file,id=con,path={console}", "-device", "virtconsole,chardev=con"]
    if exit_port:
        args += ["-chardev", f"file,id=ex,path={exit_file}",
                 "-device", f"virtserialport,chardev=ex,name={bundle.EXIT_PORT}"]
    p = subprocess.run(args, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    out = p.stdout.decode(errors="replace").replace("\r\n", "\n")
    if virtio_console:
        out += console.read_text(errors="replace") if console.exists() else ""
    return p, out, exit_file.read_text() if exit_file.exists() else ""


needs_tcg = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@pytest.mark.linux
@needs_tcg
def test_init_runs_the_command_and_returns_its_status(generic_bundle: bundle.Bundle,
                                                      tmp_path: Path) -> None:
    """What ``pyhv create --root TREE -- busybox sh -c '...; exit 7'`` gives the guest:
    a virtio console (hvc0) for the command's stdio and the exit port."""
    tree = busybox_tree(tmp_path / "tree")
    (tree / "hello.txt").write_text("hello from the host\n")
    cmd = ["/bin/busybox", "sh", "-c",
           "ls /; cat /hello.txt; echo written >/from-guest; readlink /proc/self/exe; exit 7"]
    cmdline = bundle.kernel_cmdline(cmd, 1, console="hvc0")
    p, out, status = qemu_boot(generic_bundle, tmp_path, cmdline, [(tree, False)],
                               virtio_console=True)
    assert bundle.read_exit_status(status) == 7, (status, out[-3000:])
    assert "hello from the host" in out and "busybox" in out and "/bin/busybox" in out, out
    assert (tree / "from-guest").read_text() == "written\n"  # one tree: written through
    assert "Power down" not in out  # the kernel is silenced before it powers off


@pytest.mark.linux
@needs_tcg
def test_several_trees_overlay_and_the_console_marker(generic_bundle: bundle.Bundle,
                                                      tmp_path: Path) -> None:
    """Two trees: the later one hides the earlier one's files, writes go to a tmpfs
    (neither tree changes); COM1 console; without the exit port, the status comes back
    as the console marker line."""
    low = busybox_tree(tmp_path / "low")
    high = tmp_path / "high"
    high.mkdir()
    (low / "which").write_text("low\n")
    (low / "only-low").write_text("L\n")
    (high / "which").write_text("high\n")
    cmd = ["/bin/busybox", "sh", "-c",
           "cat /which /only-low; echo new >/which; cat /which; exit 9"]
    cmdline = bundle.kernel_cmdline(cmd, 2)
    p, out, _ = qemu_boot(generic_bundle, tmp_path, cmdline, [(low, True), (high, True)],
                          exit_port=False)
    assert bundle.read_exit_status(out) == 9, out[-3000:]
    assert "high\nL\nnew\n" in out, out[-3000:]
    assert (high / "which").read_text() == "high\n" and (low / "which").read_text() == "low\n"
    assert sorted(os.listdir(high)) == ["which"]


@pytest.mark.linux
@needs_tcg
def test_readonly_tree_and_a_missing_command(generic_bundle: bundle.Bundle,
                                             tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "tree")
    for d in ("proc", "sys", "dev"):
        (tree / d).mkdir()
    cmd = ["/bin/busybox", "sh", "-c", "echo x >/nope || exit 4"]
    p, out, status = qemu_boot(generic_bundle, tmp_path,
                               bundle.kernel_cmdline(cmd, 1, readonly=True, console="ttyS0"),
                               [(tree, True)])
    assert bundle.read_exit_status(status) == 4, out[-3000:]
    assert "Read-only file system" in out
    assert not (tree / "nope").exists()
    (tmp_path / "exit").unlink()
    p, out, status = qemu_boot(generic_bundle, tmp_path,
                               bundle.kernel_cmdline(["/no/such"], 1, console="ttyS0"),
                               [(tree, False)])
    assert bundle.read_exit_status(status) == 127, out[-3000:]


# --- pyhv create under pyhv ------------------------------------------------------------

@pytest.mark.hwvirt
@pytest.mark.kvm
def test_pyhv_create_runs_ls_over_the_host(generic_bundle: bundle.Bundle,
                                           tmp_path: Path) -> None:
    p = pyhv("create", "--kernel", str(generic_bundle.path), "--root", "/", "--readonly",
             "--", "/bin/ls", "/", timeout=600)
    assert p.returncode == 0, p.stderr
    assert "usr" in p.stdout.split()
    tree = busybox_tree(tmp_path / "tree")
    p = pyhv("create", "--com1", "--kernel", str(generic_bundle.path), "--root", str(tree),
             "--", "/bin/busybox", "sh", "-c", "ls /; exit 7", timeout=600)
    assert p.returncode == 7, p.stderr
    assert "busybox" in p.stdout


# --- virsh-fsvm through libvirt --------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    from libvirt_daemon import LibvirtDaemon, unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(why)
    with LibvirtDaemon(tmp_path_factory.mktemp("libvirt")) as d:
        yield d


def fsvm_cmd(d, b: bundle.Bundle, *args: str) -> list[str]:
    return [sys.executable, str(FSVM), "-c", d.uri, "--kernel", str(b.path), *args]


@pytest.mark.libvirt
@pytest.mark.kvm
def test_fsvm_starts_a_transient_domain(daemon, generic_bundle: bundle.Bundle,
                                        tmp_path: Path) -> None:
    """With pyhv-qemu: the domain is defined, started and listed; it cannot finish booting
    on a PVM host in test time, so it is destroyed, and the plugin says so and exits 125."""
    d = daemon
    emulator = Path(sys.executable).with_name("pyhv-qemu")
    tree = busybox_tree(tmp_path / "tree")
    env = d.client_env()
    proc = subprocess.Popen(fsvm_cmd(d, generic_bundle, "--name", "fsvm-test", "--emulator",
                                     str(emulator), "--root", str(tree), "--", "/bin/busybox",
                                     "true"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        listed = ""
        for _ in range(300):
            listed = subprocess.run(["virsh", "-c", d.uri, "list", "--name"],
                                    capture_output=True, text=True, env=env).stdout
            if "fsvm-test" in listed.split() or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert "fsvm-test" in listed.split(), (proc.poll(), listed)
        info = subprocess.run(["virsh", "-c", d.uri, "dominfo", "fsvm-test"],
                              capture_output=True, text=True, env=env).stdout
        assert "Persistent:     no" in info
        subprocess.run(["virsh", "-c", d.uri, "destroy", "fsvm-test"], check=True,
                       capture_output=True, env=env)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == bundle.EXIT_NO_STATUS, err
    assert "domain fsvm-test started" in err
    assert "fsvm-test destroyed without reporting the command's exit status" in err
    left = subprocess.run(["virsh", "-c", d.uri, "list", "--all", "--name"],
                          capture_output=True, text=True, env=env).stdout
    assert "fsvm-test" not in left.split()


@pytest.mark.libvirt
@needs_tcg
def test_fsvm_runs_the_command_under_qemu_tcg(daemon, generic_bundle: bundle.Bundle,
                                              tmp_path: Path) -> None:
    """The whole path through libvirt, with QEMU (TCG) as the emulator where pyhv-qemu
    cannot boot Linux here: the console streams the command's output and its exit
    status comes back through the file channel."""
    low = busybox_tree(tmp_path / "low")
    high = tmp_path / "high"
    high.mkdir()
    (low / "which").write_text("low\n")
    (high / "which").write_text("high\n")
    p = subprocess.run(fsvm_cmd(daemon, generic_bundle, "--name", "fsvm-tcg", "--emulator",
                                str(QEMU), "--virt-type", "qemu", "--root", str(low),
                                "--root", str(high), "--", "/bin/busybox", "sh", "-c",
                                "cat /which; ls /bin; exit 7"),
                       capture_output=True, text=True, env=daemon.client_env(), timeout=180)
    assert p.returncode == 7, (p.stderr, p.stdout[-2000:])
    assert "high\nbusybox\n" in p.stdout
    assert "domain fsvm-tcg started" in p.stderr
