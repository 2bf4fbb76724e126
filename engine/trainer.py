"""The training step and the epoch loop, shared by pretraining, fine-tuning and linear probing.

The loop never reads a device value per iteration: losses, grad norms and the non-finite
check accumulate on the device and are read at print time, before a checkpoint, and at the
end of the epoch. That keeps the GPU queue full without the official loop's per-step
loss.item() and cuda.synchronize().
"""
import datetime
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed.tensor import DTensor

from util import dist as dist_util
from util.errors import TrainingStopped
from util.meters import DeviceMeters, LoopTimer

from .distributed import DDPStrategy
from .launch.preemption import StopRequest
from .launch.watchdog import Watchdog
from .lr_sched import LrSchedule, adjust_learning_rate
from .precision import autocast
from .profiling import StepProfiler, named_range, profiling
from .protocols import Checkpointer, LogWriter, Strategy, TrainLoader
from .reporting.logs import append_epoch_record, report_progress
from .rollback import NonFiniteWindow, Rollback

log = logging.getLogger("mae")


@dataclass
class TrainingRun:
    """Everything the step and the epoch loop read, built once by the recipe runner (from_config
    takes the run's config); neither reads a flag. The parts' contracts: engine/protocols.py."""
    # The step.
    model: torch.nn.Module             # the training model, as strategy.wrap() returned it
    compute_loss: Callable             # (model, batch) -> scalar loss tensor, called under autocast
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    strategy: Strategy = field(default_factory=DDPStrategy)
    amp_dtype: Optional[torch.dtype] = None
    accum_iter: int = 1                # iterations per optimizer step
    clip_grad: Optional[float] = None  # max gradient norm; None: no clipping
    skip_nonfinite: bool = False       # a non-finite loss skips its optimizer step; False: training stops
    rollback: Optional[Rollback] = None  # instead: reload the last checkpoint, skip the window on the replay
    # The epoch loop.
    loader: Optional[TrainLoader] = None
    checkpointer: Optional[Checkpointer] = None
    schedule: Optional[LrSchedule] = None
    epochs: int = 0
    print_freq: int = 20               # progress line every N iterations
    save_every: int = 20               # checkpoint-<epoch>.pth every N epochs (and after the last)
    save_every_steps: int = 0          # mid-epoch checkpoint-last.pth every N iterations; 0: off
    output_dir: str = ""               # log.txt; empty: none
    log_writer: Optional[LogWriter] = None
    train_mode: Optional[Callable[[], None]] = None  # default model.train(); linear probing freezes the encoder
    stop: Optional[StopRequest] = None
    flops_per_iter: Optional[float] = None   # model FLOPs of one iteration on one device: TFLOP/s in the progress line
    peak_flops: Optional[float] = None       # the device's peak FLOP/s: MFU
    profiler: Optional[StepProfiler] = None  # --profile on this rank
    watchdog: Watchdog = field(default_factory=Watchdog.disabled)  # told of every optimizer step
    params: List[torch.nn.Parameter] = field(init=False, repr=False)
    spikes: "LossSpikes" = field(init=False, repr=False)  # one for the whole run: epochs do not restart its warm-up

    def __post_init__(self):
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.spikes = LossSpikes(self.device)

    @classmethod
    def from_config(cls, cfg, **parts) -> "TrainingRun":
        """A recipe's run: `parts` (model, compute_loss, optimizer, ...) and the numbers of the
        run's config (engine/config.py RunConfig)."""
        o, c = cfg.optim, cfg.checkpoint
        return cls(accum_iter=o.accum_iter, clip_grad=o.clip_grad, skip_nonfinite=o.skip_nonfinite,
                   schedule=LrSchedule(o.lr, o.min_lr, o.warmup_epochs, o.epochs), epochs=o.epochs,
                   print_freq=cfg.logging.print_freq, save_every=c.save_every, save_every_steps=c.save_every_steps,
                   output_dir=c.output_dir, **parts)


def grad_total_norm(parameters, clip_grad: Optional[float]) -> torch.Tensor:
    """The total gradient norm (clipped to clip_grad). Sharded (DTensor) gradients give the norm
    over all shards, as a replicated DTensor: returned as a plain tensor, the same on every rank."""
    with_grad = [p for p in parameters if p.grad is not None]
    if clip_grad is not None:
        norm = torch.nn.utils.clip_grad_norm_(with_grad, clip_grad)
    elif not with_grad:
        return torch.zeros(())
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class NonFiniteWatch:
    """The non-finite-loss policy of one epoch. It remembers, on the device, the first iteration
    whose loss was not finite, and check() stops training then. With skip=True the optimizer
    step of a window with a non-finite loss is skipped instead (one host read per step), and
    check() never stops training."""

    def __init__(self, device, epoch: int, skip: bool = False, rollback: bool = False):
        self.epoch, self.skip, self.rollback, self.skipped = epoch, skip or rollback, rollback, 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.window_bad = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, loss: torch.Tensor, it: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, torch.full_like(self.first_bad, it), self.first_bad)
        if self.skip:
            self.window_bad |= bad

    def skip_step(self, it: int) -> bool:
        """At an optimizer step: whether to skip it (every rank decides the same, so the replicas
        stay identical). Starts the next window."""
        if not self.skip:
            return False
        bad = dist_util.any_across_ranks(bool(self.window_bad.item()), self.window_bad.device)
        self.window_bad.zero_()
        if bad and self.rollback:
            raise NonFiniteWindow(it)  # before the step: the weights are still the last good ones
        if bad:
            self.skipped += 1
            log.warning("warning: non-finite loss at epoch %d, iteration %d: optimizer step skipped", self.epoch, it)
        return bad

    def check(self) -> None:
        """Raise if any loss so far was not finite (reads the device; call before saving)."""
        if self.skip:
            return
        first = int(dist_util.all_reduce_max(self.first_bad).item())
        if first >= 0:
            raise TrainingStopped(
                f"loss is not finite at epoch {self.epoch}, iteration {first}: training stopped; the last "
                "checkpoint is intact (lower --lr/--blr, use --amp bf16 or none, or pass --on_nonfinite skip or "
                "rollback)")


class LossSpikes:
    """Warns (rank 0, one line) when a loss is well above the recent mean. The comparison runs on
    the device; its result is read at print time, with the other device values. One instance
    follows the whole run (TrainingRun.spikes), so after the first WARMUP steps every iteration of
    every epoch is checked."""

    FACTOR, WARMUP, DECAY = 3.0, 20, 0.98  # x the running mean; steps before the first check; the mean's decay

    def __init__(self, device):
        self.steps = 0
        self.mean = torch.zeros((), device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.ref = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, it: int) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        if self.steps >= self.WARMUP:
            spike = finite & (loss > self.FACTOR * self.mean) & (self.first < 0)
            self.first = torch.where(spike, torch.full_like(self.first, it), self.first)
            self.value = torch.where(spike, loss, self.value)
            self.ref = torch.where(spike, self.mean, self.ref)
        decay = self.DECAY if self.steps else 0.0
        self.mean = torch.where(finite, decay * self.mean + (1 - decay) * loss, self.mean)
        self.steps += 1

    def report(self, epoch: int) -> None:
        if self.steps <= self.WARMUP or not dist_util.is_main_process():
            return
        first = int(self.first.item())
        if first >= 0:
            log.warning("warning: loss spike at epoch %d, iteration %d: %.4g, %.1fx the recent mean %.4g", epoch, first,
                        self.value.item(), self.value.item() / max(self.ref.item(), 1e-12), self.ref.item())
            self.first.fill_(-1)


def train_step(run: TrainingRun, batch, it: int,
               watch: NonFiniteWatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Iteration `it`: forward and backward of `batch`; on the last iteration of an accumulation
    window also unscale, gradient norm (clipped with clip_grad) and the optimizer step.

    Returns (loss, grad_norm) as device tensors, nothing read on the host (but skip_nonfinite's
    one flag per optimizer step); grad_norm is None when no optimizer step was taken.
    """
    last = (it + 1) % run.accum_iter == 0
    with nullcontext() if last else run.strategy.no_sync(run.model):  # gradients are averaged once per window
        with named_range("forward"), autocast(run.device, run.amp_dtype, cache=not run.strategy.sharded):
            loss = run.compute_loss(run.model, batch)
        with named_range("backward"):
            run.scaler.scale(loss / run.accum_iter).backward()
    watch.update(loss, it)
    if not last:
        return loss, None
    with named_range("optimizer_step"):
        run.scaler.unscale_(run.optimizer)
        grad_norm = grad_total_norm(run.params, run.clip_grad)
        skip = watch.skip_step(it)
        if not skip:
            run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, None if skip else grad_norm


def train_one_epoch(run: TrainingRun, epoch: int, start_sample: int = 0) -> Dict[str, float]:
    """Epoch `epoch` from its global sample `start_sample` (mid-epoch resume) to its end; returns
    the epoch's averaged metrics. Writes mid-epoch checkpoints and stops on an agreed signal."""
    run.loader.set_position(epoch, start_sample)
    epoch_iters, global_batch = run.loader.iters_per_epoch, run.loader.global_batch
    start_iter = start_sample // global_batch
    if run.train_mode is not None:
        run.train_mode()
    else:
        run.model.train(True)
    meters, timer = DeviceMeters(), LoopTimer(epoch_iters, start_iter)
    watch = NonFiniteWatch(run.device, epoch, run.skip_nonfinite, rollback=run.rollback is not None)
    spikes = run.spikes  # the run's: its running mean goes on from the previous epoch
    lr, lr_sum = run.optimizer.param_groups[0]["lr"], 0.0

    run.optimizer.zero_grad(set_to_none=True)
    batches, it = iter(run.loader), start_iter - 1
    while True:
        with named_range("data_wait"):
            batch = next(batches, None)
        if batch is None:
            break
        it += 1
        timer.data_ready()
        if it % run.accum_iter == 0:  # per-iteration schedule, set at the start of each accumulation window
            lr = adjust_learning_rate(run.optimizer, it / epoch_iters + epoch, run.schedule)
        sample = start_sample + (it - start_iter) * global_batch  # the batch's first global sample
        # A window that once gave a non-finite loss (--on_nonfinite rollback) is counted, not trained on.
        if run.rollback is None or not run.rollback.skips(epoch, sample):
            try:
                loss, grad_norm = train_step(run, batch, it, watch)
            except NonFiniteWindow as bad:
                window = run.accum_iter * global_batch
                first = sample + global_batch - window
                raise bad.locate(epoch, first, first + window) from None
            meters.update("loss", loss)
            spikes.update(loss, it)
            if grad_norm is not None:
                meters.update("grad_norm", grad_norm)
        lr_sum += lr
        timer.step_done()
        if run.profiler is not None:
            run.profiler.step()

        done = it + 1
        if done % run.accum_iter == 0:
            run.watchdog.step_done()
        if done % run.print_freq == 0 or done == epoch_iters:
            watch.check()
            spikes.report(epoch)
            report_progress(meters, timer, epoch, done, epoch_iters, lr, global_batch, run.device, run.log_writer,
                            run.flops_per_iter, run.peak_flops)
        if done % run.accum_iter or done == epoch_iters:
            continue  # checkpoints fall between optimizer steps; fit() saves the end of the epoch
        periodic = run.save_every_steps and done % run.save_every_steps == 0
        stopping = run.stop is not None and run.stop.agreed()
        if periodic or stopping:
            watch.check()  # never write a checkpoint with non-finite weights
            with run.watchdog.slow("a checkpoint save"), named_range("checkpoint_save"):
                # The samples done, exact also when a resumed run changed the global batch mid-epoch.
                run.checkpointer.save(epoch, done, epoch_iters, start_sample + (done - start_iter) * global_batch)
                if stopping:
                    run.checkpointer.close()  # an async save is complete before the process hands over
        if stopping:
            run.stop.stop(f"at epoch {epoch}, iteration {done}", run.checkpointer.last_name)

    watch.check()
    stats = meters.read_total()
    stats["lr"] = lr_sum / max(timer.iters, 1)  # the epoch average, as the official log.txt
    if watch.skipped:
        stats["skipped_steps"] = watch.skipped
    log.info("Averaged stats: %s", "  ".join(f"{k}: {v:.6g}" for k, v in sorted(stats.items())))
    return stats


def fit(run: TrainingRun, pos, after_epoch: Optional[Callable] = None) -> None:
    """Train from `pos` (a checkpoint Position) to run.epochs, a checkpoint and a log.txt line
    after every epoch.

    after_epoch(epoch) -> (log fields, is_best, extra checkpoint state) runs before the epoch's
    checkpoint is written, e.g. to evaluate; its state is saved with the checkpoint.
    """
    epoch_iters, global_batch = run.loader.iters_per_epoch, run.loader.global_batch
    log.info("Start training for %d epochs (%d iterations each)", run.epochs, epoch_iters)
    start_time = time.time()
    epoch, start = pos.epoch, pos.samples_in_epoch
    with profiling(run.profiler):  # counts training steps; also stopped (trace written) when training stops early
        while epoch < run.epochs:
            try:
                stats = train_one_epoch(run, epoch, start)
            except NonFiniteWindow as bad:
                with run.watchdog.slow("a rollback"):
                    pos = run.rollback.recover(bad)
                epoch, start = pos.epoch, pos.samples_in_epoch
                continue
            record = {f"train_{k}": v for k, v in stats.items()}
            best, extra = False, None
            if after_epoch is not None:
                with run.watchdog.slow("the end-of-epoch evaluation"):
                    fields, best, extra = after_epoch(epoch)
                record.update(fields)

            numbered = epoch % run.save_every == 0 or epoch + 1 == run.epochs
            with run.watchdog.slow("a checkpoint save"), named_range("checkpoint_save"):
                run.checkpointer.save(epoch, epoch_iters, epoch_iters, epoch_iters * global_batch,
                                      numbered=numbered, best=best, extra=extra)
            record["epoch"] = epoch
            if run.output_dir and dist_util.is_main_process():
                if run.log_writer is not None:
                    run.log_writer.flush()
                append_epoch_record(run.output_dir, record, epoch)
            if run.stop is not None and epoch + 1 < run.epochs and run.stop.agreed():
                with run.watchdog.slow("a checkpoint save"):
                    run.checkpointer.close()
                run.stop.stop(f"after epoch {epoch}", run.checkpointer.last_name)
            epoch, start = epoch + 1, 0
        with run.watchdog.slow("a checkpoint save"):
            run.checkpointer.close()  # the last (async) save is written before training ends
    log.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    if run.log_writer is not None:
        run.log_writer.close()
