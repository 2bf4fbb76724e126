"""Stop cleanly on SIGUSR1 / SIGTERM: finish the step, write checkpoint-last, then hand over.

SLURM signals every task of a job ahead of its time limit (submitit asks for SIGUSR2
`slurm_signal_delay_s` seconds ahead; `scancel --signal=USR1` does it by hand) and sends SIGTERM
before preempting or cancelling it. The handler only records the signal; the training
loop notices it between optimizer steps, all ranks agree on the same step (one tiny all-reduce
on a CPU group per step), checkpoint-last is written for that position, and then the handler
that was installed before ours runs: under submitit that is its requeue logic on rank 0.
"""
import logging
import signal
from typing import Dict, Optional

import torch

from util import dist as dist_util
from util.errors import TrainingStopped

log = logging.getLogger("mae")

# submitit asks SLURM for SIGUSR2; plain sbatch scripts (and people) tend to use SIGUSR1.
USER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
SIGNALS = (*USER_SIGNALS, signal.SIGTERM)


class Preempted(TrainingStopped):
    """Training stopped on a signal after writing checkpoint-last; run again to resume."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        """Must run in the main thread, before DataLoader workers fork (they inherit the handler,
        which only records the signal, instead of the default action that would kill them)."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def agreed(self) -> bool:
        """True on every rank once any rank has received a signal. Every rank must call it at
        the same points of the loop."""
        local = self.signum is not None
        if not dist_util.is_dist():
            return local
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist_util.cpu_group())
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def stop(self, where: str) -> None:
        """After checkpoint-last is written: run the previous handler (submitit: requeue on
        rank 0, then exit), else end the run with a one-line message."""
        name = signal.Signals(self.signum).name
        log.warning("warning: %s received: stopped %s after writing checkpoint-last.pth", name, where)
        previous = self._previous.get(self.signum)
        if not callable(previous) and self.signum in USER_SIGNALS:
            # Either user signal means "requeue" to a launcher that listens for the other one.
            previous = next((h for sig, h in self._previous.items() if sig in USER_SIGNALS and callable(h)), None)
        if callable(previous):
            previous(self.signum, None)
        raise Preempted(f"stopped by {name} {where}; checkpoint-last.pth is written: "
                        "run the same command again to resume")
