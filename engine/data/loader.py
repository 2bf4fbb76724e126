"""The loaders: one builder for every training loader (pretraining, fine-tuning, linear probing,
the benchmark) and one for evaluation, from an image source, a transform and LoaderSettings.

The epoch loop sees the training loader only as a TrainLoader: iters_per_epoch, global_batch,
set_position(epoch, samples_done) and iteration.
"""
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from util.errors import UserError

from .device import collate
from .keyed import KeyedSamples
from .sampler import ResumableSampler, ShardOrderSampler, ShardSampler, samples_per_process
from .sources import ImageSource


@dataclass(frozen=True)
class LoaderSettings:
    """How a loader feeds this process: its batch, the data seed, the loader workers, pinned
    host memory, the process's place among world_size training processes, and the training
    order: "global" (a permutation of all samples) or "shard" (tar shards: the shard-local order of
    ShardOrderSampler over windows of shuffle_shards shards)."""
    batch_size: int
    seed: int
    num_workers: int = 0
    pin_memory: bool = False
    world_size: int = 1
    rank: int = 0
    order: str = "global"
    shuffle_shards: int = 4


class TrainLoader(DataLoader):
    """The training loader as the epoch loop sees it: iterations per epoch, the global batch, and
    a position (epoch, global samples of it already consumed) to start from. Iterating yields the
    batches from that position to the end of the epoch. Nothing else of the loader (its sampler,
    its dataset) is the loop's business, so another data source needs only these three."""

    @property
    def iters_per_epoch(self) -> int:
        """Optimizer-schedule length of a full epoch, independent of a mid-epoch start."""
        sampler: ResumableSampler = self.sampler
        return (sampler.total_size // sampler.num_replicas) // self.batch_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas

    def set_position(self, epoch: int, samples_done: int = 0) -> None:
        self.sampler.set_epoch(epoch, samples_done)

    def sample_ids(self, epoch: int, first: int, end: int) -> list:
        """The dataset indices at global positions [first, end) of `epoch`'s order."""
        sampler: ResumableSampler = self.sampler
        current, sampler.epoch = sampler.epoch, epoch
        try:
            return sampler.global_order()[first:end]
        finally:
            sampler.epoch = current


def check_batch_fits(source: ImageSource, batch_size: int, world_size: int) -> None:
    """Every process must get at least one full batch (the loader drops the last partial one).
    The CLIs' preflight calls this before any training work; build_loader again."""
    n = len(source)
    per_rank = samples_per_process(n, world_size)
    if per_rank < batch_size:
        raise UserError(f"each of the {world_size} process(es) gets {per_rank} of the {n} images, "
                        f"fewer than --batch_size {batch_size}: lower --batch_size or use more images")


def build_loader(dataset: KeyedSamples, batch_size: int, world_size: int, rank: int, seed: int,
                 num_workers: int, pin_memory: bool, order: str = "global", shuffle_shards: int = 4) -> TrainLoader:
    """The training loader of keyed samples (train_loader builds them from a source)."""
    check_batch_fits(dataset, batch_size, world_size)
    if order == "shard":
        source = dataset.source
        if not hasattr(source, "shard_ranges"):
            raise UserError(f"the shard-local order needs tar shards; {source.root} is not: use the global order")
        source.open_shards = max(source.open_shards, shuffle_shards)  # a window's shards stay open
        sampler = ShardOrderSampler(dataset, source.shard_ranges, shuffle_shards, world_size, rank, seed)
    else:
        sampler = ResumableSampler(dataset, world_size, rank, seed)
    # A private generator: the loader's worker seeds must not consume the global RNG, or a
    # resumed run's global RNG stream would drift from the uninterrupted one.
    g = torch.Generator()
    g.manual_seed(seed)
    # 4 batches ahead per worker (torch's default: 2) rides out slow files and shared-storage
    # hiccups; uint8 batches make that a quarter of the float pipeline's memory.
    return TrainLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                       pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                       prefetch_factor=4 if num_workers > 0 else None, generator=g, collate_fn=collate)


def train_loader(source: ImageSource, transform, pipeline: str, settings: LoaderSettings, noise_len: int = 0,
                 torch_rng_only: bool = False, num_classes: int = 0) -> TrainLoader:
    """The training loader: `source` decoded for `pipeline` ("pil", "uint8", "device_decode"),
    `transform` drawn under each sample's key, plus `noise_len` keyed mask-noise values per sample
    (pretraining). torch_rng_only: the transform draws from torch alone (every recipe but
    fine-tuning's RandAugment and random erasing), so numpy's and python's streams need no keying.
    num_classes: classification's label range, checked per sample (KeyedSamples)."""
    dataset = KeyedSamples(source, transform, settings.seed, noise_len, pipeline, torch_rng_only=torch_rng_only,
                           num_classes=num_classes)
    return build_loader(dataset, settings.batch_size, settings.world_size, settings.rank, settings.seed,
                        settings.num_workers, settings.pin_memory, settings.order, settings.shuffle_shards)


def eval_loader(source: ImageSource, transform, settings: LoaderSettings, shard: bool,
                num_classes: int = 0) -> DataLoader:
    """Every sample once, in order; sharded over the processes with shard (--dist_eval), else
    whole on each. The eval transforms draw nothing, and decode as the official loader does."""
    dataset = KeyedSamples(source, transform, settings.seed, torch_rng_only=True, num_classes=num_classes)
    world, rank = (settings.world_size, settings.rank) if shard else (1, 0)
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), world, rank), batch_size=settings.batch_size,
                      num_workers=settings.num_workers, pin_memory=settings.pin_memory, drop_last=False)
