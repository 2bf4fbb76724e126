"""Where the images come from: an image source maps an index to (encoded image, label).

The rest of the data path (keyed randomness, decoding, transforms, samplers, loaders) sees a
source only through ImageSource. The sources: an ImageNet-layout folder (FolderSource, built by
image_folder) with torchvision's classes, indices and sample order; WebDataset tar shards
(shards.py); a Hugging Face dataset on disk (hfds.py). open_source picks one for --data_path.
"""
import os
import sys
from typing import Dict, List, Optional, Protocol, Set, Tuple, Union

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from util import dist as dist_util
from util.errors import UserError

from . import hfds, shards

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "sample")

# Encoded bytes (a file's contents: JPEG, PNG, ...) or an image a source already decoded.
RawImage = Union[bytes, Image.Image]


class ImageSource(Protocol):
    """What the training and evaluation data read.

    source[i] -> (raw image, label) for 0 <= i < len(source), the same answer on every call and in
    every process (the sample keys and exact resume rely on it); raising for an unreadable sample
    is fine (the sample is then replaced, see KeyedSamples). name(i) says which sample i is in
    messages (a file path); root says where the source is (a folder, a URL pattern); classes
    names the labels 0, 1, ...
    """
    root: str
    classes: List[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Tuple[RawImage, int]: ...

    def name(self, index: int) -> str: ...


class FolderSource:
    """Image files listed as (path, label) pairs; source[i] reads file i's bytes.

    Carries torchvision ImageFolder's listing attributes (classes, class_to_idx, samples, targets,
    imgs), so code and tests that read an ImageFolder read this the same way.
    """

    def __init__(self, root: str, classes: List[str], samples: List[Tuple[str, int]]):
        self.root, self.classes, self.samples = root, classes, samples

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]

    @property
    def imgs(self) -> List[Tuple[str, int]]:
        return self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[bytes, int]:
        path, target = self.samples[index]
        with open(path, "rb") as f:
            return f.read(), target

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


class _Folder(ImageFolder):
    """torchvision's ImageFolder listing (same classes, indices and sample order) that follows each
    directory link at most once.

    torchvision walks with os.walk(followlinks=True): a link to the tree itself or to an ancestor
    (`loop -> .`, `up -> ..`) is walked again and again until the path is too long, multiplying the
    samples, or for ever when two such links branch. Here the real folders are read first, then
    the directory links; a link whose target was already read (a real folder wins over a link to it)
    or contains the link is skipped and recorded in `skipped_links`. Links to files and to
    directories elsewhere still count, once. Empty class folders are kept, as
    ImageFolder(allow_empty=True) does; image_folder decides what they mean.
    """

    def __init__(self, root: str):
        self.skipped_links: List[str] = []
        self._read: Set[str] = set()  # real paths of the directories already read (or claimed)
        super().__init__(root, allow_empty=True)

    def _follow(self, path: str) -> bool:
        """Whether to read the directory `path` (a link, or a folder reached through one)."""
        real, inside = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
        if real in self._read or os.path.commonpath([real, inside]) == real:
            self.skipped_links.append(f"{path} -> {os.readlink(path)}" if os.path.islink(path)
                                      else f"{path} (read already)")
            return False
        self._read.add(real)
        return True

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes, _ = super().find_classes(directory)
        paths = {c: os.path.join(directory, c) for c in classes}
        self._read = {os.path.realpath(directory)} | {os.path.realpath(p) for p in paths.values()
                                                      if not os.path.islink(p)}
        kept = [c for c in classes if not os.path.islink(paths[c]) or self._follow(paths[c])]
        if not kept:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return kept, {c: i for i, c in enumerate(kept)}

    def make_dataset(self, directory: str, class_to_idx: Dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        if is_valid_file is None:
            def is_valid_file(p: str) -> bool:
                return has_file_allowed_extension(p, extensions)
        directory = os.path.expanduser(directory)
        walked: Dict[str, List[Tuple[str, List[str]]]] = {}
        links: List[Tuple[str, str]] = []
        for c in sorted(class_to_idx):
            top = os.path.join(directory, c)
            walked[c] = []
            for root, dirs, fnames in os.walk(top):  # real folders only: os.walk lists links but stays out
                dirs.sort()  # which of two links to one folder is followed must not depend on the file system
                self._read.add(os.path.realpath(root))
                links += [(c, os.path.join(root, d)) for d in dirs if os.path.islink(os.path.join(root, d))]
                walked[c].append((root, fnames))
        for c, link in links:
            if not self._follow(link):
                continue
            for root, dirs, fnames in os.walk(link, followlinks=True):
                dirs[:] = [d for d in sorted(dirs) if self._follow(os.path.join(root, d))]
                walked[c].append((root, fnames))
        samples = []
        for c in sorted(class_to_idx):  # torchvision's order: sorted walk, then sorted names
            for root, fnames in sorted(walked[c], key=lambda w: w[0]):
                samples += [(p, class_to_idx[c]) for p in (os.path.join(root, f) for f in sorted(fnames))
                            if is_valid_file(p)]
        return samples


def image_folder(data_path: str, split: str, allow_empty_classes: bool = True) -> FolderSource:
    """The images of <data_path>/<split>/<class>/, as torchvision's ImageFolder lists them, with
    one-line errors for the usual mistakes, and each directory link followed at most once (the
    skipped ones are named in one warning line).

    allow_empty_classes: pretraining ignores classes, so empty class folders are dropped (named in
    a warning line; `classes` and the indices then cover the others). Classification passes False:
    an empty class folder is then an error naming it.
    """
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} does not exist: point it at a dataset folder "
                        f"that contains {split}/<class>/<image files> (ImageNet layout)")
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise UserError(f"--data_path {data_path} has no '{split}' folder: expected "
                        f"{root}/<class>/<image files> (ImageNet layout)")
    try:
        folder = _Folder(root)
    except FileNotFoundError:
        raise UserError(f"no class folders in {root}: put images in {root}/<class>/ "
                        "(for pretraining any single folder name works)") from None
    main = dist_util.is_main_process()
    if folder.skipped_links and main:
        print(f"warning: not following {len(folder.skipped_links)} directory link(s) under {root} that lead back "
              f"into the tree or to a folder already read: {', '.join(folder.skipped_links)}",
              file=sys.stderr, flush=True)
    extensions = " ".join(IMG_EXTENSIONS)
    counts = np.bincount(np.asarray(folder.targets, dtype=np.int64), minlength=len(folder.classes))
    empty = [c for c, n in zip(folder.classes, counts) if n == 0]
    if len(empty) == len(folder.classes):
        raise UserError(f"no images found under {root}: its class folder(s) {', '.join(empty)} hold no image "
                        f"files; supported extensions are {extensions}")
    if empty and not allow_empty_classes:
        raise UserError(f"empty class folder(s) {', '.join(os.path.join(root, c) for c in empty)}: every class "
                        f"needs images ({extensions}); add some or remove the folder(s)")
    if not empty:
        return FolderSource(folder.root, folder.classes, folder.samples)
    if main:
        print(f"warning: skipping {len(empty)} empty class folder(s) under {root}: {', '.join(empty)}",
              file=sys.stderr, flush=True)
    kept = [c for c, n in zip(folder.classes, counts) if n > 0]
    new_index = {folder.class_to_idx[c]: i for i, c in enumerate(kept)}
    return FolderSource(folder.root, kept, [(p, new_index[t]) for p, t in folder.samples])


DATA_FORMATS = ("auto", "folder", "wds", "hf")


def detect_format(data_path: str) -> str:
    """What --data_path holds: "wds" (a brace pattern or glob of .tar files, or a folder of .tar
    shards, split subfolders allowed), "hf" (a save_to_disk folder, or parquet files), else "folder"
    (an ImageNet-layout folder; also what a path that does not exist is reported as)."""
    if shards.is_shard_pattern(data_path) or shards.has_shards(data_path):
        return "wds"
    if os.path.isdir(data_path) and (hfds.is_saved_dataset(data_path) or hfds.has_parquet(data_path)):
        return "hf"
    return "folder"


def open_source(data_path: str, split: str, *, data_format: str = "auto", need_labels: bool = False,
                allow_empty_classes: bool = True, image_column: Optional[str] = None,
                label_column: Optional[str] = None, num_classes: int = 1) -> ImageSource:
    """The `split` ("train", "val") of --data_path as an image source: an ImageFolder root, tar
    shards (engine.data.shards) or a Hugging Face dataset on disk (engine.data.hfds), detected
    (data_format "auto") or forced. Those modules import wids / datasets only when used, so folders
    need neither library. need_labels: classification (the label column / cls member must exist);
    num_classes numbers the classes of a source that does not name them."""
    fmt = detect_format(data_path) if data_format == "auto" else data_format
    if fmt == "wds":
        return shards.shard_source(data_path, split, need_labels, num_classes)
    if fmt == "hf":
        return hfds.hf_source(data_path, split, need_labels, image_column, label_column, num_classes)
    return image_folder(data_path, split, allow_empty_classes)


def train_order(source: ImageSource, data_order: str = "auto") -> str:
    """The training order: "shard" (shard-local) by default for tar shards, "global" for the rest;
    "global" is also available for shards (it reads them at random)."""
    is_shards = hasattr(source, "shard_ranges")
    if data_order == "shard" and not is_shards:
        raise UserError(f"--data_order shard needs tar shards; {source.root} is not: drop the flag "
                        "(or use --data_order global)")
    if data_order == "auto":
        return "shard" if is_shards else "global"
    return data_order


def source_from_args(args, split: str, classification: bool = False) -> ImageSource:
    """open_source with the CLIs' flags (--data_path, --data_format, --image_column, --label_column;
    --nb_classes for classification)."""
    return open_source(args.data_path, split, data_format=args.data_format or "auto",
                       need_labels=classification, allow_empty_classes=not classification,
                       image_column=args.image_column, label_column=args.label_column,
                       num_classes=args.nb_classes if classification else 1)
