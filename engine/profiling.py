"""--profile: a torch.profiler trace of a few training steps, and on CUDA a memory snapshot.

The trainer marks its phases with named ranges (RANGES) whether or not a profiler runs (a range
costs microseconds per step); StepProfiler records steps START .. START + COUNT - 1 of this process,
counted from its first step, writes the trace (<dir>/<worker>.pt.trace.json: tensorboard's
profiler plugin and https://ui.perfetto.dev open it) and stops, and training goes on.
"""
import logging
import os
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

log = logging.getLogger("mae")

RANGES = ("data_wait", "forward", "backward", "optimizer_step", "checkpoint_save")


def named_range(name: str):
    """One of RANGES around a phase of the step (torch.profiler.record_function)."""
    return record_function(name)


class StepProfiler:
    """Profiles COUNT steps from step START of this process; step() after every training step."""

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
        self.prof.start()
        self.snapshot = os.path.join(folder, f"rank{rank}-memory-snapshot.pickle") if device.type == "cuda" else None
        self._recording_memory = False
        if self.snapshot and start == 0:
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
        prof.stop()
        if self._recording_memory:
            torch.cuda.memory._dump_snapshot(self.snapshot)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False
        if self.steps >= self.end:
            log.info("Profiler: steps %d-%d traced into %s", self.end - self.count, self.end - 1, self.folder)


def make_profiler(logging_cfg, rank: int, device: torch.device) -> Optional[StepProfiler]:
    """The StepProfiler of this rank under --profile (None otherwise): <output_dir>/profile/, or
    <log_dir>/profile/ without an output folder."""
    if not logging_cfg.profile or rank not in logging_cfg.profile_ranks:
        return None
    folder = os.path.join(logging_cfg.output_dir or logging_cfg.log_dir or ".", "profile")
    start, count = logging_cfg.profile_steps
    return StepProfiler(folder, start, count, rank, device)
