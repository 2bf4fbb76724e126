"""Walk a folder tree through its directory links, each real folder once.

os.walk(followlinks=True) and glob's recursive `**` walk a link back into the tree (`self -> .`,
`up -> ..`, a mount of an ancestor) again and again: paths grow until the OS refuses them, and
two such links branch, so the walk never ends in practice. Tracking the real path of every folder
read cuts each loop at its first repetition.
"""
import os
from typing import Iterator, List, Optional, Sequence, Tuple


def walk_once(top: str, skipped: Optional[List[str]] = None,
              hidden: bool = True) -> Iterator[Tuple[str, List[str], List[str]]]:
    """os.walk(top, followlinks=True) that enters every real folder once, in sorted order; each
    directory link not entered (its folder was read already, or it loops) is appended to `skipped`
    as 'link -> target'. hidden=False leaves out dot-names, as glob does."""
    seen = {os.path.realpath(top)}
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs.sort()
        keep = []
        for d in dirs:
            if not hidden and d.startswith("."):
                continue
            path = os.path.join(root, d)
            real = os.path.realpath(path)
            if real in seen:
                if skipped is not None and os.path.islink(path):
                    skipped.append(f"{path} -> {os.readlink(path)}")
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        yield root, dirs, sorted(f for f in files if hidden or not f.startswith("."))


def find_files(top: str, suffixes: Sequence[str], skipped: Optional[List[str]] = None) -> List[str]:
    """The files under `top` whose names end with one of `suffixes` (case-insensitive), sorted, each
    folder read once (walk_once), dot-names left out as glob's `**` leaves them."""
    ends = tuple(s.lower() for s in suffixes)
    return sorted(os.path.join(root, f) for root, _, files in walk_once(top, skipped, hidden=False) for f in files
                  if f.lower().endswith(ends))
