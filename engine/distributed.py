"""How the training model is spread over the processes: the one place that knows.

The trainer, the checkpointer and the recipes' evaluation and picture hooks ask a strategy for
what depends on it: the model built on its device (build), the model to train (wrap), a context
for the micro-steps of gradient accumulation, the state for a checkpoint and how to load one, and
the module to evaluate. Resume loads a checkpoint between build() and wrap().

Two strategies, chosen by --dist_strategy: DDPStrategy (ddp, the default) keeps a whole replica
per process, DDP with several; FSDPStrategy (fsdp) shards every transformer block and the root
with FSDP2's fully_shard over the processes (or, with --fsdp_shard_size, inside groups of ranks
that replicate each other), so a rank holds 1/N of the fp32 weights, gradients and AdamW state.
Under FSDP the model is sharded when it is built (build()), checkpoints are sharded directories
(engine/checkpoint/dcp.py) and every rank takes part in everything that touches the weights
(evaluation, pictures, checkpoints), since a forward pass all-gathers each block.
"""
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch

from util import dist as dist_util
from util.errors import UserError

from .sharded_init import build_sharded


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and torch.compile wrappers (its state-dict keys are the model's)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class DDPStrategy:
    """Every process holds the whole model and optimizer state; with several processes DDP
    averages the gradients during backward."""
    name = "ddp"
    sharded = False  # checkpoints are single files written by rank 0 (engine/checkpoint/single_file.py)

    def __init__(self, device: Optional[torch.device] = None, compile: bool = False, grad_ckpt: bool = False):
        self.device, self.compile, self.grad_ckpt = device, compile, grad_ckpt

    @classmethod
    def from_config(cls, dist, device: torch.device) -> "DDPStrategy":
        """dist: the run's DistConfig (engine/config.py)."""
        return cls(device, compile=dist.compile, grad_ckpt=dist.grad_ckpt)

    def build(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model the recipe makes, as it is (on the CPU: the recipe loads weights into it and
        moves it to the device, as before FSDP existed). Each rank initialises its own; DDP
        broadcasts rank 0's weights when it wraps them."""
        return make()

    @staticmethod
    def init_head(model: torch.nn.Module, std: float) -> None:
        model.init_head(std)

    @staticmethod
    def load_model_state(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
        """A full (plain-tensor) state dict into the model before wrap()."""
        unwrap(model).load_state_dict(state, strict=strict)

    @staticmethod
    def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """A full optimizer state (optimizer.state_dict()'s format) into the optimizer."""
        optimizer.load_state_dict(state)

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


class FSDPStrategy:
    """FSDP2 (torch.distributed.fsdp.fully_shard): each of the model's shard_units() (every
    transformer block of encoder and decoder, MixMIM's too) and then the root are sharded over a
    device mesh; a unit's full weights exist only during its own forward and backward.

    shard_size: ranks per sharding group. 0 or the world size: one group (full sharding, a 1-D
    mesh). Fewer: hybrid sharding, a 2-D mesh (replicate across groups, shard inside each, e.g.
    one node), whose gradients are reduce-scattered inside a group and all-reduced across groups.

    Precision: the master weights, gradients and AdamW state stay fp32, and --amp bf16 runs the
    forward under autocast as the DDP path does, not with MixedPrecisionPolicy(param_dtype=bf16):
    measured, autocast gives DDP's weights bit for bit while the policy drifts further than bf16
    itself, at the cost of an fp32 all-gather (docs/benchmarks.md, "FSDP precision").
    """
    name = "fsdp"
    sharded = True  # checkpoints are directories written by every rank (engine/checkpoint/dcp.py)

    def __init__(self, device: Optional[torch.device] = None, compile: bool = False, grad_ckpt: bool = False,
                 shard_size: int = 0):
        self.device, self.compile, self.grad_ckpt = device, compile, grad_ckpt
        self.shard_size = shard_size
        self._mesh = None

    @classmethod
    def from_config(cls, dist, device: torch.device) -> "FSDPStrategy":
        """After setup_runtime(). A single process without a launcher gets a process group of
        one (FSDP2 and torch.distributed.checkpoint need one): the run is then a one-rank shard,
        and its checkpoints resume on any number of ranks."""
        if not dist_util.is_dist():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 **({"device_id": device} if device.type == "cuda" else {}))
        return cls(device, compile=dist.compile, grad_ckpt=dist.grad_ckpt, shard_size=dist.shard_size)

    @property
    def mesh(self):
        """The device mesh over all ranks: ("shard",), or ("replicate", "shard") when hybrid."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            world = dist_util.get_world_size()
            size = self.shard_size or world
            check_shard_size(size, world)
            device_type = self.device.type if self.device is not None else "cpu"
            if size == world:
                self._mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
            else:
                self._mesh = init_device_mesh(device_type, (world // size, size),
                                              mesh_dim_names=("replicate", "shard"))
        return self._mesh

    def shard(self, model: torch.nn.Module) -> None:
        """Activation checkpointing, torch.compile per unit, then fully_shard per unit and the
        root: torchtitan's order, so the compiled graph of a block sees neither FSDP's hooks nor
        the checkpoint's recomputation boundary wrongly placed, and state-dict names stay the
        model's (Module.compile compiles in place; torch.compile(model) would add _orig_mod.)."""
        from torch.distributed.fsdp import fully_shard
        # The models return views (pred, mask) from forward; the engine applies no in-place op to
        # them, which is what FSDP2's warning about returned views is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        units = model.shard_units()
        if self.grad_ckpt:
            model.set_grad_checkpointing(True)
        if self.compile:
            for unit in units:
                unit.compile()
        for unit in units:
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)

    def build(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """make() on the meta device, sharded, each rank's shards materialised on the device with
        the weights rank 0 would have initialised (what DDP would broadcast): engine/sharded_init.py.
        No rank ever holds the whole model."""
        rank0_rng = [torch.get_rng_state()]
        if dist_util.is_dist():
            torch.distributed.broadcast_object_list(rank0_rng, src=0, group=dist_util.cpu_group())
        return build_sharded(make, self.shard, self.device, rank0_rng[0])

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """build() sharded the model (and applied grad_ckpt and compile). What is left is DDP's
        broadcast_buffers: buffers FSDP does not shard (the linear probe's BatchNorm statistics)
        would drift apart per rank, so in training every forward starts from rank 0's, as under DDP."""
        if dist_util.get_world_size() > 1 and learned_buffers(model):
            model.register_forward_pre_hook(lambda module, args: broadcast_buffers(module) if module.training else None)
        return model

    @staticmethod
    def init_head(model: torch.nn.Module, std: float) -> None:
        """The classifier's head drawn as DDP has it: the full weight from rank 0's random stream
        (DDP broadcasts rank 0's weights), each rank's own stream advanced by the same draw (its
        later draws, e.g. drop path, stay those of a DDP rank); each rank keeps its shard."""
        from torch.distributed.tensor import distribute_tensor
        weight = model.head.weight
        full = torch.empty(weight.shape, dtype=weight.dtype)
        rank0 = [torch.get_rng_state()]
        if dist_util.is_dist():
            torch.distributed.broadcast_object_list(rank0, src=0, group=dist_util.cpu_group())
        own = torch.get_rng_state()
        torch.set_rng_state(rank0[0])
        model.init_head_weight(full, std)
        torch.set_rng_state(own)
        model.init_head_weight(torch.empty_like(full), std)
        shard = distribute_tensor(full.to(weight.device), weight.device_mesh, weight.placements)
        with torch.no_grad():
            weight.to_local().copy_(shard.to_local())

    @staticmethod
    @contextmanager
    def no_sync(model: torch.nn.Module):
        """Micro-steps of an accumulation window: no reduce-scatter (nor, hybrid, all-reduce); each
        rank accumulates its unsharded gradients, reduced once in the window's last backward. This
        holds a block's full fp32 gradients per rank between micro-steps: with a 6.5B model, prefer
        a larger --batch_size with --grad_ckpt over --accum_iter."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @staticmethod
    def module(model: torch.nn.Module) -> torch.nn.Module:
        """The sharded module itself: every rank must call its forward together."""
        return model

    @staticmethod
    def load_model_state(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
        """A full state dict (every rank has it, e.g. memory-mapped) sliced into this rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    @staticmethod
    def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """optimizer.state_dict()'s format (parameters by position, as a DDP run saves it) into the
        sharded optimizer: the positions are those of this optimizer's groups, so they name the
        same parameters (the groups are built from the same module in the same order)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(model, optimizer, state),
                                 options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) state dicts of this rank's shards (DTensors, parameter names as keys),
        for torch.distributed.checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        broadcast_buffers(model)  # saved once for all ranks: rank 0's, as a DDP checkpoint has them
        return get_state_dict(model, optimizer)

    @staticmethod
    def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                           optimizer_state: Optional[dict]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state if optimizer_state is not None else {})


def learned_buffers(model: torch.nn.Module) -> list:
    """The buffers training changes (BatchNorm statistics: floating point). Index tables such as
    MixMIM's relative_position_index are integer constants, the same on every rank by construction,
    and stay off the per-step broadcast."""
    return [b for b in model.buffers() if b.is_floating_point()]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's values of the buffers FSDP leaves unsharded and training changes, on every rank."""
    if dist_util.get_world_size() > 1:
        for buffer in learned_buffers(model):
            torch.distributed.broadcast(buffer, src=0)


def check_shard_size(size: int, world: int) -> None:
    if size < 1 or world % size:
        raise UserError(f"--fsdp_shard_size {size} does not divide the {world} processes: give a divisor of "
                        f"{world} (e.g. the GPUs of one node), or 0 to shard over all of them")


def parameter_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """The names of the optimizer's parameters in optimizer.state_dict()'s numbering."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state_by_name(model, optimizer, state: dict) -> dict:
    """optimizer.state_dict() numbering -> parameter names (torch.distributed.checkpoint's layout)."""
    return optimizer_state_by_name_order(parameter_order(model, optimizer), state)


def optimizer_state_by_name_order(order: list, state: dict) -> dict:
    """optimizer_state_by_name, given the names in the numbering (parameter_order's list)."""
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"{len(order)} parameters in this optimizer, "
                         f"{sum(len(g['params']) for g in state['param_groups'])} in the checkpoint")
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_by_position(state: dict) -> dict:
    """The inverse: a name-keyed optimizer state (a sharded checkpoint's, gathered) ->
    optimizer.state_dict()'s numbering, in the order of its groups' parameter lists."""
    order = [n for g in state["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


STRATEGIES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def make_strategy(dist, device: torch.device):
    """--dist_strategy's class, configured from the run's DistConfig (engine/config.py)."""
    return STRATEGIES[dist.strategy].from_config(dist, device)
