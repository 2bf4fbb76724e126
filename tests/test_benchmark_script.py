"""benchmarks/benchmark.py (python -m benchmarks.benchmark) runs and reports consistent fields (not a timing test)."""
import json
import subprocess
import sys

import pytest
import torch

import models
from benchmarks.flops import counted_forward_flops, mae_forward_flops_per_image, mae_train_flops

from conftest import REPO, cli_env


def bench(tmp_path, *flags):
    out = tmp_path / "bm.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", *map(str, flags), "--json", str(out)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_step_benchmark_with_peer_and_real_data(tmp_path, photos):
    r, stdout = bench(tmp_path, "--model", "mae_vit_mini_patch16", "--input_size", 32, "--batch_size", 4,
                      "--warmup", 1, "--iters", 2, "--repeats", 2, "--peer", "--peer_attention", "eager",
                      "--data_path", photos, "--num_workers", 0)
    ours, peer = r["rows"]
    assert ours["impl"] == "ours" and peer["impl"].startswith("peer (transformers")
    for row in (ours, peer):
        assert (row["model"], row["batch_size"], row["device"]) == ("mae_vit_mini_patch16", 4, "cpu")
        assert row["img_per_s"] > 0 and row["peak_mem_mb"] > 0 and 0 < row["mfu_percent"] < 100
        assert len(row["s_per_step_repeats"]) == 2
        # The fields agree with each other: throughput from step time, MFU from FLOPs and the peak.
        assert row["img_per_s"] == pytest.approx(4 / row["s_per_step"], rel=1e-6)
        assert row["mfu_percent"] == pytest.approx(
            100 * row["gflop_per_step"] / row["s_per_step"] / 1e3 / row["peak_tflop_per_s_measured"], rel=1e-3)
    assert ours["gflop_per_step"] == peer["gflop_per_step"]  # the same architecture
    assert r["speedup_vs_peer"] == pytest.approx(ours["img_per_s"] / peer["img_per_s"])
    assert 0 < ours["data_wait_percent"] < 100 and peer["data_wait_percent"] == 0  # real batches, loaded in-process
    assert "ours / peer:" in stdout and r["data"].startswith(str(photos)) and r["peer_attention"] == "eager"


def test_peer_has_our_parameter_count():
    """The peer is the same model: same number of trainable parameters."""
    from benchmarks.step import peer_model

    ours = models.create_model("mae_vit_base_patch16", "pretrain")
    peer = peer_model(ours)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(peer) == count(ours)


def test_loader_benchmark_compares_pipelines(tmp_path):
    r, stdout = bench(tmp_path, "--mode", "loader", "--data_path", REPO / "data" / "sample", "--batch_size", 7,
                      "--warmup", 0, "--iters", 2, "--repeats", 1, "--num_workers", 1, "--input_size", 64)
    assert [row["pipeline"] for row in r["rows"]] == ["official", "pil", "uint8"]
    assert r["rows"][0]["vs_official"] == 1.0 and all(row["img_per_s"] > 0 for row in r["rows"])
    assert r["images"] == 14 and r["num_workers"] == 1
    assert "x official" in stdout


def test_loader_mode_needs_a_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--mode", "loader"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --mode loader needs --data_path (a folder with train/<class>/*.jpg, e.g. data/sample)")


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_analytic_flops_match_flop_counter(mask_ratio):
    """The MFU numerator: analytic forward FLOPs equal torch's own count, term by term (patch
    embedding = the convolution, attention = the math backend's bmm, the rest = addmm), whatever
    attention kernel SDPA would pick on this machine and torch version."""
    model = models.create_model("mae_vit_mini_patch16", img_size=64).eval()
    imgs = torch.randn(2, 3, 64, 64)
    counted = counted_forward_flops(model, imgs, mask_ratio)
    analytic = {k: 2 * v for k, v in mae_forward_flops_per_image(model, mask_ratio, 64).items()}
    assert counted == {
        "aten.convolution": analytic.pop("patch_embed"),
        "aten.bmm": analytic.pop("encoder_attention") + analytic.pop("decoder_attention"),
        "aten.addmm": sum(analytic.values())}
    assert mae_train_flops(model, 2, mask_ratio, 64) == 3 * sum(counted.values())


def test_step_benchmark_of_mixmim_counts_flops_with_torch(tmp_path):
    r, _ = bench(tmp_path, "--model", "mixmim_mini", "--input_size", 64, "--batch_size", 4, "--warmup", 1,
                 "--iters", 1, "--repeats", 1)
    row = r["rows"][0]
    assert r["flops_source"] == "torch FlopCounterMode forward x 3 (math attention)" and row["mask_ratio"] == 0.5
    model = models.create_model("mixmim_mini", "pretrain", img_size=64)
    counted = counted_forward_flops(model, torch.randn(4, 3, 64, 64), 0.5)
    assert counted["aten.bmm"] > 0  # the window attention is in the count
    assert row["gflop_per_step"] == pytest.approx(3 * sum(counted.values()) / 1e9)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--model", "mixmim_mini", "--input_size", "64",
                           "--peer"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--peer: transformers has no MixMIM" in proc.stderr
