"""In-job restarts: torchrun --max-restarts (its elastic agent) restarts every worker when one dies;
the new workers resume from checkpoint-last by themselves and the run ends as an uninterrupted one."""
import os
import re
import signal
import subprocess
import sys
import time

from test_resume import assert_identical, descendants

from conftest import MINI, REPO, cli_env


def worker(torchrun_pid: int, rank: int) -> int:
    found = []
    for p in descendants(torchrun_pid):
        try:
            if f"\0RANK={rank}\0" in "\0" + open(f"/proc/{p}/environ").read():
                found.append(p)
        except OSError:
            pass
    assert len(found) == 1, found
    return found[0]


def test_max_restarts_survives_two_kill9_of_a_worker_bit_identical(photos, uninterrupted_2proc, tmp_path):
    args = [*MINI, "--batch_size", 1, "--epochs", 3, "--save_every_steps", 2, "--print_freq", 1,
            "--data_path", photos, "--output_dir", tmp_path]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           str(REPO / "main_pretrain.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    kills = [(r"Epoch: \[0\]  \[3/7\]", 1), (r"Epoch: \[1\]  \[5/7\]", 0)]  # (when, which rank)
    seen, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            seen.append(line)
            if kills and re.search(kills[0][0], line):
                os.kill(worker(proc.pid, kills.pop(0)[1]), signal.SIGKILL)
            assert time.time() < deadline, "".join(seen[-40:])
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            for p in [proc.pid, *descendants(proc.pid)]:
                os.kill(p, signal.SIGKILL)
    output = "".join(seen)
    (tmp_path / "torchrun.log").write_text(output)
    assert proc.returncode == 0 and not kills, f"{tmp_path}/torchrun.log:\n{output[-4000:]}"
    resumed = re.findall(r"continuing at epoch (\d), sample (\d+) of the epoch", output)
    assert [e for e, _ in resumed] == ["0", "1"], resumed  # each restart resumed mid-epoch, where it was
    assert_identical(uninterrupted_2proc / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")
