"""--profile: a torch.profiler trace of a few training steps, and on CUDA a memory snapshot.

The trainer marks its phases with named ranges (RANGES) whether or not a profiler runs (a range
costs microseconds per step; the representation monitor runs under "monitor"); StepProfiler records
steps START .. START + COUNT - 1 of this process, counted from its first training step (start():
what runs before training, such as the monitor's measurement of the initial weights, is not in
the schedule), writes the trace (<dir>/<worker>.pt.trace.json: tensorboard's profiler plugin and
https://ui.perfetto.dev open it) and stops, and training goes on. stop() also ends a run that
stops early (preemption, a non-finite loss): what was traced is written and CUDA memory history
recording ends.
"""
import logging
import os
from contextlib import contextmanager
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

log = logging.getLogger("mae")

RANGES = ("data_wait", "forward", "backward", "optimizer_step", "checkpoint_save", "monitor")


def named_range(name: str):
    """One of RANGES around a phase of the step (torch.profiler.record_function)."""
    return record_function(name)


class StepProfiler:
    """Profiles COUNT steps from step START of this process: start() before the first training
    step, step() after every training step, stop() however training ends."""

    def __init__(self, folder: str, start: int, count: int, rank: int, device: torch.device):
        self.folder, self.count, self.device = folder, count, device
        self.steps, self.end = 0, start + count
        os.makedirs(folder, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # One warm-up step before the recorded ones when there is one (the profiler's own start-up
        # costs land there, not in the trace).
        warmup = 1 if start > 0 else 0
        self.active_from = start
        self.prof = profile(activities=activities,
                            schedule=schedule(wait=start - warmup, warmup=warmup, active=count, repeat=1),
                            on_trace_ready=tensorboard_trace_handler(folder, worker_name=f"rank{rank}"),
                            record_shapes=False, with_stack=False)
        self.started = False
        self.snapshot = os.path.join(folder, f"rank{rank}-memory-snapshot.pickle") if device.type == "cuda" else None
        self._recording_memory = False

    def start(self) -> None:
        """The schedule's step 0 begins here (the trainer calls it before its first step); once."""
        if self.started or self.prof is None:
            return
        self.started = True
        self.prof.start()
        if self.snapshot and self.active_from == 0:
            self._record_memory()

    def _record_memory(self) -> None:
        # The allocations of the profiled steps (open with https://pytorch.org/memory_viz).
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._recording_memory = True

    @property
    def done(self) -> bool:
        return self.prof is None

    def step(self) -> None:
        if self.prof is None:
            return
        self.start()  # (a no-op once started)
        self.steps += 1
        if self.snapshot and self.steps == self.active_from:
            self._record_memory()
        self.prof.step()
        if self.steps >= self.end:
            self.stop()

    def stop(self) -> None:
        """Writes what was recorded (nothing if the run ended before START) and ends profiling."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        if not self.started:
            return  # training never began: nothing was recorded
        try:
            prof.stop()
        finally:
            if self._recording_memory:
                self._recording_memory = False
                try:
                    torch.cuda.memory._dump_snapshot(self.snapshot)
                finally:
                    torch.cuda.memory._record_memory_history(enabled=None)
        if self.steps >= self.end:
            log.info("Profiler: steps %d-%d traced into %s", self.end - self.count, self.end - 1, self.folder)
        elif self.steps >= self.active_from:
            log.info("Profiler: training ended after %d steps; the steps from %d traced into %s", self.steps,
                     self.active_from, self.folder)


@contextmanager
def profiling(profiler: Optional[StepProfiler]):
    """The training loop under the profiler: started at the first training step (what ran before,
    such as the monitor's first measurement, is not in its schedule), stopped however the loop
    ends. A run shorter than --profile_steps writes what it traced; when training stops early
    (preemption, TrainingStopped) the trace is still written and CUDA memory history recording
    ends, and a failure to write it is a warning: the error that ended training is the one raised."""
    if profiler is None:
        yield
        return
    profiler.start()
    try:
        yield
    except BaseException:
        try:
            profiler.stop()
        except Exception as e:  # noqa: BLE001 -- the training error matters more
            log.warning("warning: the profiler trace was not written: %s", e)
        raise
    profiler.stop()


def make_profiler(logging_cfg, rank: int, device: torch.device) -> Optional[StepProfiler]:
    """The StepProfiler of this rank under --profile (None otherwise): <output_dir>/profile/, or
    <log_dir>/profile/ without an output folder."""
    if not logging_cfg.profile or rank not in logging_cfg.profile_ranks:
        return None
    folder = os.path.join(logging_cfg.output_dir or logging_cfg.log_dir or ".", "profile")
    start, count = logging_cfg.profile_steps
    return StepProfiler(folder, start, count, rank, device)
