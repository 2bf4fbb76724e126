"""The step between building a recipe's model and optimizer and running its epochs, the same for
every recipe and strategy: resume, stop if the run is finished, wrap the model for training, the
checkpointer of the strategy's format and the log writer."""
from dataclasses import dataclass
from typing import Optional

import torch

from . import checkpoint as ckpt_lib
from .reporting.logs import log_writer_state, make_log_writer


@dataclass
class Started:
    pos: ckpt_lib.Position
    model: torch.nn.Module  # the training model, as strategy.wrap() returned it
    checkpointer: ckpt_lib.Checkpointer
    log_writer: Optional[object]


def start_training(args, strategy, model, optimizer, scaler, found: Optional[dict], unreadable) -> Optional[Started]:
    """`found` (find_resume_checkpoint's) loaded into model, optimizer and scaler; None when it has
    trained all --epochs already (nothing to do). The caller drops `found` afterwards, so its
    tensors do not stay in memory for the whole run."""
    pos = ckpt_lib.resume(found, model, optimizer, scaler, strategy, start_epoch=args.start_epoch,
                          model_name=getattr(args, "model", None), explicit=bool(args.resume))
    if ckpt_lib.already_finished(pos, args.epochs, found):
        return None
    train_model = strategy.wrap(model)
    checkpointer = ckpt_lib.make_checkpointer(strategy, args.output_dir, train_model, optimizer, scaler,
                                              record=ckpt_lib.plain_args(args), keep_last=args.keep_last,
                                              unreadable=unreadable, async_save=getattr(args, "async_save", False))
    log_writer = make_log_writer(args, found)  # continues the W&B run of the resumed checkpoint
    checkpointer.extra_state.update(log_writer_state(log_writer))
    return Started(pos, train_model, checkpointer, log_writer)
