"""Tier linux: Linux's own 9p client (Debian's generic kernel under QEMU TCG) against
``pyhv 9p-serve``.

One boot: the guest loads netfs/fscache/9pnet/9pnet_fd/9p and e1000 from the
generic kernel's modules, brings up QEMU user networking, and mounts five servers
over ``trans=tcp`` at 10.0.2.2 (slirp forwards it to the host's loopback): a
passthrough, a mapped and a squash export, a read-only one, and a combined export
(two read-only trees under a writable top directory).  QEMU and the servers run in
a network namespace the test creates, so nothing leaves it.  The guest reports on
the serial console with markers; the host then checks the exports themselves.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_vhost_user_blk_linux import newc

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(not shutil.which("qemu-system-x86_64"),
                                 reason="qemu-system-x86_64 is not installed")]

REPO = Path(__file__).resolve().parent.parent
KERNELS = "/var/lib/pyhv/kernels/linux-image-*-amd64"
#: the generic kernel's modules the client needs, in load order
MODULES = ("fs/netfs/netfs.ko", "fs/fscache/fscache.ko", "net/9p/9pnet.ko",
           "net/9p/9pnet_fd.ko", "fs/9p/9p.ko", "drivers/net/ethernet/intel/e1000/e1000.ko")
PORTS = {"pt": 5641, "mapped": 5642, "squash": 5643, "ro": 5644, "ov": 5645}
BIG = 6  # MiB

INIT = r"""#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in __MODULES__; do insmod /lib/$m.ko || echo INSMOD-FAILED $m; done
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
m9() { mount -t 9p -o trans=tcp,port=$2,version=9p2000.L,msize=65536 10.0.2.2 $1; }

work() {  # the workload on one writable export: $1 mount point, $2 label
  d=$1; l=$2
  m9 $d $3 && echo "$l MOUNTED"
  mkdir $d/t && tar -xf /tree.tar -C $d/t && echo "$l UNTAR-OK"
  (cd $d/t && find . -type f | sort | xargs sha256sum) > /tmp/$l.sums
  while read sum name; do echo "$l SUM $sum $name"; done < /tmp/$l.sums
  for i in 1 2 3 4; do
    (cd $d/t && find . -type f | sort | xargs sha256sum > /tmp/$l.c$i) &
  done
  wait
  for i in 1 2 3 4; do cmp -s /tmp/$l.sums /tmp/$l.c$i && echo "$l CONCURRENT-OK $i"; done
  cp /big $d/big && sync && echo 3 > /proc/sys/vm/drop_caches
  echo "$l BIG $(sha256sum < $d/big)"
  mv $d/t/dir1/one.bin $d/t/renamed.bin && echo "$l RENAME-OK"
  mkdir -p $d/new/deep/er && echo "$l MKDIR-OK"
  rm -r $d/t/dir2 && echo "$l RMR-OK"
  ln -s ../t/renamed.bin $d/new/sym && echo "$l SYMLINK $(readlink $d/new/sym)"
  echo "$l VIA-SYMLINK $(sha256sum < $d/new/sym)"
  ln $d/t/renamed.bin $d/t/hard.bin && echo "$l LINKS $(stat -c %h $d/t/renamed.bin)"
  chmod 640 $d/t/renamed.bin && echo "$l MODE $(stat -c %a $d/t/renamed.bin)"
  chown 1234:5678 $d/t/renamed.bin && echo "$l OWNER $(stat -c '%u:%g' $d/t/renamed.bin)"
  mkfifo $d/fifo && echo "$l FIFO $(stat -c %F $d/fifo)"
  umount $d && echo "$l UMOUNT-OK"
}

work /mnt/pt pt __PT__
work /mnt/mapped mapped __MAPPED__
work /mnt/squash squash __SQUASH__

m9 /mnt/ro __RO__ && echo "ro MOUNTED"
echo "ro READ $(cat /mnt/ro/keep)"
echo "ro TOUCH $(touch /mnt/ro/new 2>&1)"
echo "ro MKDIR $(mkdir /mnt/ro/newdir 2>&1)"
echo "ro RM $(rm /mnt/ro/keep 2>&1)"

o=/mnt/ov
m9 $o __OV__ && echo "ov MOUNTED"
echo "ov LIST $(ls $o | tr '\n' ' ')"
echo "ov SHARED $(cat $o/shared)"
echo "ov DLIST $(ls $o/d | tr '\n' ' ')"
echo appended >> $o/a && echo "ov A $(cat $o/a | tr '\n' ' ')"
rm $o/c && echo "ov RM-OK"
rm -r $o/d && echo "ov RMDIR-OK"
mkdir $o/d && echo fresh > $o/d/new && echo "ov DNEW $(ls $o/d | tr '\n' ' ')"
echo top > $o/topfile && echo "ov WRITE-OK"
mv $o/shared $o/moved && echo "ov MOVED $(cat $o/moved)"
umount $o && m9 $o __OV__ && echo "ov REMOUNT $(ls $o | tr '\n' ' ')"
echo "ov C-AFTER $(cat $o/c 2>&1)"
umount $o
echo GUEST-DONE
poweroff -f
"""


def generic_kernel() -> tuple[str, Path] | None:
    for tree in sorted(glob.glob(KERNELS), reverse=True):
        kernels = glob.glob(f"{tree}/boot/vmlinuz-*")
        mods = glob.glob(f"{tree}/lib/modules/*/kernel")
        if kernels and mods:
            return kernels[0], Path(mods[0])
    return None


def make_tree(rng: random.Random) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for d in ("dir1", "dir2", "dir2/sub", "dir3/a/b"):
        for i in range(6):
            size = rng.choice((0, 1, 100, 4095, 4096, 4097, 70000, 200000))
            files[f"{d}/f{i}.dat"] = rng.randbytes(size)
    files["dir1/one.bin"] = rng.randbytes(123457)
    files["top.txt"] = b"top of the tree\n"
    return files


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def initramfs(path: Path, moddir: Path, tree_tar: bytes, big: bytes) -> None:
    init = INIT.replace("__MODULES__", " ".join(Path(m).stem for m in MODULES))
    for name, port in PORTS.items():
        init = init.replace(f"__{name.upper()}__", str(port))
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o040755, b"", 0) for d in ("bin", "dev", "proc", "sys", "lib", "tmp", "mnt",
                                        *(f"mnt/{n}" for n in PORTS))]
    entries.append(("dev/console", 0o020600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes(), 0))
    for rel in MODULES:
        entries.append((f"lib/{Path(rel).name}", 0o100644, (moddir / rel).read_bytes(), 0))
    entries.append(("tree.tar", 0o100644, tree_tar, 0))
    entries.append(("big", 0o100644, big, 0))
    entries.append(("init", 0o100755, init.encode(), 0))
    path.write_bytes(newc(entries))


def netns_prefix() -> list[str]:
    if os.geteuid() == 0:
        return ["unshare", "-n", "--"]
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace (not root, no user namespaces)")
    return ["unshare", "-rn", "--"]


DRIVER = r"""
set -u
ip link set lo up
pids=""
for spec in "$@"; do
  name=${spec%%=*}; args=${spec#*=}
  $PY -m pyhv 9p-serve $args 2>"$WORK/$name.log" &
  pids="$pids $!"
done
for spec in "$@"; do
  name=${spec%%=*}; i=0
  until grep -q serving "$WORK/$name.log"; do
    i=$((i+1)); [ $i -gt 200 ] && { echo "server $name did not start" >&2; exit 3; }
    sleep 0.1
  done
done
timeout 170 qemu-system-x86_64 -accel tcg -m 256 -nodefaults -no-user-config \
  -display none -serial stdio -no-reboot -kernel "$KERNEL" -initrd "$WORK/initrd" \
  -append "console=ttyS0 panic=-1 quiet" -netdev user,id=n -device e1000,netdev=n \
  >"$WORK/console.txt" 2>"$WORK/qemu.err"
echo "qemu exit $?" >>"$WORK/qemu.err"
for pid in $pids; do kill -TERM $pid; done
for pid in $pids; do wait $pid || echo "server $pid: exit $?" >>"$WORK/qemu.err"; done
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_linux_9p_client_against_pyhv_9p_serve(tmp_path: Path) -> None:
    found = generic_kernel()
    if found is None:
        pytest.skip(f"Debian's generic kernel is not unpacked in {KERNELS} (scripts/setup)")
    kernel, moddir = found
    for rel in MODULES:
        if not (moddir / rel).exists():
            pytest.skip(f"{moddir / rel} is missing")
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox-static is not installed")
    prefix = netns_prefix()
    as_root = os.geteuid() == 0
    rng = random.Random(9)
    files = make_tree(rng)
    big = rng.randbytes(BIG << 20)
    initramfs(tmp_path / "initrd", moddir, tar_of(files), big)

    exports = {n: tmp_path / n for n in ("pt", "mapped", "squash", "ro")}
    for d in exports.values():
        d.mkdir()
    (exports["ro"] / "keep").write_text("kept\n")
    low1, low2, upper = tmp_path / "low1", tmp_path / "low2", tmp_path / "upper"
    for d in (low1, low2, upper, low1 / "d"):
        d.mkdir()
    (low1 / "a").write_text("a from low1\n")
    (low1 / "shared").write_text("shared from low1\n")
    (low1 / "c").write_text("c from low1\n")
    (low1 / "d" / "x").write_text("x\n")
    (low2 / "shared").write_text("shared from low2\n")
    (low2 / "c").write_text("c from low2\n")
    (low2 / "d").mkdir()
    (low2 / "d" / "y").write_text("y\n")
    lower_before = {p: p.read_bytes() for base in (low1, low2) for p in base.rglob("*")
                    if p.is_file()}

    def listen(name: str) -> str:
        return f"--listen tcp:127.0.0.1:{PORTS[name]}"
    specs = [f"pt=--root {exports['pt']} {listen('pt')}",
             f"mapped=--root {exports['mapped']} --security-model mapped {listen('mapped')}",
             f"squash=--root {exports['squash']} --security-model squash {listen('squash')}",
             f"ro=--root {exports['ro']} --readonly {listen('ro')}",
             f"ov=--root {low1} --root {low2} --upper {upper} {listen('ov')}"]
    env = dict(os.environ, PY=sys.executable, WORK=str(tmp_path), KERNEL=kernel,
               PYTHONPATH=str(REPO))
    done = subprocess.run([*prefix, "sh", "-c", DRIVER, "driver", *specs], env=env,
                          cwd=REPO, timeout=240, capture_output=True, text=True)
    out = (tmp_path / "console.txt").read_text(errors="replace")
    diag = (out[-4000:] + (tmp_path / "qemu.err").read_text()[-2000:] + done.stderr[-2000:]
            + "".join((tmp_path / f"{n}.log").read_text()[-1000:] for n in PORTS))
    assert done.returncode == 0 and "GUEST-DONE" in out, diag
    assert "INSMOD-FAILED" not in out, diag

    def marker(label: str, key: str) -> str:
        found = re.search(rf"^{label} {key}(?: (.*))?$", out, re.M)
        assert found is not None, f"{label} {key} missing\n{diag}"
        return (found.group(1) or "").strip()

    expected = {f"./{n}": sha(d) for n, d in files.items()}
    for label in ("pt", "mapped", "squash"):
        root = exports[label]
        for key in ("MOUNTED", "UNTAR-OK", "RENAME-OK", "MKDIR-OK", "RMR-OK", "UMOUNT-OK"):
            marker(label, key)
        # every file checksummed in the guest as the host computed it
        sums = dict(reversed(m.groups()) for m in
                    re.finditer(rf"^{label} SUM ([0-9a-f]{{64}}) (\S+)$", out, re.M))
        assert sums == expected, label
        for i in range(1, 5):
            marker(label, f"CONCURRENT-OK {i}")
        assert marker(label, "BIG").split()[0] == sha(big)
        assert (root / "big").read_bytes() == big
        assert marker(label, "SYMLINK") == "../t/renamed.bin"
        assert marker(label, "VIA-SYMLINK").split()[0] == sha(files["dir1/one.bin"])
        assert marker(label, "LINKS") == "2"
        assert marker(label, "MODE") == "640"
        assert marker(label, "FIFO") == "fifo"
        # the host's view of the export after the workload
        t = root / "t"
        assert not (t / "dir2").exists() and not (t / "dir1" / "one.bin").exists()
        assert (t / "renamed.bin").read_bytes() == files["dir1/one.bin"]
        assert os.path.samefile(t / "renamed.bin", t / "hard.bin")
        assert (root / "new" / "deep" / "er").is_dir()
        assert os.readlink(root / "new" / "sym") == "../t/renamed.bin"
        for name, data in files.items():
            if not name.startswith(("dir2/", "dir1/one.bin")):
                assert (t / name).read_bytes() == data, (label, name)
        st = os.lstat(t / "renamed.bin")
        if label == "mapped":
            # owner and mode kept in xattrs; the host file stays the server's, 0600
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
            assert int(os.getxattr(t / "renamed.bin", "user.virtfs.mode")) == 0o100640
            assert os.getxattr(t / "renamed.bin", "user.virtfs.uid") == b"1234"
            assert os.getxattr(t / "renamed.bin", "user.virtfs.gid") == b"5678"
            assert marker(label, "OWNER") == "1234:5678"
            assert stat.S_ISREG(os.lstat(root / "fifo").st_mode)  # a FIFO in xattrs
        else:
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
        if label == "pt" and as_root:
            assert (st.st_uid, st.st_gid) == (1234, 5678)
            assert marker(label, "OWNER") == "1234:5678"
        if label == "squash":
            assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
            assert marker(label, "OWNER") == f"{os.geteuid()}:{os.getegid()}"

    marker("ro", "MOUNTED")
    assert marker("ro", "READ") == "kept"
    for key in ("TOUCH", "MKDIR", "RM"):
        assert "Read-only file system" in marker("ro", key), key
    assert sorted(os.listdir(exports["ro"])) == ["keep"]

    marker("ov", "MOUNTED")
    assert marker("ov", "LIST").split() == ["a", "c", "d", "shared"]
    assert marker("ov", "SHARED") == "shared from low2"
    assert marker("ov", "DLIST").split() == ["x", "y"]
    assert marker("ov", "A") == "a from low1 appended"
    for key in ("RM-OK", "RMDIR-OK", "WRITE-OK"):
        marker("ov", key)
    assert marker("ov", "DNEW").split() == ["new"]
    assert marker("ov", "MOVED") == "shared from low2"
    assert marker("ov", "REMOUNT").split() == ["a", "d", "moved", "topfile"]
    assert "No such file" in marker("ov", "C-AFTER")
    # writes landed in the top layer, the lower trees are unchanged
    assert {p: p.read_bytes() for base in (low1, low2) for p in base.rglob("*")
            if p.is_file()} == lower_before
    assert (upper / "a").read_text() == "a from low1\nappended\n"
    assert (upper / "topfile").read_text() == "top\n"
    assert (upper / "moved").read_text() == "shared from low2\n"
    assert (upper / ".wh.c").exists() and (upper / ".wh.shared").exists()
    assert (upper / "d" / ".wh..wh..opq").exists() and (upper / "d" / "new").exists()
