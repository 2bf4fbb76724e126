"""Single-file checkpoints (checkpoint-last.pth, ...): rank 0 gathers the full state and writes it
with util/checkpoint_io.atomic_save, whose temp file + rename is the commit (the old file kept as
checkpoint-prev.pth); snapshots are hard links to checkpoint-last.pth where the filesystem allows."""
import os
from typing import Optional

import torch.distributed as dist

from util import dist as dist_util
from util import test_hooks
from util.checkpoint_io import atomic_save, remove_stale_temp_files

from .format import FILE_BEST, FILE_LAST, FILE_PREV


class FileBackend:
    LAST, PREV, BEST = FILE_LAST, FILE_PREV, FILE_BEST
    last_name = FILE_LAST
    sharded = False
    every_rank_writes = False
    # A broken checkpoint-last.pth that could not be renamed aside is replaced without rotation:
    # rotated, it would become the checkpoint-prev.pth a later fallback relies on.
    skips_rotation_of_stuck_last = True

    def __init__(self, strategy):
        self.strategy = strategy

    def state(self, model, optimizer) -> dict:
        """Every rank takes part (a strategy may gather); rank 0 gets the full state dicts."""
        model_state = self.strategy.model_state(model)
        return {"model": model_state, "optimizer": self.strategy.optimizer_state(model, optimizer)}

    @staticmethod
    def write(tensors: dict, record: dict):
        """Nothing touches the disk before the commit: atomic_save writes and renames in one go."""
        return {**tensors, **record}, None

    @staticmethod
    def commit(state: dict, last: str, prev: Optional[str]) -> None:
        if test_hooks.ACTIVE:
            test_hooks.slow_save()
        atomic_save(state, last, previous=prev)

    @staticmethod
    def snapshot(last: str, path: str, state: dict) -> None:
        """The same content under another name: a hard link when the filesystem allows."""
        tmp = path + ".link.tmp"
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.link(last, tmp)
            os.replace(tmp, path)
        except OSError:
            atomic_save(state, path)

    @staticmethod
    def move_aside(path: str, aside: str) -> Optional[str]:
        if not os.path.exists(path):
            return None
        os.replace(path, aside)
        return aside

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def remove(path: str) -> None:
        os.unlink(path)

    @staticmethod
    def remove_stale(output_dir: str) -> None:
        remove_stale_temp_files(output_dir)

    @staticmethod
    def barrier(background: bool = False) -> None:
        """Rank 0 alone writes; the others wait here, inside the save's watchdog allowance, until it
        has (left to wait in the next step's all-reduce, a long write timed out as a hung step)."""
        if dist_util.is_dist():
            dist.barrier(group=dist_util.cpu_group())
