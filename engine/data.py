"""Training data: ImageFolder, the official augmentation, and sample-keyed randomness.

Every random draw made for a sample (crop, flip, and the MAE mask noise) is a pure function of
(seed, epoch, sample index). The data a step sees therefore does not depend on the number of
processes, loader workers, or where a run was resumed: a 2-process run sees the same samples
as a 1-process run with twice the batch, and a resumed run continues with the very batches the
uninterrupted run would have seen.
"""
import contextlib
import logging
import math
import os
import random
import sys
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
import torch
import torchvision.transforms as T
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from util import dist as dist_util
from util.errors import UserError

from . import augment
from .augment import check_auto_augment
from .uint8_pipeline import RandomResizedCropFlip, collate, read_encoded, read_uint8

log = logging.getLogger("mae")

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def pretrain_transform(input_size: int, pipeline: str = "pil"):
    """The official MAE pretraining augmentation, on PIL images, or (pipelines "uint8" and
    "device_decode") on uint8 tensors with the normalisation left to the device
    (engine.uint8_pipeline)."""
    if pipeline in ("uint8", "device_decode"):
        return RandomResizedCropFlip(input_size, scale=(0.2, 1.0), deferred=pipeline == "device_decode")
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def finetune_transform(args, is_train: bool):
    """The official fine-tuning augmentation (timm RandAugment, random erasing) and eval crop.
    `--aa none` (or "") turns auto-augment off; engine.augment keeps timm's ops working on
    current Pillow."""
    if is_train:
        augment.use_pillow_compatible_ops()
        return create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                                auto_augment=check_auto_augment(args.aa), interpolation="bicubic",
                                re_prob=args.reprob,
                                re_mode=args.remode, re_count=args.recount,
                                re_num_splits=2 if args.resplit else 0, mean=IMAGENET_DEFAULT_MEAN,
                                std=IMAGENET_DEFAULT_STD)
    return eval_transform(args.input_size)


def linprobe_transform(input_size: int, is_train: bool, pipeline: str = "pil"):
    """The official linear-probing augmentation: random resized crop and flip only."""
    if is_train and pipeline in ("uint8", "device_decode"):
        return RandomResizedCropFlip(input_size, deferred=pipeline == "device_decode")
    if is_train:
        return T.Compose([T.RandomResizedCrop(input_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return eval_transform(input_size)


def eval_transform(input_size: int):
    """Resize to input_size / 0.875 (up to 224; no margin above), then center crop."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return T.Compose([T.Resize(int(input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(input_size), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


class _Folder(ImageFolder):
    """torchvision's ImageFolder (same classes, indices and sample order) that follows each directory
    link at most once.

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


def image_folder(data_path: str, split: str, allow_empty_classes: bool = True) -> ImageFolder:
    """ImageFolder(<data_path>/<split>) with one-line errors for the usual mistakes, and each
    directory link followed at most once (the skipped ones are named in one warning line).

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
    if empty:
        if main:
            print(f"warning: skipping {len(empty)} empty class folder(s) under {root}: {', '.join(empty)}",
                  file=sys.stderr, flush=True)
        kept = [c for c, n in zip(folder.classes, counts) if n > 0]
        new_index = {folder.class_to_idx[c]: i for i, c in enumerate(kept)}
        folder.classes, folder.class_to_idx = kept, {c: i for i, c in enumerate(kept)}
        folder.samples = folder.imgs = [(p, new_index[t]) for p, t in folder.samples]
        folder.targets = [t for _, t in folder.samples]
    return folder


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1  # numpy 1.x: no uint64 >> int


def pil_image(path: str):
    """The official loader (PIL, converted to RGB), fully decoded so errors surface here."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class KeyedSamples(Dataset):
    """Wraps an ImageFolder; dataset[(epoch, index)] -> (image, target[, mask noise]).

    `pipeline` "pil" reads images as the official loader does, "uint8" as (3, H, W) uint8 tensors,
    "device_decode" as still-encoded JPEGs (engine.uint8_pipeline); the transform must take what
    it reads. An unreadable image is reported once (file and reason) and replaced by the next
    readable sample, so one bad file never ends a long run and the replacement is reproducible.
    """

    def __init__(self, folder: ImageFolder, transform, seed: int, num_patches: int = 0, pipeline: str = "pil",
                 torch_rng_only: bool = False):
        self.folder, self.transform, self.seed, self.num_patches = folder, transform, seed, num_patches
        self.torch_rng_only = torch_rng_only  # the transform draws from torch only (see keyed_rng)
        self.read = {"uint8": read_uint8, "device_decode": read_encoded}.get(pipeline, pil_image)
        self._reported = set()

    def __len__(self) -> int:
        return len(self.folder)

    def _load(self, index: int):
        n = len(self.folder.samples)
        for k in range(n):
            path, target = self.folder.samples[(index + k) % n]
            try:
                return self.read(path), target
            except Exception as e:  # PIL raises many types for corrupt or truncated files
                if path not in self._reported:
                    self._reported.add(path)
                    nxt = self.folder.samples[(index + k + 1) % n][0]
                    print(f"warning: unreadable image {path} ({type(e).__name__}: {e}); "
                          f"using {nxt} in its place", file=sys.stderr, flush=True)
        raise UserError(f"none of the {n} images under {self.folder.root} can be read")

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        img, target = self._load(index)
        with keyed_rng(sample_seed(self.seed, epoch, index), self.torch_rng_only):
            img = self.transform(img)
            if self.num_patches:
                return img, target, torch.rand(self.num_patches)
        return img, target


@contextlib.contextmanager
def keyed_rng(seed: int, torch_only: bool = False):
    """Seed torch's CPU generator (and numpy's and python's unless torch_only) for one sample,
    then restore the process's streams.

    torchvision draws from torch, timm's RandAugment and random erasing from python's random and
    numpy: all three must be keyed for fine-tuning, torch alone for the other transforms (which
    saves ~0.1 ms per sample of numpy state copies). None may disturb the training process's own
    RNG when num_workers=0. Only the CPU generator is seeded: torch.manual_seed would also queue
    seeds for every accelerator backend, at ~0.1 ms per call.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if torch_only:
            yield
            return
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same permutation and padding) that yields (epoch, index) keys and can
    start part-way through an epoch.

    After k global steps of a global batch G the consumed samples are exactly the first k*G of
    the padded permutation, whatever the world size; start_sample skips those.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_sample = 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_sample = start_sample

    def __len__(self) -> int:
        return (self.total_size - self.start_sample) // self.num_replicas

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding]
        mine = indices[self.start_sample:][self.rank::self.num_replicas][:len(self)]
        return iter([(self.epoch, i) for i in mine])


def build_loader(dataset: KeyedSamples, batch_size: int, world_size: int, rank: int, seed: int,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    if len(sampler) < batch_size:
        raise UserError(f"each of the {world_size} process(es) gets {len(sampler)} of the {len(dataset)} images, "
                        f"fewer than --batch_size {batch_size}: lower --batch_size or use more images")
    # A private generator: the loader's worker seeds must not consume the global RNG, or a
    # resumed run's global RNG stream would drift from the uninterrupted one.
    g = torch.Generator()
    g.manual_seed(seed)
    # 4 batches ahead per worker (torch's default: 2) rides out slow files and shared-storage
    # hiccups; uint8 batches make that a quarter of the float pipeline's memory.
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, generator=g, collate_fn=collate)


def iters_per_epoch(loader: DataLoader) -> int:
    """Optimizer-schedule length of a full epoch, independent of a mid-epoch start."""
    sampler: ResumableSampler = loader.sampler
    return (sampler.total_size // sampler.num_replicas) // loader.batch_size



class ShardSampler(Sampler):
    """Evaluation shards without padding: rank r takes samples r, r + W, ...

    DistributedSampler pads with repeated samples so every rank has the same count; an exact
    evaluation must count each sample once, so shards may differ by one and the metrics are
    summed, not averaged, across ranks.
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter([(0, i) for i in self.indices])


def build_eval_loader(dataset: KeyedSamples, batch_size: int, shard: bool, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    """Every sample once; sharded over the processes with --dist_eval, else whole on each."""
    world, rank = (dist_util.get_world_size(), dist_util.get_rank()) if shard else (1, 0)
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), world, rank), batch_size=batch_size,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=False)
