"""Name -> factory registry, so the CLIs can build any model by name and list the choices.

Two tables, as in the official MAE and MixMIM code bases, where the pretraining and the
fine-tuning model of one architecture share a name (`mixmim_base` is both): "pretrain" holds
the masked-image models, "classify" the classifiers that fine-tuning and linear probing build.

Besides the tables, a task can have resolvers: families of names too many to list (every timm
ViT, models/timm_vit.py), matched by a rule and built on demand. Registered names win.
"""
from typing import Callable, Dict, List, Optional, Tuple

TASKS = ("pretrain", "classify")
PRETRAIN_PREFIX = "mae_"  # mae_vit_base_patch16 pretrains the encoder vit_base_patch16 (official names)
_MODELS: Dict[str, Dict[str, Callable]] = {task: {} for task in TASKS}
_RESOLVERS: Dict[str, List[Tuple[Callable[[str], Optional[Callable]], str]]] = {task: [] for task in TASKS}


def register_model(fn: Callable = None, name: str = None, task: str = "classify"):
    """Register `fn` under `name` (default: its __name__); usable as @register_model or
    @register_model(task="pretrain")."""
    if fn is None:
        return lambda f: register_model(f, name, task)
    _MODELS[task][name or fn.__name__] = fn
    return fn


def register_resolver(resolve: Callable[[str], Optional[Callable]], task: str, rule: str) -> None:
    """resolve(name) -> a factory for `name`, or None when the name is not of its family. It is
    asked about every unregistered name, so it must only look at the name (no model building).
    rule: the names it takes, for the unknown-name error (e.g. "mae_<timm ViT name>")."""
    _RESOLVERS[task].append((resolve, rule))


def list_models(prefix: str = "", task: Optional[str] = None) -> List[str]:
    """Registered names only: the families of the resolvers are described by rules()."""
    tables = [_MODELS[task]] if task else _MODELS.values()
    return sorted({n for table in tables for n in table if n.startswith(prefix)})


def rules(task: Optional[str] = None) -> List[str]:
    """The resolvers' descriptions of the names they build."""
    return [rule for t in ([task] if task else TASKS) for _, rule in _RESOLVERS[t]]


def _factory(name: str, task: str) -> Optional[Callable]:
    if name in _MODELS[task]:
        return _MODELS[task][name]
    for resolve, _ in _RESOLVERS[task]:
        factory = resolve(name)
        if factory is not None:
            return factory
    return None


def model_task(name: str) -> List[str]:
    """The tasks that have a model called `name`."""
    return [task for task in TASKS if _factory(name, task) is not None]


def choices(task: Optional[str] = None, prefix: str = "") -> str:
    """'a, b, c, or <rule>': every registered name of the task, those starting with prefix first
    (the family of a mistyped name), then the resolvers' rules, for error messages."""
    names = list_models(task=task)
    first = [n for n in names if prefix and n.startswith(prefix)]
    return ", ".join(first + [n for n in names if n not in first] + [f"or {rule}" for rule in rules(task)])


def create_model(name: str, task: Optional[str] = None, **kwargs):
    """Build model `name` of `task`; without a task, the name must belong to one task only."""
    tasks = [task] if task else model_task(name)
    if len(tasks) > 1:
        raise ValueError(f"model '{name}' exists for {' and '.join(tasks)}: pass task=")
    factory = _factory(name, tasks[0]) if tasks else None
    if factory is None:
        family = name.split("_")[0] + "_" if "_" in name else ""
        raise ValueError(f"unknown model '{name}'; choose one of: {choices(task, family)}")
    return factory(**kwargs)


def encoder_name(name: str) -> str:
    """The classifier (encoder) name of a pretraining model name: mae_vit_base_patch16 ->
    vit_base_patch16; a name without the prefix (MixMIM's, shared by both tasks) is its own."""
    return name[len(PRETRAIN_PREFIX):] if name.startswith(PRETRAIN_PREFIX) else name


def pretrain_name(name: str) -> str:
    """The pretraining model name of an encoder name: vit_base_patch16 -> mae_vit_base_patch16."""
    return name if name.startswith(PRETRAIN_PREFIX) else PRETRAIN_PREFIX + name


def counterpart(name: str) -> str:
    """The same architecture's name for the other task's prefix convention (mae_x <-> x)."""
    return encoder_name(name) if name.startswith(PRETRAIN_PREFIX) else PRETRAIN_PREFIX + name
