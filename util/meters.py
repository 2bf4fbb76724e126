"""Metric accumulation without host synchronisation, and progress timing with ETA."""
import datetime
import resource
import time
from typing import Dict

import torch

from . import dist as dist_util


class DeviceMeters:
    """Sums scalar tensors on their device; read (and all-reduce) them only when asked.

    Reading every step would block the host on the GPU; the training loop reads at print time.
    Each meter keeps a window (since the last read) and a running total (since reset).
    """

    def __init__(self):
        self._window: Dict[str, list] = {}
        self._total: Dict[str, list] = {}

    def update(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        for store in (self._window, self._total):
            acc = store.get(name)
            if acc is None:
                store[name] = [value.clone(), 1]
            else:
                acc[0] += value
                acc[1] += 1

    def _reduce(self, store) -> Dict[str, float]:
        if not store:
            return {}
        names = sorted(store)
        means = torch.stack([store[n][0] / store[n][1] for n in names])
        means = dist_util.all_reduce_mean(means).tolist()
        return dict(zip(names, means))

    def read_window(self) -> Dict[str, float]:
        """Means since the last read_window (averaged over ranks). Every rank must call it."""
        out = self._reduce(self._window)
        self._window = {}
        return out

    def read_total(self) -> Dict[str, float]:
        return self._reduce(self._total)


def max_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LoopTimer:
    """Iteration and data-wait timing for a loop of known length, with an ETA."""

    def __init__(self, total_iters: int, done_iters: int = 0):
        self.total, self.done = total_iters, done_iters
        self.start = self._last = time.perf_counter()
        self.iters = 0
        self.data_time = self.iter_time = 0.0
        self._window_start, self._window_iters, self._window_data = self.start, 0, 0.0

    def data_ready(self) -> None:
        now = time.perf_counter()
        wait = now - self._last
        self.data_time += wait
        self._window_data += wait

    def step_done(self) -> None:
        self._last = time.perf_counter()
        self.iters += 1
        self._window_iters += 1

    def window(self) -> Dict[str, float]:
        """Seconds per iteration and data-wait share since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        n = max(self._window_iters, 1)
        out = {"iter_time": elapsed / n, "data_time": self._window_data / n,
               "data_share": self._window_data / elapsed}
        self._window_start, self._window_iters, self._window_data = now, 0, 0.0
        return out

    def eta(self) -> str:
        if self.iters == 0:
            return "?"
        per_iter = (time.perf_counter() - self.start) / self.iters
        remaining = self.total - self.done - self.iters
        return str(datetime.timedelta(seconds=int(per_iter * max(remaining, 0))))
