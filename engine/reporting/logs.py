"""What a training run reports: the progress line, tensorboard scalars, and log.txt (one JSON
line per epoch, the official format)."""
import json
import logging
import math
import os
from typing import Optional

import torch

from util import dist as dist_util
from util.checkpoint_io import os_error_text
from util.errors import UserError
from util.meters import DeviceMeters, LoopTimer, max_memory_mb

from ..checkpoint import plain_args

log = logging.getLogger("mae")


def make_log_writer(args, resumed: Optional[dict] = None):
    """On rank 0: the tensorboard writer when --log_dir is set, the W&B writer when --wandb_project
    is (engine/reporting/wandb_log.py; `resumed`: the checkpoint the run resumes, whose W&B run it continues),
    or both (LogWriters); None when neither."""
    if not dist_util.is_main_process():
        return None
    tensorboard = wandb = None
    if args.log_dir:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it
        os.makedirs(args.log_dir, exist_ok=True)
        tensorboard = SummaryWriter(log_dir=args.log_dir)
    if getattr(args, "wandb_project", ""):
        from .wandb_log import CHECKPOINT_KEY, WandbWriter
        wandb = WandbWriter(args, (resumed or {}).get(CHECKPOINT_KEY), plain_args(args))
    if tensorboard is None or wandb is None:
        return tensorboard or wandb
    from .wandb_log import LogWriters
    return LogWriters(tensorboard, wandb)


def log_writer_state(log_writer) -> dict:
    """What checkpoints keep of the log writers: the W&B run id, so a resumed job continues the run."""
    from .wandb_log import CHECKPOINT_KEY, LogWriters, WandbWriter
    writer = log_writer.wandb if isinstance(log_writer, LogWriters) else log_writer
    return {CHECKPOINT_KEY: writer.run_id} if isinstance(writer, WandbWriter) else {}


def report_progress(meters: DeviceMeters, timer: LoopTimer, epoch: int, done: int, epoch_iters: int, lr: float,
                    global_batch: int, device: torch.device, log_writer: Optional[object] = None) -> None:
    """The progress line of iteration `done` and its tensorboard scalars. Every rank calls it
    (the meters are averaged across ranks); rank 0 writes."""
    window, timing = meters.read_window(), timer.window()
    if not dist_util.is_main_process():
        return
    loss = window.get("loss", math.nan)
    width = len(str(epoch_iters))
    parts = [f"Epoch: [{epoch}]  [{done:>{width}}/{epoch_iters}]", f"eta: {timer.eta()}",
             f"lr: {lr:.6f}", f"loss: {loss:.4f}"]
    if "grad_norm" in window:
        parts.append(f"grad_norm: {window['grad_norm']:.4f}")
    parts += [f"img/s: {global_batch / timing['iter_time']:.1f}",
              f"data: {timing['data_time']:.3f}s ({timing['data_share']:.0%})",
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
        if hasattr(log_writer, "end_row"):  # W&B: the line's values as one row, sent now
            log_writer.end_row()


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
