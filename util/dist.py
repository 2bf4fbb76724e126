"""Process-group setup for torchrun, SLURM srun, OpenMPI (ITP) or a single process."""
import datetime
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .errors import RankError, UserError

_CPU_GROUP = None


def cpu_group():
    """Process group for small CPU tensors (None: the default group, when it is gloo)."""
    return _CPU_GROUP


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launcher_rank() -> int:
    """This process's rank from the launcher's environment (before or without a process group)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as 'gpu[007-009,012],cpu3' -> 'gpu007'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_master_port(job_id: str) -> int:
    """A port that jobs sharing a node are unlikely to collide on, the same on every task."""
    return 15000 + int(job_id) % 20000


_ITP_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MASTER_ADDR",
             "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the launch, from the launcher's environment (no process group)."""
    rank: int
    world_size: int
    local_rank: int
    dist_url: Optional[str]  # from the environment (OpenMPI); None: --dist_url's


def launch_env(dist_on_itp: bool = False, port: Optional[int] = None) -> LaunchEnv:
    """torchrun, srun (one task per GPU; `port`: the master port, default from the job id),
    OpenMPI with dist_on_itp, or a single process."""
    return LaunchEnv(*_launch_env(dist_on_itp, port))


def launched_world_size(args) -> int:
    """The number of processes the launcher started (1 without one), before any process group exists."""
    return _launch_env(args.dist_on_itp, args.port)[1]


def _launch_env(dist_on_itp: bool, port: Optional[int] = None):
    """(rank, world_size, local_rank, dist_url or None) from the launcher's environment; `port` is
    the master port of an srun launch (default: derived from the job id)."""
    env = os.environ
    if dist_on_itp:
        missing = [v for v in _ITP_VARS if v not in env]
        if missing:
            raise UserError(f"--dist_on_itp takes the ranks from OpenMPI's environment, but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not set: start the processes with mpirun "
                            "(and MASTER_ADDR/MASTER_PORT exported), or drop --dist_on_itp (torchrun and srun "
                            "need no flag)")
        rank = int(env["OMPI_COMM_WORLD_RANK"])
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        local = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        url = "tcp://%s:%s" % (env["MASTER_ADDR"], env["MASTER_PORT"])
        return rank, world, local, url
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.launch
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), None
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per GPU
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]))
        env.setdefault("MASTER_PORT", str(port or slurm_master_port(env["SLURM_JOB_ID"])))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), None
    return 0, 1, 0, None


def init_distributed(launch: LaunchEnv, device: str, dist_url: str, backend: Optional[str],
                     timeout_s: float = 1800) -> None:
    """Join the process group when launched with more than one process (nccl for CUDA devices,
    gloo otherwise, so the same command runs on CPU-only machines); on CUDA use the local GPU."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    if launch.world_size < 2:
        return
    # RANK/WORLD_SIZE for any code that reads them (e.g. srun launches set only SLURM_*).
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    kwargs = dict(backend=backend, init_method=dist_url, world_size=launch.world_size, rank=launch.rank,
                  timeout=datetime.timedelta(seconds=timeout_s))
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", launch.local_rank)
    try:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None:
            # torchrun --max-restarts: its store outlives a restart and still holds the previous attempt's
            # keys (a dead worker's gloo address): the restarted group must not read them.
            store, _, _ = next(dist.rendezvous(kwargs.pop("init_method"), launch.rank, launch.world_size,
                                               timeout=kwargs["timeout"]))
            kwargs["store"] = dist.PrefixStore(f"attempt_{attempt}", store)
        dist.init_process_group(**kwargs)
    except (dist.DistError, RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError, timeouts
        where = dist_url if dist_url and dist_url != "env://" else \
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankError(f"rank {launch.rank} of {launch.world_size} cannot join the process group at {where} "
                        f"({type(e).__name__}: {reason}): check that the port is free on rank 0's host and "
                        "reachable from every rank, or choose another (MASTER_PORT / --port)") from None
    global _CPU_GROUP
    # Control messages (e.g. "stop now") travel over gloo so they never wait on the GPU stream.
    _CPU_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None
    dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x)
        x /= get_world_size()
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_across_ranks(flag: bool, device: Optional[torch.device] = None) -> bool:
    if not is_dist():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def setup_logging(rank: Optional[int] = None) -> logging.Logger:
    """Progress on stdout from rank 0 only; warnings on stderr from every rank. rank: this process's
    (default: the process group's), so that logging can start before the group exists."""
    main = (get_rank() if rank is None else rank) == 0
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    logging.basicConfig(format="%(message)s", level=logging.INFO if main else logging.WARNING,
                        handlers=[out, err], force=True)
    return logging.getLogger("mae")
