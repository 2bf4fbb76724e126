"""Integration tests against a real one-machine SLURM cluster (scripts/slurm/local_cluster.sh).

Skipped, with the reason, where the cluster cannot be started (not root, no apt-get).
Every wait is bounded: without accounting, submitit cannot always tell a job's state.
"""
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import MINI, REPO, assert_ok, cli_env, make_image_folder, pretrain

CLUSTER = ["bash", str(REPO / "scripts" / "slurm" / "local_cluster.sh")]


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip("no SLURM here: " + (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run([*CLUSTER, "stop"], capture_output=True, text=True, timeout=120)


ITERS = 28  # per epoch: 112 photos (8 copies of the 14), 2 tasks of batch 2
# 96 px keeps an epoch a few seconds long, so a signal sent at iteration 3 lands mid-epoch.
JOB = [*MINI, "--batch_size", 2, "--print_freq", 1, "--input_size", 96]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm_photos"), copies=8)


def submit(script: str, args, job_dir: Path, launcher=()):
    cmd = ["python", str(REPO / "scripts" / script), "--device", "cpu", "--ngpus", "2", "--nodes", "1",
           "--partition", "debug", "--job_dir", str(job_dir / "%j"), *launcher, *map(str, args)]
    proc = subprocess.run(cmd, cwd=job_dir, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Submitted job_id: (\d+)", proc.stdout).group(1)
    return job_id, job_dir / job_id


def log_of(folder: Path, stream: str = "out") -> str:
    """Task 0's stdout ("out") or stderr ("err"); requeued runs append to the same files."""
    path = folder / f"{folder.name}_0_log.{stream}"
    return path.read_text() if path.exists() else ""


def wait_for(predicate, timeout: float, what: str, folder: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    pytest.fail(f"timed out waiting for {what}\nsqueue:\n{squeue}\nlog:\n{log_of(folder)[-3000:]}")


def finished(folder: Path) -> bool:
    return "Job completed successfully" in log_of(folder)


def weights(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def torchrun_reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_ref")
    assert_ok(pretrain([*JOB, "--epochs", 3, "--data_path", images, "--output_dir", out], nproc=2))
    return out / "checkpoint-last.pth"


def test_submitit_job_matches_torchrun(cluster, images, torchrun_reference, tmp_path):
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 3, "--data_path", images], tmp_path)
    wait_for(lambda: finished(folder), 180, "job completion", folder)
    assert (folder / "log.txt").read_text().count("\n") == 3  # outputs default to the job folder
    assert_same_weights(torchrun_reference, folder / "checkpoint-last.pth")


def test_preempted_twice_mid_epoch_resumes_bit_identical(cluster, images, torchrun_reference, tmp_path):
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 3, "--data_path", images], tmp_path)
    for n, epoch in enumerate((0, 1)):
        # Signal the job inside an epoch, as `scancel --signal=USR1` or submitit's own SIGUSR2 would.
        wait_for(lambda: re.search(rf"requeued {n} time\(s\)[\s\S]*Epoch: \[{epoch}\]  \[ 3/{ITERS}\]",
                                   log_of(folder)), 180, f"epoch {epoch} of run {n}", folder)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
        wait_for(lambda: f"requeued {n + 1} time(s)" in log_of(folder), 180, f"requeue {n + 1}", folder)
    wait_for(lambda: finished(folder), 240, "job completion", folder)
    log = log_of(folder)
    stops = re.findall(r"stopped at epoch (\d), iteration (\d+) after writing checkpoint-last.pth",
                       log_of(folder, "err"))
    assert [int(e) for e, _ in stops] == [0, 1] and all(0 < int(i) < ITERS for _, i in stops), stops
    resumed = re.findall(r"continuing at epoch (\d), sample (\d+) of the epoch", log)
    assert resumed == [(e, str(4 * int(i))) for e, i in stops]  # each run picked up where the last stopped
    assert_same_weights(torchrun_reference, folder / "checkpoint-last.pth")


def test_time_limit_requeues_and_finishes(cluster, images, tmp_path):
    # A 1-minute limit with the signal 50 s ahead: SLURM's timer has a ~30 s resolution, so each
    # run is signalled 10-40 s in; about 60 s of training needs at least one requeue.
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 150, "--input_size", 32,
                                                     "--data_path", images],
                            tmp_path, launcher=["--timeout", "1", "--signal_delay_s", "50"])
    wait_for(lambda: finished(folder), 400, "job completion", folder)
    log = log_of(folder)
    assert "requeued 1 time(s)" in log and "this job is timed-out" in log_of(folder, "err")
    assert (folder / "log.txt").read_text().count("\n") == 150


def test_finetune_job(cluster, two_classes, tmp_path):
    args = ["--model", "vit_mini_patch16", "--input_size", 64, "--nb_classes", 2, "--num_workers", 0,
            "--batch_size", 4, "--epochs", 1, "--warmup_epochs", 0, "--data_path", two_classes, "--dist_eval"]
    job_id, folder = submit("submitit_finetune.py", args, tmp_path)
    wait_for(lambda: finished(folder), 180, "job completion", folder)
    assert "Accuracy of the network on the 41 test images" in log_of(folder)
    assert (folder / "checkpoint-best.pth").exists()


def test_plain_sbatch_script_requeues_itself_and_resumes(cluster, images, tmp_path):
    """scripts/pretrain.sbatch without submitit: srun ranks from SLURM_*, exit 75 on the signal, requeue."""
    out = tmp_path / "out"
    env = cli_env()
    # The script adds --data_path, --output_dir and --log_dir itself.
    train_args = "--model mae_vit_mini_patch16 --input_size 96 --num_workers 0 --warmup_epochs 1 " \
                 "--batch_size 2 --print_freq 1 --device cpu --epochs 2"
    env.update(IMAGENET=str(images), OUTPUT_DIR=str(out), TRAIN_ARGS=train_args)
    # Command-line options override the script's #SBATCH lines: a CPU-sized job on the test cluster.
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--mem=2G", "--time=30", f"--chdir={REPO}",
                           f"--output={tmp_path}/job.out", str(REPO / "scripts" / "pretrain.sbatch")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / "job.out"

    def text():
        return log.read_text() if log.exists() else ""

    deadline = time.time() + 180
    while not re.search(rf"Epoch: \[0\]  \[ 3/{ITERS}\]", text()):
        assert time.time() < deadline and "srun: error" not in text(), text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    deadline = time.time() + 300
    while (out / "log.txt").read_text().count("\n") < 2 if (out / "log.txt").exists() else True:
        assert time.time() < deadline, text()[-3000:]
        time.sleep(0.5)
    t = text()
    assert "requeueing job" in t and "restart 1" in t
    assert re.search(r"continuing at epoch 0, sample \d+ of the epoch", t)


# MixMIM at 128 px: slow enough per step that a signal sent at iteration 3 lands inside epoch 0.
MIX_JOB = ["--model", "mixmim_mini", "--input_size", 128, "--num_workers", 0, "--warmup_epochs", 1, "--log_dir", "",
           "--norm_pix_loss", "--batch_size", 2, "--print_freq", 1]


def test_mixmim_job_preempted_resumes_bit_identical(cluster, images, tmp_path):
    reference = tmp_path / "torchrun"
    assert_ok(pretrain([*MIX_JOB, "--epochs", 2, "--data_path", images, "--output_dir", reference], nproc=2))
    job_id, folder = submit("submitit_pretrain.py", [*MIX_JOB, "--epochs", 2, "--data_path", images], tmp_path)
    wait_for(lambda: re.search(rf"Epoch: \[0\]  \[ 3/{ITERS}\]", log_of(folder)), 180, "epoch 0", folder)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    wait_for(lambda: "requeued 1 time(s)" in log_of(folder), 180, "the requeue", folder)
    wait_for(lambda: finished(folder), 240, "job completion", folder)
    assert re.search(r"stopped (at|after) epoch 0", log_of(folder, "err"))
    assert re.search(r"Resumed from .*checkpoint-last.pth", log_of(folder))
    assert_same_weights(reference / "checkpoint-last.pth", folder / "checkpoint-last.pth")
