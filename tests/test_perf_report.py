"""What the progress line says of speed (TFLOP/s, MFU against the device's peak, the slowest and
fastest rank's step time) and --profile's trace, on a real 2-process run."""
import json
import re

import pytest
import torch

import benchmarks.flops
import benchmarks.step
from engine import flops
from engine.pretrain import PretrainRecipe
from engine.pretrain_model import build_pretrain_model
from models.registry import create_model

from conftest import MINI, assert_ok, pretrain


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_engine_flop_count_is_the_benchmarks_and_torchs(mask_ratio):
    assert benchmarks.flops.mae_train_flops is flops.mae_train_flops is benchmarks.step.mae_train_flops
    torch.manual_seed(0)
    model = build_pretrain_model("mae_vit_mini_patch16", 64, False, 0.0, {})
    cfg = type("Cfg", (), {"model": type("M", (), dict(model="mae_vit_mini_patch16", input_size=64,
                                                         norm_pix_loss=False, range_mask_ratio=0.0, decoder={},
                                                         mask_ratio=mask_ratio))})
    per_image = PretrainRecipe.train_flops_per_image(cfg, None)
    assert per_image == benchmarks.flops.mae_train_flops(model, 1, mask_ratio, 64)
    counted = flops.counted_forward_flops(model, torch.randn(2, 3, 64, 64), mask_ratio)
    assert 2 * per_image == 3 * sum(counted.values())


def test_families_without_the_official_layout_are_counted_on_the_meta_device():
    torch.manual_seed(0)
    model = create_model("mixmim_mini", "pretrain", img_size=64)
    with torch.device("meta"):
        meta = create_model("mixmim_mini", "pretrain", img_size=64)
    counted = flops.counted_forward_flops(model, torch.randn(2, 3, 64, 64), 0.5, torch.rand(2, model.mask_noise_len))
    assert flops.train_flops_per_image(meta, 0.5, 64) == 3 * sum(counted.values()) // 2


def test_peaks():
    assert flops.table_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert flops.table_peak_tflops("NVIDIA H100 PCIe", None) == 378.0
    assert flops.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float16) == 312.0
    assert flops.table_peak_tflops("NVIDIA H200", None) == 494.7
    assert flops.table_peak_tflops("Tesla V100", torch.float16) is None
    assert flops.peak_flops(torch.device("cpu"), None, 2.5) == (2.5e12, "--peak_tflops")
    rng = torch.get_rng_state()
    peak, source = flops.peak_flops(torch.device("cpu"))
    assert peak > 1e8 and source.startswith("measured") and torch.equal(torch.get_rng_state(), rng)


LINE = re.compile(r"img/s: ([\d.]+) .*TFLOP/s: ([\d.e-]+)  MFU: ([\d.]+)%  "
                  r"step: ([\d.]+)s max \(rank (\d)\) / ([\d.]+)s min \(rank (\d)\)")


def test_progress_line_and_profile_trace_on_two_processes(photos, tmp_path):
    out = tmp_path / "out"
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 2, "--epochs", 2, "--print_freq", 1,
                     "--output_dir", out, "--peak_tflops", 0.5, "--profile", "--profile_steps", 2, 3,
                     "--profile_ranks", 0, 1, "--save_every_steps", 1], nproc=2)
    assert_ok(proc)
    lines = [m for m in map(LINE.search, proc.stdout.splitlines()) if m]
    assert len(lines) == 2 * 3  # 14 photos, 2 x 2 per step: 3 iterations per epoch, a line each
    per_image = PretrainRecipe.train_flops_per_image(
        type("Cfg", (), {"model": type("M", (), dict(model="mae_vit_mini_patch16", input_size=64,
                                                     norm_pix_loss=False, range_mask_ratio=0.0, decoder={},
                                                     mask_ratio=0.75))}), None)
    for m in lines:
        img_s, tflops, mfu = float(m[1]), float(m[2]), float(m[3])
        # img/s counts both ranks' images: one device does 2 of every 4
        assert tflops == pytest.approx(per_image * img_s / 2 / 1e12, rel=0.02)
        assert mfu == pytest.approx(100 * tflops / 0.5, rel=0.02, abs=0.06)
        assert float(m[4]) >= float(m[6]) > 0 and {m[5], m[7]} <= {"0", "1"}
    assert json.loads((out / "log.txt").read_text().splitlines()[-1])["epoch"] == 1  # training went on

    traces = sorted((out / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"data_wait", "forward", "backward", "optimizer_step", "checkpoint_save"} <= names
    assert "Profiler: steps 2-4 traced" in proc.stdout
