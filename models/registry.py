"""Name -> factory registry, so the CLIs can build any model by name and list the choices.

Two tables, as in the official MAE and MixMIM code bases, where the pretraining and the
fine-tuning model of one architecture share a name (`mixmim_base` is both): "pretrain" holds
the masked-image models, "classify" the classifiers that fine-tuning and linear probing build.
"""
from typing import Callable, Dict, List, Optional

TASKS = ("pretrain", "classify")
_MODELS: Dict[str, Dict[str, Callable]] = {task: {} for task in TASKS}


def register_model(fn: Callable = None, name: str = None, task: str = "classify"):
    """Register `fn` under `name` (default: its __name__); usable as @register_model or
    @register_model(task="pretrain")."""
    if fn is None:
        return lambda f: register_model(f, name, task)
    _MODELS[task][name or fn.__name__] = fn
    return fn


def list_models(prefix: str = "", task: Optional[str] = None) -> List[str]:
    tables = [_MODELS[task]] if task else _MODELS.values()
    return sorted({n for table in tables for n in table if n.startswith(prefix)})


def model_task(name: str) -> List[str]:
    """The tasks that have a model called `name`."""
    return [task for task in TASKS if name in _MODELS[task]]


def create_model(name: str, task: Optional[str] = None, **kwargs):
    """Build model `name` of `task`; without a task, the name must belong to one table only."""
    tasks = [task] if task else model_task(name)
    if len(tasks) > 1:
        raise ValueError(f"model '{name}' exists for {' and '.join(tasks)}: pass task=")
    if not tasks or name not in _MODELS[tasks[0]]:
        family = name.split("_")[0] + "_" if "_" in name else ""
        choices = list_models(family, task) or list_models(task=task)
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(choices)}")
    return _MODELS[tasks[0]][name](**kwargs)
