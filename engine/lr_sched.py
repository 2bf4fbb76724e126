"""Learning-rate schedule: per-iteration linear warmup, then half-cycle cosine to min_lr."""
import math


def lr_at(epoch: float, args) -> float:
    """epoch is fractional: epoch + iteration / iterations_per_epoch."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1. + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every group's lr (times its lr_scale, for layer-wise decay); returns the base lr."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
