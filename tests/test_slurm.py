"""Integration tests against a real SLURM cluster of two emulated nodes with one fake GPU each
(tests/slurm/local_cluster.sh).

Skipped, with the reason, where the cluster cannot be started (not root, no apt-get).
Every wait is bounded: without accounting, submitit cannot always tell a job's state.
Signals are sent by the tests themselves (scancel --signal), at points of the tasks' start-up
that a test hook holds them at (PAUSE_HOOK), so that what is tested never depends on timing.
"""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_full

from conftest import MINI, REPO, assert_ok, cli_env, make_image_folder, pretrain

CLUSTER = ["bash", str(REPO / "tests" / "slurm" / "local_cluster.sh")]
CLUSTER_ENV = dict(MAE_SLURM_NODES="2", MAE_SLURM_GPUS="1")


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, **CLUSTER_ENV)
    proc = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode == 3:
        pytest.skip("no SLURM here: " + (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run([*CLUSTER, "stop"], capture_output=True, text=True, timeout=120, env=env)


ITERS = 28  # per epoch: 112 photos (8 copies of the 14), 2 tasks of batch 2
# 96 px keeps an epoch a few seconds long, so a signal sent at iteration 3 lands mid-epoch.
JOB = [*MINI, "--batch_size", 2, "--print_freq", 1, "--input_size", 96]

# sitecustomize.py for the jobs' tasks: on a job's first run, task R (SLURM_PROCID) stops at the
# point MAE_TEST_PAUSE names for it ("R:point,..." or "*:point"), writes ready-R, and goes on once
# engine.launch.preemption has recorded a signal (at most 120 s). "start": while Python starts, before
# any code of ours runs; "torch": when the task first imports torch (our signal recorder is in place).
PAUSE_HOOK = r'''
import os
import sys
import time


def _pause(rank):
    open(os.path.join(os.environ["MAE_TEST_PAUSE_DIR"], f"ready-{rank}"), "w").close()
    deadline = time.time() + 120
    while time.time() < deadline:
        # The recorder's state, read without taking the signal over (StopRequest.install would).
        early = getattr(sys.modules.get("engine.launch.preemption"), "_early", None)
        if early is not None and early.signum is not None:
            return
        time.sleep(0.05)


def _install():
    rank = os.environ.get("SLURM_PROCID")
    spec = os.environ.get("MAE_TEST_PAUSE", "")
    if rank is None or not spec or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return
    points = dict(item.split(":") for item in spec.split(","))
    where = points.get(rank, points.get("*"))
    if where == "start":
        _pause(rank)
    elif where == "torch":
        state = []

        def hook(event, args):
            if event == "import" and args[0] == "torch" and not state:
                state.append(1)
                _pause(rank)
        sys.addaudithook(hook)


_install()
'''


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("slurm_photos"), copies=8)


def pause_env(tmp_path: Path, spec: str) -> dict:
    """Environment for a job whose first run holds its tasks as `spec` says (see PAUSE_HOOK)."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(PAUSE_HOOK)
    path = os.pathsep.join([str(hook_dir)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(PYTHONPATH=path, MAE_TEST_PAUSE=spec, MAE_TEST_PAUSE_DIR=str(hook_dir))


def wait_ready(tmp_path: Path, ranks, folder: Path):
    wait_for(lambda: all((tmp_path / "hook" / f"ready-{r}").exists() for r in ranks), 180,
             f"tasks {list(ranks)} at their pause point", folder)


def submit(script: str, args, job_dir: Path, launcher=(), nodes: int = 1, tasks: int = 2, env=None, cpu=True):
    cmd = ["python", str(REPO / "scripts" / script), *(["--device", "cpu"] if cpu else []), "--ngpus", str(tasks),
           "--nodes", str(nodes), "--partition", "debug", "--job_dir", str(job_dir / "%j"), *launcher,
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=job_dir, env=dict(cli_env(), **(env or {})), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"Submitted job_id: (\d+)", proc.stdout).group(1)
    return job_id, job_dir / job_id


def log_of(folder: Path, stream: str = "out", task: int = 0) -> str:
    """Task `task`'s stdout ("out") or stderr ("err"); task 0's files also get the batch script's
    output; requeued runs append to the same files."""
    path = folder / f"{folder.name}_{task}_log.{stream}"
    return path.read_text() if path.exists() else ""


def wait_for(predicate, timeout: float, what: str, folder: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    squeue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
    pytest.fail(f"timed out waiting for {what}\nsqueue:\n{squeue}\nlog:\n{log_of(folder)[-3000:]}\n"
                f"err:\n{log_of(folder, 'err')[-3000:]}")


def finished(folder: Path) -> bool:
    return "Job completed successfully" in log_of(folder)


def signal_job(job_id: str, sig: str):
    subprocess.run(["scancel", f"--signal={sig}", job_id], check=True, timeout=30)


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


def test_signal_before_python_starts_requeues_and_resumes(cluster, images, torchrun_reference, tmp_path):
    """SIGUSR2 (submitit's time-limit signal) while task 1 is still starting Python (it dies from it)
    and task 0 is importing torch (it records it, then waits for task 1 in vain): task 0 gives up
    after signal_delay_s / 2, the batch script requeues the job, and the next run trains it all."""
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 3, "--data_path", images], tmp_path,
                            launcher=["--signal_delay_s", "20"], env=pause_env(tmp_path, "0:torch,1:start"))
    wait_ready(tmp_path, (0, 1), folder)
    signal_job(job_id, "USR2")
    wait_for(lambda: finished(folder), 300, "job completion", folder)
    log = log_of(folder)
    assert "tasks ended by signal 12 before training started: requeueing job" in log
    assert "requeued 1 time(s)" in log and "requeued 2 time(s)" not in log
    assert "SIGUSR2 received before training started, and training did not start within 10 s: exiting with " \
           "code 140" in log_of(folder, "err")
    assert not re.search(r"stopped (at|after) epoch", log_of(folder, "err"))  # nothing was trained in run 0
    assert (folder / "log.txt").read_text().count("\n") == 3  # outputs default to the job folder
    assert_same_weights(torchrun_reference, folder / "checkpoint-last.pth")


def test_two_nodes_signalled_at_start_up_then_mid_epoch_bit_identical(cluster, images, torchrun_reference,
                                                                       tmp_path):
    """2 nodes x 1 task. Run 0 gets SIGUSR2 while importing torch: recorded, training stops at its
    first step boundary with checkpoint-last and submitit requeues. Run 1 gets SIGUSR1 inside
    epoch 1. Run 2 ends bit-identical to torchrun with 2 processes."""
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 3, "--data_path", images], tmp_path,
                            nodes=2, tasks=1, env=pause_env(tmp_path, "*:torch"))
    wait_ready(tmp_path, (0, 1), folder)
    signal_job(job_id, "USR2")
    wait_for(lambda: "requeued 1 time(s)" in log_of(folder), 240, "requeue 1", folder)
    wait_for(lambda: re.search(rf"requeued 1 time\(s\)[\s\S]*Epoch: \[1\]  \[ 3/{ITERS}\]", log_of(folder)), 240,
             "epoch 1 of run 1", folder)
    signal_job(job_id, "USR1")
    wait_for(lambda: "requeued 2 time(s)" in log_of(folder), 240, "requeue 2", folder)
    wait_for(lambda: finished(folder), 240, "job completion", folder)
    log, err = log_of(folder), log_of(folder, "err")
    assert "SIGUSR2 received before training started: stopping at the first step boundary" in err
    stops = re.findall(r"stopped at epoch (\d), iteration (\d+) after writing checkpoint-last(?:\.pth|/)", err)
    assert stops[0] == ("0", "1") and stops[1][0] == "1" and 0 < int(stops[1][1]) < ITERS, stops
    resumed = re.findall(r"continuing at epoch (\d), sample (\d+) of the epoch", log)
    assert resumed == [(e, str(4 * int(i))) for e, i in stops]  # each run picked up where the last stopped
    assert re.search(r"task 0/2 on node1\b", log) and re.search(r"task 1/2 on node2\b", log_of(folder, task=1))
    assert "before training started: requeueing" not in log  # submitit requeued; the batch script did not
    assert "requeued 3 time(s)" not in log
    assert_same_weights(torchrun_reference, folder / "checkpoint-last.pth")


def test_plain_sbatch_two_nodes_signalled_before_python_then_mid_epoch(cluster, images, torchrun_reference,
                                                                       tmp_path):
    """scripts/pretrain.sbatch without submitit, 2 nodes x 1 task: SIGUSR1 before Python runs any of our
    code kills both tasks (srun exit 138): the script requeues; SIGUSR1 inside epoch 0 of run 1: the
    tasks save and exit 75, the script requeues; run 2 ends bit-identical to torchrun."""
    out = tmp_path / "out"
    env = dict(cli_env(), **pause_env(tmp_path, "*:start"))
    # The script adds --data_path, --output_dir and --log_dir itself.
    train_args = " ".join(map(str, [a for a in JOB if a not in ("--log_dir", "")])) + " --device cpu --epochs 3"
    env.update(IMAGENET=str(images), OUTPUT_DIR=str(out), TRAIN_ARGS=train_args)
    # Command-line options override the script's #SBATCH lines: a CPU-sized job on the test cluster.
    proc = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--mem=2G", "--time=30", f"--chdir={REPO}",
                           f"--output={tmp_path}/job.out", str(REPO / "scripts" / "pretrain.sbatch")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / "job.out"

    def text():
        return log.read_text() if log.exists() else ""

    def wait(predicate, timeout, what):
        deadline = time.time() + timeout
        while not predicate():
            assert time.time() < deadline, f"timed out waiting for {what}\n{text()[-3000:]}"
            time.sleep(0.2)

    wait(lambda: all((tmp_path / "hook" / f"ready-{r}").exists() for r in (0, 1)), 180, "both tasks starting")
    signal_job(job_id, "USR1")
    wait(lambda: re.search(rf"restart 1[\s\S]*Epoch: \[0\]  \[ 3/{ITERS}\]", text()), 240, "epoch 0 of run 1")
    signal_job(job_id, "USR1")
    wait(lambda: (out / "log.txt").exists() and (out / "log.txt").read_text().count("\n") == 3, 300,
         "3 epochs in log.txt")
    wait(lambda: "Training time" in text(), 60, "the end of training")
    t = text()
    assert "tasks ended by signal 10 before training started: requeueing job" in t
    assert "training stopped on a signal after saving: requeueing job" in t
    assert "restart 2" in t and "restart 3" not in t
    assert re.search(r"continuing at epoch 0, sample \d+ of the epoch", t)
    assert_same_weights(torchrun_reference, out / "checkpoint-last.pth")


def test_gpu_request_reaches_the_tasks_which_fail_in_one_line_without_cuda(cluster, images, tmp_path):
    """Without --device cpu the job asks for --gpus-per-node: SLURM schedules it on the fake GPUs and
    the tasks see them; training then stops with the CLI's one-line error, not a traceback."""
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    if "gpu" not in gres:
        pytest.skip(f"the test cluster has no fake GPUs here (gres: {gres.strip()})")
    job_id, folder = submit("submitit_pretrain.py", [*JOB, "--epochs", 1, "--data_path", images], tmp_path,
                            nodes=2, tasks=1, cpu=False, launcher=["--cpus_per_task", "1", "--mem_gb", "1"])
    assert "#SBATCH --gpus-per-node=1" in (folder / f"{job_id}_submission.sh").read_text()
    wait_for(lambda: "error:" in log_of(folder, "err"), 180, "the job's error", folder)
    wait_for(lambda: job_id not in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                                                  text=True, timeout=30).stdout, 60, "the job's end", folder)
    for task in (0, 1):
        assert "(CUDA_VISIBLE_DEVICES=0)" in log_of(folder, task=task)
        assert "Traceback" not in log_of(folder, "err", task) + log_of(folder, task=task)
    errors = [line for line in log_of(folder, "err").splitlines() if line.startswith("error:")]
    assert errors == ["error: --device cuda was given but CUDA is not available: use --device cpu"]
    assert "requeued 1 time(s)" not in log_of(folder)


def test_finetune_job(cluster, two_classes, tmp_path):
    args = ["--model", "vit_mini_patch16", "--input_size", 64, "--nb_classes", 2, "--num_workers", 0,
            "--batch_size", 4, "--epochs", 1, "--warmup_epochs", 0, "--data_path", two_classes, "--dist_eval"]
    job_id, folder = submit("submitit_finetune.py", args, tmp_path)
    wait_for(lambda: finished(folder), 180, "job completion", folder)
    assert "Accuracy of the network on the 41 test images" in log_of(folder)
    assert (folder / "checkpoint-best.pth").exists()


# MixMIM at 128 px: slow enough per step that a signal sent at iteration 3 lands inside epoch 0.
MIX_JOB = ["--model", "mixmim_mini", "--input_size", 128, "--num_workers", 0, "--warmup_epochs", 1, "--log_dir", "",
           "--norm_pix_loss", "--batch_size", 2, "--print_freq", 1]


def test_mixmim_job_preempted_resumes_bit_identical(cluster, images, tmp_path):
    reference = tmp_path / "torchrun"
    assert_ok(pretrain([*MIX_JOB, "--epochs", 2, "--data_path", images, "--output_dir", reference], nproc=2))
    job_id, folder = submit("submitit_pretrain.py", [*MIX_JOB, "--epochs", 2, "--data_path", images], tmp_path)
    wait_for(lambda: re.search(rf"Epoch: \[0\]  \[ 3/{ITERS}\]", log_of(folder)), 180, "epoch 0", folder)
    signal_job(job_id, "USR1")
    wait_for(lambda: "requeued 1 time(s)" in log_of(folder), 180, "the requeue", folder)
    wait_for(lambda: finished(folder), 240, "job completion", folder)
    assert re.search(r"stopped (at|after) epoch 0", log_of(folder, "err"))
    assert re.search(r"Resumed from .*checkpoint-last.pth", log_of(folder))
    assert_same_weights(reference / "checkpoint-last.pth", folder / "checkpoint-last.pth")


def test_fsdp_job_preempted_resumes_bit_identical(cluster, images, tmp_path):
    """--dist_strategy fsdp through submitit: SIGUSR1 mid-epoch, the tasks write their shards of
    checkpoint-last/, submitit requeues, and the job ends bit-identical to torchrun with FSDP."""
    job = [*JOB, "--epochs", 2, "--data_path", images, "--dist_strategy", "fsdp"]
    reference = tmp_path / "torchrun"
    assert_ok(pretrain([*job, "--output_dir", reference], nproc=2))
    job_id, folder = submit("submitit_pretrain.py", job, tmp_path)
    wait_for(lambda: re.search(rf"Epoch: \[0\]  \[ 3/{ITERS}\]", log_of(folder)), 180, "epoch 0", folder)
    signal_job(job_id, "USR1")
    wait_for(lambda: "requeued 1 time(s)" in log_of(folder), 180, "the requeue", folder)
    wait_for(lambda: finished(folder), 240, "job completion", folder)
    m = re.search(r"stopped at epoch 0, iteration (\d+)", log_of(folder, "err"))
    assert m and 0 < int(m.group(1)) < ITERS, log_of(folder, "err")[-2000:]
    assert re.search(rf"Resumed from .*checkpoint-last: continuing at epoch 0, sample {4 * int(m.group(1))} ",
                     log_of(folder))
    a, b = load_full(str(reference / "checkpoint-last")), load_full(str(folder / "checkpoint-last"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i in a["optimizer"]["state"]:
        for name, value in a["optimizer"]["state"][i].items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
