"""The hang watchdog (engine/launch/watchdog.py) on real processes: a stopped rank, a loader worker
stuck in a sleep, a hang in the first step; each run ends with the watchdog's exit code and its
stack files, and the rerun resumes bit-identically."""
import os
import re
import signal
import subprocess
import time

import pytest
from test_resume import assert_identical, descendants

from engine.data.sampler import ResumableSampler
from engine.launch.watchdog import HANG_EXIT_CODE, STEP_FLOOR_S, Watchdog

from conftest import MINI, REPO, RUN, assert_ok, cli_env, main_cmd, pretrain

STEP_TIMEOUT = 20  # far above a mini step on a loaded 2-core machine (well under 1 s)


def start(args, nproc: int = 1, hooks: str = ""):
    env = dict(cli_env(), MAE_TEST_HOOKS=hooks) if hooks else cli_env()
    return subprocess.Popen(main_cmd("main_pretrain.py", args, nproc), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(proc, pattern: str, timeout: float = 240) -> list:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return seen
        assert time.time() < deadline, "timed out waiting for " + pattern
    pytest.fail(f"process ended (exit {proc.wait()}) before {pattern}:\n" + "".join(seen[-40:]))


def hang_files(out, rank: int):
    folder = out / "hang"
    return sorted(folder.glob(f"*-rank{rank}.txt")) if folder.is_dir() else []


def assert_watchdog_ended(output: str, out, rank: int, what: str, frame: str) -> None:
    """One line on stderr names the stack file; the file holds every thread's Python stack."""
    files = hang_files(out, rank)
    assert len(files) == 1, (files, output[-3000:])
    line = next(x for x in output.splitlines() if x.startswith(f"error: rank {rank}: "))
    assert re.fullmatch(rf"error: rank {rank}: {what} did not complete within \d+ s \(hang watchdog\): the stacks "
                        rf"of its threads are in {re.escape(str(files[0]))}; exiting with code {HANG_EXIT_CODE} .*",
                        line), line
    text = files[0].read_text()
    assert text.startswith(f"rank {rank} (pid ") and "Thread 0x" in text and frame in text, text[:3000]
    assert "hang-watchdog" in text or "_watch" in text  # all threads, the watchdog's own included


def test_allowances():
    w = Watchdog("", 0, None, startup_timeout_s=30)
    now = time.monotonic()
    assert w._overdue(now + 29) is None and w._overdue(now + 31)[0] == "start-up and the first optimizer step"
    for _ in range(12):  # the automatic allowance: never under the floor
        w.step_done()
    assert w.step_allowance() == STEP_FLOOR_S
    w._intervals.extend([40.0] * 50)  # slow steps: 20x their median
    assert w.step_allowance() == 800
    with w.slow("a checkpoint save"):
        assert w._overdue(time.monotonic() + 29) is None
        assert w._overdue(time.monotonic() + 31)[0] == "a checkpoint save"
    assert Watchdog("", 0, 5.0, 30).step_allowance() == 5.0


def test_stopped_rank_ends_the_job_then_the_rerun_is_bit_identical(photos, uninterrupted_2proc, tmp_path):
    args = [*MINI, "--batch_size", 1, "--epochs", 3, "--save_every_steps", 2, "--print_freq", 1,
            "--data_path", photos, "--output_dir", tmp_path, "--step_timeout_s", STEP_TIMEOUT,
            "--startup_timeout_s", 60]  # rank 0 may wait in a checkpoint save: that allowance is 60 s
    proc = start(args, nproc=2)
    seen = wait_for(proc, r"Epoch: \[0\]  \[3/7\]")
    workers = [p for p in descendants(proc.pid) if "\0RANK=1\0" in "\0" + open(f"/proc/{p}/environ").read()]
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGSTOP)
    stopped = time.time()
    try:
        seen.append(proc.stdout.read())
        proc.wait(timeout=300)
    finally:
        for p in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.time() - stopped
    output = "".join(seen)
    # torchrun's 30 s grace for the stopped worker after rank 0 ended, plus a loaded machine.
    assert STEP_TIMEOUT < took < 60 + 120, took
    assert proc.returncode != 0 and re.search(rf"exitcode\s*:\s*{HANG_EXIT_CODE}", output), output[-3000:]
    assert_watchdog_ended(output, tmp_path, 0, r"(optimizer step \d+|a checkpoint save)", "train_one_epoch")
    assert hang_files(tmp_path, 1) == []  # stopped: it cannot run, let alone write

    rerun = pretrain(args, nproc=2)
    assert_ok(rerun)
    assert "continuing at epoch 0, sample " in rerun.stdout
    assert_identical(uninterrupted_2proc / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


def sample_at(epoch: int, position: int, n: int = 14) -> int:
    sampler = ResumableSampler(list(range(n)), 1, 0, seed=0)
    sampler.set_epoch(epoch)
    return sampler.global_order()[position]


def test_stuck_loader_worker_ends_the_run_then_the_rerun_is_bit_identical(photos, uninterrupted, tmp_path):
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path, "--num_workers", 1,
            "--step_timeout_s", STEP_TIMEOUT]
    stuck = sample_at(1, 8)  # epoch 1, batch 4 of 2 samples: after the checkpoint at iteration 4
    proc = start(args, hooks=f"stall_sample=1:{stuck}")
    output = proc.communicate(timeout=STEP_TIMEOUT + 300)[0]
    assert proc.returncode == HANG_EXIT_CODE, output[-3000:]
    assert "Epoch: [1]  [4/7]" in output and "Epoch: [1]  [5/7]" not in output
    assert_watchdog_ended(output, tmp_path, 0, r"optimizer step \d+", "_next_data")
    assert not [p for p in os.listdir("/proc") if p.isdigit() and str(tmp_path) in cmdline(p)]  # the worker too

    rerun = pretrain(args)
    assert_ok(rerun)
    assert "continuing at epoch 1, sample 8 of the epoch" in rerun.stdout
    assert_identical(uninterrupted / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_hang_in_the_first_step_ends_the_run_then_the_rerun_is_bit_identical(photos, uninterrupted, tmp_path):
    args = [*RUN, "--data_path", photos, "--output_dir", tmp_path, "--startup_timeout_s", 15]
    proc = start(args, hooks="stall_first_step=0")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == HANG_EXIT_CODE, output[-3000:]
    assert_watchdog_ended(output, tmp_path, 0, "start-up and the first optimizer step", "_stall")
    assert "Epoch: [0]" not in output

    rerun = pretrain(args)
    assert_ok(rerun)
    assert_identical(uninterrupted / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_watchdog_changes_no_number(photos, uninterrupted, tmp_path):
    """The reference runs have the watchdog on (the default); without it the weights are the same."""
    assert_ok(pretrain([*RUN, "--data_path", photos, "--output_dir", tmp_path, "--step_timeout_s", 0]))
    assert_identical(uninterrupted / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_a_slow_save_on_rank_0_is_not_a_hang_on_the_other_ranks(photos, tmp_path):
    """Rank 0 alone writes a single-file checkpoint. Rank 1 used to leave save() at once and wait for
    rank 0 in the next step's all-reduce, timed as a step: a write longer than the step allowance
    (here 3x it) ended the run with exit 124 at every save, and the requeued job again."""
    out = tmp_path / "out"
    args = [*MINI, "--batch_size", 2, "--epochs", 2, "--save_every", 1, "--print_freq", 1, "--data_path", photos,
            "--output_dir", out, "--step_timeout_s", 10, "--startup_timeout_s", 200]
    proc = start(args, nproc=2, hooks="slow_save=30")
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    assert not (out / "hang").exists()
    assert output.count("Averaged stats") >= 2  # both epochs trained, each followed by a 30 s save
