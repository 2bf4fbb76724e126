"""One recipe runner: the build order of every training run, written once.

A recipe (engine/pretrain.py, engine/finetune.py, engine/linprobe.py) says only what differs
between them: its checks, the model, the loaders, the optimizer, the loss, what runs after each
epoch and how the model is put in training mode. run() owns the order, the same for every recipe
and strategy (the way torchtitan's trainer owns it):

    checks (preflight) -> process group, seeds -> lock the output folder (engine/launch/runlock.py)
    -> the checkpoint to resume -> resolve the config (engine/config.py) -> <output_dir>/config.yaml
    -> strategy -> model (built sharded under FSDP) -> loaders
    -> optimizer, scaler -> resume -> (finished? stop) -> wrap -> checkpointer, log writer -> fit

The order matters for exact resume: the weights are initialised from the seeded global RNG before
the resumed checkpoint restores the RNG states, and nothing draws from it in between.
"""
import contextlib
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Tuple

import torch

from util import dist as dist_util
from util import test_hooks
from util.checkpoint_io import atomic_write_text
from util.errors import TrainingStopped, UserError

from .checkpoint import Position, already_finished, find_resume_checkpoint, fit_to_data, make_checkpointer, resume
from .checks import accum_iter, check_args, check_launch
from .config import RunConfig, config_text, resolve, resolve_dist, resume_flag
from .data import LoaderSettings
from .distributed import make_strategy
from .flops import peak_flops
from .launch import runlock
from .launch.preemption import StopRequest
from .launch.watchdog import Watchdog
from .precision import resolve_amp
from .profiling import make_profiler
from .protocols import LogWriter, Strategy
from .reporting.logs import make_log_writer
from .rollback import STATE_KEY, Rollback
from .runtime import setup_runtime
from .trainer import TrainingRun, fit

log = logging.getLogger("mae")

# after_epoch(epoch) -> (log.txt fields, is_best, extra checkpoint state); see trainer.fit.
AfterEpoch = Callable[[int], Tuple[dict, bool, Optional[dict]]]


@dataclass
class Built:
    """What a recipe's hooks get once the run is built."""
    cfg: RunConfig
    plan: object                       # the recipe's preflight result (its data sources)
    strategy: Strategy
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    model: torch.nn.Module             # the training model, as strategy.wrap() returned it
    val_loader: Optional[object]
    log_writer: Optional[LogWriter]
    resumed: dict                      # the resumed checkpoint's plain entries (no tensors); {} for a new run
    checkpoint_state: dict             # plain entries every later checkpoint carries (the checkpointer's extra_state)


class Recipe(Protocol):
    task: str                          # engine/config.py TASKS

    def preflight(self, args, world_size: int, on_this_machine: bool = True) -> object:
        """Every check that needs neither a GPU nor a process group; returns the plan (data sources)."""

    def model_facts(self, args, plan, resumed: Optional[dict]) -> dict:
        """What resolve() needs to know of the model (engine/config.py resolve's keyword arguments)."""

    def build_model(self, cfg: RunConfig, strategy: Strategy) -> torch.nn.Module:
        """The model, on the strategy's device or to be moved there, weights initialised or loaded."""

    def loaders(self, cfg: RunConfig, plan, model: torch.nn.Module) -> Tuple[Optional[object], Optional[object]]:
        """(training loader, evaluation loader); either may be None."""

    def optimizer(self, cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer: ...

    def compute_loss(self, cfg: RunConfig, device: torch.device) -> Callable:
        """(model, batch) -> scalar loss, run under autocast."""

    def train_mode(self, model: torch.nn.Module) -> Optional[Callable[[], None]]:
        """What puts the model in training mode at each epoch's start; None: model.train()."""

    def after_epoch(self, built: Built) -> Optional[AfterEpoch]: ...

    def train_flops_per_image(self, cfg: RunConfig, plan) -> Optional[int]:
        """Model FLOPs of one image's training step (engine/flops.py), for TFLOP/s and MFU in the
        progress line; None: not counted."""

    def evaluate_only(self, cfg: RunConfig, strategy: Strategy, model: torch.nn.Module, val_loader,
                      device: torch.device, amp_dtype) -> None:
        """--eval: evaluate --resume's weights (classification recipes)."""


def _plain_entries(ckpt: Optional[dict]) -> dict:
    return {k: v for k, v in (ckpt or {}).items() if k not in ("model", "optimizer")}


def run(recipe: Recipe, args) -> None:
    """Train (or, with --eval, evaluate) as `args` asks. args is read, never written."""
    if args.print_config:
        print_config(recipe, args)
        return
    eval_only = recipe.task != "pretrain" and args.eval  # --eval is a classification flag
    with contextlib.ExitStack() as closing:  # the run lock and the watchdog, released however the run ends
        _run(recipe, args, eval_only, closing)


def _run(recipe: Recipe, args, eval_only: bool, closing: contextlib.ExitStack) -> None:
    plan = recipe.preflight(args, dist_util.launched_world_size(args))
    launch = dist_util.launch_env(args.dist_on_itp, args.port)
    dist_util.setup_logging(launch.rank)
    dist_cfg = resolve_dist(args, launch)
    watchdog = Watchdog.disabled()
    if not eval_only and dist_cfg.step_timeout_s != 0:
        # From here: a hang in the process group's set-up, a resume or a compile is caught too.
        watchdog = Watchdog(args.output_dir, dist_cfg.rank, dist_cfg.step_timeout_s,
                            dist_cfg.startup_timeout_s).start()
        closing.callback(watchdog.stop)
    device = setup_runtime(dist_cfg)
    if args.output_dir and not eval_only:
        # After the checks (a bad flag creates no folder) and the join (every rank must hear that the
        # folder is taken), before the run reads or writes anything in it.
        closing.callback(runlock.acquire_for_job(args.output_dir).release)
    resume_path = args.resume if eval_only else resume_flag(args)
    unreadable: List[str] = []
    found = None
    if not eval_only:
        found = find_resume_checkpoint(resume_path, args.output_dir, not args.no_auto_resume,
                                       args.dist_strategy == "fsdp", unreadable)
    cfg = resolve(args, recipe.task, launch, resume=resume_path, **recipe.model_facts(args, plan, found))
    if cfg.checkpoint.output_dir and not eval_only and dist_util.is_main_process():
        atomic_write_text(os.path.join(cfg.checkpoint.output_dir, "config.yaml"), config_text(cfg, args))
    if recipe.task == "pretrain":
        log.info("job dir: %s", os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
        log.info("%s", json.dumps(dict(cfg.record), indent=1))
    strategy = make_strategy(cfg.dist, device)
    model = recipe.build_model(cfg, strategy)
    loader, val_loader = recipe.loaders(cfg, plan, model)
    model.to(device)  # already there under FSDP (built sharded on the device)
    log.info("Model = %s", model)
    amp_dtype = resolve_amp(cfg.dist.amp, device)
    if eval_only:
        recipe.evaluate_only(cfg, strategy, model, val_loader, device, amp_dtype)
        dist_util.cleanup()
        return

    _log_lr(cfg)
    optimizer = recipe.optimizer(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    fused = " (fused)" if optimizer.defaults.get("fused") else ""
    log.info("Optimizer: %s%s, autocast: %s, strategy: %s", type(optimizer).__name__, fused,
             amp_dtype or "off (fp32)", strategy.name)
    pos = resume(found, model, optimizer, scaler, strategy, start_epoch=cfg.optim.start_epoch,
                 model_name=cfg.model.model, explicit=bool(cfg.checkpoint.resume))
    pos = fit_to_data(pos, len(loader.dataset))
    if already_finished(pos, cfg.optim.epochs, found):
        dist_util.cleanup()
        return
    resumed = _plain_entries(found)
    del found  # its tensors (optimizer state too) must not stay in memory for the whole run

    train_model = strategy.wrap(model)
    checkpointer = make_checkpointer(strategy, cfg.checkpoint.output_dir, train_model, optimizer, scaler,
                                     dict(cfg.record), cfg.checkpoint.keep_last, unreadable,
                                     async_save=cfg.checkpoint.async_save)
    log_writer = make_log_writer(cfg.logging, cfg.record, resumed)  # continues the resumed run's W&B run
    if log_writer is not None:
        checkpointer.extra_state.update(log_writer.checkpoint_state())
    flops_per_iter, peak = _flops(recipe, cfg, plan, device, amp_dtype)
    if STATE_KEY in resumed:  # the samples an earlier rollback skipped stay listed, whatever this run's policy
        checkpointer.extra_state[STATE_KEY] = resumed[STATE_KEY]
    rollback = None
    if cfg.optim.on_nonfinite == "rollback":
        rollback = _rollback(cfg, strategy, model, optimizer, scaler, checkpointer, loader, pos,
                             resumed.get("_path"))
    built = Built(cfg, plan, strategy, device, amp_dtype, train_model, val_loader, log_writer, resumed,
                  checkpointer.extra_state)
    compute_loss = recipe.compute_loss(cfg, device)
    if test_hooks.ACTIVE:
        compute_loss = test_hooks.wrap_loss(compute_loss, cfg.dist.rank)
    training = TrainingRun.from_config(cfg, model=train_model, strategy=strategy,
                                       compute_loss=compute_loss, optimizer=optimizer, watchdog=watchdog,
                                       scaler=scaler, device=device, amp_dtype=amp_dtype, loader=loader,
                                       checkpointer=checkpointer, log_writer=log_writer,
                                       train_mode=recipe.train_mode(model), stop=StopRequest().install(),
                                       flops_per_iter=flops_per_iter, peak_flops=peak,
                                       profiler=make_profiler(cfg.logging, cfg.dist.rank, device),
                                       rollback=rollback)
    fit(training, pos, after_epoch=recipe.after_epoch(built))
    dist_util.cleanup()


def print_config(recipe: Recipe, args, world_size: Optional[int] = None) -> None:
    """--print_config: the config a launch of `world_size` processes (default: this launch)
    resolves to, as YAML on stdout (rank 0). No data, checkpoint or device is touched, so the
    decoder a checkpoint to resume records is not read: the flags' decoder is shown."""
    check_args(args)
    launch = dist_util.launch_env(args.dist_on_itp, args.port)
    if world_size is not None:
        launch = dataclasses.replace(launch, rank=0, world_size=world_size, local_rank=0)
    accum_iter(args, launch.world_size)  # no config without it: a bad --effective_batch is the error
    try:  # a recipe for 64 GPUs is still shown on a laptop, with what this launch would refuse
        check_launch(args, launch.world_size, on_this_machine=False)
    except UserError as e:
        if launch.rank == 0:
            print(f"warning: a launch of {launch.world_size} process{'es' if launch.world_size > 1 else ''} would "
                  f"be refused: {e}", file=sys.stderr, flush=True)
    cfg = resolve(args, recipe.task, launch, resume=args.resume, **recipe.model_facts(args, None, None))
    if launch.rank == 0:
        print(config_text(cfg, args), end="", flush=True)


def _rollback(cfg: RunConfig, strategy: Strategy, model, optimizer, scaler, checkpointer, loader,
              pos: Position, resumed_path: Optional[str]) -> Rollback:
    """--on_nonfinite rollback: what reloads the run's newest checkpoint in-process. The run first
    writes one of its starting point, the state a first rollback returns to, unless it resumed from
    the folder's own checkpoint: the folder's last may be another run's (--no_auto_resume, or
    --resume from elsewhere) or missing. resumed_path: the checkpoint the run resumed from."""
    output_dir = cfg.checkpoint.output_dir
    own = resumed_path is not None and os.path.realpath(os.path.dirname(resumed_path)) == os.path.realpath(output_dir)
    if not own:
        done = pos.samples_in_epoch // loader.global_batch
        checkpointer.save(pos.epoch, done, loader.iters_per_epoch, pos.samples_in_epoch)

    def reload() -> Position:
        checkpointer.close()
        found = find_resume_checkpoint("", output_dir, True, strategy.sharded)
        if found is None:
            raise TrainingStopped(f"--on_nonfinite rollback: no readable checkpoint of this run is left in "
                                  f"{output_dir} to roll back to")
        return resume(found, model, optimizer, scaler, strategy, start_epoch=cfg.optim.start_epoch,
                      model_name=cfg.model.model, explicit=False)

    return Rollback(reload, cfg.optim.max_rollbacks, checkpointer.extra_state, loader.sample_ids)


def loader_settings(cfg: RunConfig, order: str) -> LoaderSettings:
    """How the run's loaders feed this process; order: the training order (data.train_order)."""
    d = cfg.data
    return LoaderSettings(d.batch_size, d.seed, d.num_workers, d.pin_memory, cfg.dist.world_size, cfg.dist.rank,
                          order, d.shuffle_shards)


def _flops(recipe: Recipe, cfg: RunConfig, plan, device: torch.device, amp_dtype) -> Tuple[Optional[float], Optional[float]]:
    """(model FLOPs of one iteration on one device, the device's peak FLOP/s) for the progress line."""
    per_image = recipe.train_flops_per_image(cfg, plan)
    if not per_image:
        return None, None
    peak, source = peak_flops(device, amp_dtype, cfg.logging.peak_tflops)
    log.info("Model FLOPs: %.4g GFLOP per image per training step; peak: %s TFLOP/s per device (%s)",
             per_image / 1e9, f"{peak / 1e12:.4g}" if peak else "unknown", source)
    return float(per_image * cfg.data.batch_size), peak


def _log_lr(cfg: RunConfig) -> None:
    """The official lr lines (the scaling itself is resolved in engine/config.py)."""
    o = cfg.optim
    log.info("base lr: %.2e", o.lr * 256 / o.effective_batch)
    log.info("actual lr: %.2e", o.lr)
    log.info("accumulate grad iterations: %d", o.accum_iter)
    log.info("effective batch size: %d", o.effective_batch)
