"""A model built sharded from the start: constructed on the meta device (no memory), sharded, and
each rank's shards materialised with exactly the weights the unsharded constructor would draw.

A 6.5B-parameter model is 26 GB of fp32 weights: building it whole on every rank first, as the DDP
path does, is what sharding must avoid. build_sharded() builds it on the meta device while a
TorchDispatchMode records every aten op the constructor runs on meta tensors (the creation of each
tensor, nn.Linear's default kaiming_uniform_, MixMIM's trunc_normal_ in __init__, the family's
initialize_weights, the sin-cos tables copied from numpy, buffers computed with arange/stack).
After shard() and to_empty(), the record is replayed on CPU with the default generator, in order:

  * every random op is run at its place in the stream, on a tensor of the recorded size and
    strides, so the stream advances exactly as in the unsharded constructor (a random op whose
    result is overwritten later, e.g. nn.Linear's default init under MAE's xavier_uniform_, is
    drawn into a scratch tensor and dropped);
  * deterministic ops run only where their result reaches a parameter or buffer (a backward
    liveness pass over the record);
  * a parameter's full value exists from its last full overwrite to its last op, then this rank's
    slice of it (the DTensor's local shard) is copied to the device and the full value is freed.
    Initialisation writes one parameter at a time, so at most about one full parameter (plus the
    small tensors being computed) is alive at once.

Why a record of the whole construction rather than re-running initialize_weights() on the sharded
model: the weights also depend on draws made at construction (nn.Linear/Conv2d reset_parameters,
MixMIM's trunc_normal_ of mask_token and the bias tables, its patch embedding that keeps
PyTorch's default init), which set the stream's position and some values; and the replay runs the
recorded ops themselves on full tensors, so the values are the unsharded ones bit for bit without
any per-op sharding rule.

RNG semantics (those of DDP): under DDP every rank builds the model from its own stream (seed +
rank) and DDP broadcasts rank 0's weights. Here the values are drawn from `rng_state` (the caller
broadcasts rank 0's CPU generator state; engine/distributed.py FSDPStrategy.build), and afterwards
this process's own stream is advanced by the same draws, as its own unsharded constructor would
have advanced it, so that everything random after model construction (drop path, ...) sees the
stream a DDP run sees. On ranks whose state differs from rank 0's this draws every random number
twice (once for the values, once to advance the own stream): CPU time of the order of two
unsharded initialisations, no memory.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

_SEEDED = torch.Tag.nondeterministic_seeded
# In-place ops that write every element of their target without reading it.
_OVERWRITE = {"fill_", "zero_", "copy_", "uniform_", "normal_", "bernoulli_", "exponential_", "random_",
              "cauchy_", "log_normal_", "geometric_"}


@dataclass(frozen=True)
class _Ref:
    """A meta tensor in the record: its storage and its view of it (not a tuple: a pytree leaf)."""
    key: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass
class _Op:
    func: object
    args: tuple
    kwargs: dict
    outs: object               # the op's result with new meta tensors as _Ref, everything else None
    creates: List[int]         # storages this op creates
    writes: List[int]          # storages it writes in place
    overwrites: List[int]      # of those, the ones written whole without being read
    reads: List[int]           # storages whose values it reads
    seeded: bool               # draws from the default generator


@dataclass
class Record:
    """What build() did on the meta device: the ops, and the storages' sizes."""
    ops: List[_Op] = field(default_factory=list)
    storages: Dict[int, Tuple[object, int, torch.dtype]] = field(default_factory=dict)  # key -> (storage, numel, dtype)


def _is_meta(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _covers(ref: _Ref, numel: int) -> bool:
    """Whether the view is the whole storage, each element once, in order (a draw into it then
    defines every element)."""
    expect, contiguous = 1, []
    for s in reversed(ref.size):
        contiguous.append(expect)
        expect *= s
    return ref.offset == 0 and expect == numel and all(
        st == c for st, c, s in zip(ref.stride, reversed(contiguous), ref.size) if s != 1)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.record = Record()

    def _ref(self, t: torch.Tensor) -> _Ref:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.record.storages:
            # A strong reference, so that no later storage reuses the address (the key).
            self.record.storages[key] = (storage, storage.nbytes() // t.element_size(), t.dtype)
        return _Ref(key, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seeded = _SEEDED in func.tags
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        known = {self._ref(x).key for x in inputs if _is_meta(x)}
        out = func(*args, **kwargs)
        outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if not known and not any(_is_meta(x) for x in outputs):
            if seeded:
                raise RuntimeError(f"the model's constructor drew random numbers ({func}) outside the meta device: "
                                   "build_sharded cannot reproduce them")
            return out  # real tensors (e.g. numpy-made tables): values the record keeps where used
        if seeded and kwargs.get("generator") is not None:
            raise RuntimeError(f"{func} with an explicit generator: build_sharded replays the default generator only")

        written = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
                written += [x for x in tree_flatten(value)[0] if _is_meta(x)]
        writes = [self._ref(x).key for x in written]
        written_ids = {id(x) for x in written}
        new = [x for x in outputs if _is_meta(x) and self._ref(x).key not in known]
        if not writes and not new and not seeded:
            return out  # a view or a shape query: the refs carry the views' geometry
        creates = [self._ref(x).key for x in new]
        overwrites = []
        if func._overloadpacket.__name__ in _OVERWRITE and written:
            ref = self._ref(args[0])
            if _covers(ref, self.record.storages[ref.key][1]):
                overwrites = [ref.key]
        reads = [self._ref(x).key for x in inputs if _is_meta(x) and
                 not (id(x) in written_ids and self._ref(x).key in overwrites)]

        def as_ref(x):
            if _is_meta(x):
                return self._ref(x)
            if isinstance(x, torch.Tensor):
                return x.detach().clone()  # a real input (a numpy table): its value now
            return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x

        self.record.ops.append(_Op(func, tree_map(as_ref, args), tree_map(as_ref, kwargs),
                                   tree_map(lambda x: self._ref(x) if _is_meta(x) and id(x) in {id(n) for n in new}
                                            else None, out),
                                   creates, writes, overwrites, reads, seeded))
        return out


def record_build(build: Callable[[], nn.Module]) -> Tuple[nn.Module, Record]:
    """build() on the meta device, with the record of what it did; the generator is untouched."""
    with _Recorder() as recorder, torch.device("meta"):
        model = build()
    return model, recorder.record


def state_storages(model: nn.Module, record: Record) -> Dict[int, List[Tuple[str, _Ref]]]:
    """Storage -> the parameters and buffers (names) that view it."""
    out: Dict[int, List[Tuple[str, _Ref]]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        if not _is_meta(t):
            raise ValueError(f"{name} was not built on the meta device")
        s = t.untyped_storage()
        key = s._cdata
        if key not in record.storages:
            raise ValueError(f"{name} was not made by any op the record saw (a tensor from outside build()?)")
        out.setdefault(key, []).append((name, _Ref(key, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                                                   t.dtype)))
    return out


def _plan(record: Record, state: Dict[int, list]) -> Tuple[List[bool], Dict[int, int]]:
    """Backward liveness: which ops' results reach the final parameters and buffers, and each
    storage's last needed op (after which its value is final, or dead)."""
    live = set(state)
    needed = [False] * len(record.ops)
    for i in range(len(record.ops) - 1, -1, -1):
        op = record.ops[i]
        if any(k in live for k in op.creates + op.writes):
            needed[i] = True
            live.difference_update(op.creates)
            live.difference_update(op.overwrites)
            live.update(op.reads)
    if live:
        raise ValueError(f"{len(live)} tensor(s) of the model are read before any recorded op made them")
    last: Dict[int, int] = {}
    for i, op in enumerate(record.ops):
        if needed[i]:
            for k in op.creates + op.writes + op.reads:
                last[k] = i
    return needed, last


def _local_slice(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` for `target` (a DTensor: its local shard; else all of it)."""
    from torch.distributed.tensor import DTensor
    if not isinstance(target, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _local(target: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return target.to_local() if isinstance(target, DTensor) else target


def replay(record: Record, model: nn.Module, state: Dict[int, list], advance_only: bool = False) -> dict:
    """Run the record on CPU with the default generator into the materialised (sharded) model.
    advance_only: run only the random ops, into scratch tensors (advances the stream, writes
    nothing). Returns statistics: peak bytes of full values alive, seconds."""
    start = time.perf_counter()
    needed, last = _plan(record, state) if not advance_only else ([False] * len(record.ops), {})
    values: Dict[int, torch.Tensor] = {}  # storage -> a CPU tensor whose storage holds its full value
    peak = 0
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))

    def base(key: int) -> torch.Tensor:
        if key not in values:
            _, numel, dtype = record.storages[key]
            values[key] = torch.empty(numel, dtype=dtype)
        return values[key]

    def scratch(ref: _Ref) -> torch.Tensor:
        return torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype).zero_()

    for i, op in enumerate(record.ops):
        if not (needed[i] or op.seeded):
            continue
        if needed[i]:
            def materialise(x):
                return base(x.key).as_strided(x.size, x.stride, x.offset) if isinstance(x, _Ref) else x
        else:  # a draw whose result is dropped: only its place in the stream matters
            def materialise(x):
                return scratch(x) if isinstance(x, _Ref) else x
        out = op.func(*tree_map(materialise, op.args), **tree_map(materialise, op.kwargs))
        if needed[i] and op.creates:
            for ref, value in zip(tree_flatten(op.outs)[0], tree_flatten(out)[0]):
                if isinstance(ref, _Ref) and ref.key in op.creates and ref.key not in values:
                    _, numel, dtype = record.storages[ref.key]
                    if (value.untyped_storage().nbytes() == numel * value.element_size()
                            and tuple(value.stride()) == ref.stride and value.storage_offset() == ref.offset):
                        values[ref.key] = value
                    else:
                        base(ref.key).as_strided(ref.size, ref.stride, ref.offset).copy_(value)
        if not needed[i]:
            continue
        peak = max(peak, sum(v.untyped_storage().nbytes() for v in values.values()))
        for key in set(op.creates + op.writes + op.reads):
            if last.get(key) != i:
                continue
            for name, ref in state.get(key, ()):
                target = targets[name]
                _local(target).copy_(_local_slice(target, values[key].as_strided(ref.size, ref.stride, ref.offset)))
            del values[key]
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start}


def build_sharded(build: Callable[[], nn.Module], shard: Callable[[nn.Module], Optional[nn.Module]],
                  device, rng_state: Optional[torch.Tensor] = None) -> nn.Module:
    """build() on the meta device, shard(model) (fully_shard per unit and the root, in place or
    returning the model), each rank's shards materialised on `device` and filled with exactly the
    values the unsharded build() would give from CPU generator state `rng_state` (None: this
    process's current state). This process's own stream ends advanced as by its own unsharded
    build() (see the module's doc). device "meta": shard only, nothing materialised (planning)."""
    own = torch.get_rng_state()
    model, record = record_build(build)
    state = state_storages(model, record)
    sharded = shard(model)
    model = model if sharded is None else sharded
    device = torch.device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    torch.set_rng_state(own if rng_state is None else rng_state)
    with torch.no_grad():
        replay(record, model, state)
        if rng_state is not None and not torch.equal(rng_state, own):
            torch.set_rng_state(own)
            replay(record, model, state, advance_only=True)
    return model
