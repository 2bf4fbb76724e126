"""The start of a training process: process group, logging, seeds, backend switches and the
output folder. The flags are checked before (engine/checks.py, the CLIs' preflight functions)."""
import os

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError
from util.rng import seed_everything

from .precision import configure_backends


def setup_runtime(args, make_output_dir: bool = True) -> torch.device:
    """Joins the process group (args.rank, .world_size, .gpu, .distributed are set), sets up
    logging, seeds (seed + rank) and the backends; returns the device."""
    deterministic = getattr(args, "deterministic", False)
    if deterministic:
        configure_backends(torch.device("cpu"), deterministic=True)  # before the process group touches CUDA
    dist_util.init_distributed_mode(args)
    dist_util.setup_logging()
    device = torch.device(args.device)
    seed_everything(args.seed + dist_util.get_rank())
    configure_backends(device, deterministic)
    if make_output_dir and args.output_dir and dist_util.is_main_process():
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:  # checked by preflight; this is a race with another process
            raise UserError(f"cannot create --output_dir {args.output_dir}: {os_error_text(e)}") from None
    return device
