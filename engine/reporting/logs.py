"""What a training run reports: the progress line, tensorboard scalars, and log.txt (one JSON
line per epoch, the official format)."""
import json
import logging
import math
import os
from typing import Mapping, Optional

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError
from util.meters import DeviceMeters, LoopTimer, max_memory_mb

from .wandb_log import CHECKPOINT_KEY, WandbWriter

log = logging.getLogger("mae")


class LogWriters:
    """The run's log writer on rank 0: tensorboard (--log_dir) and W&B (--wandb_project), either or
    both; every call goes to each. W&B sends a progress line's scalars as one row (end_row)."""

    def __init__(self, tensorboard=None, wandb: Optional[WandbWriter] = None):
        self.tensorboard, self.wandb = tensorboard, wandb
        self.writers = [w for w in (tensorboard, wandb) if w is not None]

    def add_scalar(self, tag: str, value, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_image(self, tag: str, image, step: int) -> None:
        for w in self.writers:
            w.add_image(tag, image, step)

    def end_row(self) -> None:
        if self.wandb is not None:
            self.wandb.end_row()

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def checkpoint_state(self) -> dict:
        """What checkpoints keep of the writers: the W&B run id, so a resumed job continues the run."""
        return {CHECKPOINT_KEY: self.wandb.run_id} if self.wandb is not None else {}


def make_log_writer(logging_cfg, record: Mapping, resumed: Optional[dict] = None) -> Optional[LogWriters]:
    """On rank 0 the run's LogWriters, None when neither --log_dir nor --wandb_project is set (and
    on the other ranks). logging_cfg: engine/config.py LoggingConfig; record: the run's flat args,
    W&B's config; resumed: the resumed checkpoint's entries, whose W&B run is continued."""
    if not dist_util.is_main_process():
        return None
    tensorboard = wandb = None
    if logging_cfg.log_dir:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it
        os.makedirs(logging_cfg.log_dir, exist_ok=True)
        tensorboard = SummaryWriter(log_dir=logging_cfg.log_dir)
    if logging_cfg.wandb_project:
        wandb = WandbWriter(logging_cfg, (resumed or {}).get(CHECKPOINT_KEY), dict(record))
    if tensorboard is None and wandb is None:
        return None
    return LogWriters(tensorboard, wandb)


def rank_step_times(iter_time: float, device: torch.device) -> torch.Tensor:
    """Every rank's mean step time over the window: one small all-reduce, at print time only."""
    times = torch.zeros(dist_util.get_world_size(), dtype=torch.float64, device=device)
    times[dist_util.get_rank()] = iter_time
    if dist_util.is_dist():
        torch.distributed.all_reduce(times)
    return times.cpu()


def report_progress(meters: DeviceMeters, timer: LoopTimer, epoch: int, done: int, epoch_iters: int, lr: float,
                    global_batch: int, device: torch.device, log_writer: Optional[LogWriters] = None,
                    flops_per_iter: Optional[float] = None, peak_flops: Optional[float] = None) -> None:
    """The progress line of iteration `done` and its tensorboard scalars. Every rank calls it
    (the meters are averaged across ranks, the step times gathered); rank 0 writes.
    flops_per_iter: model FLOPs of one iteration on one device (engine/flops.py), for TFLOP/s and,
    with peak_flops (per device), MFU."""
    window, timing = meters.read_window(), timer.window()
    times = rank_step_times(timing["iter_time"], device)
    if not dist_util.is_main_process():
        return
    loss = window.get("loss", math.nan)
    width = len(str(epoch_iters))
    parts = [f"Epoch: [{epoch}]  [{done:>{width}}/{epoch_iters}]", f"eta: {timer.eta()}",
             f"lr: {lr:.6f}", f"loss: {loss:.4f}"]
    if "grad_norm" in window:
        parts.append(f"grad_norm: {window['grad_norm']:.4f}")
    parts += [f"img/s: {global_batch / timing['iter_time']:.1f}",
              f"data: {timing['data_time']:.3f}s ({timing['data_share']:.0%})"]
    scalars = {}
    if flops_per_iter:
        scalars["tflops_per_device"] = flops_per_iter / timing["iter_time"] / 1e12
        parts.append(f"TFLOP/s: {scalars['tflops_per_device']:.3g}")
        if peak_flops:
            scalars["mfu"] = 100 * flops_per_iter / timing["iter_time"] / peak_flops
            parts.append(f"MFU: {scalars['mfu']:.1f}%")
    slow, fast = int(times.argmax()), int(times.argmin())
    scalars["step_time_max"], scalars["step_time_min"] = float(times[slow]), float(times[fast])
    parts += [f"step: {times[slow]:.3f}s max (rank {slow}) / {times[fast]:.3f}s min (rank {fast})",
              f"max mem: {max_memory_mb(device):.0f}MB"]
    log.info("  ".join(parts))
    if log_writer is not None:
        # x-axis in 1/1000 epochs: curves of runs with different batch sizes line up.
        epoch_1000x = int(((done - 1) / epoch_iters + epoch) * 1000)
        log_writer.add_scalar("train_loss", loss, epoch_1000x)
        log_writer.add_scalar("lr", lr, epoch_1000x)
        if "grad_norm" in window:
            log_writer.add_scalar("grad_norm", window["grad_norm"], epoch_1000x)
        log_writer.add_scalar("img_per_s", global_batch / timing["iter_time"], epoch_1000x)
        for name, value in scalars.items():
            log_writer.add_scalar(f"perf_train/{name}", value, epoch_1000x)
        log_writer.end_row()  # W&B: the line's values as one row, sent now


def append_epoch_record(output_dir: str, record: dict, epoch: int) -> None:
    """One line of log.txt, written after the epoch's checkpoint (rank 0)."""
    path = os.path.join(output_dir, "log.txt")
    try:
        with open(path, mode="a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        # The epoch's checkpoint is written: a rerun resumes after this epoch (its log line is lost).
        raise UserError(f"cannot append to {path}: {os_error_text(e)}; the checkpoint of epoch {epoch} is "
                        f"written and a rerun of the same command resumes from it: check the disk of "
                        f"{output_dir} (free space, permissions)") from None
