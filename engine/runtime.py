"""The start of a training process: process group, logging, seeds, backend switches and the
output folder. The flags are checked before (engine/checks.py, the recipes' preflight) and
resolved into the run's config (engine/config.py)."""
import os

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError
from util.rng import seed_everything

from .config import DistConfig
from .precision import configure_backends


def setup_runtime(dist: DistConfig, output_dir: str = "") -> torch.device:
    """Joins the process group, sets up logging, seeds (seed + rank) and the backends, creates
    output_dir (when given) on rank 0 and holds it for this run (another run there is refused);
    returns the device."""
    if dist.deterministic:
        configure_backends(torch.device("cpu"), deterministic=True)  # before the process group touches CUDA
    launch = dist_util.LaunchEnv(dist.rank, dist.world_size, dist.local_rank, dist.dist_url)
    dist_util.init_distributed(launch, dist.device, dist.dist_url, dist.dist_backend, dist.dist_timeout_s)
    dist_util.setup_logging()
    device = torch.device(dist.device)
    seed_everything(dist.seed + dist_util.get_rank())
    configure_backends(device, dist.deterministic)
    if output_dir and dist_util.is_main_process():
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:  # checked by preflight; this is a race with another process
            raise UserError(f"cannot create --output_dir {output_dir}: {os_error_text(e)}") from None
    return device
