"""The pretraining recipe (MAE, MixMIM): what engine/recipe.py's runner needs that is pretraining's own.

Both model families take (images, mask_ratio, noise) and return (loss, pred, mask); the noise
rows come from the dataset, keyed per sample, so masks are reproducible and resume is exact.
MixMIM uses one mask per batch (from the noise of the batch's first sample) and mixes each image
with its mirror in the per-process batch, so unlike MAE its result depends on the per-process
batch composition (as in the official code), not only on the global batch.
"""
import logging
from functools import partial
from types import SimpleNamespace
from typing import Optional

import torch
from timm.optim import param_groups_weight_decay
from torch.distributed.fsdp import register_fsdp_forward_method

from util import dist as dist_util
from util.errors import UserError

from .checkpoint import may_resume
from .checks import check_args, check_launch, check_output_dirs, check_resume_file, checkpoint_bytes
from .config import RunConfig
from .data import check_batch_fits, pretrain_transform, source_from_args, to_model_input, train_loader, train_order
from .flops import train_flops_per_image
from .model_factory import build_model
from .monitor import INITIAL_KEY, Monitor, chain, monitor_hook, monitor_sources
from .optim import adamw
from .pretrain_model import build_pretrain_model, check_decoder_width, decoder_overrides
from .recipe import Built, loader_settings, run
from .recipe import print_config as print_resolved
from .visualize import fixed_batch, fixed_noise, log_reconstructions, reconstruct

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
    then left to the job). args is not changed. Returns the plan the run reuses: the training
    images (`train_source`), the model on the meta device (`meta_model`, the decoder flags not
    yet reconciled with a checkpoint) and the monitor's data (`monitor`, None when off)."""
    check_args(args)
    check_pretrain_args(args)
    check_launch(args, world_size, on_this_machine)
    overrides = decoder_overrides(args, None)
    resuming = may_resume(args.resume, args.output_dir, not args.no_auto_resume)
    if not resuming:  # when resuming, unset decoder flags come from the checkpoint: checked then
        check_decoder_width(args.model, args.input_size, overrides)
    extra = {"range_mask_ratio": args.range_mask_ratio} if args.range_mask_ratio else {}
    with torch.device("meta"):  # no memory, no initialisation
        model = build_model(args.model, "pretrain", img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                            **({} if resuming else overrides), **extra)
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")
    check_mask(args, model)
    check_resume_file(args)
    source = source_from_args(args, "train")
    train_order(source, args.data_order)
    check_batch_fits(source, args.batch_size, world_size)
    check_output_dirs(args, checkpoint_bytes(model))
    return SimpleNamespace(train_source=source, meta_model=model, monitor=monitor_sources(args))


def mae_loss(mask_ratio: float, device: torch.device):
    def compute(model, batch):
        samples, _, noise = batch
        loss, _, _ = model(to_model_input(samples, device), mask_ratio=mask_ratio,
                           noise=noise.to(device, non_blocking=True))
        return loss
    return compute


def reconstruction_hook(cfg: RunConfig, source, model, log_writer, every_rank: bool = False):
    """fit()'s after_epoch for --vis_every: on rank 0, pictures of the first 4 training images with
    fixed masks (seed 0) every N epochs and after the last; None when off. `model` is the plain
    module (not the DDP / compiled wrapper). A picture that cannot be written is a warning only.
    every_rank: the model is sharded, so every rank runs the reconstruction's forward pass with
    rank 0 (which alone draws the picture)."""
    every, epochs, size = cfg.logging.vis_every, cfg.optim.epochs, cfg.model.input_size
    mask_ratio, output_dir = cfg.model.mask_ratio, cfg.logging.output_dir
    if not every:
        return None
    inputs = None
    # Every rank decides alike whether there are pictures (the same flags, the same images).
    wanted = bool(output_dir or cfg.logging.log_dir) if every_rank else bool(output_dir or log_writer is not None)
    if every_rank and not dist_util.is_main_process():
        try:
            imgs = fixed_batch(source, size, 4, skip_unreadable=True)
        except UserError:
            return None  # rank 0 warns
        inputs = (imgs, fixed_noise(len(imgs), model.mask_noise_len, seed=0))

        def forward_only(epoch: int):
            if wanted and (epoch % every == 0 or epoch + 1 == epochs):
                reconstruct(model, inputs[0], mask_ratio, inputs[1])
            return {}, False, None
        return forward_only
    if dist_util.is_main_process() and wanted:
        try:
            imgs = fixed_batch(source, size, 4, skip_unreadable=True)
            inputs = (imgs, fixed_noise(len(imgs), model.mask_noise_len, seed=0))
        except UserError as e:
            log.warning("warning: no reconstruction pictures: %s", e)

    def after_epoch(epoch: int):
        if inputs is not None and (epoch % every == 0 or epoch + 1 == epochs):
            try:
                log_reconstructions(model, *inputs, mask_ratio, epoch, output_dir, log_writer)
            except OSError as e:
                log.warning("warning: reconstruction picture of epoch %d not written: %s", epoch, e)
        return {}, False, None
    return after_epoch


def representation_monitor(built: Built, module):
    """fit()'s after_epoch for --monitor_every (engine/monitor.py); None when off. `module` is the
    plain module; a new run measures its initial weights here, before any training."""
    cfg, sources = built.cfg, built.plan.monitor
    if sources is None:
        return None
    if built.strategy.sharded:
        # FSDP2 gathers the root's parameters around forward() only; the monitor calls this instead.
        register_fsdp_forward_method(module, "encoder_features")
    monitor = Monitor.build(sources, input_size=cfg.data.input_size, batch_size=cfg.data.batch_size,
                            device=built.device, amp_dtype=built.amp_dtype, num_workers=min(cfg.data.num_workers, 4),
                            seed=cfg.data.seed)
    log.info("Monitor: %d + %d images of %s every %d epochs", len(monitor.bank[0]), len(monitor.val[0]),
             sources.path, cfg.monitor.every)
    return monitor_hook(monitor, module, cfg.monitor.every, cfg.optim.epochs, built.log_writer,
                        initial=not built.resumed, pending=built.resumed.get(INITIAL_KEY),
                        checkpoint_state=built.checkpoint_state)


class PretrainRecipe:
    """Masked-image pretraining, any family of the model contract (models/base.py
    MaskedImageModel: MAE, MixMIM): the masked loss on sample-keyed crops and masks, AdamW."""
    task = "pretrain"

    @staticmethod
    def preflight(args, world_size: int, on_this_machine: bool = True) -> SimpleNamespace:
        return preflight(args, world_size, on_this_machine)

    @staticmethod
    def model_facts(args, plan, resumed: Optional[dict]) -> dict:
        """The decoder (the flags, or those the resumed checkpoint records) and the model's default
        mask ratio, from the model built on the meta device."""
        decoder = decoder_overrides(args, resumed)
        with torch.device("meta"):  # no memory, no initialisation
            model = build_pretrain_model(args.model, args.input_size, args.norm_pix_loss, args.range_mask_ratio,
                                         decoder)
        return {"decoder": decoder, "decoder_arch": model.decoder_arch,
                "default_mask_ratio": model.default_mask_ratio}

    @staticmethod
    def build_model(cfg: RunConfig, strategy):
        m = cfg.model
        model = strategy.build(partial(build_pretrain_model, m.model, m.input_size, m.norm_pix_loss,
                                       m.range_mask_ratio, dict(m.decoder)))
        log.info("Decoder: %s", ", ".join(f"{k}={v}" for k, v in model.decoder_arch.items()))
        return model

    @staticmethod
    def loaders(cfg: RunConfig, plan, model):
        source, pipeline = plan.train_source, cfg.data.pipeline
        loader = train_loader(source, pretrain_transform(cfg.data.input_size, pipeline), pipeline,
                              loader_settings(cfg, train_order(source, cfg.data.data_order)),
                              noise_len=model.mask_noise_len, torch_rng_only=True)
        log.info("Dataset: %d images in %d classes under %s", len(source), len(source.classes), source.root)
        return loader, None

    @staticmethod
    def optimizer(cfg: RunConfig, model, device):
        # Weight decay on all but biases and norm weights (1-D) and the names the model exempts;
        # the official recipe keeps it on cls_token and mask_token.
        param_groups = param_groups_weight_decay(model, cfg.optim.weight_decay)
        return adamw(param_groups, cfg.optim.lr, device, betas=(0.9, 0.95))

    @staticmethod
    def compute_loss(cfg: RunConfig, device):
        return mae_loss(cfg.model.mask_ratio, device)

    @staticmethod
    def train_mode(model):
        return None

    @staticmethod
    def train_flops_per_image(cfg: RunConfig, plan) -> int:
        m = cfg.model
        with torch.device("meta"):  # the run's decoder (flags or checkpoint), without memory
            model = build_pretrain_model(m.model, m.input_size, m.norm_pix_loss, m.range_mask_ratio, dict(m.decoder))
        return train_flops_per_image(model, m.mask_ratio, m.input_size)

    @staticmethod
    def after_epoch(built: Built):
        module = built.strategy.module(built.model)
        pictures = reconstruction_hook(built.cfg, built.plan.train_source, module, built.log_writer,
                                       every_rank=built.strategy.sharded)
        return chain([pictures, representation_monitor(built, module)])


def main(args) -> None:
    run(PretrainRecipe(), args)


def print_config(args, world_size: int) -> None:
    """--print_config for a launch of `world_size` processes (the SLURM launchers)."""
    print_resolved(PretrainRecipe(), args, world_size)
