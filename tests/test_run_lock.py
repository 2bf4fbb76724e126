"""One run per output folder (engine/launch/runlock.py): real processes racing for one folder."""
import errno
import fcntl
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_launch_env import free_port
from test_resume import kill_tree, run_and_signal

from conftest import MINI, REPO, assert_ok, cli_env, main_cmd, one_line_error, pretrain

# 14 photos, batch 7: 2 iterations per epoch.
QUICK = [*MINI, "--batch_size", 7, "--print_freq", 1]
HOLDER = re.compile(r"error: --output_dir (\S+) is in use by another run \(host \S+, pid (\d+), started \S+\); "
                    r"wait for it to end or stop it, or give another --output_dir")


def start(args):
    return subprocess.Popen(main_cmd("main_pretrain.py", args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_started_at_once_one_trains_the_other_names_it(photos, tmp_path):
    # Long enough that the winner is still training when the loser reaches the lock, whatever the
    # machine's load (a winner that had finished would leave a finished run to resume instead).
    args = [*QUICK, "--epochs", 1000, "--data_path", photos, "--output_dir", tmp_path]
    procs = [start(args), start(args)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, [p.returncode for p in procs]
        loser, winner = done[0], next(p for p in procs if p is not done[0])
        out, err = loser.communicate(timeout=60)
        line = one_line_error(subprocess.CompletedProcess(loser.args, loser.returncode, out, err))
        m = HOLDER.fullmatch(line)
        assert m and int(m.group(2)) == winner.pid, line
        assert out == ""  # it wrote nothing, not even the flags
        assert winner.poll() is None  # the winner trains on
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
            p.communicate(timeout=60)


def test_a_duplicate_two_process_job_ends_on_every_rank_with_exit_2(photos, tmp_path):
    """Rank 0 holds the lock for the job; its other ranks must hear that it failed. Left waiting for
    a rank 0 that had exited, they ended on the watchdog's exit code 124 (hang stacks written into
    the held folder), which the SLURM scripts requeue: the duplicate came back again and again."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.launch import runlock; "
                               "runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        port = str(free_port())
        args = [*QUICK, "--epochs", 1, "--data_path", photos, "--output_dir", out, "--startup_timeout_s", 20]
        procs = [subprocess.Popen(main_cmd("main_pretrain.py", args), cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(cli_env(), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in (0, 1)]
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in procs] == [2, 2], [e[-1500:] for _, e in results]
    m = HOLDER.fullmatch(one_line_error(subprocess.CompletedProcess(procs[0].args, 2, *results[0])))
    assert m and int(m.group(2)) == holder.pid
    assert results[1] == ("", "")  # the message is rank 0's; the other rank says nothing
    assert sorted(os.listdir(out)) == [".run.lock"]  # no hang/ stacks, nothing else written


def test_kill9_frees_the_folder_at_once(photos, tmp_path):
    # Long enough that the first run is still training when the second reaches the lock, whatever the load.
    args = [*QUICK, "--epochs", 1000, "--data_path", photos, "--output_dir", tmp_path]
    first = subprocess.Popen(main_cmd("main_pretrain.py", args), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        for line in first.stdout:  # training: the lock is held, the loader (forked workers or not) runs
            if line.startswith("Epoch: [0]"):
                break
            assert time.time() < deadline, "the first run did not start training"
        else:
            pytest.fail("the first run ended before training")
        second = pretrain([*args, "--epochs", 1])
        m = HOLDER.fullmatch(one_line_error(second))
        assert m and int(m.group(2)) == first.pid
        kill_tree(first.pid)
    finally:
        kill_tree(first.pid)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    proc = pretrain([*args, "--epochs", 1])  # at once: no stale lock to wait for or delete
    assert_ok(proc)


def test_a_requeued_run_is_not_blocked(photos, tmp_path):
    """A SLURM requeue (or torchrun restart) is a new process started after the old one ended: here
    the old one stopped on SIGTERM (exit 75, what the batch script requeues on)."""
    args = [*MINI, "--batch_size", 2, "--epochs", 2, "--print_freq", 1, "--data_path", photos,
            "--output_dir", tmp_path]
    code, out = run_and_signal(args, r"Epoch: \[0\]  \[2/7\]", signal.SIGTERM)
    assert code == 75, out[-2000:]
    proc = pretrain(args)
    assert_ok(proc)
    assert "continuing at epoch 0" in proc.stdout


def test_file_system_without_locks_warns_and_runs_unguarded(tmp_path, monkeypatch, capsys):
    from engine.launch import runlock

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", refuse)
    lock = runlock.acquire(str(tmp_path / "out"))
    lock.release()
    assert "does not support file locks" in capsys.readouterr().err


def test_lock_names_the_holder_and_is_released(tmp_path):
    from engine.launch import runlock
    from util.errors import UserError

    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); "
                               "from engine.launch import runlock; runlock.acquire(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", out],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another run \(host \S+, pid {holder.pid}, "):
            runlock.acquire(out)
    finally:
        holder.kill()
        holder.wait()
    runlock.acquire(out).release()  # the kernel dropped the dead holder's lock
