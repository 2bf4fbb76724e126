"""One run per output folder: rank 0 holds a lock on <output_dir>/.run.lock for the life of the run.

POSIX record locks (fcntl.lockf), not flock: they belong to the process, so the forked loader
workers do not inherit them (a kill -9 of rank 0 would otherwise leave the lock held until its
orphaned workers noticed), the kernel drops them when the process dies (kill -9, node loss, a
SLURM requeue, a torchrun restart: the next holder is always a new process), and NFS v3/v4 and
Lustre (mounted with -o flock or localflock) implement them. Where the file system refuses locks
altogether the run warns and goes on unguarded.

Only rank 0 locks, but every rank must learn that it failed: ranks left waiting for a rank 0 that
has exited would end on the hang watchdog's exit code, which the SLURM scripts requeue, so a
duplicate job would come back again and again (acquire_for_job).
"""
import datetime
import errno
import fcntl
import logging
import os
import socket
import sys
import time
from typing import Optional

import torch.distributed as dist

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError

log = logging.getLogger("mae")

LOCK_NAME = ".run.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Held by rank 0 from before the output folder is read until the run ends (release(), or the
    process's death)."""

    def __init__(self, fd: Optional[int], path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing any descriptor of the file drops a POSIX lock: this is the only one
            self.fd = None


def _holder(fd: int) -> str:
    # The holder writes its line right after locking: a reader that lost the race may be early.
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "another process (it has not written its name yet)"


def acquire(output_dir: str) -> RunLock:
    """Lock output_dir for this run (creating the folder); a one-line UserError names the holder
    when another run has it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        # Not O_TRUNC: the holder's line must survive a competitor's open.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot open the run lock {path}: {os_error_text(e)}; make --output_dir writable or "
                        "give another folder") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            holder = _holder(fd)
            os.close(fd)
            raise UserError(f"--output_dir {output_dir} is in use by another run ({holder}); wait for it to end or "
                            "stop it, or give another --output_dir") from None
        if e.errno in _NO_LOCKS:
            print(f"warning: the file system of --output_dir {output_dir} does not support file locks "
                  f"({os_error_text(e)}): nothing stops a second run from writing into this folder at the same "
                  "time", file=sys.stderr, flush=True)
            return RunLock(fd, path)
        os.close(fd)
        raise UserError(f"cannot lock {path}: {os_error_text(e)}") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    line = f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    return RunLock(fd, path)


def acquire_for_job(output_dir: str) -> RunLock:
    """acquire() on rank 0, after the process group is joined; every rank raises the same UserError
    (exit 2, printed by rank 0) when the folder is held by another run."""
    lock, error = RunLock(None, ""), None
    if dist_util.get_rank() == 0:
        try:
            lock = acquire(output_dir)
        except UserError as e:
            error = str(e)
    if dist_util.is_dist():
        box = [error]
        dist.broadcast_object_list(box, src=0, group=dist_util.cpu_group())
        error = box[0]
    if error is not None:
        raise UserError(error)
    return lock
