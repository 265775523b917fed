"""Kernel bundles and directory-tree VMs (``pyhv import-kernel``, ``pyhv create``).

A *bundle* is a directory with what a VM built from directory trees needs:

- ``vmlinux``: the ELF kernel extracted from a bzImage (entered through its PVH note);
- ``release``: the kernel's release string (``6.1.0-57-amd64``);
- ``initramfs.img``: a gzip-compressed newc cpio archive written here, holding a
  static busybox, the kernel modules the guest needs (virtio PCI and console, 9p,
  overlayfs, virtio-blk/net/rng, with their dependencies) and :data:`INIT`;
- ``bundle.json``: what went in (kernel source, modules in load order).

The guest's init loads the modules, mounts the trees (9p tags ``pyhvroot0`` ...;
one tree directly, several as an overlay in which later trees hide earlier ones
and writes go to a tmpfs), mounts /proc, /sys and /dev inside, runs the command
from ``pyhv.cmd=`` (base64 of the shell-quoted argv) with ``chroot``, writes its
exit status to the virtio-serial port :data:`EXIT_PORT` (or, without that port,
prints ``pyhv-exit-status: N`` on the console) and powers off.
"""

from __future__ import annotations

import base64
import gzip
import json
import lzma
import os
import platform
import shlex
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from pyhv.errors import PyhvError

if TYPE_CHECKING:
    from pyhv.config import VmConfig

#: the virtio-serial port name the exit status comes back on
EXIT_PORT = "org.pyhv.exit"
#: the 9p mount tag of tree N
TAG_PREFIX = "pyhvroot"
#: the console line init prints when it finds no exit port
EXIT_MARKER = "pyhv-exit-status:"
#: exit status when the guest did not report the command's (docker's choice)
EXIT_NO_STATUS = 125
#: where import-kernel writes and create reads a bundle by default
GENERIC_KERNELS = "/var/lib/pyhv/kernels"

#: modules every bundle must have (or have built in): the 9p root and the exit port
REQUIRED_MODULES = ("9p", "9pnet_virtio", "virtio_pci", "virtio_console")
#: modules added when the kernel has them
OPTIONAL_MODULES = ("overlay", "virtio_blk", "virtio_net", "virtio-rng", "virtio_balloon")
#: busybox applets init uses (links in /bin)
APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "cat", "base64", "chroot", "poweroff",
           "sync", "echo", "ls", "sleep")


class BundleError(PyhvError):
    """A kernel bundle cannot be made or used (one line naming what is at fault)."""


def default_bundle_dir() -> Path:
    """``$PYHV_KERNEL_BUNDLE``, else ``$XDG_CACHE_HOME/pyhv/kernel`` (~/.cache/pyhv/kernel)."""
    env = os.environ.get("PYHV_KERNEL_BUNDLE")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pyhv" / "kernel"


# --- newc cpio -------------------------------------------------------------------------

class CpioWriter:
    """Writes a ``newc`` (070701) cpio archive, the format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._ino = 300000
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name = name.strip("/")
        if not name or name in self._names:
            raise ValueError(f"cpio: bad or repeated name {name!r}")
        self._names.add(name)
        raw = name.encode() + b"\0"
        self._ino += 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._put(header + raw)
        self._put(data)

    def _put(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        pad = -self._size % 4
        if pad:
            self._parts.append(b"\0" * pad)
            self._size += pad

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        """The archive, with its ``TRAILER!!!`` entry."""
        self._ino = -1  # the trailer's inode is 0
        self._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self._parts)


# --- kernel modules --------------------------------------------------------------------

def module_name(path: str) -> str:
    """``kernel/fs/9p/9p.ko.xz`` -> ``9p``; ``virtio-rng`` -> ``virtio_rng``."""
    base = os.path.basename(path)
    base = base.split(".ko")[0]
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF image, decompressed (.ko.xz, .ko.zst, .ko.gz)."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(data)
        if path.name.endswith(".ko.zst"):
            return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                                  check=True).stdout
    except FileNotFoundError as e:
        raise BundleError(f"{path}: decompressing it needs 'zstd', which is not installed") \
            from e
    except (lzma.LZMAError, OSError, EOFError, subprocess.CalledProcessError) as e:
        raise BundleError(f"{path}: corrupt compressed module ({e})") from e
    return data


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a module's ELF64 image (key=value strings)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not an ELF64 module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, str] = {}
    for i in range(shnum):
        name, off, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name:end] == b".modinfo":
            for item in elf[off:off + size].split(b"\0"):
                key, eq, value = item.decode(errors="replace").partition("=")
                if eq:
                    info.setdefault(key, value)
    return info


class ModuleIndex:
    """The modules of one kernel: where each lives and what it depends on.

    Dependencies come from ``modules.dep`` (depmod's output); a tree without it
    (Debian's package before depmod ran) is indexed from each module's
    ``.modinfo`` ``depends=`` line.
    """

    def __init__(self, moddir: Path) -> None:
        self.root = moddir
        self.paths: dict[str, str] = {}
        self.deps: dict[str, list[str]] = {}
        self.builtin: set[str] = set()
        builtin = moddir / "modules.builtin"
        if builtin.is_file():
            self.builtin = {module_name(line.strip())
                            for line in builtin.read_text().splitlines() if line.strip()}
        depfile = moddir / "modules.dep"
        if depfile.is_file():
            self._from_dep(depfile.read_text())
        else:
            self._from_modinfo()

    def _from_dep(self, text: str) -> None:
        for line in text.splitlines():
            mod, colon, rest = line.partition(":")
            if not colon:
                continue
            name = module_name(mod.strip())
            self.paths[name] = mod.strip()
            self.deps[name] = [module_name(d) for d in rest.split()]
        for name in list(self.deps):
            # modules.dep lists the whole closure; keep it (resolve handles either)
            self.deps[name] = [d for d in self.deps[name] if d != name]

    def _from_modinfo(self) -> None:
        kernel = self.root / "kernel"
        if not kernel.is_dir():
            raise BundleError(f"{self.root}: no modules.dep and no kernel/ directory "
                              "(not a /lib/modules/RELEASE tree)")
        for dirpath, _dirs, files in os.walk(kernel):
            for f in files:
                if ".ko" not in f:
                    continue
                path = Path(dirpath) / f
                rel = str(path.relative_to(self.root))
                name = module_name(f)
                self.paths[name] = rel
                try:
                    depends = modinfo(read_module(path)).get("depends", "")
                except (ValueError, struct.error, IndexError) as e:
                    raise BundleError(f"{path}: not a kernel module ({e})") from e
                self.deps[name] = [module_name(d) for d in depends.split(",") if d]

    def has(self, name: str) -> bool:
        name = module_name(name)
        return name in self.paths or name in self.builtin

    def resolve(self, names: Iterable[str]) -> list[str]:
        """Relative paths of ``names`` and their dependencies, dependencies first.

        Built-in modules are left out; a module that is neither present nor
        built in raises :class:`BundleError` naming it.
        """
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, wanted_by: Optional[str]) -> None:
            if name in self.builtin and name not in self.paths:
                return
            if name not in self.paths:
                by = f" (needed by {wanted_by})" if wanted_by else ""
                raise BundleError(f"module {name}{by} is not in {self.root}")
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                raise BundleError(f"{self.root}: module dependency cycle through {name}")
            state[name] = 1
            for dep in self.deps.get(name, []):
                visit(dep, name)
            state[name] = 2
            order.append(self.paths[name])

        for n in names:
            visit(module_name(n), None)
        return order


# --- the kernel ------------------------------------------------------------------------

def kernel_release(data: bytes, name: str) -> str:
    """The release string of a bzImage (its header's kernel_version) or an ELF vmlinux."""
    if data[0x202:0x206] == b"HdrS":
        ptr, = struct.unpack_from("<H", data, 0x20E)
        if ptr:
            end = data.find(b"\0", ptr + 0x200, ptr + 0x400)
            text = data[ptr + 0x200:end if end >= 0 else ptr + 0x400].decode(errors="replace")
            if text.split():
                return text.split()[0]
    at = data.find(b"Linux version ")
    if at >= 0:
        words = data[at + 14:at + 200].split()
        if words:
            return words[0].decode(errors="replace")
    raise BundleError(f"{name}: no kernel version string found (not a Linux kernel?)")


def default_kernel() -> Path:
    """The running kernel's /boot/vmlinuz, else the newest generic kernel scripts/setup
    unpacked under /var/lib/pyhv/kernels."""
    running = Path(f"/boot/vmlinuz-{platform.release()}")
    if running.is_file():
        return running
    found = sorted(Path(GENERIC_KERNELS).glob("linux-image-*-amd64/boot/vmlinuz-*"))
    if found:
        return found[-1]
    raise BundleError(f"--kernel: {running} does not exist and no generic kernel is "
                      f"unpacked under {GENERIC_KERNELS} (install linux-image-amd64)")


def modules_dir_for(kernel: Path, release: str) -> Path:
    """``<tree>/lib/modules/<release>`` when ``kernel`` is ``<tree>/boot/vmlinuz-*`` and
    that exists, else ``/lib/modules/<release>``."""
    kernel = kernel.resolve()
    if kernel.parent.name == "boot":
        tree = kernel.parent.parent / "lib" / "modules" / release
        if tree.is_dir():
            return tree
    return Path("/lib/modules") / release


def find_busybox() -> Path:
    """A static busybox (Debian's busybox-static installs /bin/busybox)."""
    for cand in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"):
        p = Path(cand)
        if p.is_file() and not _is_dynamic(p.read_bytes()[:4096]):
            return p
    raise BundleError("no static busybox found (/bin/busybox): install busybox-static")


def _is_dynamic(head: bytes) -> bool:
    if head[:4] != b"\x7fELF" or head[4] != 2:
        return True
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            break
        if struct.unpack_from("<I", head, off)[0] == 3:  # PT_INTERP
            return True
    return False


INIT = r"""#!/bin/sh
# the init of a pyhv kernel bundle (written by pyhv import-kernel)
export PATH=/bin HOME=/ TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
    insmod "/lib/modules/$m" || echo "pyhv-init: cannot load $m" >&2
done < /etc/pyhv-modules
cmd= roots=1 ro=0 cache=mmap console=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyhv.cmd=*) cmd=${arg#pyhv.cmd=} ;;
        pyhv.roots=*) roots=${arg#pyhv.roots=} ;;
        pyhv.ro=*) ro=${arg#pyhv.ro=} ;;
        pyhv.cache=*) cache=${arg#pyhv.cache=} ;;
        console=*) console=${arg#console=} ;;
    esac
done
# virtio-serial ports appear a little after their driver loads
wait_ports() {
    i=0
    while [ "$i" -lt 100 ]; do
        for p in /sys/class/virtio-ports/*/name; do
            [ "$(cat "$p" 2>/dev/null)" = "$1" ] && return 0
        done
        [ -e "/dev/$1" ] && return 0
        sleep 0.05
        i=$((i + 1))
    done
    return 1
}
case "$console" in
    hvc*) wait_ports "$console" && exec <"/dev/$console" >"/dev/$console" 2>&1 ;;
esac

report() {
    sync
    [ -d /sys/class/virtio-ports ] && wait_ports org.pyhv.exit
    for p in /sys/class/virtio-ports/*; do
        if [ "$(cat "$p/name" 2>/dev/null)" = "org.pyhv.exit" ]; then
            echo "$1" >"/dev/${p##*/}" && sent=1
        fi
    done
    [ -n "$sent" ] || echo "pyhv-exit-status: $1" >/dev/console
    echo 0 >/proc/sys/kernel/printk  # no "reboot: Power down" after the command's output
    poweroff -f
    sleep 10
}
fail() {
    echo "pyhv-init: $*" >&2
    report 125
}

[ -n "$cmd" ] || fail "no pyhv.cmd= on the kernel command line"
opts="trans=virtio,version=9p2000.L,cache=$cache,msize=262144"
mkdir -p /newroot
if [ "$roots" = 1 ]; then
    [ "$ro" = 1 ] && opts="$opts,ro"
    mount -t 9p -o "$opts" pyhvroot0 /newroot || fail "cannot mount the 9p tag pyhvroot0"
else
    lower= i=0
    while [ "$i" -lt "$roots" ]; do
        mkdir -p "/layers/$i"
        mount -t 9p -o "$opts,ro" "pyhvroot$i" "/layers/$i" || \
            fail "cannot mount the 9p tag pyhvroot$i"
        lower="/layers/$i${lower:+:$lower}"
        i=$((i + 1))
    done
    if [ "$ro" = 1 ]; then
        mount -t overlay -o "lowerdir=$lower" overlay /newroot || fail "cannot mount overlay"
    else
        mkdir -p /rw && mount -t tmpfs tmpfs /rw && mkdir -p /rw/upper /rw/work
        mount -t overlay -o "lowerdir=$lower,upperdir=/rw/upper,workdir=/rw/work" \
            overlay /newroot || fail "cannot mount the overlay of $roots trees"
    fi
fi
for d in proc sys dev; do
    [ -d "/newroot/$d" ] || mkdir "/newroot/$d" 2>/dev/null
done
mount -t proc proc /newroot/proc 2>/dev/null
mount -t sysfs sysfs /newroot/sys 2>/dev/null
mount -t devtmpfs devtmpfs /newroot/dev 2>/dev/null
script=$(echo "$cmd" | base64 -d) || fail "pyhv.cmd= is not base64"
eval "set -- $script"
chroot /newroot "$@"
report $?
"""


@dataclass(frozen=True)
class Bundle:
    """A kernel bundle on disk."""

    path: Path
    release: str

    @property
    def vmlinux(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initramfs(self) -> Path:
        return self.path / "initramfs.img"

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "Bundle":
        p = Path(path)
        missing = [f for f in ("vmlinux", "initramfs.img", "release") if not (p / f).is_file()]
        if missing:
            raise BundleError(f"--kernel {p}: not a kernel bundle (no {missing[0]}): run "
                              f"'pyhv import-kernel --output {p}' first")
        return cls(p, (p / "release").read_text().strip())


def build_initramfs(index: ModuleIndex, modules: Sequence[str], busybox: Path) -> bytes:
    """The gzip-compressed initramfs: busybox, ``modules`` (relative paths in load order,
    decompressed), their load list and :data:`INIT`."""
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "etc", "newroot", "lib", "lib/modules"):
        w.directory(d)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        w.symlink(f"bin/{applet}", "busybox")
    names = []
    for rel in modules:
        base = os.path.basename(rel)
        base = base[:base.index(".ko")] + ".ko"
        w.file(f"lib/modules/{base}", read_module(index.root / rel))
        names.append(base)
    w.file("etc/pyhv-modules", "".join(f"{n}\n" for n in names).encode())
    w.file("init", INIT.encode(), 0o755)
    return gzip.compress(w.finish(), compresslevel=6, mtime=0)


def import_kernel(kernel: Optional[str] = None, modules: Optional[str] = None,
                  output: Optional[str] = None) -> Bundle:
    """Make a bundle from a bzImage (or vmlinux) and its modules; see the module doc."""
    from pyhv.engine.boot import extract_vmlinux

    kpath = Path(kernel) if kernel else default_kernel()
    try:
        data = kpath.read_bytes()
    except OSError as e:
        raise BundleError(f"--kernel {kpath}: {e.strerror}") from e
    release = kernel_release(data, str(kpath))
    moddir = Path(modules) if modules else modules_dir_for(kpath, release)
    if not moddir.is_dir():
        raise BundleError(f"--modules {moddir}: no such directory (the modules of "
                          f"{release})")
    index = ModuleIndex(moddir)
    for name in REQUIRED_MODULES:
        if not index.has(name):
            raise BundleError(f"{kpath}: kernel {release} has no {name} module (in {moddir}); "
                              "Debian's generic kernel linux-image-amd64 has it (the cloud "
                              "kernel has no 9p)")
    wanted = list(REQUIRED_MODULES) + [m for m in OPTIONAL_MODULES if index.has(m)]
    order = index.resolve(wanted)
    busybox = find_busybox()
    vmlinux = extract_vmlinux(data, str(kpath))
    initramfs = build_initramfs(index, order, busybox)
    out = Path(output) if output else default_bundle_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in (("vmlinux", vmlinux), ("initramfs.img", initramfs),
                           ("release", f"{release}\n".encode())):
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(blob)
            os.replace(tmp, out / name)
        (out / "bundle.json").write_text(json.dumps({
            "release": release, "kernel": str(kpath.resolve()), "modules_dir": str(moddir),
            "modules": [module_name(m) for m in order], "busybox": str(busybox),
            "exit_port": EXIT_PORT, "tag_prefix": TAG_PREFIX}, indent=1) + "\n")
    except OSError as e:
        raise BundleError(f"--output {out}: {e.strerror}") from e
    return Bundle(out, release)


# --- pyhv create -----------------------------------------------------------------------

def kernel_cmdline(argv: Sequence[str], roots: int, readonly: bool = False,
                   console: str = "ttyS0", cache: str = "mmap") -> str:
    """The kernel command line that makes the bundle's init run ``argv``."""
    if not argv:
        raise BundleError("create: no command given (pyhv create --root DIR -- COMMAND ...)")
    cmd = base64.b64encode(shlex.join(argv).encode()).decode()
    line = (f"console={console} quiet loglevel=1 panic=-1 rdinit=/init "
            f"pyhv.roots={roots} pyhv.ro={int(readonly)} pyhv.cache={cache} pyhv.cmd={cmd}")
    if len(line) > 2000:
        raise BundleError("create: the command is too long for the kernel command line "
                          f"({len(line)} bytes, at most 2000)")
    return line


def check_roots(roots: Sequence[str]) -> list[str]:
    if not roots:
        raise BundleError("create: give at least one --root DIR")
    out = []
    for r in roots:
        if not os.path.isdir(r):
            raise BundleError(f"--root {r}: no such directory")
        out.append(os.path.abspath(r))
    return out


def check_upper(upper: str, roots: Sequence[str]) -> str:
    """``--upper DIR``: an existing directory that is not one of the trees."""
    if not os.path.isdir(upper):
        raise BundleError(f"--upper {upper}: no such directory")
    if len(roots) < 2:
        raise BundleError(f"--upper {upper}: only with several --root trees")
    full = os.path.abspath(upper)
    if any(os.path.abspath(r) == full for r in roots):
        raise BundleError(f"--upper {upper}: also given as --root")
    return full


def create_config(roots: Sequence[str], argv: Sequence[str], bundle: Bundle,
                  exit_file: str, cpus: int = 1, memory: str = "256M", com1: bool = False,
                  readonly: bool = False, upper: Optional[str] = None) -> "VmConfig":
    """The VmConfig ``pyhv create`` runs: the bundle's kernel and initramfs, the trees
    as one virtio-9p export, the exit port (to ``exit_file``) and a console on stdio
    (COM1 with ``com1``, else a virtio console).  Several trees are combined by
    pyhv's 9P server (later trees over earlier ones, read-only) with ``upper``, a
    directory the VMM owns, as the writable top layer."""
    from pyhv.config import (
        ChannelConfig,
        FilesystemConfig,
        KernelBoot,
        SerialConfig,
        SerialPortConfig,
        VmConfig,
        parse_size,
    )

    trees = check_roots(roots)
    cmdline = kernel_cmdline(argv, 1, readonly, "ttyS0" if com1 else "hvc0")
    if len(trees) > 1 and upper is None:
        raise BundleError("create: several --root trees need a writable top layer "
                          "(--upper DIR)")
    top, lower = (upper, tuple(trees)) if len(trees) > 1 else (trees[0], ())
    assert top is not None
    fss = (FilesystemConfig(top, f"{TAG_PREFIX}0", "9p", "passthrough", readonly,
                            lower=lower),)
    extra = () if com1 else (SerialPortConfig(SerialConfig("stdio"), "virtio", 0),)
    return VmConfig(
        boot=KernelBoot(str(bundle.vmlinux), str(bundle.initramfs), cmdline, "auto"),
        name="pyhv-create", memory=parse_size(memory, "M", "--memory"), vcpus=cpus,
        serial=SerialConfig("stdio" if com1 else "null"), on_reboot="destroy",
        filesystems=fss, extra_serials=extra,
        channels=(ChannelConfig(EXIT_PORT, SerialConfig("file", exit_file)),))


def read_exit_status(text: str) -> Optional[int]:
    """The status init wrote to the exit port (or after the console marker)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(EXIT_MARKER):
            line = line[len(EXIT_MARKER):].strip()
        if line.isdigit():
            return int(line)
    return None


def which_emulator() -> str:
    """pyhv-qemu of this install (next to the running Python, else on PATH)."""
    import sys

    here = Path(sys.executable).parent / "pyhv-qemu"
    if here.is_file():
        return str(here)
    found = shutil.which("pyhv-qemu")
    if found:
        return found
    raise BundleError("pyhv-qemu is not installed (pip install -e . puts it next to python)")
