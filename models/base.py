"""The contract between the models and their users (engine/, scripts/): everything those may ask
of a masked-image pretraining model (MaskedImageModel) and of a classifier that fine-tunes or
linear-probes its encoder (PretrainedClassifier), so that no user needs to know a model family.

A family derives its classes from these and implements what they leave open; registering its
factories (models/registry.py) and importing its file in models/__init__.py is all it takes to
be trainable, fine-tunable, pictured and benchmarked. tests/test_model_contract.py runs every
registered family through the contract.

State-dict conventions of every family (models/state_dict.py tells checkpoints apart by them):
the decoder's parameters start with `decoder_` (the prediction layer is `decoder_pred`) or are
`mask_token`; a classifier's head is `head.*`, a Linear.

The bases are plain mixins (no nn.Module of their own, no state, no __init__), listed before
nn.Module or the family's module base, so that the state-dict layout, the initialisation order
and torch.compile see exactly the family's module.
"""
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .patches import norm_pix_target
from .state_dict import HEAD_PREFIX, without_decoder


class MaskCounts(NamedTuple):
    """How a mask ratio splits the maskable units of a model (at its input size)."""
    length: int    # maskable units per image
    removed: int   # fewest units masked (removed, or for a mixing model replaced)
    kept: int      # fewest units left visible
    unit: str      # what a unit is called in messages: "patches" or "tokens"


class MaskedImageModel:
    """A masked-image pretraining model: a masked encoder, a decoder, a pixel loss.

    Attributes every family sets (plain attributes or class attributes):
      in_chans            input channels
      norm_pix_loss       whether the target is each patch normalised by its own statistics
                          (patches.norm_pix_target)
      default_mask_ratio  the mask ratio of the family's paper (the engine's --mask_ratio default)
      mixes_images        False: masked patches are removed. True (MixMIM): they are replaced by
                          the patches of another image of the batch; then `mix` shows what the
                          encoder saw, and the loss depends on the per-process batch
      takes_range_mask_ratio
                          the factory accepts range_mask_ratio (a random extra ratio per batch)
      plain_vit_mae       the official models_mae layout: plain ViT encoder and decoder over a
                          class token and the patches (patch_embed, blocks, decoder_embed,
                          decoder_blocks, decoder_pred). benchmarks/flops.py counts its FLOPs
                          analytically, and transformers' ViTMAEForPreTraining is its peer
                          (benchmarks/benchmark.py --peer)
    """
    default_mask_ratio: float
    mixes_images: bool = False
    takes_range_mask_ratio: bool = False
    plain_vit_mae: bool = False
    in_chans: int
    norm_pix_loss: bool

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        """(loss, pred, mask) for normalised images (N, C, H, W).

        noise: None (drawn with torch.rand) or (N, mask_noise_len) in [0, 1), which fixes the mask
        (the engine draws it per sample, so masks are reproducible and resume is exact).
        loss: a scalar; pred: (N, L, patch_size**2 * in_chans), the prediction of every patch in
        target space (patches.norm_pix_target of the patches with norm_pix_loss); mask: (N, L)
        float, 1 where a patch was masked (removed or replaced), L = the patches of grid_of(imgs)."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        """Pixels per side of a reconstructed patch (and of a mask cell): the unit of patchify,
        of pred and mask, and what --input_size must be a multiple of."""
        raise NotImplementedError

    @property
    def mask_noise_len(self) -> int:
        """Length of a row of forward's noise at the size the model was built for."""
        raise NotImplementedError

    def mask_noise_len_at(self, input_size: int) -> int:
        """Length of a noise row for input_size x input_size images; ValueError when the model
        cannot take that size."""
        raise NotImplementedError

    @property
    def decoder_arch(self) -> Dict[str, int]:
        """The decoder as factory arguments (decoder_embed_dim, decoder_depth, decoder_num_heads):
        the factory given these rebuilds this decoder, so checkpoints record them."""
        raise NotImplementedError

    def mask_counts(self, mask_ratio: float) -> MaskCounts:
        """How many units `mask_ratio` masks and keeps, rounded as forward rounds them (the
        fewest of each over a random extra ratio)."""
        raise NotImplementedError

    def grid_of(self, imgs: torch.Tensor) -> Tuple[int, int]:
        """(h, w) patches of patch_size in the images; ValueError when the size does not divide."""
        raise NotImplementedError

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, patch_size**2 * C), each patch flattened as (p, q, c)."""
        raise NotImplementedError

    def unpatchify(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The inverse of patchify; grid (h, w) for grids the model cannot guess."""
        raise NotImplementedError

    def shard_units(self) -> List[nn.Module]:
        """The modules a sharded strategy wraps one by one (FSDP2's fully_shard per unit, then the
        root: engine/distributed.py): every transformer block of the encoder and of the decoder, in
        the order forward runs them. Disjoint; every parameter outside them belongs to the root."""
        raise NotImplementedError

    def encoder_features(self, imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The encoder's view of whole images (nothing masked or mixed, nothing drawn from any RNG),
        what engine/monitor.py probes: 'patch_mean' (N, D), the mean of the final patch tokens, and
        'cls' (N, D), the final class token, in families that have one."""
        raise NotImplementedError

    def mix(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only for mixes_images: the images the encoder saw, in pixel space (for pictures)."""
        raise NotImplementedError(f"{type(self).__name__} does not mix images")

    def pixel_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What pred is compared with: the patches, normalised per patch with norm_pix_loss."""
        target = self.patchify(imgs)
        return norm_pix_target(target) if self.norm_pix_loss else target


class PretrainedClassifier:
    """A classifier over the encoder of a MaskedImageModel (fine-tuning, linear probing).

    Attributes every family sets:
      has_class_token     whether there is a class token (--cls_token pools it)
      num_prefix_tokens   tokens before the patches (the class token)
      head                the classification layer, an nn.Linear named `head`
    """
    has_class_token: bool
    num_prefix_tokens: int
    head: nn.Module

    @property
    def uses_global_pool(self) -> bool:
        """True when the head averages the patch tokens, False when it takes the class token."""
        raise NotImplementedError

    def shard_units(self) -> List[nn.Module]:
        """As MaskedImageModel.shard_units: every transformer block of the encoder."""
        raise NotImplementedError

    @property
    def input_stride(self) -> int:
        """Pixels per final token along a side: --input_size must be a multiple of it."""
        raise NotImplementedError

    @property
    def allowed_missing_keys(self) -> FrozenSet[str]:
        """Keys of this model that adapt_pretrained's result may lack: initialised here, not
        pretrained (the head, a pooled head's norm, tables the model computes)."""
        return frozenset({HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"})

    def adapt_pretrained(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A pretraining checkpoint's state dict (its decoder included, or an encoder-only or
        classifier state dict) -> the entries this model takes, adapted to it (timm's
        checkpoint_filter_fn): tensors only, the decoder dropped, a head of another number of
        classes dropped. Families add their own steps (resampled position tables, ...). The
        result loads with load_state_dict(strict=False), missing at most allowed_missing_keys;
        anything else left over is the caller's mismatch to report. ValueError when an entry
        cannot be adapted."""
        state = without_decoder(state)
        own = self.state_dict()
        for k in (HEAD_PREFIX + "weight", HEAD_PREFIX + "bias"):
            if k in state and k in own and state[k].shape != own[k].shape:
                del state[k]  # another number of classes
        return state

    def init_head(self, std: float) -> None:
        """Re-initialise the head for training from pretrained weights (trunc_normal weights)."""
        self.init_head_weight(self.head.weight, std)

    @staticmethod
    def init_head_weight(weight: torch.Tensor, std: float) -> None:
        """init_head's draw, on any tensor of the head weight's shape (a sharded trainer draws the
        full weight, as an unsharded model does, and keeps its own part)."""
        nn.init.trunc_normal_(weight, std=std)
