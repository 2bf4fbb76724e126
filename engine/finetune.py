"""The fine-tuning recipe (and, with --eval, the evaluation of a classifier): the official
augmentation (RandAugment, random erasing, mixup/cutmix with label smoothing), AdamW with
layer-wise lr decay, the whole classifier trained. The classification parts it shares with
linear probing are engine/classification.py's; the build order is engine/recipe.py's.
"""
import logging

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .classification import ClassificationRecipe, classification_loss
from .classification import preflight as classification_preflight
from .config import AugmentConfig, RunConfig
from .data import finetune_transform
from .optim import adamw, param_groups_lrd
from .recipe import print_config as print_resolved
from .recipe import run

log = logging.getLogger("mae")


def build_mixup(aug: AugmentConfig):
    """timm's Mixup for --mixup/--cutmix/--cutmix_minmax (label smoothing folded into the mixed
    targets); None when off."""
    active = aug.mixup > 0 or aug.cutmix > 0. or aug.cutmix_minmax is not None
    if not active:
        return None
    log.info("Mixup is activated!")
    return Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                 prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                 label_smoothing=aug.smoothing, num_classes=aug.nb_classes)


class FinetuneRecipe(ClassificationRecipe):
    task = "finetune"
    linprobe = False
    head_init_std = 2e-5
    torch_rng_only = False  # RandAugment and random erasing draw from numpy and python too

    def transform(self, cfg: RunConfig, is_train: bool):
        return finetune_transform(cfg.augment, is_train)

    def optimizer(self, cfg: RunConfig, model, device):
        """AdamW over layer-wise lr decay groups; no weight decay on 1-D parameters and the names
        the model exempts (cls_token, pos_embed, ...)."""
        groups = param_groups_lrd(model, cfg.optim.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                  layer_decay=cfg.optim.layer_decay)
        return adamw(groups, cfg.optim.lr, device)

    def compute_loss(self, cfg: RunConfig, device):
        mixup_fn = build_mixup(cfg.augment)
        if mixup_fn is not None:
            criterion = SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
        elif cfg.augment.smoothing > 0.:
            criterion = LabelSmoothingCrossEntropy(smoothing=cfg.augment.smoothing)
        else:
            criterion = torch.nn.CrossEntropyLoss()
        log.info("criterion = %s", criterion)
        return classification_loss(criterion, mixup_fn, device)


def preflight(args, world_size: int, on_this_machine: bool = True):
    """Every check of a fine-tuning command before any training work (engine/classification.py)."""
    return classification_preflight(args, world_size, on_this_machine, linprobe=False)


def main(args) -> None:
    """Fine-tuning, or with --eval the evaluation of --resume."""
    run(FinetuneRecipe(), args)


def print_config(args, world_size: int) -> None:
    """--print_config for a launch of `world_size` processes (the SLURM launchers)."""
    print_resolved(FinetuneRecipe(), args, world_size)
