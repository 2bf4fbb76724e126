"""Process, device and precision set-up shared by every training CLI."""
import logging
import os
import sys

import torch

import models
from models.registry import choices
from util import dist as dist_util
from util.errors import UserError
from util.rng import seed_everything

log = logging.getLogger("mae")


def resolve_amp(amp, device: torch.device):
    """--amp -> autocast dtype (None: full fp32)."""
    if amp is None:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def check_args(args) -> None:
    """Flag combinations that cannot work, reported before any work is done."""
    for name in ("batch_size", "accum_iter", "epochs", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.save_every < 1:
        raise UserError(f"--save_every must be at least 1, got {args.save_every}")
    if args.save_every_steps < 0 or args.save_every_steps % args.accum_iter:
        raise UserError(f"--save_every_steps {args.save_every_steps} must be a multiple of --accum_iter "
                        f"{args.accum_iter}: checkpoints are written between optimizer steps")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
    if args.resume and not os.path.isfile(args.resume):
        own = args.output_dir and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(args.output_dir)
        if not own:
            raise UserError(f"--resume {args.resume} does not exist: give the path of a checkpoint file")
        # The official MixMIM scripts always pass their run's own future checkpoint: a first run
        # starts fresh (automatic resume from --output_dir still finds checkpoint-last.pth).
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            print(f"note: --resume {args.resume} does not exist yet (it is in --output_dir): starting a new run "
                  "or resuming from the output folder's own checkpoints", file=sys.stderr, flush=True)
        args.resume = ""


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (fp32 training at tensor-core speed)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def setup_runtime(args) -> torch.device:
    """Process group, logging, seeds and backend switches; returns the device."""
    check_args(args)
    dist_util.init_distributed_mode(args)
    dist_util.setup_logging()
    device = torch.device(args.device)
    seed_everything(args.seed + dist_util.get_rank())
    configure_backends(device)
    if args.output_dir and dist_util.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    return device


def resolve_lr(args) -> None:
    """args.lr = blr * effective batch / 256 unless --lr was given (the official scaling rule)."""
    eff_batch_size = args.batch_size * args.accum_iter * dist_util.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    log.info("base lr: %.2e", args.lr * 256 / eff_batch_size)
    log.info("actual lr: %.2e", args.lr)
    log.info("accumulate grad iterations: %d", args.accum_iter)
    log.info("effective batch size: %d", eff_batch_size)


def make_log_writer(args):
    """Tensorboard writer on rank 0 when --log_dir is set."""
    if not args.log_dir or not dist_util.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir)


def wrap_for_training(model, args, device: torch.device):
    """torch.compile (optional), then DDP when there are several processes.

    Every parameter takes part in every step, so DDP runs without find_unused_parameters.
    """
    if getattr(args, "grad_ckpt", False):
        model.set_grad_checkpointing(True)
    if args.compile:
        model = torch.compile(model)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


_TASKS = {"pretrain": "a pretraining model", "classify": "a classifier"}


def build_model(name: str, task: str, **kwargs):
    """models.create_model(name, task, **kwargs) with one-line errors for an unknown name or a
    model of the other task (e.g. a classifier name given to pretraining), listing the choices."""
    what = _TASKS[task]
    if models.model_task(name) and task not in models.model_task(name):
        raise UserError(f"--model {name} is not {what}; choose one of: {choices(task)}")
    try:
        return models.create_model(name, task, **kwargs)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
