"""WebDataset tar shards as an indexed image source: ShardSource[i] -> (encoded image, label).

The tar files are read by webdataset's indexed reader `wids` (its IndexedTarSamples and its tar
index: the member offsets, kept in `<shard>.tar.index` when scripts/make_shards.py wrote one, else
built by scanning the shard's headers once per open). A shard set is described by wids's shard
index (`shardindex.json`: each shard's file, sample count and size); make_shards writes it, and
without one the shards are counted here once (the glue wids does not give: it needs the counts
up front to map a global index to a shard).

Not wids.ShardListDataset itself: it writes a lock file next to every shard it opens (which fails
on the read-only storage datasets usually live on), prints a line per process and worker, and
hides the file object, which the read-pattern figures need. Its two parts used here (the tar index
and the LRU of open shards) are the ones that matter.
"""
import bisect
import glob
import json
import os
import re
import sys
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

from util import dist as dist_util
from util.errors import SampleError, UserError

SHARD_INDEX = "shardindex.json"
CLASSES_FILE = "classes.txt"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
LABEL_EXTS = (".cls",)
VAL_NAMES = ("val", "validation")


class ReadStats:
    """What the file layer saw in this process: shards opened, bytes read, reads that did not
    start where the previous read of that file ended (seeks)."""

    def __init__(self):
        self.opens = self.reads = self.bytes = self.seeks = 0

    def as_dict(self) -> Dict[str, int]:
        return {"opens": self.opens, "reads": self.reads, "bytes": self.bytes, "seeks": self.seeks}


class CountingFile:
    """A binary file whose reads and seeks are counted in `stats` (what the reader asks of the
    file system; the page cache may serve some of it)."""

    def __init__(self, path: str, stats: ReadStats):
        self._f, self._stats, self.name = open(path, "rb"), stats, path
        self._end = 0  # where the previous read ended
        stats.opens += 1

    def read(self, size: int = -1) -> bytes:
        pos = self._f.tell()
        if pos != self._end:
            self._stats.seeks += 1
        data = self._f.read(size)
        self._stats.reads += 1
        self._stats.bytes += len(data)
        self._end = pos + len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._f.fileno()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()


def _wids():
    try:
        import wids
        from wids.wids_lru import LRUCache
    except ImportError:
        raise UserError("reading WebDataset shards needs wids: pip install 'wids>=0.1.11' "
                        "(see requirements.txt)") from None
    return wids, LRUCache


def _split_token(name: str, split: str) -> bool:
    return re.search(rf"(^|[-_.]){re.escape(split)}([-_.]|$)", name) is not None


def expand_pattern(pattern: str) -> List[str]:
    """A brace pattern (`in22k-train-{000000..004095}.tar`, webdataset's syntax) or a glob."""
    from braceexpand import braceexpand  # webdataset's and wids's own dependency

    out = []
    for p in braceexpand(pattern):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return out


def is_shard_pattern(data_path: str) -> bool:
    return ("{" in data_path and "}" in data_path) or data_path.endswith(".tar") or (
        not os.path.exists(data_path) and any(c in data_path for c in "*?["))


def has_shards(data_path: str) -> bool:
    """A folder of .tar files, or one with split subfolders of them."""
    if not os.path.isdir(data_path):
        return False
    if glob.glob(os.path.join(data_path, "*.tar")):
        return True
    return any(glob.glob(os.path.join(data_path, s, "*.tar")) for s in ("train", *VAL_NAMES))


def split_shards(data_path: str, split: str) -> Tuple[List[str], str]:
    """(shard files of `split`, where they were looked for). Folders: <data_path>/<split>/*.tar,
    else the split-named files <data_path>/*<split>*.tar (train-000000.tar, in1k-val-0001.tar), else,
    for train, every .tar of the folder. A pattern holds one split; for val the pattern's 'train'
    is replaced by val/validation, or else the val shards are looked for as a folder's, in the
    pattern's folder's parent (/data/train/train-{...}.tar: /data/val/*.tar), then in its folder."""
    names = VAL_NAMES if split in VAL_NAMES else (split,)
    if is_shard_pattern(data_path):
        if split == "train" or _split_token(os.path.basename(data_path), split):
            return expand_pattern(data_path), data_path
        head, base = os.path.split(data_path)
        if "train" in base:
            # the file names' 'train', then also the folders' (/data/train/train-{...}.tar -> /data/val/val-{...}.tar)
            others = [os.path.join(head, base.replace("train", n)) for n in names] + \
                [data_path.replace("train", n) for n in names]
            for other in others:
                files = expand_pattern(other)
                if files and all(os.path.exists(f) for f in files):
                    return files, other
            # the val shards usually have a range of their own: look beside the pattern's folder
            for folder in (os.path.dirname(head), head):
                if folder and os.path.isdir(folder) and not is_shard_pattern(folder):
                    files, where = split_shards(folder, split)
                    if files:
                        return files, where
            return expand_pattern(others[0]), others[0]
        raise UserError(f"--data_path {data_path} is one shard pattern; the '{split}' split needs its own: "
                        f"give a folder with train/ and val/ shard folders (or pattern names with 'train')")
    for n in names:
        files = sorted(glob.glob(os.path.join(data_path, n, "*.tar")))
        if files:
            return files, os.path.join(data_path, n)
    top = sorted(glob.glob(os.path.join(data_path, "*.tar")))
    for n in names:
        files = [f for f in top if _split_token(os.path.basename(f), n)]
        if files:
            return files, os.path.join(data_path, f"*{n}*.tar")
    if split == "train" and top and not any(_split_token(os.path.basename(f), n) for f in top for n in VAL_NAMES):
        return top, data_path
    return [], os.path.join(data_path, names[0])


def _read_index(folder: str) -> Dict[str, dict]:
    """{real path of a shard: its wids shard-index entry} from <folder>/shardindex.json."""
    path = os.path.join(folder, SHARD_INDEX)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            spec = json.load(f)
        entries = spec["shardlist"]
        return {os.path.realpath(os.path.join(folder, e["url"])): e for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a wids shard index ({e}): rebuild it with scripts/make_shards.py "
                        "or delete it (the shards are then counted at start-up)") from None


def _tar_index_file(shard: str) -> Optional[str]:
    return shard + ".index" if os.path.exists(shard + ".index") else None


def _open_shard(path: str, stats: ReadStats):
    """wids's IndexedTarSamples on a counted file, with the shard's saved tar index if any.

    Its stream reader (not the mmap one, whose reads no file object sees), built quietly
    (IndexedTarSamples would print a line per shard opened) and opening the file as plain tar."""
    _wids()
    from wids.wids import IndexedTarSamples, group_by_key
    from wids.wids_tar import TarFileReader

    class PlainTarReader(TarFileReader):
        def __init__(self, file, index_file):  # TarFileReader.__init__, opening the file as plain tar
            self.verbose, self.index_file = False, index_file
            # mode "r:" not wids's "r" ("r:*"): that tries gzip, bz2 and xz first, reading ~16 KB per open
            self.tar_file = tarfile.open(fileobj=file, mode="r:")
            self._create_tar_index()

    class QuietIndexedTar(IndexedTarSamples):
        def __init__(self):  # IndexedTarSamples.__init__ less its verbose reader
            self.path, self.stream = path, CountingFile(path, stats)
            try:
                self.reader = PlainTarReader(self.stream, _tar_index_file(path))
            except BaseException:
                self.stream.close()
                raise
            self.samples = group_by_key(self.reader.names())

    return QuietIndexedTar()


def _check_complete(path: str, reader) -> None:
    """A truncated shard: a member that ends past the end of the file."""
    size = os.path.getsize(path)
    if len(reader.reader.index):
        offset, length = reader.reader.index[-1]
        if offset + length > size:
            raise UserError(f"shard {path} is truncated ({size} bytes, its last member ends at {offset + length}): "
                            "copy it again or rebuild it with scripts/make_shards.py")


def parse_label(raw: bytes, name: str) -> int:
    """A .cls member as a class index; text ("cat") is a UserError, not an unreadable image: the
    image is fine, the label needs mapping."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise SampleError(f"sample {name} has the label {text[:40]!r}, not a class index: classification reads "
                        "integer labels 0..N-1 in the .cls members; map the class names to indices (in the order "
                        f"of a {CLASSES_FILE} beside the shards, which names them) and write the shards again") from None


def _classes_file(folders: Sequence[str]) -> Optional[List[str]]:
    for folder in folders:
        path = os.path.join(folder, CLASSES_FILE)
        if os.path.exists(path):
            with open(path) as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    return None


class ShardSource:
    """The samples of a list of tar shards, in shard order then member order: source[i] is
    (the bytes of the sample's jpg/jpeg/png/webp member, int of its cls member; 0 without labels).

    Open shards stay in an LRU of `open_shards` readers per process (set it to the shuffle window
    of ShardOrderSampler so that a shard is opened once per epoch). `shard_ranges` gives each
    shard's [start, end) global indices, the sampler's unit of locality.
    """

    def __init__(self, root: str, shards: List[str], counts: List[int], classes: List[str],
                 labelled: bool = True, open_shards: int = 4, label_range: Optional[Tuple[int, int]] = None):
        self.root, self.shards, self.counts, self.classes = root, shards, counts, classes
        self.labelled = labelled
        self.label_range = label_range  # (lowest, highest) from the shard index; checked before training
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self.open_shards = open_shards
        self.stats = ReadStats()
        self._lru = None

    @property
    def shard_ranges(self) -> List[Tuple[int, int]]:
        return list(zip(self.starts[:-1], self.starts[1:]))

    def __getstate__(self):  # open files stay in the process that opened them (loader workers open their own)
        state = dict(self.__dict__)
        state["_lru"] = None
        state["stats"] = ReadStats()
        return state

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> Tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def _reader(self, shard: int):
        if self._lru is None:
            _, LRUCache = _wids()
            self._lru = LRUCache(self.open_shards, release_handler=lambda _, r: r.close())
        reader = self._lru[shard]
        if reader is None:
            reader = self._lru[shard] = _open_shard(self.shards[shard], self.stats)
        return reader

    def sample(self, index: int) -> dict:
        """The sample's members ({".jpg": BytesIO, ..., "__key__": key}), as wids reads them."""
        shard, inner = self.locate(index)
        return self._reader(shard)[inner]

    def __getitem__(self, index: int) -> Tuple[bytes, int]:
        sample = self.sample(index)
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None:
            members = ", ".join(sorted(k.lstrip(".") for k in sample if not k.startswith("__")))
            raise ValueError(f"no image member ({'/'.join(e[1:] for e in IMAGE_EXTS)}) among {members or 'none'}")
        label = 0
        if self.labelled:
            cls = next((sample[e] for e in LABEL_EXTS if e in sample), None)
            if cls is None:
                raise ValueError("no cls member (the label)")
            label = parse_label(cls.getvalue(), self.name(index))
        return image.getvalue(), label

    def name(self, index: int) -> str:
        shard, inner = self.locate(index)
        return f"{self.shards[shard]}#{inner}"

    def close(self) -> None:
        if self._lru is not None:
            self._lru.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, {len(self.shards)} shards, {len(self)} samples)"


def shard_source(data_path: str, split: str, need_labels: bool, num_classes: int = 1) -> ShardSource:
    """The `split` shards of --data_path with one-line errors for what makes them unusable: none
    found, a shard of the pattern missing, a truncated shard, no label member for classification,
    no sample at all. Class names come from a classes.txt beside the shards (or one folder up),
    else they are numbered 0 .. num_classes - 1."""
    shards, where = split_shards(data_path, split)
    if not shards:
        raise UserError(f"no '{split}' shards under {where}: put {split}/*.tar (or {split}-*.tar files) in "
                        f"{data_path}, e.g. with scripts/make_shards.py")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(shards)} shards of {where} are missing, first {missing[0]}: "
                        "copy them or fix the pattern's range")
    folders = sorted({os.path.dirname(os.path.abspath(s)) for s in shards})
    index: Dict[str, dict] = {}
    for folder in folders:
        index.update(_read_index(folder))
    counts, unindexed, ranges = [], [], []
    for s in shards:
        entry = index.get(os.path.realpath(s))
        if entry is None:
            unindexed.append(s)
            counts.append(None)
            continue
        size = os.path.getsize(s)
        if entry.get("filesize") not in (None, size):
            raise UserError(f"shard {s} is truncated or changed ({size} bytes, {SHARD_INDEX} says "
                            f"{entry['filesize']}): copy it again or rebuild the shards with scripts/make_shards.py")
        counts.append(int(entry["nsamples"]))
        ranges.append(entry.get("label_range"))
    if unindexed and dist_util.is_main_process():
        print(f"warning: {len(unindexed)} shard(s) of {where} are not in a {SHARD_INDEX} (first {unindexed[0]}): "
              "counting their samples now; scripts/make_shards.py --index writes the index once",
              file=sys.stderr, flush=True)
    stats = ReadStats()
    first_checked = False
    for k, s in enumerate(shards):
        if counts[k] is not None and first_checked:
            continue
        try:
            reader = _open_shard(s, stats)
        except Exception as e:  # tarfile raises ReadError, EOFError, ... for a damaged file
            raise UserError(f"shard {s} cannot be read as a tar file ({type(e).__name__}: {e}): copy it again or "
                            "rebuild it with scripts/make_shards.py") from None
        try:
            _check_complete(s, reader)
            if counts[k] is None:
                counts[k] = len(reader)
            if not first_checked and len(reader):
                first_checked = True
                sample = reader[0]
                cls = next((sample[e] for e in LABEL_EXTS if e in sample), None)
                if need_labels and cls is None:
                    members = ", ".join(sorted(m.lstrip(".") for m in sample if not m.startswith("__")))
                    raise UserError(f"shard {s} has no label member (.cls) in its samples (members: {members}): "
                                    "classification needs one per sample (scripts/make_shards.py writes it)")
                if need_labels:
                    parse_label(cls.getvalue(), f"{s}#0")
        finally:
            reader.close()
    if sum(counts) == 0:
        raise UserError(f"the '{split}' shards under {where} hold no samples: rebuild them with "
                        "scripts/make_shards.py")
    classes = _classes_file([*folders, *{os.path.dirname(f) for f in folders}])
    if classes is None:
        # Numbered; reading every label to count them would read the whole split.
        classes = [str(c) for c in range(num_classes if need_labels else 1)]
    known = need_labels and not unindexed and all(isinstance(r, list) and len(r) == 2 for r in ranges)
    label_range = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if known else None
    return ShardSource(where, shards, counts, classes, labelled=need_labels, label_range=label_range)

