"""Model definitions. Nothing here knows about distributed training or the CLI.

models/base.py is the contract between the models and their users: MaskedImageModel (pretraining)
and PretrainedClassifier (fine-tuning, linear probing); models/registry.py builds them by name.
"""
from . import mae, mixmim, timm_vit, vit  # noqa: F401  (registers the factories and the timm ViT rule)
from .base import MaskCounts, MaskedImageModel, PretrainedClassifier
from .mae import MaskedAutoencoderViT
from .mixmim import MixMIM, MixMIMClassifier
from .registry import create_model, list_models, model_task
from .vit import VisionTransformer

__all__ = ["MaskCounts", "MaskedAutoencoderViT", "MaskedImageModel", "MixMIM", "MixMIMClassifier",
           "PretrainedClassifier", "VisionTransformer", "create_model", "list_models", "model_task"]
