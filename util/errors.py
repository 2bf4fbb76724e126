"""Errors caused by the user's input: printed as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (path, dataset, checkpoint, flag combination). The message names the fix."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint is left intact."""

    exit_code = 1
