"""Per-rank memory of a pretraining run, for planning (python -m benchmarks.benchmark --mode plan).

Two parts, each said to be measured or estimated in the result:

* **State** (parameters, gradients, AdamW moments): MEASURED on the real tensors a rank holds. The
  model is built on the meta device and, for FSDP, sharded with fully_shard per shard unit and the
  root (as engine/distributed.py FSDPStrategy does) over a fake process group of the requested
  world size, so 64 ranks fit in one process and no memory is used; gradients are zeros_like the
  local parameters and the optimizer state is what torch.optim.AdamW creates in one step on them.
  The figures are rank 0's, which holds the largest shards (dim-0 chunks, and the (1, L, D) tables
  whole). DDP's reducer also keeps a flat copy of the gradients in its buckets
  (gradient_as_bucket_view is off): counted, estimated as the gradients' bytes.
* **Activations** of one training step: MEASURED where the device is CUDA (the step is run and
  torch.cuda.max_memory_allocated read), ESTIMATED on CPU: the bytes autograd saves for backward
  (torch.autograd.graph.saved_tensors_hooks, each storage once, parameters excluded), counted
  during one forward pass of the model at its real width, mask ratio and input size but with one
  encoder and one decoder block, on real CPU tensors under CPU autocast for bf16, at batch 4 and 8
  (per image = the difference / 4; what does not grow with the batch, the bf16 copies of the
  weights, is the rest), then scaled to the model's depth. With grad_ckpt each block keeps only its
  input (the residual stream) and one block's activations exist again while it is recomputed. Added
  per image: what the backward pass holds beyond the saved tensors at its peak (the peak of live
  storages over forward + backward of the small model, minus its saved bytes). Not counted: the
  allocator's fragmentation (USABLE keeps 10% of the GPU for it and the CUDA context), and the
  difference between CPU and CUDA kernels in what they save (attention: both save q, k, v, the
  output and the log-sum-exp).

FSDP adds transient unsharded buffers: the all-gathered fp32 weights of the running unit and of the
prefetched next one, and the unit's full gradients before their reduce-scatter (estimated: 2 + 1
times the largest unit's fp32 bytes). Under bf16 autocast, DDP with grad_ckpt keeps autocast's
cache: the bf16 copy of every weight until the forward pass ends, 2 bytes per parameter (counted in
the fixed part). FSDP runs autocast without that cache (engine/precision.py), which would otherwise
keep every gathered weight of the whole model in bf16 on every rank.
"""
import math
from contextlib import contextmanager
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import models
from engine.sharded_init import build_sharded

GB = 1e9
BATCHES = (4, 8)  # of the activation measurement
USABLE = 0.9  # of a GPU's memory: the CUDA context and the allocator's fragmentation take the rest


@contextmanager
def fake_world(world_size: int):
    """A fake process group (no communication) in which this process is rank 0 of world_size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model_name: str, model_kwargs: dict, world_size: int, strategy: str, shard_size: int = 0) -> Dict:
    """Rank 0's parameter, gradient and AdamW-state bytes, measured on the (sharded) meta tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    build = lambda: models.create_model(model_name, "pretrain", **model_kwargs)  # noqa: E731
    with fake_world(world_size):
        if strategy == "fsdp":
            size = shard_size or world_size
            mesh = (init_device_mesh("cpu", (world_size,)) if size == world_size else
                    init_device_mesh("cpu", (world_size // size, size), mesh_dim_names=("replicate", "shard")))

            def shard(model):
                for unit in model.shard_units():
                    fully_shard(unit, mesh=mesh)
                fully_shard(model, mesh=mesh)
            model = build_sharded(build, shard, "meta")
        else:
            with torch.device("meta"):
                model = build()
        units = model.shard_units()
        largest_unit = max(sum(p.numel() * 4 for p in u.parameters()) for u in units)
        params = [p for p in model.parameters()]
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        optimizer.step()
        opt = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.device.type == "meta")
        out = {
            "num_params": sum(p.numel() for p in params),
            "param_bytes": sum(_local_bytes(p) for p in params),
            "grad_bytes": sum(_local_bytes(p.grad) for p in trainable),
            "optimizer_bytes": opt,
            "ddp_bucket_bytes": sum(_local_bytes(p.grad) for p in trainable) if strategy == "ddp" else 0,
            "fsdp_transient_bytes": 3 * largest_unit if strategy == "fsdp" else 0,
            "largest_unit_bytes": largest_unit,
        }
    return out


class _SavedBytes:
    """Bytes autograd saves for backward, by where they are saved (encoder block, decoder block, rest)."""

    def __init__(self, model: nn.Module):
        self.where = "rest"
        self.bytes = {"encoder_block": 0, "decoder_block": 0, "rest": 0}
        self.block_input = {"encoder_block": 0, "decoder_block": 0}
        self.seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.handles = []
        for kind, blocks in (("encoder_block", model.blocks), ("decoder_block", model.decoder_blocks)):
            for blk in blocks:
                self.handles.append(blk.register_forward_pre_hook(self._enter(kind)))
                self.handles.append(blk.register_forward_hook(self._leave))

    def _enter(self, kind):
        def hook(module, args):
            self.where = kind
            self.block_input[kind] = max(self.block_input[kind], _local_bytes(args[0]))
        return hook

    def _leave(self, module, args, out):
        self.where = "rest"

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes[self.where] += t.untyped_storage().nbytes()
        return t


class _PeakLive(TorchDispatchMode):
    """The peak of the bytes of storages that ops created and that are still alive (weak
    references to the storages themselves, so autograd's references count too)."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, tuple] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                known = self.live.get(s._cdata)
                if known is None or known[0].expired():  # a freed storage's address may be reused
                    self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _saved_at(model, batch: int, input_size: int, mask_ratio: float, amp: Optional[torch.dtype]) -> Dict:
    """Saved bytes by place, block inputs, and the peak bytes alive over forward and backward."""
    counter = _SavedBytes(model)
    autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
    with _PeakLive() as peak:
        imgs = torch.randn(batch, model.in_chans, input_size, input_size)
        noise = torch.rand(batch, model.mask_noise_len_at(input_size))
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), autocast:
            loss = model(imgs, mask_ratio=mask_ratio, noise=noise)[0]
        loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    for h in counter.handles:
        h.remove()
    return {**counter.bytes, **{f"{k}_input": v for k, v in counter.block_input.items()}, "peak": peak.peak}


def activation_bytes(model_name: str, model_kwargs: dict, input_size: int, mask_ratio: Optional[float],
                     amp: Optional[torch.dtype], grad_ckpt: bool) -> Dict:
    """Estimated activation bytes of one step (see the module's doc): per image and per step."""
    with torch.device("meta"):
        full = models.create_model(model_name, "pretrain", **model_kwargs)
    if not full.plain_vit_mae:
        raise ValueError(f"--mode plan estimates activations of plain ViT MAE models; {model_name} is not one")
    depth, dec_depth = len(full.blocks), len(full.decoder_blocks)
    mask_ratio = full.default_mask_ratio if mask_ratio is None else mask_ratio
    torch.manual_seed(0)
    small = models.create_model(model_name, "pretrain", **{**model_kwargs, "depth": 1, "decoder_depth": 1})
    # Batches of 4 and 8: large enough that the peak falls where the activations are, not where
    # the small model's own gradients are.
    one, two = (_saved_at(small, b, input_size, mask_ratio, amp) for b in (BATCHES[0], BATCHES[1]))
    per_image = {k: (two[k] - one[k]) / (BATCHES[1] - BATCHES[0]) for k in one}
    per_step = {k: one[k] - BATCHES[0] * per_image[k] for k in one}  # what does not grow with the batch
    # What the backward pass allocates beyond the saved tensors at its peak (the activations'
    # gradients, the attention's workspace), per image, measured on the small model.
    saved = sum(per_image[k] for k in ("encoder_block", "decoder_block", "rest"))
    backward = max(per_image["peak"] - saved, 0)
    if grad_ckpt:  # block inputs kept, one block recomputed at a time
        img = (per_image["rest"] + depth * per_image["encoder_block_input"] +
               dec_depth * per_image["decoder_block_input"] +
               max(per_image["encoder_block"], per_image["decoder_block"]))
        step = per_step["rest"]
    else:
        img = per_image["rest"] + depth * per_image["encoder_block"] + dec_depth * per_image["decoder_block"]
        step = per_step["rest"] + depth * per_step["encoder_block"] + dec_depth * per_step["decoder_block"]
    return {"activation_bytes_per_image": img + backward, "activation_bytes_per_step": max(step, 0),
            "saved_bytes_per_image": img, "backward_bytes_per_image": backward,
            "mask_ratio": mask_ratio, "measured_blocks": per_image}


def autocast_cache_bytes(num_params: int, amp: Optional[torch.dtype], grad_ckpt: bool, strategy: str = "ddp") -> int:
    """bf16 copies of the weights that autocast keeps until the forward pass ends (it caches the
    casts of leaf parameters). Without grad_ckpt they are among the saved tensors already
    (activation_bytes_per_step); with it they are extra. FSDP's step runs without the cache."""
    if amp is None or not grad_ckpt or strategy == "fsdp":
        return 0
    return num_params * torch.tensor([], dtype=amp).element_size()


def max_batch(fixed_bytes: float, per_step: float, per_image: float, gpu_gb: float) -> int:
    """Largest per-GPU batch whose estimate fits USABLE of a GPU of gpu_gb GB (0: none fits)."""
    room = USABLE * gpu_gb * GB - fixed_bytes - per_step
    return max(0, math.floor(room / per_image)) if per_image > 0 else 0
