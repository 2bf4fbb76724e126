"""Sample-keyed randomness: every random draw made for a sample (crop, flip, RandAugment, random
erasing, the MAE mask noise) is a pure function of (seed, epoch, sample index)."""
import contextlib
import random
import sys
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from util import test_hooks
from util.errors import SampleError, UserError

from .decode import DECODERS
from .sources import ImageSource


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # int() first: numpy 1.x has no uint64 >> int
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]) >> 1


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


class KeyedSamples(Dataset):
    """An image source as keyed samples: dataset[(epoch, index)] -> (image, target[, mask noise]).

    `pipeline` "pil" decodes images as the official loader does, "uint8" as (3, H, W) uint8
    tensors, "device_decode" leaves JPEGs encoded (engine.data.decode); the transform must take
    what it decodes. An unreadable image is reported once (which and why) and replaced by the next
    readable sample, so one bad file never ends a long run and the replacement is reproducible.
    A bad label is not a bad image: a label outside [0, num_classes) (num_classes > 0) or one the
    source reports as a UserError ends the run with one line naming the sample, before the model
    sees it (torch's index error would come mid-step, as a traceback).
    """

    def __init__(self, source: ImageSource, transform, seed: int, num_patches: int = 0, pipeline: str = "pil",
                 torch_rng_only: bool = False, num_classes: int = 0):
        self.source, self.transform, self.seed, self.num_patches = source, transform, seed, num_patches
        self.num_classes = num_classes
        self.torch_rng_only = torch_rng_only  # the transform draws from torch only (see keyed_rng)
        self.decode = DECODERS.get(pipeline, DECODERS["pil"])
        self._reported = set()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int):
        n = len(self.source)
        for k in range(n):
            i = (index + k) % n
            try:
                raw, target = self.source[i]
                self._check_label(i, target)
                return self.decode(raw, self.source.name(i)), target
            except UserError:
                raise
            except Exception as e:  # PIL raises many types for corrupt or truncated files
                name = self.source.name(i)
                if name not in self._reported:
                    self._reported.add(name)
                    print(f"warning: unreadable image {name} ({type(e).__name__}: {e}); "
                          f"using {self.source.name((i + 1) % n)} in its place", file=sys.stderr, flush=True)
        raise UserError(f"none of the {n} images under {self.source.root} can be read")

    def _check_label(self, i: int, target: int) -> None:
        if self.num_classes and not 0 <= target < self.num_classes:
            fix = f"pass --nb_classes {target + 1} or more, or fix the label" if target >= self.num_classes \
                else "fix the label (labels are class indices, never negative)"
            raise SampleError(f"sample {self.source.name(i)} has label {target}, outside 0..{self.num_classes - 1} "
                              f"(--nb_classes {self.num_classes}): {fix}")

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        img, target = self._load(index)
        with keyed_rng(sample_seed(self.seed, epoch, index), self.torch_rng_only):
            img = self.transform(img)
            out = (img, target, torch.rand(self.num_patches)) if self.num_patches else (img, target)
        return test_hooks.sample(key, out) if test_hooks.ACTIVE else out
