"""MixMIM / MixMAE (Liu et al., CVPR 2023): mixed-and-masked pretraining of a hierarchical
(Swin-style) ViT, and the classifier that fine-tunes its encoder.

State-dict keys, shapes and initialisation follow the official Sense-X/MixMIM code
(`models_mixmim.py` for pretraining, `models_mixmim_ft.py` for fine-tuning), so its released
checkpoints load with strict=True, and the classifier takes the pretraining model's encoder
weights under the same names. Modules are created in the official order so that a given seed
draws the same initial weights.

Pretraining in one paragraph: ONE random mask, shared by the whole batch, is drawn on the
final-stage grid (32x32-pixel cells) and nearest-upsampled to every stage. After the patch
embedding, image i takes the tokens of its batch mirror (i <-> N-1-i, `x.flip(0)`) where the
mask is 1. Attention only connects tokens of the same source image (patch merging and the MLPs
never mix tokens, because the mask is constant on every 2x2 merge group), so the encoder runs
both images side by side in one sequence. The decoder sees the encoded sequence twice: with
mask tokens where the mask is 1 (predicting image i there) and where it is 0 (predicting the
partner there); "unmixing" the two gives a reconstruction of every patch of every image from the
patches it did not see, and the loss is the MSE over all patches.
"""
import math
from typing import Final, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_, use_fused_attn
from timm.models.swin_transformer import PatchMerging, get_relative_position_index, window_partition, window_reverse
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from .base import MaskCounts, MaskedImageModel, PretrainedClassifier
from .patches import patch_grid, patchify, unpatchify
from .pos_embed import sincos_pos_embed_tensor
from .registry import register_model

# Added to the attention logits between tokens of different source images. Finite, so a row can
# never become NaN, and representable in fp16/bf16; exp(-1e4) underflows to exactly 0 in every
# float format, so (like the official -1e30 / -65500) the two images stay exactly independent.
# Swin's -100 would leak exp(-100) ~ 4e-44, a nonzero fp32 subnormal.
MASK_VALUE = -1e4

Size2 = Union[int, Tuple[int, int]]


def _pair(x: Size2) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def window_mix_mask(token_mask: torch.Tensor, grid: Tuple[int, int], window_size: int) -> torch.Tensor:
    """Additive attention mask (nW, 1, N, N) that keeps each token to its own source image.

    token_mask: (H*W,) of 0/1 on the stage grid (1 = token of the partner image). The mask is the
    same for every image of the batch, so one copy per window suffices.
    """
    h, w = grid
    m = window_partition(token_mask.view(1, h, w, 1), (window_size, window_size)).flatten(1)  # nW, N
    other_source = m.unsqueeze(2) != m.unsqueeze(1)
    return torch.zeros(other_source.shape, device=m.device).masked_fill(other_source, MASK_VALUE).unsqueeze(1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with a relative position bias.

    Official keys: relative_position_bias_table, relative_position_index (a persistent buffer,
    unlike timm's Swin: the released checkpoints hold it), qkv, proj.
    """
    fused_attn: Final[bool]

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(window_size, window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # After the linear layers, as officially, so that a seed draws the same weights.
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor, mix_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, nW, N, C), the windows of each image; mix_mask: None or (nW, 1, N, N) additive."""
        b, nw, n, c = x.shape
        h = self.num_heads
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, h).permute(2, 0, 1)  # h, N, N
        if mix_mask is None:
            lead, heads = b * nw, h  # one bias for every window
            bias = bias.unsqueeze(0)
        else:
            # Windows fold into the head axis: the per-window mask then broadcasts over the batch
            # instead of being repeated for every image (as officially).
            lead, heads = b, nw * h
            bias = (bias.unsqueeze(0) + mix_mask).reshape(1, nw * h, n, n)
        q, k, v = self.qkv(x).reshape(b, nw, n, 3, h, self.head_dim).permute(3, 0, 1, 4, 2, 5) \
            .reshape(3, lead, heads, n, self.head_dim).unbind(0)
        bias = bias.to(q.dtype)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.view(b, nw, h, n, self.head_dim).transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(x))


class MixMIMBlock(nn.Module):
    """Pre-norm Swin block without shifted windows (MixMIM uses none)."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        # Official rule: a window as large as the grid becomes the grid (and sizes the bias table).
        self.window_size = min(window_size, min(self.input_resolution))
        if any(r % self.window_size for r in self.input_resolution):
            raise ValueError(f"a {self.input_resolution[0]}x{self.input_resolution[1]} token grid cannot be split "
                             f"into {self.window_size}x{self.window_size} windows: choose img_size/window_size so "
                             "that every stage's grid is a multiple of its window")
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, mix_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        (h, w), ws = self.input_resolution, self.window_size
        b, length, c = x.shape
        windows = window_partition(self.norm1(x).view(b, h, w, c), (ws, ws)).view(b, -1, ws * ws, c)
        windows = self.attn(windows, mix_mask)
        x = x + self.drop_path(window_reverse(windows.view(-1, ws, ws, c), (ws, ws), h, w).view(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixMIMLayer(nn.Module):
    """One stage: blocks at one resolution, then (except in the last stage) 2x2 patch merging."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float = 4., qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path: Union[float, Sequence[float]] = 0., norm_layer=nn.LayerNorm, downsample: bool = False):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            MixMIMBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, qkv_bias, drop, attn_drop,
                        drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path, norm_layer=norm_layer)
            for i in range(depth)])
        # timm's PatchMerging has the official keys (norm, reduction without bias) and concatenates
        # the 2x2 neighbours in the official order; it works on (B, H, W, C).
        self.downsample = PatchMerging(dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, H*W, C); token_mask: None, or (H*W,) 0/1 (1 = token of the partner image)."""
        mix_mask = None
        if token_mask is not None and self.depth:
            mix_mask = window_mix_mask(token_mask, self.input_resolution, self.blocks[0].window_size)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, mix_mask, use_reentrant=False)
            else:
                x = blk(x, mix_mask)
        if self.downsample is not None:
            b, _, c = x.shape
            x = self.downsample(x.view(b, *self.input_resolution, c)).flatten(1, 2)
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"


def layer_id_for_mixmim(name: str, depths: Sequence[int]) -> int:
    """The official layer id of a parameter (util/lr_decay.get_layer_id_for_mixmim).

    Embeddings are layer 0, block j of stage s is sum(depths[:s]) + j + 1, the patch merging after
    stage s goes with the first block of stage s + 1, everything else (final norm, head, decoder)
    is sum(depths), the last block's layer. The official scale is layer_decay ** (sum(depths) + 1 -
    id): no parameter gets the full lr, the head gets layer_decay times it.
    """
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage = int(parts[1])
        if "downsample" in name:
            return sum(depths[:stage + 1]) + 1
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths)


class _MixMIMEncoder(nn.Module):
    """The hierarchical encoder shared by pretraining and fine-tuning (official names:
    patch_embed, layers, norm, absolute_pos_embed); subclasses add their own parts and then
    call `_make_pos_embed` where the official code creates the fixed table."""

    def __init__(self, img_size: Size2, patch_size: int, in_chans: int, embed_dim: int, depths: Sequence[int],
                 num_heads: Sequence[int], window_size: Union[int, Sequence[int]], mlp_ratio: float, qkv_bias: bool,
                 patch_norm: bool, drop_rate: float, attn_drop_rate: float, drop_path_rate: float, norm_layer,
                 use_checkpoint: bool):
        super().__init__()
        num_stages = len(depths)
        if isinstance(window_size, int):
            window_size = [window_size] * num_stages
        if not len(num_heads) == len(window_size) == num_stages:
            raise ValueError(f"depths, num_heads and window_size need one entry per stage, got {list(depths)}, "
                             f"{list(num_heads)}, {list(window_size)}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_layers = num_stages
        self.num_heads = list(num_heads)
        self.window_size = list(window_size)
        self.mlp_ratio = mlp_ratio
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        # Pixels per final-stage token: the mask cell, and the reconstruction unit (32 officially).
        self.encoder_stride = patch_size * 2 ** (num_stages - 1)
        self.img_size = _pair(img_size)
        if any(s % self.encoder_stride for s in self.img_size):
            raise ValueError(f"img_size {self.img_size[0]}x{self.img_size[1]} is not a multiple of the encoder "
                             f"stride {self.encoder_stride} (patch size {patch_size} x {2 ** (num_stages - 1)})")

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        gh, gw = self.patch_embed.grid_size
        self.stage_grids = [(gh // 2 ** i, gw // 2 ** i) for i in range(num_stages)]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList([
            MixMIMLayer(int(embed_dim * 2 ** i), self.stage_grids[i], depths[i], num_heads[i], window_size[i],
                        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                        norm_layer=norm_layer, downsample=i < num_stages - 1)
            for i in range(num_stages)])
        self.pos_drop = nn.Dropout(p=drop_rate)
        self.norm = norm_layer(self.num_features)
        self.set_grad_checkpointing(use_checkpoint)

    def _make_pos_embed(self):
        # Fixed (never trained) sin-cos table of the stage-1 grid, added after the patch embedding.
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, self.embed_dim),
                                               requires_grad=False)

    @staticmethod
    def _init_weights(m):
        # Official: xavier_uniform for every Linear (JAX ViT), LayerNorm 1/0. The patch-embedding
        # convolution keeps PyTorch's default init (unlike MAE, which treats it as a Linear).
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def encoder_blocks(self) -> List[nn.Module]:
        """Every block of every stage (the patch merging between stages stays with the root)."""
        return [blk for layer in self.layers for blk in layer.blocks]

    def _check_size(self, imgs: torch.Tensor):
        if tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(f"this model was built for {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{imgs.shape[-2]}x{imgs.shape[-1]}: pass img_size= to the factory")

    def encode(self, imgs: torch.Tensor, stage_masks: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """(N, C, H, W) -> final-stage tokens (N, L, num_features) after the final norm.

        stage_masks: None (plain encoder), or one (H_s*W_s,) 0/1 mask per stage: the input is mixed
        with its batch mirror where the first is 1, and attention kept within each source image.
        """
        self._check_size(imgs)
        x = self.patch_embed(imgs)
        if stage_masks is not None:
            m = stage_masks[0].view(1, -1, 1)
            x = x * (1. - m) + x.flip(0) * m  # mixed before adding the position table, as officially
        x = self.pos_drop(x + self.absolute_pos_embed)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if stage_masks is None else stage_masks[i])
        return self.norm(x)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """For timm.optim.param_groups_layer_decay: fine groups give the official MixMIM layer ids
        and lr scales (see layer_id_for_mixmim).

        timm numbers the groups 0..K-1 and scales group g by layer_decay ** (K-1-g), while the
        official scale is layer_decay ** (sum(depths) + 1 - id), whose top id has no parameter.
        The frozen absolute_pos_embed (never optimised, so its own group is irrelevant) is put in
        that top group so that K-1 = sum(depths) + 1 and the scales agree exactly.
        """
        if coarse:
            return dict(stem=r"^absolute_pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None),
                                                                          (r"^norm", (99999,))])
        depths, top = self.depths, sum(self.depths) + 1
        return lambda name: top if name == "absolute_pos_embed" else layer_id_for_mixmim(name, depths)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for layer in self.layers:
            layer.grad_checkpointing = enable


class MixMIM(MaskedImageModel, _MixMIMEncoder):
    """MixMIM pretraining model (official models_mixmim.MixMIM; the contract: models/base.py).

    `loss, pred, mask = model(imgs, mask_ratio=0.5, noise=None)`:
      mask  (N, L) float, L = final-stage tokens (7x7 at 224): 1 where image i holds the tokens of
            its batch mirror N-1-i; the same mask for every image (one mask per batch, as officially).
      pred  (N, L, encoder_stride**2 * in_chans): the unmixed reconstruction of every image, each
            patch predicted from the half of the image the encoder saw elsewhere in the batch (in
            normalised-patch space with norm_pix_loss). The official forward returns the raw (2N, L,
            .) decoder output instead; it is `forward_decoder`'s result here.
      loss  MSE between pred and the (normalised) target patches over all patches, as officially.
    noise: None, or (N, mask_noise_len) in [0, 1); only row 0 is used. Its first L entries rank
    the tokens: the int(L * r) smallest get mask 1 (the official scatter of the first argsort
    indices), r = mask_ratio + noise[0, L] * range_mask_ratio (official: + uniform(0, range)).
    """

    def __init__(self, decoder_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4., norm_pix_loss=True,
                 img_size: Size2 = 224, patch_size=4, in_chans=3, num_classes=0, embed_dim=96,
                 depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=(7, 7, 14, 7), qkv_bias=True,
                 qk_scale=None, patch_norm=True, drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0,
                 norm_layer=nn.LayerNorm, use_checkpoint=False, range_mask_ratio=0.0, decoder_embed_dim=None):
        # num_classes and qk_scale are accepted as by the official class, which ignores them too.
        # decoder_embed_dim: the MAE models' name for decoder_dim (the engine's --decoder_embed_dim).
        decoder_dim = decoder_dim if decoder_embed_dim is None else decoder_embed_dim
        super().__init__(img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
                         qkv_bias, patch_norm, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, use_checkpoint)
        self.decoder_dim = decoder_dim
        self.decoder_depth = decoder_depth
        self.decoder_num_heads = decoder_num_heads
        self.norm_pix_loss = norm_pix_loss
        self.range_mask_ratio = range_mask_ratio
        self.mask_grid = self.stage_grids[-1]
        self.out_num_patches = self.mask_grid[0] * self.mask_grid[1]

        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        trunc_normal_(self.mask_token, mean=0., std=.02)
        self._make_pos_embed()
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.out_num_patches, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        # timm's Block with the official nn.LayerNorm (eps 1e-5; timm's default would be 1e-6).
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        self.absolute_pos_embed.data.copy_(sincos_pos_embed_tensor(self.embed_dim, self.patch_embed.grid_size,
                                                                   cls_token=False))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_tensor(self.decoder_dim, self.mask_grid, cls_token=False))
        self.apply(self._init_weights)

    default_mask_ratio = 0.5  # the official MixMIM default
    mixes_images = True
    takes_range_mask_ratio = True

    def shard_units(self) -> List[nn.Module]:
        return [*self.encoder_blocks(), *self.decoder_blocks]

    @property
    def decoder_arch(self) -> dict:
        """The decoder's size, under the MAE models' argument names (checkpoints record it)."""
        return dict(decoder_embed_dim=self.decoder_dim, decoder_depth=self.decoder_depth,
                    decoder_num_heads=self.decoder_num_heads)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Official set (the official pretraining optimizer does not use it: mask_token is decayed there)."""
        return {"mask_token"}

    # ------------------------------------------------------------------ patches
    @property
    def patch_size(self) -> int:
        """The reconstruction unit (32 pixels officially), not the 4-pixel embedding patch."""
        return self.encoder_stride

    @property
    def mask_noise_len(self) -> int:
        """Length of a noise row: one entry per final-stage token, plus one for the extra ratio."""
        return self.out_num_patches + 1

    def mask_noise_len_at(self, input_size: int) -> int:
        """Only the size the model was built for: its windows and fixed tables are sized for it."""
        if (input_size, input_size) != self.img_size:
            raise ValueError(f"this model was built for {self.img_size[0]}x{self.img_size[1]} images, not "
                             f"{input_size}x{input_size}")
        return self.mask_noise_len

    def mask_counts(self, mask_ratio: float) -> MaskCounts:
        """random_masking mixes int(L * r) of the L final tokens, r = mask_ratio plus at most
        range_mask_ratio: the fewest mixed at r = mask_ratio, the fewest kept at its maximum."""
        length = self.out_num_patches
        kept = length - math.floor(length * (mask_ratio + self.range_mask_ratio))
        return MaskCounts(length, int(length * mask_ratio), kept, "tokens")

    def grid_of(self, imgs: torch.Tensor) -> Tuple[int, int]:
        return patch_grid(imgs, self.patch_size, "reconstruction unit")

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C) at the reconstruction unit p, each patch flattened as (p, q, c)."""
        return patchify(imgs, self.patch_size, self.grid_of(imgs))

    def unpatchify(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W). grid defaults to the model's mask grid."""
        return unpatchify(x, self.patch_size, self.in_chans, grid or self.mask_grid)

    def mix(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mixed images the encoder sees, in pixel space (for pictures): image i where mask
        is 0, its batch mirror N-1-i where it is 1. mask: (L,) or (N, L) on the mask grid."""
        h, w = self.grid_of(imgs)
        p = self.patch_size
        m = mask.to(imgs.dtype).reshape(-1, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)
        return imgs * (1 - m) + imgs.flip(0) * m

    # ------------------------------------------------------------------ masking
    def random_masking(self, n: int, mask_ratio: float, noise: Optional[torch.Tensor] = None,
                       device=None) -> torch.Tensor:
        """The batch's shared mask (L,) float on the final-stage grid (see the class doc)."""
        length = self.out_num_patches
        if noise is None:
            noise = torch.rand(1, length + 1, device=device)
        elif noise.dim() != 2 or noise.shape[1] != length + 1 or noise.shape[0] != n:
            raise ValueError(f"noise must have shape {(n, length + 1)}, got {tuple(noise.shape)}")
        row = noise[0]
        rank = torch.argsort(torch.argsort(row[:length]))
        if self.range_mask_ratio > 0:
            # As the official int(L * (mask_ratio + uniform(0, range))), in float64, without a host sync.
            num_mixed = torch.floor((mask_ratio + row[length].double() * self.range_mask_ratio) * length)
        else:
            num_mixed = int(length * mask_ratio)
        return (rank < num_mixed).float()

    def stage_masks(self, mask: torch.Tensor) -> List[torch.Tensor]:
        """The final-grid mask (L,) nearest-upsampled to every stage's grid, each flattened."""
        m = mask.view(1, 1, *self.mask_grid)
        return [F.interpolate(m, size=grid, mode="nearest").flatten() for grid in self.stage_grids]

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mixed encoding: (N, L, num_features); row i holds image i where mask is 0 and its
        mirror N-1-i where mask is 1."""
        return self.encode(imgs, self.stage_masks(mask))

    def encoder_features(self, imgs: torch.Tensor) -> dict:
        return {"patch_mean": self.encode(imgs).mean(dim=1)}  # no class token

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, num_features) -> (2N, L, p*p*C), the official x_rec: rows :N predict where mask
        is 1 (image i), rows N: where it is 0 (the mirror image)."""
        x = self.decoder_embed(x)
        m = mask.view(1, -1, 1)
        tok = self.mask_token
        x = torch.cat([x * (1 - m) + tok * m, x * m + tok * (1 - m)], dim=0)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    @staticmethod
    def unmix(x_rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(2N, L, D) decoder output -> (N, L, D): for image i, where mask is 1 the prediction of
        its own row, where mask is 0 that of its mirror's second copy."""
        n = x_rec.shape[0] // 2
        m = mask.view(1, -1, 1)
        return x_rec[:n] * m + x_rec[n:].flip(0) * (1 - m)

    def forward_target(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.pixel_target(imgs)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every patch of every image: each was predicted unseen."""
        return ((pred - self.forward_target(imgs)) ** 2).mean()  # promotion, as the official code

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.5, noise: Optional[torch.Tensor] = None):
        n = imgs.shape[0]
        mask = self.random_masking(n, mask_ratio, noise, imgs.device)
        latent = self.forward_encoder(imgs, mask)
        pred = self.unmix(self.forward_decoder(latent, mask), mask)
        loss = self.forward_loss(imgs, pred)
        return loss, pred, mask.unsqueeze(0).expand(n, -1).contiguous()


class MixMIMClassifier(PretrainedClassifier, _MixMIMEncoder):
    """The official fine-tuning model (models_mixmim_ft.MixMIM): the encoder without mixing,
    global average pooling of the final tokens after `norm`, and a linear `head`.

    Its encoder names equal the pretraining model's: a pretraining checkpoint loads with only
    head.* missing (decoder_*, mask_token unexpected). There is no class token, so global_pool
    must be True/'avg'.
    """
    num_prefix_tokens = 0
    has_class_token = False

    def __init__(self, img_size: Size2 = 224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=(7, 7, 14, 7), qkv_bias=True,
                 qk_scale=None, patch_norm=True, drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0,
                 norm_layer=nn.LayerNorm, mlp_ratio=4., use_checkpoint=False, global_pool="avg", ape=True):
        # qk_scale and ape are accepted as by the official class, which ignores them too.
        if global_pool is True:
            global_pool = "avg"
        if global_pool != "avg":
            raise ValueError(f"MixMIM has no class token: global_pool must be True or 'avg', got {global_pool!r}")
        super().__init__(img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
                         qkv_bias, patch_norm, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, use_checkpoint)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._make_pos_embed()
        self.initialize_weights()

    def initialize_weights(self):
        self.absolute_pos_embed.data.copy_(sincos_pos_embed_tensor(self.embed_dim, self.patch_embed.grid_size,
                                                                   cls_token=False))
        self.apply(self._init_weights)

    @property
    def uses_global_pool(self) -> bool:
        return True

    def shard_units(self) -> List[nn.Module]:
        return self.encoder_blocks()

    @property
    def input_stride(self) -> int:
        return self.encoder_stride

    @property
    def allowed_missing_keys(self) -> FrozenSet[str]:
        return super().allowed_missing_keys | {"absolute_pos_embed"}

    def adapt_pretrained(self, state: dict) -> dict:
        """Also drops the fixed sin-cos absolute_pos_embed of another input size: the model made
        its own for its grid."""
        state = super().adapt_pretrained(state)
        if "absolute_pos_embed" in state and state["absolute_pos_embed"].shape != self.absolute_pos_embed.shape:
            del state["absolute_pos_embed"]
        return state

    @torch.jit.ignore
    def no_weight_decay(self):
        """Official: empty (1-D parameters are exempt anyway; the bias tables are decayed)."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> normalised final-stage tokens (N, L, num_features), as timm models."""
        return self.encode(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- factories
# Official architectures (encoder; the pretraining decoder is 512-d, 8 blocks, 16 heads). Windows
# (14, 14, 14, 7) fit 224 (grids 56, 28, 14, 7) and multiples of 224.
_ARCH = {
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=(14, 14, 14, 7)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=(14, 14, 14, 7)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), window_size=(14, 14, 14, 7)),
    # Tests and CPU demos. img_size must be a multiple of 64 (64, 128, ...): at 64 the windows
    # (16, 8, 4, 2) are the whole grid of every stage, at 128 each holds 2x2 mask cells. All
    # these sizes share the state-dict shapes except the two fixed sin-cos tables.
    "mini": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(16, 8, 4, 2)),
}
_DECODER = {"mini": dict(decoder_dim=64, decoder_depth=2, decoder_num_heads=4)}
_DEFAULT_DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)
_IMG_SIZE = {"mini": 64}


def _pretrain(size, kwargs):
    """Architecture defaults, overridable by the caller (as models/mae.py _mae)."""
    args = dict(img_size=_IMG_SIZE.get(size, 224), mlp_ratio=4, **_ARCH[size], **_DECODER.get(size, _DEFAULT_DECODER))
    return MixMIM(**{**args, **kwargs})


def _classifier(size, kwargs):
    args = dict(img_size=_IMG_SIZE.get(size, 224), mlp_ratio=4, num_classes=1000, **_ARCH[size])
    return MixMIMClassifier(**{**args, **kwargs})


@register_model(task="pretrain")
def mixmim_mini(**kwargs):
    """32-d, depths (1, 1, 2, 1) encoder with a 64-d, 2-block decoder (tests, CPU demos; img 64, 128, ...)."""
    return _pretrain("mini", kwargs)


@register_model(task="pretrain")
def mixmim_base(**kwargs):
    """MixMIM-B (Swin-B/W14): 128-d, depths (2, 2, 18, 2), heads (4, 8, 16, 32)."""
    return _pretrain("base", kwargs)


@register_model(task="pretrain")
def mixmim_large(**kwargs):
    """MixMIM-L (Swin-L/W14): 192-d, heads (6, 12, 24, 48)."""
    return _pretrain("large", kwargs)


@register_model(task="pretrain")
def mixmim_huge(**kwargs):
    """MixMIM-H: 352-d, heads (11, 22, 44, 88)."""
    return _pretrain("huge", kwargs)


@register_model(name="mixmim_mini", task="classify")
def mixmim_mini_classifier(**kwargs):
    return _classifier("mini", kwargs)


@register_model(name="mixmim_base", task="classify")
def mixmim_base_classifier(**kwargs):
    return _classifier("base", kwargs)


@register_model(name="mixmim_large", task="classify")
def mixmim_large_classifier(**kwargs):
    return _classifier("large", kwargs)


@register_model(name="mixmim_huge", task="classify")
def mixmim_huge_classifier(**kwargs):
    return _classifier("huge", kwargs)
