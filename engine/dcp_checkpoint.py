"""Sharded checkpoints (--dist_strategy fsdp): directories that every rank writes its own shards
into with torch.distributed.checkpoint (DCP); nothing is gathered on rank 0.

Layout of checkpoint-last/, checkpoint-prev/, checkpoint-<epoch>/, checkpoint-best/:
  .metadata, __<rank>_<n>.distcp   DCP's files: {'model': ..., 'optimizer': ...}, parameter names
                                   as keys (torch.distributed.checkpoint.state_dict's layout)
  meta.pth                         the plain entries of a single-file checkpoint (epoch, position,
                                   every rank's RNG state, scaler, args, format_version, extra)
  COMPLETE                         written last, after every rank's shards and DCP's metadata

The guarantees of the single-file checkpoints (engine/checkpoint.py) hold: a save goes to
.checkpoint-last.partial/, COMPLETE is written when DCP has finished on every rank, then the
directories rotate by rename (checkpoint-last -> checkpoint-prev, the new one -> checkpoint-last),
so a crash at any moment leaves a complete checkpoint-last or checkpoint-prev; a directory without
COMPLETE, or whose shard files are shorter than its metadata says, is never resumed from.
DCP reshards on load, so a checkpoint of N ranks resumes on M.

With async_save (--async_save) the shards are copied to host memory and written by a background
thread (dcp.async_save) while training goes on; rank 0 finishes the directory (COMPLETE, rotation)
when the write is done, and the next save, a stop on a signal and the end of training wait for it.
"""
import logging
import os
import shutil
import threading
from typing import List, Optional

import torch.distributed as dist

from util import dist as dist_util
from util.checkpoint_io import (
    CheckpointError,
    WriteError,
    atomic_save,
    fsync_dir,
    load_checkpoint_file,
    os_error_in,
    os_error_text,
)
from util.rng import get_rng_state

from .checkpoint import FORMAT_VERSION, UNREADABLE_SUFFIX, _fix, plain_args

log = logging.getLogger("mae")

LAST, PREV, BEST = "checkpoint-last", "checkpoint-prev", "checkpoint-best"
COMPLETE, META = "COMPLETE", "meta.pth"
PARTIAL, TRASH = ".partial", ".trash"


def is_sharded(path: str) -> bool:
    """A sharded checkpoint directory (or what is left of one: any of its files). Other folders
    (transformers and timm weights: engine/weights_io.py) are not."""
    if not os.path.isdir(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return True  # unreadable: load_meta names the problem
    return any(n in (COMPLETE, META, ".metadata") or n.endswith(".distcp") for n in names)


def numbered_dirs(output_dir: str) -> List[str]:
    """checkpoint-<epoch>/ directories, newest epoch first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(n[len("checkpoint-"):]), n) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def problem(path: str) -> Optional[str]:
    """Why the directory is not a complete sharded checkpoint (None: it is), without loading it:
    the completion marker, the metadata, and every shard file at least as long as the metadata's
    offsets say (a truncated shard, e.g. a full disk or a copy cut short, is caught here)."""
    from torch.distributed.checkpoint import FileSystemReader
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
    plus meta.pth's entries}. For --finetune, scripts/visualize.py and the conversion script;
    holds the whole checkpoint in this process's memory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .distributed import optimizer_state_by_position
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
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    from .distributed import optimizer_state_by_name_order
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


class ShardedCheckpointer:
    """engine/checkpoint.py Checkpointer's interface (save, close) for a sharded strategy; every
    rank calls save()."""

    def __init__(self, output_dir: str, model, optimizer, scaler, args, keep_last: int = 0, unreadable=(),
                 strategy=None, async_save: bool = False):
        self.output_dir, self.model, self.optimizer, self.scaler = output_dir, model, optimizer, scaler
        self.args, self.keep_last, self.strategy = args, keep_last, strategy
        self.async_save = async_save
        self.last_name = LAST + "/"  # for messages
        self.extra_state = {}  # plain data every checkpoint carries (the W&B run id: engine/reporting/wandb_log.py)
        self._pending = None      # the Future of an async save
        self._finished = threading.Event()  # set once rank 0 has rotated the pending save into place
        self._finish_error = None  # an error of rank 0's finishing step of an async save
        # Background writes run their collectives on a group of their own: the training loop's
        # collectives on the default group must not interleave with them.
        self._group = dist.new_group(backend="gloo") if async_save and dist_util.is_dist() else None
        if output_dir and dist_util.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            remove_stale(output_dir)
            for path in unreadable:
                self._set_aside(path)
        if dist_util.is_dist():
            dist.barrier()

    @staticmethod
    def _set_aside(path: str) -> None:
        if not os.path.lexists(path):
            return
        aside = path + UNREADABLE_SUFFIX
        try:
            _remove(aside)
            os.replace(path, aside)
            log.warning("warning: renamed the unreadable %s to %s, so that no save keeps it as %s (delete it "
                        "once you no longer need it)", path, aside, PREV)
        except OSError as e:
            log.warning("warning: could not rename the unreadable %s aside (%s)", path, os_error_text(e))

    def save(self, epoch: int, epoch_iter: int, epoch_iters: int, samples_in_epoch: int,
             numbered: bool = False, best: bool = False, extra: Optional[dict] = None) -> None:
        """checkpoint-last/, plus checkpoint-<epoch>/ (numbered) and checkpoint-best/ (best)."""
        if not self.output_dir:
            return
        import torch.distributed.checkpoint as dcp
        self.close()  # the previous async save is complete (and finished) before the next starts
        rng = dist_util.all_gather_object(get_rng_state())
        model_state, optimizer_state = self.strategy.sharded_state(self.model, self.optimizer)
        tmp = os.path.join(self.output_dir, "." + LAST + PARTIAL)
        main = dist_util.is_main_process()
        meta = {"scaler": self.scaler.state_dict(), "epoch": epoch, "epoch_iter": epoch_iter,
                "epoch_iters": epoch_iters, "samples_in_epoch": samples_in_epoch,
                "world_size": dist_util.get_world_size(), "args": plain_args(self.args), "rng": rng,
                "format_version": FORMAT_VERSION, **self.extra_state, **(extra or {})}
        if main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                atomic_save(meta, os.path.join(tmp, META))
            except (OSError, WriteError) as e:
                self._raise_write(os_error_in(e) or e)
        if dist_util.is_dist():
            dist.barrier()
        names = (epoch, numbered, best)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            if self.async_save:
                self._pending = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group)
                self._finished = threading.Event()
                if main:
                    self._pending.add_done_callback(lambda fut: self._finish_async(fut, tmp, names))
                else:
                    self._finished.set()
                return
            dcp.save(state, checkpoint_id=tmp)
        except Exception as e:  # noqa: BLE001 - DCP reports a failed write as its own exception type
            cause = os_error_in(e)
            if cause is None:
                raise
            self._raise_write(cause)
        if main:
            self._finish(tmp, *names)
        if dist_util.is_dist():
            dist.barrier()  # save() returns when checkpoint-last/ is complete, on every rank

    def _finish_async(self, fut, tmp: str, names) -> None:
        """Rank 0, in the thread that completes the write: the rotation, as soon as it can run (a
        kill after it keeps this checkpoint). close() waits for it: a future's result() returns
        before its callbacks have run."""
        try:
            fut.result()
            self._finish(tmp, *names)
        except BaseException as e:  # noqa: BLE001 - raised by close() in the training thread
            self._finish_error = e
        finally:
            self._finished.set()

    def close(self) -> None:
        """Wait for an async save (and rank 0's finishing of it); a no-op otherwise."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except Exception as e:  # noqa: BLE001
            cause = os_error_in(e)
            if cause is None:
                raise
            self._raise_write(cause)
        self._finished.wait()  # rank 0: its rotation of the checkpoint is done
        if dist_util.is_dist():
            dist.barrier(group=self._group)  # so every rank returns after rank 0's rotation
        error, self._finish_error = self._finish_error, None
        if error is not None:
            self._raise_write(os_error_in(error) or error)

    def _raise_write(self, cause) -> None:
        last = os.path.join(self.output_dir, LAST)
        if not isinstance(cause, OSError):
            raise cause
        kept = (f"the previous {LAST} is intact and a rerun of the same command resumes from it"
                if os.path.isdir(last) else "no checkpoint of this run was written")
        raise WriteError(last, cause, f"cannot write {last}: {os_error_text(cause)}; {kept}: "
                         f"{_fix(cause, self.output_dir)}") from None

    def _finish(self, tmp: str, epoch: int, numbered: bool, best: bool) -> None:
        """Rank 0, after every rank's shards are written: COMPLETE, then the rotation."""
        last, prev = os.path.join(self.output_dir, LAST), os.path.join(self.output_dir, PREV)
        _mark_complete(tmp)
        if os.path.isdir(last):
            _remove(prev)
            os.replace(last, prev)  # a crash here leaves checkpoint-prev/ complete
        os.replace(tmp, last)
        fsync_dir(self.output_dir)
        if numbered:
            self._snapshot(last, os.path.join(self.output_dir, f"checkpoint-{epoch}"))
            self._prune()
        if best:
            self._snapshot(last, os.path.join(self.output_dir, BEST))

    @staticmethod
    def _snapshot(last: str, path: str) -> None:
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

    def _prune(self) -> None:
        if self.keep_last > 0:
            for path in numbered_dirs(self.output_dir)[self.keep_last:]:
                try:
                    _remove(path)
                except OSError as e:
                    log.warning("warning: could not delete %s (--keep_last %d): %s", path, self.keep_last,
                                os_error_text(e))


def load_into(strategy, model, optimizer, path: str) -> None:
    """A sharded checkpoint's model and optimizer state into the sharded model and optimizer
    (every rank reads its own slices; DCP reshards when the world size differs)."""
    import torch.distributed.checkpoint as dcp
    model_state, optimizer_state = strategy.sharded_state(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({reason}): resume from an earlier "
                              "checkpoint or delete it") from None
    strategy.load_sharded_state(model, optimizer, state["model"], state["optimizer"])
