"""Learning rate: the schedule (per-iteration linear warmup,
then half-cycle cosine to min_lr). The official batch scaling rule is resolved with the
run's config (engine/config.py)."""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LrSchedule:
    """The schedule's numbers (those of the flags of the same names, lr resolved)."""
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int


def lr_at(epoch: float, sched) -> float:
    """epoch is fractional: epoch + iteration / iterations_per_epoch. `sched`: an LrSchedule, or
    anything with its four fields (e.g. the parsed flags)."""
    if epoch < sched.warmup_epochs:
        return sched.lr * epoch / sched.warmup_epochs
    progress = (epoch - sched.warmup_epochs) / (sched.epochs - sched.warmup_epochs)
    return sched.min_lr + (sched.lr - sched.min_lr) * 0.5 * (1. + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, sched) -> float:
    """Set every group's lr (times its lr_scale, for layer-wise decay); returns the base lr."""
    lr = lr_at(epoch, sched)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
