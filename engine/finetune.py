"""End-to-end fine-tuning and linear probing of MAE encoders, with evaluation.

Both run on the pretraining engine: the same runtime set-up, sample-keyed data, epoch loop,
checkpoints and exact resume. They differ in augmentation, optimizer and what is trained.
"""
import logging
from types import SimpleNamespace

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from util import dist as dist_util
from util.errors import UserError

from . import checkpoint as ckpt_lib
from .checks import (
    check_args,
    check_checkpoint_path,
    check_launch,
    check_output_dirs,
    check_resume_file,
    checkpoint_bytes,
    drop_future_resume,
)
from .data import (
    LoaderSettings,
    check_auto_augment,
    check_batch_fits,
    eval_loader,
    finetune_transform,
    linprobe_transform,
    source_from_args,
    to_model_input,
    train_loader,
    train_order,
)
from .distributed import strategy_from_args
from .evaluate import evaluate
from .launch.preemption import StopRequest
from .lr_sched import resolve_lr
from .model_factory import build_model
from .optim import LARS, adamw, param_groups_lrd
from .precision import resolve_amp
from .runtime import setup_runtime
from .trainer import TrainingRun, fit
from .training_setup import start_training

log = logging.getLogger("mae")


def build_mixup(args):
    active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if not active:
        return None
    log.info("Mixup is activated!")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def classification_loss(criterion, mixup_fn, device):
    def compute(model, batch):
        samples = to_model_input(batch[0], device)
        targets = batch[1].to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets)
    return compute


def make_linear_probe(model) -> None:
    """Official linear probe: BatchNorm (no affine) before the linear head; only the head trains."""
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True


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


def _check_classes(train_folder, val_folder, nb_classes: int) -> None:
    if train_folder is not None and train_folder.classes != val_folder.classes:
        raise UserError(f"the class folders of {train_folder.root} and {val_folder.root} differ: "
                        "train/ and val/ need the same class names")
    if len(val_folder.classes) > nb_classes:
        raise UserError(f"the dataset has {len(val_folder.classes)} classes but --nb_classes is "
                        f"{nb_classes}: pass --nb_classes {len(val_folder.classes)}")


def preflight(args, world_size: int, on_this_machine: bool = True, linprobe: bool = False) -> SimpleNamespace:
    """Every check of a fine-tuning (or, linprobe=True, linear-probing) command that needs neither
    a GPU nor a process group: flags, model, data, the checkpoints given, output folders. With
    on_this_machine=False (a SLURM launcher on a submitting machine) CUDA and the launcher's
    environment are left to the job. --eval needs only val/ and --resume. args is not changed.
    Returns the dataset listings main() reuses: `train_folder` (None with --eval), `val_folder`."""
    check_args(args)
    check_classification_args(args, linprobe)
    check_launch(args, world_size, on_this_machine)
    with torch.device("meta"):  # no memory, no initialisation
        model = build_model(args.model, "classify", **_classifier_kwargs(args, linprobe))
    patch = model.input_stride
    if args.input_size % patch:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    train_folder = None
    if args.eval:  # evaluation reads val/ and --resume only, and writes nothing
        check_checkpoint_path(args.resume, "--resume")
    else:
        if args.finetune:
            check_checkpoint_path(args.finetune, "--finetune")
        check_resume_file(args)
        train_folder = source_from_args(args, "train", classification=True)
        train_order(train_folder, args.data_order)
    val_folder = source_from_args(args, "val", classification=True)
    _check_classes(train_folder, val_folder, args.nb_classes)
    if not args.eval:
        check_batch_fits(train_folder, args.batch_size, world_size)
        size = checkpoint_bytes(model, 1, model.head.parameters()) if linprobe else checkpoint_bytes(model)
        check_output_dirs(args, size)
    return SimpleNamespace(train_folder=train_folder, val_folder=val_folder)


def linprobe_preflight(args, world_size: int, on_this_machine: bool = True) -> SimpleNamespace:
    """preflight() of a linear-probing command (main_linprobe.py)."""
    return preflight(args, world_size, on_this_machine, linprobe=True)


def main(args, linprobe: bool = False) -> None:
    """Fine-tuning (linprobe=True: linear probing), or with --eval the evaluation of --resume."""
    plan = preflight(args, dist_util.launched_world_size(args), linprobe=linprobe)
    args.global_pool = _global_pool(args, linprobe)
    if not args.eval:
        drop_future_resume(args)
    device = setup_runtime(args, make_output_dir=not args.eval)
    strategy = strategy_from_args(args, device)
    loader, val_loader = _data(args, plan, device, linprobe)
    model = _model(args, strategy, linprobe)
    amp_dtype = resolve_amp(args.amp, device)
    if args.eval:
        _evaluate_only(args, strategy, model, val_loader, device, amp_dtype)
    else:
        resolve_lr(args)
        optimizer, compute_loss = _optimizer_and_loss(args, model, device, linprobe)
        _train(args, strategy, model, optimizer, compute_loss, loader, val_loader, device, amp_dtype, linprobe)
    dist_util.cleanup()


def _data(args, plan, device, linprobe: bool):
    """(train loader, val loader); no train loader with --eval."""
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    train_folder, val_folder = plan.train_folder, plan.val_folder
    pipeline = args.data_pipeline or ("uint8" if linprobe else "pil")
    make_transform = (lambda train: linprobe_transform(args.input_size, train, pipeline)) if linprobe else \
        (lambda train: finetune_transform(args, train))
    order = train_order(train_folder, args.data_order) if train_folder is not None else "global"
    feed = LoaderSettings(args.batch_size, args.seed, args.num_workers, args.pin_mem and device.type == "cuda",
                          world, rank, order, args.shuffle_shards)
    val_loader = eval_loader(val_folder, make_transform(False), feed, shard=args.dist_eval)
    loader = None
    if args.eval:
        log.info("Dataset: %d val images in %d classes", len(val_folder), len(val_folder.classes))
    else:
        # RandAugment and random erasing draw from numpy and python too; the other transforms from torch only.
        loader = train_loader(train_folder, make_transform(True), pipeline, feed, torch_rng_only=linprobe)
        log.info("Dataset: %d train / %d val images in %d classes", len(train_folder), len(val_folder),
                 len(train_folder.classes))
    return loader, val_loader


def _model(args, strategy, linprobe: bool):
    """The classifier on the device (sharded under FSDP): --finetune's encoder weights (not with
    --eval), for linear probing frozen under a BatchNorm head."""
    model = strategy.build(lambda: build_model(args.model, "classify", **_classifier_kwargs(args, linprobe)))
    if args.finetune and not args.eval:
        ckpt_lib.load_pretrained_encoder(model, args.finetune, head_init_std=0.01 if linprobe else 2e-5,
                                         model_name=args.model, strategy=strategy)
    if linprobe:
        make_linear_probe(model)
    model.to(strategy.device)  # under FSDP only the linear probe's new BatchNorm head moves
    log.info("Model = %s", model)
    log.info("number of params (M): %.2f", sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6)
    return model


def _evaluate_only(args, strategy, model, val_loader, device, amp_dtype) -> None:
    """--eval: the weights of --resume on val/."""
    ckpt = ckpt_lib.read_checkpoint(args.resume, "--resume")  # also a sharded directory, transformers / timm weights
    ckpt_lib.load_model_weights(model, ckpt.get("model", ckpt_lib.weights_of(ckpt)), args.resume, ckpt_lib.recorded_args(ckpt),
                                args.model, strategy)
    evaluate(model, val_loader, device, amp_dtype, sharded=args.dist_eval)


def _optimizer_and_loss(args, model, device, linprobe: bool):
    """(optimizer, compute_loss): the official choices, LARS on the head for linear probing, AdamW
    with layer-wise lr decay for fine-tuning, whose loss takes mixup/cutmix and label smoothing."""
    if linprobe:
        optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        groups = param_groups_lrd(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                  layer_decay=args.layer_decay)
        optimizer = adamw(groups, args.lr, device)
    log.info("Optimizer: %s", type(optimizer).__name__)

    mixup_fn = None if linprobe else build_mixup(args)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    elif not linprobe and args.smoothing > 0.:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    log.info("criterion = %s", criterion)
    return optimizer, classification_loss(criterion, mixup_fn, device)


def _train(args, strategy, model, optimizer, compute_loss, loader, val_loader, device, amp_dtype,
           linprobe: bool) -> None:
    """Resume (a finished run has nothing to do), then the epochs, each followed by an evaluation
    on val/ that keeps checkpoint-best.pth."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    unreadable = []
    found = ckpt_lib.find_resume_checkpoint(args.resume, args.output_dir, not args.no_auto_resume, strategy.sharded,
                                            unreadable)
    best = {"max_accuracy": float(found.get("max_accuracy", 0.0)) if found else 0.0}
    started = start_training(args, strategy, model, optimizer, scaler, found, unreadable)
    del found  # its tensors (optimizer state too) must not stay in memory for the whole run
    if started is None:
        return
    train_model, checkpointer, log_writer = started.model, started.checkpointer, started.log_writer

    def after_epoch(epoch: int):
        stats = evaluate(strategy.module(train_model), val_loader, device, amp_dtype, sharded=args.dist_eval)
        is_best = stats["acc1"] > best["max_accuracy"]
        best["max_accuracy"] = max(best["max_accuracy"], stats["acc1"])
        log.info("Max accuracy: %.2f%%", best["max_accuracy"])
        if log_writer is not None:
            for k in ("acc1", "acc5", "loss"):
                log_writer.add_scalar(f"perf/test_{k}", stats[k], epoch)
        fields = {**{f"test_{k}": v for k, v in stats.items()}, "max_accuracy": best["max_accuracy"]}
        return fields, is_best, {"max_accuracy": best["max_accuracy"]}

    def linprobe_train_mode():  # frozen encoder in eval mode; the BatchNorm head learns its statistics
        model.eval()
        model.head.train()

    run = TrainingRun.from_args(args, model=train_model, strategy=strategy, compute_loss=compute_loss,
                                optimizer=optimizer, scaler=scaler, device=device, amp_dtype=amp_dtype, loader=loader,
                                checkpointer=checkpointer, log_writer=log_writer,
                                train_mode=linprobe_train_mode if linprobe else None, stop=StopRequest().install())
    fit(run, started.pos, after_epoch)


def linprobe_main(args) -> None:
    main(args, linprobe=True)
