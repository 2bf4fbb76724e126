"""What the progress line says of speed (TFLOP/s, MFU against the device's peak, the slowest and
fastest rank's step time) and --profile's trace, on a real 2-process run."""
import json
import logging
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


def trace_events(out):
    traces = sorted((out / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0"]
    return json.loads(traces[0].read_text())["traceEvents"]


def test_profile_counts_training_steps_and_names_the_monitor(photos, tmp_path):
    """Steps 0-8 of 2 epochs of 7: the monitor's run after epoch 0 is in the trace as "monitor"; its
    measurement of the initial weights, before the first step, is not (the schedule starts there)."""
    from test_monitor import write_digits

    digits = write_digits(tmp_path / "digits", every=12)
    out = tmp_path / "out"
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 2, "--epochs", 2, "--print_freq", 7,
                     "--monitor_every", 1, "--monitor_data_path", digits, "--monitor_train_size", 20,
                     "--monitor_val_size", 10, "--profile", "--profile_steps", 0, 9, "--output_dir", out])
    assert_ok(proc)
    assert proc.stdout.count("Monitor at the initial weights") == 1 and "Profiler: steps 0-8 traced" in proc.stdout
    events = trace_events(out)
    assert sum(e.get("name") == "monitor" for e in events) == 1
    assert sum(e.get("name") == "forward" for e in events) == 9
    steps = sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == list(range(9))


def test_profile_trace_is_written_when_training_stops_early(photos, tmp_path, monkeypatch):
    """A non-finite loss in epoch 1 (TrainingStopped at step 8) within --profile_steps 5 20: the trace
    of the steps from 5 is written all the same."""
    monkeypatch.setenv("MAE_TEST_HOOKS", "nonfinite_epoch=1")
    out = tmp_path / "out"
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 2, "--epochs", 3, "--print_freq", 1,
                     "--profile", "--profile_steps", 5, 20, "--output_dir", out])
    assert proc.returncode != 0 and "loss is not finite at epoch 1" in proc.stdout + proc.stderr
    events = trace_events(out)
    steps = sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps[0] == 5 and steps[-1] >= 7
    assert {"data_wait", "forward", "backward", "optimizer_step"} <= {e.get("name") for e in events}
    assert "Profiler: training ended after 8 steps; the steps from 5 traced" in proc.stdout


class _Losses:
    """A loader of 25 one-sample batches per epoch, each batch its (epoch, iteration)."""
    iters_per_epoch, global_batch = 25, 1

    def set_position(self, epoch, samples_done=0):
        self.epoch, self.start = epoch, samples_done

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.start, self.iters_per_epoch)])


def test_loss_spikes_are_watched_from_the_first_iteration_of_later_epochs(caplog):
    """A loss 10x the others at epoch 1, iteration 3: the running mean of epoch 0 goes on, so it is
    reported (a watch rebuilt per epoch would still be in its 20-step warm-up)."""
    from engine.lr_sched import LrSchedule
    from engine.trainer import TrainingRun, train_one_epoch

    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def compute_loss(model, batch):
        epoch, it = batch
        return model.weight.sum() * 0 + (10.0 if (epoch, it) == (1, 3) else 1.0)

    run = TrainingRun(model=model, compute_loss=compute_loss, optimizer=optimizer,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                      loader=_Losses(), schedule=LrSchedule(0.0, 0.0, 0, 2), epochs=2, print_freq=100)
    logger = logging.getLogger("mae")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="mae"):
            train_one_epoch(run, 0)
            assert "loss spike" not in caplog.text
            train_one_epoch(run, 1)
    finally:
        logger.removeHandler(caplog.handler)
    assert "loss spike at epoch 1, iteration 3: 10, 10.0x the recent mean 1" in caplog.text
