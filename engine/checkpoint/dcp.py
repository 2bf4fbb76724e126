"""Sharded checkpoints (--dist_strategy fsdp): directories that every rank writes its own shards
into with torch.distributed.checkpoint (DCP); nothing is gathered on rank 0.

Layout of checkpoint-last/, checkpoint-prev/, checkpoint-<epoch>/, checkpoint-best/:
  .metadata, __<rank>_<n>.distcp   DCP's files: {'model': ..., 'optimizer': ...}, parameter names
                                   as keys (torch.distributed.checkpoint.state_dict's layout)
  meta.pth                         the plain entries of a single-file checkpoint (epoch, position,
                                   every rank's RNG state, scaler, args, format_version, extra)
  COMPLETE                         written last, after every rank's shards and DCP's metadata

A save goes to .checkpoint-last.partial/; rank 0 writes COMPLETE when DCP has finished on every
rank, then the directories rotate by rename (rotation.py); a directory without COMPLETE, or whose
shard files are shorter than its metadata says, is never resumed from. DCP reshards on load, so a
checkpoint of N ranks resumes on M.

With async_save (--async_save) the shards are copied to host memory and written by a background
thread (dcp.async_save) while training goes on; rank 0 commits the directory when the write is
done, and the next save, a stop on a signal and the end of training wait for it (close()).
"""
import os
import shutil
from typing import List, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

from util import dist as dist_util
from util.checkpoint_io import CheckpointError, WriteError, atomic_save, fsync_dir, load_checkpoint_file

from ..distributed import optimizer_state_by_name_order, optimizer_state_by_position
from .format import COMPLETE, DIR_BEST, DIR_LAST, DIR_PREV, FORMAT_VERSION, META, PARTIAL, TRASH


def problem(path: str) -> Optional[str]:
    """Why the directory is not a complete sharded checkpoint (None: it is), without loading it:
    the completion marker, the metadata, and every shard file at least as long as the metadata's
    offsets say (a truncated shard, e.g. a full disk or a copy cut short, is caught here)."""
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        return "is incomplete (no COMPLETE marker: its save did not finish)"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable metadata makes the checkpoint unusable
        return f"has unreadable DCP metadata ({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})"
    needed = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else -1
        if have < size:
            what = "is missing" if have < 0 else f"has {have} of its {size} bytes"
            return f"is truncated or corrupt (shard {name} {what})"
    if not os.path.isfile(os.path.join(path, META)):
        return f"is incomplete (no {META})"
    return None


def load_meta(path: str, flag: Optional[str] = None) -> dict:
    """The plain entries of a sharded checkpoint, with '_path' and '_sharded'; CheckpointError
    (one line) when the directory is not a complete checkpoint."""
    why = problem(path)
    named = f"{flag} {path}" if flag else f"checkpoint {path}"
    if why:
        raise CheckpointError(f"{named} {why}; " + ("give another checkpoint" if flag else
                                                     "resume from an earlier checkpoint or delete it"))
    meta = load_checkpoint_file(os.path.join(path, META), flag)
    meta.update(_path=path, _sharded=True)
    return meta


def load_full(path: str, flag: Optional[str] = None) -> dict:
    """A sharded checkpoint as a single-file checkpoint's dict, without a process group:
    {'model': full state dict (official keys), 'optimizer': optimizer.state_dict()'s numbering,
    plus meta.pth's entries}. Holds the whole checkpoint in this process's memory."""
    meta = load_meta(path, flag)
    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP wraps the cause of a failed read in its own exceptions
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{flag + ' ' if flag else 'checkpoint '}{path} cannot be read ({reason})") from None
    out = {k: v for k, v in meta.items() if not k.startswith("_")}
    out["model"] = state["model"]
    if state.get("optimizer"):
        out["optimizer"] = optimizer_state_by_position(state["optimizer"])
    out["_path"] = path
    return out


def save_full_as_sharded(ckpt: dict, path: str, parameter_names: Optional[List[str]] = None) -> None:
    """A single-file checkpoint's dict -> a sharded checkpoint directory at `path` (one process,
    no process group: DCP writes the full tensors, which any number of ranks can load sliced).

    parameter_names: the optimizer's parameters in its numbering (distributed.parameter_order of
    the run's model and optimizer); without them the optimizer state is left out (weights only)."""
    if os.path.exists(path):
        raise WriteError(path, FileExistsError(17, "File exists"))
    tmp = path + PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {"model": ckpt["model"]}
    if parameter_names is not None and ckpt.get("optimizer"):
        tensors["optimizer"] = optimizer_state_by_name_order(parameter_names, ckpt["optimizer"])
    _save_state_dict(tensors, storage_writer=FileSystemWriter(tmp), no_dist=True)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer") and not k.startswith("_")}
    if "optimizer" not in tensors:
        for k in ("epoch", "epoch_iter", "epoch_iters", "samples_in_epoch", "rng", "scaler"):
            meta.pop(k, None)  # weights only: a resume from it starts training afresh
    meta.setdefault("format_version", FORMAT_VERSION)
    atomic_save(meta, os.path.join(tmp, META))
    _mark_complete(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_into(strategy, model, optimizer, path: str) -> None:
    """A sharded checkpoint's model and optimizer state into the sharded model and optimizer
    (every rank reads its own slices; DCP reshards when the world size differs)."""
    model_state, optimizer_state = strategy.sharded_state(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({reason}): resume from an earlier "
                              "checkpoint or delete it") from None
    strategy.load_sharded_state(model, optimizer, state["model"], state["optimizer"])


def _mark_complete(directory: str) -> None:
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)
    with open(os.path.join(directory, COMPLETE), "w") as f:
        f.write(f"format_version {FORMAT_VERSION}\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def _remove(path: str) -> None:
    """Delete a checkpoint directory so that no half-deleted one keeps its name: renamed first."""
    if not os.path.lexists(path):
        return
    trash = path + TRASH
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(output_dir: str) -> None:
    """Partial and half-deleted directories left by a process killed in a save."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(".checkpoint-") and (name.endswith(PARTIAL) or name.endswith(TRASH)):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


class DcpBackend:
    LAST, PREV, BEST = DIR_LAST, DIR_PREV, DIR_BEST
    last_name = DIR_LAST + "/"
    sharded = True
    every_rank_writes = True
    # A directory rotates by rename whatever happened to its set-aside (as this backend always did).
    skips_rotation_of_stuck_last = False

    def __init__(self, strategy, output_dir: str, async_save: bool = False):
        self.strategy, self.output_dir, self.async_save = strategy, output_dir, async_save
        # Background writes run their collectives on a group of their own: the training loop's
        # collectives on the default group must not interleave with them.
        self._group = dist.new_group(backend="gloo") if async_save and dist_util.is_dist() else None

    def state(self, model, optimizer) -> dict:
        model_state, optimizer_state = self.strategy.sharded_state(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def write(self, tensors: dict, record: dict):
        """Every rank: rank 0 makes the temporary directory with meta.pth, then every rank writes its
        shards into it. (temporary directory, the Future of a background write or None)."""
        tmp = os.path.join(self.output_dir, "." + DIR_LAST + PARTIAL)
        if dist_util.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            atomic_save(record, os.path.join(tmp, META))
        self.barrier()
        if self.async_save:
            return tmp, dcp.async_save(tensors, checkpoint_id=tmp, process_group=self._group)
        dcp.save(tensors, checkpoint_id=tmp)
        return tmp, None

    def commit(self, tmp: str, last: str, prev: Optional[str]) -> None:
        """Rank 0, after every rank's shards are written: COMPLETE, then the rotation by rename."""
        _mark_complete(tmp)
        if os.path.isdir(last):
            if prev is None:
                _remove(last)
            else:
                _remove(prev)
                os.replace(last, prev)  # a crash here leaves checkpoint-prev/ complete
        os.replace(tmp, last)
        fsync_dir(self.output_dir)

    @staticmethod
    def snapshot(last: str, path: str, written=None) -> None:
        """The same checkpoint under another name: hard links when the filesystem allows, COMPLETE
        last, then a rename, so the snapshot is complete or absent."""
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + PARTIAL)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in sorted(os.listdir(last), key=lambda n: n == COMPLETE):
            src, dst = os.path.join(last, name), os.path.join(tmp, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        fsync_dir(tmp)
        _remove(path)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    @staticmethod
    def move_aside(path: str, aside: str) -> Optional[str]:
        if not os.path.lexists(path):
            return None
        _remove(aside)
        os.replace(path, aside)
        return aside

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.isdir(path)

    @staticmethod
    def remove(path: str) -> None:
        _remove(path)

    @staticmethod
    def remove_stale(output_dir: str) -> None:
        remove_stale(output_dir)

    def barrier(self, background: bool = False) -> None:
        """Every rank writes: each waits for the others (background: on the group of the async writes)."""
        if dist_util.is_dist():
            dist.barrier(group=self._group) if background else dist.barrier()
