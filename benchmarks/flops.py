"""What the benchmark measures against: analytic MAE model FLOPs and the device's matmul peak (both
engine/flops.py's), and the CPU time other processes take while a CPU benchmark runs."""
import os
import platform
import resource
import time
from typing import Dict, Optional

import torch

# The model FLOPs and the matmul peak are the engine's (its progress line reports MFU with the same
# count); re-exported for benchmarks/step.py and the tests.
from engine.flops import (  # noqa: F401
    counted_forward_flops,
    mae_forward_flops_per_image,
    mae_train_flops,
    measure_matmul_peak,
    sync,
)


# --------------------------------------------------------------------------- device helpers
class CpuShare:
    """CPU time used by other processes (and stolen by the hypervisor) while a region runs.

    On CPU the benchmark's numbers are only meaningful on an otherwise idle machine; this
    reads /proc/stat (Linux) before and after and subtracts the CPU time of this process and its
    children (loader workers).
    The results are average numbers of cores; None where /proc/stat cannot be read.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))
        return (time.perf_counter(), (user + nice + system + irq + softirq) / tick, steal / tick,
                own + CpuShare._live_descendants_cpu() / tick)

    @staticmethod
    def _live_descendants_cpu() -> int:
        """CPU ticks of this process's live descendants (data loader workers count as our own)."""
        parent, ticks = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(entry)] = int(fields[1])
                ticks[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime
        mine, total = {os.getpid()}, 0
        for pid in sorted(parent):  # children have larger pids than their parents, nearly always
            if parent[pid] in mine and pid not in mine:
                mine.add(pid)
                total += ticks[pid]
        return total

    def stop(self) -> Dict[str, Optional[float]]:
        end = self._read()
        if self.start is None or end is None:
            return {"other_processes_cores": None, "steal_cores": None, "own_cores": None}
        wall = end[0] - self.start[0]
        busy, steal, own = (end[i] - self.start[i] for i in (1, 2, 3))
        return {"other_processes_cores": max(busy - own, 0.0) / wall, "steal_cores": steal / wall,
                "own_cores": own / wall}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


