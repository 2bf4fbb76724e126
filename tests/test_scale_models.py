"""The billion-parameter sizes (ViT-g/14, ViT-2B/14, ViT-6.5B/14) and their construction sharded on
the meta device (engine/sharded_init.py): layouts and counts, layer decay, sharded weights equal to
the unsharded constructor's bit for bit (one process, and two real gloo processes), and a 6.5B
model built sharded without its 26 GB."""
import os
import resource
import tempfile
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

import models
from engine.optim import param_groups_lrd
from engine.sharded_init import build_sharded, record_build, replay, state_storages

# name -> (embed_dim, depth, heads, MLP hidden): facebookresearch/maws MODEL_CONFIGS, ViT-g of Zhai et al.
SCALE = {"giant": (1408, 40, 16, 6144), "2b": (2560, 24, 32, 10240), "6p5b": (4096, 32, 32, 16384)}


def block_params(dim, hidden):
    """A pre-norm ViT block with qkv bias: qkv + proj, fc1 + fc2, two LayerNorms."""
    return 4 * dim * dim + 4 * dim + 2 * dim * hidden + hidden + dim + 4 * dim


@pytest.mark.parametrize("size", SCALE)
def test_scale_sizes_layout_and_count(size):
    dim, depth, heads, hidden = SCALE[size]
    with torch.device("meta"):
        mae = models.create_model(f"mae_vit_{size}_patch14", "pretrain")
        clf = models.create_model(f"vit_{size}_patch14", "classify", num_classes=1000, global_pool=True)
    patches = (224 // 14) ** 2
    encoder = (3 * 14 * 14 * dim + dim) + dim + (patches + 1) * dim + depth * block_params(dim, hidden) + 2 * dim
    decoder = (dim * 512 + 512) + 512 + (patches + 1) * 512 + 8 * block_params(512, 2048) + 2 * 512 + \
        512 * 14 * 14 * 3 + 14 * 14 * 3
    assert sum(p.numel() for p in mae.parameters()) == encoder + decoder
    assert (len(mae.blocks), mae.blocks[0].attn.num_heads, mae.blocks[0].mlp.fc1.out_features) == (depth, heads, hidden)
    # the paper's default decoder, MLP ratio 4 whatever the encoder's
    assert mae.decoder_arch == dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    assert mae.decoder_blocks[0].mlp.fc1.out_features == 2048
    # the classifier is the same encoder: every encoder tensor of the MAE fits it
    own = clf.state_dict()
    adapted = clf.adapt_pretrained(mae.state_dict())
    assert {k: v.shape for k, v in adapted.items()} == {k: own[k].shape for k in adapted}
    assert set(own) - set(adapted) <= clf.allowed_missing_keys
    assert len(clf.shard_units()) == depth and len(mae.shard_units()) == depth + 8


def test_scale_encoder_sizes_are_the_published_ones():
    counts = {}
    with torch.device("meta"):
        for size in SCALE:
            mae = models.create_model(f"mae_vit_{size}_patch14", "pretrain")
            counts[size] = sum(p.numel() for n, p in mae.named_parameters() if not n.startswith(("decoder_", "mask_")))
    assert 1.0e9 < counts["giant"] < 1.02e9 and 1.88e9 < counts["2b"] < 1.9e9 and 6.4e9 < counts["6p5b"] < 6.5e9


def test_layer_decay_groups_of_the_6p5b_classifier():
    """The official rule: patch_embed/cls/pos layer 0, blocks.i layer i + 1, norm and head the top."""
    with torch.device("meta"):
        clf = models.create_model("vit_6p5b_patch14", "classify", num_classes=10, global_pool=True)
    scale = {id(p): g["lr_scale"] for g in param_groups_lrd(clf, layer_decay=0.75) for p in g["params"]}
    top = 32 + 1
    for name, p in clf.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer = 0
        else:
            layer = top
        assert scale[id(p)] == pytest.approx(0.75 ** (top - layer)), name


# ----------------------------------------------------------------------------- sharded construction
CASES = {  # name -> (task, factory kwargs, input size): one model per family, small, every init path
    "mae_vit_mini_patch16": ("pretrain", dict(img_size=48), 48),
    "mixmim_mini": ("pretrain", {}, 64),
    "vit_mini_patch16": ("classify", dict(img_size=32, num_classes=3), 32),
}


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for unit in model.shard_units():
        fully_shard(unit)
    fully_shard(model)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", CASES)
def test_build_sharded_gives_the_unsharded_weights_and_stream(one_rank_group, name):
    task, kwargs, size = CASES[name]
    torch.manual_seed(3)
    ref = models.create_model(name, task, **kwargs)
    ref_stream = torch.get_rng_state()
    torch.manual_seed(3)
    model = build_sharded(lambda: models.create_model(name, task, **kwargs), _shard, "cpu")
    assert torch.equal(torch.get_rng_state(), ref_stream)  # the stream goes on as after the unsharded build
    state = model.state_dict()
    assert set(state) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(_full(state[k]), v), k
    x = torch.randn(2, 3, size, size)
    if task == "pretrain":
        noise = torch.rand(2, ref.mask_noise_len)
        assert torch.equal(model(x, noise=noise)[0], ref(x, noise=noise)[0])
    else:
        assert torch.equal(model(x), ref(x))


def test_replay_holds_about_one_full_parameter_at_a_time(one_rank_group):
    """Peak bytes of full values during the replay: the largest parameter, not the model."""
    build = lambda: models.create_model("mae_vit_mini_patch16", "pretrain", img_size=48)  # noqa: E731
    model, record = record_build(build)
    state = state_storages(model, record)
    _shard(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        stats = replay(record, model, state)
    sizes = sorted(p.numel() * 4 for p in build().parameters())
    assert sizes[-1] <= stats["peak_bytes"] <= sizes[-1] + sizes[-2]
    assert stats["peak_bytes"] < sum(sizes) / 10


def _two_rank_worker(rank, store_path, out_dir):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.manual_seed(10 + rank)  # seed + rank, as engine/runtime.py seeds
    rank0 = [torch.get_rng_state()]
    dist.broadcast_object_list(rank0, src=0)
    results = {}
    for name, (task, kwargs, _) in CASES.items():
        if task != "pretrain":
            continue
        model = build_sharded(partial(models.create_model, name, task, **kwargs), _shard, "cpu", rank0[0])
        results[name] = {k: _full(v) for k, v in model.state_dict().items()}
        rank0 = [torch.get_rng_state()]  # the next model from rank 0's advanced stream, as in DDP
        dist.broadcast_object_list(rank0, src=0)
    results["stream"] = torch.get_rng_state()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_build_sharded_on_two_processes_gives_rank0s_unsharded_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned processes (fork could inherit a busy OpenMP pool)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in range(2):
        torch.manual_seed(10 + rank)
        refs = {n: models.create_model(n, t, **kw).state_dict() for n, (t, kw, _) in CASES.items() if t == "pretrain"}
        # every rank's stream ends where its own unsharded builds leave it (DDP: each rank builds)
        assert torch.equal(got[rank]["stream"], torch.get_rng_state()), rank
        if rank == 0:
            rank0_refs = refs
    for rank in range(2):
        for name, ref in rank0_refs.items():
            for k, v in ref.items():
                assert torch.equal(got[rank][name][k], v), (rank, name, k)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _shard_over(mesh):
    def shard(model):
        from torch.distributed.fsdp import fully_shard
        for unit in model.shard_units():
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return shard


def test_6p5b_is_built_sharded_without_its_size():
    """Over 64 ranks (a fake process group: this process plays rank 0), on the meta device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=64)
    try:
        rss, peak = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = build_sharded(lambda: models.create_model("mae_vit_6p5b_patch14", "pretrain"),
                              _shard_over(init_device_mesh("cpu", (64,))), "meta")
        # 26 GB of fp32 weights were never allocated, not even for a moment
        assert _rss() - rss < 1e9 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak < 1e9
        params = list(model.parameters())
        assert all(isinstance(p, DTensor) and p.device.type == "meta" for p in params)
        total, local = sum(p.numel() for p in params), sum(p.to_local().numel() for p in params)
        assert 6.4e9 < total < 6.5e9
        # each rank holds 1/64, within the chunking of dim 0 (rank 0 holds the (1, L, D) tables whole)
        assert total / 64 <= local < total / 64 * 1.02
    finally:
        dist.destroy_process_group()


def test_a_training_step_of_the_6p5b_width_class(one_rank_group):
    """4096-d, 32 heads, scaled down to one encoder and one decoder block on 28x28 images."""
    torch.manual_seed(0)
    model = build_sharded(lambda: models.create_model("mae_vit_6p5b_patch14", "pretrain", img_size=28, depth=1,
                                                      decoder_depth=1), _shard, "cpu")
    loss = model(torch.randn(2, 3, 28, 28))[0]
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad.to_local()).all() for p in model.parameters()
               if p.requires_grad)
    # materialised by the model's own init: xavier_uniform_ of (3 * 4096, 4096), std sqrt(2 / (fan_in + fan_out))
    assert model.blocks[0].attn.qkv.weight.full_tensor().std().item() == pytest.approx((2 / (4 * 4096)) ** 0.5,
                                                                                       rel=0.01)
