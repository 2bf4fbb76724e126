"""Model definitions. Nothing here knows about distributed training or the CLI."""
from . import mae, mixmim, timm_vit, vit  # noqa: F401  (registers the factories and the timm ViT rule)
from .mae import MaskedAutoencoderViT
from .mixmim import MixMIM, MixMIMClassifier
from .registry import create_model, list_models, model_task
from .vit import VisionTransformer

__all__ = ["MaskedAutoencoderViT", "MixMIM", "MixMIMClassifier", "VisionTransformer", "create_model", "list_models",
           "model_task"]
