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

log = logging.getLogger("mae")


def make_log_writer(args):
    """Tensorboard writer on rank 0 when --log_dir is set."""
    if not args.log_dir or not dist_util.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it
    os.makedirs(args.log_dir, exist_ok=True)
    return SummaryWriter(log_dir=args.log_dir)


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
