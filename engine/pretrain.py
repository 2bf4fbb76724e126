"""MAE / MixMIM pretraining: set up data, model, optimizer and checkpoints, then run the epochs.

Both model families take (images, mask_ratio, noise) and return (loss, pred, mask); the noise
rows come from the dataset, keyed per sample, so masks are reproducible and resume is exact.
MixMIM uses one mask per batch (from the noise of the batch's first sample) and mixes each image
with its mirror in the per-process batch, so unlike MAE its result depends on the per-process
batch composition (as in the official code), not only on the global batch.
"""
import json
import logging
import os
from functools import partial
from types import SimpleNamespace

import torch
from timm.optim import param_groups_weight_decay

from util import dist as dist_util
from util.errors import UserError

from . import checkpoint as ckpt_lib
from .checks import check_args, check_launch, check_output_dirs, check_resume_file, checkpoint_bytes, drop_future_resume
from .data import (
    LoaderSettings,
    check_batch_fits,
    pretrain_transform,
    source_from_args,
    to_model_input,
    train_loader,
    train_order,
)
from .distributed import strategy_from_args
from .launch.preemption import StopRequest
from .lr_sched import resolve_lr
from .model_factory import build_model
from .optim import adamw
from .precision import resolve_amp
from .pretrain_model import build_pretrain_model, check_decoder_width, decoder_overrides
from .runtime import setup_runtime
from .trainer import TrainingRun, fit
from .training_setup import start_training

log = logging.getLogger("mae")


def check_pretrain_args(args) -> None:
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if not args.range_mask_ratio >= 0:
        raise UserError(f"--range_mask_ratio must be 0 or more, got {args.range_mask_ratio}")
    if args.range_mask_ratio:
        with torch.device("meta"):  # the family's answer, without memory or initialisation
            takes_it = build_model(args.model, "pretrain").takes_range_mask_ratio
        if not takes_it:
            raise UserError(f"--range_mask_ratio is a MixMIM option: --model {args.model} masks a fixed "
                            "--mask_ratio; drop the flag")
    if args.vis_every < 0:
        raise UserError(f"--vis_every must be 0 (off) or a number of epochs, got {args.vis_every}")


def check_mask(args, model) -> None:
    """The mask removes at least one patch and leaves at least one visible, as the model rounds it
    (models/base.py MaskedImageModel.mask_counts)."""
    ratio = args.mask_ratio if args.mask_ratio is not None else model.default_mask_ratio
    counts = model.mask_counts(ratio)
    removed, kept = counts.removed, counts.kept
    what = "replaced" if model.mixes_images else "removed"
    if args.range_mask_ratio:
        what += " (with --range_mask_ratio at its maximum)"
    where = f"of the {counts.length} {counts.unit} at --input_size {args.input_size}"
    if removed < 1:
        raise UserError(f"--mask_ratio {ratio} masks no patch {where}: raise --mask_ratio or --input_size")
    if kept < 1:
        raise UserError(f"--mask_ratio {ratio} leaves no visible patch {where} (all are {what}): lower "
                        f"--mask_ratio{' or --range_mask_ratio' if args.range_mask_ratio else ''}, or raise "
                        "--input_size")


def preflight(args, world_size: int, on_this_machine: bool = True) -> SimpleNamespace:
    """Every check of a pretraining command that needs neither a GPU nor a process group, so that
    bad input fails before any training work (and, called by a SLURM launcher with
    on_this_machine=False, before the job is submitted: CUDA and the launcher's environment are
    then left to the job). args is not changed. Returns what main() reuses: the dataset listing
    (`train_folder`) and the model on the meta device (`meta_model`, the decoder flags not yet
    reconciled with a checkpoint)."""
    check_args(args)
    check_pretrain_args(args)
    check_launch(args, world_size, on_this_machine)
    overrides = decoder_overrides(args, None)
    resuming = ckpt_lib.may_resume(args.resume, args.output_dir, not args.no_auto_resume)
    if not resuming:  # when resuming, unset decoder flags come from the checkpoint: checked then
        check_decoder_width(args, overrides)
    extra = {"range_mask_ratio": args.range_mask_ratio} if args.range_mask_ratio else {}
    with torch.device("meta"):  # no memory, no initialisation
        model = build_model(args.model, "pretrain", img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                            **({} if resuming else overrides), **extra)
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")
    check_mask(args, model)
    check_resume_file(args)
    folder = source_from_args(args, "train")
    train_order(folder, args.data_order)
    check_batch_fits(folder, args.batch_size, world_size)
    check_output_dirs(args, checkpoint_bytes(model))
    return SimpleNamespace(train_folder=folder, meta_model=model)


def mae_loss(mask_ratio: float, device: torch.device):
    def compute(model, batch):
        samples, _, noise = batch
        loss, _, _ = model(to_model_input(samples, device), mask_ratio=mask_ratio,
                           noise=noise.to(device, non_blocking=True))
        return loss
    return compute


def reconstruction_hook(args, folder, model, log_writer, every_rank: bool = False):
    """fit()'s after_epoch for --vis_every: on rank 0, pictures of the first 4 training images with
    fixed masks (seed 0) every N epochs and after the last; None when off. `model` is the plain
    module (not the DDP / compiled wrapper). A picture that cannot be written is a warning only.
    every_rank: the model is sharded, so every rank runs the reconstruction's forward pass with
    rank 0 (which alone draws the picture)."""
    every = args.vis_every
    if not every:
        return None
    from .visualize import fixed_batch, fixed_noise, log_reconstructions, reconstruct
    inputs = None
    # Every rank decides alike whether there are pictures (the same flags, the same images).
    wanted = bool(args.output_dir or args.log_dir) if every_rank else bool(args.output_dir or log_writer is not None)
    if every_rank and not dist_util.is_main_process():
        try:
            imgs = fixed_batch(folder, args.input_size, 4, skip_unreadable=True)
        except UserError:
            return None  # rank 0 warns
        inputs = (imgs, fixed_noise(len(imgs), model.mask_noise_len, seed=0))

        def forward_only(epoch: int):
            if wanted and (epoch % every == 0 or epoch + 1 == args.epochs):
                reconstruct(model, inputs[0], args.mask_ratio, inputs[1])
            return {}, False, None
        return forward_only
    if dist_util.is_main_process() and wanted:
        try:
            imgs = fixed_batch(folder, args.input_size, 4, skip_unreadable=True)
            inputs = (imgs, fixed_noise(len(imgs), model.mask_noise_len, seed=0))
        except UserError as e:
            log.warning("warning: no reconstruction pictures: %s", e)

    def after_epoch(epoch: int):
        if inputs is not None and (epoch % every == 0 or epoch + 1 == args.epochs):
            try:
                log_reconstructions(model, *inputs, args.mask_ratio, epoch, args.output_dir, log_writer)
            except OSError as e:
                log.warning("warning: reconstruction picture of epoch %d not written: %s", epoch, e)
        return {}, False, None
    return after_epoch


def main(args) -> None:
    plan = preflight(args, dist_util.launched_world_size(args))
    drop_future_resume(args)
    device = setup_runtime(args)
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    log.info("job dir: %s", os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    log.info("%s", json.dumps(ckpt_lib.plain_args(args), indent=1))

    # The checkpoint to resume is read first: its recorded decoder fills unset --decoder_* flags.
    strategy = strategy_from_args(args, device)
    unreadable = []
    found = ckpt_lib.find_resume_checkpoint(args.resume, args.output_dir, not args.no_auto_resume, strategy.sharded,
                                            unreadable)
    model = strategy.build(partial(build_pretrain_model, args, found))
    if args.mask_ratio is None:
        args.mask_ratio = model.default_mask_ratio

    folder = plan.train_folder
    pipeline = args.data_pipeline or "uint8"
    feed = LoaderSettings(args.batch_size, args.seed, args.num_workers, args.pin_mem and device.type == "cuda",
                          world, rank, train_order(folder, args.data_order), args.shuffle_shards)
    loader = train_loader(folder, pretrain_transform(args.input_size, pipeline), pipeline, feed,
                          noise_len=model.mask_noise_len, torch_rng_only=True)
    log.info("Dataset: %d images in %d classes under %s", len(folder), len(folder.classes), folder.root)

    model.to(device)  # already there under FSDP (built sharded on the device)
    log.info("Model = %s", model)
    resolve_lr(args)

    # Weight decay on all but biases and norm weights (1-D); the official recipe keeps it on
    # cls_token and mask_token.
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    optimizer = adamw(param_groups, args.lr, device, betas=(0.9, 0.95))
    amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info("Optimizer: AdamW (fused), autocast: %s, strategy: %s", amp_dtype or "off (fp32)", strategy.name)

    started = start_training(args, strategy, model, optimizer, scaler, found, unreadable)
    del found  # its tensors (optimizer state too) must not stay in memory for the whole run
    if started is None:
        dist_util.cleanup()
        return
    compute_loss = mae_loss(args.mask_ratio, device)
    run = TrainingRun.from_args(args, model=started.model, strategy=strategy, compute_loss=compute_loss,
                                optimizer=optimizer, scaler=scaler, device=device, amp_dtype=amp_dtype, loader=loader,
                                checkpointer=started.checkpointer, log_writer=started.log_writer,
                                stop=StopRequest().install())
    fit(run, started.pos, after_epoch=reconstruction_hook(args, folder, strategy.module(started.model),
                                                          started.log_writer, every_rank=strategy.sharded))
    dist_util.cleanup()
