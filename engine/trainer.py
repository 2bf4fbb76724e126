"""One training epoch, shared by pretraining and fine-tuning.

The loop never reads a device value per iteration: losses, grad norms and the non-finite
check accumulate on the device and are read at print time, before a checkpoint, and at the
end of the epoch. That keeps the GPU queue full without the official loop's per-step
loss.item() and cuda.synchronize().
"""
import datetime
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import TrainingStopped, UserError
from util.meters import DeviceMeters, LoopTimer, max_memory_mb

from .data import iters_per_epoch
from .lr_sched import adjust_learning_rate
from .preemption import StopRequest

log = logging.getLogger("mae")


@dataclass
class EpochContext:
    device: torch.device
    epoch: int
    epoch_iters: int                  # iterations of a full epoch (the schedule's unit)
    start_iter: int = 0               # first iteration to run (mid-epoch resume)
    amp_dtype: Optional[torch.dtype] = None
    log_writer: Optional[object] = None
    # Mid-epoch checkpoint: save_checkpoint(iterations_done) every save_every_steps iterations.
    save_checkpoint: Optional[Callable[[int], None]] = None
    save_every_steps: int = 0
    # Puts the model in training mode (linear probing keeps the frozen encoder in eval mode).
    train_mode: Optional[Callable[[], None]] = None
    stop: Optional[StopRequest] = None


def grad_total_norm(parameters, clip_grad: Optional[float]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if clip_grad is not None:
        return torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


class NonFiniteWatch:
    """Remembers, on the device, the first iteration whose loss was not finite.

    With skip=True the optimizer step of a window with a non-finite loss is skipped instead
    (that needs one host read per step), and check() never stops training.
    """

    def __init__(self, device, skip: bool = False):
        self.skip = skip
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.window_bad = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss: torch.Tensor, it: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, it), self.first_bad)
        self.window_bad = self.window_bad | bad

    def check(self, epoch: int) -> None:
        """Raise if any loss so far was not finite (reads the device; call before saving)."""
        if self.skip:
            return
        first = int(dist_util.all_reduce_max(self.first_bad).item())
        if first >= 0:
            raise TrainingStopped(
                f"loss is not finite at epoch {epoch}, iteration {first}: training stopped; the last "
                "checkpoint is intact (lower --lr/--blr, use --amp bf16 or none, or pass --skip_nonfinite)")


def train_one_epoch(model, compute_loss: Callable, data_loader, optimizer, scaler, args,
                    ctx: EpochContext) -> Dict[str, float]:
    """compute_loss(model, batch) -> scalar loss tensor, called under autocast."""
    if ctx.train_mode is not None:
        ctx.train_mode()
    else:
        model.train(True)
    device, epoch, accum = ctx.device, ctx.epoch, args.accum_iter
    params = [p for g in optimizer.param_groups for p in g["params"]]
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    meters, watch = DeviceMeters(), NonFiniteWatch(device, skip=args.skip_nonfinite)
    autocast = (torch.autocast(device.type, dtype=ctx.amp_dtype) if ctx.amp_dtype is not None
                else nullcontext())
    timer = LoopTimer(ctx.epoch_iters, ctx.start_iter)
    global_batch = data_loader.batch_size * dist_util.get_world_size()
    width = len(str(ctx.epoch_iters))
    lr = optimizer.param_groups[0]["lr"]
    lr_sum, skipped = 0.0, 0

    optimizer.zero_grad(set_to_none=True)
    for it, batch in enumerate(data_loader, start=ctx.start_iter):
        timer.data_ready()
        if it % accum == 0:  # per-iteration schedule, updated at the start of each accumulation window
            lr = adjust_learning_rate(optimizer, it / ctx.epoch_iters + epoch, args)
        step_now = (it + 1) % accum == 0
        with model.no_sync() if distributed and not step_now else nullcontext():
            with autocast:
                loss = compute_loss(model, batch)
            scaler.scale(loss / accum).backward()
        watch.update(loss, it)
        meters.update("loss", loss)
        lr_sum += lr

        if step_now:
            scaler.unscale_(optimizer)
            grad_norm = grad_total_norm(params, args.clip_grad)
            if watch.skip and dist_util.any_across_ranks(bool(watch.window_bad.item()), device):
                # Every rank skips together, so the replicas stay identical.
                skipped += 1
                log.warning("warning: non-finite loss at epoch %d, iteration %d: optimizer step skipped", epoch, it)
            else:
                scaler.step(optimizer)
                meters.update("grad_norm", grad_norm)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            watch.window_bad.zero_()
        timer.step_done()

        done = it + 1
        if done % args.print_freq == 0 or done == ctx.epoch_iters:
            watch.check(epoch)
            _report(meters, timer, ctx, done, width, lr, global_batch)
        if not step_now or done == ctx.epoch_iters:
            continue  # the end of the epoch is saved by fit()
        periodic = ctx.save_every_steps and done % ctx.save_every_steps == 0
        stopping = ctx.stop is not None and ctx.stop.agreed()
        if (periodic or stopping) and ctx.save_checkpoint is not None:
            watch.check(epoch)  # never write a checkpoint with non-finite weights
            ctx.save_checkpoint(done)
        if stopping:
            ctx.stop.stop(f"at epoch {epoch}, iteration {done}")

    watch.check(epoch)
    stats = meters.read_total()
    stats["lr"] = lr_sum / max(timer.iters, 1)  # the epoch average, as the official log.txt
    if skipped:
        stats["skipped_steps"] = skipped
    log.info("Averaged stats: %s", "  ".join(f"{k}: {v:.6g}" for k, v in sorted(stats.items())))
    return stats


def _report(meters: DeviceMeters, timer: LoopTimer, ctx: EpochContext, done: int, width: int,
            lr: float, global_batch: int) -> None:
    window, timing = meters.read_window(), timer.window()
    if not dist_util.is_main_process():
        return
    loss = window.get("loss", math.nan)
    parts = [f"Epoch: [{ctx.epoch}]  [{done:>{width}}/{ctx.epoch_iters}]", f"eta: {timer.eta()}",
             f"lr: {lr:.6f}", f"loss: {loss:.4f}"]
    if "grad_norm" in window:
        parts.append(f"grad_norm: {window['grad_norm']:.4f}")
    parts += [f"img/s: {global_batch / timing['iter_time']:.1f}",
              f"data: {timing['data_time']:.3f}s ({timing['data_share']:.0%})",
              f"max mem: {max_memory_mb(ctx.device):.0f}MB"]
    log.info("  ".join(parts))
    if ctx.log_writer is not None:
        # x-axis in 1/1000 epochs: curves of runs with different batch sizes line up.
        epoch_1000x = int(((done - 1) / ctx.epoch_iters + ctx.epoch) * 1000)
        ctx.log_writer.add_scalar("train_loss", loss, epoch_1000x)
        ctx.log_writer.add_scalar("lr", lr, epoch_1000x)
        if "grad_norm" in window:
            ctx.log_writer.add_scalar("grad_norm", window["grad_norm"], epoch_1000x)
        ctx.log_writer.add_scalar("img_per_s", global_batch / timing["iter_time"], epoch_1000x)


@dataclass
class TrainingRun:
    """Everything the epoch loop needs; `model` is the (compiled / DDP-wrapped) training model."""
    model: torch.nn.Module
    compute_loss: Callable
    loader: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    checkpointer: object
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    log_writer: Optional[object] = None
    train_mode: Optional[Callable[[], None]] = None
    stop: Optional[StopRequest] = None


def fit(run: TrainingRun, args, pos, after_epoch: Optional[Callable] = None) -> None:
    """Train from `pos` (a checkpoint Position) to args.epochs.

    after_epoch(epoch) -> (log fields, is_best, extra checkpoint state) runs before the epoch's
    checkpoint is written, e.g. to evaluate; its state is saved with the checkpoint.
    """
    epoch_iters = iters_per_epoch(run.loader)
    global_batch = run.loader.batch_size * dist_util.get_world_size()
    log.info("Start training for %d epochs (%d iterations each)", args.epochs, epoch_iters)
    start_time = time.time()
    for epoch in range(pos.epoch, args.epochs):
        start_sample = pos.samples_in_epoch if epoch == pos.epoch else 0
        run.loader.sampler.set_epoch(epoch, start_sample)
        start_iter = start_sample // global_batch

        def save_mid_epoch(done: int, epoch=epoch, start_sample=start_sample, start_iter=start_iter):
            # Exact also when a resumed run changed the global batch mid-epoch.
            run.checkpointer.save(epoch, done, epoch_iters, start_sample + (done - start_iter) * global_batch)

        ctx = EpochContext(device=run.device, epoch=epoch, epoch_iters=epoch_iters, start_iter=start_iter,
                           amp_dtype=run.amp_dtype, log_writer=run.log_writer, save_checkpoint=save_mid_epoch,
                           save_every_steps=args.save_every_steps, train_mode=run.train_mode, stop=run.stop)
        stats = train_one_epoch(run.model, run.compute_loss, run.loader, run.optimizer, run.scaler, args, ctx)
        record = {f"train_{k}": v for k, v in stats.items()}
        best, extra = False, None
        if after_epoch is not None:
            fields, best, extra = after_epoch(epoch)
            record.update(fields)

        numbered = epoch % args.save_every == 0 or epoch + 1 == args.epochs
        run.checkpointer.save(epoch, epoch_iters, epoch_iters, epoch_iters * global_batch,
                              numbered=numbered, best=best, extra=extra)
        record["epoch"] = epoch
        if args.output_dir and dist_util.is_main_process():
            if run.log_writer is not None:
                run.log_writer.flush()
            path = os.path.join(args.output_dir, "log.txt")
            try:
                with open(path, mode="a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                # The epoch's checkpoint is written: a rerun resumes after this epoch (its log line is lost).
                raise UserError(f"cannot append to {path}: {os_error_text(e)}; the checkpoint of epoch {epoch} is "
                                f"written and a rerun of the same command resumes from it: check the disk of "
                                f"{args.output_dir} (free space, permissions)") from None
        if run.stop is not None and epoch + 1 < args.epochs and run.stop.agreed():
            run.stop.stop(f"after epoch {epoch}")

    log.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    if run.log_writer is not None:
        run.log_writer.close()
