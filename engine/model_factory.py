"""--model -> a model of the registry, with the registry's refusals as one-line errors."""
import models
from models.registry import choices
from util.errors import UserError

_TASKS = {"pretrain": "a pretraining model", "classify": "a classifier"}


def build_model(name: str, task: str, **kwargs):
    """models.create_model(name, task, **kwargs) with one-line errors for an unknown name or a
    model of the other task (e.g. a classifier name given to pretraining), listing the choices."""
    what = _TASKS[task]
    if models.model_task(name) and task not in models.model_task(name):
        raise UserError(f"--model {name} is not {what}; choose one of: {choices(task)}")
    try:
        return models.create_model(name, task, **kwargs)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
