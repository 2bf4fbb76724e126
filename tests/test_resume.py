"""Kill -9 and resume, corrupt checkpoints, official checkpoints, non-finite losses."""
import argparse
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import MINI, REPO, RUN, assert_ok, cli_env, main_cmd, one_line_error, pretrain


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a_path, b_path):
    a, b = load(a_path), load(b_path)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model weight {k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(sa[i][name], sb[i][name]), f"optimizer state {i}/{name} differs"


def descendants(pid: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it at once, as when a node dies.

    torchrun puts its workers in sessions of their own, so a process-group kill would miss them.
    """
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_and_kill(args, pattern: str, nproc: int = 1, timeout: float = 240, hooks: str = ""):
    """Start the CLI, SIGKILL its whole process group once a stdout line matches pattern.
    hooks: MAE_TEST_HOOKS (util/test_hooks.py)."""
    env = dict(cli_env(), MAE_TEST_HOOKS=hooks) if hooks else cli_env()
    proc = subprocess.Popen(main_cmd("main_pretrain.py", args, nproc), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(pattern, line):
                kill_tree(proc.pid)
                break
            assert time.time() < deadline, "timed out waiting for " + pattern
        else:
            pytest.fail("process ended before " + pattern + ":\n" + "".join(seen[-30:]))
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def mid_epoch_position(out, epoch: int) -> int:
    """The kill landed inside `epoch`, after at least one mid-epoch save: iterations done."""
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == epoch and 0 < ckpt["epoch_iter"] < ckpt["epoch_iters"] == 7, \
        (ckpt["epoch"], ckpt["epoch_iter"])
    return ckpt["epoch_iter"]


def test_kill9_mid_epoch_resume_is_bit_identical(photos, uninterrupted, tmp_path):
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path]
    run_and_kill(args, r"Epoch: \[1\]  \[3/7\]")
    done = mid_epoch_position(tmp_path, epoch=1)
    proc = pretrain(args)  # no --resume: picks up checkpoint-last.pth by itself
    assert_ok(proc)
    assert f"continuing at epoch 1, sample {2 * done} of the epoch" in proc.stdout
    first = next(x for x in proc.stdout.splitlines() if x.startswith("Epoch:"))
    assert first.startswith(f"Epoch: [1]  [{done + 1}/7]")  # the next unseen batch, not the epoch start
    assert_identical(uninterrupted / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")
    assert_identical(uninterrupted / "checkpoint-2.pth", tmp_path / "checkpoint-2.pth")


def test_kill9_torchrun_two_processes_resume_is_bit_identical(photos, uninterrupted_2proc, tmp_path):
    args = [*MINI, "--batch_size", 1, "--epochs", 3, "--save_every_steps", 2, "--print_freq", 1,
            "--data_path", photos]
    ref = uninterrupted_2proc
    out = tmp_path / "killed"
    run_and_kill([*args, "--output_dir", out], r"Epoch: \[0\]  \[3/7\]", nproc=2)
    done = mid_epoch_position(out, epoch=0)
    proc = pretrain([*args, "--output_dir", out], nproc=2)
    assert_ok(proc)
    assert f"continuing at epoch 0, sample {2 * done} of the epoch" in proc.stdout
    assert_identical(ref / "checkpoint-last.pth", out / "checkpoint-last.pth")


def test_corrupt_checkpoint_last_falls_back_to_previous(photos, uninterrupted, tmp_path):
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path]
    run_and_kill(args, r"Epoch: \[1\]  \[3/7\]")
    mid_epoch_position(tmp_path, epoch=1)
    last = tmp_path / "checkpoint-last.pth"
    assert (tmp_path / "checkpoint-prev.pth").exists()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, e.g. by a full disk
    proc = pretrain(args)
    assert_ok(proc)
    assert "checkpoint-last.pth is truncated or corrupt" in proc.stderr
    assert "Resumed from " + str(tmp_path / "checkpoint-prev.pth") in proc.stdout
    assert "Traceback" not in proc.stderr
    # The previous checkpoint replays to the very same result.
    assert_identical(uninterrupted / "checkpoint-last.pth", last)


def test_truncated_resume_file_is_one_clear_error(photos, uninterrupted, tmp_path):
    bad = tmp_path / "bad.pth"
    data = (uninterrupted / "checkpoint-last.pth").read_bytes()
    bad.write_bytes(data[:1000])
    proc = pretrain([*RUN, "--data_path", photos, "--output_dir", tmp_path / "o", "--resume", bad])
    err = one_line_error(proc)
    assert err.startswith(f"error: --resume {bad} is truncated or corrupt (") and "give another checkpoint" in err


def test_mismatched_checkpoint_names_the_keys(photos, uninterrupted, tmp_path):
    proc = pretrain([*RUN, "--data_path", photos, "--output_dir", tmp_path, "--model", "mae_vit_tiny_patch16",
                     "--resume", uninterrupted / "checkpoint-last.pth"])
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: checkpoint {uninterrupted / 'checkpoint-last.pth'} does not fit --model "
                          "mae_vit_tiny_patch16 (")
    assert "shape mismatch: cls_token (1, 1, 128) vs (1, 1, 192)" in err
    # The architecture the checkpoint records, so the fix is one copy-paste away.
    assert err.endswith("): it records --model mae_vit_mini_patch16 --input_size 64: use the same flags")


def test_official_checkpoints_load(photos, uninterrupted, tmp_path):
    trained = load(uninterrupted / "checkpoint-last.pth")
    # A released weights file: {'model': state_dict} only -> weights, then training from epoch 0.
    weights_only = tmp_path / "mae_pretrain_vit_mini.pth"
    torch.save({"model": trained["model"]}, weights_only)
    out = tmp_path / "from_weights"
    proc = pretrain([*MINI, "--batch_size", 7, "--epochs", 1, "--data_path", photos, "--output_dir", out,
                     "--resume", weights_only])
    assert_ok(proc)
    assert "no optimizer state" in proc.stdout and "Epoch: [0]" in proc.stdout
    # A full official training checkpoint, args pickled as an argparse.Namespace.
    official = tmp_path / "checkpoint-1.pth"
    torch.save({"model": trained["model"], "optimizer": trained["optimizer"], "epoch": 1,
                "scaler": {}, "args": argparse.Namespace(model="mae_vit_mini_patch16", lr=1e-4)}, official)
    out = tmp_path / "from_official"
    proc = pretrain([*MINI, "--batch_size", 2, "--epochs", 3, "--data_path", photos, "--output_dir", out,
                     "--resume", official])
    assert_ok(proc)
    assert "continuing at epoch 2" in proc.stdout
    assert "Epoch: [1]" not in proc.stdout and "Epoch: [2]" in proc.stdout


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(photos, tmp_path):
    base = [*MINI, "--batch_size", 7, "--data_path", photos, "--output_dir", tmp_path, "--print_freq", 1]
    assert_ok(pretrain([*base, "--epochs", 1]))
    last = tmp_path / "checkpoint-last.pth"
    before = last.read_bytes()
    # An absurd learning rate blows the weights up after one step.
    proc = pretrain([*base, "--epochs", 3, "--lr", "1e30"])
    assert proc.returncode == 1
    assert re.fullmatch(r"error: loss is not finite at epoch 1, iteration 1: training stopped; the last "
                        r"checkpoint is intact .*", proc.stderr.strip())
    assert last.read_bytes() == before
    # Opt-in: skip those steps instead of stopping.
    proc = pretrain([*base, "--epochs", 3, "--lr", "1e30", "--skip_nonfinite"])
    assert_ok(proc)
    assert "optimizer step skipped" in proc.stderr


def run_and_signal(args, pattern: str, sig, nproc: int = 1, timeout: float = 240):
    """Start the CLI and send `sig` to the training processes (not torchrun) once stdout matches."""
    proc = subprocess.Popen(main_cmd("main_pretrain.py", args, nproc), cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, deadline = [], time.time() + timeout
    for line in proc.stdout:
        out.append(line)
        if re.search(pattern, line):
            # The training processes: the CLI itself, or torchrun's direct children.
            targets = [proc.pid] if nproc == 1 else [p for p in descendants(proc.pid) if _parent(p) == proc.pid]
            assert len(targets) == nproc, targets
            for p in targets:
                os.kill(p, sig)
            break
        assert time.time() < deadline, "timed out waiting for " + pattern
    out.append(proc.stdout.read())
    proc.wait(timeout=120)
    return proc.returncode, "".join(out)


def _parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("sig, nproc", [(signal.SIGTERM, 1), (signal.SIGUSR1, 2)])
def test_signal_writes_checkpoint_then_resume_is_bit_identical(photos, uninterrupted, uninterrupted_2proc,
                                                               tmp_path, sig, nproc):
    """SLURM's preemption / time-limit signal: finish the step, save, stop; resuming loses nothing."""
    batch = 2 // nproc
    args = [*MINI, "--batch_size", batch, "--epochs", 3, "--print_freq", 1, "--data_path", photos,
            "--output_dir", tmp_path, "--num_workers", 1]
    code, out = run_and_signal(args, r"Epoch: \[1\]  \[2/7\]", sig, nproc)
    name = signal.Signals(sig).name
    assert (code == 75) if nproc == 1 else (code != 0), out[-2000:]
    m = re.search(rf"stopped by {name} at epoch 1, iteration (\d)", out)
    assert m, out[-2000:]
    ckpt = load(tmp_path / "checkpoint-last.pth")
    assert (ckpt["epoch"], ckpt["epoch_iter"]) == (1, int(m.group(1)))  # no --save_every_steps: written on the signal
    proc = pretrain(args, nproc=nproc)
    assert_ok(proc)
    assert f"continuing at epoch 1, sample {2 * int(m.group(1))} of the epoch" in proc.stdout
    ref = uninterrupted if nproc == 1 else uninterrupted_2proc
    assert_identical(ref / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")
