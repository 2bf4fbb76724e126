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

import torch
from timm.optim import param_groups_weight_decay

from util import dist as dist_util
from util.errors import UserError

from . import checkpoint as ckpt_lib
from .data import KeyedSamples, build_loader, image_folder, pretrain_transform
from .mae_model import build_mae
from .optim import adamw
from .preemption import StopRequest
from .runtime import make_log_writer, resolve_amp, resolve_lr, setup_runtime, wrap_for_training
from .trainer import TrainingRun, fit
from .uint8_pipeline import to_model_input

log = logging.getLogger("mae")


def check_pretrain_args(args) -> None:
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if not args.range_mask_ratio >= 0:
        raise UserError(f"--range_mask_ratio must be 0 or more, got {args.range_mask_ratio}")
    if args.range_mask_ratio and not args.model.startswith("mixmim"):
        raise UserError(f"--range_mask_ratio is a MixMIM option: --model {args.model} masks a fixed "
                        "--mask_ratio; drop the flag")
    if args.vis_every < 0:
        raise UserError(f"--vis_every must be 0 (off) or a number of epochs, got {args.vis_every}")


def mae_loss(mask_ratio: float, device: torch.device):
    def compute(model, batch):
        samples, _, noise = batch
        loss, _, _ = model(to_model_input(samples, device), mask_ratio=mask_ratio,
                           noise=noise.to(device, non_blocking=True))
        return loss
    return compute


def reconstruction_hook(args, folder, model, log_writer):
    """fit()'s after_epoch for --vis_every: on rank 0, pictures of the first 4 training images with
    fixed masks (seed 0) every N epochs and after the last; None when off. `model` is the plain
    module (not the DDP / compiled wrapper). A picture that cannot be written is a warning only."""
    every = args.vis_every
    if not every:
        return None
    from .visualize import fixed_batch, fixed_noise, log_reconstructions
    inputs = None
    if dist_util.is_main_process() and (args.output_dir or log_writer is not None):
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
    check_pretrain_args(args)
    device = setup_runtime(args)
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    log.info("job dir: %s", os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    log.info("%s", json.dumps(ckpt_lib.plain_args(args), indent=1))

    # The checkpoint to resume is read first: its recorded decoder fills unset --decoder_* flags.
    found = ckpt_lib.find_resume_checkpoint(args)
    model = build_mae(args, found)
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")
    if args.mask_ratio is None:
        args.mask_ratio = model.default_mask_ratio
    if args.mask_ratio * model.mask_noise_len < 1:
        raise UserError(f"--mask_ratio {args.mask_ratio} masks no patch of the {model.mask_noise_len} at "
                        f"--input_size {args.input_size}: raise one of them")

    folder = image_folder(args.data_path, "train")
    pipeline = args.data_pipeline or "uint8"
    dataset = KeyedSamples(folder, pretrain_transform(args.input_size, pipeline), args.seed,
                           model.mask_noise_len, pipeline, torch_rng_only=True)
    loader = build_loader(dataset, args.batch_size, world, rank, args.seed, args.num_workers,
                          args.pin_mem and device.type == "cuda")
    log.info("Dataset: %d images in %d classes under %s", len(folder), len(folder.classes), folder.root)

    model.to(device)
    log.info("Model = %s", model)
    resolve_lr(args)

    # Weight decay on all but biases and norm weights (1-D); the official recipe keeps it on
    # cls_token and mask_token.
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    optimizer = adamw(param_groups, args.lr, device, betas=(0.9, 0.95))
    amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info("Optimizer: AdamW (fused), autocast: %s", amp_dtype or "off (fp32)")

    pos = ckpt_lib.resume(found, model, optimizer, scaler, args)
    del found  # its tensors (optimizer state too) must not stay in memory for the whole run
    checkpointer = ckpt_lib.Checkpointer(args.output_dir, model, optimizer, scaler, args, args.keep_last)

    log_writer = make_log_writer(args)
    run = TrainingRun(model=wrap_for_training(model, args, device), compute_loss=mae_loss(args.mask_ratio, device),
                      loader=loader, optimizer=optimizer, scaler=scaler, checkpointer=checkpointer, device=device,
                      amp_dtype=amp_dtype, log_writer=log_writer, stop=StopRequest().install())
    fit(run, args, pos, after_epoch=reconstruction_hook(args, folder, model, log_writer))
    dist_util.cleanup()
