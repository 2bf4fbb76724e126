"""Resume on top of the reader: which checkpoint a run continues from, and loading it."""
import logging
import os
from typing import List, Optional

from util import dist as dist_util
from util.checkpoint_io import CheckpointError
from util.errors import UserError
from util.rng import set_rng_state

from ..distributed import DDPStrategy
from . import dcp
from .format import DIR_LAST, DIR_PREV, FILE_LAST, FILE_PREV, Position, numbered_checkpoints, recorded_args
from .reader import check_architecture, load_model_weights, read_checkpoint

log = logging.getLogger("mae")


def resume_candidates(output_dir: str, sharded: bool = False) -> List[str]:
    """The checkpoints automatic resume tries, in order. A sharded run (--dist_strategy fsdp)
    tries its directories first, then the files of a DDP run it continues."""
    files = [os.path.join(output_dir, n) for n in (FILE_LAST, FILE_PREV)] + numbered_checkpoints(output_dir)
    if not sharded:
        return files
    dirs = [os.path.join(output_dir, n) for n in (DIR_LAST, DIR_PREV)]
    return dirs + numbered_checkpoints(output_dir, sharded=True) + files


def may_resume(resume: str, output_dir: str, auto_resume: bool) -> bool:
    """A checkpoint may set the decoder flags: --resume, or automatic resume from --output_dir."""
    if resume:
        return True
    return bool(output_dir) and auto_resume and os.path.isdir(output_dir) and any(
        os.path.exists(p) for p in resume_candidates(output_dir, sharded=True))


def find_resume_checkpoint(resume: str, output_dir: str, auto_resume: bool, sharded: bool,
                           unreadable: Optional[list] = None) -> Optional[dict]:
    """The checkpoint to resume from: `resume` (--resume), else with auto_resume the newest
    readable one in output_dir (sharded: a sharded run's, see resume_candidates). Of a sharded
    directory only the plain entries are read: the strategy loads the shards (resume()).

    unreadable: when given, the output_dir checkpoints that failed to load are appended to it
    (for the checkpointer, which renames them aside)."""
    if resume:
        return read_checkpoint(resume, "--resume", gather=False)
    if not auto_resume or not output_dir:
        return None
    for path in resume_candidates(output_dir, sharded):
        if not os.path.lexists(path):
            continue
        try:
            ckpt = read_checkpoint(path, foreign=False, gather=False)  # the run's own checkpoints
        except CheckpointError as e:
            log.warning("warning: %s; trying the previous checkpoint", e)
            if unreadable is not None:
                unreadable.append(path)
            continue
        return ckpt
    return None


def resume(ckpt: Optional[dict], model, optimizer, scaler, strategy, *, start_epoch: int,
           model_name: Optional[str], explicit: bool) -> Position:
    """Restore model (and, when present, optimizer, scaler, RNG and data position). `strategy` loads
    the state: a sharded strategy reads a sharded checkpoint's slices; another strategy gets a
    sharded checkpoint gathered in this process. explicit: the checkpoint was named by --resume
    (its messages then name the flag); start_epoch: where a run without a position starts."""
    if ckpt is None:
        return Position(epoch=start_epoch)
    strategy = strategy if strategy is not None else DDPStrategy()
    path = ckpt["_path"]
    if ckpt.get("_sharded") and strategy.sharded:
        dcp.load_into(strategy, model, optimizer, path)
        return _resume_position(ckpt, scaler, path)
    if ckpt.get("_sharded"):
        ckpt = read_checkpoint(path, "--resume" if explicit else None)
    if "model" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model' entry: it is not a training checkpoint")
    if "_format" in ckpt:  # transformers / timm / safetensors weights: name both architectures
        check_architecture(model.state_dict(), ckpt, path, "--resume", model_name)
    load_model_weights(model, ckpt["model"], path, recorded_args(ckpt), model_name, strategy)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        log.info("Loaded weights from %s (no optimizer state); starting at epoch %d", path, start_epoch)
        return Position(epoch=start_epoch)
    try:
        strategy.load_optimizer_state(model, optimizer, ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer state in {path} does not fit this model's parameter groups ({e}): "
                        "resume with the same --model, or load weights only") from None
    return _resume_position(ckpt, scaler, path)


def _resume_position(ckpt: dict, scaler, path: str) -> Position:
    """The scaler, RNG states and data position of a checkpoint whose weights are loaded."""
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    epoch = int(ckpt["epoch"])
    done = ckpt.get("epoch_iter", 1) >= ckpt.get("epoch_iters", 1)
    pos = Position(epoch + 1, 0) if done else Position(epoch, int(ckpt["samples_in_epoch"]))
    rng = ckpt.get("rng")
    if rng and len(rng) == dist_util.get_world_size():
        set_rng_state(rng[dist_util.get_rank()])
    elif rng:
        log.warning("warning: %s was written by %d processes, this run has %d; RNG states not restored "
                    "(data order and masks are unaffected)", path, len(rng), dist_util.get_world_size())
    where = f"epoch {pos.epoch}" + (f", sample {pos.samples_in_epoch} of the epoch" if pos.samples_in_epoch else "")
    log.info("Resumed from %s: continuing at %s", path, where)
    return pos


def fit_to_data(pos: Position, samples: int) -> Position:
    """A mid-epoch position past the end of the data (the dataset shrank since the checkpoint) would
    leave the sampler a negative length: that epoch is over, so training goes on with the next."""
    if 0 < samples <= pos.samples_in_epoch:
        log.warning("warning: the checkpoint stopped epoch %d at sample %d, but the data now has %d samples (it "
                    "changed since): continuing at epoch %d", pos.epoch, pos.samples_in_epoch, samples, pos.epoch + 1)
        return Position(pos.epoch + 1, 0)
    return pos


def already_finished(pos: Position, epochs: int, ckpt: Optional[dict]) -> bool:
    """True (with a note) when the resumed checkpoint has trained all --epochs already: rerunning a
    finished command, or a requeued job whose run had ended, is then a success with nothing to do."""
    if ckpt is None or pos.epoch < epochs:
        return False
    if dist_util.is_main_process():
        done = f"trained all {epochs} --epochs" if pos.epoch == epochs else \
            f"trained {pos.epoch} epochs, more than --epochs {epochs}"
        log.warning("note: %s has %s: nothing left to train (raise --epochs to train longer, or give another "
                    "--output_dir for a new run)", ckpt["_path"], done)
    return True
