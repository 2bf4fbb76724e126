"""The linear-probing recipe (official FINETUNE.md, "Linear Probing"): the encoder frozen in eval mode, a BatchNorm
(no affine) before the linear head, LARS on the head, random resized crop and flip only. The
classification parts it shares with fine-tuning are engine/classification.py's.
"""
import logging

import torch

from .classification import ClassificationRecipe, classification_loss
from .classification import preflight as classification_preflight
from .config import RunConfig
from .data import linprobe_transform
from .optim import LARS
from .recipe import print_config as print_resolved
from .recipe import run

log = logging.getLogger("mae")


def make_linear_probe(model) -> None:
    """Official linear probe: BatchNorm (no affine) before the linear head; only the head trains."""
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True


class LinprobeRecipe(ClassificationRecipe):
    task = "linprobe"
    linprobe = True
    head_init_std = 0.01
    torch_rng_only = True

    def transform(self, cfg: RunConfig, is_train: bool):
        return linprobe_transform(cfg.data.input_size, is_train, cfg.data.pipeline)

    def adapt(self, model) -> None:
        make_linear_probe(model)

    def optimizer(self, cfg: RunConfig, model, device):
        return LARS(model.head.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def compute_loss(self, cfg: RunConfig, device):
        criterion = torch.nn.CrossEntropyLoss()
        log.info("criterion = %s", criterion)
        return classification_loss(criterion, None, device)

    def train_mode(self, model):
        def linprobe_train_mode():  # frozen encoder in eval mode; the BatchNorm head learns its statistics
            model.eval()
            model.head.train()
        return linprobe_train_mode


def preflight(args, world_size: int, on_this_machine: bool = True):
    """Every check of a linear-probing command before any training work (engine/classification.py)."""
    return classification_preflight(args, world_size, on_this_machine, linprobe=True)


def main(args) -> None:
    run(LinprobeRecipe(), args)


def print_config(args, world_size: int) -> None:
    """--print_config for a launch of `world_size` processes (the SLURM launchers)."""
    print_resolved(LinprobeRecipe(), args, world_size)
