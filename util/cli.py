"""Run a CLI entry point: expected failures become one line on stderr and an exit code."""
import os
import sys

from .errors import TrainingStopped, UserError


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def run_cli(main, args) -> int:
    try:
        main(args)
    except (UserError, TrainingStopped) as e:
        # All ranks hit the same input problem; one copy of the message is enough.
        if _rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if _rank() == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
