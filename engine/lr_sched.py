"""Learning rate: the official batch scaling rule, and the schedule (per-iteration linear warmup,
then half-cycle cosine to min_lr)."""
import logging
import math
from dataclasses import dataclass

from util import dist as dist_util

log = logging.getLogger("mae")


@dataclass(frozen=True)
class LrSchedule:
    """The schedule's numbers (those of the flags of the same names, lr resolved)."""
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int

    @classmethod
    def from_args(cls, args) -> "LrSchedule":
        return cls(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)


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


def resolve_lr(args) -> None:
    """args.lr = blr * effective batch / 256 unless --lr was given (the official scaling rule)."""
    eff_batch_size = args.batch_size * args.accum_iter * dist_util.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    log.info("base lr: %.2e", args.lr * 256 / eff_batch_size)
    log.info("actual lr: %.2e", args.lr)
    log.info("accumulate grad iterations: %d", args.accum_iter)
    log.info("effective batch size: %d", eff_batch_size)
