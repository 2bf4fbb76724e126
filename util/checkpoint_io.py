"""Crash-safe checkpoint files: atomic writes and loads that fail with one clear line."""
import argparse
import os
import pickle
import tempfile
import zipfile
from typing import Optional

import torch

from .errors import UserError

TMP_SUFFIX = ".tmp"


def atomic_save(obj, path: str, previous: Optional[str] = None) -> None:
    """torch.save through a temp file in the same directory, fsync, then os.replace.

    A reader never sees a half-written file under `path`: a crash leaves the previous
    version there, plus at most a stray temp file. With `previous`, the file being replaced
    is kept under that name, so a later-corrupted `path` still has a fallback.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        if previous and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str) -> None:
    """Temp files left by a process killed in the middle of atomic_save."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(TMP_SUFFIX) and ".pth." in name:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


class CheckpointError(UserError):
    pass


def load_checkpoint_file(path: str) -> dict:
    """Load a checkpoint on CPU without executing pickled code.

    Official checkpoints store args as an argparse.Namespace; that one class is allowed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check the path given to --resume/--checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {path} holds pickled objects that are not plain data ({reason}); "
            "re-save its state dicts as plain tensors/dicts") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); "
                              "resume from an earlier checkpoint or delete it") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a dict of state dicts (got {type(ckpt).__name__})")
    return ckpt
