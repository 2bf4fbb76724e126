"""--on_nonfinite rollback: a non-finite loss reloads the last good checkpoint in-process and the
replay skips the window of samples that produced it.

A window is an accumulation window of global samples, [first, end) of an epoch's order; the
skipped windows are listed in the log and in every later checkpoint ('skipped_samples'), so that
a resumed run skips them too and stays exact. The schedule is not shifted: the window's iterations
are still counted, only not trained on. --max_rollbacks bounds the windows a run may skip.
"""
import logging
from typing import Callable, List, Optional

from util.errors import TrainingStopped

from .checkpoint import Position

log = logging.getLogger("mae")

STATE_KEY = "skipped_samples"  # the checkpoint entry


class NonFiniteWindow(Exception):
    """Raised at the optimizer step of a window whose loss was not finite on some rank, before the
    step: the weights are still those of the last good step."""

    def __init__(self, it: int):
        super().__init__(f"non-finite loss at iteration {it}")
        self.it = it
        self.epoch, self.first, self.end = 0, 0, 0  # the window's samples, set by the epoch loop

    def locate(self, epoch: int, first: int, end: int) -> "NonFiniteWindow":
        self.epoch, self.first, self.end = epoch, first, end
        return self


class Rollback:
    def __init__(self, reload: Callable[[], Position], max_rollbacks: int, state: dict,
                 sample_ids: Optional[Callable[[int, int, int], List[int]]] = None):
        """reload: loads the newest checkpoint of the run into the model, optimizer, scaler and RNG,
        returns its position. state: the checkpointer's extra state; the skipped windows live in it
        (a resumed run's included). sample_ids(epoch, first, end): the dataset indices of a window."""
        self.reload, self.max_rollbacks, self.state, self.sample_ids = reload, max_rollbacks, state, sample_ids
        self.windows = [dict(w) for w in state.get(STATE_KEY, [])]
        state[STATE_KEY] = self.windows

    def skips(self, epoch: int, sample: int) -> bool:
        """The global sample position `sample` of `epoch` starts a window that is not trained on."""
        return any(w["epoch"] == epoch and w["first"] <= sample < w["end"] for w in self.windows)

    def recover(self, bad: NonFiniteWindow) -> Position:
        where = f"epoch {bad.epoch}, samples {bad.first}-{bad.end - 1} of the epoch (iteration {bad.it})"
        if len(self.windows) >= self.max_rollbacks:
            raise TrainingStopped(f"loss is not finite at {where}, after {len(self.windows)} rollback(s) "
                                  f"(--max_rollbacks {self.max_rollbacks}): training stopped; the last checkpoint "
                                  "is intact (lower --lr/--blr, or use --amp bf16 or none)")
        ids = self.sample_ids(bad.epoch, bad.first, bad.end) if self.sample_ids is not None else []
        self.windows.append({"epoch": bad.epoch, "first": bad.first, "end": bad.end, "samples": ids})
        pos = self.reload()
        log.warning("warning: non-finite loss at %s: rolled back to epoch %d, sample %d; the replay skips "
                    "dataset samples %s (rollback %d of at most %d)", where, pos.epoch, pos.samples_in_epoch,
                    ids, len(self.windows), self.max_rollbacks)
        return pos
