"""What a state dict of this package's models holds, read from its key names alone.

The conventions every family keeps (models/base.py): a pretraining model's decoder parameters
start with `decoder_` (its prediction layer is `decoder_pred`) or are `mask_token`; a classifier's
head is `head.*`. So a checkpoint can be told apart (and its decoder dropped) without knowing
which family wrote it. Adapting the encoder weights to a classifier is the classifier's own job
(PretrainedClassifier.adapt_pretrained).
"""
import math
from typing import Dict, Optional

import torch

DECODER_PREFIXES = ("decoder_", "mask_token")
HEAD_PREFIX = "head."


def checkpoint_kind(state_dict: Dict[str, torch.Tensor]) -> str:
    """'pretrain' (a masked-image model with its decoder), 'classify' (a classification head) or
    'encoder' (neither: encoder weights only, like the official mae_pretrain_vit_*.pth)."""
    if any(k.startswith("decoder_pred.") for k in state_dict):
        return "pretrain"
    if any(k.startswith(HEAD_PREFIX) for k in state_dict):
        return "classify"
    return "encoder"


def has_decoder(state_dict: Dict[str, torch.Tensor]) -> bool:
    """False for encoder-only weights (the official mae_pretrain_vit_*.pth releases)."""
    return "mask_token" in state_dict and any(k.startswith("decoder_pred.") for k in state_dict)


def without_decoder(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors of a state dict, less the decoder's (an official checkpoint may hold other values)."""
    return {k: v for k, v in state_dict.items() if torch.is_tensor(v) and not k.startswith(DECODER_PREFIXES)}


def other_head_pooling(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> Optional[str]:
    """How a classifier checkpoint's head pools when it is the other choice than the model's:
    'avg' (averaged patch tokens, fc_norm) or 'token' (class token after the final norm); None when
    the heads agree or the state dict has neither layout."""
    pooled = "fc_norm.weight" in state
    if pooled != ("fc_norm.weight" in own) and "norm.weight" in (own if pooled else state):
        return "avg" if pooled else "token"
    return None


def trained_input_size(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """The image size a plain-ViT state dict was built for, from its square pos_embed table (class
    token + patches) and patch size; None when the keys do not tell."""
    pos, proj = state_dict.get("pos_embed"), state_dict.get("patch_embed.proj.weight")
    if pos is not None and proj is not None and pos.dim() == 3:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            return side * proj.shape[-1]
    return None
