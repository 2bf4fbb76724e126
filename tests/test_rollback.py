"""--on_nonfinite rollback (engine/rollback.py): a non-finite loss reloads the last checkpoint
in-process and the replay skips the window of samples that produced it; exact across kill -9."""
import re
import subprocess

import pytest
import torch
from test_resume import assert_identical, load, run_and_kill

from engine.data.sampler import ResumableSampler
from engine.trainer import LossSpikes

from conftest import MINI, REPO, RUN, assert_ok, cli_env, main_cmd

# RUN (batch 2, 7 iterations per epoch, checkpoint-last every 2); the sample at position 6 of
# epoch 1 is in iteration 3 (done 4), whose window is samples 6-7: rolled back to the save at done 2.
BAD_POSITION = 6


def bad_sample() -> int:
    sampler = ResumableSampler(list(range(14)), 1, 0, seed=0)
    sampler.set_epoch(1)
    return sampler.global_order()[BAD_POSITION]


def run(args, hooks: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_cmd("main_pretrain.py", args), cwd=REPO, env=dict(cli_env(), MAE_TEST_HOOKS=hooks),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rolled_back(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("rolled_back")
    args = [*RUN, "--data_path", photos, "--output_dir", out, "--on_nonfinite", "rollback"]
    proc = run(args, f"nonfinite_sample=1:{bad_sample()}")
    assert_ok(proc)
    return out, proc, args


def test_rollback_skips_exactly_the_bad_window_and_records_it(rolled_back):
    out, proc, _ = rolled_back
    samples = ResumableSampler(list(range(14)), 1, 0, seed=0)
    samples.set_epoch(1)
    window = samples.global_order()[6:8]
    assert bad_sample() in window
    lines = [x for x in proc.stderr.splitlines() if "rolled back" in x]
    assert lines == [f"warning: non-finite loss at epoch 1, samples 6-7 of the epoch (iteration 3): rolled back to "
                     f"epoch 1, sample 4; the replay skips dataset samples {window} (rollback 1 of at most 3)"], \
        proc.stderr[-3000:]
    # The replay resumed at iteration 3 of epoch 1 (done 2 was the last save), then went on to the end.
    epoch1 = [x.split("]")[1].strip()[1:] for x in proc.stdout.splitlines() if x.startswith("Epoch: [1]")]
    assert epoch1 == ["1/7", "2/7", "3/7", "3/7", "4/7", "5/7", "6/7", "7/7"], epoch1
    for name in ("checkpoint-last.pth", "checkpoint-2.pth"):
        ckpt = load(out / name)
        assert ckpt["skipped_samples"] == [{"epoch": 1, "first": 6, "end": 8, "samples": window}]
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("when", [
    r"rolled back to epoch 1",   # after the rollback, before any save that records it
    r"Epoch: \[2\]  \[1/7\]",    # after the end of epoch 1 was saved with the window
    r"Epoch: \[1\]  \[3/7\]",    # before the bad window
])
def test_kill9_around_the_rollback_then_resume_is_exact(photos, rolled_back, tmp_path, when):
    ref, _, _ = rolled_back
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path, "--on_nonfinite", "rollback"]
    hooks = f"nonfinite_sample=1:{bad_sample()}"
    run_and_kill(args, when, hooks=hooks)
    proc = run(args, hooks)
    assert_ok(proc)
    assert_identical(ref / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")
    assert load(tmp_path / "checkpoint-last.pth")["skipped_samples"] == load(ref / "checkpoint-last.pth")["skipped_samples"]


def test_max_rollbacks_stops_a_run_that_keeps_failing(photos, tmp_path):
    base = [*MINI, "--batch_size", 2, "--data_path", photos, "--output_dir", tmp_path, "--print_freq", 1,
            "--on_nonfinite", "rollback", "--max_rollbacks", 2]
    assert_ok(run([*base, "--epochs", 1], ""))
    last = tmp_path / "checkpoint-last.pth"
    before = last.read_bytes()
    proc = run([*base, "--epochs", 3], "nonfinite_epoch=1")  # every batch of epoch 1
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert sum("rolled back" in x for x in err) == 2
    assert re.fullmatch(r"error: loss is not finite at epoch 1, samples 4-5 of the epoch \(iteration 2\), after 2 "
                        r"rollback\(s\) \(--max_rollbacks 2\): training stopped; the last checkpoint is intact .*",
                        err[-1]), err[-1]
    assert last.read_bytes() == before


def test_skip_nonfinite_is_on_nonfinite_skip(photos, tmp_path):
    proc = run([*MINI, "--batch_size", 7, "--epochs", 1, "--data_path", photos, "--output_dir", tmp_path,
                "--skip_nonfinite", "--on_nonfinite", "rollback"], "")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --skip_nonfinite is --on_nonfinite skip, but "
                                                           "--on_nonfinite rollback was given"), proc.stderr


def test_loss_spike_is_reported_once_with_its_iteration(caplog):
    spikes = LossSpikes(torch.device("cpu"))
    for it in range(30):
        spikes.update(torch.tensor(10.0 if it == 25 else 1.0), it)
    with caplog.at_level("WARNING", logger="mae"):
        spikes.report(epoch=4)
        spikes.report(epoch=4)
    assert [r.getMessage() for r in caplog.records] == [
        "warning: loss spike at epoch 4, iteration 25: 10, 10.0x the recent mean 1"]


def test_rollback_returns_to_this_runs_start_not_to_another_runs_checkpoint(photos, tmp_path):
    """--no_auto_resume in a folder that holds another run's checkpoint-last (here: one epoch of a
    run with another lr): a non-finite loss before this run's first save rolled back into that run."""
    other = [*MINI, "--batch_size", 2, "--epochs", 1, "--blr", 1e-2, "--data_path", photos, "--output_dir", tmp_path]
    assert_ok(subprocess.run(main_cmd("main_pretrain.py", other), cwd=REPO, env=cli_env(), capture_output=True,
                             text=True, timeout=300))
    samples = ResumableSampler(list(range(14)), 1, 0, seed=0)
    samples.set_epoch(0)
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path, "--on_nonfinite", "rollback", "--no_auto_resume"]
    proc = run(args, f"nonfinite_sample=0:{samples.global_order()[0]}")
    assert_ok(proc)
    lines = [x for x in proc.stderr.splitlines() if "rolled back" in x]
    assert len(lines) == 1 and "rolled back to epoch 0, sample 0;" in lines[0], proc.stderr[-3000:]
    assert load(tmp_path / "checkpoint-last.pth")["epoch"] == 2  # this run's 3 epochs, to the end
