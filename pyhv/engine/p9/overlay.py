"""Several directory trees seen as one (novm's packs): the lookup side of a union.

Layers are listed top first: layer 0 is the writable top (or, in a read-only
export, simply the topmost tree), the others are read-only trees, each
overlaying the ones after it.  Every layer is reached only through its root
descriptor, one name at a time with ``O_NOFOLLOW``, as in a single-tree export.

Semantics (the same in every layer):

* a name is looked up top-down; the first layer that has it wins;
* a directory merges with the directories at the same path in the layers below
  it, unless it holds the marker :data:`OPAQUE`; a non-directory hides
  everything below it;
* a file ``.wh.NAME`` in a layer's directory (a whiteout, the AUFS/OCI-layer
  convention) hides ``NAME`` in the layers below; whiteouts and the opaque
  marker are never shown to the guest, and names starting with ``.wh.`` are
  refused.

Writes (in :mod:`pyhv.engine.p9.server`) copy an object up into layer 0 before
changing it, and delete lower entries by writing whiteouts into layer 0.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final, Iterator, Optional

WHITEOUT: Final = ".wh."
OPAQUE: Final = ".wh..wh..opq"

_O_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def LayerError(code: int) -> OSError:  # noqa: N802 (raised like an exception class)
    """An errno for the guest, as the OSError subclass the kernel's would be
    (``FileNotFoundError`` for ENOENT ...)."""
    return OSError(code, os.strerror(code))


def lstat_at(dfd: int, name: str) -> Optional[os.stat_result]:
    """``name`` in directory ``dfd`` without following it, or None if absent."""
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def is_hidden_name(name: str) -> bool:
    return name.startswith(WHITEOUT)


def close_all(stack: list[tuple[int, int]]) -> None:
    for _, fd in stack:
        os.close(fd)


class Layers:
    """Root descriptors of the layers, top first (not owned: the caller closes them)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots

    def stack(self, path: tuple[str, ...]) -> list[tuple[int, int]]:
        """The directories merged at ``path``: (layer, O_PATH descriptor) top first.

        The caller closes the descriptors (:func:`close_all`).  ENOENT if no layer
        shows a directory there, ENOTDIR if the topmost object there is not one."""
        cur = [(i, os.dup(fd)) for i, fd in enumerate(self.roots)]
        try:
            for name in path:
                nxt: list[tuple[int, int]] = []
                try:
                    for layer, dfd in cur:
                        st = lstat_at(dfd, name)
                        if st is None:
                            if lstat_at(dfd, WHITEOUT + name) is not None:
                                break
                            continue
                        if not stat.S_ISDIR(st.st_mode):
                            if not nxt:
                                raise LayerError(errno.ENOTDIR)
                            break
                        nfd = os.open(name, _O_PATH_FLAGS | os.O_DIRECTORY, dir_fd=dfd)
                        nxt.append((layer, nfd))
                        if lstat_at(nfd, OPAQUE) is not None:
                            break
                except BaseException:
                    close_all(nxt)
                    raise
                close_all(cur)
                cur = nxt
                if not cur:
                    raise LayerError(errno.ENOENT)
        except BaseException:
            close_all(cur)
            raise
        return cur

    def top_dir(self, path: tuple[str, ...]) -> tuple[int, int]:
        """(layer, descriptor) of the topmost directory at ``path``."""
        stack = self.stack(path)
        close_all(stack[1:])
        return stack[0]

    def lookup(self, path: tuple[str, ...], name: str) -> tuple[int, int]:
        """(layer, O_PATH descriptor) of ``name`` in the merged directory ``path``."""
        if is_hidden_name(name):
            raise LayerError(errno.ENOENT)
        stack = self.stack(path)
        try:
            for layer, dfd in stack:
                try:
                    return layer, os.open(name, _O_PATH_FLAGS, dir_fd=dfd)
                except FileNotFoundError:
                    if lstat_at(dfd, WHITEOUT + name) is not None:
                        break
            raise LayerError(errno.ENOENT)
        finally:
            close_all(stack)

    def visible_below(self, path: tuple[str, ...], name: str) -> bool:
        """Whether a layer under the top shows ``name`` in directory ``path`` (what
        the guest would see there if the top layer had neither it nor a whiteout)."""
        try:
            stack = self.stack(path)
        except OSError:
            return False
        try:
            for layer, dfd in stack:
                if layer == 0:
                    continue
                if lstat_at(dfd, name) is not None:
                    return True
                if lstat_at(dfd, WHITEOUT + name) is not None:
                    return False
            return False
        finally:
            close_all(stack)

    def entries(self, path: tuple[str, ...]) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """The merged directory's entries (name, the topmost entry); hidden names and
        whited-out entries left out."""
        stack = self.stack(path)
        try:
            seen: set[str] = set()
            hidden: set[str] = set()
            for _, dfd in stack:
                whiteouts: set[str] = set()
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    with os.scandir(rfd) as it:
                        for entry in it:
                            name = entry.name
                            if is_hidden_name(name):
                                if name != OPAQUE:
                                    whiteouts.add(name[len(WHITEOUT):])
                                continue
                            if name in seen or name in hidden:
                                continue
                            seen.add(name)
                            yield name, entry
                finally:
                    os.close(rfd)
                hidden |= whiteouts
        finally:
            close_all(stack)

    def is_empty(self, path: tuple[str, ...]) -> bool:
        it = self.entries(path)
        try:
            return next(it, None) is None
        finally:
            it.close()  # type: ignore[attr-defined]
