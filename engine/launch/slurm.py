"""Submit a training CLI to SLURM through submitit: one task per GPU (or per CPU process),
rendezvous from the job's environment, automatic requeue and resume on preemption or time limit.

The scripts/submitit_*.py launchers are thin wrappers around launch().

The job's tasks unpickle a SlurmTask, so importing this module stays light (no torch): a stop
signal may arrive while they do (see scripts/slurm/task_entry.py). torch comes with util.dist
and util.cli, imported where they are used.
"""
import argparse
import contextlib
import importlib
import io
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from util import config_file
from util.errors import TrainingStopped, UserError

from . import preemption
from .watchdog import HANG_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
TASK_ENTRY = REPO / "scripts" / "slurm" / "task_entry.py"


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLURM (submitit)")
    g.add_argument("--ngpus", default=8, type=int,
                   help="GPUs per node, one task each (with --device cpu: tasks per node, no GPU requested)")
    g.add_argument("--nodes", default=2, type=int, help="number of nodes")
    g.add_argument("--timeout", default=4320, type=int, help="time limit of each job run, in minutes")
    g.add_argument("--job_dir", default="", type=str,
                   help="folder for the job's logs and (by default) outputs; %%j is the job id "
                        "(default: ./jobs/%%j, made absolute)")
    g.add_argument("--partition", default="", type=str, help="partition (default: the cluster's default)")
    g.add_argument("--use_volta32", action="store_true", help="request 32 GB V100 GPUs (constraint volta32gb)")
    g.add_argument("--comment", default="", type=str, help="comment passed to the scheduler")
    g.add_argument("--account", default="", type=str)
    g.add_argument("--qos", default="", type=str)
    g.add_argument("--constraint", default="", type=str, help="node features, e.g. a100")
    g.add_argument("--exclude", default="", type=str, help="nodes to avoid")
    g.add_argument("--cpus_per_task", default=None, type=int,
                   help="CPU cores per task, i.e. per GPU (default: 10 with GPUs, 1 with --device cpu)")
    g.add_argument("--mem_gb", default=None, type=int,
                   help="memory per node in GB (default: 40 per GPU; no request with --device cpu; 0: no request)")
    g.add_argument("--mail_user", default="", type=str, help="mail address for job begin/end/fail")
    g.add_argument("--signal_delay_s", default=120, type=int,
                   help="seconds between the preemption/time-limit signal and the kill: time to save")
    g.add_argument("--max_requeues", default=30, type=int, help="give up after this many time-limit requeues")
    g.add_argument("--dry_run", action="store_true",
                   help="check the training arguments as the job would, print the job and its arguments, and exit")
    g.add_argument("--no_preflight", action="store_true",
                   help="submit without checking the training arguments here first (for a --data_path or "
                        "checkpoint that exists only on the compute nodes); the job still checks them")


def check_launcher_args(args) -> None:
    """Launcher flags SLURM would refuse, or accept and then misbehave on."""
    what = "tasks per node" if _on_cpu(args) else "GPUs per node"
    for flag, value, low, meaning in (("nodes", args.nodes, 1, "nodes"), ("ngpus", args.ngpus, 1, what),
                                      ("timeout", args.timeout, 1, "minutes"),
                                      ("cpus_per_task", args.cpus_per_task, 1, "cores per task"),
                                      ("mem_gb", args.mem_gb, 0, "GB per node; 0: no memory request"),
                                      ("signal_delay_s", args.signal_delay_s, 0, "seconds"),
                                      ("max_requeues", args.max_requeues, 0, "requeues")):
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low} ({meaning}), got {value}")
    limit = min(args.timeout * 60, 65536)
    if args.signal_delay_s >= limit:
        raise UserError(f"--signal_delay_s {args.signal_delay_s} is not shorter than the job's time limit "
                        f"(--timeout {args.timeout} min): SLURM would signal every run as soon as it starts; "
                        f"lower --signal_delay_s below {limit} or raise --timeout")


def _on_cpu(args) -> bool:
    return str(args.device).startswith("cpu")


def _check_job_dir(job_dir: str) -> None:
    """The folder up to the first %-pattern can be created and written (submitit creates it)."""
    parts = Path(job_dir).parts
    fixed = Path(*parts[:next((i for i, p in enumerate(parts) if "%" in p), len(parts))])
    existing = fixed
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--job_dir {job_dir} cannot be created: {existing} is a file, not a folder; "
                        "give another --job_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--job_dir {job_dir} cannot be {'written' if existing == fixed else 'created'}: "
                        f"{existing} is not writable; give a writable --job_dir")


def requeue_lines(max_requeues: int):
    """Batch-script lines after srun: requeue the job when a task died from SIGUSR1/SIGUSR2 (srun
    exit 138/140) before any handler could act on it, e.g. a signal while Python started (or a
    task that could not start training after one, see preemption.record_early). Tasks
    that saw the signal in training requeue the job themselves (submitit), and a requeue kills
    this script before it gets here; the Restarts check covers the race between the two. Also
    when the hang watchdog ended a task (exit 124, engine/launch/watchdog.py)."""
    return [
        "rc=$?",
        'why="tasks ended by signal $((rc - 128)) before training started"',
        f'[ "$rc" -eq {HANG_EXIT_CODE} ] && why="the hang watchdog ended a task that stopped making progress"',
        f'if [ "$rc" -eq 138 ] || [ "$rc" -eq 140 ] || [ "$rc" -eq {HANG_EXIT_CODE} ]; then',
        '  restarts=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o "Restarts=[0-9]*" | cut -d= -f2)',
        '  if [ "${restarts:-0}" -gt "${SLURM_RESTART_COUNT:-0}" ]; then',
        '    echo "$why; job $SLURM_JOB_ID is already requeued"',
        f'  elif [ "${{SLURM_RESTART_COUNT:-0}}" -ge {int(max_requeues)} ]; then',
        f'    echo "$why; not requeued: --max_requeues {int(max_requeues)} reached" >&2',
        "  else",
        '    echo "$why: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  fi",
        "fi",
        'exit "$rc"',
    ]


def task_python(args) -> str:
    """The command submitit starts each task with (it appends `-u -m submitit.core._submit FOLDER`)."""
    return " ".join([shlex.quote(sys.executable), "-u", shlex.quote(str(TASK_ENTRY)),
                     "--signal_delay_s", str(args.signal_delay_s)])


def executor_parameters(args) -> dict:
    """submitit parameters for the job, from the launcher flags."""
    on_gpu = not _on_cpu(args)
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=args.ngpus, timeout_min=args.timeout,
                  cpus_per_task=args.cpus_per_task or (10 if on_gpu else 1),
                  slurm_signal_delay_s=args.signal_delay_s,
                  # The tasks unpickle the SlurmTask before any of our code runs: the repo must be importable.
                  slurm_setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
                  slurm_teardown=requeue_lines(args.max_requeues))
    if on_gpu:
        params["gpus_per_node"] = args.ngpus
    mem_gb = args.mem_gb if args.mem_gb is not None else (40 * args.ngpus if on_gpu else 0)
    if mem_gb:
        params["mem_gb"] = mem_gb
    for flag, key in (("partition", "slurm_partition"), ("comment", "slurm_comment"),
                      ("account", "slurm_account"), ("qos", "slurm_qos"), ("exclude", "slurm_exclude"),
                      ("mail_user", "slurm_mail_user")):
        if getattr(args, flag):
            params[key] = getattr(args, flag)
    constraints = [c for c in (args.constraint, "volta32gb" if args.use_volta32 else "") if c]
    if constraints:
        params["slurm_constraint"] = "&".join(constraints)
    if args.mail_user:
        params["slurm_mail_type"] = "BEGIN,END,FAIL"
    return params


def _load(entry: str):
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)


def run_preflight(preflight: str, args, world_size: int) -> None:
    """The training CLI's own checks, as the job would run them, on a copy of args. CUDA and the
    launcher's environment are the job's nodes' business: skipped here where the check allows."""
    _load(preflight)(argparse.Namespace(**vars(args)), world_size, on_this_machine=False)


class SlurmTask:
    """What each task of the job runs; submitit pickles it and calls it again after a requeue."""

    def __init__(self, entry: str, args):
        self.entry, self.args = entry, args

    def __call__(self):
        # submitit installed its SIGUSR2 handler (requeue at once) after unpickling this object:
        # take the signals back, so that until training runs they are recorded and submitit's
        # handler runs only once checkpoint-last is written.
        preemption.record_early(wait_s=max(self.args.signal_delay_s / 2, 1.0))
        import submitit

        from util.dist import first_host, slurm_master_port

        env = submitit.JobEnvironment()
        port = getattr(self.args, "port", None) or slurm_master_port(os.environ["SLURM_JOB_ID"])
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=first_host(os.environ["SLURM_JOB_NODELIST"]),
                          MASTER_PORT=str(port))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        args = argparse.Namespace(**vars(self.args))
        for key in ("output_dir", "log_dir"):
            setattr(args, key, getattr(args, key).replace("%j", str(env.job_id)))
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        node = os.environ.get("SLURMD_NODENAME", env.hostname)
        print(f"job {env.job_id}: task {env.global_rank}/{env.num_tasks} on {node}"
              f"{f' (CUDA_VISIBLE_DEVICES={gpus})' if gpus is not None else ''}, "
              f"requeued {restarts} time(s) so far", flush=True)
        try:
            _load(self.entry)(args)
        except preemption.Preempted as e:
            # Rank 0 has asked SLURM to requeue the job and exited; the requeue ends this task too.
            # Waiting here keeps this task from failing the job step before that happens.
            time.sleep(args.signal_delay_s)
            self._fail(e, env.global_rank)
        except (UserError, TrainingStopped, submitit.core.utils.UncompletedJobError) as e:
            self._fail(e, env.global_rank)

    @staticmethod
    def _fail(error: Exception, rank: int):
        """One line, as the training CLI prints it (no traceback), and its exit code."""
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        raise SystemExit(getattr(error, "exit_code", 1))

    def checkpoint(self):
        """Called by submitit on rank 0 when the job is preempted or times out (after the
        engine wrote checkpoint-last.pth): resubmit the same command, which auto-resumes."""
        import submitit

        print("Requeuing the job; it will resume from checkpoint-last.pth", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.entry, self.args))


def _print_dry_run(args, params: dict, entry: str, preflight: str, world_size: int) -> None:
    print(f"job_dir: {args.job_dir}")
    for k, v in sorted(params.items()):
        if k == "slurm_teardown":
            v = [f"after srun, requeue the job if tasks ended by SIGUSR1/SIGUSR2 ({len(v)} lines)"]
        for line in (v if isinstance(v, list) else [v]):
            print(f"{k}: {line}")
    print(f"command: {entry} with output_dir={args.output_dir}")
    print(f"world_size: {world_size} ({args.nodes} node(s) x {args.ngpus} task(s))")
    launcher = launcher_dests()
    for k, v in sorted(vars(args).items()):
        if k not in launcher and k != "job_name":
            print(f"arg.{k}: {v}")
    print(f"checks: {'passed (' + preflight + ')' if preflight else 'not run (--no_preflight)'}")


def launcher_dests() -> set:
    """The launcher's own flags (submitit's job, not the training run's)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_launcher_args(parser)
    return set(vars(parser.parse_args([])))


def submit(args, parser, entry: str, job_name: str, preflight: str = "") -> None:
    check_launcher_args(args)
    args.job_name = job_name
    args.job_dir = os.path.abspath(args.job_dir or os.path.join("jobs", "%j"))
    _check_job_dir(args.job_dir)
    # The official launchers default the outputs to the job folder too.
    if args.output_dir == parser.get_default("output_dir"):
        args.output_dir = args.job_dir
    if args.log_dir == parser.get_default("log_dir"):
        args.log_dir = args.output_dir
    args.output_dir = os.path.abspath(args.output_dir) if args.output_dir else ""
    args.log_dir = os.path.abspath(args.log_dir) if args.log_dir else ""
    if os.path.isdir(args.data_path) or "{" in args.data_path or args.data_path.endswith(".tar"):
        # a folder, or a shard pattern: the job may start in another directory
        args.data_path = os.path.abspath(args.data_path)
    for key in ("resume", "finetune"):
        if getattr(args, key, ""):
            setattr(args, key, os.path.abspath(getattr(args, key)))

    world_size = args.nodes * args.ngpus
    if args.print_config:  # what the job's tasks will resolve, nothing submitted
        _load(entry.split(":")[0] + ":print_config")(args, world_size)
        return
    checked = preflight and not args.no_preflight
    if checked:
        # Never queue a job for hours only to fail on its first line.
        run_preflight(preflight, args, world_size)
    params = executor_parameters(args)
    if args.dry_run:
        _print_dry_run(args, params, entry, preflight if checked else "", world_size)
        return
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("no SLURM here (sbatch/srun not found): submit from a machine of the cluster, or "
                        "run the training CLI directly (torchrun ... main_*.py)")
    try:
        import submitit
    except ImportError:
        raise UserError("submitit is not installed: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster="slurm", slurm_max_num_timeout=args.max_requeues,
                                     slurm_python=task_python(args))
    executor.update_parameters(**params)
    sbatch_stderr = io.StringIO()  # submitit prints sbatch's complaint; it becomes our one line
    try:
        with contextlib.redirect_stderr(sbatch_stderr):
            job = executor.submit(SlurmTask(entry, args))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        lines = [line.strip() for line in (str(e) or sbatch_stderr.getvalue()).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise UserError(f"sbatch refused the job: {reason}") from None
    print(f"Submitted job_id: {job.job_id}")
    print(f"logs: {args.job_dir.replace('%j', str(job.job_id))}")


def launch(parser: argparse.ArgumentParser, entry: str, job_name: str, argv=None, preflight: str = "") -> int:
    """Parse the training CLI's flags plus the launcher's, check them as the training CLI would
    (`preflight`, "module:function"), then submit the job (or, --dry_run, print it). Returns the
    exit code: bad input is one `error: ...` line and exit 2."""
    from util.cli import run_cli

    add_launcher_args(parser)
    # The submitting machine may have no GPU; the job's nodes decide. --device cpu opts out.
    parser.set_defaults(device="cuda")
    return run_cli(lambda _: submit(config_file.parse_args(parser, argv), parser, entry, job_name, preflight), None)
