"""Model definitions. Nothing here knows about distributed training or the CLI."""
from . import mae  # noqa: F401  (registers the MAE factories)
from .mae import MaskedAutoencoderViT
from .registry import create_model, list_models

__all__ = ["MaskedAutoencoderViT", "create_model", "list_models"]
