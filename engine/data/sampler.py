"""Which sample keys each process reads, and from where: the training permutation (resumable
mid-epoch, independent of the world size) and the evaluation shards."""
import math
from typing import Iterator, Tuple

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

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding]
        mine = indices[self.start_sample:][self.rank::self.num_replicas][:len(self)]
        return iter([(self.epoch, i) for i in mine])


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
