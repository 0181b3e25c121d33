"""
Durable, private file work for everything the daemon keeps on disk (runs,
tokens): files and directories created owner-only, whole writes, directory
syncs, and opening only regular files. Plain blocking calls: the stores run
them in their own threads.
"""

import os
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600


def create_file(path: str, exclusive: bool = True) -> int:
    """
    Create a file for writing with mode 0600 from the start. The fchmod only
    restores owner bits an unusual umask took away: the file is never wider.
    It is skipped when the mode is right (the usual case): it would change
    the inode, which a file system journals.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    fd = os.open(path, flags, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_directory(path: str) -> bool:
    """Create a 0700 directory (never wider); False if it already existed."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)
    return True


def sync_directory(path: str) -> None:
    """Make the entries created in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_at(fd: int, data: bytes, offset: int) -> None:
    """Write all of C{data} at C{offset} (the file is not opened to append)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class NotRegularFile(OSError):
    """A run file or index that is a directory, a FIFO, a device...: never read."""


def open_regular(path: str):
    """
    Open a file for reading only if it is a regular file. The open does not
    block: a FIFO would block a plain open() for ever.

    @raise NotRegularFile: C{path} is something else.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile("not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
