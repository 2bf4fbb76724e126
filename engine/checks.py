"""Checks of a training command that need neither a GPU nor a process group (flag values, the
launch, --resume, output folders), used by the CLIs' preflight functions so that bad input fails
in one line before any training work, also on a SLURM submitting machine."""
import os
import sys
import tempfile

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError

from .checkpoint import is_sharded, problem
from .checkpoint.foreign import check_weights_source
from .reporting.wandb_log import wandb_available


def warn(message: str) -> None:
    """A preflight warning, printed once (by rank 0) before logging is set up."""
    if dist_util.launcher_rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def check_args(args) -> None:
    """Flag values and combinations that cannot work, whatever the machine (no file or device access)."""
    check_wandb_args(args)
    for name in ("batch_size", "accum_iter", "epochs", "print_freq", "save_every", "shuffle_shards"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.input_size < 1:
        raise UserError(f"--input_size must be a positive image size in pixels (a multiple of the model's "
                        f"patch size, e.g. 224), got {args.input_size}")
    # `not x >= 0` also refuses nan.
    for name in ("blr", "min_lr", "weight_decay", "warmup_epochs", "start_epoch"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.lr is not None and not args.lr >= 0:
        raise UserError(f"--lr must be 0 or more, got {args.lr} (leave it out to scale --blr by the batch)")
    if args.step_timeout_s is not None and not args.step_timeout_s >= 0:
        raise UserError(f"--step_timeout_s must be 0 (no watchdog) or more seconds, got {args.step_timeout_s}")
    for name in ("startup_timeout_s", "dist_timeout_s"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} must be a positive number of seconds, got {getattr(args, name)}")
    if args.skip_nonfinite and args.on_nonfinite not in (None, "skip"):
        raise UserError(f"--skip_nonfinite is --on_nonfinite skip, but --on_nonfinite {args.on_nonfinite} was given: "
                        "keep one of the two")
    if args.on_nonfinite == "rollback" and not args.output_dir:
        raise UserError("--on_nonfinite rollback reloads the last checkpoint, but there is no --output_dir to keep "
                        "checkpoints in: give --output_dir, or use --on_nonfinite skip")
    if args.max_rollbacks < 0:
        raise UserError(f"--max_rollbacks must be 0 or more, got {args.max_rollbacks}")
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise UserError(f"--clip_grad must be a positive gradient norm, got {args.clip_grad} (leave it out for "
                        "no clipping)")
    for name, meaning in (("keep_last", "0 keeps every checkpoint-<epoch>.pth"),
                          ("num_workers", "0 loads in the training process")):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more ({meaning}), got {getattr(args, name)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak_tflops must be a positive TFLOP/s, got {args.peak_tflops} (leave it out for the "
                        "table or the measured peak)")
    start, count = args.profile_steps
    if start < 0 or count < 1:
        raise UserError(f"--profile_steps START COUNT: START must be 0 or more and COUNT at least 1, got {start} {count}")
    if args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}, so there is nothing "
                        "to train: raise --epochs (it counts all epochs, those before --start_epoch included)")


def check_launch(args, world_size: int, on_this_machine: bool = True) -> None:
    """Device, launcher and precision flags. on_this_machine=False (a SLURM launcher on a submitting
    machine) skips what only the job's nodes can answer: CUDA, and the launcher's environment."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device} is not a device: use cuda or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device}: this engine trains on cuda or cpu")
    if on_this_machine and device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
    if args.dist_on_itp:
        if not on_this_machine:
            raise UserError("--dist_on_itp takes the ranks from OpenMPI's environment, but this job's tasks "
                            "get them from SLURM: drop --dist_on_itp")
        dist_util.launched_world_size(args)  # one line naming the missing OpenMPI variables
    if args.world_size != 1 and args.world_size != world_size:
        warn(f"--world_size {args.world_size} is ignored: the number of processes is the launcher's, and "
             f"this run has {world_size}; start {args.world_size} with torchrun --nproc_per_node "
             f"{args.world_size} (or srun), or drop the flag")
    check_strategy(args, world_size)
    accum = accum_iter(args, world_size)
    if args.save_every_steps < 0 or args.save_every_steps % accum:
        raise UserError(f"--save_every_steps {args.save_every_steps} must be a multiple of --accum_iter "
                        f"{accum}: checkpoints are written between optimizer steps")
    wrong = [r for r in args.profile_ranks if not 0 <= r < world_size]
    if args.profile and wrong:
        raise UserError(f"--profile_ranks {' '.join(map(str, wrong))}: this launch has ranks 0 to {world_size - 1}")
    if args.amp == "fp16" and device.type == "cpu":
        warn("--amp fp16 on CPU: fp16 autocast on CPUs is slow and unusual (and needs a gradient scaler); use "
             "--amp bf16 or leave --amp out (fp32 on CPU)")


def accum_iter(args, world_size: int) -> int:
    """--accum_iter, or the one --effective_batch asks of `world_size` processes."""
    n = args.effective_batch
    if n is None:
        return args.accum_iter
    per_step = args.batch_size * world_size
    if n >= 1 and n % per_step == 0:
        return n // per_step
    procs = f"{world_size} process{'es' if world_size > 1 else ''}"
    per_process = f" ({n} / {procs})" if world_size > 1 else ""
    fix = (f"a --batch_size that divides {n // world_size}{per_process}" if n >= 1 and n % world_size == 0
           else f"a number of processes that divides {n}")
    raise UserError(f"--effective_batch {n} is not a multiple of --batch_size {args.batch_size} x {procs} = "
                    f"{per_step}: choose {fix}, or another --effective_batch")


def check_wandb_args(args) -> None:
    """--wandb_*: the other flags need --wandb_project, and the wandb package must be installed."""
    if not args.wandb_project:
        given = [f"--{k}" for k in ("wandb_run_name", "wandb_entity", "wandb_tags") if getattr(args, k)]
        if given:
            raise UserError(f"{', '.join(given)} without --wandb_project: W&B logging is off; add --wandb_project "
                            "NAME or drop the flag")
        return
    if not wandb_available():
        raise UserError(f"--wandb_project {args.wandb_project}: the wandb package is not installed: pip install "
                        "wandb (or drop --wandb_project)")


def check_strategy(args, world_size: int) -> None:
    """--dist_strategy and the flags that go with it."""
    strategy, shard_size, async_save = args.dist_strategy, args.fsdp_shard_size, args.async_save
    if strategy != "fsdp":
        for flag, given in (("--fsdp_shard_size", shard_size), ("--async_save", async_save)):
            if given:
                raise UserError(f"{flag} is an option of --dist_strategy fsdp (sharded checkpoints): add "
                                "--dist_strategy fsdp, or drop the flag")
        return
    if shard_size < 0 or (shard_size and world_size % shard_size):
        raise UserError(f"--fsdp_shard_size {shard_size} does not divide the {world_size} processes of this "
                        f"launch: give a divisor of {world_size} (e.g. the GPUs of one node), or 0 to shard over "
                        "all of them")
    if args.amp == "fp16":
        # fp16 needs a gradient scaler whose inf check is agreed by all ranks (each sees only its
        # own gradient shards): torch's ShardedGradScaler, whose found_inf (shape [1]) the fused
        # AdamW step rejects in torch 2.14; bf16 needs no scaler.
        raise UserError("--amp fp16 with --dist_strategy fsdp is not supported (the sharded gradient scaler does "
                        "not fit the fused AdamW step): use --amp bf16, or --dist_strategy ddp for fp16")
    if getattr(args, "dist_eval", False):  # a classification flag: pretraining has none
        raise UserError("--dist_eval with --dist_strategy fsdp: the evaluation shards may differ by a batch, and "
                        "a sharded model needs every process in every forward pass; drop --dist_eval (each "
                        "process then evaluates the whole val set)")


def check_resume_file(args) -> None:
    """--resume names a checkpoint file (or, the official MixMIM convention, its own run's future
    checkpoint in --output_dir: see engine/config.py resume_flag)."""
    if not args.resume:
        return
    if not os.path.exists(args.resume) and own_future_checkpoint(args):
        return
    if not os.path.exists(args.resume):
        raise UserError(f"--resume {args.resume} does not exist: give the path of a checkpoint file")
    check_checkpoint_path(args.resume, "--resume")


def check_checkpoint_path(path: str, flag: str) -> None:
    """A checkpoint file, a complete sharded checkpoint directory (engine/checkpoint/dcp.py), or the
    weights of transformers, timm or safetensors (engine/checkpoint/foreign.py)."""
    if is_sharded(path):
        why = problem(path)
        if why:
            raise UserError(f"{flag} {path} {why}: give another checkpoint")
        return
    check_weights_source(path, flag)


def own_future_checkpoint(args) -> bool:
    """--resume names a file in --output_dir (whether or not it exists yet)."""
    return bool(args.output_dir) and \
        os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(args.output_dir)


def check_output_dirs(args, room: int = 0) -> None:
    """--output_dir and --log_dir can be created and written, before any training work, and the
    output folder has `room` bytes free (one more checkpoint: see checkpoint_bytes)."""
    check_writable_dir(args.output_dir, "--output_dir", room)
    if args.log_dir and os.path.abspath(args.log_dir) != os.path.abspath(args.output_dir or "."):
        check_writable_dir(args.log_dir, "--log_dir")


def check_writable_dir(path: str, flag: str, needed_bytes: int = 0) -> None:
    """`path` is a writable folder or can be made one (nothing is created); needed_bytes must fit."""
    if not path:
        return
    target = os.path.abspath(path)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UserError(f"{flag} {path} is an existing file, not a folder: give a folder path (or move the file)")
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path} cannot be created: {existing} is a file, not a folder; give a path that "
                        "is not under a file")
    if existing == target:
        try:  # a real write: os.access does not see every read-only mount or network-file-system rule
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"{flag} {path} is not writable ({os_error_text(e)}): make it writable or give "
                            "another folder") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else \
            "is not writable (no permission)"
        raise UserError(f"{flag} {path} cannot be created: {existing} {why}; give another folder")
    if needed_bytes:
        st = os.statvfs(existing)
        free = st.f_bavail * st.f_frsize
        if free < needed_bytes:
            raise UserError(f"{flag} {path} has {_mb(free)} free, but a checkpoint of this model takes about "
                            f"{_mb(needed_bytes)}: free space on that disk or give another {flag}")


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB" if n < 2 ** 30 else f"{n / 2 ** 30:.1f} GB"


def checkpoint_bytes(model, optimizer_slots: int = 2, trainable=None) -> int:
    """A lower bound of a checkpoint's size: fp32 weights plus `optimizer_slots` fp32 tensors per
    trainable parameter (AdamW: 2, LARS: 1). Works on meta-device models."""
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    trained = sum(p.numel() for p in (trainable if trainable is not None else model.parameters()))
    return 4 * (params + optimizer_slots * trained)
