"""How the training model is spread over the processes: the one place that knows.

The trainer, the checkpointer and the recipes' evaluation and picture hooks ask a strategy for
what depends on it: the model to train (wrapped), a context for the micro-steps of gradient
accumulation, the full state for a checkpoint, and the plain module. Resume loads a checkpoint
into the plain module before wrap().

Today there is one strategy, DataParallel: a whole replica per process, DDP with several.
A sharded strategy (FSDP2's fully_shard) is another class with the same methods: its state is
gathered by every rank together (torch.distributed.checkpoint.state_dict with
full_state_dict=True), which is why every rank calls model_state() and optimizer_state().
"""
from contextlib import nullcontext
from typing import Optional

import torch

from util import dist as dist_util


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and torch.compile wrappers (its state-dict keys are the model's)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class DataParallel:
    """Every process holds the whole model and optimizer state; with several processes DDP
    averages the gradients during backward."""

    def __init__(self, device: Optional[torch.device] = None, compile: bool = False, grad_ckpt: bool = False):
        self.device, self.compile, self.grad_ckpt = device, compile, grad_ckpt

    @classmethod
    def from_args(cls, args, device: torch.device) -> "DataParallel":
        return cls(device, compile=args.compile, grad_ckpt=args.grad_ckpt)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Activation checkpointing, torch.compile, then DDP when there are several processes.

        Every parameter takes part in every step, so DDP runs without find_unused_parameters.
        """
        if self.grad_ckpt:
            model.set_grad_checkpointing(True)
        if self.compile:
            model = torch.compile(model)
        if dist_util.get_world_size() > 1:
            device = self.device
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device is not None and device.type == "cuda" else None)
        return model

    @staticmethod
    def no_sync(model: torch.nn.Module):
        """For the micro-steps of an accumulation window: gradients stay local, and are averaged
        once, in the backward pass of the window's last micro-step."""
        return model.no_sync() if hasattr(model, "no_sync") else nullcontext()

    @staticmethod
    def module(model: torch.nn.Module) -> torch.nn.Module:
        """The module to evaluate or draw pictures with, on any rank, outside the training step."""
        return unwrap(model)

    @staticmethod
    def model_state(model: torch.nn.Module) -> Optional[dict]:
        """The full state dict for a checkpoint on rank 0, None on the others; every rank calls it."""
        return unwrap(model).state_dict() if dist_util.is_main_process() else None

    @staticmethod
    def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        """The optimizer's full state on rank 0, None on the others; every rank calls it."""
        return optimizer.state_dict() if dist_util.is_main_process() else None
