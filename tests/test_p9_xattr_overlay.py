"""9P2000.L extended attributes and combined trees (several roots under a writable top)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from test_p9_server import O_RDONLY, O_RDWR, ROOT, Client

from pyhv import cli
from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.server import XATTR_SIZE_MAX, Export, Session

XATTR_CREATE, XATTR_REPLACE = 1, 2


def client(export: Export) -> Client:
    c = Client(Session(export, max_msize=65536))
    c.attach()
    return c


def setx(c: Client, fid: int, name: str, value: bytes, flags: int = 0) -> int:
    """Set through a clone of ``fid`` (as Linux does); 0 or the errno."""
    c.walk(fid, 90)
    reply = c.rpc(p.Txattrcreate(90, name, len(value), flags))
    if isinstance(reply, p.Rlerror):
        c.ok(p.Tclunk(90))
        return reply.ecode
    for off in range(0, len(value), 1000):
        assert c.ok(p.Twrite(90, off, value[off:off + 1000])) == p.Rwrite(
            len(value[off:off + 1000]))
    reply = c.rpc(p.Tclunk(90))
    return reply.ecode if isinstance(reply, p.Rlerror) else 0


def getx(c: Client, fid: int, name: str) -> bytes | int:
    reply = c.rpc(p.Txattrwalk(fid, 91, name))
    if isinstance(reply, p.Rlerror):
        return reply.ecode
    assert isinstance(reply, p.Rxattrwalk)
    data = c.read_all(91)
    assert len(data) == reply.size
    c.ok(p.Tclunk(91))
    return data


def listx(c: Client, fid: int) -> list[str]:
    data = getx(c, fid, "")
    assert isinstance(data, bytes)
    return sorted(n.decode() for n in data.split(b"\0") if n)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    (root / "link").symlink_to("f")
    return root


# ---- extended attributes ----------------------------------------------------------------

def test_xattr_set_get_list_remove(plain: Path) -> None:
    c = client(Export(str(plain)))
    c.walk(ROOT, 2, "f")
    value = bytes(range(256)) * 12  # several writes (ext4 holds up to a block)
    assert setx(c, 2, "user.big", value) == 0
    assert setx(c, 2, "user.small", b"v") == 0
    assert os.getxattr(plain / "f", "user.big") == value
    assert getx(c, 2, "user.big") == value
    assert getx(c, 2, "user.small") == b"v"
    assert listx(c, 2) == ["user.big", "user.small"]
    assert getx(c, 2, "user.none") == errno.ENODATA
    # flags: XATTR_CREATE on an existing one, XATTR_REPLACE on a missing one
    assert setx(c, 2, "user.small", b"w", XATTR_CREATE) == errno.EEXIST
    assert setx(c, 2, "user.nope", b"w", XATTR_REPLACE) == errno.ENODATA
    assert setx(c, 2, "user.small", b"w", XATTR_REPLACE) == 0
    assert getx(c, 2, "user.small") == b"w"
    # size 0 removes (Linux's removexattr); removing a missing one is ENODATA
    assert setx(c, 2, "user.small", b"") == 0
    assert listx(c, 2) == ["user.big"]
    assert setx(c, 2, "user.small", b"") == errno.ENODATA
    assert c.session.fs.fid_count == 2


def test_xattr_limits_and_bad_requests(plain: Path) -> None:
    c = client(Export(str(plain)))
    c.walk(ROOT, 2, "f")
    c.walk(ROOT, 3, "f")
    assert c.err(p.Txattrcreate(3, "user.x", XATTR_SIZE_MAX + 1, 0)) == errno.E2BIG
    assert c.err(p.Txattrcreate(3, "user." + "n" * 251, 1, 0)) == errno.ERANGE
    assert c.err(p.Txattrcreate(3, "", 1, 0)) == errno.EINVAL
    assert c.err(p.Txattrcreate(3, "user.x", 1, 4)) == errno.EINVAL  # unknown flag
    assert c.err(p.Txattrcreate(3, "bogus.x", 1, 0)) == errno.EOPNOTSUPP
    assert c.err(p.Txattrcreate(3, "system.posix_acl_access", 1, 0)) == errno.EOPNOTSUPP
    assert c.err(p.Txattrwalk(3, 3, "user." + "n" * 251)) == errno.ERANGE
    # a value written past its announced size, and one left short, are refused
    c.ok(p.Txattrcreate(3, "user.x", 4, 0))
    assert c.err(p.Twrite(3, 2, b"abc")) == errno.ENOSPC
    assert c.err(p.Twrite(3, 9, b"")) == errno.ENOSPC
    c.ok(p.Twrite(3, 0, b"ab"))
    assert c.err(p.Tlopen(3, O_RDONLY)) == errno.EBADF
    assert c.err(p.Tclunk(3)) == errno.EINVAL  # 2 of 4 bytes: nothing set, fid gone
    assert c.err(p.Tclunk(3)) == errno.EBADF
    assert "user.x" not in os.listxattr(plain / "f")
    # an xattr fid is read like a file, not walked, opened or written
    os.setxattr(plain / "f", "user.r", b"12345")
    reply = c.ok(p.Txattrwalk(2, 4, "user.r"))
    assert reply == p.Rxattrwalk(5)
    assert c.ok(p.Tread(4, 3, 100)) == p.Rread(b"45")
    assert c.ok(p.Tread(4, 50, 100)) == p.Rread(b"")
    assert c.err(p.Twalk(4, 5, ("x",))) == errno.EBADF
    assert c.err(p.Twrite(4, 0, b"x")) == errno.EBADF
    assert c.err(p.Txattrwalk(77, 5, "user.r")) == errno.EBADF


def test_xattr_symlink_readonly_and_models(plain: Path, tmp_path: Path) -> None:
    c = client(Export(str(plain)))
    c.walk(ROOT, 2, "link")
    assert getx(c, 2, "user.x") == errno.ENODATA
    assert listx(c, 2) == []
    assert setx(c, 2, "user.x", b"v") == errno.EPERM
    ro = client(Export(str(plain), readonly=True))
    ro.walk(ROOT, 2, "f")
    os.setxattr(plain / "f", "user.keep", b"k")
    assert getx(ro, 2, "user.keep") == b"k"
    assert setx(ro, 2, "user.y", b"v") == errno.EROFS
    assert setx(ro, 2, "user.keep", b"") == errno.EROFS
    assert os.getxattr(plain / "f", "user.keep") == b"k"
    sq = client(Export(str(plain), security_model="squash"))
    sq.walk(ROOT, 2, "f")
    assert setx(sq, 2, "trusted.x", b"v") == errno.EOPNOTSUPP
    assert setx(sq, 2, "security.x", b"v") == errno.EOPNOTSUPP


def test_xattr_mapped_hides_its_own(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    c = client(Export(str(root), security_model="mapped"))
    c.walk(ROOT, 2)
    c.ok(p.Tlcreate(2, "f", os.O_RDWR, 0o640, 0))
    assert os.getxattr(root / "f", "user.virtfs.mode")  # the server's bookkeeping
    assert setx(c, 2, "user.mine", b"1") == 0
    assert listx(c, 2) == ["user.mine"]
    assert getx(c, 2, "user.virtfs.mode") == errno.ENODATA
    assert setx(c, 2, "user.virtfs.uid", b"0") == errno.EACCES
    assert setx(c, 2, "user.virtfs.mode", b"") == errno.EACCES
    assert int(os.getxattr(root / "f", "user.virtfs.mode")) & 0o7777 == 0o640


# ---- combined trees ---------------------------------------------------------------------

@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    low1, low2, upper, outside = (tmp_path / n for n in ("low1", "low2", "upper", "outside"))
    for d in (low1, low2, upper, outside):
        d.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (low1 / "a").write_bytes(b"a1")
    (low1 / "shared").write_bytes(b"shared1")
    (low1 / "gone").write_bytes(b"hidden by low2's whiteout")
    (low1 / "d").mkdir()
    (low1 / "d" / "x").write_bytes(b"x1")
    (low1 / "out").symlink_to(outside)
    (low1 / "rel").symlink_to("../outside/secret")
    (low2 / "shared").write_bytes(b"shared2")
    (low2 / ".wh.gone").write_bytes(b"")
    (low2 / "d").mkdir()
    (low2 / "d" / "y").write_bytes(b"y2")
    (low2 / "opq").mkdir()
    (low2 / "opq" / ".wh..wh..opq").write_bytes(b"")
    (low1 / "opq").mkdir()
    (low1 / "opq" / "under").write_bytes(b"hidden by the opaque marker")
    os.chmod(low1 / "a", 0o644)
    return low1, low2, upper, outside


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for r in roots for f in r.rglob("*")
            if f.is_file() and not f.is_symlink()}


def names(c: Client, fid: int, *path: str) -> list[str]:
    c.walk(fid, 60, *path)
    c.ok(p.Tlopen(60, O_RDONLY))
    out = sorted(e.name for e in c.readdir(60) if e.name not in (".", ".."))
    c.ok(p.Tclunk(60))
    return out


def read(c: Client, *path: str) -> bytes:
    c.walk(ROOT, 61, *path)
    c.ok(p.Tlopen(61, O_RDONLY))
    data = c.read_all(61)
    c.ok(p.Tclunk(61))
    return data


def test_combine_arguments(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    e = Export.combine([str(low1), str(low2)], str(upper))
    assert e.root == str(upper) and e.lower == (str(low1), str(low2))
    assert e.layers == (str(upper), str(low2), str(low1))
    assert Export.combine([str(low1)]) == Export(str(low1))
    ro = Export.combine([str(low1), str(low2)], readonly=True)
    assert ro.root == str(low2) and ro.lower == (str(low1),) and ro.readonly
    with pytest.raises(p.P9Error, match="--upper DIR"):
        Export.combine([str(low1), str(low2)])
    with pytest.raises(p.P9Error, match="also given as --root"):
        Export.combine([str(low1)], str(low1))
    with pytest.raises(p.P9Error, match="at least one"):
        Export.combine([])
    assert Export(str(upper), lower=[str(low1)]).lower == (str(low1),)  # type: ignore[arg-type]


def test_lookup_and_readdir_merge(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    c = client(Export.combine([str(low1), str(low2)], str(upper)))
    assert names(c, ROOT) == ["a", "d", "opq", "out", "rel", "shared"]
    assert names(c, ROOT, "d") == ["x", "y"]
    assert names(c, ROOT, "opq") == []
    assert read(c, "shared") == b"shared2"
    assert read(c, "d", "x") == b"x1"
    assert c.err(p.Twalk(ROOT, 2, ("gone",))) == errno.ENOENT
    assert c.err(p.Twalk(ROOT, 2, (".wh.gone",))) == errno.ENOENT
    r = c.rpc(p.Twalk(ROOT, 2, ("opq", "under")))
    assert isinstance(r, p.Rwalk) and len(r.wqids) == 1
    # .. from a merged directory is the root; at the root it stays there
    qroot = c.walk(ROOT, 3, "d", "..", "..", "..")[-1]
    assert qroot.path == os.stat(upper).st_ino


def test_confinement_in_every_layer(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, outside = layers
    (upper / "d").symlink_to(outside)  # a top-layer symlink over a lower directory
    c = client(Export.combine([str(low1), str(low2)], str(upper)))
    r = c.rpc(p.Twalk(ROOT, 2, ("out", "secret")))
    assert isinstance(r, p.Rwalk) and len(r.wqids) == 1  # never through the symlink
    c.walk(ROOT, 3, "rel")
    assert c.err(p.Tlopen(3, O_RDONLY)) == errno.ELOOP
    assert c.ok(p.Treadlink(3)) == p.Rreadlink("../outside/secret")
    # the symlink hides the lower directories; it is not followed or merged
    r = c.rpc(p.Twalk(ROOT, 4, ("d", "x")))
    assert isinstance(r, p.Rwalk) and len(r.wqids) == 1 and r.wqids[0].type == p.QTSYMLINK
    assert c.err(p.Tmkdir(ROOT, ".wh.x", 0o755, 0)) == errno.EINVAL
    c.walk(ROOT, 5)
    assert c.err(p.Tlcreate(5, ".wh..wh..opq", os.O_RDWR, 0o644, 0)) == errno.EINVAL
    # a symlink copied up (chown) keeps its text; nothing outside changes
    c.walk(ROOT, 6, "out")
    c.ok(p.Tsetattr(6, p.SETATTR_UID | p.SETATTR_GID, 0, os.getuid(), os.getgid(), 0, 0, 0,
                    0, 0))
    assert os.readlink(upper / "out") == str(outside)
    assert sorted(os.listdir(outside)) == ["secret"]


def test_copy_up_on_write_and_setattr(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    before = snapshot(low1, low2)
    c = client(Export.combine([str(low1), str(low2)], str(upper)))
    c.walk(ROOT, 2, "a")
    c.walk(ROOT, 3, "a")  # a second fid of the same file follows the copy
    c.ok(p.Tlopen(2, O_RDWR))
    c.ok(p.Twrite(2, 2, b"+more"))
    assert (upper / "a").read_bytes() == b"a1+more"
    assert stat.S_IMODE(os.stat(upper / "a").st_mode) == 0o644
    c.ok(p.Tsetattr(3, p.SETATTR_MODE, 0o600, 0, 0, 0, 0, 0, 0, 0))
    assert stat.S_IMODE(os.stat(upper / "a").st_mode) == 0o600
    assert read(c, "a") == b"a1+more"
    # a file deep in a merged directory: its directories are copied up first
    c.walk(ROOT, 4, "d", "y")
    c.ok(p.Tlopen(4, O_RDWR | os.O_TRUNC))
    assert (upper / "d" / "y").read_bytes() == b""
    assert names(c, ROOT, "d") == ["x", "y"]  # still merged (not opaque)
    # creating in a lower directory copies the directory up
    c.walk(ROOT, 5, "d")
    c.ok(p.Tlcreate(5, "new", os.O_RDWR, 0o644, 0))
    assert (upper / "d" / "new").exists() and names(c, ROOT, "d") == ["new", "x", "y"]
    # a hard link to a lower file links its copy
    c.walk(ROOT, 6, "shared")
    c.ok(p.Tlink(ROOT, 6, "hard"))
    assert os.path.samefile(upper / "shared", upper / "hard")
    assert read(c, "hard") == b"shared2"
    assert snapshot(low1, low2) == before


def test_whiteouts_and_opaque_directories(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    before = snapshot(low1, low2)
    c = client(Export.combine([str(low1), str(low2)], str(upper)))
    c.ok(p.Tunlinkat(ROOT, "shared", 0))
    assert (upper / ".wh.shared").exists()
    assert c.err(p.Twalk(ROOT, 2, ("shared",))) == errno.ENOENT
    assert "shared" not in names(c, ROOT)
    assert c.err(p.Tunlinkat(ROOT, "shared", 0)) == errno.ENOENT
    assert c.err(p.Tunlinkat(ROOT, "d", p.AT_REMOVEDIR)) == errno.ENOTEMPTY
    assert c.err(p.Tunlinkat(ROOT, "d", 0)) == errno.EISDIR
    assert c.err(p.Tunlinkat(ROOT, "a", p.AT_REMOVEDIR)) == errno.ENOTDIR
    c.walk(ROOT, 3, "d")
    c.ok(p.Tunlinkat(3, "x", 0))
    c.walk(ROOT, 4, "d", "y")
    c.ok(p.Tremove(4))
    assert names(c, ROOT, "d") == []
    c.ok(p.Tunlinkat(ROOT, "d", p.AT_REMOVEDIR))
    assert (upper / ".wh.d").exists() and not (upper / "d").exists()
    # names a lower tree shows are taken; whited-out ones are free again
    assert c.err(p.Tmkdir(ROOT, "a", 0o755, 0)) == errno.EEXIST
    assert c.err(p.Tsymlink(ROOT, "a", "t", 0)) == errno.EEXIST
    c.ok(p.Tmkdir(ROOT, "d", 0o755, 0))
    assert (upper / "d" / ".wh..wh..opq").exists() and not (upper / ".wh.d").exists()
    assert names(c, ROOT, "d") == []
    c.walk(ROOT, 5)
    c.ok(p.Tlcreate(5, "shared", os.O_RDWR, 0o644, 0))
    assert not (upper / ".wh.shared").exists()
    assert read(c, "shared") == b""
    # a file only in the top layer leaves no whiteout
    c.ok(p.Tunlinkat(ROOT, "shared", 0))
    assert (upper / ".wh.shared").exists()  # the lower one is still there below
    c.walk(ROOT, 6)
    c.ok(p.Tlcreate(6, "toponly", os.O_RDWR, 0o644, 0))
    c.ok(p.Tunlinkat(ROOT, "toponly", 0))
    assert not (upper / ".wh.toponly").exists() and not (upper / "toponly").exists()
    # a whiteout survives a new session (the deletion is durable)
    c2 = client(Export.combine([str(low1), str(low2)], str(upper)))
    assert names(c2, ROOT) == ["a", "d", "opq", "out", "rel"]
    assert snapshot(low1, low2) == before


def test_rename_across_layers(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    before = snapshot(low1, low2)
    c = client(Export.combine([str(low1), str(low2)], str(upper)))
    c.walk(ROOT, 2, "d")
    c.ok(p.Trenameat(ROOT, "shared", 2, "moved"))
    assert (upper / "d" / "moved").read_bytes() == b"shared2"
    assert (upper / ".wh.shared").exists()
    assert names(c, ROOT, "d") == ["moved", "x", "y"]
    assert "shared" not in names(c, ROOT)
    # a fid follows its file across a rename
    c.walk(ROOT, 3, "a")
    c.ok(p.Trename(3, ROOT, "b"))
    c.ok(p.Tlopen(3, O_RDONLY))
    assert c.read_all(3) == b"a1"
    assert (upper / "b").read_bytes() == b"a1" and (upper / ".wh.a").exists()
    # onto a lower name: the top layer's copy hides it
    c.ok(p.Trenameat(ROOT, "b", 2, "x"))
    assert read(c, "d", "x") == b"a1"
    # directories of a lower tree are not renamed (EXDEV: the guest's mv copies)
    assert c.err(p.Trenameat(ROOT, "d", ROOT, "e")) == errno.EXDEV
    assert c.err(p.Trenameat(ROOT, "opq", ROOT, "e")) == errno.EXDEV
    # a top-only directory is, even over an empty lower one (then it is opaque)
    c.ok(p.Tmkdir(ROOT, "mine", 0o755, 0))
    c.walk(ROOT, 4, "mine")
    c.ok(p.Tlcreate(4, "f", os.O_RDWR, 0o644, 0))
    c.ok(p.Trenameat(ROOT, "mine", ROOT, "opq"))
    assert names(c, ROOT, "opq") == ["f"]
    assert (upper / "opq" / ".wh..wh..opq").exists()
    assert c.err(p.Trenameat(ROOT, "opq", ROOT, "e")) == errno.EXDEV  # lower opq below
    c.ok(p.Tmkdir(ROOT, "mine2", 0o755, 0))
    assert c.err(p.Trenameat(ROOT, "mine2", ROOT, "d")) == errno.ENOTEMPTY
    assert snapshot(low1, low2) == before


def test_readonly_combined_and_mapped(layers: tuple[Path, Path, Path, Path]) -> None:
    low1, low2, upper, _ = layers
    ro = client(Export.combine([str(low1), str(low2)], readonly=True))
    assert names(ro, ROOT) == ["a", "d", "opq", "out", "rel", "shared"]
    assert ro.err(p.Tunlinkat(ROOT, "a", 0)) == errno.EROFS
    ro.walk(ROOT, 2, "a")
    assert ro.err(p.Tlopen(2, O_RDWR)) == errno.EROFS
    assert ro.err(p.Tmkdir(ROOT, "n", 0o755, 0)) == errno.EROFS
    m = client(Export.combine([str(low1), str(low2)], str(upper), security_model="mapped"))
    m.walk(ROOT, 2, "a")
    m.ok(p.Tsetattr(2, p.SETATTR_MODE | p.SETATTR_UID, 0o751, 4321, 0, 0, 0, 0, 0, 0))
    assert int(os.getxattr(upper / "a", "user.virtfs.mode")) == stat.S_IFREG | 0o751
    assert os.getxattr(upper / "a", "user.virtfs.uid") == b"4321"
    assert stat.S_IMODE(os.stat(low1 / "a").st_mode) == 0o644
    assert setx(m, 2, "user.note", b"n") == 0
    assert os.getxattr(upper / "a", "user.note") == b"n"
    assert "user.note" not in os.listxattr(low1 / "a")


@pytest.mark.parametrize("argv, message", [
    (["--root", "A", "--root", "B"], "several --root trees need --upper DIR"),
    (["--root", "A", "--upper", "A"], "--upper A: also given as --root"),
    (["--root", "A", "--root", "A", "--readonly"], "a directory is given twice"),
    (["--root", "A", "--upper", "A/inner"], "nested with --root"),
    (["--root", "A", "--upper", "missing"], "--upper missing: No such file or directory"),
    (["--root", "missing", "--root", "A", "--readonly"], "--root missing: No such file"),
    (["--root", "A", "--root", "file", "--readonly"], "--root file: not a directory"),
])
def test_cli_root_combinations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], argv: list[str],
                               message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A" / "inner").mkdir(parents=True)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SystemExit) as ex:
        cli.main(["9p-serve", *argv, "--listen", "tcp:127.0.0.1:0"])
    err = capsys.readouterr().err
    assert ex.value.code == 2
    assert err.count("\n") == 1 and err.startswith("pyhv: ") and message in err, err
