"""What fine-tuning and linear probing share: the classifier, its checks, the labelled data,
evaluation on val/ after every epoch (keeping checkpoint-best) and --eval. The two recipes
(engine/finetune.py, engine/linprobe.py) differ in augmentation, optimizer, loss and what trains.
"""
import logging
from types import SimpleNamespace
from typing import Optional

import torch

from util.errors import UserError

from .checkpoint import load_model_weights, load_pretrained_encoder, read_checkpoint, recorded_args, weights_of
from .checks import check_args, check_checkpoint_path, check_launch, check_output_dirs, check_resume_file, checkpoint_bytes, warn
from .config import RunConfig
from .data import (
    check_auto_augment,
    check_batch_fits,
    eval_loader,
    source_from_args,
    to_model_input,
    train_loader,
    train_order,
)
from .evaluate import evaluate
from .model_factory import build_model
from .recipe import Built, loader_settings

log = logging.getLogger("mae")


def _has_class_token(name: str) -> bool:
    """The classifier's answer (models/base.py PretrainedClassifier), from the model with its
    defaults on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        return build_model(name, "classify").has_class_token


def _global_pool(args, linprobe: bool) -> bool:
    """The official defaults: pooled for fine-tuning, class token for probing; a model without a
    class token (MixMIM) always pools."""
    if args.global_pool is None:
        return not linprobe or not _has_class_token(args.model)
    return args.global_pool


def check_classification_args(args, linprobe: bool) -> None:
    """Flags of fine-tuning / linear probing that cannot work (no file or device access)."""
    if not linprobe and args.data_pipeline in ("uint8", "device_decode"):
        raise UserError(f"--data_pipeline {args.data_pipeline} cannot fine-tune: RandAugment and random erasing "
                        "work on PIL images; drop the flag (or use --data_pipeline pil)")
    if args.global_pool is False and not _has_class_token(args.model):
        raise UserError(f"--cls_token: {args.model} has no class token (it pools its last stage); drop the flag")
    if args.nb_classes < 1:
        raise UserError(f"--nb_classes must be at least 1, got {args.nb_classes}")
    if args.eval:
        if not args.resume:
            raise UserError("--eval needs --resume CHECKPOINT (the fine-tuned weights to evaluate)")
        return
    if linprobe:
        return
    for name, high, closed in (("drop_path", 1, False), ("smoothing", 1, False), ("reprob", 1, True),
                               ("mixup_prob", 1, True), ("mixup_switch_prob", 1, True)):
        value = getattr(args, name)
        if not (0 <= value <= high if closed else 0 <= value < high):
            raise UserError(f"--{name} must be in [0, {high}{']' if closed else ')'}, got {value}")
    for name in ("mixup", "cutmix"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name} must be 0 (off) or a positive alpha, got {getattr(args, name)}")
    if not args.layer_decay > 0:
        raise UserError(f"--layer_decay must be positive (1: no decay; official: 0.65-0.75), got {args.layer_decay}")
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.batch_size % 2:
        raise UserError(f"--mixup/--cutmix mix each batch with its reverse and need an even --batch_size, "
                        f"got {args.batch_size}")
    check_auto_augment(args.aa)


def _classifier_kwargs(args, linprobe: bool) -> dict:
    kwargs = dict(num_classes=args.nb_classes, global_pool=_global_pool(args, linprobe), img_size=args.input_size)
    if not linprobe:
        kwargs["drop_path_rate"] = args.drop_path
    return kwargs


def _check_classes(train_source, val_source, nb_classes: int) -> None:
    if train_source is not None and train_source.classes != val_source.classes:
        raise UserError(f"the class folders of {train_source.root} and {val_source.root} differ: "
                        "train/ and val/ need the same class names")
    if len(val_source.classes) > nb_classes:
        raise UserError(f"the dataset has {len(val_source.classes)} classes but --nb_classes is "
                        f"{nb_classes}: pass --nb_classes {len(val_source.classes)}")
    for source in (train_source, val_source):
        low, high = getattr(source, "label_range", None) or (0, 0)  # the sources that know it before reading
        if low < 0 or high >= nb_classes:
            raise UserError(f"the labels of {source.root} run from {low} to {high}, outside 0..{nb_classes - 1} "
                            f"(--nb_classes {nb_classes}): pass --nb_classes {high + 1} or fix the labels")


def preflight(args, world_size: int, on_this_machine: bool = True, linprobe: bool = False) -> SimpleNamespace:
    """Every check of a fine-tuning (or, linprobe=True, linear-probing) command that needs neither
    a GPU nor a process group: flags, model, data, the checkpoints given, output folders. With
    on_this_machine=False (a SLURM launcher on a submitting machine) CUDA and the launcher's
    environment are left to the job. --eval needs only val/ and --resume. args is not changed.
    Returns the plan the run reuses: the images `train_source` (None with --eval), `val_source`."""
    check_args(args)
    check_classification_args(args, linprobe)
    check_launch(args, world_size, on_this_machine)
    if args.peak_tflops is not None:  # no FLOP count of the classifiers' step (engine/flops.py counts the MAE's)
        warn(f"--peak_tflops {args.peak_tflops} is not used: TFLOP/s and MFU are reported by pretraining only")
    with torch.device("meta"):  # no memory, no initialisation
        model = build_model(args.model, "classify", **_classifier_kwargs(args, linprobe))
    patch = model.input_stride
    if args.input_size % patch:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    train_source = None
    if args.eval:  # evaluation reads val/ and --resume only, and writes nothing
        check_checkpoint_path(args.resume, "--resume")
    else:
        if args.finetune:
            check_checkpoint_path(args.finetune, "--finetune")
        check_resume_file(args)
        train_source = source_from_args(args, "train", classification=True)
        train_order(train_source, args.data_order)
    val_source = source_from_args(args, "val", classification=True)
    _check_classes(train_source, val_source, args.nb_classes)
    if not args.eval:
        check_batch_fits(train_source, args.batch_size, world_size)
        size = checkpoint_bytes(model, 1, model.head.parameters()) if linprobe else checkpoint_bytes(model)
        check_output_dirs(args, size)
    return SimpleNamespace(train_source=train_source, val_source=val_source)


def classification_loss(criterion, mixup_fn, device):
    """(model, batch) -> loss: the batch to the device, mixed by mixup_fn (when given), then criterion."""
    def compute(model, batch):
        samples = to_model_input(batch[0], device)
        targets = batch[1].to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets)
    return compute


class ClassificationRecipe:
    """The parts of a classification recipe; a subclass sets task, head_init_std, torch_rng_only and
    supplies transform(), optimizer(), compute_loss() and, if the model changes, adapt()."""
    task = "finetune"
    linprobe = False
    head_init_std = 2e-5       # the head's trunc_normal std when starting from --finetune
    torch_rng_only = False     # the training transform draws from torch alone (no RandAugment)

    def preflight(self, args, world_size: int, on_this_machine: bool = True) -> SimpleNamespace:
        return preflight(args, world_size, on_this_machine, linprobe=self.linprobe)

    def model_facts(self, args, plan, resumed: Optional[dict]) -> dict:
        return {"global_pool": _global_pool(args, self.linprobe)}

    def transform(self, cfg: RunConfig, is_train: bool):
        raise NotImplementedError

    def adapt(self, model) -> None:
        """Change the classifier after its weights are loaded (the linear probe's head)."""

    def build_model(self, cfg: RunConfig, strategy):
        """The classifier on the device (sharded under FSDP), --finetune's encoder weights loaded
        (not with --eval)."""
        m = cfg.model
        kwargs = dict(num_classes=m.nb_classes, global_pool=m.global_pool, img_size=m.input_size)
        if not self.linprobe:
            kwargs["drop_path_rate"] = m.drop_path
        model = strategy.build(lambda: build_model(m.model, "classify", **kwargs))
        if m.finetune and not cfg.eval_only:
            load_pretrained_encoder(model, m.finetune, head_init_std=self.head_init_std, model_name=m.model,
                                    strategy=strategy)
        self.adapt(model)
        log.info("number of params (M): %.2f", sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
        return model

    def loaders(self, cfg: RunConfig, plan, model):
        """(train loader, val loader); no train loader with --eval."""
        train_source, val_source = plan.train_source, plan.val_source
        order = train_order(train_source, cfg.data.data_order) if train_source is not None else "global"
        feed = loader_settings(cfg, order)
        val_loader = eval_loader(val_source, self.transform(cfg, False), feed, shard=cfg.data.dist_eval,
                                 num_classes=cfg.model.nb_classes)
        if cfg.eval_only:
            log.info("Dataset: %d val images in %d classes", len(val_source), len(val_source.classes))
            return None, val_loader
        loader = train_loader(train_source, self.transform(cfg, True), cfg.data.pipeline, feed,
                              torch_rng_only=self.torch_rng_only, num_classes=cfg.model.nb_classes)
        log.info("Dataset: %d train / %d val images in %d classes", len(train_source), len(val_source),
                 len(train_source.classes))
        return loader, val_loader

    def train_mode(self, model):
        return None

    def train_flops_per_image(self, cfg: RunConfig, plan) -> None:
        return None  # counted for pretraining only (engine/flops.py)

    def after_epoch(self, built: Built):
        """Evaluation on val/ after every epoch; the best top-1 is kept (checkpoint-best)."""
        best = {"max_accuracy": float(built.resumed.get("max_accuracy", 0.0))}
        module, log_writer = built.strategy.module(built.model), built.log_writer

        def after_epoch(epoch: int):
            stats = evaluate(module, built.val_loader, built.device, built.amp_dtype, sharded=built.cfg.data.dist_eval)
            is_best = stats["acc1"] > best["max_accuracy"]
            best["max_accuracy"] = max(best["max_accuracy"], stats["acc1"])
            log.info("Max accuracy: %.2f%%", best["max_accuracy"])
            if log_writer is not None:
                for k in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"perf/test_{k}", stats[k], epoch)
            fields = {**{f"test_{k}": v for k, v in stats.items()}, "max_accuracy": best["max_accuracy"]}
            return fields, is_best, {"max_accuracy": best["max_accuracy"]}
        return after_epoch

    @staticmethod
    def evaluate_only(cfg: RunConfig, strategy, model, val_loader, device, amp_dtype) -> None:
        """--eval: the weights of --resume on val/."""
        path = cfg.checkpoint.resume
        ckpt = read_checkpoint(path, "--resume")  # also a sharded directory, transformers / timm weights
        load_model_weights(model, weights_of(ckpt), path, recorded_args(ckpt), cfg.model.model, strategy)
        evaluate(model, val_loader, device, amp_dtype, sharded=cfg.data.dist_eval)
