"""What the epoch loop and the recipe runner need of their parts, written down (typing.Protocol).

The trainer (engine/trainer.py) takes a strategy, a training loader, a checkpointer and a log
writer; these say which calls it makes, so that a new strategy, data source, checkpoint backend
or logger knows what to provide, and tests check that every implementation does
(tests/test_protocols.py, with isinstance on these runtime-checkable classes).
"""
from contextlib import AbstractContextManager
from typing import Callable, Iterator, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class Strategy(Protocol):
    """How the model is spread over the processes (engine/distributed.py: DDPStrategy, FSDPStrategy)."""
    name: str
    sharded: bool            # checkpoints are sharded directories written by every rank
    device: Optional[torch.device]

    def build(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module: ...
    def init_head(self, model: torch.nn.Module, std: float) -> None: ...
    def load_model_state(self, model: torch.nn.Module, state: dict, strict: bool = True) -> None: ...
    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None: ...
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def no_sync(self, model: torch.nn.Module) -> AbstractContextManager: ...
    def module(self, model: torch.nn.Module) -> torch.nn.Module: ...


@runtime_checkable
class TrainLoader(Protocol):
    """The training loader as the loop sees it (engine/data/loader.py TrainLoader): iterating yields
    the batches from the position set to the end of the epoch."""
    @property
    def iters_per_epoch(self) -> int: ...
    @property
    def global_batch(self) -> int: ...
    def set_position(self, epoch: int, samples_done: int = 0) -> None: ...
    def __iter__(self) -> Iterator: ...


@runtime_checkable
class Checkpointer(Protocol):
    """Writes the run's checkpoints (engine/checkpoint/): every rank calls save(); close() waits for
    a save still being written in the background."""
    last_name: str           # the newest checkpoint's name, for messages
    extra_state: dict        # plain data every checkpoint carries (the W&B run id)

    def save(self, epoch: int, epoch_iter: int, epoch_iters: int, samples_in_epoch: int, numbered: bool = False,
             best: bool = False, extra: Optional[dict] = None) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class LogWriter(Protocol):
    """Scalars and pictures for tensorboard and W&B (engine/reporting/logs.py LogWriters), on rank 0."""
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...
    def add_image(self, tag: str, image, step: int) -> None: ...
    def end_row(self) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
