"""ViT classifiers for fine-tuning and linear probing MAE encoders (official `models_vit`).

timm's VisionTransformer already has the official head: global_pool averages the patch tokens
(not the cls token) and applies fc_norm instead of the final norm, so the state-dict keys
(`fc_norm.*` without `norm.*`, or `norm.*` with the cls token) match the released checkpoints.
"""
import logging
from functools import partial
from typing import FrozenSet

import timm.models.vision_transformer as timm_vit
import torch.nn as nn

from .base import PretrainedClassifier
from .pos_embed import resample_pos_embed
from .registry import register_model

log = logging.getLogger(__name__)


class VisionTransformer(PretrainedClassifier, timm_vit.VisionTransformer):
    """timm's VisionTransformer; global_pool=True (official default for fine-tuning) pools the
    patch tokens, global_pool=False uses the cls token. timm's string values are accepted too.
    The contract (models/base.py): timm sets has_class_token and num_prefix_tokens."""

    def __init__(self, global_pool=False, **kwargs):
        if isinstance(global_pool, bool):
            global_pool = "avg" if global_pool else "token"
        super().__init__(global_pool=global_pool, **kwargs)

    @property
    def uses_global_pool(self) -> bool:
        return self.global_pool == "avg"

    def shard_units(self) -> list:
        return list(self.blocks)

    @property
    def input_stride(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def allowed_missing_keys(self) -> FrozenSet[str]:
        pooled_norm = {"fc_norm.weight", "fc_norm.bias"} if not isinstance(self.fc_norm, nn.Identity) else set()
        return super().allowed_missing_keys | pooled_norm

    def adapt_pretrained(self, state: dict) -> dict:
        """Also: with a pooled head, the encoder's final norm is dropped (fc_norm after the pooling
        takes its place, freshly initialised, as officially); a position table of another patch
        grid is resampled to this model's (official interpolate_pos_embed)."""
        state = super().adapt_pretrained(state)
        if isinstance(self.norm, nn.Identity):
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        if "pos_embed" in state and state["pos_embed"].shape != self.pos_embed.shape:
            old = state["pos_embed"].shape[1] - self.num_prefix_tokens
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], self.patch_embed.grid_size,
                                                    self.num_prefix_tokens)
            log.info("Resampled the position embedding of %d patches to a %dx%d patch grid", old,
                     *self.patch_embed.grid_size)
        return state

    def group_matcher(self, coarse: bool = False):
        """Layer ids for timm.optim.param_groups_layer_decay, as the official get_layer_id_for_vit:
        cls_token / pos_embed / patch_embed are layer 0, blocks.i layer i + 1, and everything else
        (norm, fc_norm, head) the top layer with the full lr. timm's own matcher puts the final
        norm one layer below the head, which gives it lr scale layer_decay on the class-token path."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre", blocks=[(r"^blocks\.(\d+)", None)])


_LN = partial(nn.LayerNorm, eps=1e-6)


def _vit(kwargs, **arch):
    return VisionTransformer(**{**dict(mlp_ratio=4, qkv_bias=True, norm_layer=_LN), **arch, **kwargs})


@register_model
def vit_mini_patch16(**kwargs):
    """The encoder of mae_vit_mini_patch16 (tests and CPU demos)."""
    return _vit(kwargs, patch_size=16, embed_dim=128, depth=4, num_heads=4)


@register_model
def vit_tiny_patch16(**kwargs):
    return _vit(kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3)


@register_model
def vit_base_patch16(**kwargs):
    return _vit(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def vit_large_patch16(**kwargs):
    return _vit(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_model
def vit_huge_patch14(**kwargs):
    return _vit(kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16)


@register_model
def vit_giant_patch14(**kwargs):
    """The encoder of mae_vit_giant_patch14 (ViT-g/14, MLP 6144)."""
    return _vit(kwargs, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408)


@register_model
def vit_2b_patch14(**kwargs):
    return _vit(kwargs, patch_size=14, embed_dim=2560, depth=24, num_heads=32)


@register_model
def vit_6p5b_patch14(**kwargs):
    return _vit(kwargs, patch_size=14, embed_dim=4096, depth=32, num_heads=32)


PROBE_BN_EPS = 1e-6  # the linear probe's BatchNorm (engine/linprobe.py make_linear_probe, as officially)


def fold_probe_head(state: dict, eps: float = PROBE_BN_EPS) -> dict:
    """A linear-probe state dict (head = BatchNorm without affine, then Linear: head.0.*, head.1.*)
    with the head folded into one Linear `head` computing the same function in eval mode:
    W / sqrt(var + eps) and b - W mean / sqrt(var + eps), in float64. Other state dicts unchanged."""
    if "head.1.weight" not in state or "head.0.running_var" not in state:
        return state
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    w, b = state["head.1.weight"].double(), state["head.1.bias"].double()
    inv = (state["head.0.running_var"].double() + eps).rsqrt()
    out["head.weight"] = (w * inv).to(state["head.1.weight"].dtype)
    out["head.bias"] = (b - w @ (state["head.0.running_mean"].double() * inv)).to(state["head.1.bias"].dtype)
    return out
