"""Opening boot images: typed, bounded, never blocking.

A kernel or initrd must be a regular file or a block device no larger than the
guest's RAM.  Anything else (a FIFO, a character device such as ``/dev/zero``,
a socket, a directory) is refused with one line before a byte is read, and the
open itself is non-blocking, so a FIFO swapped in after the check cannot hang
start-up (signals keep working at every moment).
"""

from __future__ import annotations

import io
import os
import stat

from pyhv.engine.boot.errors import BootError, os_error_message, size_text

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``"a FIFO"``)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def open_image(path: str, what: str, limit: int,
               error: type[BootError] = BootError) -> tuple[io.BufferedReader, int]:
    """Open ``path`` for reading; the file object and its size in bytes.

    ``what`` names the image in messages (``kernel``, ``initrd``); an image of
    more than ``limit`` bytes is refused (nothing larger can be loaded).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(os_error_message(path, e)) from e
    _check_kind(path, what, st.st_mode, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(os_error_message(path, e)) from e
    try:
        st = os.fstat(fd)
        _check_kind(path, what, st.st_mode, error)  # replaced since the first look
        os.set_blocking(fd, True)
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if size > limit:
            raise error(f"{path}: {what} of {size_text(size)} is larger than the guest's "
                        f"{size_text(limit)} of RAM")
        return os.fdopen(fd, "rb"), size
    except OSError as e:
        os.close(fd)
        raise error(os_error_message(path, e)) from e
    except BaseException:
        os.close(fd)
        raise


def _check_kind(path: str, what: str, mode: int, error: type[BootError]) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise error(f"{path}: {file_kind(mode)}; the {what} must be a regular file "
                    f"or a block device")
