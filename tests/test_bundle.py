"""Kernel bundles (``pyhv import-kernel``): the cpio writer, module dependencies,
the bundle itself, and the kernel command line ``pyhv create`` gives its init."""

from __future__ import annotations

import base64
import glob
import gzip
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv import bundle

REPO = Path(__file__).resolve().parent.parent
GENERIC = sorted(glob.glob(f"{bundle.GENERIC_KERNELS}/linux-image-*-amd64/boot/vmlinuz-*"))
CLOUD = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
needs_generic = pytest.mark.skipif(not GENERIC, reason="Debian's generic kernel is not unpacked "
                                   f"under {bundle.GENERIC_KERNELS} (scripts/setup does it)")


def pyhv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyhv", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- cpio ------------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio is not installed")
def test_cpio_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    w = bundle.CpioWriter()
    w.directory("bin")
    w.directory("etc", 0o700)
    w.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    for n in range(1, 6):  # every padding length
        w.file(f"etc/f{'x' * n}", b"y" * n)
    w.file("empty", b"")
    w.symlink("bin/sh", "tool")
    data = w.finish()
    assert len(data) % 4 == 0
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "etc", "bin/tool", "etc/fx", "etc/fxx", "etc/fxxx", "etc/fxxxx",
                       "etc/fxxxxx", "empty", "bin/sh"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-i", "--quiet", "-d", "--no-absolute-filenames"], input=data,
                   cwd=out, check=True)
    assert (out / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "etc").stat().st_mode) == 0o700
    assert (out / "etc/fxxx").read_bytes() == b"yyy"
    assert (out / "empty").stat().st_size == 0
    assert os.readlink(out / "bin/sh") == "tool"


def test_cpio_refuses_a_repeated_name() -> None:
    w = bundle.CpioWriter()
    w.directory("a")
    with pytest.raises(ValueError):
        w.file("a", b"")


# --- modules ---------------------------------------------------------------------------

def _check_order(index: bundle.ModuleIndex, order: list[str]) -> None:
    names = [bundle.module_name(p) for p in order]
    assert len(set(names)) == len(names)
    for i, name in enumerate(names):
        for dep in index.deps[name]:
            assert dep in index.builtin or names.index(dep) < i, (name, dep, names)


@pytest.mark.skipif(not glob.glob("/lib/modules/*/modules.dep"),
                    reason="no /lib/modules/*/modules.dep on this host")
def test_resolution_from_the_hosts_modules_dep() -> None:
    """A real modules.dep (the installed kernel's): virtio_net pulls in net_failover and
    failover, virtio_pci its transport modules, each after what it needs."""
    moddir = Path(sorted(glob.glob("/lib/modules/*/modules.dep"))[-1]).parent
    index = bundle.ModuleIndex(moddir)
    wanted = [m for m in ("virtio_pci", "virtio_net", "virtio_blk") if m in index.paths]
    if "virtio_net" not in wanted:
        pytest.skip(f"{moddir}: virtio_net is built in or absent")
    order = index.resolve(wanted)
    names = [bundle.module_name(p) for p in order]
    assert {"virtio_net", "net_failover", "failover"} <= set(names)
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")
    _check_order(index, order)
    assert all((moddir / p).is_file() for p in order)


@needs_generic
@pytest.mark.skipif(not shutil.which("depmod"), reason="kmod's depmod is not installed")
def test_modules_dep_and_modinfo_agree(tmp_path: Path) -> None:
    """depmod's modules.dep over a copy of the generic kernel's virtio/9p modules and our
    own reading of each module's .modinfo give the same closure and a valid order."""
    src = Path(GENERIC[-1]).parent.parent / "lib/modules"
    release = bundle.kernel_release(Path(GENERIC[-1]).read_bytes(), GENERIC[-1])
    src = src / release
    dst = tmp_path / "lib/modules" / release
    for sub in ("drivers/virtio", "net/9p", "fs/9p", "fs/netfs", "fs/fscache",
                "drivers/char", "net/core", "drivers/net"):
        for ko in (src / "kernel" / sub).glob("*.ko*"):
            target = dst / "kernel" / sub / ko.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ko, target)
    shutil.copyfile(src / "modules.builtin", dst / "modules.builtin")
    by_modinfo = bundle.ModuleIndex(dst)
    subprocess.run(["depmod", "-b", str(tmp_path), release], check=True, capture_output=True)
    assert (dst / "modules.dep").is_file()
    by_dep = bundle.ModuleIndex(dst)
    want = ["9p", "9pnet_virtio", "virtio_pci", "virtio_console", "virtio_net"]
    a, b = by_dep.resolve(want), by_modinfo.resolve(want)
    assert sorted(a) == sorted(b)
    names = {bundle.module_name(p) for p in a}
    assert {"9pnet", "virtio_ring", "virtio", "virtio_pci_modern_dev", "failover"} <= names
    _check_order(by_dep, a)
    _check_order(by_modinfo, b)


@needs_generic
@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio is not installed")
def test_compressed_modules_are_read_and_unpacked(tmp_path: Path) -> None:
    """.ko.xz and .ko.gz modules (no modules.dep: dependencies from their .modinfo) go
    into the initramfs decompressed, as .ko, dependencies first."""
    import lzma

    release = Path(GENERIC[-1]).name.removeprefix("vmlinuz-")
    src = Path(GENERIC[-1]).parent.parent / "lib/modules" / release / "kernel/drivers"
    dst = tmp_path / "lib/modules" / release
    plain = {}
    for rel, pack in (("virtio/virtio_ring.ko", "xz"), ("virtio/virtio.ko", "xz"),
                      ("char/virtio_console.ko", "gz")):
        data = (src / rel).read_bytes()
        plain[os.path.basename(rel)] = data
        out = dst / "kernel" / f"{rel}.{pack}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ) if pack == "xz"
                        else gzip.compress(data))
    index = bundle.ModuleIndex(dst)
    order = index.resolve(["virtio_console"])
    assert order == ["kernel/virtio/virtio_ring.ko.xz", "kernel/virtio/virtio.ko.xz",
                     "kernel/char/virtio_console.ko.gz"]
    image = gzip.decompress(bundle.build_initramfs(index, order, bundle.find_busybox()))
    subprocess.run(["cpio", "-i", "--quiet", "-d"], input=image, cwd=tmp_path, check=True)
    assert (tmp_path / "etc/pyhv-modules").read_text().split() == [
        "virtio_ring.ko", "virtio.ko", "virtio_console.ko"]
    for name, data in plain.items():
        assert (tmp_path / "lib/modules" / name).read_bytes() == data


def test_missing_and_builtin_modules(tmp_path: Path) -> None:
    mod = tmp_path / "lib/modules/9.9.9"
    (mod / "kernel").mkdir(parents=True)
    (mod / "modules.dep").write_text("kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko:\n"
                                     "kernel/x.ko.xz: kernel/y.ko\nkernel/y.ko: kernel/x.ko.xz\n")
    (mod / "modules.builtin").write_text("kernel/c.ko\n")
    index = bundle.ModuleIndex(mod)
    assert index.resolve(["a"]) == ["kernel/b.ko", "kernel/a.ko"]
    with pytest.raises(bundle.BundleError, match="module 9p is not in"):
        index.resolve(["9p"])
    with pytest.raises(bundle.BundleError, match="cycle"):
        index.resolve(["x"])


# --- the kernel ------------------------------------------------------------------------

@needs_generic
def test_release_and_modules_of_the_generic_kernel() -> None:
    path = GENERIC[-1]
    release = Path(path).name.removeprefix("vmlinuz-")
    assert bundle.kernel_release(Path(path).read_bytes(), path) == release
    assert bundle.modules_dir_for(Path(path), release) == \
        Path(path).parent.parent / "lib/modules" / release
    running = Path(f"/boot/vmlinuz-{os.uname().release}")
    assert bundle.default_kernel() == (running if running.is_file() else Path(path))


def test_kernel_without_9p_is_one_line(tmp_path: Path) -> None:
    if not CLOUD:
        pytest.skip("Debian's cloud kernel (the one without 9p) is not installed")
    release = Path(CLOUD[-1]).name.removeprefix("vmlinuz-")
    if not Path(f"/lib/modules/{release}").is_dir():
        pytest.skip(f"/lib/modules/{release} is not installed")
    p = pyhv("import-kernel", "--kernel", CLOUD[-1], "--output", str(tmp_path / "b"))
    one_line_error(p, "has no", "module", "linux-image-amd64")
    assert not (tmp_path / "b").exists()


def test_import_kernel_errors(tmp_path: Path) -> None:
    one_line_error(pyhv("import-kernel", "--kernel", str(tmp_path / "none")),
                   f"--kernel {tmp_path / 'none'}")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    one_line_error(pyhv("import-kernel", "--kernel", str(junk)), "no kernel version string")
    if GENERIC:
        one_line_error(pyhv("import-kernel", "--kernel", GENERIC[-1], "--modules",
                            str(tmp_path)), "no modules.dep and no kernel/")


@pytest.fixture(scope="module")
def generic_bundle(tmp_path_factory: pytest.TempPathFactory) -> bundle.Bundle:
    if not GENERIC:
        pytest.skip(f"Debian's generic kernel is not unpacked under {bundle.GENERIC_KERNELS}")
    out = tmp_path_factory.mktemp("bundle")
    p = pyhv("import-kernel", "--kernel", GENERIC[-1], "--output", str(out))
    assert p.returncode == 0, p.stderr
    return bundle.Bundle.open(out)


@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio is not installed")
def test_bundle_contents(generic_bundle: bundle.Bundle, tmp_path: Path) -> None:
    b = generic_bundle
    assert b.vmlinux.read_bytes()[:4] == b"\x7fELF"
    data = gzip.decompress(b.initramfs.read_bytes())
    subprocess.run(["cpio", "-i", "--quiet", "-d"], input=data, cwd=tmp_path, check=True)
    order = (tmp_path / "etc/pyhv-modules").read_text().split()
    for m in ("virtio_ring.ko", "virtio.ko", "virtio_pci.ko", "9pnet.ko", "9pnet_virtio.ko",
              "netfs.ko", "fscache.ko", "9p.ko", "virtio_console.ko", "overlay.ko"):
        assert m in order
        assert (tmp_path / "lib/modules" / m).read_bytes()[:4] == b"\x7fELF"
    for first, then in (("virtio_ring.ko", "virtio.ko"), ("virtio.ko", "virtio_pci.ko"),
                        ("9pnet.ko", "9pnet_virtio.ko"), ("netfs.ko", "9p.ko"),
                        ("fscache.ko", "9p.ko")):
        assert order.index(first) < order.index(then)
    assert os.access(tmp_path / "init", os.X_OK)
    assert (tmp_path / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    p = subprocess.run(["/bin/busybox", "sh", "-n", str(tmp_path / "init")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_kernel_cmdline_carries_argv() -> None:
    argv = ["/bin/sh", "-c", "echo 'a b' \"$HOME\"; exit 3", "x y", ""]
    line = bundle.kernel_cmdline(argv, 2, readonly=True, console="hvc0")
    words = line.split()
    assert "console=hvc0" in words and "pyhv.roots=2" in words and "pyhv.ro=1" in words
    cmd = next(w for w in words if w.startswith("pyhv.cmd="))[9:]
    assert shlex.split(base64.b64decode(cmd).decode()) == argv
    with pytest.raises(bundle.BundleError, match="no command"):
        bundle.kernel_cmdline([], 1)
    with pytest.raises(bundle.BundleError, match="too long"):
        bundle.kernel_cmdline(["x" * 3000], 1)


def test_read_exit_status() -> None:
    assert bundle.read_exit_status("7\n") == 7
    assert bundle.read_exit_status("boot noise\npyhv-exit-status: 42\r\n") == 42
    assert bundle.read_exit_status("") is None
