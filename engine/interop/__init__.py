"""Foreign formats: export to timm / transformers / official files, and the model card."""
