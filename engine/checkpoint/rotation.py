"""The one rotation policy over both storage backends (single_file.py, dcp.py).

A save writes the new checkpoint under a temporary name, then commits it: the old last becomes
prev and the new one last, each step a rename, so a crash at any moment leaves a complete last or
prev. Snapshots (checkpoint-<epoch>, checkpoint-best) are taken from last after the commit, so a
failed snapshot never costs the step's last. What a backend decides: how state is gathered and
who writes it, how the temporary is made final, how a checkpoint is copied, removed and set aside.
"""
import logging
import os
import threading
from typing import Optional

from util import dist as dist_util
from util.checkpoint_io import WriteError, os_error_in, os_error_text
from util.rng import get_rng_state

from .format import FORMAT_VERSION, UNREADABLE_SUFFIX, numbered_checkpoints, numbered_name, write_advice

log = logging.getLogger("mae")


class Checkpointer:
    """Writes the checkpoints of a run into output_dir; every rank must call save() (the RNG states
    are gathered, and a sharded backend writes on every rank).

    backend: single_file.FileBackend or dcp.DcpBackend (make_checkpointer picks it).
    record: the run's flags as plain data, saved as 'args' in every checkpoint.
    unreadable: checkpoints of output_dir that failed to load (find_resume_checkpoint's list).
    They are renamed aside, so the next save cannot rotate a broken last into prev, the copy a
    later fallback would rely on.
    """

    def __init__(self, backend, output_dir: str, model, optimizer, scaler, record: dict, keep_last: int = 0,
                 unreadable=()):
        self.backend, self.output_dir = backend, output_dir
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.record, self.keep_last = record, keep_last
        self.last_name = backend.last_name  # for messages
        self.extra_state = {}  # plain data every checkpoint carries (the W&B run id: engine/reporting/wandb_log.py)
        self._no_rotate = False  # last is known to be broken and could not be moved aside
        self._pending = None  # the Future of a save still being written in the background
        self._finished = threading.Event()  # set once rank 0 has committed the pending save
        self._finish_error = None  # an error of rank 0's commit of a background save
        if output_dir and dist_util.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
            backend.remove_stale(output_dir)
            for path in unreadable:
                self._set_aside(path)
        backend.barrier()

    def _path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def _set_aside(self, path: str) -> None:
        try:
            aside = self.backend.move_aside(path, path + UNREADABLE_SUFFIX)
            if aside:
                log.warning("warning: renamed the unreadable %s to %s, so that no save keeps it as %s (delete it "
                            "once you no longer need it)", path, aside, self.backend.PREV)
        except OSError as e:
            stuck = self.backend.skips_rotation_of_stuck_last and os.path.basename(path) == self.backend.LAST
            self._no_rotate = self._no_rotate or stuck
            log.warning("warning: could not rename the unreadable %s aside (%s)%s", path, os_error_text(e),
                        f"; the next save replaces it without keeping it as {self.backend.PREV}" if stuck else "")

    def save(self, epoch: int, epoch_iter: int, epoch_iters: int, samples_in_epoch: int,
             numbered: bool = False, best: bool = False, extra: Optional[dict] = None) -> None:
        """last, plus checkpoint-<epoch> (numbered) and checkpoint-best (best).

        extra: more plain-data entries for the checkpoint (e.g. max_accuracy). A checkpoint that
        cannot be written (full disk, ...) is a one-line error; the checkpoints written before stay
        intact."""
        if not self.output_dir:
            return
        self.close()  # the previous background save is committed before the next starts
        rng = dist_util.all_gather_object(get_rng_state())
        tensors = self.backend.state(self.model, self.optimizer)
        if not (self.backend.every_rank_writes or dist_util.is_main_process()):
            self.backend.barrier()  # returns when rank 0's last is complete, as rank 0's save does
            return
        record = {"scaler": self.scaler.state_dict(), "epoch": epoch, "epoch_iter": epoch_iter,
                  "epoch_iters": epoch_iters, "samples_in_epoch": samples_in_epoch,
                  "world_size": dist_util.get_world_size(), "args": self.record, "rng": rng,
                  "format_version": FORMAT_VERSION, **self.extra_state, **(extra or {})}
        names = (epoch, numbered, best)
        try:
            written, pending = self.backend.write(tensors, record)
        except Exception as e:  # noqa: BLE001 - DCP reports a failed write as its own exception type
            self._raise_write(_cause(e))
        if pending is not None:  # written in the background: rank 0 commits when it is done
            self._pending, self._finished = pending, threading.Event()
            if dist_util.is_main_process():
                pending.add_done_callback(lambda fut: self._finish_async(fut, written, names))
            else:
                self._finished.set()
            return
        if dist_util.is_main_process():
            self._finish(written, *names)
        self.backend.barrier()  # save() returns when last is complete, on every rank

    def _finish(self, written, epoch: int, numbered: bool, best: bool) -> None:
        """Rank 0, once the new checkpoint is written: commit it as last, then the snapshots."""
        last = self._path(self.backend.LAST)
        prev = None if self._no_rotate else self._path(self.backend.PREV)
        try:
            self.backend.commit(written, last, prev)
        except WriteError as e:
            self._raise_write(e.cause, e.path)
        self._no_rotate = False
        try:
            if numbered:
                self.backend.snapshot(last, self._path(numbered_name(epoch, self.backend.sharded)), written)
                self._prune()
            if best:
                self.backend.snapshot(last, self._path(self.backend.BEST), written)
        except WriteError as e:
            raise WriteError(e.path, e.cause, f"cannot write {e.path}: {os_error_text(e.cause)}; {last} of this "
                             "step was written and a rerun of the same command resumes from it: "
                             f"{write_advice(e.cause, self.output_dir)}") from None

    def _prune(self) -> None:
        if self.keep_last > 0:
            for path in numbered_checkpoints(self.output_dir, self.backend.sharded)[self.keep_last:]:
                try:
                    self.backend.remove(path)
                except OSError as e:
                    log.warning("warning: could not delete %s (--keep_last %d): %s", path, self.keep_last,
                                os_error_text(e))

    def _finish_async(self, fut, written, names) -> None:
        """Rank 0, in the thread that completes the write: the commit, as soon as it can run (a kill
        after it keeps this checkpoint). close() waits for it: a future's result() returns before
        its callbacks have run."""
        try:
            fut.result()
            self._finish(written, *names)
        except BaseException as e:  # noqa: BLE001 - raised by close() in the training thread
            self._finish_error = e
        finally:
            self._finished.set()

    def close(self) -> None:
        """Wait for a background save (and rank 0's commit of it); a no-op otherwise."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except Exception as e:  # noqa: BLE001
            self._raise_write(_cause(e))
        self._finished.wait()  # rank 0: its commit of the checkpoint is done
        self.backend.barrier(background=True)  # so every rank returns after rank 0's commit
        error, self._finish_error = self._finish_error, None
        if error is not None:
            self._raise_write(os_error_in(error) or error)

    def _raise_write(self, cause, path: Optional[str] = None) -> None:
        """The one-line error of a last that could not be written (a non-OSError is re-raised)."""
        if not isinstance(cause, OSError):
            raise cause
        last = self._path(self.backend.LAST)
        kept = (f"the previous {self.backend.LAST} is intact and a rerun of the same command resumes from it"
                if self.backend.exists(last) and not self._no_rotate else "no checkpoint of this run was written")
        raise WriteError(path or last, cause, f"cannot write {last}: {os_error_text(cause)}; {kept}: "
                         f"{write_advice(cause, self.output_dir)}") from None


def _cause(e: BaseException) -> BaseException:
    """The OSError behind a failed write (WriteError's, or one in the chain); else `e` itself."""
    if isinstance(e, WriteError):
        return e.cause
    return os_error_in(e) or e
