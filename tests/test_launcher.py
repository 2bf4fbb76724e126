"""The SLURM launchers without a cluster: flag errors, dry runs, the submitted batch script, its
requeue logic (run by bash with stand-in srun/sbatch/scontrol), and the recording of a stop
signal from the first moment of a task on (engine.launch.preemption, scripts/slurm/task_entry.py).
tests/test_slurm.py runs the same through a real SLURM cluster."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.launch import preemption
from engine.launch import slurm as slurm_launch
from util.errors import UserError

import main_finetune
import main_linprobe
import main_pretrain
from conftest import REPO, cli_env, one_line_error

LAUNCHERS = {
    "pretrain": (main_pretrain, "engine.pretrain:main", "engine.pretrain:preflight"),
    "finetune": (main_finetune, "engine.finetune:main", "engine.finetune:preflight"),
    "linprobe": (main_linprobe, "engine.linprobe:main", "engine.linprobe:preflight"),
}
SMALL = ["--model", "mae_vit_mini_patch16", "--input_size", "64", "--batch_size", "2", "--num_workers", "0",
         "--nodes", "1", "--ngpus", "2"]


def launch(argv, which="pretrain"):
    """The launcher CLI in-process: (exit code, stdout, stderr) as a CompletedProcess."""
    module, entry, preflight = LAUNCHERS[which]
    parser = argparse.ArgumentParser("launcher", parents=[module.get_args_parser()])
    return slurm_launch.launch(parser, entry, f"mae_{which}", argv=list(map(str, argv)), preflight=preflight)


def run_launch(capsys, argv, which="pretrain") -> subprocess.CompletedProcess:
    code = launch(argv, which)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def dry_run(capsys, argv, which="pretrain") -> dict:
    proc = run_launch(capsys, ["--dry_run", *argv], which)
    assert proc.returncode == 0, proc.stderr
    lines = {}
    for line in proc.stdout.strip().splitlines():
        key, value = line.split(": ", 1)
        lines.setdefault(key, value)
    return lines


@pytest.mark.parametrize("flags, expected", [
    (["--nodes", "0"], "--nodes must be at least 1 (nodes), got 0"),
    (["--ngpus", "0"], "--ngpus must be at least 1 (GPUs per node), got 0"),
    (["--ngpus", "-1", "--device", "cpu"], "--ngpus must be at least 1 (tasks per node), got -1"),
    (["--timeout", "0"], "--timeout must be at least 1 (minutes), got 0"),
    (["--mem_gb", "-1"], "--mem_gb must be at least 0 (GB per node; 0: no memory request), got -1"),
    (["--cpus_per_task", "0"], "--cpus_per_task must be at least 1 (cores per task), got 0"),
    (["--signal_delay_s", "-5"], "--signal_delay_s must be at least 0 (seconds), got -5"),
    (["--max_requeues", "-1"], "--max_requeues must be at least 0 (requeues), got -1"),
    (["--timeout", "2", "--signal_delay_s", "120"], "--signal_delay_s 120 is not shorter than the job's time "
                                                    "limit (--timeout 2 min): SLURM would signal every run"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_launcher_flag_errors_are_one_line(capsys, tmp_path, flags, expected, dry):
    argv = [*SMALL, "--job_dir", tmp_path / "%j", *flags, *(["--dry_run"] if dry else [])]
    assert expected in one_line_error(run_launch(capsys, argv))


def test_job_dir_under_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    err = one_line_error(run_launch(capsys, ["--dry_run", *SMALL, "--job_dir", tmp_path / "file" / "%j"]))
    assert f"--job_dir {tmp_path}/file/%j cannot be created: {tmp_path}/file is a file" in err


@pytest.mark.parametrize("which, flags, expected", [
    ("pretrain", ["--mask_ratio", "1.5"], "--mask_ratio must be between 0 and 1"),
    ("pretrain", ["--model", "mae_nope"], "unknown model 'mae_nope'"),
    ("pretrain", ["--data_path", "/nonexistent/data"], "--data_path /nonexistent/data does not exist"),
    # 14 bundled photos over 2 nodes x 4 tasks: 2 per task.
    ("pretrain", ["--nodes", "2", "--ngpus", "4", "--batch_size", "3"],
     "each of the 8 process(es) gets 2 of the 14 images, fewer than --batch_size 3"),
    ("finetune", ["--model", "vit_nope", "--nb_classes", "2"], "unknown model 'vit_nope'"),
    ("linprobe", ["--model", "vit_mini_patch16", "--finetune", "/nonexistent.pth"], "/nonexistent.pth"),
])
def test_dry_run_runs_the_training_checks(capsys, tmp_path, which, flags, expected):
    base = SMALL if which == "pretrain" else ["--batch_size", "2", "--num_workers", "0"]
    argv = ["--dry_run", "--nodes", "1", "--ngpus", "1", *base, "--job_dir", tmp_path / "%j", *flags]
    assert expected in one_line_error(run_launch(capsys, argv, which))


def test_dry_run_prints_job_and_training_arguments(capsys, tmp_path, monkeypatch, two_classes):
    """Site-free defaults, absolute paths, the world size the checks used, every training flag.
    No GPU on the submitting machine is needed for a GPU job (the default --device cuda)."""
    monkeypatch.chdir(tmp_path)
    lines = dry_run(capsys, ["--nodes", "4", "--account", "vision", "--constraint", "a100", "--use_volta32",
                             "--job_dir", "rel/%j", "--model", "mae_vit_base_patch16", "--batch_size", "1",
                             "--data_path", REPO / "data" / "sample" / "train" / ".."])
    assert lines["job_dir"] == f"{tmp_path}/rel/%j"
    assert (lines["nodes"], lines["tasks_per_node"], lines["gpus_per_node"]) == ("4", "8", "8")
    assert (lines["cpus_per_task"], lines["mem_gb"], lines["timeout_min"]) == ("10", "320", "4320")
    assert lines["slurm_account"] == "vision" and lines["slurm_constraint"] == "a100&volta32gb"
    assert "slurm_partition" not in lines  # no site default: the cluster's default partition
    assert lines["command"] == f"engine.pretrain:main with output_dir={tmp_path}/rel/%j"
    assert lines["world_size"] == "32 (4 node(s) x 8 task(s))"
    assert (lines["arg.model"], lines["arg.batch_size"], lines["arg.device"]) == ("mae_vit_base_patch16", "1", "cuda")
    assert lines["arg.output_dir"] == lines["arg.log_dir"] == f"{tmp_path}/rel/%j"
    assert lines["arg.data_path"] == str(REPO / "data" / "sample")
    assert lines["checks"] == "passed (engine.pretrain:preflight)"
    assert not any(k in lines for k in ("arg.nodes", "arg.dry_run", "arg.job_dir"))  # launcher flags apart
    lines = dry_run(capsys, ["--device", "cpu", "--ngpus", "2", "--nodes", "1", "--batch_size", "2",
                             "--model", "vit_mini_patch16", "--data_path", two_classes], "linprobe")
    assert "gpus_per_node" not in lines and "mem_gb" not in lines and lines["tasks_per_node"] == "2"
    assert lines["command"].startswith("engine.linprobe:main")
    assert lines["checks"] == "passed (engine.linprobe:preflight)"


def test_no_preflight_submits_what_only_the_compute_nodes_can_check(capsys, tmp_path):
    """A --data_path that exists only on the compute nodes: refused by the checks here, accepted
    with --no_preflight (the job itself still runs them)."""
    argv = ["--dry_run", "--nodes", "1", "--ngpus", "1", *SMALL, "--job_dir", tmp_path / "%j",
            "--data_path", "/nodes/local/imagenet"]
    assert "--data_path /nodes/local/imagenet does not exist" in one_line_error(run_launch(capsys, argv))
    lines = dry_run(capsys, [*argv[1:], "--no_preflight"])
    assert lines["checks"] == "not run (--no_preflight)" and lines["arg.data_path"] == "/nodes/local/imagenet"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun/sbatch/scontrol stand-ins on PATH. sbatch keeps the script it is given and answers
    with job 4242; scontrol answers `show job` with Restarts=$FAKE_RESTARTS and logs requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'echo "srun $*" >>"$FAKE_LOG"; exit "${FAKE_RC:-0}"',
        "sbatch": 'cp "$1" "$FAKE_DIR/submitted.sh"; echo "Submitted batch job 4242"',
        "scontrol": 'if [ "$1" = show ]; then echo "JobId=$3 JobState=RUNNING Restarts=${FAKE_RESTARTS:-0}"; '
                    'else echo "scontrol $*" >>"$FAKE_LOG"; fi',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    return tmp_path


def calls(folder: Path) -> str:
    log = folder / "calls.log"
    return log.read_text() if log.exists() else ""


def test_submitted_batch_script(capsys, fake_slurm):
    proc = run_launch(capsys, [*SMALL, "--job_dir", fake_slurm / "jobs" / "%j", "--signal_delay_s", "90",
                               "--max_requeues", "5", "--ngpus", "4", "--nodes", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "Submitted job_id: 4242" in proc.stdout
    script = (fake_slurm / "submitted.sh").read_text()
    for flag in ("--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=10", "--mem=160GB",
                 "--signal=USR2@90", "--time=4320", "--open-mode=append"):
        assert f"#SBATCH {flag}\n" in script
    assert f"export PYTHONPATH={REPO}" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    # The tasks start through task_entry.py: a signal during start-up is recorded, not fatal.
    assert f"{sys.executable} -u {REPO}/scripts/slurm/task_entry.py --signal_delay_s 90 -u -m " \
           f"submitit.core._submit {fake_slurm}/jobs/%j" in srun
    teardown = script.split("# teardown\n", 1)[1]
    assert script.index(srun) < script.index("# teardown") and teardown.startswith("rc=$?\n")
    assert "--max_requeues 5 reached" in teardown


def test_submission_runs_the_checks_first(capsys, fake_slurm):
    err = one_line_error(run_launch(capsys, [*SMALL, "--job_dir", fake_slurm / "%j", "--mask_ratio", "0"]))
    assert "--mask_ratio must be between 0 and 1" in err
    assert not (fake_slurm / "submitted.sh").exists()  # nothing was submitted


def test_sbatch_refusal_is_one_line(capsys, fake_slurm):
    (fake_slurm / "bin" / "sbatch").write_text(
        "#!/bin/bash\necho 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
        "exit 1\n")
    err = one_line_error(run_launch(capsys, [*SMALL, "--job_dir", fake_slurm / "%j", "--partition", "nope"]))
    assert err == "error: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid partition " \
                  "name specified"


def test_no_slurm_here_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    err = one_line_error(run_launch(capsys, [*SMALL, "--job_dir", tmp_path / "%j"]))
    assert "no SLURM here (sbatch/srun not found)" in err


def run_teardown(folder: Path, rc: int, restart_count=None, restarts: int = 0, max_requeues: int = 3):
    """The batch script's lines after srun, as bash runs them after an srun that exited `rc`."""
    lines = "\n".join(slurm_launch.requeue_lines(max_requeues))
    env = dict(os.environ, SLURM_JOB_ID="77", FAKE_RESTARTS=str(restarts))
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    proc = subprocess.run(["bash", "-c", f"(exit {rc})\n{lines}"], env=env, capture_output=True, text=True,
                          timeout=30)
    return proc, calls(folder)


@pytest.mark.parametrize("rc", [138, 140])
def test_batch_script_requeues_tasks_killed_by_user_signal(fake_slurm, rc):
    proc, log = run_teardown(fake_slurm, rc)
    assert proc.returncode == rc and log == "scontrol requeue 77\n"
    assert f"tasks ended by signal {rc - 128} before training started: requeueing job 77" in proc.stdout


def test_batch_script_requeues_after_the_hang_watchdog(fake_slurm):
    proc, log = run_teardown(fake_slurm, 124)
    assert proc.returncode == 124 and log == "scontrol requeue 77\n"
    assert "the hang watchdog ended a task that stopped making progress: requeueing job 77" in proc.stdout


@pytest.mark.parametrize("rc", [0, 1, 2, 75, 137, 143, 255])
def test_batch_script_leaves_other_endings_alone(fake_slurm, rc):
    proc, log = run_teardown(fake_slurm, rc)
    assert proc.returncode == rc and log == ""


def test_batch_script_never_requeues_twice_or_past_the_limit(fake_slurm):
    # Already requeued by a task (submitit) or by SLURM: the controller counts one more restart.
    proc, log = run_teardown(fake_slurm, 140, restart_count=2, restarts=3)
    assert log == "" and "job 77 is already requeued" in proc.stdout
    proc, log = run_teardown(fake_slurm, 140, restart_count=3, restarts=3, max_requeues=3)
    assert log == "" and "--max_requeues 3 reached" in proc.stderr
    proc, log = run_teardown(fake_slurm, 140, restart_count=2, restarts=2, max_requeues=3)
    assert log == "scontrol requeue 77\n"


@pytest.mark.parametrize("rc, restarts, requeued", [
    (75, 0, True),    # the tasks saved checkpoint-last on the signal
    (138, 0, True),   # SIGUSR1 killed them before any handler (or they gave up before training)
    (140, 0, True),
    (124, 0, True),   # the hang watchdog ended a task
    (0, 0, False), (1, 0, False), (137, 0, False),
    (75, 1, False),   # already requeued (e.g. by SLURM's preemption)
])
def test_plain_sbatch_script_requeue_logic(fake_slurm, tmp_path, rc, restarts, requeued):
    env = dict(os.environ, SLURM_JOB_ID="88", FAKE_RC=str(rc), FAKE_RESTARTS=str(restarts), IMAGENET="/data",
               OUTPUT_DIR=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "pretrain.sbatch")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == rc, proc.stderr
    srun, *rest = calls(fake_slurm).splitlines()
    assert srun.startswith("srun --kill-on-bad-exit=0 python scripts/slurm/task_entry.py --signal_delay_s 120 "
                           "main_pretrain.py --model mae_vit_large_patch16")
    assert rest == (["scontrol requeue 88"] if requeued else [])


@pytest.fixture
def clean_signals():
    """Signal handlers and engine.launch.preemption's early state restored after the test."""
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._take_over_early()
    preemption._early.previous.clear()
    preemption._early.wait_s = None


def test_signal_before_training_is_taken_over_by_stop_request(clean_signals):
    """The submitit sequence: our recorder first, submitit's handler over it, our recorder again.
    A SIGUSR2 then is recorded (submitit's handler does not run yet); the StopRequest picks it
    up and calls submitit's handler only when it stops, after checkpoint-last is written."""
    requeued = []
    preemption.record_early()
    signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # submitit's install
    preemption.record_early()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert requeued == []
    stop = preemption.StopRequest().install()
    assert stop.signum == signal.SIGUSR2
    assert preemption.StopRequest().install().signum is None  # taken over once: a later install has no signal
    assert stop.agreed()
    with pytest.raises(preemption.Preempted):
        stop.stop("at epoch 0, iteration 1")
    assert requeued == [signal.SIGUSR2]


def test_sigusr1_before_training_requeues_through_submitit_handler(clean_signals):
    requeued = []
    preemption.record_early()
    signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    preemption.record_early()
    os.kill(os.getpid(), signal.SIGUSR1)  # default action: death; recorded instead
    stop = preemption.StopRequest().install()
    with pytest.raises(preemption.Preempted, match="stopped by SIGUSR1"):
        stop.stop("at epoch 0, iteration 1")
    assert requeued == [signal.SIGUSR1]


def run_python(code: str, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args] if not code else [sys.executable, "-c", code, *args], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_recorded_signal_without_training_ends_like_the_signal(tmp_path):
    """No StopRequest within wait_s (e.g. peers killed by the signal never join the rendezvous):
    exit 128 + signal, which the batch script requeues on; a StopRequest in time disarms it."""
    code = ("import os, signal, time\nfrom engine.launch import preemption\npreemption.record_early(wait_s=0.5)\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n{}time.sleep(3)\nprint('alive')")
    proc = run_python(code.format(""))
    assert proc.returncode == 140 and "alive" not in proc.stdout
    assert proc.stderr.strip() == "error: SIGUSR2 received before training started, and training did not start " \
                                  "within 0.5 s: exiting with code 140 so that the job is requeued"
    proc = run_python(code.format("preemption.StopRequest().install()\n"))
    assert proc.returncode == 0 and "alive" in proc.stdout


TASK_ENTRY = str(REPO / "scripts" / "slurm" / "task_entry.py")
TARGET = ("import os, signal, sys, time\n"
          "os.kill(os.getpid(), signal.SIGUSR1)  # the target's first line: fatal unless recorded already\n"
          "from engine.launch import preemption\n"
          "time.sleep(float(os.environ.get('TARGET_SLEEP', '0')))  # a set-up before training starts\n"
          "print(preemption.StopRequest().install().signum == signal.SIGUSR1, sys.argv[1:], sys.path[0] == os.getcwd())\n")


@pytest.mark.parametrize("form", ["script", "module"])
def test_task_entry_records_signals_before_the_target_runs(tmp_path, form):
    (tmp_path / "target.py").write_text(TARGET)
    target = [str(tmp_path / "target.py")] if form == "script" else ["-u", "-m", "target"]
    proc = subprocess.run([sys.executable, TASK_ENTRY, "--signal_delay_s", "60", *target, "a", "-b"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "['a',", "'-b']", "True"]  # as `python target.py` / `-m target`


def test_task_entry_gives_up_after_half_the_signal_delay(tmp_path):
    (tmp_path / "target.py").write_text(TARGET)
    proc = subprocess.run([sys.executable, TASK_ENTRY, "--signal_delay_s", "2", str(tmp_path / "target.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(cli_env(), TARGET_SLEEP="30"))
    assert proc.returncode == 138
    assert "SIGUSR1 received before training started, and training did not start within 1 s" in proc.stderr
    proc = subprocess.run([sys.executable, TASK_ENTRY, "-m"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: nothing to run; usage: task_entry.py")


def test_tasks_unpickle_the_slurm_task_without_importing_torch():
    """submitit unpickles the SlurmTask before it installs any signal handler; torch takes seconds."""
    proc = run_python("import sys\nimport engine.launch.slurm, engine.launch.preemption\nprint('torch' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def fail_with_user_error(args):
    raise UserError("--data_path /x does not exist: give a dataset folder")


def stop_preempted(args):
    raise preemption.Preempted("stopped by SIGUSR2 at epoch 0, iteration 1")


@pytest.mark.parametrize("entry, code, line", [
    ("test_launcher:fail_with_user_error", 2, "error: --data_path /x does not exist: give a dataset folder"),
    ("test_launcher:stop_preempted", 75, "error: stopped by SIGUSR2 at epoch 0, iteration 1"),
])
def test_slurm_task_errors_are_one_line(capsys, monkeypatch, clean_signals, entry, code, line):
    """A job's task ends with the CLI's one-line error and exit code, not a traceback."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for var, value in dict(SLURM_JOB_ID="5", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0",
                           SLURM_JOB_NODELIST="node[1-2]", SLURMD_NODENAME="node1", CUDA_VISIBLE_DEVICES="0").items():
        monkeypatch.setenv(var, value)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # SlurmTask sets them. setenv first, so that monkeypatch removes them again after the test: a
        # MASTER_ADDR=node1 left in this process's environment would reach later tests' processes.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    args = argparse.Namespace(output_dir="/o/%j", log_dir="", signal_delay_s=0, port=None)
    with pytest.raises(SystemExit) as e:
        slurm_launch.SlurmTask(entry, args)()
    out = capsys.readouterr()
    assert e.value.code == code and out.err.strip() == line
    assert "job 5: task 0/2 on node1 (CUDA_VISIBLE_DEVICES=0), requeued 0 time(s) so far" in out.out
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["WORLD_SIZE"]) == ("node1", "15005", "2")


@pytest.mark.parametrize("squeue_says, seconds", [
    ("1:29:58", 5398), ("2-02:59:58", 2 * 86400 + 10798), ("0:58", 58), ("UNLIMITED", None), ("", None)])
def test_slurm_time_left(fake_slurm, monkeypatch, squeue_says, seconds):
    (fake_slurm / "bin" / "squeue").write_text(f"#!/bin/bash\necho '{squeue_says}'\n")
    (fake_slurm / "bin" / "squeue").chmod(0o755)
    assert preemption.slurm_time_left("12") == seconds


@pytest.mark.parametrize("answers, signalled", [
    ([2.5], True),          # the warning is due (or overdue: SLURM's may have been lost): signal now
    ([3.3, None], False),   # read again after waiting: the job is gone (or unlimited now), no signal
    ([None], False),
])
def test_time_limit_watch_signals_rank_0_itself(clean_signals, answers, signalled):
    preemption.record_early()
    asked = iter(answers)
    preemption.watch_time_limit("12", 2, time_left=lambda job_id: next(asked)).join(timeout=30)
    time.sleep(0.1)  # the handler runs in the main thread
    assert preemption.StopRequest().install().signum == (signal.SIGUSR2 if signalled else None)


def test_task_entry_on_rank_0_acts_on_a_lost_time_limit_signal(fake_slurm, tmp_path):
    """Rank 0 finds the job 3 s from its limit with a 2 s signal delay and no signal received (SLURM
    sent it before the task existed): it signals itself; training never starts; exit 140."""
    (fake_slurm / "bin" / "squeue").write_text("#!/bin/bash\necho 0:03\n")
    (fake_slurm / "bin" / "squeue").chmod(0o755)
    (tmp_path / "target.py").write_text("import time\ntime.sleep(30)\n")
    proc = subprocess.run([sys.executable, TASK_ENTRY, "--signal_delay_s", "2", str(tmp_path / "target.py")],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SLURM_PROCID="0", SLURM_JOB_ID="12"))
    assert proc.returncode == 140, proc.stderr
    assert "SIGUSR2 received before training started, and training did not start within 1 s" in proc.stderr
