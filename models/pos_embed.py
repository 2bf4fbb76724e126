"""Fixed 2-D sine-cosine position embeddings (MAE / MoCo v3 formulation), and the resampling of a
learned table to another patch grid (fine-tuning at another resolution).

The sin-cos values must equal the official tables bit for bit after the cast to float32, so the
arithmetic follows the official recipe: float32 grid, float64 frequencies, float64 result.
"""
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed

GridSize = Union[int, Sequence[int]]


def _hw(grid_size: GridSize) -> Tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    h, w = grid_size
    return int(h), int(w)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions of any shape -> (pos.size, embed_dim) as [sin | cos]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    if embed_dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    # The first half encodes grid[0] (the column index, see get_2d_sincos_pos_embed);
    # the official code calls it emb_h, and released checkpoints depend on this order.
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: GridSize, cls_token: bool = False) -> np.ndarray:
    """Table of shape (H*W [+1], embed_dim), row-major over the patch grid.

    grid_size is an int (square grid, as the official function) or (H, W). With cls_token,
    a zero row is prepended for the class token.
    """
    gh, gw = _hw(grid_size)
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w first: grid[0] varies along columns
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def sincos_pos_embed_tensor(embed_dim: int, grid_size: GridSize, cls_token: bool = True) -> torch.Tensor:
    """The table as a float32 tensor of shape (1, H*W [+1], embed_dim)."""
    return torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token)).float().unsqueeze(0)


def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """A learned (1, prefix + h*w, D) table of a square h x w patch grid, resampled to `grid`:
    bicubic, without antialiasing (the official interpolate_pos_embed), prefix rows (the class
    token's) kept. ValueError when the table's patch part is not a square grid."""
    patches = pos_embed.shape[1] - num_prefix_tokens
    old = int(round(patches ** 0.5))
    if old * old != patches:
        raise ValueError(f"cannot resample a position embedding of {patches} patches (not a square grid)")
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[old, old],
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)
