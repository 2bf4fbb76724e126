"""The model of a pretraining run (any masked-image model: MAE, MixMIM): --model at --input_size,
plus the decoder flags of the MAE paper's ablations (Table 1a/1b: --decoder_depth,
--decoder_embed_dim, --decoder_num_heads).

An unset flag means the model's own decoder. A resumed run must rebuild the decoder its weights
were trained with, so the checkpoint's recorded values fill the unset flags, and a flag that
contradicts them is an error (the weights would not load into that decoder). The run's config
(engine/config.py) records the effective values; every checkpoint records them ('args'), so resumes
and scripts/visualize.py rebuild the same decoder. --finetune drops the decoder whatever its size.
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
    checkpoint records for the flags not given. A given flag that contradicts the checkpoint is an
    error: its weights would not load into that decoder. args is read only."""
    given = {flag: getattr(args, flag) for flag in DECODER_FLAGS}
    for flag, value in given.items():
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if ckpt is not None:
        path, adopted = ckpt["_path"], {}
        for flag, saved in decoder_kwargs(recorded_args(ckpt)).items():
            if given[flag] is None:
                given[flag] = adopted[flag] = saved
            elif given[flag] != saved:
                new_run = "drop --resume" if args.resume else "use another --output_dir (or --no_auto_resume)"
                raise UserError(f"--{flag} {given[flag]} conflicts with {flag}={saved} recorded in {path}, the "
                                f"checkpoint this run resumes: drop the flag to continue it, or {new_run} "
                                "for a new run")
        if adopted:
            log.info("Decoder as recorded in %s: %s", path, ", ".join(f"{k}={v}" for k, v in adopted.items()))
    return {flag: value for flag, value in given.items() if value is not None}


def check_decoder_width(model_name: str, input_size: int, overrides: dict) -> None:
    """--decoder_embed_dim must split into --decoder_num_heads heads; a value not given is the model's."""
    if "decoder_embed_dim" not in overrides and "decoder_num_heads" not in overrides:
        return
    dim, heads = overrides.get("decoder_embed_dim"), overrides.get("decoder_num_heads")
    if dim is None or heads is None:
        with torch.device("meta"):  # the model's own decoder: no memory, no initialisation
            own = build_model(model_name, "pretrain", img_size=input_size).decoder_arch
        dim, heads = dim or own["decoder_embed_dim"], heads or own["decoder_num_heads"]
    if dim % heads:
        default = {k: "" if k in overrides else f" ({model_name}'s default)"
                   for k in ("decoder_embed_dim", "decoder_num_heads")}
        raise UserError(f"--decoder_embed_dim {dim}{default['decoder_embed_dim']} is not divisible by "
                        f"--decoder_num_heads {heads}{default['decoder_num_heads']}: every head needs an equal "
                        "share of the decoder width")


def build_pretrain_model(model_name: str, input_size: int, norm_pix_loss: bool = False,
                         range_mask_ratio: float = 0.0, decoder: Optional[dict] = None):
    """The pretraining model (models/base.py MaskedImageModel) for --model at --input_size, with
    --norm_pix_loss, --range_mask_ratio (MixMIM) and the decoder flags given or recorded by the
    resumed checkpoint (decoder_overrides)."""
    decoder = dict(decoder or {})
    check_decoder_width(model_name, input_size, decoder)
    extra = {"range_mask_ratio": range_mask_ratio} if range_mask_ratio else {}
    return build_model(model_name, "pretrain", img_size=input_size, norm_pix_loss=norm_pix_loss, **decoder, **extra)
