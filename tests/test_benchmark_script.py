"""scripts/benchmark_pretrain.py runs and reports consistent fields (not a timing test)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_env

sys.path.insert(0, str(REPO / "scripts"))
from benchmark_pretrain import mae_train_flops  # noqa: E402

import models  # noqa: E402


def test_benchmark_writes_json(tmp_path):
    out = tmp_path / "bm.json"
    proc = subprocess.run([sys.executable, "scripts/benchmark_pretrain.py", "--model", "mae_vit_mini_patch16",
                           "--input_size", "32", "--batch_size", "4", "--warmup", "1", "--iters", "1",
                           "--repeats", "1", "--json", str(out)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert (r["model"], r["batch_size"], r["device"]) == ("mae_vit_mini_patch16", 4, "cpu")
    assert r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 and 0 < r["mfu_percent"] < 100
    # The fields agree with each other: throughput from step time, MFU from FLOPs and the peak.
    assert r["img_per_s"] == pytest.approx(4 / r["s_per_step"], rel=1e-6)
    assert r["mfu_percent"] == pytest.approx(
        100 * r["gflop_per_step"] / r["s_per_step"] / 1e3 / r["peak_tflop_per_s_measured"], rel=1e-3)
    assert "mae_vit_mini_patch16" in proc.stdout


def test_analytic_flops_match_flop_counter():
    """The MFU numerator: analytic forward FLOPs equal torch's own count of the matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.create_model("mae_vit_mini_patch16", img_size=64).eval()
    imgs = torch.randn(2, 3, 64, 64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(imgs, mask_ratio=0.75)
    assert mae_train_flops(model, 2, 0.75, 64) == 3 * counter.get_total_flops()
