"""Fault injection for the tests, and only for them: off unless the environment variable
MAE_TEST_HOOKS is set (read here, once, at import; no flag reaches it). Comma-separated:

  stall_sample=E:I        the sample with index I of epoch E never finishes loading (a loader worker
                          stuck on a network file system): tests/test_watchdog.py
  stall_first_step=R      rank R hangs in its first forward pass (start-up, compile): tests/test_watchdog.py
  nonfinite_sample=E:I    the loss of the batch holding sample I of epoch E is NaN (pretraining; the
                          sample's label carries the mark to the loss): tests/test_rollback.py
  nonfinite_epoch=E       ... of every batch of epoch E
  slow_save=S             rank 0's write of a single-file checkpoint takes S seconds longer (a slow
                          shared file system): tests/test_watchdog.py
"""
import os
import time
from typing import Callable, Dict, Optional, Tuple

_POISON = -987654  # a label no dataset has


def _parse(text: str) -> Dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = item.partition("=")
        out[name] = value
    return out


HOOKS = _parse(os.environ.get("MAE_TEST_HOOKS", ""))
ACTIVE = bool(HOOKS)


def _key(name: str) -> Optional[Tuple[int, int]]:
    if name not in HOOKS:
        return None
    epoch, index = HOOKS[name].split(":")
    return int(epoch), int(index)


def _stall() -> None:
    while True:
        time.sleep(3600)


def sample(key: Tuple[int, int], out: tuple) -> tuple:
    """KeyedSamples' result for `key`, as the hooks change it."""
    if key == _key("stall_sample"):
        _stall()
    if key == _key("nonfinite_sample") or str(key[0]) == HOOKS.get("nonfinite_epoch"):
        return (out[0], _POISON, *out[2:])
    return out


def wrap_loss(compute_loss: Callable, rank: int) -> Callable:
    """The recipe's loss as the hooks change it (unchanged without loss hooks)."""
    stall_rank = int(HOOKS["stall_first_step"]) if "stall_first_step" in HOOKS else None
    poison = "nonfinite_sample" in HOOKS or "nonfinite_epoch" in HOOKS
    if stall_rank is None and not poison:
        return compute_loss

    def compute(model, batch):
        if stall_rank == rank:
            _stall()
        loss = compute_loss(model, batch)
        if poison and bool((batch[1] == _POISON).any()):
            loss = loss * float("nan")
        return loss
    return compute


def slow_save() -> None:
    if "slow_save" in HOOKS:
        time.sleep(float(HOOKS["slow_save"]))
