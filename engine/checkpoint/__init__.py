"""Training checkpoints: what they hold, how they are written, and the one way they are read.

Format: the official keys ('model', 'optimizer', 'epoch', 'scaler', 'args') plus the position
inside the epoch (epoch_iter, epoch_iters, samples_in_epoch), world_size, every rank's RNG state,
format_version and the run's extra state (W&B run id, max_accuracy), all plain data
(torch.load(weights_only=True)). 'epoch' is the epoch the state belongs to; it is complete when
epoch_iter == epoch_iters (official checkpoints, which lack these keys, are always at an epoch end).

Guarantee: a crash at any moment leaves a complete checkpoint-last or checkpoint-prev. A save is
written under a temporary name and only then renamed into place, the old last becoming prev
(rotation.py, one policy for both backends); checkpoint-<epoch> snapshots (--keep_last prunes
them) and checkpoint-best are taken from last afterwards. A checkpoint that fails to load is never
rotated into prev: it is renamed <name>.unreadable, and resume falls back to the next candidate.

Two backends, picked by the strategy (engine/distributed.py, `strategy.sharded`):
  single_file.py  checkpoint-last.pth, ...: rank 0 gathers the state and writes one file.
  dcp.py          checkpoint-last/, ...: every rank writes its shards (torch.distributed.checkpoint),
                  a COMPLETE marker last; optionally in the background (--async_save).

One reader (reader.py read_checkpoint) behind every door: --resume and automatic resume
(resume.py), --finetune, --eval --resume, scripts/visualize.py, export.py, convert_checkpoint.py;
it also takes the weights of transformers, timm and safetensors (engine/checkpoint/foreign.py).
"""
from .dcp import DcpBackend, load_full, load_into, load_meta, problem, save_full_as_sharded
from .format import (
    COMPLETE,
    DIR_BEST,
    DIR_LAST,
    DIR_PREV,
    FILE_BEST,
    FILE_LAST,
    FILE_PREV,
    FORMAT_VERSION,
    META,
    UNREADABLE_SUFFIX,
    Position,
    is_sharded,
    numbered_checkpoints,
    numbered_name,
    plain_args,
    recorded_args,
    write_advice,
)
from .reader import (
    check_architecture,
    describe_vit,
    load_model_weights,
    load_pretrained_encoder,
    matching_model,
    mismatch_report,
    read_checkpoint,
    weights_of,
)
from .resume import already_finished, find_resume_checkpoint, fit_to_data, may_resume, resume, resume_candidates
from .rotation import Checkpointer
from .single_file import FileBackend


def make_checkpointer(strategy, output_dir: str, model, optimizer, scaler, record: dict, keep_last: int = 0,
                      unreadable=(), async_save: bool = False) -> Checkpointer:
    """Single files on rank 0 (a strategy that is not sharded), or sharded directories written by
    every rank (strategy.sharded). record: the run's flags as plain data (plain_args(args)),
    saved as 'args'; async_save: sharded directories written in the background."""
    backend = DcpBackend(strategy, output_dir, async_save) if strategy.sharded else FileBackend(strategy)
    return Checkpointer(backend, output_dir, model, optimizer, scaler, record, keep_last, unreadable)


__all__ = [
    "COMPLETE", "DIR_BEST", "DIR_LAST", "DIR_PREV", "FILE_BEST", "FILE_LAST", "FILE_PREV", "FORMAT_VERSION", "META",
    "UNREADABLE_SUFFIX", "Checkpointer", "DcpBackend", "FileBackend", "Position", "already_finished", "fit_to_data",
    "check_architecture", "describe_vit", "find_resume_checkpoint", "is_sharded", "load_full", "load_into",
    "load_meta", "load_model_weights", "load_pretrained_encoder", "make_checkpointer", "matching_model",
    "may_resume", "mismatch_report", "numbered_checkpoints", "numbered_name", "plain_args", "problem",
    "read_checkpoint", "recorded_args", "resume", "resume_candidates", "save_full_as_sharded", "weights_of",
    "write_advice",
]
