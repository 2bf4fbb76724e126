"""What a training checkpoint holds, where it is written, and how a run resumes from it.

Format: the official keys ('model', 'optimizer', 'epoch', 'scaler', 'args') plus the position
inside the epoch and every rank's RNG state, all plain data (torch.load(weights_only=True)).
'epoch' is the epoch the state belongs to; it is complete when epoch_iter == epoch_iters
(official checkpoints, which lack these keys, are always at an epoch end).
"""
import argparse
import errno
import logging
import os
import re
from dataclasses import dataclass
from typing import List, Optional

from models.state_dict import checkpoint_kind, other_head_pooling
from util import dist as dist_util
from util.checkpoint_io import (
    CheckpointError,
    WriteError,
    atomic_save,
    load_checkpoint_file,
    os_error_text,
    remove_stale_temp_files,
)
from util.errors import UserError
from util.rng import get_rng_state, set_rng_state

from .distributed import DDPStrategy
from .weights_io import check_architecture, read_weights

log = logging.getLogger("mae")

LAST, PREV, BEST = "checkpoint-last.pth", "checkpoint-prev.pth", "checkpoint-best.pth"
UNREADABLE_SUFFIX = ".unreadable"  # a checkpoint that failed to load is renamed to <name>.unreadable
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")
FORMAT_VERSION = 1


@dataclass
class Position:
    """Where training continues: the epoch, and the global samples of it already consumed."""
    epoch: int = 0
    samples_in_epoch: int = 0


def plain_args(args) -> dict:
    """argparse values as plain data, so no pickled Namespace is needed to read them back."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def recorded_args(ckpt: dict) -> dict:
    """The flags a checkpoint's run was started with: a dict here, an argparse.Namespace in
    official checkpoints, nothing in bare state dicts."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def numbered_checkpoints(output_dir: str) -> List[str]:
    """checkpoint-<epoch>.pth files, newest epoch first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _NUMBERED.match(n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


class Checkpointer:
    """Writes checkpoints on rank 0; every rank must call save() (the RNG states are gathered).
    A sharded strategy's checkpoints are directories: engine/dcp_checkpoint.py ShardedCheckpointer.

    model: the training model; `strategy` (engine/distributed.py, default: DDPStrategy) gives its
    full state dict, with the plain module's keys.

    unreadable: checkpoint files of output_dir that failed to load (find_resume_checkpoint's
    list). They are renamed aside, so the next save cannot rotate a broken checkpoint-last.pth
    into checkpoint-prev.pth, the copy a later fallback would rely on.
    """

    def __init__(self, output_dir: str, model, optimizer, scaler, args, keep_last: int = 0, unreadable=(),
                 strategy=None):
        self.output_dir, self.model, self.optimizer, self.scaler = output_dir, model, optimizer, scaler
        self.args, self.keep_last = args, keep_last
        self.strategy = strategy if strategy is not None else DDPStrategy()
        self._no_rotate = False  # checkpoint-last.pth is known to be broken and could not be moved
        self.last_name = LAST  # for messages
        self.extra_state = {}  # plain data every checkpoint carries (the W&B run id: engine/reporting/wandb_log.py)
        if output_dir and dist_util.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            remove_stale_temp_files(output_dir)
            for path in unreadable:
                self._set_aside(path)

    def _set_aside(self, path: str) -> None:
        if not os.path.exists(path):
            return
        aside = path + UNREADABLE_SUFFIX
        try:
            os.replace(path, aside)
            log.warning("warning: renamed the unreadable %s to %s, so that no save keeps it as %s (delete it "
                        "once you no longer need it)", path, aside, PREV)
        except OSError as e:
            last = os.path.basename(path) == LAST
            self._no_rotate = self._no_rotate or last
            log.warning("warning: could not rename the unreadable %s aside (%s)%s", path, os_error_text(e),
                        f"; the next save replaces it without keeping it as {PREV}" if last else "")

    def save(self, epoch: int, epoch_iter: int, epoch_iters: int, samples_in_epoch: int,
             numbered: bool = False, best: bool = False, extra: Optional[dict] = None) -> None:
        """checkpoint-last.pth, plus checkpoint-<epoch>.pth (numbered) and checkpoint-best.pth (best).

        extra: more plain-data entries for the checkpoint (e.g. max_accuracy). A file that cannot be
        written (full disk, ...) is a one-line error; the checkpoints written before stay intact."""
        if not self.output_dir:
            return
        rng = dist_util.all_gather_object(get_rng_state())
        model_state = self.strategy.model_state(self.model)
        optimizer_state = self.strategy.optimizer_state(self.model, self.optimizer)
        if not dist_util.is_main_process():
            return
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "epoch_iter": epoch_iter,
            "epoch_iters": epoch_iters,
            "samples_in_epoch": samples_in_epoch,
            "world_size": dist_util.get_world_size(),
            "args": plain_args(self.args),
            "rng": rng,
            "format_version": FORMAT_VERSION,
            **self.extra_state,
            **(extra or {}),
        }
        last = os.path.join(self.output_dir, LAST)
        had_last = os.path.exists(last) and not self._no_rotate
        try:
            atomic_save(state, last, previous=None if self._no_rotate else os.path.join(self.output_dir, PREV))
        except WriteError as e:
            kept = (f"the previous {LAST} is intact and a rerun of the same command resumes from it" if had_last
                    else "no checkpoint of this run was written")
            raise WriteError(e.path, e.cause, f"cannot write {last}: {os_error_text(e.cause)}; {kept}: "
                             f"{_fix(e.cause, self.output_dir)}") from None
        self._no_rotate = False
        try:
            if numbered:
                self._snapshot(last, os.path.join(self.output_dir, f"checkpoint-{epoch}.pth"), state)
                self._prune()
            if best:
                self._snapshot(last, os.path.join(self.output_dir, BEST), state)
        except WriteError as e:
            raise WriteError(e.path, e.cause, f"cannot write {e.path}: {os_error_text(e.cause)}; {last} of this "
                             "step was written and a rerun of the same command resumes from it: "
                             f"{_fix(e.cause, self.output_dir)}") from None

    @staticmethod
    def _snapshot(last: str, path: str, state: dict) -> None:
        """checkpoint-<epoch>.pth with the same content: a hard link when the filesystem allows."""
        tmp = path + ".link.tmp"
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(last, tmp)
            os.replace(tmp, path)
        except OSError:
            atomic_save(state, path)

    def _prune(self) -> None:
        if self.keep_last > 0:
            for path in numbered_checkpoints(self.output_dir)[self.keep_last:]:
                try:
                    os.unlink(path)
                except OSError as e:
                    log.warning("warning: could not delete %s (--keep_last %d): %s", path, self.keep_last,
                                os_error_text(e))


def _fix(cause: OSError, output_dir: str) -> str:
    """The advice for a failed write, by its cause."""
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the disk of {output_dir} (or give another --output_dir)"
    if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {output_dir} writable (or give another --output_dir)"
    return f"check {output_dir} (or give another --output_dir)"


def load_any(path: str, flag: Optional[str] = None, foreign: bool = True) -> dict:
    """A checkpoint file (foreign: also the weights of transformers, timm, safetensors, through
    weights_io), or of a sharded checkpoint directory only its plain entries (with '_sharded': the
    strategy loads its shards; engine/dcp_checkpoint.py)."""
    from . import dcp_checkpoint
    if dcp_checkpoint.is_sharded(path):
        return dcp_checkpoint.load_meta(path, flag)
    ckpt = read_weights(path, flag) if foreign else load_checkpoint_file(path, flag)
    ckpt["_path"] = path
    return ckpt


def resume_candidates(output_dir: str, sharded: bool = False) -> List[str]:
    """The checkpoints automatic resume tries, in order. A sharded run (--dist_strategy fsdp)
    tries its directories first, then the files of a DDP run it continues."""
    from . import dcp_checkpoint
    files = [os.path.join(output_dir, n) for n in (LAST, PREV)] + numbered_checkpoints(output_dir)
    if not sharded:
        return files
    dirs = [os.path.join(output_dir, n) for n in (dcp_checkpoint.LAST, dcp_checkpoint.PREV)]
    return dirs + dcp_checkpoint.numbered_dirs(output_dir) + files


def find_resume_checkpoint(args, unreadable: Optional[List[str]] = None, sharded: bool = False) -> Optional[dict]:
    """The checkpoint to resume from: --resume, else the newest readable one in output_dir
    (sharded: a sharded run's, see resume_candidates).

    unreadable: when given, the output_dir checkpoints that failed to load are appended to it
    (for Checkpointer, which renames them aside)."""
    if args.resume:
        return load_any(args.resume, "--resume")
    if args.no_auto_resume or not args.output_dir:
        return None
    for path in resume_candidates(args.output_dir, sharded):
        if not os.path.lexists(path):
            continue
        try:
            ckpt = load_any(path, foreign=False)  # the run's own checkpoints
        except CheckpointError as e:
            log.warning("warning: %s; trying the previous checkpoint", e)
            if unreadable is not None:
                unreadable.append(path)
            continue
        return ckpt
    return None


def mismatch_report(own: dict, state: dict, allowed_missing=()) -> str:
    """'missing keys: ...; unexpected keys: ...; shape mismatch: ...' (empty when they fit)."""
    missing = [k for k in own if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    return "; ".join(f"{what}: {', '.join(keys[:6])}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                     for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatch", shapes)) if keys)


def load_model_weights(model, state_dict: dict, source: str, recorded: Optional[dict] = None,
                       model_name: Optional[str] = None, strategy=None) -> None:
    """Strict load with a one-line error naming the mismatching keys, what the checkpoint is when
    it is of another kind (e.g. pretraining weights given to a classifier), and the architecture
    the checkpoint records (`recorded`: its args) against this run's `model_name`. `strategy`
    loads the weights (a sharded model takes its slices of them)."""
    problems = mismatch_report(model.state_dict(), state_dict)
    if not problems:
        (strategy or DDPStrategy()).load_model_state(model, state_dict)
        return
    have, want = checkpoint_kind(state_dict), checkpoint_kind(model.state_dict())
    saved = (recorded or {}).get("model")
    what = f" of {saved}" if saved else ""
    if want == "classify" and have == "pretrain":
        raise UserError(f"checkpoint {source} is a pretraining checkpoint{what} (encoder and decoder), not a "
                        f"classifier: start fine-tuning or linear probing from it with --finetune {source}; "
                        "--resume and --eval take the checkpoints of a fine-tuning or linear-probing run")
    if want == "classify" and have == "encoder":
        raise UserError(f"checkpoint {source} holds encoder weights without a classification head (like the "
                        f"official mae_pretrain_vit_*.pth): start from it with --finetune {source}; --resume and "
                        "--eval take the checkpoints of a fine-tuning or linear-probing run")
    if want == "pretrain" and have == "classify":
        raise UserError(f"checkpoint {source} is a classifier{what} (fine-tuned or linear-probed), not a "
                        "pretraining checkpoint: resume pretraining from a checkpoint of main_pretrain.py, or "
                        "evaluate this one with main_finetune.py --eval --resume")
    other_head = other_head_pooling(model.state_dict(), state_dict)
    if want == have == "classify" and other_head:
        head = ("--global_pool (averaged patch tokens, fc_norm)" if other_head == "avg"
                else "--cls_token (class token after the final norm)")
        raise UserError(f"checkpoint {source} does not fit the model ({problems}): its head was trained with "
                        f"{head}; pass that flag")
    ours = f"--model {model_name}" if model_name else "the model"
    if saved:
        size = (recorded or {}).get("input_size")
        flags = f"--model {saved}" + (f" --input_size {size}" if size else "")
        fix = f"it records {flags}: use the same flags" if saved != model_name else \
            "check --input_size and the model flags against the checkpoint"
    else:
        fix = "check --model/--input_size against the checkpoint"
    raise UserError(f"checkpoint {source} does not fit {ours} ({problems}): {fix}")


def resume(ckpt: Optional[dict], model, optimizer, scaler, args, strategy=None) -> Position:
    """Restore model (and, when present, optimizer, scaler, RNG and data position). `strategy`
    (default DDPStrategy) loads the state: a sharded strategy reads a sharded checkpoint's
    slices; another strategy gets a sharded checkpoint gathered in this process."""
    if ckpt is None:
        return Position(epoch=args.start_epoch)
    strategy = strategy or DDPStrategy()
    path = ckpt["_path"]
    if ckpt.get("_sharded") and strategy.sharded:
        from .dcp_checkpoint import load_into
        load_into(strategy, model, optimizer, path)
        return _resume_position(ckpt, scaler, args, path)
    if ckpt.get("_sharded"):
        from .dcp_checkpoint import load_full
        ckpt = load_full(path, "--resume" if args.resume else None)
    if "model" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model' entry: it is not a training checkpoint")
    if "_format" in ckpt:  # transformers / timm / safetensors weights: name both architectures
        check_architecture(model.state_dict(), ckpt, path, "--resume", getattr(args, "model", None))
    load_model_weights(model, ckpt["model"], path, recorded_args(ckpt), getattr(args, "model", None), strategy)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        log.info("Loaded weights from %s (no optimizer state); starting at epoch %d", path, args.start_epoch)
        return Position(epoch=args.start_epoch)
    try:
        strategy.load_optimizer_state(model, optimizer, ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer state in {path} does not fit this model's parameter groups ({e}): "
                        "resume with the same --model, or load weights only") from None
    return _resume_position(ckpt, scaler, args, path)


def _resume_position(ckpt: dict, scaler, args, path: str) -> Position:
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


def already_finished(pos: Position, args, ckpt: Optional[dict]) -> bool:
    """True (with a note) when the resumed checkpoint has trained all --epochs already: rerunning a
    finished command, or a requeued job whose run had ended, is then a success with nothing to do."""
    if ckpt is None or pos.epoch < args.epochs:
        return False
    if dist_util.is_main_process():
        done = f"trained all {args.epochs} --epochs" if pos.epoch == args.epochs else \
            f"trained {pos.epoch} epochs, more than --epochs {args.epochs}"
        log.warning("note: %s has %s: nothing left to train (raise --epochs to train longer, or give another "
                    "--output_dir for a new run)", ckpt["_path"], done)
    return True


def load_pretrained_encoder(model, path: str, head_init_std: float, model_name: Optional[str] = None,
                            strategy=None) -> None:
    """--finetune: encoder weights from a pretraining checkpoint into a classifier.

    Accepts this project's checkpoints, official ones ({'model': ...}) and bare encoder state
    dicts. The classifier adapts them (models/base.py PretrainedClassifier.adapt_pretrained: the
    decoder dropped, position tables fitted to its grid, ...) and re-initialises its head
    (trunc_normal, std head_init_std). Only its allowed_missing_keys may be missing; anything
    else missing or unexpected is an error.
    """
    ckpt = read_weights(path, "--finetune")  # also sharded directories, transformers / timm, safetensors
    if "_format" in ckpt:  # transformers / timm / safetensors weights: name both architectures
        check_architecture(model.state_dict(), ckpt, path, "--finetune", model_name)
    state = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    try:
        state = model.adapt_pretrained(state)
    except ValueError as e:
        raise UserError(str(e)) from None
    problems = mismatch_report(model.state_dict(), state, model.allowed_missing_keys)
    if problems:
        saved = recorded_args(ckpt).get("model")
        what = f" (it records --model {saved})" if saved else ""
        raise UserError(f"--finetune checkpoint {path} does not fit {type(model).__name__} "
                        f"({problems}): check that --model matches the pretrained encoder{what}")
    (strategy or DDPStrategy()).load_model_state(model, state, strict=False)
    (strategy or DDPStrategy()).init_head(model, head_init_std)
    log.info("Loaded pre-trained encoder from %s", path)
