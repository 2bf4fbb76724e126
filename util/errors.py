"""Errors caused by the user's input: printed as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (path, dataset, checkpoint, flag combination). The message names the fix."""

    exit_code = 2

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back as type(e)("Caught ... Original Traceback ...\n<type>: <message>"):
        # keep the one line the user needs, not the worker's stack.
        if isinstance(message, str) and "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class TrainingStopped(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint is left intact."""

    exit_code = 1


class RankError(UserError):
    """A problem of this process alone (it cannot join the others): every rank that meets it says so,
    since rank 0 may never hear of it."""


class SampleError(RankError):
    """A bad sample met during training (a label out of range or not an integer): only the process
    whose share of the data holds it knows, and that may be any rank."""
