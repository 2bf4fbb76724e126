"""python -m benchmarks.benchmark --mode plan (benchmarks/memory_plan.py): per-rank bytes measured on the sharded
tensors, the activation estimate's scaling, and the command's fields (not a timing test)."""
import json
import math
import subprocess
import sys

import pytest
import torch

import models
from benchmarks import memory_plan
from util.errors import UserError

from conftest import REPO, cli_env


def test_fsdp_over_4_ranks_holds_a_quarter_of_ddps_state():
    ddp = memory_plan.state_bytes("mae_vit_mini_patch16", {}, 4, "ddp")
    fsdp = memory_plan.state_bytes("mae_vit_mini_patch16", {}, 4, "fsdp")
    with torch.device("meta"):
        params = list(models.create_model("mae_vit_mini_patch16", "pretrain").parameters())
    # rank 0's dim-0 chunk of every parameter: a quarter, rounded up (FSDP2 pads the last chunks)
    rank0 = {id(p): math.ceil(p.shape[0] / 4) * (p.numel() // p.shape[0]) * 4 for p in params}
    trainable = sum(rank0[id(p)] for p in params if p.requires_grad)
    assert fsdp["param_bytes"] == sum(rank0.values())
    assert fsdp["grad_bytes"] == trainable and fsdp["optimizer_bytes"] == 2 * trainable  # AdamW: two fp32 moments
    assert ddp["param_bytes"] == 4 * sum(p.numel() for p in params)
    assert ddp["grad_bytes"] == ddp["ddp_bucket_bytes"] == 4 * sum(p.numel() for p in params if p.requires_grad)
    assert ddp["optimizer_bytes"] == 2 * ddp["grad_bytes"]
    # a quarter, but for the rounding: here mostly the (1, L, D) tables and tokens that rank 0 holds whole
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert ddp[key] / 4 <= fsdp[key] < ddp[key] / 4 * 1.15
    # hybrid: sharded over groups of 2 (replicated across the 2 groups), so half
    hybrid = memory_plan.state_bytes("mae_vit_mini_patch16", {}, 4, "fsdp", shard_size=2)
    assert hybrid["param_bytes"] == sum(math.ceil(p.shape[0] / 2) * (p.numel() // p.shape[0]) * 4 for p in params)


def test_activation_estimate_scales_one_block_to_the_depth():
    """The estimate from one encoder and one decoder block equals the count on the whole model."""
    kwargs = dict(img_size=64)
    est = memory_plan.activation_bytes("mae_vit_mini_patch16", kwargs, 64, 0.75, None, grad_ckpt=False)
    model = models.create_model("mae_vit_mini_patch16", "pretrain", **kwargs)
    one, two = (memory_plan._saved_at(model, b, 64, 0.75, None) for b in (1, 2))
    direct = sum(two[k] - one[k] for k in ("encoder_block", "decoder_block", "rest"))
    assert est["saved_bytes_per_image"] == pytest.approx(direct, rel=1e-9) and direct > 0
    assert est["activation_bytes_per_image"] == est["saved_bytes_per_image"] + est["backward_bytes_per_image"]
    ckpt = memory_plan.activation_bytes("mae_vit_mini_patch16", kwargs, 64, 0.75, None, grad_ckpt=True)
    bf16 = memory_plan.activation_bytes("mae_vit_mini_patch16", kwargs, 64, 0.75, torch.bfloat16, grad_ckpt=False)
    assert ckpt["saved_bytes_per_image"] < est["saved_bytes_per_image"] / 2  # block inputs instead of blocks
    assert bf16["saved_bytes_per_image"] < est["saved_bytes_per_image"]
    assert est["activation_bytes_per_step"] < 1024  # fp32: scalars; the saved weights are the parameters themselves
    # bf16: autocast's copies of every Linear and Conv weight, saved once whatever the batch
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert 0 <= bf16["activation_bytes_per_step"] - 2 * weights < 1024


def test_plan_mode_reports_rows_that_add_up(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--mode", "plan", "--model", "mae_vit_mini_patch16",
                           "--input_size", "64", "--batch_size", "8", "--world_size", "1", "4", "--dist_strategy",
                           "ddp", "fsdp", "--amp", "bf16", "--grad_ckpt", "--gpu_gb", "0.05", "--json", str(out)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert [(row["dist_strategy"], row["world_size"]) for row in r["rows"]] == [("ddp", 1), ("ddp", 4), ("fsdp", 1),
                                                                               ("fsdp", 4)]
    gb = memory_plan.GB
    per_image, per_step = r["activation_gb_per_image"] * gb, r["activation_gb_per_step"] * gb
    for row in r["rows"]:
        assert row["state_gb"] == pytest.approx(row["param_gb"] + row["grad_gb"] + row["optimizer_gb"])
        assert row["fixed_gb"] == pytest.approx(row["state_gb"] + row["ddp_bucket_gb"] + row["fsdp_transient_gb"]
                                                + row["autocast_cache_gb"])
        assert row["total_gb"] * gb == pytest.approx(row["fixed_gb"] * gb + per_step + 8 * per_image)
        assert row["max_batch"]["0.05"] == math.floor((0.9 * 0.05 * gb - row["fixed_gb"] * gb - per_step) / per_image)
        # bf16 + grad_ckpt: DDP keeps autocast's weight cache; FSDP's step runs without it
        assert (row["autocast_cache_gb"] > 0) == (row["dist_strategy"] == "ddp")
    ddp4, fsdp4 = r["rows"][1], r["rows"][3]
    assert fsdp4["state_gb"] < ddp4["state_gb"] / 3 and fsdp4["max_batch"]["0.05"] > ddp4["max_batch"]["0.05"]
    assert "measured" in proc.stdout and "estimated" in proc.stdout and "max batch 0.05 GB" in proc.stdout



def test_plan_mode_refuses_a_shard_size_that_does_not_divide_the_world():
    from benchmarks.benchmark import check_args, parse_args
    with pytest.raises(UserError, match=r"^--fsdp_shard_size 3 does not divide --world_size 4: give a divisor, "
                                        r"or 0 to shard over all ranks$"):
        check_args(parse_args(["--mode", "plan", "--world_size", "6", "4", "--dist_strategy", "fsdp",
                               "--fsdp_shard_size", "3", "--device", "cpu"]))
