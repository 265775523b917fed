"""The 9P2000.L file server through an in-memory client against a temp directory."""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Optional

import pytest

from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.server import Export, FileServer, Session, answer

O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
ROOT = 1


class Client:
    """A 9P client over a Session, no sockets: each rpc is one request, one reply."""

    def __init__(self, session: Session, msize: int = 65536) -> None:
        self.session = session
        self.conn = p.Connection(p.Role.CLIENT, max_msize=msize)
        self.tag = 0
        reply = self.rpc(p.Tversion(msize, p.VERSION), tag=p.NOTAG)
        assert reply == p.Rversion(msize, p.VERSION)

    def rpc(self, msg: p.Message, tag: Optional[int] = None) -> p.Message:
        if tag is None:
            self.tag = (self.tag + 1) % 0xFFFF
            tag = self.tag
        out = answer(self.session, self.conn.send(tag, msg))
        self.conn.receive_data(out)
        ev = self.conn.next_event()
        assert isinstance(ev, p.Received) and ev.tag == tag
        assert self.conn.next_event() is p.NEED_DATA
        return ev.message

    def ok(self, msg: p.Message) -> p.Message:
        reply = self.rpc(msg)
        assert not isinstance(reply, p.Rlerror), (msg, os.strerror(reply.ecode))
        return reply

    def err(self, msg: p.Message) -> int:
        reply = self.rpc(msg)
        assert isinstance(reply, p.Rlerror), (msg, reply)
        return reply.ecode

    def attach(self, fid: int = ROOT, uid: int = p.NOFID) -> p.Qid:
        reply = self.ok(p.Tattach(fid, p.NOFID, "user", "", uid))
        assert isinstance(reply, p.Rattach)
        return reply.qid

    def walk(self, fid: int, newfid: int, *names: str) -> tuple[p.Qid, ...]:
        reply = self.ok(p.Twalk(fid, newfid, names))
        assert isinstance(reply, p.Rwalk)
        return reply.wqids

    def read_all(self, fid: int) -> bytes:
        out = b""
        while True:
            r = self.ok(p.Tread(fid, len(out), 4096))
            assert isinstance(r, p.Rread)
            if not r.data:
                return out
            out += r.data

    def readdir(self, fid: int, count: int = 8192) -> list[p.Dirent]:
        out: list[p.Dirent] = []
        offset = 0
        while True:
            r = self.ok(p.Treaddir(fid, offset, count))
            assert isinstance(r, p.Rreaddir)
            ents = p.decode_dirents(r.data)
            if not ents:
                return out
            out += ents
            offset = ents[-1].offset


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello, world\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"inner")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"SECRET")
    (root / "abs-link").symlink_to(outside)
    (root / "rel-link").symlink_to("../outside/secret")
    return root


def make(tree: Path, **kw: object) -> Client:
    session = Session(Export(str(tree), **kw), max_msize=65536)  # type: ignore[arg-type]
    client = Client(session)
    client.attach()
    return client


# ---- basic operation ------------------------------------------------------------------

def test_attach_walk_open_read(tree: Path) -> None:
    c = make(tree)
    qids = c.walk(ROOT, 2, "hello.txt")
    assert qids[0].type == p.QTFILE and qids[0].path == os.stat(tree / "hello.txt").st_ino
    r = c.ok(p.Tlopen(2, O_RDONLY))
    assert isinstance(r, p.Rlopen) and r.iounit == 65536 - p.IOHDRSZ
    assert c.read_all(2) == b"hello, world\n"
    # writing through a read-only open fails with the host's errno
    assert c.err(p.Twrite(2, 0, b"x")) == errno.EBADF
    c.ok(p.Tclunk(2))
    assert c.err(p.Tclunk(2)) == errno.EBADF
    assert c.session.fs.fid_count == 1


def test_walk_partial_and_clone(tree: Path) -> None:
    c = make(tree)
    # a missing first name is an error; a later one gives the qids walked so far
    assert c.err(p.Twalk(ROOT, 2, ("nope",))) == errno.ENOENT
    r = c.rpc(p.Twalk(ROOT, 2, ("sub", "nope", "x")))
    assert isinstance(r, p.Rwalk) and len(r.wqids) == 1
    assert c.err(p.Tclunk(2)) == errno.EBADF  # newfid not created by a partial walk
    assert c.walk(ROOT, 3) == ()  # clone
    assert c.err(p.Twalk(ROOT, 3, ("sub",))) == errno.EINVAL  # newfid in use
    c.walk(3, 3, "sub")  # newfid == fid moves it
    assert c.walk(3, 4, "inner")[0].path == os.stat(tree / "sub/inner").st_ino
    assert c.err(p.Twalk(99, 5, ())) == errno.EBADF


def test_create_write_read_getattr_setattr(tree: Path) -> None:
    c = make(tree)
    c.walk(ROOT, 2)
    r = c.ok(p.Tlcreate(2, "new.bin", O_RDWR, 0o640, p.NOFID))
    assert isinstance(r, p.Rlcreate)
    assert isinstance(w := c.ok(p.Twrite(2, 0, b"abcdef")), p.Rwrite) and w.count == 6
    assert c.ok(p.Tread(2, 2, 100)) == p.Rread(b"cdef")
    assert stat.S_IMODE(os.stat(tree / "new.bin").st_mode) == 0o640
    g = c.ok(p.Tgetattr(2, p.GETATTR_ALL))
    assert isinstance(g, p.Rgetattr)
    assert g.size == 6 and stat.S_ISREG(g.mode) and g.qid == r.qid
    c.ok(p.Tsetattr(2, p.SETATTR_SIZE | p.SETATTR_MODE | p.SETATTR_MTIME | p.SETATTR_MTIME_SET,
                    0o600, 0, 0, 3, 0, 0, 1234, 5))
    st = os.stat(tree / "new.bin")
    assert st.st_size == 3 and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 1234 * 10**9 + 5
    c.ok(p.Tfsync(2, 1))
    assert (tree / "new.bin").read_bytes() == b"abc"
    # an existing name without O_EXCL opens it; with O_EXCL it is EEXIST
    c.walk(ROOT, 3)
    assert c.err(p.Tlcreate(3, "new.bin", O_RDWR | os.O_EXCL, 0o600, 0)) == errno.EEXIST


def test_mkdir_readdir_rename_unlink(tree: Path) -> None:
    c = make(tree)
    assert isinstance(c.ok(p.Tmkdir(ROOT, "d", 0o755, p.NOFID)), p.Rmkdir)
    assert (tree / "d").is_dir()
    for i in range(300):  # more than fits one Rreaddir of 8 KiB
        (tree / "d" / f"file-{i:03}").write_bytes(b"")
    c.walk(ROOT, 2, "d")
    c.ok(p.Tlopen(2, O_RDONLY))
    ents = c.readdir(2, count=2048)
    names = [e.name for e in ents]
    assert names[:2] == [".", ".."]
    assert sorted(names[2:]) == [f"file-{i:03}" for i in range(300)]
    assert [e.offset for e in ents] == list(range(1, 303))
    assert ents[0].type == 4 and ents[5].type == 8
    # reading again from an earlier offset restarts where asked
    r = c.ok(p.Treaddir(2, 300, 8192))
    assert isinstance(r, p.Rreaddir)
    assert [e.name for e in p.decode_dirents(r.data)] == names[300:]
    c.ok(p.Trenameat(2, "file-000", ROOT, "moved"))
    assert (tree / "moved").exists() and not (tree / "d/file-000").exists()
    c.ok(p.Tunlinkat(ROOT, "moved", 0))
    assert not (tree / "moved").exists()
    assert c.err(p.Tunlinkat(ROOT, "d", 0)) in (errno.EISDIR, errno.EPERM)
    assert c.err(p.Tunlinkat(ROOT, "d", p.AT_REMOVEDIR)) == errno.ENOTEMPTY
    assert c.err(p.Tunlinkat(ROOT, "d", 0x1)) == errno.EINVAL


def test_rename_updates_paths_of_open_fids(tree: Path) -> None:
    c = make(tree)
    (tree / "sub/deep").mkdir()
    c.walk(ROOT, 2, "sub", "inner")
    c.walk(ROOT, 6, "sub", "deep")
    c.ok(p.Trenameat(ROOT, "sub", ROOT, "sub2"))
    # '..' from the moved directory re-walks its new path
    qids = c.walk(6, 3, "..")
    assert qids[0].path == os.stat(tree / "sub2").st_ino
    c.ok(p.Tremove(2))
    assert not (tree / "sub2/inner").exists()
    c.walk(ROOT, 4, "hello.txt")
    c.walk(ROOT, 5, "sub2")
    c.ok(p.Trename(4, 5, "h"))
    assert (tree / "sub2/h").read_bytes() == b"hello, world\n"
    c.ok(p.Tlopen(4, O_RDONLY))
    assert c.read_all(4) == b"hello, world\n"


def test_symlink_readlink_link_mknod(tree: Path) -> None:
    c = make(tree)
    r = c.ok(p.Tsymlink(ROOT, "sl", "/etc/passwd", p.NOFID))
    assert isinstance(r, p.Rsymlink) and r.qid.type == p.QTSYMLINK
    assert os.readlink(tree / "sl") == "/etc/passwd"
    c.walk(ROOT, 2, "sl")
    assert c.ok(p.Treadlink(2)) == p.Rreadlink("/etc/passwd")
    c.walk(ROOT, 3, "hello.txt")
    assert c.err(p.Treadlink(3)) == errno.EINVAL
    c.ok(p.Tlink(ROOT, 3, "hard"))
    assert os.stat(tree / "hard").st_ino == os.stat(tree / "hello.txt").st_ino
    c.ok(p.Tlink(ROOT, 2, "sl-hard"))  # a hard link to the symlink itself
    assert os.readlink(tree / "sl-hard") == "/etc/passwd"
    assert c.err(p.Tlink(ROOT, ROOT, "rootlink")) == errno.EPERM
    c.ok(p.Tmknod(ROOT, "fifo", stat.S_IFIFO | 0o644, 0, 0, p.NOFID))
    assert stat.S_ISFIFO(os.lstat(tree / "fifo").st_mode)
    # opening a FIFO would block the server: refused
    c.walk(ROOT, 4, "fifo")
    assert c.err(p.Tlopen(4, O_RDONLY)) == errno.EPERM


def test_statfs_lock_getlock_xattr_flush(tree: Path) -> None:
    c = make(tree)
    s = c.ok(p.Tstatfs(ROOT))
    assert isinstance(s, p.Rstatfs) and s.bsize > 0 and s.namelen == 255
    c.walk(ROOT, 2, "hello.txt")
    c.ok(p.Tlopen(2, O_RDWR))
    assert c.ok(p.Tlock(2, p.LOCK_TYPE_WRLCK, 0, 0, 0, 1, "c")) == p.Rlock(p.LOCK_SUCCESS)
    assert c.err(p.Tlock(2, 7, 0, 0, 0, 1, "c")) == errno.EINVAL
    assert c.ok(p.Tgetlock(2, p.LOCK_TYPE_WRLCK, 0, 10, 5, "c")) == \
        p.Rgetlock(p.LOCK_TYPE_UNLCK, 0, 10, 5, "c")
    assert c.err(p.Txattrwalk(2, 3, "user.x")) == errno.ENODATA
    assert c.err(p.Txattrcreate(3, "user.x", 1, 0)) == errno.EBADF  # no such fid
    assert c.ok(p.Tflush(1)) == p.Rflush()
    assert c.err(p.Tauth(5, "u", "", 0)) == errno.EOPNOTSUPP


def test_bad_names_are_einval(tree: Path) -> None:
    c = make(tree)
    for name in ("", ".", "..", "a/b", "/abs", "nul\0x"):
        assert c.err(p.Tmkdir(ROOT, name, 0o755, 0)) == errno.EINVAL, name
        assert c.err(p.Tlcreate(ROOT, name, O_RDWR, 0o644, 0)) == errno.EINVAL, name
        assert c.err(p.Tunlinkat(ROOT, name, 0)) == errno.EINVAL, name
        assert c.err(p.Trenameat(ROOT, "hello.txt", ROOT, name)) == errno.EINVAL, name
    for name in ("", "a/b", "../x", "nul\0x"):
        assert c.err(p.Twalk(ROOT, 2, (name,))) == errno.EINVAL, name
    c.walk(ROOT, 3, "hello.txt")
    assert c.err(p.Twalk(3, 4, ("..",))) == errno.ENOTDIR  # file/.. is not a directory
    assert c.err(p.Tmkdir(ROOT, "x" * 256, 0o755, 0)) == errno.ENAMETOOLONG
    assert (tree / "hello.txt").exists() and sorted(os.listdir(tree)) == \
        ["abs-link", "hello.txt", "rel-link", "sub"]


# ---- confinement ----------------------------------------------------------------------

def test_dotdot_at_root_stays_at_root(tree: Path) -> None:
    c = make(tree)
    root_ino = os.stat(tree).st_ino
    qids = c.walk(ROOT, 2, "..", "..", "..")
    assert [q.path for q in qids] == [root_ino] * 3
    qids = c.walk(ROOT, 3, "sub", "..", "..", "sub")
    assert [q.path for q in qids][1:3] == [root_ino, root_ino]
    c.ok(p.Tlopen(2, O_RDONLY))
    names = {e.name for e in c.readdir(2)}
    assert "outside" not in names and "hello.txt" in names
    dotdot = [e for e in c.readdir(2) if e.name == ".."][0]
    assert dotdot.qid.path == root_ino


def test_symlinks_are_never_followed(tree: Path) -> None:
    c = make(tree)
    # walking onto a symlink gives the link itself; through it is ENOTDIR
    q = c.walk(ROOT, 2, "abs-link")
    assert q[0].type == p.QTSYMLINK
    r = c.rpc(p.Twalk(ROOT, 3, ("abs-link", "secret")))
    assert isinstance(r, p.Rwalk) and len(r.wqids) == 1  # stopped at the link
    assert c.err(p.Tgetattr(3, 0)) == errno.EBADF
    assert c.err(p.Twalk(2, 3, ("secret",))) == errno.ENOTDIR
    assert c.err(p.Tlopen(2, O_RDONLY)) == errno.ELOOP
    assert c.ok(p.Treadlink(2)) == p.Rreadlink(str(tree.parent / "outside"))
    c.walk(ROOT, 4, "rel-link")
    assert c.err(p.Tlopen(4, O_RDONLY)) == errno.ELOOP
    # creating through a symlinked name does not write outside
    assert c.err(p.Tlcreate(ROOT, "rel-link", O_RDWR, 0o644, 0)) in (errno.ELOOP, errno.EEXIST)
    assert c.err(p.Tmkdir(ROOT, "abs-link", 0o755, 0)) == errno.EEXIST
    # a symlink as the directory of an operation is ENOTDIR
    assert c.err(p.Tlcreate(2, "x", O_RDWR, 0o644, 0)) == errno.ENOTDIR
    assert c.err(p.Tmkdir(2, "x", 0o755, 0)) == errno.ENOTDIR
    assert c.err(p.Tunlinkat(2, "secret", 0)) == errno.ENOTDIR
    # setattr on a symlink changes the link, never the target
    before = os.stat(tree.parent / "outside/secret")
    c.walk(ROOT, 5, "rel-link")
    c.ok(p.Tsetattr(5, p.SETATTR_MTIME | p.SETATTR_MTIME_SET, 0, 0, 0, 0, 0, 0, 1, 0))
    assert os.lstat(tree / "rel-link").st_mtime_ns == 10**9
    assert os.stat(tree.parent / "outside/secret").st_mtime_ns == before.st_mtime_ns
    assert c.err(p.Tsetattr(5, p.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0)) == errno.EINVAL
    assert (tree.parent / "outside/secret").read_bytes() == b"SECRET"
    assert sorted(os.listdir(tree.parent / "outside")) == ["secret"]


def test_directory_swapped_for_symlink_after_walk(tree: Path) -> None:
    c = make(tree)
    c.walk(ROOT, 2, "sub")
    # the host (or another client) swaps sub for a symlink to the outside
    os.rename(tree / "sub", tree / "sub-real")
    os.symlink(tree.parent / "outside", tree / "sub")
    c.ok(p.Tlcreate(2, "created", O_RDWR, 0o644, 0))
    assert (tree / "sub-real/created").exists()
    assert sorted(os.listdir(tree.parent / "outside")) == ["secret"]
    c.walk(ROOT, 3, "sub")  # a fresh walk sees the symlink, and stops there
    assert c.err(p.Twalk(3, 4, ("secret",))) == errno.ENOTDIR


def test_file_swapped_for_symlink_between_walk_and_open(tree: Path) -> None:
    c = make(tree)
    c.walk(ROOT, 2, "hello.txt")
    os.rename(tree / "hello.txt", tree / "old.txt")
    os.symlink(tree.parent / "outside/secret", tree / "hello.txt")
    c.ok(p.Tlopen(2, O_RDWR))
    assert c.read_all(2) == b"hello, world\n"
    c.ok(p.Twrite(2, 0, b"HELLO"))
    assert (tree.parent / "outside/secret").read_bytes() == b"SECRET"
    assert (tree / "old.txt").read_bytes().startswith(b"HELLO")
    # removing through the fid now finds a different object at its name: refused
    assert c.err(p.Tremove(2)) == errno.ESTALE
    assert (tree / "hello.txt").is_symlink()


def test_dotdot_after_parent_swapped_for_symlink(tree: Path) -> None:
    c = make(tree)
    (tree / "sub" / "deeper").mkdir()
    c.walk(ROOT, 2, "sub", "deeper")
    os.rename(tree / "sub", tree / "sub-real")
    os.symlink(tree.parent / "outside", tree / "sub")
    # '..' re-walks ("sub",) from the root without following: ENOTDIR, not outside
    assert c.err(p.Twalk(2, 3, ("..",))) == errno.ENOTDIR


def test_device_nodes_refused(tree: Path) -> None:
    c = make(tree)
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        assert c.err(p.Tmknod(ROOT, "dev", kind | 0o666, 1, 3, 0)) == errno.EPERM
    assert not (tree / "dev").exists()
    assert c.err(p.Tmknod(ROOT, "dir", stat.S_IFDIR | 0o755, 0, 0, 0)) == errno.EINVAL
    if os.geteuid() == 0:
        os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        c.walk(ROOT, 2, "null")
        assert c.err(p.Tlopen(2, O_RDWR)) == errno.EPERM
        g = c.ok(p.Tgetattr(2, p.GETATTR_BASIC))
        assert isinstance(g, p.Rgetattr) and g.rdev == os.makedev(1, 3)


# ---- export modes ---------------------------------------------------------------------

def test_readonly_refuses_every_write(tree: Path) -> None:
    c = make(tree, readonly=True)
    c.walk(ROOT, 2, "hello.txt")
    c.walk(ROOT, 3, "sub")
    c.walk(ROOT, 6, "sub", "inner")
    refused = [
        p.Tlopen(2, O_RDWR), p.Tlopen(2, O_WRONLY), p.Tlopen(2, os.O_TRUNC),
        p.Tlcreate(3, "x", O_RDWR, 0o644, 0), p.Tmkdir(ROOT, "x", 0o755, 0),
        p.Tsymlink(ROOT, "x", "y", 0), p.Tmknod(ROOT, "x", stat.S_IFIFO | 0o644, 0, 0, 0),
        p.Tlink(ROOT, 2, "x"), p.Trename(2, ROOT, "x"),
        p.Trenameat(ROOT, "hello.txt", ROOT, "x"), p.Tunlinkat(ROOT, "hello.txt", 0),
        p.Tsetattr(2, p.SETATTR_MODE, 0o777, 0, 0, 0, 0, 0, 0, 0),
        p.Tsetattr(2, p.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0),
        p.Txattrcreate(2, "user.x", 1, 0), p.Tremove(6),
    ]
    for msg in refused:
        assert c.err(msg) == errno.EROFS, msg
    c.ok(p.Tlopen(2, O_RDONLY))
    assert c.err(p.Twrite(2, 0, b"x")) == errno.EROFS
    assert c.read_all(2) == b"hello, world\n"
    assert sorted(os.listdir(tree)) == ["abs-link", "hello.txt", "rel-link", "sub"]
    assert (tree / "sub/inner").exists()
    assert stat.S_IMODE(os.stat(tree / "hello.txt").st_mode) != 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="passthrough chown needs root")
def test_passthrough_owner_is_the_guests(tree: Path) -> None:
    c = make(tree, security_model="passthrough")
    c.ok(p.Tattach(7, p.NOFID, "u", "", 1234))
    c.walk(7, 2)
    c.ok(p.Tlcreate(2, "owned", O_RDWR, 0o4755, 567))
    st = os.stat(tree / "owned")
    assert (st.st_uid, st.st_gid) == (1234, 567)
    assert stat.S_IMODE(st.st_mode) == 0o4755
    c.ok(p.Tmkdir(7, "dd", 0o2750, 890))
    st = os.stat(tree / "dd")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 890, 0o2750)
    c.ok(p.Tsetattr(2, p.SETATTR_UID | p.SETATTR_GID, 0, 42, 43, 0, 0, 0, 0, 0))
    st = os.stat(tree / "owned")
    assert (st.st_uid, st.st_gid) == (42, 43)


def test_squash_keeps_server_owner_and_drops_setuid(tree: Path) -> None:
    c = make(tree, security_model="squash")
    c.ok(p.Tattach(7, p.NOFID, "u", "", 1234))
    c.walk(7, 2)
    c.ok(p.Tlcreate(2, "owned", O_RDWR, 0o6755, 567))
    st = os.stat(tree / "owned")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(st.st_mode) == 0o755
    c.ok(p.Tsetattr(2, p.SETATTR_UID | p.SETATTR_GID, 0, 42, 43, 0, 0, 0, 0, 0))
    assert os.stat(tree / "owned").st_uid == os.geteuid()
    c.ok(p.Tmkdir(7, "dd", 0o2770, 0))
    assert stat.S_IMODE(os.stat(tree / "dd").st_mode) == 0o2770


def _xattrs_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.pyhv-test", b"1")
    except OSError:
        return False
    return True


def test_mapped_keeps_guest_owner_in_xattrs(tree: Path) -> None:
    if not _xattrs_supported(tree / "hello.txt"):
        pytest.skip("the temp filesystem has no user xattrs")
    c = make(tree, security_model="mapped")
    c.ok(p.Tattach(7, p.NOFID, "u", "", 1234))
    c.walk(7, 2)
    c.ok(p.Tlcreate(2, "owned", O_RDWR, 0o4755, 567))
    st = os.stat(tree / "owned")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o600)
    assert os.getxattr(tree / "owned", "user.virtfs.uid") == b"1234"
    g = c.ok(p.Tgetattr(2, p.GETATTR_BASIC))
    assert isinstance(g, p.Rgetattr)
    assert (g.uid, g.gid, g.mode) == (1234, 567, stat.S_IFREG | 0o4755)
    c.ok(p.Tsetattr(2, p.SETATTR_MODE | p.SETATTR_UID, 0o640, 99, 0, 0, 0, 0, 0, 0))
    g = c.ok(p.Tgetattr(2, p.GETATTR_BASIC))
    assert isinstance(g, p.Rgetattr) and (g.uid, g.mode) == (99, stat.S_IFREG | 0o640)
    assert stat.S_IMODE(os.stat(tree / "owned").st_mode) == 0o600
    c.ok(p.Tmkdir(7, "dd", 0o755, 5))
    assert stat.S_IMODE(os.stat(tree / "dd").st_mode) == 0o700
    c.walk(7, 3, "dd")
    g = c.ok(p.Tgetattr(3, p.GETATTR_BASIC))
    assert isinstance(g, p.Rgetattr) and (g.uid, g.gid, g.mode) == \
        (1234, 5, stat.S_IFDIR | 0o755)
    # a FIFO is a plain host file; the guest sees a FIFO
    c.ok(p.Tmknod(7, "fifo", stat.S_IFIFO | 0o620, 0, 0, 8))
    st = os.lstat(tree / "fifo")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    c.walk(7, 4, "fifo")
    c.ok(p.Tsetattr(4, p.SETATTR_MODE, 0o640, 0, 0, 0, 0, 0, 0, 0))
    g = c.ok(p.Tgetattr(4, p.GETATTR_BASIC))
    assert isinstance(g, p.Rgetattr) and (g.gid, g.mode) == (8, stat.S_IFIFO | 0o640)
    # a stored kind on a host directory is not believed
    os.setxattr(tree / "dd", "user.virtfs.mode", str(stat.S_IFIFO | 0o700).encode())
    g = c.ok(p.Tgetattr(3, p.GETATTR_BASIC))
    assert isinstance(g, p.Rgetattr) and g.mode == stat.S_IFDIR | 0o700
    assert c.err(p.Tmknod(7, "dev", stat.S_IFCHR | 0o600, 1, 3, 0)) == errno.EPERM


# ---- bounds and bad input -------------------------------------------------------------

def test_fid_table_is_bounded(tree: Path) -> None:
    session = Session(Export(str(tree)), max_msize=65536, max_fids=8)
    c = Client(session)
    c.attach()
    for fid in range(2, 9):
        c.walk(ROOT, fid)
    assert c.err(p.Twalk(ROOT, 9, ())) == errno.ENFILE
    assert c.err(p.Tattach(10, p.NOFID, "u", "", 0)) == errno.ENFILE
    c.ok(p.Tclunk(8))
    c.walk(ROOT, 9)
    assert session.fs.fid_count == 8


def test_read_count_clamped_to_msize(tree: Path) -> None:
    (tree / "big").write_bytes(os.urandom(20000))
    session = Session(Export(str(tree)), max_msize=8192)
    c = Client(session, msize=8192)
    c.attach()
    c.walk(ROOT, 2, "big")
    c.ok(p.Tlopen(2, O_RDONLY))
    r = c.ok(p.Tread(2, 0, 0xFFFFFFFF))
    assert isinstance(r, p.Rread) and len(r.data) == 8192 - 11
    assert c.read_all(2) == (tree / "big").read_bytes()


def test_malformed_and_unknown_requests_answered_and_session_goes_on(tree: Path) -> None:
    session = Session(Export(str(tree)))
    c = Client(session)
    c.attach()
    raw = struct.pack("<IBH", 7 + 1, p.Tclunk.TYPE, 40) + b"\x01"
    raw += struct.pack("<IBH", 7 + 2, 222, 41) + b"zz"
    out = answer(session, raw)
    assert out == (struct.pack("<IBHI", 11, 7, 40, errno.EINVAL)
                   + struct.pack("<IBHI", 11, 7, 41, errno.EOPNOTSUPP))
    # the same session still answers (a fresh client state: replies above were raw)
    c.conn = p.Connection(p.Role.CLIENT)
    c.rpc(p.Tversion(65536, p.VERSION), tag=p.NOTAG)
    assert session.fs.fid_count == 0  # Tversion clunked every fid
    c.attach()
    c.walk(ROOT, 2, "hello.txt")


def test_oversized_message_ends_only_that_session(tree: Path) -> None:
    s1 = Session(Export(str(tree)), max_msize=8192)
    s2 = Session(Export(str(tree)), max_msize=8192)
    c2 = Client(s2, msize=8192)
    c2.attach()
    Client(s1, msize=8192)
    s1.receive_data(struct.pack("<IBH", 100000, p.Twrite.TYPE, 1))
    with pytest.raises(p.RemoteProtocolError):
        s1.pending_output()
    c2.walk(ROOT, 2, "hello.txt")


def test_pending_output_is_bounded(tree: Path) -> None:
    (tree / "big").write_bytes(b"x" * 8192)
    session = Session(Export(str(tree)), max_msize=8192)
    c = Client(session, msize=8192)
    c.attach()
    c.walk(ROOT, 2, "big")
    c.ok(p.Tlopen(2, O_RDONLY))
    reqs = b"".join(c.conn.send(100 + i, p.Tread(2, 0, 8192)) for i in range(100))
    session.receive_data(reqs)
    first = session.pending_output(limit=20000)
    assert 20000 <= len(first) < 20000 + 8192
    rest = session.pending_output(limit=1 << 30)
    assert len(first) + len(rest) == 100 * 8192


def test_server_refuses_missing_root(tmp_path: Path) -> None:
    with pytest.raises(p.P9Error, match="missing"):
        FileServer(Export(str(tmp_path / "missing")))
    with pytest.raises(p.P9Error, match="security model"):
        Export(str(tmp_path), security_model="none")


def test_lcreate_of_existing_fifo_does_not_block(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    c = make(tree)
    assert c.err(p.Tlcreate(ROOT, "fifo", O_RDONLY, 0o644, 0)) == errno.EPERM
    c.walk(ROOT, 2)
    assert c.err(p.Tlcreate(2, "sub", O_RDONLY, 0o644, 0)) == errno.EISDIR
    # an existing regular file without O_EXCL is opened, its mode kept
    os.chmod(tree / "hello.txt", 0o604)
    c.ok(p.Tlcreate(2, "hello.txt", O_RDONLY, 0o777, 0))
    assert stat.S_IMODE(os.stat(tree / "hello.txt").st_mode) == 0o604
    assert c.read_all(2) == b"hello, world\n"


def test_reply_too_large_for_msize_is_eio_not_a_crash(tree: Path) -> None:
    target = "x/" * 2044 + "yy"  # 4090 bytes: its Rreadlink (4099) exceeds msize 4096
    os.symlink(target, tree / "long")
    logged: list[str] = []
    session = Session(Export(str(tree)), max_msize=4096, log=logged.append)
    c = Client(session, msize=4096)
    c.attach()
    c.walk(ROOT, 2, "long")
    assert c.err(p.Treadlink(2)) == errno.EIO
    assert logged and "Treadlink" in logged[0]
    c.walk(ROOT, 3, "hello.txt")
