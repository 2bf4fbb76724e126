"""MAE pretraining: set up data, model, optimizer and checkpoints, then run the epochs."""
import datetime
import json
import logging
import os
import time

import torch
from timm.optim import param_groups_weight_decay

import models
from util import dist as dist_util
from util.errors import UserError
from util.rng import seed_everything

from . import checkpoint as ckpt_lib
from .data import KeyedSamples, build_loader, image_folder, iters_per_epoch, pretrain_transform
from .trainer import EpochContext, train_one_epoch

log = logging.getLogger("mae")


def resolve_amp(amp, device: torch.device):
    """--amp -> autocast dtype (None: full fp32)."""
    if amp is None:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def check_args(args) -> None:
    """Flag combinations that cannot work, reported before any work is done."""
    for name in ("batch_size", "accum_iter", "epochs", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.save_every < 1:
        raise UserError(f"--save_every must be at least 1, got {args.save_every}")
    if args.save_every_steps < 0 or args.save_every_steps % args.accum_iter:
        raise UserError(f"--save_every_steps {args.save_every_steps} must be a multiple of --accum_iter "
                        f"{args.accum_iter}: checkpoints are written between optimizer steps")
    if not 0 < getattr(args, "mask_ratio", 0.5) < 1:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume {args.resume} does not exist: give the path of a checkpoint file")


def setup_runtime(args) -> torch.device:
    """Process group, logging, seeds and backend switches; returns the device."""
    check_args(args)
    dist_util.init_distributed_mode(args)
    dist_util.setup_logging()
    device = torch.device(args.device)
    seed_everything(args.seed + dist_util.get_rank())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.output_dir and dist_util.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    return device


def mae_loss(mask_ratio: float, device: torch.device):
    def compute(model, batch):
        samples, _, noise = batch
        loss, _, _ = model(samples.to(device, non_blocking=True), mask_ratio=mask_ratio,
                           noise=noise.to(device, non_blocking=True))
        return loss
    return compute


def main(args) -> None:
    device = setup_runtime(args)
    world, rank = dist_util.get_world_size(), dist_util.get_rank()
    log.info("job dir: %s", os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    log.info("%s", json.dumps(ckpt_lib.plain_args(args), indent=1))

    try:
        model = models.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")

    folder = image_folder(args.data_path, "train")
    dataset = KeyedSamples(folder, pretrain_transform(args.input_size), args.seed, model.patch_embed.num_patches)
    loader = build_loader(dataset, args.batch_size, world, rank, args.seed, args.num_workers,
                          args.pin_mem and device.type == "cuda")
    epoch_iters = iters_per_epoch(loader)
    log.info("Dataset: %d images in %d classes under %s", len(folder), len(folder.classes), folder.root)

    model.to(device)
    log.info("Model = %s", model)
    eff_batch_size = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    log.info("base lr: %.2e", args.lr * 256 / eff_batch_size)
    log.info("actual lr: %.2e", args.lr)
    log.info("accumulate grad iterations: %d", args.accum_iter)
    log.info("effective batch size: %d", eff_batch_size)

    # Weight decay on all but biases and norm weights (1-D); the official recipe keeps it on
    # cls_token and mask_token.
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info("Optimizer: AdamW%s, autocast: %s", " (fused)" if device.type == "cuda" else "",
             amp_dtype or "off (fp32)")

    pos = ckpt_lib.resume(ckpt_lib.find_resume_checkpoint(args), model, optimizer, scaler, args)
    checkpointer = ckpt_lib.Checkpointer(args.output_dir, model, optimizer, scaler, args, args.keep_last)

    train_model = torch.compile(model) if args.compile else model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    log_writer = None
    if rank == 0 and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only rank 0 needs it
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir)

    global_batch = args.batch_size * world
    compute_loss = mae_loss(args.mask_ratio, device)
    log.info("Start training for %d epochs (%d iterations each)", args.epochs, epoch_iters)
    start_time = time.time()
    for epoch in range(pos.epoch, args.epochs):
        start_sample = pos.samples_in_epoch if epoch == pos.epoch else 0
        loader.sampler.set_epoch(epoch, start_sample)

        def save_mid_epoch(done: int, epoch=epoch, start_sample=start_sample):
            start_iter = start_sample // global_batch
            checkpointer.save(epoch, done, epoch_iters, start_sample + (done - start_iter) * global_batch)

        ctx = EpochContext(device=device, epoch=epoch, epoch_iters=epoch_iters,
                           start_iter=start_sample // global_batch, amp_dtype=amp_dtype,
                           log_writer=log_writer, save_checkpoint=save_mid_epoch,
                           save_every_steps=args.save_every_steps)
        stats = train_one_epoch(train_model, compute_loss, loader, optimizer, scaler, args, ctx)

        numbered = epoch % args.save_every == 0 or epoch + 1 == args.epochs
        checkpointer.save(epoch, epoch_iters, epoch_iters, epoch_iters * global_batch, numbered=numbered)
        if args.output_dir and rank == 0:
            if log_writer is not None:
                log_writer.flush()
            record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
            with open(os.path.join(args.output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    log.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
    if log_writer is not None:
        log_writer.close()
    dist_util.cleanup()
