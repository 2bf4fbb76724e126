"""Start a SLURM task so that a stop signal at ANY moment of its start-up leads to a requeue.

    python scripts/slurm/task_entry.py [--help] [--signal_delay_s S] (-m MODULE | SCRIPT.py) [ARGS...]

SLURM may send the time-limit / preemption signal (SIGUSR1, SIGUSR2) before the training code has
installed its handler: right after the job starts, while Python imports torch, or while the job
sets up. Their default action kills the task and nobody would requeue the job. This entry point
records them from its first lines on (engine.launch.preemption.record_early), then runs the module or
script as `python -m MODULE` / `python SCRIPT.py` would; training acts on a recorded signal at its
first step boundary. If training does not start within S/2 seconds of the signal (S: the time
SLURM leaves between signal and kill), the task exits with code 128 + signal, and the batch
script requeues the job. On rank 0 it also signals the task itself S seconds before the job's
time limit, in case SLURM's signal came before the tasks existed (then nobody receives it).
engine/launch/slurm.py runs submitit's task module through it (`python -u task_entry.py -u -m
submitit.core._submit FOLDER`); scripts/pretrain.sbatch runs main_pretrain.py through it.
"""
import os
import sys

# Nothing else may run before the recorder is in place (engine.launch.preemption is light: no torch).
from engine.launch.preemption import record_early, watch_time_limit

record_early()


USAGE = "usage: task_entry.py [--help] [--signal_delay_s S] (-m MODULE | SCRIPT.py) [ARGS...]"


def main(argv) -> None:
    import runpy

    if argv[:1] in (["-h"], ["--help"]):  # ours only in first place; after the target they are the target's
        print(__doc__.strip())
        sys.exit(0)
    if argv[:1] == ["--signal_delay_s"]:
        try:
            delay = float(argv[1])
        except (IndexError, ValueError):
            sys.exit(f"error: --signal_delay_s needs a number of seconds; {USAGE}")
        record_early(wait_s=max(delay / 2, 1.0))
        if os.environ.get("SLURM_PROCID") == "0" and os.environ.get("SLURM_JOB_ID"):
            watch_time_limit(os.environ["SLURM_JOB_ID"], delay)
        argv = argv[2:]
    if argv[:1] == ["-u"]:  # submitit puts its own interpreter flag after ours; -u is ours already
        argv = argv[1:]
    # sys.path[0] as `python -m MODULE` / `python SCRIPT.py` would set it.
    if argv[:1] == ["-m"] and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv and not argv[0].startswith("-"):
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    else:
        sys.exit(f"error: nothing to run; {USAGE}")


if __name__ == "__main__":
    main(sys.argv[1:])
