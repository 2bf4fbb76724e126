"""--dist_strategy fsdp (FSDP2 on gloo, real torchrun processes): the same weights as DDP, sharded
checkpoints that resume bit-identically after kill -9, on another number of ranks, past a
damaged checkpoint, and that convert to the single-file format and fine-tune."""
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_resume import run_and_kill

from engine.checkpoint import load_full
from engine.data.sampler import ResumableSampler

from conftest import MINI, REPO, assert_ok, cli_env, pretrain, run_main

# 14 photos: batch 1 on 2 processes is 7 iterations per epoch; --lr high enough that any sample
# repeated, skipped or reduced differently moves the weights far beyond fp32 rounding.
BASE = [*MINI, "--epochs", 2, "--lr", "1e-3", "--print_freq", 1, "--save_every_steps", 2]
FSDP = ["--dist_strategy", "fsdp"]


def state(path):
    return load_full(str(path)) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a_path, b_path, optimizer=True):
    """Largest absolute difference of the weights (and the AdamW moments) of two checkpoints."""
    a, b = state(a_path), state(b_path)
    assert a["model"].keys() == b["model"].keys()
    diffs = [(a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]]
    if optimizer:
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        diffs += [(sa[i][n].float() - sb[i][n].float()).abs().max().item() for i in sa for n in sa[i]]
    return max(diffs)


def within_reduction_tolerance(a_path, b_path):
    """Two runs that saw the same samples in the same steps but summed the gradients in another
    order (other world size): the AdamW moments agree to fp32 rounding, and the weights to what
    AdamW's m / sqrt(v) makes of it where v is tiny (measured: moments 1.5e-9, weights 6e-5 after
    10 steps). One sample repeated or skipped moves the first moment by ~1e-4."""
    a, b = state(a_path), state(b_path)
    weights = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    moment = max((sa[i]["exp_avg"] - sb[i]["exp_avg"]).abs().max().item() for i in sa)
    assert moment <= 1e-7 and weights <= 3e-4, (moment, weights)


def moved(a_path, b_path):
    """The weights trained between two checkpoints (a comparison of equal weights that never
    changed would prove nothing)."""
    a, b = state(a_path)["model"], state(b_path)["model"]
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    """DDP and FSDP on 2 processes, 2 epochs, uninterrupted."""
    out = {}
    for name, extra in (("ddp", []), ("fsdp", FSDP)):
        out[name] = tmp_path_factory.mktemp(name)
        assert_ok(pretrain([*BASE, *extra, "--batch_size", 1, "--data_path", photos, "--output_dir", out[name]],
                           nproc=2))
    return out


def test_fsdp_equals_ddp_and_writes_sharded_directories(runs):
    fsdp = runs["fsdp"]
    last = fsdp / "checkpoint-last"
    assert last.is_dir() and (last / "COMPLETE").exists() and (last / ".metadata").exists()
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert (fsdp / "checkpoint-prev").is_dir() and (fsdp / "checkpoint-1").is_dir()
    assert [p.name for p in fsdp.glob(".*")] == [".run.lock"]  # no partial or half-deleted directory left
    assert moved(fsdp / "checkpoint-0", last) > 1e-4
    assert max_diff(runs["ddp"] / "checkpoint-last.pth", last) <= 1e-6


def test_grad_ckpt_and_async_save_under_fsdp_change_nothing(photos, runs, tmp_path):
    """--grad_ckpt (blocks recomputed in backward) and --async_save (checkpoints written in the
    background, every 2 iterations here) give the plain FSDP run's weights and optimizer state."""
    proc = pretrain([*BASE, *FSDP, "--grad_ckpt", "--async_save", "--batch_size", 1, "--data_path", photos,
                     "--output_dir", tmp_path], nproc=2)
    assert_ok(proc)
    assert (tmp_path / "checkpoint-1" / "COMPLETE").exists() and [p.name for p in tmp_path.glob(".*")] == [".run.lock"]
    assert max_diff(runs["fsdp"] / "checkpoint-last", tmp_path / "checkpoint-last") == 0.0


def test_compile_under_fsdp(photos, tmp_path):
    """--compile (per block, before sharding) with --grad_ckpt on one FSDP rank: the eager run's
    weights up to the fused kernels' rounding."""
    common = [*MINI, *FSDP, "--epochs", 1, "--batch_size", 7, "--lr", "1e-3", "--data_path", photos]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert_ok(pretrain([*common, "--output_dir", eager]))
    assert_ok(pretrain([*common, "--compile", "--grad_ckpt", "--output_dir", compiled], timeout=600))
    # AdamW's first steps move every weight by about the lr (5e-4 here): a run that did not train
    # would be that far away; fused kernels round differently, by far less.
    assert max_diff(eager / "checkpoint-last", compiled / "checkpoint-last", optimizer=False) <= 2e-4


def test_fsdp_equals_ddp_hybrid_2x2_with_accumulation(photos, tmp_path):
    """4 processes, hybrid sharding (2 groups of 2), --accum_iter 2: micro-steps without reduction."""
    common = [*BASE, "--epochs", 1, "--batch_size", 1, "--accum_iter", 2, "--data_path", photos]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert_ok(pretrain([*common, "--output_dir", ddp], nproc=4))
    assert_ok(pretrain([*common, *FSDP, "--fsdp_shard_size", 2, "--output_dir", fsdp], nproc=4))
    # Reduce-scatter in a group then all-reduce across groups adds in another order than DDP's
    # all-reduce of 4: equal up to fp32 rounding (AdamW's division by small second moments
    # magnifies it to a few 1e-6).
    assert max_diff(ddp / "checkpoint-last.pth", fsdp / "checkpoint-last") <= 2e-5


def test_kill9_resume_other_world_sizes_and_damaged_checkpoint(photos, runs, tmp_path):
    """kill -9 of the whole torchrun tree mid-epoch; the same command resumes bit-identically.
    A copy resumes on 1 rank (batch 2: the same global batch) past a truncated checkpoint-last."""
    ref = runs["fsdp"] / "checkpoint-last"
    args = [*BASE, *FSDP, "--data_path", photos]
    killed = tmp_path / "killed"
    run_and_kill([*args, "--batch_size", 1, "--output_dir", killed], r"Epoch: \[1\]  \[5/7\]", nproc=2)
    meta = state(killed / "checkpoint-last")
    done = meta["epoch_iter"]
    assert meta["epoch"] == 1 and 0 < done < 7 and meta["world_size"] == 2
    copy = shutil.copytree(killed, tmp_path / "two_to_one")

    proc = pretrain([*args, "--batch_size", 1, "--output_dir", killed], nproc=2)
    assert_ok(proc)
    assert f"continuing at epoch 1, sample {2 * done} of the epoch" in proc.stdout
    assert max_diff(ref, killed / "checkpoint-last") == 0.0  # weights and AdamW state bit-identical

    # 2 -> 1 rank, from checkpoint-prev/ since checkpoint-last/'s shard of rank 1 is cut short.
    shard = copy / "checkpoint-last" / "__1_0.distcp"
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:full // 2])
    prev = state(copy / "checkpoint-prev")
    proc = pretrain([*args, "--batch_size", 2, "--output_dir", copy], nproc=1)
    assert_ok(proc)
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert warnings[0] == (f"warning: checkpoint {copy / 'checkpoint-last'} is truncated or corrupt (shard "
                           f"__1_0.distcp has {full // 2} of its {full} bytes); "
                           "resume from an earlier checkpoint or delete it; trying the previous checkpoint")
    assert f"continuing at epoch 1, sample {2 * prev['epoch_iter']} of the epoch" in proc.stdout
    assert "RNG states not restored" in proc.stderr  # written by 2 processes
    first = next(x for x in proc.stdout.splitlines() if x.startswith("Epoch:"))
    assert first.startswith(f"Epoch: [1]  [{prev['epoch_iter'] + 1}/7]")
    assert sum(x.startswith("warning: renamed the unreadable") for x in warnings) == 1  # set aside
    assert len(warnings) == 3  # damaged, set aside, RNG: one line each
    within_reduction_tolerance(ref, copy / "checkpoint-last")


def test_resume_one_rank_on_two(photos, runs, tmp_path):
    args = [*BASE, *FSDP, "--data_path", photos, "--output_dir", tmp_path]
    run_and_kill([*args, "--batch_size", 2], r"Epoch: \[1\]  \[3/7\]", nproc=1)
    meta = state(tmp_path / "checkpoint-last")
    assert meta["world_size"] == 1 and meta["epoch"] == 1
    proc = pretrain([*args, "--batch_size", 1], nproc=2)
    assert_ok(proc)
    assert f"continuing at epoch 1, sample {2 * meta['epoch_iter']} of the epoch" in proc.stdout
    within_reduction_tolerance(runs["fsdp"] / "checkpoint-last", tmp_path / "checkpoint-last")


@pytest.mark.parametrize("start", [2, 6, 8])
def test_sample_sequence_continues_on_another_world_size(start):
    """The samples a resumed epoch reads on M ranks are the uninterrupted epoch's from `start` on,
    none repeated or skipped, whatever N ranks read before (the position is in global samples)."""
    dataset = list(range(14))
    uninterrupted = [k for it in zip(*[list(ResumableSampler(dataset, 2, r, 0)) for r in range(2)]) for k in it]
    for world in (1, 2):
        samplers = [ResumableSampler(dataset, world, r, 0) for r in range(world)]
        for s in samplers:
            s.set_epoch(0, start)
        resumed = [k for it in zip(*[list(s) for s in samplers]) for k in it]
        assert uninterrupted[:start] + resumed == uninterrupted


def test_convert_round_trip_and_finetune_from_sharded(runs, two_classes, tmp_path):
    from engine.model_factory import build_model
    sharded = runs["fsdp"] / "checkpoint-last"
    single = tmp_path / "single.pth"
    convert = [sys.executable, str(REPO / "scripts" / "convert_checkpoint.py")]
    proc = subprocess.run([*convert, sharded, single], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(single, map_location="cpu", weights_only=True)
    model = build_model("mae_vit_mini_patch16", "pretrain", img_size=64)
    model.load_state_dict(ckpt["model"], strict=True)  # the official key layout
    ddp = torch.load(runs["ddp"] / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert ckpt.keys() >= {"model", "optimizer", "epoch", "epoch_iter", "rng", "args", "scaler"}
    assert ckpt["optimizer"]["param_groups"][0]["params"] == ddp["optimizer"]["param_groups"][0]["params"]
    assert max_diff(runs["ddp"] / "checkpoint-last.pth", single) <= 1e-6

    back = tmp_path / "back"
    proc = subprocess.run([*convert, single, back], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "optimizer state" in proc.stdout, proc.stderr
    assert max_diff(sharded, back) == 0.0

    ft = ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
          "--log_dir", "", "--warmup_epochs", "1", "--print_freq", "100", "--batch_size", 8, "--epochs", 1,
          "--data_path", two_classes, "--output_dir", tmp_path / "ft"]
    proc = run_main("main_finetune.py", [*ft, "--finetune", sharded])
    assert_ok(proc)
    assert f"Loaded pre-trained encoder from {sharded}" in proc.stdout
    assert re.search(r"Accuracy of the network on the \d+ test images", proc.stdout)

    # scripts/export.py takes the sharded directory as it takes a file
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint", sharded, "--to",
                           "official", "--output", tmp_path / "export"], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    full = torch.load(tmp_path / "export" / "mae_visualize_vit_mini_patch16.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(full["model"], strict=True)
    assert all(torch.equal(full["model"][k], v) for k, v in ckpt["model"].items())


def test_fsdp_continues_a_ddp_checkpoint_file(photos, runs, tmp_path):
    """--resume of a DDP run's checkpoint-0.pth under FSDP (weights and AdamW state by position
    sliced into the shards): the same final state as the DDP run that went on."""
    proc = pretrain([*BASE, *FSDP, "--batch_size", 1, "--data_path", photos, "--output_dir", tmp_path,
                     "--resume", runs["ddp"] / "checkpoint-0.pth"], nproc=2)
    assert_ok(proc)
    assert "continuing at epoch 1" in proc.stdout
    assert max_diff(runs["ddp"] / "checkpoint-last.pth", tmp_path / "checkpoint-last") <= 1e-6


@pytest.mark.parametrize("script, extra", [
    ("main_finetune.py", ["--drop_path", "0.1", "--mixup", "0.8", "--cutmix", "1.0"]),
    ("main_linprobe.py", []),
])
def test_classifier_training_under_fsdp_equals_ddp(runs, two_classes, tmp_path, script, extra):
    """Fine-tuning and linear probing from the same pretraining checkpoint on 2 processes: FSDP ends
    with DDP's weights and optimizer state. The new head is drawn from rank 0's stream and each
    rank's stream goes on as under DDP (drop path, mixup draw from it afterwards); the linear
    probe's BatchNorm statistics start every training forward from rank 0's (DDP's broadcast
    buffers)."""
    flags = ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
             "--log_dir", "", "--warmup_epochs", "1", "--print_freq", "100", "--batch_size", 4, "--epochs", 1,
             "--data_path", two_classes, "--finetune", runs["ddp"] / "checkpoint-last.pth", *extra]
    for name, strategy in (("ddp", []), ("fsdp", FSDP)):
        assert_ok(run_main(script, [*flags, *strategy, "--output_dir", tmp_path / name], nproc=2))
    ddp, fsdp = tmp_path / "ddp" / "checkpoint-last.pth", tmp_path / "fsdp" / "checkpoint-last"
    assert max_diff(ddp, fsdp) <= 1e-6
    head = "head.1.weight" if script == "main_linprobe.py" else "head.weight"
    assert state(ddp)["model"][head].abs().max() > 0  # trained, not a zero head that any init would match


@pytest.mark.parametrize("flags, world, error", [
    (["--dist_strategy", "fsdp", "--fsdp_shard_size", 3], 4,
     "--fsdp_shard_size 3 does not divide the 4 processes of this launch: give a divisor of 4"),
    (["--async_save"], 1, "--async_save is an option of --dist_strategy fsdp"),
    (["--dist_strategy", "fsdp", "--amp", "fp16"], 1, "--amp fp16 with --dist_strategy fsdp is not supported"),
])
def test_strategy_flags_are_checked_before_training(photos, tmp_path, flags, world, error):
    """The pretraining preflight (also what the SLURM launchers run for the job's world size)."""
    from engine.pretrain import preflight
    from util.errors import UserError

    from main_pretrain import get_args_parser
    args = get_args_parser().parse_args([*map(str, MINI), "--data_path", str(photos), "--output_dir", str(tmp_path),
                                         "--device", "cpu", *map(str, flags)])
    with pytest.raises(UserError) as e:
        preflight(args, world)
    assert str(e.value).startswith(error)
