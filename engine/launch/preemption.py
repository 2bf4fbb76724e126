"""Stop cleanly on SIGUSR1 / SIGUSR2 / SIGTERM: finish the step, write checkpoint-last, then hand over.

SLURM signals every task of a job ahead of its time limit (submitit asks for SIGUSR2
`slurm_signal_delay_s` seconds ahead; `scancel --signal=USR1` does it by hand) and sends SIGTERM
before preempting or cancelling it. The handler only records the signal; the training
loop notices it between optimizer steps, all ranks agree on the same step (one tiny all-reduce
on a CPU group per step), checkpoint-last is written for that position, and then the handler
that was installed before ours runs: under submitit that is its requeue logic on rank 0.

A SLURM task can be signalled at any moment, also while Python starts or imports torch, long
before a StopRequest exists; the default action of SIGUSR1/SIGUSR2 would kill it. So the tasks
start through scripts/slurm/task_entry.py, which calls record_early() first: until a StopRequest
takes over, signals are only recorded, and the StopRequest acts on them at the first step
boundary. This module imports nothing heavy (no torch) for that reason.
"""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Optional

from util.errors import TrainingStopped

log = logging.getLogger("mae")

# submitit asks SLURM for SIGUSR2; plain sbatch scripts (and people) tend to use SIGUSR1.
USER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
SIGNALS = (*USER_SIGNALS, signal.SIGTERM)


class Preempted(TrainingStopped):
    """Training stopped on a signal after writing checkpoint-last; run again to resume."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class _Early:
    """What record_early() saw before any StopRequest existed."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: Dict[int, object] = {}  # the handlers record_early() replaced (e.g. submitit's)
        self.wait_s: Optional[float] = None
        self.timer: Optional[threading.Timer] = None


_early = _Early()


def _record_early(signum, frame) -> None:
    if _early.signum is None:
        _early.signum = signum
        _arm_timer()


def _arm_timer() -> None:
    if _early.signum in USER_SIGNALS and _early.wait_s is not None and _early.timer is None:
        # A task whose peers died from the same signal before they could record it waits forever
        # for them in the rendezvous; and a set-up slower than the grace period would be killed
        # at the time limit without a requeue. Either way, end like a task the signal killed:
        # the batch script requeues the job on that exit code (nothing is trained yet, nothing lost).
        _early.timer = threading.Timer(_early.wait_s, _give_up, args=(_early.signum,))
        _early.timer.daemon = True
        _early.timer.start()


def _give_up(signum: int) -> None:
    if _early.signum != signum:  # a StopRequest took over meanwhile
        return
    name = signal.Signals(signum).name
    print(f"error: {name} received before training started, and training did not start within "
          f"{_early.wait_s:g} s: exiting with code {128 + signum} so that the job is requeued",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)


def record_early(wait_s: Optional[float] = None) -> None:
    """Record SIGUSR1/SIGUSR2/SIGTERM from now until a StopRequest is installed; main thread only.

    Call it again after other code (submitit) installed handlers of its own: those are kept and
    become the StopRequest's "previous" handlers, so submitit still requeues, but only once
    checkpoint-last is written. wait_s: if a user signal arrives and no StopRequest takes over
    within wait_s seconds, the process exits with code 128 + signal number (what the signal
    would have done), which the SLURM batch scripts treat as "requeue"."""
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is not _record_early:
            _early.previous[sig] = current
            signal.signal(sig, _record_early)
    if wait_s is not None:
        _early.wait_s = wait_s
        _arm_timer()  # for a signal recorded before the wait was known


def slurm_time_left(job_id: str) -> Optional[float]:
    """Seconds until the job's time limit (squeue %L: [D-][H:]M:S); None if unlimited or unknown."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    days, _, clock = out.rpartition("-")
    parts = clock.split(":")
    if not (1 < len(parts) <= 3 and all(p.isdigit() for p in parts) and (not days or days.isdigit())):
        return None  # UNLIMITED, NOT_SET, INVALID, no such job
    seconds = 0
    for p in parts:
        seconds = 60 * seconds + int(p)
    return seconds + 86400 * int(days or 0)


def watch_time_limit(job_id: str, signal_delay_s: float, time_left=slurm_time_left) -> threading.Thread:
    """Rank 0 of a SLURM job: send this process SIGUSR2 signal_delay_s before the job's time limit
    (the other ranks learn of it at the next step boundary). SLURM's own warning signal reaches
    only the job steps that exist when it is sent: one due while the batch script starts (a short
    limit, a slow launch: SLURM counts the run from its start time, not from when the tasks run)
    is lost, and the job would end at its limit without a requeue. The limit is read again before
    signalling, so an extended limit is respected. Runs in a daemon thread; returns it."""
    def watch():
        while True:
            left = time_left(job_id)
            if left is None:
                return
            wait = left - signal_delay_s
            if wait > 1:
                time.sleep(wait)
                continue
            # A stop already under way just ignores it.
            os.kill(os.getpid(), signal.SIGUSR2)
            return

    thread = threading.Thread(target=watch, name="slurm-time-limit", daemon=True)
    thread.start()
    return thread


def _take_over_early() -> Optional[int]:
    signum, _early.signum = _early.signum, None
    if _early.timer is not None:
        _early.timer.cancel()
        _early.timer = None
    return signum


class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        """Must run in the main thread, before DataLoader workers fork (they inherit the handler,
        which only records the signal, instead of the default action that would kill them).
        Takes over a signal record_early() recorded, and the handlers it had replaced."""
        for sig in SIGNALS:
            previous = signal.signal(sig, self._record)
            if previous is _record_early:
                previous = _early.previous.get(sig, signal.SIG_DFL)
            self._previous[sig] = previous
        early = _take_over_early()
        if early is not None and self.signum is None:
            self.signum = early
            log.warning("warning: %s received before training started: stopping at the first step boundary",
                        signal.Signals(early).name)
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal. Every rank must call it at
        the same points of the loop."""
        import torch

        from util import dist as dist_util

        local = self.signum is not None
        if not dist_util.is_dist():
            return local
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist_util.cpu_group())
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def stop(self, where: str, saved: str = "checkpoint-last.pth") -> None:
        """After checkpoint-last (`saved`: its name) is written: run the previous handler (submitit:
        requeue on rank 0, then exit), else end the run with a one-line message."""
        name = signal.Signals(self.signum).name
        log.warning("warning: %s received: stopped %s after writing %s", name, where, saved)
        previous = self._previous.get(self.signum)
        if not callable(previous) and self.signum in USER_SIGNALS:
            # Either user signal means "requeue" to a launcher that listens for the other one.
            previous = next((h for sig, h in self._previous.items() if sig in USER_SIGNALS and callable(h)), None)
        if callable(previous):
            previous(self.signum, None)
        raise Preempted(f"stopped by {name} {where}; {saved} is written: "
                        "run the same command again to resume")
