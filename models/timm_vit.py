"""Any standard timm ViT as the MAE encoder, and its classifier, by name.

Naming rule: `mae_<timm name>` pretrains an MAE whose encoder is timm's model <timm name>
(`mae_vit_small_patch16_224`, `mae_vit_small_patch8_224`, `mae_deit_tiny_patch16_224`), with the
paper's default decoder (512-d, 8 blocks, 16 heads, MLP ratio 4) unless the caller overrides it;
`<timm name>` is the classifier that fine-tunes or linear-probes that encoder (models.vit's
VisionTransformer, official head). Names this repo registers win: `vit_base_patch16` is the
official classifier, `mae_vit_tiny_patch16` the repo's tiny MAE.

The architecture is read from the timm model built on the meta device (no memory, no weights,
no download), and accepted only when MaskedAutoencoderViT reproduces its encoder exactly: a plain
VisionTransformer with a class token, a learned position table over cls + patches, square patches
and the standard blocks (LayerNorm, plain attention, GELU MLP). Anything else (register tokens,
layer scale, qk-norm, CLIP's pre-norm, no class token, SwiGLU, ...) is refused with the reason.
timm's head (pooling, fc_norm) is not part of the encoder: fine-tuning chooses its own. Nor is
timm's dynamic_img_size: the MAE takes any input size divisible by the patch size, and the
classifier is built for the fine-tuning --input_size (the position table is resampled to it).
"""
from functools import lru_cache, partial

import timm
import timm.layers
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn

from .mae import MaskedAutoencoderViT
from .registry import PRETRAIN_PREFIX, register_resolver
from .vit import _vit

PREFIX = PRETRAIN_PREFIX
DEFAULT_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4.)

# Classes that compute the same function as the one MaskedAutoencoderViT uses.
_SAME = {timm.layers.LayerNorm: nn.LayerNorm, timm.layers.activations.GELU: nn.GELU}
# Block parts that make an encoder non-standard, in words (block, attention and MLP classes are
# checked by name first).
_KNOWN = {"ls1": "layer scale", "ls2": "layer scale", "q_norm": "qk-norm", "k_norm": "qk-norm",
          "attn.norm": "a norm inside attention", "mlp.norm": "a norm inside the MLP", "act": "another activation",
          "norm1": "another norm", "norm2": "another norm"}


def _signature(module: nn.Module):
    cls = _SAME.get(type(module), type(module))
    if cls is nn.GELU and not module.extra_repr():  # timm's GELU: exact gelu
        return nn.GELU, "approximate='none'"
    return cls, module.extra_repr()


def _describe(module: nn.Module) -> str:
    cls, settings = _signature(module)
    return f"{cls.__name__}({settings})"


def _layout_refusal(model: nn.Module) -> str:
    """Why this timm VisionTransformer's layout is not MAE's ('' when it is)."""
    if not model.has_class_token:
        return "it has no class token"
    if model.num_reg_tokens:
        return f"it has {model.num_reg_tokens} register tokens"
    if model.pos_embed is None or model.no_embed_class:
        return "its position table does not cover the class token and patches"
    if not isinstance(model.norm_pre, nn.Identity):
        return "it normalises the patch embeddings before the blocks (pre_norm, as CLIP)"
    if not isinstance(model.patch_drop, nn.Identity):
        return "it has patch dropout"
    if type(model.patch_embed) is not timm.layers.PatchEmbed:
        return f"its patch embedding is of class {type(model.patch_embed).__name__}, not PatchEmbed"
    if model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
        return f"its patches are not square ({model.patch_embed.patch_size})"
    for i, block in enumerate(model.blocks):
        for part, module, standard in (("", block, timm_vit.Block), (".attn", getattr(block, "attn", None),
                                       timm_vit.Attention), (".mlp", getattr(block, "mlp", None), timm_vit.Mlp)):
            if type(module) is not standard:
                return f"its blocks.{i}{part} is of class {type(module).__name__}, not timm's {standard.__name__}"
    return ""


def _module_refusal(model: nn.Module, arch: dict, img_size) -> str:
    """Why MaskedAutoencoderViT built from `arch` differs from the timm model's encoder ('' when it
    does not): every encoder module and parameter compared with the reference built on meta."""
    with torch.device("meta"):
        ref = MaskedAutoencoderViT(img_size=img_size, **arch, decoder_depth=1)
    mods, ref_mods = dict(model.named_modules()), dict(ref.named_modules())
    for name, module in mods.items():
        if not name.startswith(("patch_embed.", "blocks.")):
            continue
        if name not in ref_mods or _signature(module) != _signature(ref_mods[name]):
            part = name.split(".", 2)[2] if name.count(".") >= 2 and name.startswith("blocks.") else ""
            what = _KNOWN.get(part, _KNOWN.get(part.split(".")[-1], "a non-standard part"))
            ours = _describe(ref_mods[name]) if name in ref_mods else "nothing"
            return f"its {name} is {_describe(module)} where a standard ViT has {ours} ({what})"
    params, ref_params = model.state_dict(), ref.state_dict()
    for name, tensor in params.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")) and (
                name not in ref_params or ref_params[name].shape != tensor.shape):
            return f"its parameter {name} {tuple(tensor.shape)} has no counterpart in a standard ViT"
    for name in ref_params:
        if name.startswith(("patch_embed.", "blocks.")) and name not in params:
            return f"it lacks the standard ViT parameter {name}"
    for name in ("norm", "fc_norm"):  # the final norm: either may hold it, depending on timm's pooling
        module = getattr(model, name)
        if not isinstance(module, nn.Identity) and _signature(module) != _signature(ref.norm):
            return f"its final {name} is {_describe(module)}, not a LayerNorm like the blocks'"
    return ""


@lru_cache(maxsize=None)
def _timm_arch(timm_name: str):
    """(architecture kwargs, default img_size) of a standard timm ViT; ValueError otherwise."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    if type(model) is not timm_vit.VisionTransformer:
        raise ValueError(f"timm's {timm_name} is of class {type(model).__name__}, not VisionTransformer: "
                         "only plain timm ViTs can be MAE encoders")
    why = _layout_refusal(model)
    if why:
        raise ValueError(f"timm's {timm_name} is not a standard ViT that MaskedAutoencoderViT can represent: {why}")
    block = model.blocks[0]
    dim, hidden = model.embed_dim, block.mlp.fc1.out_features
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm's Block takes int(dim * mlp_ratio): make it land on `hidden`
        mlp_ratio = (hidden + 0.5) / dim
    # Always LayerNorm: another norm then shows up as a difference in _module_refusal.
    arch = dict(patch_size=model.patch_embed.patch_size[0], in_chans=model.patch_embed.proj.in_channels,
                embed_dim=dim, depth=len(model.blocks), num_heads=block.attn.num_heads, mlp_ratio=mlp_ratio,
                qkv_bias=block.attn.qkv.bias is not None,
                norm_layer=partial(nn.LayerNorm, eps=getattr(block.norm1, "eps", 1e-6)))
    h, w = model.patch_embed.img_size
    img_size = h if h == w else (h, w)
    why = _module_refusal(model, arch, img_size)
    if why:
        raise ValueError(f"timm's {timm_name} is not a standard ViT that MaskedAutoencoderViT can represent: "
                         f"{why}")
    return arch, img_size


def timm_mae(timm_name: str, **kwargs) -> MaskedAutoencoderViT:
    """The MAE of timm ViT `timm_name`; kwargs override (img_size, norm_pix_loss, decoder_*)."""
    arch, img_size = _timm_arch(timm_name)
    return MaskedAutoencoderViT(**{"img_size": img_size, **arch, **DEFAULT_DECODER, **kwargs})


def timm_classifier(timm_name: str, **kwargs):
    """models.vit.VisionTransformer with the encoder of timm ViT `timm_name`."""
    arch, img_size = _timm_arch(timm_name)
    return _vit({"img_size": img_size, **kwargs}, **arch)


def _resolve_pretrain(name: str):
    if name.startswith(PREFIX) and timm.is_model(name[len(PREFIX):]):
        return partial(timm_mae, name[len(PREFIX):])
    return None


def _resolve_classify(name: str):
    return partial(timm_classifier, name) if timm.is_model(name) else None


register_resolver(_resolve_pretrain, "pretrain", f"{PREFIX}<timm ViT name> (e.g. {PREFIX}vit_small_patch16_224)")
register_resolver(_resolve_classify, "classify", "<timm ViT name> (e.g. vit_small_patch16_224)")
