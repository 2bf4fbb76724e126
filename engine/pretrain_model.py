"""The model of a pretraining run (any masked-image model: MAE, MixMIM): --model at --input_size,
plus the decoder flags of the MAE paper's ablations (Table 1a/1b: --decoder_depth,
--decoder_embed_dim, --decoder_num_heads).

An unset flag means the model's own decoder. A resumed run must rebuild the decoder its weights
were trained with, so the checkpoint's recorded values fill the unset flags, and a flag that
contradicts them is an error (the weights would not load into that decoder). Once the model is
built, args holds the effective values; every checkpoint records them ('args'), so resumes and
scripts/visualize.py rebuild the same decoder. --finetune drops the decoder whatever its size.
"""
import logging
from typing import Optional

import torch

from util.errors import UserError

from .checkpoint import recorded_args
from .model_factory import build_model

log = logging.getLogger("mae")

DECODER_FLAGS = ("decoder_depth", "decoder_embed_dim", "decoder_num_heads")


def decoder_kwargs(saved: dict) -> dict:
    """The decoder arguments recorded in a checkpoint's args (none for older or official ones)."""
    return {k: int(saved[k]) for k in DECODER_FLAGS if saved.get(k) is not None}


def decoder_overrides(args, ckpt: Optional[dict]) -> dict:
    """The decoder arguments for the model factory: the flags given, plus on resume the values the
    checkpoint records for the flags not given (args is updated to them)."""
    for flag in DECODER_FLAGS:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if ckpt is not None:
        path, adopted = ckpt["_path"], {}
        for flag, saved in decoder_kwargs(recorded_args(ckpt)).items():
            given = getattr(args, flag)
            if given is None:
                setattr(args, flag, saved)
                adopted[flag] = saved
            elif given != saved:
                new_run = "drop --resume" if args.resume else "use another --output_dir (or --no_auto_resume)"
                raise UserError(f"--{flag} {given} conflicts with {flag}={saved} recorded in {path}, the "
                                f"checkpoint this run resumes: drop the flag to continue it, or {new_run} "
                                "for a new run")
        if adopted:
            log.info("Decoder as recorded in %s: %s", path, ", ".join(f"{k}={v}" for k, v in adopted.items()))
    return {flag: getattr(args, flag) for flag in DECODER_FLAGS if getattr(args, flag) is not None}


def check_decoder_width(args, overrides: dict) -> None:
    """--decoder_embed_dim must split into --decoder_num_heads heads; a value not given is the model's."""
    if "decoder_embed_dim" not in overrides and "decoder_num_heads" not in overrides:
        return
    dim, heads = overrides.get("decoder_embed_dim"), overrides.get("decoder_num_heads")
    if dim is None or heads is None:
        with torch.device("meta"):  # the model's own decoder: no memory, no initialisation
            own = build_model(args.model, "pretrain", img_size=args.input_size).decoder_arch
        dim, heads = dim or own["decoder_embed_dim"], heads or own["decoder_num_heads"]
    if dim % heads:
        default = {k: "" if k in overrides else f" ({args.model}'s default)"
                   for k in ("decoder_embed_dim", "decoder_num_heads")}
        raise UserError(f"--decoder_embed_dim {dim}{default['decoder_embed_dim']} is not divisible by "
                        f"--decoder_num_heads {heads}{default['decoder_num_heads']}: every head needs an equal "
                        "share of the decoder width")


def build_pretrain_model(args, ckpt: Optional[dict]):
    """The pretraining model (models/base.py MaskedImageModel) for --model, --input_size,
    --norm_pix_loss, --range_mask_ratio and the decoder flags (reconciled with `ckpt`, the
    checkpoint the run resumes, if any); records the effective decoder in args."""
    overrides = decoder_overrides(args, ckpt)
    check_decoder_width(args, overrides)
    extra = {"range_mask_ratio": args.range_mask_ratio} if getattr(args, "range_mask_ratio", 0) else {}
    model = build_model(args.model, "pretrain", img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                        **overrides, **extra)
    for flag, value in model.decoder_arch.items():
        setattr(args, flag, value)
    log.info("Decoder: %s", ", ".join(f"{k}={v}" for k, v in model.decoder_arch.items()))
    return model
