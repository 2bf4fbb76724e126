"""Masked Autoencoder with a plain ViT encoder (He et al., 2021).

State-dict keys, shapes, initialisation and numerics follow the official
facebookresearch/mae `models_mae.py`, so its released checkpoints load with strict=True.
Modules are created in the official order so that a given seed draws the same initial weights.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, PatchEmbed

from .base import MaskCounts, MaskedImageModel
from .patches import patch_grid, patchify, unpatchify
from .pos_embed import sincos_pos_embed_tensor
from .registry import register_model
from .state_dict import without_decoder


class MaskedAutoencoderViT(MaskedImageModel, nn.Module):
    """Masked Autoencoder with VisionTransformer backbone (the contract: models/base.py)."""
    plain_vit_mae = True

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False,
                 qkv_bias=True, decoder_mlp_ratio=None):
        """The official arguments, plus two for encoders of other ViTs (models/timm_vit.py):
        qkv_bias of the encoder blocks (the decoder's keep their bias), and decoder_mlp_ratio
        (None: mlp_ratio, as the official model shares it)."""
        super().__init__()
        for what, dim, heads in (("", embed_dim, num_heads), ("decoder_", decoder_embed_dim, decoder_num_heads)):
            if dim % heads:  # timm's Attention would only assert
                raise ValueError(f"{what}embed_dim {dim} is not divisible by {what}num_heads {heads}")
        self.in_chans = in_chans
        # Encoder. strict_img_size=False: other resolutions divisible by the patch size work,
        # with a sin-cos table computed for their grid.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio,
                  qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self._other_grid_tables = {}
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_tensor(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_tensor(self.decoder_pos_embed.shape[-1], grid))

        # Patch embedding initialised as the linear layer it is, not as a convolution.
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02): the cutoff (2.) is ~100 std.
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            # xavier_uniform follows the official JAX ViT.
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def shard_units(self) -> list:
        """Every encoder block, then every decoder block."""
        return [*self.blocks, *self.decoder_blocks]

    # ------------------------------------------------------------------ patches
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    default_mask_ratio = 0.75  # the paper's and the official default

    @property
    def mask_noise_len(self) -> int:
        """Length of a per-image noise row (forward's `noise`): one entry per patch at img_size."""
        return self.patch_embed.num_patches

    def mask_noise_len_at(self, input_size: int) -> int:
        """Any size divisible by the patch size: one entry per patch of that size."""
        p = self.patch_size
        if input_size % p:
            raise ValueError(f"image size {input_size}x{input_size} is not divisible by the patch size {p}")
        return (input_size // p) ** 2

    @property
    def decoder_arch(self) -> dict:
        """The decoder's size as constructor arguments (checkpoints record it: engine/pretrain_model.py)."""
        return dict(decoder_embed_dim=self.decoder_embed.out_features, decoder_depth=len(self.decoder_blocks),
                    decoder_num_heads=self.decoder_blocks[0].attn.num_heads if len(self.decoder_blocks) else None)

    def mask_counts(self, mask_ratio: float) -> MaskCounts:
        """random_masking keeps int(L * (1 - mask_ratio)) patches and removes the others."""
        length = self.mask_noise_len
        kept = int(length * (1 - mask_ratio))
        return MaskCounts(length, length - kept, kept, "patches")

    def grid_of(self, imgs: torch.Tensor) -> Tuple[int, int]:
        return patch_grid(imgs, self.patch_size)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (p, q, c)."""
        return patchify(imgs, self.patch_size, self.grid_of(imgs))

    def unpatchify(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W). grid=(h, w) is needed only for non-square grids."""
        if grid is None:
            grid = (int(round(x.shape[1] ** .5)),) * 2
        return unpatchify(x, self.patch_size, self.in_chans, grid)

    def _pos_tables(self, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.pos_embed, self.decoder_pos_embed
        key = (tuple(grid), self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._other_grid_tables:
            self._other_grid_tables[key] = tuple(
                sincos_pos_embed_tensor(t.shape[-1], grid).to(device=t.device, dtype=t.dtype)
                for t in (self.pos_embed, self.decoder_pos_embed))
        return self._other_grid_tables[key]

    # ------------------------------------------------------------------ masking
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """Per-sample random masking by argsort of noise: the smallest-noise patches are kept.

        x: (N, L, D). Returns the kept tokens, the binary mask (N, L; 0 keep, 1 remove) and the
        permutation that restores the original patch order.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")

        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's
        switch): about a third more compute for far less activation memory (ViT-H, large batches)."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(blocks, x)
        for blk in blocks:
            x = blk(x)
        return x

    def forward_encoder(self, x, mask_ratio, noise=None):
        pos_embed, _ = self._pos_tables(self.grid_of(x))
        x = self.patch_embed(x)
        x = x + pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._run_blocks(self.blocks, x)
        x = self.norm(x)
        return x, mask, ids_restore

    def encoder_features(self, imgs: torch.Tensor) -> dict:
        n, (h, w) = imgs.shape[0], self.grid_of(imgs)
        # An increasing noise row keeps every patch in its order and draws nothing.
        order = torch.arange(h * w, dtype=torch.float32, device=imgs.device).expand(n, -1)
        x, _, _ = self.forward_encoder(imgs, 0.0, order)
        return {"cls": x[:, 0], "patch_mean": x[:, 1:].mean(dim=1)}

    def forward_decoder(self, x, ids_restore, grid: Optional[Tuple[int, int]] = None):
        """grid=(h, w) of the patches; only needed for non-square inputs of another size."""
        x = self.decoder_embed(x)

        # Mask tokens fill the removed positions, then the sequence is put back in patch order.
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)

        if grid is None:
            side = int(round(length ** .5))
            grid = (side, side)
        x = x + self._pos_tables(grid)[1]
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error per patch, averaged over the removed patches only.

        imgs: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 0 keep, 1 remove.
        """
        target = self.pixel_target(imgs)
        loss = (pred - target) ** 2  # type promotion as the official code: bf16 pred - fp32 target is fp32
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, self.grid_of(imgs))
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


_LN = partial(nn.LayerNorm, eps=1e-6)


def _mae(kwargs, **arch):
    """Architecture defaults, overridable by the caller (e.g. decoder ablations)."""
    return MaskedAutoencoderViT(**{**dict(mlp_ratio=4, norm_layer=_LN), **arch, **kwargs})


@register_model(task="pretrain")
def mae_vit_mini_patch16(**kwargs):
    """A few-million-FLOP model for tests and CPU demos (use --input_size 64..112)."""
    return _mae(kwargs, patch_size=16, embed_dim=128, depth=4, num_heads=4,
                decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)


@register_model(task="pretrain")
def mae_vit_tiny_patch16(**kwargs):
    """ViT-Ti encoder (192-d, 12 blocks, 3 heads) with a small 128-d, 4-block decoder."""
    return _mae(kwargs, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)


@register_model(task="pretrain")
def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _mae(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model(task="pretrain")
def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _mae(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model(task="pretrain")
def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _mae(kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


# The recommended architectures (decoder: 512-d, 8 blocks), under the official names.
mae_vit_base_patch16 = register_model(mae_vit_base_patch16_dec512d8b, "mae_vit_base_patch16", task="pretrain")
mae_vit_large_patch16 = register_model(mae_vit_large_patch16_dec512d8b, "mae_vit_large_patch16", task="pretrain")
mae_vit_huge_patch14 = register_model(mae_vit_huge_patch14_dec512d8b, "mae_vit_huge_patch14", task="pretrain")


# ---------------------------------------------------------------------------- other layouts
# The official layout above is also timm's VisionTransformer layout (cls_token, pos_embed,
# patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm; a classifier adds
# fc_norm and head), which is why timm loads the official release files directly. transformers names
# the same tensors otherwise and splits qkv; these maps are the one place that knows its names (timm's
# checkpoint_filter_fn style), used by the export (engine/interop/export.py) and every import
# (engine/checkpoint/foreign.py). The transformers names are those of its hub files (the 4.x module names, which
# transformers 5 renames on load), so that one file serves every transformers version.
HF_BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                  "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
HF_QKV_NAMES = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# transformers 5 module names (what its own state_dict() holds), accepted on import.
_HF5_BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF5_QKV_NAMES = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_HF_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_HF_ENCODER_BLOCKS, _HF_DECODER_BLOCKS = "encoder.layer.", "decoder.decoder_layers."


def _blocks_to_hf(key: str, value: torch.Tensor, ours: str, theirs: str, out: dict, key_bias: bool = True,
                  names=(HF_BLOCK_NAMES, HF_QKV_NAMES)) -> bool:
    if not key.startswith(ours):
        return False
    i, rest = key[len(ours):].split(".", 1)
    module, leaf = rest.rsplit(".", 1)
    block_names, qkv_names = names
    if module == "attn.qkv":
        for name, part in zip(qkv_names, value.chunk(3, dim=0)):
            if key_bias or leaf != "bias" or name != qkv_names[1]:
                out[f"{theirs}{i}.{name}.{leaf}"] = part.clone()
    else:
        out[f"{theirs}{i}.{block_names[module]}.{leaf}"] = value
    return True


def to_hf_state_dict(state: dict, encoder_prefix: str = "vit.", beit: bool = False,
                     module_names: bool = False) -> dict:
    """Official-layout tensors -> transformers' ViTMAE / ViT names: the encoder under
    `encoder_prefix` ('vit.' in ViTMAEForPreTraining and ViTForImageClassification, '' in ViTModel),
    the decoder under 'decoder.', a classification head as 'classifier'.

    beit=True: BeitForImageClassification's names (prefix 'beit.'), the transformers class that
    averages the patch tokens (use_mean_pooling): fc_norm is its pooler's layernorm, and the key
    projection has no bias there. Dropping it is exact: q . b_k is the same for every key of a
    query, and softmax ignores a constant shift. ValueError for a key with no counterpart.

    module_names=True: the names of transformers 5's modules instead of its hub files' (for
    load_state_dict into a model built there; from_pretrained takes the hub names in every version)."""
    names = (_HF5_BLOCK_NAMES, _HF5_QKV_NAMES) if module_names else (HF_BLOCK_NAMES, HF_QKV_NAMES)
    encoder_blocks = "layers." if module_names else _HF_ENCODER_BLOCKS
    out = {}
    for key, value in state.items():
        if key in _HF_TOP and not (beit and key.startswith("norm.")):
            out[encoder_prefix + _HF_TOP[key]] = value
        elif beit and key.startswith("fc_norm."):
            out[encoder_prefix + "pooler.layernorm." + key[len("fc_norm."):]] = value
        elif key.startswith("head."):
            out["classifier." + key[len("head."):]] = value
        elif _blocks_to_hf(key, value, "blocks.", encoder_prefix + encoder_blocks, out, not beit, names):
            pass
        elif not beit and _blocks_to_hf(key, value, "decoder_blocks.", _HF_DECODER_BLOCKS, out, True, names):
            pass
        elif not beit and key.startswith(("decoder_", "mask_token")):
            out["decoder." + key] = value
        else:
            raise ValueError(f"transformers' {'BEiT' if beit else 'ViT'} has no counterpart of {key}")
    return out


def is_hf_state_dict(state: dict) -> bool:
    """Keys of transformers' ViT / ViTMAE (any version, with or without the 'vit.' prefix)."""
    return any(k.split(".", 2)[:2] == ["embeddings", "patch_embeddings"] or
               k.startswith("vit.embeddings.") for k in state)


def from_hf_state_dict(state: dict) -> dict:
    """transformers' ViTMAE / ViTModel / ViTForImageClassification tensors (hub names of 4.x, module
    names of 5.x) -> the official layout. The pooler of ViTModel (unused by MAE) is dropped."""
    top = {v: k for k, v in _HF_TOP.items()}
    per_block = {}  # (our prefix, i) -> {hf module: {leaf: tensor}}
    out = {}
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key in top:
            out[top[key]] = value
        elif key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = value
        elif key.startswith("pooler."):
            continue
        elif key.startswith(("encoder.layer.", "layers.", "decoder.decoder_layers.")):
            prefix = "decoder_blocks." if key.startswith("decoder.") else "blocks."
            rest = key.split("layer.", 1)[1] if key.startswith("encoder.") else key.split("layers.", 1)[1]
            i, rest = rest.split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            per_block.setdefault((prefix, int(i)), {}).setdefault(module, {})[leaf] = value
        elif key.startswith("decoder."):
            out[key[len("decoder."):]] = value
        else:
            raise ValueError(f"{key} is not a key of transformers' ViT or ViTMAE")
    for (prefix, i), modules in sorted(per_block.items()):
        for names, qkv_names in ((HF_BLOCK_NAMES, HF_QKV_NAMES), (_HF5_BLOCK_NAMES, _HF5_QKV_NAMES)):
            if qkv_names[0] not in modules:
                continue
            for leaf in modules[qkv_names[0]]:
                out[f"{prefix}{i}.attn.qkv.{leaf}"] = torch.cat([modules[n][leaf] for n in qkv_names])
            for ours, theirs in names.items():
                for leaf, value in modules.get(theirs, {}).items():
                    out[f"{prefix}{i}.{ours}.{leaf}"] = value
            break
        else:
            raise ValueError(f"block {i} of the transformers weights has no query/key/value projections")
    return out


def to_timm_state_dict(state: dict) -> dict:
    """Official-layout tensors -> a timm VisionTransformer's state dict: the same keys, less the
    decoder (timm's ViT has none)."""
    return without_decoder(state)


def from_timm_state_dict(state: dict) -> dict:
    """A timm ViT checkpoint (its own layout, the `*.mae` weights included, or a timm training
    checkpoint's prefixed 'module.' keys) -> the official layout: the same keys."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
# Billion-parameter encoders with the paper's default decoder (512-d, 8 blocks, 16 heads, MLP ratio 4):
# ViT-g/14 (Zhai et al., 2022: MLP 6144, not 4x) and the ViT-2B/14 and ViT-6.5B/14 of MAE
# pre-pretraining (facebookresearch/maws MODEL_CONFIGS). Train them with --dist_strategy fsdp.
_SCALE = dict(patch_size=14, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_ratio=4)


@register_model(task="pretrain")
def mae_vit_giant_patch14(**kwargs):
    """ViT-g/14: 1408-d, 40 blocks, 16 heads, MLP 6144 (about 1.0B encoder parameters)."""
    return _mae(kwargs, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408, **_SCALE)


@register_model(task="pretrain")
def mae_vit_2b_patch14(**kwargs):
    """ViT-2B/14: 2560-d, 24 blocks, 32 heads (about 1.9B encoder parameters)."""
    return _mae(kwargs, embed_dim=2560, depth=24, num_heads=32, **_SCALE)


@register_model(task="pretrain")
def mae_vit_6p5b_patch14(**kwargs):
    """ViT-6.5B/14: 4096-d, 32 blocks, 32 heads (about 6.4B encoder parameters)."""
    return _mae(kwargs, embed_dim=4096, depth=32, num_heads=32, **_SCALE)
