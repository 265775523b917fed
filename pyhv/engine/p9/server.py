"""The filesystem side of 9P2000.L: requests answered from a confined directory tree.

:class:`FileServer` turns one request message into one reply message; it
never sees bytes.  :class:`Session` joins it to a server-side
:class:`~pyhv.engine.p9.protocol.Connection`: bytes in, bytes out, still
without a socket (``serve.py`` is the socket layer).

Confinement.  Every fid holds an ``O_PATH`` descriptor of its object, opened
one component at a time relative to its parent's descriptor with
``O_NOFOLLOW``; the export root's descriptor is the only one opened by path.
So a symlink is never followed by the server (walking through one is
``ENOTDIR``, opening one is ``ELOOP``, ``Treadlink`` returns its text,
absolute or not), a name is never resolved relative to anything but a
descriptor this server holds beneath the root, and a symlink swapped in after a
walk changes nothing for the fid (its descriptor is the object it walked to).
Files are (re)opened for I/O through ``/proc/self/fd/N`` of that descriptor
(the same inode, no path lookup).  ``..`` is not asked of the kernel: each fid
also records its path of names from the root, and ``..`` re-walks that path
minus its last name from the root (``..`` at the root is the root).  Names in
requests that create, remove, rename or link must be one component: empty,
``.``, ``..``, or containing ``/`` or NUL is ``EINVAL``.

Special files.  The guest's kernel serves device nodes, FIFOs and sockets on
a 9p mount itself (from the mode and rdev in ``Rgetattr``); the server refuses
to open them (``EPERM``; ``ENXIO`` for sockets) so a host device node in an
export never reaches the host device and a FIFO never blocks the server.
``Tmknod`` of a character or block device is ``EPERM``.

Security models (libvirt's ``accessmode``):

* ``passthrough``: host owner, group and mode are the guest's; objects the
  guest creates are chowned to the attaching uid and the request's gid (the
  server must be allowed to: usually root);
* ``squash``: every object stays owned by the server's user; chown requests
  succeed without effect; set-user-ID bits (and set-group-ID on non-directories)
  are dropped from modes the guest sets;
* ``mapped``: host objects are created with mode 0600 (0700 for directories)
  owned by the server's user; the guest's uid, gid and mode live in the
  ``user.virtfs.uid``, ``user.virtfs.gid`` and ``user.virtfs.mode`` extended
  attributes (as QEMU's ``mapped-xattr``) and ``Rgetattr`` reports them.

A ``readonly`` export answers every request that would change it with ``EROFS``.

Extended attributes.  ``Txattrwalk`` reads one attribute (or, with an empty
name, the list of names) into the new fid, which the client reads like a file;
``Txattrcreate`` turns the fid into one that collects the value from
``Twrite`` and sets it at ``Tclunk`` (a size of 0 removes the attribute, as
QEMU).  Values are limited to :data:`XATTR_SIZE_MAX` (``E2BIG``), names to 255
bytes (``ERANGE``).  The guest may set ``user.*`` attributes in every model and
also ``trusted.*``/``security.*`` under passthrough; others are ``EOPNOTSUPP``.
Under ``mapped`` the ``user.virtfs.*`` attributes the server keeps are neither
listed nor readable (``ENODATA``) nor writable (``EACCES``) by the guest.
Symlinks carry none (``ENODATA``; setting is ``EPERM``, as Linux for ``user.*``).

Combined trees (:attr:`Export.lower`).  Read-only trees under a writable top
directory, merged as :mod:`pyhv.engine.p9.overlay` describes: the top layer
is ``root``; writes copy the object (file, symlink, or directory chain) up
into it first; deleting a lower entry leaves a ``.wh.NAME`` whiteout there;
renaming a directory that exists in a lower tree is ``EXDEV`` (``mv`` then
copies), and hard links to a lower file are made to its copy.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import Callable, Final, Iterator, Optional, Sequence, Union

from pyhv.engine.p9 import protocol as p
from pyhv.engine.p9.overlay import OPAQUE, WHITEOUT, Layers, is_hidden_name, lstat_at
from pyhv.engine.p9.protocol import Qid

SECURITY_MODELS: Final = ("passthrough", "mapped", "squash")
DEFAULT_MAX_FIDS: Final = 4096
V9FS_MAGIC: Final = 0x01021997
#: bytes of an Rread/Rreaddir header: size[4] type[1] tag[2] count[4]
_RREAD_HEADER: Final = 11
_NAME_MAX: Final = 255
_SYMLINK_MAX: Final = 4095

_O_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: 9P2000.L open flags (Linux x86 values) passed to the host as they are
_PASSED_FLAGS: Final = (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_DSYNC | os.O_SYNC
                        | os.O_DIRECTORY | os.O_EXCL)

_XATTR_UID: Final = "user.virtfs.uid"
_XATTR_GID: Final = "user.virtfs.gid"
_XATTR_MODE: Final = "user.virtfs.mode"
_XATTR_RDEV: Final = "user.virtfs.rdev"
_XATTR_MAPPED_PREFIX: Final = "user.virtfs."
#: the largest extended attribute value (Linux's XATTR_SIZE_MAX), and list
XATTR_SIZE_MAX: Final = 65536
_XATTR_NAME_MAX: Final = 255
_XATTR_CREATE: Final = 1
_XATTR_REPLACE: Final = 2

Log = Callable[[str], None]
#: names of copy-up temporaries (hidden: they start with the whiteout prefix)
_COPY_SERIAL: Final = itertools.count(1)


def _stderr(message: str) -> None:
    print(f"pyhv: 9p: {message}", file=sys.stderr)


class _Errno(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


@dataclass(frozen=True)
class Export:
    """What a server exports and how."""

    #: the exported directory; with ``lower``, the top layer (where writes land)
    root: str
    readonly: bool = False
    security_model: str = "passthrough"
    #: read-only trees under ``root``, bottom first (each overlays the ones before it)
    lower: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.security_model not in SECURITY_MODELS:
            raise p.P9Error(f"security model {self.security_model!r}: expected one of "
                            f"{', '.join(SECURITY_MODELS)}")
        if isinstance(self.lower, (str, bytes)):
            raise p.P9Error(f"lower {self.lower!r}: expected a sequence of directories")
        if not isinstance(self.lower, tuple):
            object.__setattr__(self, "lower", tuple(self.lower))

    @property
    def layers(self) -> tuple[str, ...]:
        """Every directory of the export, top (``root``) first."""
        return (self.root, *reversed(self.lower))

    @classmethod
    def combine(cls, trees: Sequence[str], upper: Optional[str] = None,
                readonly: bool = False, security_model: str = "passthrough") -> "Export":
        """Trees combined as ``pyhv 9p-serve --root A --root B [--upper DIR]``: later
        trees overlay earlier ones; writes go to ``upper``.  Without ``upper`` one tree
        is exported as it is, and several only read-only.  Raises P9Error naming the
        option."""
        trees = list(trees)
        if not trees:
            raise p.P9Error("--root: at least one tree is needed")
        for tree in trees:
            if not tree:
                raise p.P9Error("--root: an empty path")
        if upper is not None:
            if upper in trees:
                raise p.P9Error(f"--upper {upper}: also given as --root")
            return cls(upper, readonly, security_model, tuple(trees))
        if len(trees) > 1 and not readonly:
            raise p.P9Error("several --root trees need --upper DIR (the writable top "
                            "layer) or --readonly")
        return cls(trees[-1], readonly, security_model, tuple(trees[:-1]))


class _Fid:
    __slots__ = ("fd", "path", "uid", "open_fd", "dir_entries", "dir_pos", "dir_peek",
                 "layer", "xattr")

    def __init__(self, fd: int, path: tuple[str, ...], uid: int, layer: int = 0) -> None:
        #: O_PATH descriptor of the object
        self.fd = fd
        #: the layer the object is in (0: the top, or the only tree)
        self.layer = layer
        #: an attribute being read (Txattrwalk) or written (Txattrcreate)
        self.xattr: Optional[_Xattr] = None
        #: names from the export root (for ``..`` and operations on the parent)
        self.path = path
        #: the uid the client attached as (passthrough/mapped owner of new objects)
        self.uid = uid
        self.open_fd: Optional[int] = None
        self.dir_entries: Optional[Iterator[tuple[str, Qid, int]]] = None
        self.dir_pos = 0
        self.dir_peek: Optional[tuple[str, Qid, int]] = None

    def close(self) -> None:
        if self.dir_entries is not None:
            self.dir_entries.close()  # type: ignore[attr-defined]
            self.dir_entries = None
        if self.open_fd is not None:
            os.close(self.open_fd)
            self.open_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Xattr:
    name: str
    data: bytearray
    #: Txattrcreate: set at clunk (with these flags) once ``written`` bytes arrived
    create: bool = False
    flags: int = 0
    written: int = 0


def _check_name(name: str) -> None:
    """One component that may be created, removed or renamed."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise _Errno(errno.EINVAL)
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        raise _Errno(errno.ENAMETOOLONG)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _dtype(mode: int) -> int:
    for test, value in ((stat.S_ISDIR, 4), (stat.S_ISREG, 8), (stat.S_ISLNK, 10),
                        (stat.S_ISCHR, 2), (stat.S_ISBLK, 6), (stat.S_ISFIFO, 1),
                        (stat.S_ISSOCK, 12)):
        if test(mode):
            return value
    return 0


def _copy_data(inp: int, out: int) -> None:
    """Every byte of ``inp`` appended to ``out`` (in the kernel where it can)."""
    try:
        while os.copy_file_range(inp, out, 1 << 24):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while True:
        chunk = os.read(inp, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]


class FileServer:
    """9P2000.L requests answered from ``export``; one instance per connection."""

    def __init__(self, export: Export, max_fids: int = DEFAULT_MAX_FIDS,
                 log: Log = _stderr) -> None:
        self.export = export
        self.max_fids = max_fids
        self.log = log
        self.msize = p.DEFAULT_MAX_MSIZE
        self._layer_fds: list[int] = []
        for tree in export.layers:
            try:
                self._layer_fds.append(os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as e:
                for fd in self._layer_fds:
                    os.close(fd)
                raise p.P9Error(f"{tree}: {e.strerror}") from e
        #: the top layer (the only one without ``lower``)
        self._root = self._layer_fds[0]
        self._layers: Optional[Layers] = Layers(self._layer_fds) if export.lower else None
        self._root_dev = os.fstat(self._root).st_dev
        self._fids: dict[int, _Fid] = {}
        self._handlers: dict[type[p.Message], Callable[[p.Message], p.Message]] = {
            p.Tversion: self._version, p.Tauth: self._auth, p.Tattach: self._attach,
            p.Tflush: self._flush, p.Twalk: self._walk, p.Tclunk: self._clunk,
            p.Tlopen: self._lopen, p.Tlcreate: self._lcreate, p.Tread: self._read,
            p.Twrite: self._write, p.Treaddir: self._readdir, p.Tgetattr: self._getattr,
            p.Tsetattr: self._setattr, p.Tmkdir: self._mkdir, p.Tsymlink: self._symlink,
            p.Tmknod: self._mknod, p.Treadlink: self._readlink, p.Tlink: self._link,
            p.Trename: self._rename, p.Trenameat: self._renameat,
            p.Tunlinkat: self._unlinkat, p.Tremove: self._remove, p.Tstatfs: self._statfs,
            p.Tfsync: self._fsync, p.Tlock: self._lock, p.Tgetlock: self._getlock,
            p.Txattrwalk: self._xattrwalk, p.Txattrcreate: self._xattrcreate,
        }

    @property
    def fid_count(self) -> int:
        return len(self._fids)

    def close(self) -> None:
        self.reset()
        for fd in self._layer_fds:
            os.close(fd)
        self._layer_fds = []
        self._root = -1

    def reset(self) -> None:
        """Clunk every fid (a new Tversion, or the end of the connection)."""
        fids, self._fids = self._fids, {}
        for fid in fids.values():
            fid.close()

    def handle(self, message: p.Message) -> p.Message:
        """The reply to one request; errors become Rlerror, never exceptions."""
        handler = self._handlers.get(type(message))
        if handler is None:
            return p.Rlerror(errno.EOPNOTSUPP)
        try:
            return handler(message)
        except _Errno as e:
            return p.Rlerror(e.code)
        except OSError as e:
            return p.Rlerror(e.errno or errno.EIO)
        except Exception as e:  # a bug here must not take the server down
            self.log(f"internal error on {type(message).__name__}: "
                     f"{type(e).__name__}: {e}")
            return p.Rlerror(errno.EIO)

    # ---- helpers ---------------------------------------------------------------------

    def _fid(self, number: int) -> _Fid:
        fid = self._fids.get(number)
        if fid is None:
            raise _Errno(errno.EBADF)
        return fid

    def _new_fid_slot(self, number: int, replacing: Optional[int] = None) -> None:
        if number == p.NOFID:
            raise _Errno(errno.EINVAL)
        if number in self._fids and number != replacing:
            raise _Errno(errno.EINVAL)
        if number not in self._fids and len(self._fids) >= self.max_fids:
            raise _Errno(errno.ENFILE)

    def _install(self, number: int, fid: _Fid) -> None:
        old = self._fids.pop(number, None)
        if old is not None:
            old.close()
        self._fids[number] = fid

    def _writable(self) -> None:
        if self.export.readonly:
            raise _Errno(errno.EROFS)

    @property
    def _mapped(self) -> bool:
        return self.export.security_model == "mapped"

    @property
    def _iounit(self) -> int:
        return self.msize - p.IOHDRSZ

    def _qid(self, st: os.stat_result) -> Qid:
        if stat.S_ISDIR(st.st_mode):
            type_ = p.QTDIR
        elif stat.S_ISLNK(st.st_mode):
            type_ = p.QTSYMLINK
        else:
            type_ = p.QTFILE
        path = st.st_ino
        if st.st_dev != self._root_dev:
            path = (path ^ ((st.st_dev & 0xFFFF) << 48)) & 0xFFFFFFFFFFFFFFFF
        return Qid(type_, 0, path)

    def _dir_of(self, fid: _Fid) -> int:
        """A directory fid's descriptor (ENOTDIR otherwise)."""
        if not stat.S_ISDIR(os.fstat(fid.fd).st_mode):
            raise _Errno(errno.ENOTDIR)
        return fid.fd

    def _open_path(self, path: tuple[str, ...]) -> int:
        """An O_PATH descriptor of directory ``path``, walked from the root without
        following anything (the topmost one of combined trees); the caller closes it."""
        if self._layers is not None:
            return self._layers.top_dir(path)[1]
        fd = os.dup(self._root)
        try:
            for name in path:
                nfd = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent(self, fid: _Fid) -> tuple[int, str]:
        """(parent descriptor, name) of ``fid``'s object, checked to still be it."""
        if not fid.path:
            raise _Errno(errno.EBUSY)
        pfd = self._open_path(fid.path[:-1])
        try:
            here = os.stat(fid.path[-1], dir_fd=pfd, follow_symlinks=False)
            mine = os.fstat(fid.fd)
            if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                raise _Errno(errno.ESTALE)
        except BaseException:
            os.close(pfd)
            raise
        return pfd, fid.path[-1]

    def _repath(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Fids at or below ``old`` are now at or below ``new`` (after a rename)."""
        n = len(old)
        for fid in self._fids.values():
            if fid.path[:n] == old:
                fid.path = new + fid.path[n:]

    def _guest_mode(self, mode: int, is_dir: bool) -> int:
        mode &= 0o7777
        if self.export.security_model == "squash":
            mode &= ~stat.S_ISUID
            if not is_dir:
                mode &= ~stat.S_ISGID
        return mode

    def _post_create(self, fd: int, name: Optional[str], dir_fd: int, mode: int,
                     uid: int, gid: int, is_link: bool = False) -> None:
        """Ownership and mode of an object the guest just created.

        ``fd`` is its O_PATH descriptor (or -1 for a symlink, reached as
        ``name`` in ``dir_fd``)."""
        model = self.export.security_model
        if model == "mapped":
            if is_link:
                return  # user.* xattrs cannot be set on symlinks
            target = _proc(fd)
            os.setxattr(target, _XATTR_MODE, str(mode).encode())
            if uid != p.NOFID:
                os.setxattr(target, _XATTR_UID, str(uid).encode())
            if gid != p.NOFID:
                os.setxattr(target, _XATTR_GID, str(gid).encode())
            return
        if model == "squash":
            return
        # passthrough: the guest's owner, where it differs from what the host gave
        if is_link:
            assert name is not None
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        else:
            st = os.fstat(fd)
        want_uid = st.st_uid if uid == p.NOFID else uid
        want_gid = st.st_gid if gid == p.NOFID else gid
        if (want_uid, want_gid) != (st.st_uid, st.st_gid):
            if is_link:
                assert name is not None
                os.chown(name, want_uid, want_gid, dir_fd=dir_fd, follow_symlinks=False)
            else:
                os.chown(_proc(fd), want_uid, want_gid)

    def _undo_create(self, dir_fd: int, name: str, is_dir: bool) -> None:
        try:
            if is_dir:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    def _stat(self, fid: _Fid) -> tuple[os.stat_result, int, int, int, int]:
        """(host stat, mode, uid, gid, rdev) as the guest sees them."""
        st = os.fstat(fid.fd)
        mode, uid, gid, rdev = st.st_mode, st.st_uid, st.st_gid, st.st_rdev
        if self._mapped and not stat.S_ISLNK(st.st_mode):
            target = _proc(fid.fd)
            for attr, which in ((_XATTR_MODE, "mode"), (_XATTR_UID, "uid"),
                                (_XATTR_GID, "gid"), (_XATTR_RDEV, "rdev")):
                try:
                    raw = os.getxattr(target, attr)
                    value = int(raw[:24])
                except (OSError, ValueError):
                    continue
                if which == "mode":
                    kind = stat.S_IFMT(value)
                    if not (kind in (stat.S_IFIFO, stat.S_IFSOCK)
                            and stat.S_ISREG(st.st_mode)):
                        kind = stat.S_IFMT(st.st_mode)  # only FIFOs and sockets are mapped
                    mode = kind | (value & 0o7777)
                elif which == "uid":
                    uid = value & 0xFFFFFFFF
                elif which == "gid":
                    gid = value & 0xFFFFFFFF
                else:
                    rdev = value & 0xFFFFFFFFFFFFFFFF
        return st, mode, uid, gid, rdev

    # ---- combined trees --------------------------------------------------------------

    def _promote(self, path: tuple[str, ...], fd: int) -> None:
        """Fids of ``path`` in a lower layer now hold its copy ``fd`` in the top layer."""
        for other in self._fids.values():
            if other.path == path and other.layer != 0:
                nfd = os.dup(fd)
                os.close(other.fd)
                other.fd = nfd
                other.layer = 0

    def _top_path(self, path: tuple[str, ...]) -> int:
        """Directory ``path`` in the top layer, copied up (with its parents) from the
        layer that shows it where needed; the caller closes the descriptor."""
        fd = os.dup(self._root)
        try:
            for i, name in enumerate(path):
                try:
                    nfd = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                except FileNotFoundError:
                    assert self._layers is not None
                    layer, src = self._layers.lookup(path[:i], name)
                    try:
                        if not stat.S_ISDIR(os.fstat(src).st_mode):
                            raise _Errno(errno.ENOTDIR)
                        nfd = self._copy_object(fd, name, src)
                    finally:
                        os.close(src)
                    self._promote(path[:i + 1], nfd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _top_dir(self, fid: _Fid) -> int:
        """A directory fid's descriptor in the top layer (copied up where needed)."""
        self._dir_of(fid)
        if fid.layer != 0:
            os.close(self._top_path(fid.path))  # promotes ``fid``
        return fid.fd

    def _copy_up(self, fid: _Fid) -> None:
        """Copy ``fid``'s object into the top layer (before changing it)."""
        if fid.layer == 0:
            return
        if not fid.path:
            raise _Errno(errno.EROFS)
        if stat.S_ISDIR(os.fstat(fid.fd).st_mode):
            os.close(self._top_path(fid.path))
            return
        pfd = self._top_path(fid.path[:-1])
        try:
            nfd = self._copy_object(pfd, fid.path[-1], fid.fd)
        finally:
            os.close(pfd)
        try:
            self._promote(fid.path, nfd)
        finally:
            os.close(nfd)

    def _copy_up_path(self, path: tuple[str, ...]) -> None:
        assert self._layers is not None
        layer, fd = self._layers.lookup(path[:-1], path[-1])
        tmp = _Fid(fd, path, 0, layer)
        try:
            self._copy_up(tmp)
        finally:
            tmp.close()

    def _copy_object(self, dir_fd: int, name: str, src: int) -> int:
        """A copy of ``src`` (content, mode, owner where allowed, xattrs, times) made as
        ``name`` in ``dir_fd``; its O_PATH descriptor."""
        st = os.fstat(src)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            try:
                fd = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
                try:
                    self._copy_meta(src, fd, st)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException:
                self._undo_create(dir_fd, name, True)
                raise
            return fd
        tmp = f"{WHITEOUT}.pyhv-copy-{os.getpid()}-{next(_COPY_SERIAL)}"
        try:
            if kind == stat.S_IFREG:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                try:
                    inp = os.open(_proc(src), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
                    try:
                        _copy_data(inp, out)
                    finally:
                        os.close(inp)
                finally:
                    os.close(out)
            elif kind == stat.S_IFLNK:
                os.symlink(os.readlink("", dir_fd=src), tmp, dir_fd=dir_fd)
            elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
                os.mknod(tmp, kind | 0o600, dir_fd=dir_fd)
            else:
                raise _Errno(errno.EPERM)
            if kind == stat.S_IFLNK:
                if self.export.security_model == "passthrough":
                    try:
                        os.chown(tmp, st.st_uid, st.st_gid, dir_fd=dir_fd,
                                 follow_symlinks=False)
                    except PermissionError:
                        pass
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd,
                         follow_symlinks=False)
            else:
                fd = os.open(tmp, _O_PATH_FLAGS, dir_fd=dir_fd)
                try:
                    self._copy_meta(src, fd, st)
                finally:
                    os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            self._undo_create(dir_fd, tmp, False)
            raise
        return os.open(name, _O_PATH_FLAGS, dir_fd=dir_fd)

    def _copy_meta(self, src: int, dst: int, st: os.stat_result) -> None:
        target = _proc(dst)
        try:
            names = os.listxattr(_proc(src))
        except OSError:
            names = []
        for attr in names:
            try:
                os.setxattr(target, attr, os.getxattr(_proc(src), attr))
            except OSError:
                pass  # security.* of the host, or a file system without xattrs
        if self.export.security_model == "passthrough":
            try:
                os.chown(target, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _new_name_dir(self, fid: _Fid, name: str) -> int:
        """The directory (top layer) where ``name`` is to be created in ``fid``: EEXIST
        if a lower tree shows it."""
        _check_name(name)
        if self._layers is None:
            return self._dir_of(fid)
        if is_hidden_name(name):
            raise _Errno(errno.EINVAL)
        dir_fd = self._top_dir(fid)
        if lstat_at(dir_fd, WHITEOUT + name) is None \
                and self._layers.visible_below(fid.path, name):
            raise _Errno(errno.EEXIST)
        return dir_fd

    def _created(self, dir_fd: int, name: str, is_dir: bool) -> None:
        """``name`` was created in the top layer: a whiteout it replaces goes (a new
        directory over a deleted lower one hides that one's entries)."""
        if self._layers is None or lstat_at(dir_fd, WHITEOUT + name) is None:
            return
        if is_dir:
            sub = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
            try:
                os.close(os.open(OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=sub))
            finally:
                os.close(sub)
        os.unlink(WHITEOUT + name, dir_fd=dir_fd)

    def _whiteout(self, dir_fd: int, name: str) -> None:
        os.close(os.open(WHITEOUT + name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd))

    def _clear_markers(self, dir_fd: int, name: str) -> None:
        """Remove the whiteouts and opaque marker in top-layer directory ``name``
        (empty to the guest) so that it can be removed or replaced."""
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
        try:
            for entry in os.listdir(sub):
                if is_hidden_name(entry):
                    os.unlink(entry, dir_fd=sub)
        finally:
            os.close(sub)

    def _overlay_stat(self, path: tuple[str, ...], name: str) -> Optional[tuple[int, bool]]:
        """(layer, is a directory) of ``name`` in merged directory ``path``, or None."""
        assert self._layers is not None
        try:
            layer, fd = self._layers.lookup(path, name)
        except FileNotFoundError:
            return None
        try:
            return layer, stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def _overlay_delete(self, parent: tuple[str, ...], name: str,
                        want_dir: Optional[bool]) -> None:
        assert self._layers is not None
        if is_hidden_name(name):
            raise _Errno(errno.ENOENT)
        found = self._overlay_stat(parent, name)
        if found is None:
            raise _Errno(errno.ENOENT)
        layer, is_dir = found
        if want_dir is True and not is_dir:
            raise _Errno(errno.ENOTDIR)
        if want_dir is False and is_dir:
            raise _Errno(errno.EISDIR)
        if is_dir and not self._layers.is_empty(parent + (name,)):
            raise _Errno(errno.ENOTEMPTY)
        below = self._layers.visible_below(parent, name)
        dir_fd = self._top_path(parent)
        try:
            if layer == 0:
                if is_dir:
                    self._clear_markers(dir_fd, name)
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)
            if below:
                self._whiteout(dir_fd, name)
        finally:
            os.close(dir_fd)

    def _overlay_rename(self, opath: tuple[str, ...], oname: str,
                        npath: tuple[str, ...], nname: str) -> None:
        assert self._layers is not None
        if is_hidden_name(oname):
            raise _Errno(errno.ENOENT)
        if is_hidden_name(nname):
            raise _Errno(errno.EINVAL)
        found = self._overlay_stat(opath, oname)
        if found is None:
            raise _Errno(errno.ENOENT)
        layer, is_dir = found
        if opath + (oname,) == npath + (nname,):
            return
        if is_dir and (layer != 0 or self._layers.visible_below(opath, oname)):
            raise _Errno(errno.EXDEV)  # a merged directory: the guest's mv copies it
        target = self._overlay_stat(npath, nname)
        if target is not None:
            if is_dir and not target[1]:
                raise _Errno(errno.ENOTDIR)
            if not is_dir and target[1]:
                raise _Errno(errno.EISDIR)
            if target[1] and not self._layers.is_empty(npath + (nname,)):
                raise _Errno(errno.ENOTEMPTY)
        if layer != 0:
            self._copy_up_path(opath + (oname,))
        src_below = self._layers.visible_below(opath, oname)
        dst_below = self._layers.visible_below(npath, nname)
        ofd = self._top_path(opath)
        try:
            nfd = self._top_path(npath)
            try:
                if target is not None and target[0] == 0 and target[1]:
                    self._clear_markers(nfd, nname)
                had_whiteout = lstat_at(nfd, WHITEOUT + nname) is not None
                os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)
                if had_whiteout:
                    os.unlink(WHITEOUT + nname, dir_fd=nfd)
                if is_dir and (dst_below or had_whiteout):
                    sub = os.open(nname, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=nfd)
                    try:
                        os.close(os.open(OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                                         | os.O_CLOEXEC, 0o600, dir_fd=sub))
                    finally:
                        os.close(sub)
                if src_below:
                    self._whiteout(ofd, oname)
            finally:
                os.close(nfd)
        finally:
            os.close(ofd)

    # ---- session ---------------------------------------------------------------------

    def _version(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tversion)
        self.reset()
        reply = p.negotiate_version(m, self.msize_limit)
        if isinstance(reply, p.Rversion) and reply.version == p.VERSION:
            self.msize = reply.msize
        return reply

    #: the largest msize this server agrees to (set by the Session)
    msize_limit: int = p.DEFAULT_MAX_MSIZE

    def _auth(self, m: p.Message) -> p.Message:
        return p.Rlerror(errno.EOPNOTSUPP)

    def _attach(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tattach)
        if m.afid != p.NOFID:
            raise _Errno(errno.EINVAL)
        self._new_fid_slot(m.fid)
        fd = os.dup(self._root)
        fid = _Fid(fd, (), m.n_uname)
        self._install(m.fid, fid)
        return p.Rattach(self._qid(os.fstat(fd)))

    def _flush(self, m: p.Message) -> p.Message:
        # requests are answered in order before the next is read: nothing is in flight
        return p.Rflush()

    def _clunk(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tclunk)
        fid = self._fids.pop(m.fid, None)
        if fid is None:
            raise _Errno(errno.EBADF)
        try:
            if fid.xattr is not None and fid.xattr.create:
                self._xattr_commit(fid)
        finally:
            fid.close()
        return p.Rclunk()

    # ---- walking ---------------------------------------------------------------------

    def _step(self, fd: int, path: tuple[str, ...], layer: int,
              name: str) -> tuple[int, tuple[str, ...], int]:
        if name == "" or "/" in name or "\0" in name:
            raise _Errno(errno.EINVAL)
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise _Errno(errno.ENOTDIR)
        if name == ".":
            return os.dup(fd), path, layer
        if self._layers is not None:
            parent = path[:-1] if name == ".." else path
            if name == "..":
                top, pfd = self._layers.top_dir(parent)
                return pfd, parent, top
            top, nfd = self._layers.lookup(path, name)
            return nfd, path + (name,), top
        if name == "..":
            if not path:
                return os.dup(self._root), (), 0
            return self._open_path(path[:-1]), path[:-1], 0
        return os.open(name, _O_PATH_FLAGS, dir_fd=fd), path + (name,), 0

    def _walk(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Twalk)
        fid = self._fid(m.fid)
        self._new_fid_slot(m.newfid, replacing=m.fid)
        if fid.open_fd is not None and m.wnames:
            raise _Errno(errno.EBADF)
        if fid.xattr is not None:
            raise _Errno(errno.EBADF)
        fd = os.dup(fid.fd)
        path = fid.path
        layer = fid.layer
        qids: list[Qid] = []
        try:
            for i, name in enumerate(m.wnames):
                try:
                    nfd, path, layer = self._step(fd, path, layer, name)
                except (OSError, _Errno):
                    if i == 0:
                        raise
                    return p.Rwalk(tuple(qids))
                os.close(fd)
                fd = nfd
                qids.append(self._qid(os.fstat(fd)))
            self._install(m.newfid, _Fid(fd, path, fid.uid, layer))
            fd = -1
            return p.Rwalk(tuple(qids))
        finally:
            if fd >= 0:
                os.close(fd)

    # ---- opening and I/O -------------------------------------------------------------

    def _host_flags(self, flags: int) -> int:
        host = (flags & _PASSED_FLAGS) | os.O_CLOEXEC | os.O_NOCTTY
        if host & os.O_ACCMODE == os.O_ACCMODE:
            raise _Errno(errno.EINVAL)
        if self.export.readonly and (host & os.O_ACCMODE != os.O_RDONLY
                                     or host & (os.O_TRUNC | os.O_APPEND)):
            raise _Errno(errno.EROFS)
        return host

    def _lopen(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tlopen)
        fid = self._fid(m.fid)
        if fid.open_fd is not None or fid.xattr is not None:
            raise _Errno(errno.EBADF)
        flags = self._host_flags(m.flags) & ~os.O_EXCL
        if fid.layer != 0 and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC) \
                and stat.S_ISREG(os.fstat(fid.fd).st_mode):
            self._copy_up(fid)
        st = os.fstat(fid.fd)
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            raise _Errno(errno.ELOOP)
        if stat.S_ISSOCK(mode):
            raise _Errno(errno.ENXIO)
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise _Errno(errno.EPERM)
        if stat.S_ISDIR(mode):
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
                raise _Errno(errno.EISDIR)
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.fd)
        else:
            fd = os.open(_proc(fid.fd), flags)
        fid.open_fd = fd
        return p.Rlopen(self._qid(st), self._iounit)

    def _lcreate(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tlcreate)
        fid = self._fid(m.fid)
        if fid.open_fd is not None or fid.xattr is not None:
            raise _Errno(errno.EBADF)
        self._dir_of(fid)
        _check_name(m.name)
        self._writable()
        flags = self._host_flags(m.flags) & ~os.O_DIRECTORY
        if self._layers is not None:
            if is_hidden_name(m.name):
                raise _Errno(errno.EINVAL)
            found = self._overlay_stat(fid.path, m.name)
            if found is not None and found[0] != 0:
                if flags & os.O_EXCL:
                    raise _Errno(errno.EEXIST)
                self._copy_up_path(fid.path + (m.name,))
            dir_fd = self._top_dir(fid)
        else:
            dir_fd = self._dir_of(fid)
        mode = self._guest_mode(m.mode, False)
        host_mode = 0o600 if self._mapped else mode & 0o777
        try:
            fd = os.open(m.name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, host_mode,
                         dir_fd=dir_fd)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # it exists: open it as Tlopen would (never a FIFO, which would block)
            pfd = os.open(m.name, _O_PATH_FLAGS, dir_fd=dir_fd)
            try:
                kind = os.fstat(pfd).st_mode
                if stat.S_ISLNK(kind):
                    raise _Errno(errno.ELOOP)
                if not stat.S_ISREG(kind):
                    raise _Errno(errno.EISDIR if stat.S_ISDIR(kind) else errno.EPERM)
                fd = os.open(_proc(pfd), flags)
            finally:
                os.close(pfd)
            created = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Errno(errno.EPERM)
            path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            if created:
                self._undo_create(dir_fd, m.name, False)
            raise
        try:
            if created:
                # owner before mode: chown clears set-user-ID
                self._post_create(path_fd, None, dir_fd, mode, fid.uid, m.gid)
                if not self._mapped:
                    os.fchmod(fd, mode)
                self._created(dir_fd, m.name, False)
        except BaseException:
            os.close(fd)
            os.close(path_fd)
            self._undo_create(dir_fd, m.name, False)
            raise
        os.close(fid.fd)
        fid.fd = path_fd
        fid.path = fid.path + (m.name,)
        fid.layer = 0
        fid.open_fd = fd
        return p.Rlcreate(self._qid(os.fstat(path_fd)), self._iounit)

    def _read(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tread)
        fid = self._fid(m.fid)
        count = min(m.count, self.msize - _RREAD_HEADER)
        if fid.xattr is not None and not fid.xattr.create:
            return p.Rread(bytes(fid.xattr.data[m.offset:m.offset + count]))
        if fid.open_fd is None:
            raise _Errno(errno.EBADF)
        return p.Rread(os.pread(fid.open_fd, count, m.offset))

    def _write(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Twrite)
        fid = self._fid(m.fid)
        if fid.xattr is not None and fid.xattr.create:
            value = fid.xattr.data
            if m.offset > len(value) or len(m.data) > len(value) - m.offset:
                raise _Errno(errno.ENOSPC)
            value[m.offset:m.offset + len(m.data)] = m.data
            fid.xattr.written += len(m.data)
            return p.Rwrite(len(m.data))
        if fid.open_fd is None:
            raise _Errno(errno.EBADF)
        self._writable()
        return p.Rwrite(os.pwrite(fid.open_fd, m.data, m.offset))

    def _entries(self, fid: _Fid) -> Iterator[tuple[str, Qid, int]]:
        """The directory's entries, ``.`` and ``..`` first, read lazily."""
        yield ".", self._qid(os.fstat(fid.fd)), 4
        if fid.path:
            pfd = self._open_path(fid.path[:-1])
            try:
                parent = os.fstat(pfd)
            finally:
                os.close(pfd)
        else:
            parent = os.fstat(self._root)
        yield "..", self._qid(parent), 4
        if self._layers is not None:
            for _, entry in self._layers.entries(fid.path):
                yield self._dirent(entry)
            return
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fid.fd)
        try:
            with os.scandir(dfd) as it:
                for entry in it:
                    yield self._dirent(entry)
        finally:
            os.close(dfd)

    @staticmethod
    def _dirent(entry: os.DirEntry[str]) -> tuple[str, Qid, int]:
        if entry.is_dir(follow_symlinks=False):
            dtype, qtype = 4, p.QTDIR
        elif entry.is_symlink():
            dtype, qtype = 10, p.QTSYMLINK
        elif entry.is_file(follow_symlinks=False):
            dtype, qtype = 8, p.QTFILE
        else:
            try:
                dtype = _dtype(entry.stat(follow_symlinks=False).st_mode)
            except OSError:
                dtype = 0
            qtype = p.QTFILE
        return entry.name, Qid(qtype, 0, entry.inode()), dtype

    def _readdir(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Treaddir)
        fid = self._fid(m.fid)
        if fid.open_fd is None:
            raise _Errno(errno.EBADF)
        self._dir_of(fid)
        count = min(m.count, self.msize - _RREAD_HEADER)
        if fid.dir_entries is None or m.offset != fid.dir_pos:
            if fid.dir_entries is not None:
                fid.dir_entries.close()  # type: ignore[attr-defined]
            fid.dir_entries = self._entries(fid)
            fid.dir_pos = 0
            fid.dir_peek = None
            # offsets are entry indexes: skip to the one asked for (bounded by the directory)
            for _ in range(m.offset):
                if next(fid.dir_entries, None) is None:
                    break
                fid.dir_pos += 1
            if fid.dir_pos != m.offset:
                fid.dir_pos = m.offset
                return p.Rreaddir(b"")
        out = bytearray()
        while True:
            item = fid.dir_peek if fid.dir_peek is not None else next(fid.dir_entries, None)
            fid.dir_peek = None
            if item is None:
                break
            name, qid, dtype = item
            if len(out) + p.dirent_size(name) > count:
                fid.dir_peek = item
                if not out:
                    raise _Errno(errno.EINVAL)
                break
            fid.dir_pos += 1
            out += p.encode_dirent(p.Dirent(qid, fid.dir_pos, dtype, name))
        return p.Rreaddir(bytes(out))

    # ---- attributes ------------------------------------------------------------------

    def _getattr(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tgetattr)
        fid = self._fid(m.fid)
        st, mode, uid, gid, rdev = self._stat(fid)
        return p.Rgetattr(
            valid=p.GETATTR_BASIC, qid=self._qid(st), mode=mode, uid=uid, gid=gid,
            nlink=st.st_nlink, rdev=rdev, size=st.st_size, blksize=st.st_blksize,
            blocks=st.st_blocks,
            atime_sec=st.st_atime_ns // 10**9, atime_nsec=st.st_atime_ns % 10**9,
            mtime_sec=st.st_mtime_ns // 10**9, mtime_nsec=st.st_mtime_ns % 10**9,
            ctime_sec=st.st_ctime_ns // 10**9, ctime_nsec=st.st_ctime_ns % 10**9,
            btime_sec=0, btime_nsec=0, gen=0, data_version=0)

    def _setattr(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tsetattr)
        fid = self._fid(m.fid)
        valid = m.valid
        if valid & ~0x1FF:
            raise _Errno(errno.EINVAL)
        if not valid & ~p.SETATTR_CTIME:
            return p.Rsetattr()
        self._writable()
        self._copy_up(fid)
        st = os.fstat(fid.fd)
        is_link = stat.S_ISLNK(st.st_mode)
        pfd = -1
        try:
            if is_link:
                pfd, name = self._parent(fid)
            # size first (it moves mtime), owner before mode (chown clears set-user-ID),
            # times last
            if valid & p.SETATTR_SIZE:
                if stat.S_ISDIR(st.st_mode):
                    raise _Errno(errno.EISDIR)
                if not stat.S_ISREG(st.st_mode):
                    raise _Errno(errno.EINVAL)
                os.truncate(_proc(fid.fd), m.size)
            if valid & (p.SETATTR_UID | p.SETATTR_GID):
                uid = m.uid if valid & p.SETATTR_UID else -1
                gid = m.gid if valid & p.SETATTR_GID else -1
                if self._mapped:
                    if not is_link:
                        if uid != -1:
                            os.setxattr(_proc(fid.fd), _XATTR_UID, str(uid).encode())
                        if gid != -1:
                            os.setxattr(_proc(fid.fd), _XATTR_GID, str(gid).encode())
                elif self.export.security_model == "passthrough":
                    if is_link:
                        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
                    else:
                        os.chown(_proc(fid.fd), uid, gid)
            if valid & p.SETATTR_MODE:
                if is_link:
                    raise _Errno(errno.EOPNOTSUPP)
                mode = self._guest_mode(m.mode, stat.S_ISDIR(st.st_mode))
                if self._mapped:
                    kind = stat.S_IFMT(self._stat(fid)[1])
                    os.setxattr(_proc(fid.fd), _XATTR_MODE, str(kind | mode).encode())
                else:
                    os.chmod(_proc(fid.fd), mode)
            if valid & (p.SETATTR_ATIME | p.SETATTR_MTIME):
                now = time.time_ns()
                atime, mtime = st.st_atime_ns, st.st_mtime_ns
                if valid & p.SETATTR_ATIME:
                    atime = m.atime_sec * 10**9 + m.atime_nsec \
                        if valid & p.SETATTR_ATIME_SET else now
                if valid & p.SETATTR_MTIME:
                    mtime = m.mtime_sec * 10**9 + m.mtime_nsec \
                        if valid & p.SETATTR_MTIME_SET else now
                if is_link:
                    os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
                else:
                    os.utime(_proc(fid.fd), ns=(atime, mtime))
        finally:
            if pfd >= 0:
                os.close(pfd)
        return p.Rsetattr()

    def _statfs(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tstatfs)
        fid = self._fid(m.fid)
        sv = os.fstatvfs(fid.fd)
        return p.Rstatfs(type=V9FS_MAGIC, bsize=sv.f_bsize, blocks=sv.f_blocks,
                         bfree=sv.f_bfree, bavail=sv.f_bavail, files=sv.f_files,
                         ffree=sv.f_ffree, fsid=sv.f_fsid & 0xFFFFFFFFFFFFFFFF,
                         namelen=sv.f_namemax)

    def _fsync(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tfsync)
        fid = self._fid(m.fid)
        if fid.open_fd is None:
            raise _Errno(errno.EBADF)
        if m.datasync:
            os.fdatasync(fid.open_fd)
        else:
            os.fsync(fid.open_fd)
        return p.Rfsync()

    def _lock(self, m: p.Message) -> p.Message:
        # advisory locks are kept by the guest's kernel; the server grants them (as QEMU)
        assert isinstance(m, p.Tlock)
        self._fid(m.fid)
        if m.type not in (p.LOCK_TYPE_RDLCK, p.LOCK_TYPE_WRLCK, p.LOCK_TYPE_UNLCK):
            raise _Errno(errno.EINVAL)
        return p.Rlock(p.LOCK_SUCCESS)

    def _getlock(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tgetlock)
        self._fid(m.fid)
        if m.type not in (p.LOCK_TYPE_RDLCK, p.LOCK_TYPE_WRLCK, p.LOCK_TYPE_UNLCK):
            raise _Errno(errno.EINVAL)
        return p.Rgetlock(p.LOCK_TYPE_UNLCK, m.start, m.length, m.proc_id, m.client_id)

    def _xattr_name(self, name: str) -> None:
        if not name or "\0" in name:
            raise _Errno(errno.EINVAL)
        if len(name.encode("utf-8", "surrogateescape")) > _XATTR_NAME_MAX:
            raise _Errno(errno.ERANGE)

    def _xattr_hidden(self, name: str) -> bool:
        return self._mapped and name.startswith(_XATTR_MAPPED_PREFIX)

    def _xattrwalk(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Txattrwalk)
        fid = self._fid(m.fid)
        if fid.xattr is not None:
            raise _Errno(errno.EBADF)
        self._new_fid_slot(m.newfid, replacing=m.fid)
        is_link = stat.S_ISLNK(os.fstat(fid.fd).st_mode)
        if m.name:
            self._xattr_name(m.name)
            if is_link or self._xattr_hidden(m.name):
                raise _Errno(errno.ENODATA)
            value = os.getxattr(_proc(fid.fd), m.name)
        else:
            names = [] if is_link else os.listxattr(_proc(fid.fd))
            value = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names
                             if not self._xattr_hidden(n))
        if len(value) > XATTR_SIZE_MAX:
            raise _Errno(errno.E2BIG)
        new = _Fid(os.dup(fid.fd), fid.path, fid.uid, fid.layer)
        new.xattr = _Xattr(m.name, bytearray(value))
        self._install(m.newfid, new)
        return p.Rxattrwalk(len(value))

    def _xattrcreate(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Txattrcreate)
        fid = self._fid(m.fid)
        if fid.xattr is not None or fid.open_fd is not None:
            raise _Errno(errno.EBADF)
        self._xattr_name(m.name)
        if m.flags & ~(_XATTR_CREATE | _XATTR_REPLACE):
            raise _Errno(errno.EINVAL)
        if m.attr_size > XATTR_SIZE_MAX:
            raise _Errno(errno.E2BIG)
        namespace = m.name.partition(".")[0]
        allowed = ("user", "trusted", "security") \
            if self.export.security_model == "passthrough" else ("user",)
        if namespace not in allowed or "." not in m.name:
            raise _Errno(errno.EOPNOTSUPP)
        if self._xattr_hidden(m.name):
            raise _Errno(errno.EACCES)
        self._writable()
        if stat.S_ISLNK(os.fstat(fid.fd).st_mode):
            raise _Errno(errno.EPERM)
        self._copy_up(fid)
        fid.xattr = _Xattr(m.name, bytearray(m.attr_size), create=True, flags=m.flags)
        return p.Rxattrcreate()

    def _xattr_commit(self, fid: _Fid) -> None:
        """Tclunk of a Txattrcreate fid: set (or, for size 0, remove) the attribute."""
        x = fid.xattr
        assert x is not None
        if x.written != len(x.data):
            raise _Errno(errno.EINVAL)
        target = _proc(fid.fd)
        if x.data:
            flags = (os.XATTR_CREATE if x.flags & _XATTR_CREATE else 0) \
                | (os.XATTR_REPLACE if x.flags & _XATTR_REPLACE else 0)
            os.setxattr(target, x.name, bytes(x.data), flags)
        else:
            os.removexattr(target, x.name)

    # ---- creating, linking, removing -------------------------------------------------

    def _mkdir(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tmkdir)
        fid = self._fid(m.dfid)
        self._dir_of(fid)
        _check_name(m.name)
        self._writable()
        dir_fd = self._new_name_dir(fid, m.name)
        mode = self._guest_mode(m.mode, True)
        os.mkdir(m.name, 0o700 if self._mapped else mode & 0o777, dir_fd=dir_fd)
        try:
            fd = os.open(m.name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=dir_fd)
        except BaseException:
            self._undo_create(dir_fd, m.name, True)
            raise
        try:
            self._post_create(fd, None, dir_fd, mode, fid.uid, m.gid)
            if not self._mapped:
                os.chmod(_proc(fd), mode)
            self._created(dir_fd, m.name, True)
            return p.Rmkdir(self._qid(os.fstat(fd)))
        except BaseException:
            self._undo_create(dir_fd, m.name, True)
            raise
        finally:
            os.close(fd)

    def _symlink(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tsymlink)
        fid = self._fid(m.fid)
        self._dir_of(fid)
        _check_name(m.name)
        if not m.symtgt or "\0" in m.symtgt or \
                len(m.symtgt.encode("utf-8", "surrogateescape")) > _SYMLINK_MAX:
            raise _Errno(errno.EINVAL)
        self._writable()
        dir_fd = self._new_name_dir(fid, m.name)
        os.symlink(m.symtgt, m.name, dir_fd=dir_fd)
        try:
            self._post_create(-1, m.name, dir_fd, 0o777, fid.uid, m.gid, is_link=True)
            self._created(dir_fd, m.name, False)
            return p.Rsymlink(self._qid(os.stat(m.name, dir_fd=dir_fd,
                                                follow_symlinks=False)))
        except BaseException:
            self._undo_create(dir_fd, m.name, False)
            raise

    def _mknod(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tmknod)
        fid = self._fid(m.dfid)
        self._dir_of(fid)
        _check_name(m.name)
        kind = stat.S_IFMT(m.mode) or stat.S_IFREG
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise _Errno(errno.EPERM)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _Errno(errno.EINVAL)
        self._writable()
        dir_fd = self._new_name_dir(fid, m.name)
        mode = self._guest_mode(m.mode, False)
        # mapped: a FIFO or socket is a regular 0600 file, its kind in user.virtfs.mode
        host_kind = stat.S_IFREG if self._mapped else kind
        os.mknod(m.name, host_kind | (0o600 if self._mapped else mode & 0o777), dir_fd=dir_fd)
        try:
            fd = os.open(m.name, _O_PATH_FLAGS, dir_fd=dir_fd)
        except BaseException:
            self._undo_create(dir_fd, m.name, False)
            raise
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != host_kind:
                raise _Errno(errno.EEXIST)
            self._post_create(fd, None, dir_fd, kind | mode if self._mapped else mode,
                              fid.uid, m.gid)
            if not self._mapped:
                os.chmod(_proc(fd), mode)
            self._created(dir_fd, m.name, False)
            return p.Rmknod(self._qid(os.fstat(fd)))
        except BaseException:
            self._undo_create(dir_fd, m.name, False)
            raise
        finally:
            os.close(fd)

    def _readlink(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Treadlink)
        fid = self._fid(m.fid)
        if not stat.S_ISLNK(os.fstat(fid.fd).st_mode):
            raise _Errno(errno.EINVAL)
        # readlinkat(fd, "") reads the link an O_PATH|O_NOFOLLOW descriptor holds
        return p.Rreadlink(os.readlink("", dir_fd=fid.fd))

    def _link(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tlink)
        dfid = self._fid(m.dfid)
        src = self._fid(m.fid)
        self._dir_of(dfid)
        _check_name(m.name)
        self._writable()
        if stat.S_ISDIR(os.fstat(src.fd).st_mode):
            raise _Errno(errno.EPERM)
        dir_fd = self._new_name_dir(dfid, m.name)
        self._copy_up(src)
        pfd, name = self._parent(src)
        try:
            os.link(name, m.name, src_dir_fd=pfd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(pfd)
        self._created(dir_fd, m.name, False)
        return p.Rlink()

    def _rename(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Trename)
        fid = self._fid(m.fid)
        dfid = self._fid(m.dfid)
        dir_fd = self._dir_of(dfid)
        _check_name(m.name)
        self._writable()
        if self._layers is not None:
            if not fid.path:
                raise _Errno(errno.EBUSY)
            self._overlay_rename(fid.path[:-1], fid.path[-1], dfid.path, m.name)
        else:
            pfd, name = self._parent(fid)
            try:
                os.rename(name, m.name, src_dir_fd=pfd, dst_dir_fd=dir_fd)
            finally:
                os.close(pfd)
        self._repath(fid.path, dfid.path + (m.name,))
        return p.Rrename()

    def _renameat(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Trenameat)
        old = self._fid(m.olddirfid)
        new = self._fid(m.newdirfid)
        old_fd = self._dir_of(old)
        new_fd = self._dir_of(new)
        _check_name(m.oldname)
        _check_name(m.newname)
        self._writable()
        if self._layers is not None:
            self._overlay_rename(old.path, m.oldname, new.path, m.newname)
        else:
            os.rename(m.oldname, m.newname, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        self._repath(old.path + (m.oldname,), new.path + (m.newname,))
        return p.Rrenameat()

    def _unlinkat(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tunlinkat)
        fid = self._fid(m.dirfid)
        dir_fd = self._dir_of(fid)
        _check_name(m.name)
        if m.flags & ~p.AT_REMOVEDIR:
            raise _Errno(errno.EINVAL)
        self._writable()
        if self._layers is not None:
            self._overlay_delete(fid.path, m.name, bool(m.flags & p.AT_REMOVEDIR))
        elif m.flags & p.AT_REMOVEDIR:
            os.rmdir(m.name, dir_fd=dir_fd)
        else:
            os.unlink(m.name, dir_fd=dir_fd)
        return p.Runlinkat()

    def _remove(self, m: p.Message) -> p.Message:
        assert isinstance(m, p.Tremove)
        fid = self._fid(m.fid)
        try:
            self._writable()
            is_dir = stat.S_ISDIR(os.fstat(fid.fd).st_mode)
            if self._layers is not None:
                if not fid.path:
                    raise _Errno(errno.EBUSY)
                self._overlay_delete(fid.path[:-1], fid.path[-1], is_dir)
                return p.Rremove()
            pfd, name = self._parent(fid)
            try:
                if is_dir:
                    os.rmdir(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
            finally:
                os.close(pfd)
        finally:
            # the fid is clunked whether or not the remove succeeded
            self._fids.pop(m.fid, None)
            fid.close()
        return p.Rremove()


class Session:
    """A server connection and its file server: bytes in, bytes out.

    Output is produced on demand and bounded: :meth:`pending_output` answers
    buffered requests only until ``limit`` bytes are ready, so a client that
    sends requests without reading replies holds at most one msize of input
    and ``limit`` + one msize of output here.
    """

    def __init__(self, export: Export, max_msize: int = p.DEFAULT_MAX_MSIZE,
                 max_fids: int = DEFAULT_MAX_FIDS, log: Log = _stderr) -> None:
        self.conn = p.Connection(p.Role.SERVER, max_msize)
        self.fs = FileServer(export, max_fids, log)
        self.fs.msize_limit = max_msize
        self.log = log
        self.closed = False

    @property
    def wants_data(self) -> bool:
        return not self.closed and self.conn.wants_data

    def receive_data(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def pending_output(self, limit: int = 1 << 20) -> bytes:
        """Answer buffered requests; the bytes to send (raises RemoteProtocolError)."""
        out = bytearray()
        while not self.closed and len(out) < limit:
            event = self.conn.next_event()
            if event is p.NEED_DATA:
                break
            if isinstance(event, p.ConnectionClosed):
                self.closed = True
                break
            if isinstance(event, p.Invalid):
                out += self.conn.send(event.tag, p.Rlerror(event.errno))
                continue
            assert isinstance(event, p.Received)
            reply = self.fs.handle(event.message)
            if isinstance(event.message, p.Tversion) and isinstance(reply, p.Rversion):
                reply = p.Rversion(min(reply.msize, self.conn.max_msize), reply.version)
            try:
                out += self.conn.send(event.tag, reply)
            except p.LocalProtocolError as e:
                # a reply that cannot be sent (a host name or link too long for msize)
                self.log(f"cannot answer {type(event.message).__name__}: {e}")
                out += self.conn.send(event.tag, p.Rlerror(errno.EIO))
        return bytes(out)

    def close(self) -> None:
        self.closed = True
        self.fs.close()


def answer(session: Session, data: Union[bytes, bytearray]) -> bytes:
    """Feed ``data`` and return every reply it produces (tests and simple loops)."""
    session.receive_data(bytes(data))
    return session.pending_output(limit=1 << 62)
