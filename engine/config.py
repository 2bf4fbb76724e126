"""The run's configuration, resolved once.

argparse keeps every official flag as it is. Right after the checks (the recipe's preflight),
resolve() turns the parsed flags, plus what only the launch and the checkpoint to resume can tell
(ranks and world size, the decoder a checkpoint records, the model's default mask ratio, the lr
scaled by the effective batch, the pooling default), into a frozen RunConfig of typed sections.
Nothing writes into `args` afterwards, and each component reads its own section.

A section's fields carry the flags' names, so code written against the flags (a transform reading
`input_size`, `aa`, `reprob`) reads a section alike. `RunConfig.record` is the flat dict every
checkpoint records as 'args': the official flags with the resolved values, in the order the
official code leaves them in its Namespace, so official tools and older checkpoints keep reading
it (and a checkpoint of this version equals one of the version before, byte for byte).
"""
import argparse
import os
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

import torch

from util import config_file
from util import dist as dist_util

from .checkpoint import plain_args
from .checks import accum_iter, own_future_checkpoint
from .launch.slurm import launcher_dests

TASKS = ("pretrain", "finetune", "linprobe")


@dataclass(frozen=True)
class DataConfig:
    data_path: str
    data_format: str
    image_column: Optional[str]
    label_column: Optional[str]
    data_order: str
    shuffle_shards: int
    pipeline: str            # --data_pipeline, or the recipe's default (uint8; pil for fine-tuning)
    batch_size: int          # per process
    num_workers: int
    pin_memory: bool         # --pin_mem, on CUDA only
    input_size: int
    seed: int
    nb_classes: int          # 1 for pretraining
    dist_eval: bool


@dataclass(frozen=True)
class ModelConfig:
    model: str
    input_size: int
    # Pretraining.
    norm_pix_loss: bool = False
    mask_ratio: Optional[float] = None   # the model's default when the flag is not given
    range_mask_ratio: float = 0.0
    # The decoder flags given or recorded by the resumed checkpoint.
    decoder: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # Classification.
    nb_classes: int = 0
    global_pool: Optional[bool] = None   # resolved: pooled for fine-tuning, class token for probing
    drop_path: float = 0.0
    finetune: str = ""                   # --finetune: pretrained encoder weights


@dataclass(frozen=True)
class OptimConfig:
    lr: float                # resolved: --lr, or --blr * effective batch / 256
    blr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    start_epoch: int
    weight_decay: float
    layer_decay: float
    accum_iter: int
    effective_batch: int     # batch_size * accum_iter * world_size
    clip_grad: Optional[float]
    skip_nonfinite: bool     # on_nonfinite == "skip"
    on_nonfinite: str = "stop"  # --on_nonfinite (--skip_nonfinite: skip)
    max_rollbacks: int = 3


@dataclass(frozen=True)
class DistConfig:
    rank: int
    world_size: int
    local_rank: int
    device: str              # cuda:<local rank> or cpu
    dist_url: str
    dist_backend: Optional[str]  # nccl / gloo with several processes
    strategy: str            # --dist_strategy: ddp / fsdp
    shard_size: int          # --fsdp_shard_size
    compile: bool
    grad_ckpt: bool
    amp: Optional[str]
    deterministic: bool
    seed: int
    dist_timeout_s: float = 1800.0       # the process group's
    step_timeout_s: Optional[float] = None  # the hang watchdog's (engine/launch/watchdog.py); None: automatic, 0: off
    startup_timeout_s: float = 1200.0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str
    resume: str              # '' also when it named the run's own future checkpoint (MixMIM scripts)
    auto_resume: bool
    save_every: int
    save_every_steps: int
    keep_last: int
    async_save: bool


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str
    log_dir: str
    print_freq: int
    vis_every: int
    wandb_project: str
    wandb_run_name: str
    wandb_entity: str
    wandb_tags: str
    peak_tflops: Optional[float] = None   # --peak_tflops: MFU's peak; None: the table / measured
    profile: bool = False
    profile_steps: Tuple[int, int] = (10, 5)   # start, count
    profile_ranks: Tuple[int, ...] = (0,)


@dataclass(frozen=True)
class MonitorConfig:
    """The representation monitor (engine/monitor.py); pretraining only."""
    every: int               # --monitor_every: epochs; 0: off
    data_path: str           # --monitor_data_path, or --data_path
    train_size: int
    val_size: int


@dataclass(frozen=True)
class AugmentConfig:
    """Fine-tuning's augmentation and targets (official names)."""
    input_size: int
    color_jitter: Optional[float]
    aa: str
    reprob: float
    remode: str
    recount: int
    resplit: bool
    mixup: float
    cutmix: float
    cutmix_minmax: Optional[Tuple[float, ...]]
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    smoothing: float
    nb_classes: int


@dataclass(frozen=True)
class RunConfig:
    task: str                # pretrain / finetune / linprobe
    eval_only: bool          # --eval
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    dist: DistConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    augment: Optional[AugmentConfig]
    record: Mapping[str, object]  # the flat args dict checkpoints record (read-only)
    monitor: Optional[MonitorConfig] = None  # pretraining


def resume_flag(args) -> str:
    """--resume, or '' when it names the run's own future checkpoint: the official MixMIM scripts
    always pass it, so a first run starts fresh (automatic resume still finds checkpoint-last)."""
    if args.resume and not os.path.exists(args.resume) and own_future_checkpoint(args):
        if dist_util.launcher_rank() == 0:
            print(f"note: --resume {args.resume} does not exist yet (it is in --output_dir): starting a new run "
                  "or resuming from the output folder's own checkpoints", file=sys.stderr, flush=True)
        return ""
    return args.resume


def _launch(args, launch: dist_util.LaunchEnv) -> dict:
    """The values the official init_distributed_mode leaves in args, in its order."""
    out = {"rank": launch.rank, "world_size": launch.world_size, "gpu": launch.local_rank,
           "distributed": launch.world_size > 1}
    if torch.device(args.device).type == "cuda":
        out["device"] = f"cuda:{launch.local_rank}"
    if launch.world_size > 1:
        out["dist_url"] = launch.dist_url or args.dist_url
        out["dist_backend"] = "nccl" if torch.device(args.device).type == "cuda" else "gloo"
    return out


def resolve_dist(args, launch: dist_util.LaunchEnv) -> DistConfig:
    """The process-group part of the config: it needs no checkpoint, so the group can be joined
    (and the output folder locked, engine/launch/runlock.py) before the folder is read."""
    updates = _launch(args, launch)
    return DistConfig(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                      device=updates.get("device", args.device), dist_url=updates.get("dist_url", args.dist_url),
                      dist_backend=updates.get("dist_backend"), strategy=args.dist_strategy,
                      shard_size=args.fsdp_shard_size, compile=args.compile, grad_ckpt=args.grad_ckpt, amp=args.amp,
                      deterministic=args.deterministic, seed=args.seed, dist_timeout_s=args.dist_timeout_s,
                      step_timeout_s=args.step_timeout_s, startup_timeout_s=args.startup_timeout_s)


def resolve(args, task: str, launch: dist_util.LaunchEnv, *,
            resume: Optional[str] = None, decoder: Optional[dict] = None, decoder_arch: Optional[dict] = None,
            default_mask_ratio: Optional[float] = None, global_pool: Optional[bool] = None) -> RunConfig:
    """The frozen config of a run. `args` is read, never written.

    launch: the launcher's ranks (util.dist.launch_env). resume: --resume as resume_flag() read it.
    The model's answers come from the recipe (Recipe.model_facts), which asks the model built on
    the meta device and the checkpoint to resume: decoder (the decoder flags given or recorded by
    that checkpoint), decoder_arch (the effective decoder), default_mask_ratio, and global_pool
    (the pooling default of classification)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    flags = vars(args)
    world = launch.world_size
    resume = args.resume if resume is None else resume
    updates = {}
    if task != "pretrain":
        updates["global_pool"] = global_pool
    updates["resume"] = resume
    updates.update(_launch(args, launch))
    if task == "pretrain":
        updates.update(decoder_arch or {})
        updates["mask_ratio"] = args.mask_ratio if args.mask_ratio is not None else default_mask_ratio
    accum = accum_iter(args, world)  # --effective_batch / (batch_size x processes), or --accum_iter
    updates["accum_iter"] = accum
    effective_batch = args.batch_size * accum * world
    updates["effective_batch"] = effective_batch  # so that a rerun on other processes keeps it
    updates["lr"] = args.lr if args.lr is not None else args.blr * effective_batch / 256
    # A key the flags have keeps its place, a new one goes last, as the official code adds it to args.
    record = plain_args(argparse.Namespace(**{**flags, **updates}))
    device = updates.get("device", args.device)
    get = record.get

    data = DataConfig(
        data_path=args.data_path, data_format=args.data_format or "auto", image_column=args.image_column,
        label_column=args.label_column, data_order=args.data_order, shuffle_shards=args.shuffle_shards,
        pipeline=args.data_pipeline or ("pil" if task == "finetune" else "uint8"), batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=bool(args.pin_mem) and torch.device(device).type == "cuda",
        input_size=args.input_size, seed=args.seed, nb_classes=get("nb_classes", 1) if task != "pretrain" else 1,
        dist_eval=bool(get("dist_eval", False)))
    if task == "pretrain":
        model = ModelConfig(model=args.model, input_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                            mask_ratio=updates["mask_ratio"], range_mask_ratio=args.range_mask_ratio,
                            decoder=MappingProxyType(dict(decoder or {})))
    else:
        model = ModelConfig(model=args.model, input_size=args.input_size, nb_classes=args.nb_classes,
                            global_pool=global_pool, drop_path=get("drop_path", 0.0), finetune=args.finetune)
    on_nonfinite = args.on_nonfinite or ("skip" if args.skip_nonfinite else "stop")
    optim = OptimConfig(lr=updates["lr"], blr=args.blr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
                        epochs=args.epochs, start_epoch=args.start_epoch, weight_decay=args.weight_decay,
                        layer_decay=get("layer_decay", 1.0), accum_iter=accum,
                        effective_batch=effective_batch, clip_grad=args.clip_grad,
                        skip_nonfinite=on_nonfinite == "skip", on_nonfinite=on_nonfinite,
                        max_rollbacks=args.max_rollbacks)
    dist = resolve_dist(args, launch)
    checkpoint = CheckpointConfig(output_dir=args.output_dir, resume=resume, auto_resume=not args.no_auto_resume,
                                  save_every=args.save_every, save_every_steps=args.save_every_steps,
                                  keep_last=args.keep_last, async_save=args.async_save)
    logging_ = LoggingConfig(output_dir=args.output_dir, log_dir=args.log_dir, print_freq=args.print_freq,
                             vis_every=get("vis_every", 0), wandb_project=args.wandb_project,
                             wandb_run_name=args.wandb_run_name, wandb_entity=args.wandb_entity,
                             wandb_tags=args.wandb_tags, peak_tflops=args.peak_tflops, profile=args.profile,
                             profile_steps=tuple(args.profile_steps), profile_ranks=tuple(args.profile_ranks))
    augment = None
    if task == "finetune":
        augment = AugmentConfig(
            input_size=args.input_size, color_jitter=args.color_jitter, aa=args.aa, reprob=args.reprob,
            remode=args.remode, recount=args.recount, resplit=args.resplit, mixup=args.mixup, cutmix=args.cutmix,
            cutmix_minmax=tuple(args.cutmix_minmax) if args.cutmix_minmax is not None else None,
            mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
            smoothing=args.smoothing, nb_classes=args.nb_classes)
    monitor = None
    if task == "pretrain":
        monitor = MonitorConfig(every=args.monitor_every, data_path=args.monitor_data_path or args.data_path,
                                train_size=args.monitor_train_size, val_size=args.monitor_val_size)
    return RunConfig(task=task, eval_only=bool(get("eval", False)), data=data, model=model, optim=optim, dist=dist,
                     checkpoint=checkpoint, logging=logging_, augment=augment, record=MappingProxyType(record),
                     monitor=monitor)


# Keys of the record that describe one launch, not the run: a rerun takes them from its own launcher.
_LAUNCH_KEYS = ("rank", "world_size", "local_rank", "gpu", "distributed", "dist_url", "dist_backend", "job_name",
                "config", "print_config")
_CLI = {"pretrain": "main_pretrain.py", "finetune": "main_finetune.py", "linprobe": "main_linprobe.py"}


def resolved_flags(cfg: RunConfig, args) -> dict:
    """The run's flags with their resolved values (accum_iter, lr, mask ratio, decoder, pooling):
    what <output_dir>/config.yaml and --print_config show, and --config takes back. A SLURM
    launcher's own flags (--nodes, --job_dir, ...) are left out: the training CLI has none."""
    launcher = launcher_dests()
    out = {k: v for k, v in cfg.record.items() if k in vars(args) and k not in _LAUNCH_KEYS and k not in launcher}
    out["device"] = args.device  # the record's cuda:<local rank> is one process's
    return out


def config_text(cfg: RunConfig, args) -> str:
    """resolved_flags as the YAML of a recipe file, with a header saying where it comes from;
    a SLURM job's launcher flags follow as comments (the launcher takes them back)."""
    source = f"--config {args.config}, then " if args.config else ""
    header = [f"The resolved config of a {_CLI[cfg.task]} run on {cfg.dist.world_size} process"
              f"{'es' if cfg.dist.world_size > 1 else ''}: the defaults, {source}the command line;",
              f"accum_iter and lr resolved (effective batch {cfg.optim.effective_batch}). "
              f"Rerun it: {_CLI[cfg.task]} --config <this file>"]
    flags = resolved_flags(cfg, args)
    # Where a run writes is not part of its recipe (a rerun from this file must not write into this
    # folder), and an lr the flags did not give is the scaling rule's: pinned, it would silently
    # outlive a rerun's new --blr or --effective_batch. Both are shown, as comments.
    unpinned = [k for k in ("output_dir", "log_dir") if k in flags] + (["lr"] if args.lr is None else [])
    header[-1] += " --output_dir <a folder>"
    text = config_file.dump({k: v for k, v in flags.items() if k not in unpinned}, header)
    text += "# Resolved for this run, not pinned (a rerun resolves them from its own flags):\n"
    text += "".join(f"# {line}\n" for line in config_file.dump({k: flags[k] for k in unpinned}).splitlines())
    launcher = {k: v for k, v in vars(args).items() if k in launcher_dests() and k != "print_config"}
    if launcher:
        lines = config_file.dump(launcher).splitlines()
        text += "# The SLURM launcher's flags of this job (scripts/submitit_*.py):\n"
        text += "".join(f"# {line}\n" for line in lines)
    return text
