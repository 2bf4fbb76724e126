"""W&B logging (--wandb_project) in offline mode: one run across a kill -9 and a mid-epoch resume, on
the tensorboard step axis with no step repeated or missing; the preflight errors of the flags."""
import json
import sys

import pytest
import torch
from test_resume import run_and_kill

from engine.reporting.wandb_files import offline_run_files, read_run

from conftest import MINI, assert_ok, pretrain

# 14 photos, batch 2: 7 iterations per epoch; a mid-epoch checkpoint at iteration 4.
RUN = [*MINI, "--batch_size", 2, "--epochs", 1, "--save_every_steps", 4, "--print_freq", 1, "--vis_every", 1,
       "--wandb_project", "mae-tests", "--wandb_run_name", "kill9", "--wandb_tags", "ci,offline"]


def steps(it: int, epoch: int, iters: int = 7) -> int:
    """engine/reporting/logs.py's axis: 1/1000 epochs at the progress line of iteration `it` (1-based)."""
    return int(((it - 1) / iters + epoch) * 1000)


def test_killed_and_resumed_run_is_one_run_without_repeated_steps(photos, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path]
    # Killed at iteration 6 of epoch 0: rows up to iteration 5 are logged, the checkpoint is at 4.
    run_and_kill(args, r"Epoch: \[0\]  \[6/7\]")
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_iter"]) == (0, 4)
    run_id = ckpt["wandb_run_id"]
    journal = [json.loads(line) for line in open(tmp_path / f"wandb-rows-{run_id}.jsonl")]
    assert steps(5, 0) in [e["step"] for e in journal]  # sent before the kill; the resumed run re-trains it
    proc = pretrain(args)  # resumes at iteration 5
    assert_ok(proc)
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["wandb_run_id"] == run_id

    files = offline_run_files(str(tmp_path), run_id)
    assert len(files) == 2  # one offline folder per process, both of the same run
    first, second = (read_run(f) for f in files)
    assert second["run_id"] == run_id and second["project"] == "mae-tests" and second["tags"] == ["ci", "offline"]
    assert second["config"]["model"] == "mae_vit_mini_patch16" and second["config"]["batch_size"] == 2

    rows = [row for run in (first, second) for row in run["history"] if "train_loss" in row]
    # Every progress line of the epoch exactly once, in order (rows the killed process's W&B
    # service had not written are re-sent from the journal by the resumed run).
    assert [row["epoch_1000x"] for row in rows] == [steps(it, 0) for it in range(1, 8)]
    assert all({"lr", "grad_norm", "img_per_s"} <= row.keys() for row in rows)
    logged = {e["step"]: e["row"]["train_loss"] for e in journal}
    assert all(row["train_loss"] == logged[row["epoch_1000x"]] for row in rows if row["epoch_1000x"] in logged)
    # The reconstruction picture of epoch 0 (it ended after the restart), at the epoch.
    assert [row["epoch"] for row in second["history"] if "reconstructions/_type" in row] == [0]


def test_wandb_flags_need_a_project_and_the_package(monkeypatch):
    from engine.checks import check_args
    from util.errors import UserError

    import main_pretrain

    parse = main_pretrain.get_args_parser().parse_args
    with pytest.raises(UserError, match="--wandb_run_name, --wandb_tags without --wandb_project"):
        check_args(parse(["--wandb_run_name", "x", "--wandb_tags", "a"]))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    with pytest.raises(UserError, match=r"--wandb_project p: the wandb package is not installed: pip install wandb"):
        check_args(parse(["--wandb_project", "p"]))
    check_args(parse([]))  # off by default: wandb is not needed
