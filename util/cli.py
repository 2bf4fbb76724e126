"""Run a CLI entry point: expected failures become one line on stderr and an exit code."""
import sys

from .config_file import parse_args
from .dist import launcher_rank as _rank
from .errors import RankError, TrainingStopped, UserError


def run_cli(main, args) -> int:
    try:
        main(args)
    except (UserError, TrainingStopped) as e:
        # All ranks hit the same input problem; one copy of the message is enough.
        if _rank() == 0 or isinstance(e, RankError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if _rank() == 0:
            print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def run_training_cli(main, parser, argv=None) -> int:
    """run_cli for the training CLIs: their flags, with `--config FILE` filling those the command
    line leaves out (util/config_file.py); a bad file is one line too."""
    return run_cli(lambda _: main(parse_args(parser, argv)), None)
