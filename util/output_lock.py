"""One run per output folder: an advisory lock on the folder itself, held while the process lives.

Two runs writing one --output_dir rotate each other's checkpoint-last/-prev away and interleave
log.txt; the second is refused up front instead. The lock is flock on the directory (no file is
added to the folder, nothing to clean after a crash: the kernel drops it with the process).
"""
import errno
import fcntl
import os

from .errors import UserError

_held = {}  # real path -> the descriptor that holds its lock


def hold_output_dir(path: str, flag: str = "--output_dir") -> None:
    real = os.path.realpath(path)
    if real in _held:  # this process's own earlier run (an in-process rerun)
        return
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(f"{flag} {path} is in use by another run (a live process holds its lock): wait for "
                            f"that run to end or stop it, or give another {flag}") from None
        return  # a file system without flock (some network mounts): run unguarded, as before
    _held[real] = fd


def release_output_dirs() -> None:
    while _held:
        os.close(_held.popitem()[1])
