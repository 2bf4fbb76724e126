"""Images <-> flattened patches, the layout of the MAE (and MixMIM) pixel targets, and the
norm_pix_loss normalisation of those targets."""
from typing import Tuple

import torch


def patch_grid(imgs: torch.Tensor, p: int, unit: str = "patch size") -> Tuple[int, int]:
    """(h, w) patches of p x p pixels in (N, C, H, W) images."""
    h, w = imgs.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the {unit} {p}")
    return h // p, w // p


def patchify(imgs: torch.Tensor, p: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch flattened as (p, q, c) (the official order)."""
    h, w = grid
    n, c = imgs.shape[:2]
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, grid: Tuple[int, int]) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W) for an (h, w) grid of patches."""
    h, w = grid
    if h * w != x.shape[1]:
        raise ValueError(f"{x.shape[1]} patches do not form a {h}x{w} grid")
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


# The norm_pix_loss target (official forward_loss): each patch in units of its own mean and std,
# unbiased variance, eps 1e-6 inside the square root. The pictures invert it with the same
# statistics, so both directions live here.
def _pix_stats(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + 1.e-6) ** .5


def norm_pix_target(patches: torch.Tensor) -> torch.Tensor:
    """(N, L, D) patches -> each patch normalised by its own mean and std (the norm_pix_loss target)."""
    mean, std = _pix_stats(patches)
    return (patches - mean) / std


def denorm_pix_target(pred: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The inverse of norm_pix_target for a prediction: pred * std + mean, with the statistics of
    the target `patches` it was trained against."""
    mean, std = _pix_stats(patches)
    return pred * std + mean
