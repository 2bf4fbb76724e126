"""Crash-safe checkpoint files: atomic writes and loads that fail with one clear line."""
import argparse
import errno
import os
import pickle
import tempfile
import zipfile
from typing import Callable, Optional

import torch

from .errors import UserError

TMP_SUFFIX = ".tmp"


def atomic_save(obj, path: str, previous: Optional[str] = None) -> None:
    """torch.save through a temp file in the same directory, fsync, then os.replace.

    A reader never sees a half-written file under `path`: a crash leaves the previous
    version there, plus at most a stray temp file. With `previous`, the file being replaced
    is kept under that name, so a later-corrupted `path` still has a fallback.
    """
    _atomic_write(path, lambda f: torch.save(obj, f), previous)


def atomic_write_text(path: str, text: str) -> None:
    """A text file (the run's config.yaml) written as atomic_save writes checkpoints."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_write(path: str, write: Callable, previous: Optional[str] = None) -> None:
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        if previous and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = os_error_in(e)
        if cause is None:
            raise
        # torch.save reports a failed write as a RuntimeError of its zip writer, raised while
        # closing, on top of the OSError (e.g. ENOSPC) that caused it: report the cause once.
        raise WriteError(path, cause) from None
    fsync_dir(directory)


class WriteError(UserError):
    """A file could not be written (full disk, read-only or vanished folder); `path` is untouched."""

    def __init__(self, path: str, cause: OSError, message: Optional[str] = None):
        self.path, self.cause = path, cause
        super().__init__(message or f"cannot write {path}: {os_error_text(cause)}")


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError that caused `e` (e itself, or one in its chain of causes), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def os_error_text(e: OSError) -> str:
    """'No space left on device [errno 28 ENOSPC]' rather than a repr with the file name again."""
    if e.errno is None:
        return str(e)
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{e.strerror or os.strerror(e.errno)} [errno {e.errno} {name}]"


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


# What to do about an unusable checkpoint, by the flag that named it (None: found in --output_dir).
_ADVICE = {
    None: "resume from an earlier checkpoint or delete it",
    "--resume": "give another checkpoint to --resume (an earlier checkpoint-<epoch>.pth of the run, or "
                "checkpoint-prev.pth)",
    "--finetune": "copy or download the pretraining checkpoint again, or give another --finetune",
    "--checkpoint": "copy the checkpoint again or give another --checkpoint",
}


def _advice(flag: Optional[str]) -> str:
    # the scripts name their own arguments (convert_checkpoint's positional 'source')
    return _ADVICE.get(flag, f"copy the checkpoint again or give another {flag}")


def _named(path: str, flag: Optional[str]) -> str:
    return f"{flag} {path}" if flag else f"checkpoint {path}"


def not_a_checkpoint(path: str) -> Optional[str]:
    """What `path` is when its first bytes show it cannot be a torch checkpoint ('an empty file',
    'a text file', ...); None when it may be one (a zip archive, or the legacy pickle format)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None  # torch.save's zip archive / the pre-1.6 pickle format
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array, not a torch checkpoint"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file, not a torch checkpoint (load it with safetensors.torch.load_file and " \
               "torch.save the state dict)"
    if all(b >= 0x20 or b in b"\t\n\r\f" for b in head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        quote = f" starting {first[0][:40]!r}" if first else ""
        return f"a text file{quote}, not a torch checkpoint (torch.save writes zip archives)"
    return "not a torch checkpoint: neither the zip archive torch.save writes nor its older pickle format"


def check_checkpoint_file(path: str, flag: Optional[str] = None) -> None:
    """Cheap checks without loading: the file exists and looks like a torch checkpoint."""
    if not os.path.exists(path):
        hint = "give the path of a checkpoint file" if flag else "check the path"
        raise CheckpointError(f"{_named(path, flag)} does not exist: {hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{_named(path, flag)} is a folder, not a checkpoint file: give a .pth file "
                              "inside it")
    try:
        what = not_a_checkpoint(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {_named(path, flag)}: {os_error_text(e)}") from None
    if what:
        fix = f"give {flag} the path of a checkpoint file" if flag else "delete or move it"
        raise CheckpointError(f"{_named(path, flag)} is not a checkpoint file: it is {what}; {fix}")


def load_checkpoint_file(path: str, flag: Optional[str] = None) -> dict:
    """Load a checkpoint on CPU without executing pickled code. `flag` names the option that gave
    the path (--resume, --finetune, ...), for the error messages.

    Official checkpoints store args as an argparse.Namespace; that one class is allowed.
    """
    check_checkpoint_file(path, flag)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{_named(path, flag)} holds pickled objects that are not plain data ({reason}); "
            "re-save its state dicts as plain tensors/dicts") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{_named(path, flag)} is truncated or corrupt ({reason}); {_advice(flag)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{_named(path, flag)} is not a dict of state dicts (got {type(ckpt).__name__})")
    return ckpt
