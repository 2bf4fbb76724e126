"""Submit a training CLI to SLURM through submitit: one task per GPU (or per CPU process),
rendezvous from the job's environment, automatic requeue and resume on preemption or time limit.

The scripts/submitit_*.py launchers are thin wrappers around launch().
"""
import argparse
import importlib
import os
import shlex
import time
from pathlib import Path

from .dist import first_host, slurm_master_port


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
                   help="memory per node in GB (default: 40 per GPU; no request with --device cpu)")
    g.add_argument("--mail_user", default="", type=str, help="mail address for job begin/end/fail")
    g.add_argument("--signal_delay_s", default=120, type=int,
                   help="seconds between the preemption/time-limit signal and the kill: time to save")
    g.add_argument("--max_requeues", default=30, type=int, help="give up after this many time-limit requeues")
    g.add_argument("--dry_run", action="store_true", help="print the resolved job parameters and exit")


def executor_parameters(args) -> dict:
    """submitit parameters for the job, from the launcher flags."""
    on_gpu = not str(args.device).startswith("cpu")
    repo = str(Path(__file__).resolve().parents[1])
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=args.ngpus, timeout_min=args.timeout,
                  cpus_per_task=args.cpus_per_task or (10 if on_gpu else 1),
                  slurm_signal_delay_s=args.signal_delay_s,
                  # The tasks unpickle the Trainer before any of our code runs: the repo must be importable.
                  slurm_setup=[f"export PYTHONPATH={shlex.quote(repo)}${{PYTHONPATH:+:$PYTHONPATH}}"])
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


class Trainer:
    """What each task of the job runs; submitit pickles it and calls it again after a requeue."""

    def __init__(self, entry: str, args):
        self.entry, self.args = entry, args

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=first_host(os.environ["SLURM_JOB_NODELIST"]),
                          MASTER_PORT=str(slurm_master_port(os.environ["SLURM_JOB_ID"])))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        args = argparse.Namespace(**vars(self.args))
        for key in ("output_dir", "log_dir"):
            setattr(args, key, getattr(args, key).replace("%j", str(env.job_id)))
        if env.global_rank == 0:
            print(f"job {env.job_id}: task {env.global_rank}/{env.num_tasks} on {env.hostname}, "
                  f"requeued {restarts} time(s) so far", flush=True)
        module, func = self.entry.split(":")
        main = getattr(importlib.import_module(module), func)
        from engine.preemption import Preempted
        try:
            main(args)
        except Preempted:
            # Rank 0 has asked SLURM to requeue the job and exited; the requeue ends this task too.
            # Waiting here keeps this task from failing the job step before that happens.
            time.sleep(args.signal_delay_s)
            raise

    def checkpoint(self):
        """Called by submitit on rank 0 when the job is preempted or times out (after the
        engine wrote checkpoint-last.pth): resubmit the same command, which auto-resumes."""
        import submitit

        print("Requeuing the job; it will resume from checkpoint-last.pth", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.entry, self.args))


def launch(parser: argparse.ArgumentParser, entry: str, job_name: str, argv=None) -> int:
    """Parse the training CLI's flags plus the launcher's, submit the job, print its id."""
    import submitit

    add_launcher_args(parser)
    # The submitting machine may have no GPU; the job's nodes decide. --device cpu opts out.
    parser.set_defaults(device="cuda")
    args = parser.parse_args(argv)
    args.job_name = job_name
    args.job_dir = os.path.abspath(args.job_dir or os.path.join("jobs", "%j"))
    # The official launchers default the outputs to the job folder too.
    if args.output_dir == parser.get_default("output_dir"):
        args.output_dir = args.job_dir
    if args.log_dir == parser.get_default("log_dir"):
        args.log_dir = args.output_dir
    args.output_dir, args.log_dir = os.path.abspath(args.output_dir), os.path.abspath(args.log_dir)
    if os.path.isdir(args.data_path):
        args.data_path = os.path.abspath(args.data_path)
    for key in ("resume", "finetune"):
        if getattr(args, key, ""):
            setattr(args, key, os.path.abspath(getattr(args, key)))

    params = executor_parameters(args)
    if args.dry_run:
        print(f"job_dir: {args.job_dir}")
        for k, v in sorted(params.items()):
            print(f"{k}: {v}")
        print(f"command: {entry} with output_dir={args.output_dir}")
        return 0
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(Trainer(entry, args))
    print(f"Submitted job_id: {job.job_id}")
    print(f"logs: {args.job_dir.replace('%j', str(job.job_id))}")
    return 0
