"""The start of a training process: process group, logging, seeds and backend switches. The flags
are checked before (engine/checks.py, the recipes' preflight) and resolved into the run's config (engine/config.py)."""

import torch

from util import dist as dist_util
from util.rng import seed_everything

from .config import DistConfig
from .precision import configure_backends


def setup_runtime(dist: DistConfig) -> torch.device:
    """Joins the process group, sets up logging, seeds (seed + rank) and the backends; returns the
    device. The output folder is created by the run lock (engine/launch/runlock.py)."""
    if dist.deterministic:
        configure_backends(torch.device("cpu"), deterministic=True)  # before the process group touches CUDA
    launch = dist_util.LaunchEnv(dist.rank, dist.world_size, dist.local_rank, dist.dist_url)
    dist_util.init_distributed(launch, dist.device, dist.dist_url, dist.dist_backend, dist.dist_timeout_s)
    dist_util.setup_logging()
    device = torch.device(dist.device)
    seed_everything(dist.seed + dist_util.get_rank())
    configure_backends(device, dist.deterministic)
    return device
