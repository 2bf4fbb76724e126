"""Pretraining engine as real processes: DDP equivalence, accumulation, schedule, outputs."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from engine.data import KeyedSamples, ResumableSampler, image_folder, pretrain_transform
from engine.lr_sched import adjust_learning_rate, lr_at

from conftest import MINI, assert_ok, pretrain


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_weight_diff(a, b) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_run(photos, tmp_path_factory):
    """One process, batch 6, two epochs: the reference for the equivalence tests."""
    out = tmp_path_factory.mktemp("single")
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 6, "--epochs", 2, "--output_dir", out,
                     "--print_freq", 1])
    assert_ok(proc)
    return out, proc


def test_two_process_ddp_matches_single_process(photos, single_run, tmp_path):
    out1, _ = single_run
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 3, "--epochs", 2, "--output_dir", tmp_path],
                    nproc=2)
    assert_ok(proc)
    a, b = load(out1 / "checkpoint-last.pth"), load(tmp_path / "checkpoint-last.pth")
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert max_weight_diff(a["model"], b["model"]) < 1e-5
    # The weights moved: the comparison is not between two untouched initialisations.
    init = load(out1 / "checkpoint-0.pth")["model"]
    assert max_weight_diff(a["model"], init) > 1e-5
    # Metrics are all-reduced across ranks: the epoch losses agree too.
    la = [json.loads(x) for x in (out1 / "log.txt").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == [0, 1]
    for ra, rb in zip(la, lb):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)
    # Only rank 0 prints progress.
    assert proc.stdout.count("Start training") == 1


def test_activation_checkpointing_gives_the_same_training(photos, single_run, tmp_path):
    """--grad_ckpt recomputes activations in the backward pass: the same weights after two epochs."""
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 6, "--epochs", 2, "--output_dir", tmp_path,
                     "--grad_ckpt"])
    assert_ok(proc)
    a, b = load(single_run[0] / "checkpoint-last.pth"), load(tmp_path / "checkpoint-last.pth")
    assert b["args"]["grad_ckpt"] is True
    assert max_weight_diff(a["model"], b["model"]) < 1e-6


def test_device_decode_pipeline_trains_identically(photos, single_run, tmp_path):
    """--data_pipeline device_decode (decoding in the training process) feeds the same batches as
    the default uint8 pipeline: bit-identical weights after two epochs."""
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 6, "--epochs", 2, "--output_dir", tmp_path,
                     "--data_pipeline", "device_decode", "--num_workers", 1])
    assert_ok(proc)
    a, b = load(single_run[0] / "checkpoint-last.pth"), load(tmp_path / "checkpoint-last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_accum_iter_matches_full_batch(photos, single_run, tmp_path):
    out1, _ = single_run
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 3, "--accum_iter", 2, "--epochs", 2,
                     "--output_dir", tmp_path])
    assert_ok(proc)
    assert "effective batch size: 6" in proc.stdout
    a, b = load(out1 / "checkpoint-last.pth"), load(tmp_path / "checkpoint-last.pth")
    assert max_weight_diff(a["model"], b["model"]) < 1e-5


def test_outputs_log_and_checkpoint_contents(photos, single_run):
    out, proc = single_run
    names = sorted(p.name for p in out.iterdir())
    # save_every 20: epoch 0 and the last epoch get numbered checkpoints.
    assert {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth", "log.txt"} <= set(names)
    records = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in records)
    # The logged lr is the epoch average of the per-iteration schedule (14 images // 6 = 2 iterations).
    args = SimpleNamespace(lr=1e-3 * 6 / 256, min_lr=0.0, warmup_epochs=1, epochs=2)
    for r in records:
        expected = sum(lr_at(r["epoch"] + i / 2, args) for i in range(2)) / 2
        assert r["train_lr"] == pytest.approx(expected, rel=1e-9)
    ckpt = load(out / "checkpoint-last.pth")  # weights_only: plain data, no pickled Namespace
    assert {"model", "optimizer", "scaler", "epoch", "args", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["epoch_iter"] == ckpt["epoch_iters"] == 2
    assert ckpt["args"]["model"] == "mae_vit_mini_patch16" and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["lr"] == pytest.approx(1e-3 * 6 / 256)
    # Progress lines carry the promised fields.
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Epoch: [1]"))
    for field in ("eta:", "lr:", "loss:", "grad_norm:", "img/s:", "data:", "max mem:"):
        assert field in line


def test_lr_schedule_values():
    args = SimpleNamespace(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert lr_at(0.0, args) == 0.0
    assert lr_at(1.0, args) == pytest.approx(5e-4)
    assert lr_at(2.0, args) == pytest.approx(1e-3)
    assert lr_at(6.0, args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(10.0, args) == pytest.approx(1e-5)
    assert lr_at(4.0, args) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    assert adjust_learning_rate(opt, 1.0, args) == pytest.approx(5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2.5e-4])


def test_sampler_matches_distributed_sampler_and_resumes(photos):
    folder = image_folder(str(photos), "train")
    ds = KeyedSamples(folder, pretrain_transform(32), seed=0)
    for world in (1, 2, 3):
        for rank in range(world):
            ours = ResumableSampler(ds, world, rank, seed=5)
            ref = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=5)
            ours.set_epoch(3)
            ref.set_epoch(3)
            assert [i for _, i in ours] == list(ref)
    # After k global steps of batch B on W ranks, the rest of the epoch is what is left of the
    # permutation, for any world size on resume.
    full = [i for _, i in ResumableSampler(ds, 1, 0, seed=5)]
    consumed = 6
    rest = []
    for rank in range(2):
        s = ResumableSampler(ds, 2, rank, seed=5)
        s.set_epoch(0, start_sample=consumed)
        rest.append([i for _, i in s])
    assert sorted(rest[0] + rest[1]) == sorted(full[consumed:])


def test_sample_randomness_is_keyed_not_global(photos):
    folder = image_folder(str(photos), "train")
    ds = KeyedSamples(folder, pretrain_transform(32), seed=0, num_patches=4)
    img1, _, noise1 = ds[(2, 5)]
    torch.manual_seed(123)  # the global RNG must not matter
    img2, _, noise2 = ds[(2, 5)]
    assert torch.equal(img1, img2) and torch.equal(noise1, noise2)
    img3, _, noise3 = ds[(3, 5)]  # another epoch: another crop and mask
    assert not torch.equal(noise1, noise3)
    assert img1.shape == (3, 32, 32)  # grayscale photos come out as RGB


def test_keep_last_no_auto_resume_and_tensorboard(photos, tmp_path):
    base = [*MINI, "--data_path", photos, "--batch_size", 7, "--output_dir", tmp_path, "--print_freq", 1]
    assert_ok(pretrain([*base, "--epochs", 4, "--save_every", 1, "--keep_last", 2, "--log_dir", tmp_path]))
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-2.pth", "checkpoint-3.pth", "checkpoint-last.pth", "checkpoint-prev.pth"]
    assert load(tmp_path / "checkpoint-3.pth")["epoch"] == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = events.Scalars("train_loss")
    # 2 iterations per epoch, printed every iteration: x = 1000 * (epoch + iteration / 2).
    assert [e.step for e in loss] == [0, 500, 1000, 1500, 2000, 2500, 3000, 3500]
    assert all(math.isfinite(e.value) for e in loss)
    assert {"lr", "grad_norm"} <= set(events.Tags()["scalars"])

    # Auto-resume is on by default: the finished run has nothing left to do...
    proc = pretrain([*base, "--epochs", 4])
    assert_ok(proc)
    assert "continuing at epoch 4" in proc.stdout and "Epoch: [" not in proc.stdout
    # ...and --no_auto_resume starts from scratch.
    proc = pretrain([*base, "--epochs", 1, "--no_auto_resume"])
    assert_ok(proc)
    assert "Resumed" not in proc.stdout and "Epoch: [0]" in proc.stdout
