"""The names and plain records every kind of checkpoint shares. A leaf: stdlib and util/ only, so
that the backends, the reader and the checks can all import it without a circle."""
import argparse
import errno
import os
import re
from dataclasses import dataclass
from typing import List

FORMAT_VERSION = 1

# Single files, written by rank 0 (DDP and single-process runs).
FILE_LAST, FILE_PREV, FILE_BEST = "checkpoint-last.pth", "checkpoint-prev.pth", "checkpoint-best.pth"
# Directories, written by every rank (--dist_strategy fsdp: torch.distributed.checkpoint).
DIR_LAST, DIR_PREV, DIR_BEST = "checkpoint-last", "checkpoint-prev", "checkpoint-best"
UNREADABLE_SUFFIX = ".unreadable"  # a checkpoint that failed to load is renamed to <name>.unreadable
COMPLETE, META = "COMPLETE", "meta.pth"  # inside a directory: written last / its plain entries
PARTIAL, TRASH = ".partial", ".trash"  # a directory being written / being deleted

_NUMBERED = re.compile(r"checkpoint-(\d+)(\.pth)?$")


@dataclass
class Position:
    """Where training continues: the epoch, and the global samples of it already consumed."""
    epoch: int = 0
    samples_in_epoch: int = 0


def plain_args(args) -> dict:
    """argparse values as plain data, so no pickled Namespace is needed to read them back."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def recorded_args(ckpt: dict) -> dict:
    """The flags a checkpoint's run was started with: a dict here, an argparse.Namespace in
    official checkpoints, nothing in bare state dicts."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def numbered_name(epoch: int, sharded: bool = False) -> str:
    return f"checkpoint-{epoch}" if sharded else f"checkpoint-{epoch}.pth"


def numbered_checkpoints(output_dir: str, sharded: bool = False) -> List[str]:
    """checkpoint-<epoch>.pth files (sharded: checkpoint-<epoch>/ directories), newest epoch first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NUMBERED.match(name)
        if m is None or bool(m.group(2)) == sharded:
            continue
        if sharded and not os.path.isdir(os.path.join(output_dir, name)):
            continue
        found.append((int(m.group(1)), name))
    return [os.path.join(output_dir, n) for _, n in sorted(found, reverse=True)]


def is_sharded(path: str) -> bool:
    """A sharded checkpoint directory (or what is left of one: any of its files). Other folders
    (transformers and timm weights: engine/checkpoint/foreign.py) are not."""
    if not os.path.isdir(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return True  # unreadable: the reader names the problem
    return any(n in (COMPLETE, META, ".metadata") or n.endswith(".distcp") for n in names)


def write_advice(cause: OSError, output_dir: str) -> str:
    """What to do about a failed write, by its cause."""
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the disk of {output_dir} (or give another --output_dir)"
    if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {output_dir} writable (or give another --output_dir)"
    return f"check {output_dir} (or give another --output_dir)"
