"""The hang watchdog: a thread on every rank that ends the process when training stops moving.

A rank stuck in a collective, a loader worker stuck on a network file system or a deadlocked
compile never raises: the job would sit idle until SLURM's time limit. The watchdog watches the
optimizer-step counter; when no step completes in time it writes the Python stack of every thread
of its rank to <output_dir>/hang/<time>-rank<r>.txt and exits with HANG_EXIT_CODE, so that
torchrun's restart policy (--max-restarts) or the SLURM batch script's requeue starts the run
again from its last checkpoint.

Allowances: an optimizer step gets --step_timeout_s (default max(600 s, 20x the median step time
after warm-up)); start-up up to the first step (model build, resume, compile), a checkpoint save
and an evaluation get --startup_timeout_s. The training loop pays one clock read and a few
attribute writes per step; everything else happens in the thread.
"""
import faulthandler
import logging
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Optional

log = logging.getLogger("mae")

HANG_EXIT_CODE = 124  # what timeout(1) exits with; distinct from errors (1, 2) and a preemption (75)
STEP_FLOOR_S = 600.0  # the automatic step allowance never goes below this
STEP_FACTOR = 20      # ... and is this many median steps
WARMUP_STEPS = 5      # steps left out of the median (first batches, allocator and cache warm-up)


class Watchdog:
    def __init__(self, output_dir: str, rank: int, step_timeout_s: Optional[float], startup_timeout_s: float,
                 enabled: bool = True):
        """step_timeout_s: None for the automatic allowance. enabled=False: every call is a no-op."""
        self.output_dir, self.rank, self.enabled = output_dir, rank, enabled
        self.step_timeout_s, self.startup_timeout_s = step_timeout_s, startup_timeout_s
        self.steps = 0
        self._started = self._last = time.monotonic()
        self._slow = None  # (what, since) of a save or an evaluation under way
        self._intervals = deque(maxlen=101)
        self._stop = threading.Event()
        self._thread = None
        shortest = min(step_timeout_s or STEP_FLOOR_S, startup_timeout_s)
        self.poll_s = max(0.1, min(5.0, shortest / 20))

    @classmethod
    def disabled(cls) -> "Watchdog":
        return cls("", 0, None, 1.0, enabled=False)

    def start(self) -> "Watchdog":
        if self.enabled:
            self._started = self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def step_done(self) -> None:
        """An optimizer step completed (every rank, at the same steps)."""
        now = time.monotonic()
        if self.steps >= WARMUP_STEPS:
            self._intervals.append(now - self._last)
        self._last = now
        self.steps += 1

    @contextmanager
    def slow(self, what: str):
        """A phase that may take longer than a step (a checkpoint save, an evaluation): it gets
        the start-up allowance, and the step clock restarts after it."""
        self._slow = (what, time.monotonic())
        try:
            yield
        finally:
            self._slow = None
            self._last = time.monotonic()

    def step_allowance(self) -> float:
        if self.step_timeout_s:
            return self.step_timeout_s
        if not self._intervals:
            return STEP_FLOOR_S
        return max(STEP_FLOOR_S, STEP_FACTOR * statistics.median(self._intervals))

    def _overdue(self, now: float):
        """(what, seconds waited, allowance) when the current wait is over its allowance, else None."""
        slow = self._slow
        if slow is not None:
            what, since, limit = slow[0], slow[1], self.startup_timeout_s
        elif self.steps == 0:
            what, since, limit = "start-up and the first optimizer step", self._started, self.startup_timeout_s
        else:
            what, since, limit = f"optimizer step {self.steps + 1}", self._last, self.step_allowance()
        return (what, now - since, limit) if now - since > limit else None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            overdue = self._overdue(time.monotonic())
            if overdue is not None and not self._stop.is_set():
                self._fire(*overdue)

    def _fire(self, what: str, waited: float, limit: float) -> None:
        where = self._dump(f"rank {self.rank} (pid {os.getpid()}): {what} did not complete within "
                           f"{limit:.0f} s ({waited:.0f} s)")
        # os.write, not logging: the thread that hangs may hold the logging or stderr lock.
        os.write(2, (f"error: rank {self.rank}: {what} did not complete within {limit:.0f} s (hang watchdog): "
                     f"the stacks of its threads are in {where}; exiting with code {HANG_EXIT_CODE} so that "
                     "torchrun restarts the run or the job is requeued (it resumes from the last checkpoint)\n")
                 .encode())
        for child in multiprocessing.active_children():  # loader workers: one may be the stuck one
            child.kill()
        os._exit(HANG_EXIT_CODE)

    def _dump(self, header: str) -> str:
        if self.output_dir:
            folder = os.path.join(self.output_dir, "hang")
            path = os.path.join(folder, f"{time.strftime('%Y%m%d-%H%M%S')}-rank{self.rank}.txt")
            try:
                os.makedirs(folder, exist_ok=True)
                with open(path, "w") as f:
                    f.write(header + "\n\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                return path
            except OSError:
                pass  # a full or vanished disk: stderr still has them
        os.write(2, (header + "\n").encode())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return "stderr"
