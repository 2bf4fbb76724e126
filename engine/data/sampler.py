"""Which sample keys each process reads, and from where: the training order (resumable
mid-epoch, independent of the world size: a global permutation, or for tar shards a shard-local
order) and the evaluation shards."""
import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch.utils.data import DistributedSampler, Sampler


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

    def global_order(self) -> List[int]:
        """The epoch's samples in the order the global batches take them, padded to a multiple of
        the world size: global batch k of G samples is global_order()[kG:(k+1)G]."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        padding = self.total_size - len(indices)
        return indices + (indices * math.ceil(padding / len(indices)))[:padding]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        mine = self.global_order()[self.start_sample:][self.rank::self.num_replicas][:len(self)]
        return iter([(self.epoch, i) for i in mine])


class ShardOrderSampler(ResumableSampler):
    """The shard-local training order of tar shards: per epoch, from (seed, epoch) alone, the shard
    order is shuffled, then the samples of each window of `window` consecutive shards (in that
    order) are shuffled among themselves. It is one global order, independent of the world size,
    split across the processes as ResumableSampler's (global batch k = samples [kG, (k+1)G)), so
    positions, exact resume and resuming on another world size work the same.

    A process therefore reads one window at a time: `window` shards open (the source's LRU holds
    that many), each read through once and never reopened in the epoch (but for the padding, which
    repeats the last samples, from the last window, as DistributedSampler repeats the first).
    """

    def __init__(self, dataset, shard_ranges: Sequence[Tuple[int, int]], window: int, num_replicas: int,
                 rank: int, seed: int):
        super().__init__(dataset, num_replicas, rank, seed)
        self.shard_ranges, self.window = list(shard_ranges), max(1, window)

    def global_order(self) -> List[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        shards = torch.randperm(len(self.shard_ranges), generator=g).tolist()
        order: List[int] = []
        for w in range(0, len(shards), self.window):
            members = torch.cat([torch.arange(*self.shard_ranges[s]) for s in shards[w:w + self.window]])
            order += members[torch.randperm(len(members), generator=g)].tolist()
        padding = self.total_size - len(order)
        tail = order[::-1] * math.ceil(padding / len(order))
        return order + tail[:padding][::-1]


def samples_per_process(n: int, world_size: int) -> int:
    """A full epoch's samples per process: ResumableSampler pads the permutation to a multiple of
    the world size, as DistributedSampler does."""
    return math.ceil(n / world_size)


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
