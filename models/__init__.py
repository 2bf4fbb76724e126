"""Model definitions. Nothing here knows about distributed training or the CLI."""
from . import mae, vit  # noqa: F401  (registers the factories)
from .mae import MaskedAutoencoderViT
from .registry import create_model, list_models, model_task
from .vit import VisionTransformer

__all__ = ["MaskedAutoencoderViT", "VisionTransformer", "create_model", "list_models", "model_task"]
