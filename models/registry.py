"""Name -> factory registry, so the CLIs can build any model by name and list the choices."""
from typing import Callable, Dict, List

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable, name: str = None) -> Callable:
    _MODELS[name or fn.__name__] = fn
    return fn


def list_models(prefix: str = "") -> List[str]:
    return sorted(n for n in _MODELS if n.startswith(prefix))


def create_model(name: str, **kwargs):
    if name not in _MODELS:
        family = name.split("_")[0] + "_" if "_" in name else ""
        choices = list_models(family) or list_models()
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(choices)}")
    return _MODELS[name](**kwargs)
