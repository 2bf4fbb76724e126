"""The private torch APIs the product uses, one test each, through the product code that uses them and
with real numbers or files asserted. torch may change a private API in any release: a test here that
fails names the API, where it is used and the torch versions it was checked on."""
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import models
from benchmarks import memory_plan
from engine import sharded_init
from engine.checkpoint.dcp import load_full, save_full_as_sharded

# What this file was actually run on. requirements.txt's lower bound (torch 2.11) was not run with it.
CHECKED_ON = "torch 2.14.1 (CPU)"


@contextmanager
def private_api(name: str, used_in: str):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever the new torch raises, point at the API
        pytest.fail(f"private torch API {name} ({used_in}) no longer works as it did on {CHECKED_ON}; this is torch "
                    f"{torch.__version__}: {type(e).__name__}: {e}")


def small_checkpoint():
    torch.manual_seed(0)
    model = {"w": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.float64), "step": torch.tensor(7)}
    return {"model": model, "args": None, "epoch": 2, "format_version": 1}


def test_save_state_dict_no_dist(tmp_path):
    """engine/checkpoint/dcp.py save_full_as_sharded: state_dict_saver._save_state_dict(no_dist=True)
    writes a DCP directory without a process group; torch's public loader reads the same numbers."""
    import torch.distributed.checkpoint as dcp

    ckpt = small_checkpoint()
    with private_api("torch.distributed.checkpoint.state_dict_saver._save_state_dict",
                     "engine/checkpoint/dcp.py save_full_as_sharded"):
        save_full_as_sharded(ckpt, str(tmp_path / "ckpt"))
        assert (tmp_path / "ckpt" / ".metadata").is_file() and list((tmp_path / "ckpt").glob("*.distcp"))
        back = {"model": {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}}
        dcp.load(back, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
        for k, v in ckpt["model"].items():
            assert torch.equal(back["model"][k], v), k


def test_load_state_dict_with_the_empty_planner(tmp_path):
    """engine/checkpoint/dcp.py load_full: state_dict_loader._load_state_dict with
    default_planner._EmptyStateDictLoadPlanner reads a whole DCP directory into one process, shapes
    and dtypes from the files (no template state dict)."""
    import torch.distributed.checkpoint as dcp

    ckpt = small_checkpoint()
    path = tmp_path / "ckpt"
    save_full_as_sharded({**ckpt, "model": {}}, str(path))  # the directory's meta.pth and completeness marker
    for f in path.glob("*.distcp"):
        f.unlink()
    (path / ".metadata").unlink()
    dcp.save({"model": ckpt["model"]}, checkpoint_id=str(path), no_dist=True)  # the tensors, by the public API
    with private_api("torch.distributed.checkpoint.state_dict_loader._load_state_dict + "
                     "default_planner._EmptyStateDictLoadPlanner", "engine/checkpoint/dcp.py load_full"):
        full = load_full(str(path))
        assert sorted(full["model"]) == sorted(ckpt["model"])
        for k, v in ckpt["model"].items():
            assert full["model"][k].dtype == v.dtype and torch.equal(full["model"][k], v), k


class Tied(nn.Module):
    """Linear layers (kaiming_uniform_ at construction), timm's trunc_normal_ over one (the models'
    init), a tied weight, a buffer copied from a numpy-made table and a view of a parameter's storage."""

    def __init__(self):
        super().__init__()
        import numpy as np
        from timm.layers import trunc_normal_

        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)
        trunc_normal_(self.a.weight, std=0.02)
        self.b.weight = self.a.weight
        self.register_buffer("table", torch.zeros(6))
        self.table.copy_(torch.from_numpy(np.linspace(0, 1, 6, dtype=np.float32)) * 2)
        self.c = nn.Linear(4, 3)
        self.c_row = self.c.weight[1]  # a view, not state


def eager(seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Tied().state_dict(keep_vars=False).items()}


def test_dispatch_mode_and_op_schema_replay_the_constructor():
    """engine/sharded_init.py records the constructor under torch.utils._python_dispatch.TorchDispatchMode,
    walks arguments with torch.utils._pytree, and reads OpOverload._schema (which arguments an op
    writes) and OpOverload._overloadpacket (the op's name): the replay gives the eager weights bit for
    bit, and leaves the generator where the eager constructor leaves it."""
    with private_api("torch.utils._python_dispatch.TorchDispatchMode, torch.utils._pytree, OpOverload._schema, "
                     "OpOverload._overloadpacket", "engine/sharded_init.py build_sharded"):
        expected = eager(3)
        after_eager = torch.get_rng_state()
        torch.manual_seed(3)
        model = sharded_init.build_sharded(Tied, lambda m: None, "cpu")
        assert torch.equal(torch.get_rng_state(), after_eager)
        got = model.state_dict()
        assert sorted(got) == sorted(expected)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k


def test_storage_cdata_identifies_storages():
    """engine/sharded_init.py keys tensors by UntypedStorage._cdata: the tied weight is one storage,
    every other parameter and buffer its own."""
    with private_api("UntypedStorage._cdata", "engine/sharded_init.py record_build / state_storages"):
        model, record = sharded_init.record_build(Tied)
        state = sharded_init.state_storages(model, record)
        names = sorted(sorted(n for n, _ in views) for views in state.values())
        assert names == [["a.bias"], ["a.weight", "b.weight"], ["b.bias"], ["c.bias"], ["c.weight"], ["table"]]
        assert model.a.weight.untyped_storage()._cdata != model.c.weight.untyped_storage()._cdata
        assert model.c_row.untyped_storage()._cdata == model.c.weight.untyped_storage()._cdata


def test_fake_store_and_local_shard_offsets():
    """benchmarks/memory_plan.py fakes a world with torch.testing._internal.distributed.fake_pg.FakeStore;
    engine/sharded_init.py _local_slice finds a rank's rows with
    torch.distributed.tensor._utils.compute_local_shape_and_global_offset. Rank 0 of 4 holds the first
    ceil(rows / 4) rows of each fully_shard-ed parameter (torch.chunk's split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with private_api("torch.testing._internal.distributed.fake_pg.FakeStore, "
                     "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
                     "benchmarks/memory_plan.py fake_world, engine/sharded_init.py _local_slice"):
        with memory_plan.fake_world(4):
            mesh = init_device_mesh("cpu", (4,))
            model = sharded_init.build_sharded(lambda: nn.Linear(3, 10), lambda m: fully_shard(m, mesh=mesh), "meta")
            full = torch.arange(30.0).reshape(10, 3)
            assert torch.equal(sharded_init._local_slice(model.weight, full), full[:3])
            assert torch.equal(sharded_init._local_slice(model.bias, torch.arange(10.0)), torch.arange(3.0))
        state = memory_plan.state_bytes("mae_vit_mini_patch16", {}, 4, "fsdp")
        mini = models.create_model("mae_vit_mini_patch16", "pretrain")
        assert state["param_bytes"] == sum(4 * math.ceil(p.shape[0] / 4) * p[0].numel() for p in mini.parameters())


def test_peak_of_live_storages():
    """benchmarks/memory_plan.py _PeakLive (the activation estimate's peak): TorchDispatchMode, _pytree
    and UntypedStorage._cdata, bytes of the storages alive at the peak."""
    with private_api("torch.utils._python_dispatch.TorchDispatchMode, UntypedStorage._cdata",
                     "benchmarks/memory_plan.py _PeakLive"):
        with memory_plan._PeakLive() as peak:
            a = torch.empty(1000)
            b = torch.empty(500, dtype=torch.float64)
            del a
            c = torch.empty(200)
        assert peak.peak == 4000 + 4000 and b.numel() + c.numel() == 700
