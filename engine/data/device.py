"""The batch on its way to the model: collated in the loader workers, pinned, then moved to the
training device, where a uint8 batch is normalised and a device_decode batch is first decoded
(nvjpeg on CUDA, batched), cropped and flipped."""
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate

from .decode import EncodedImage, ImageReadMode, decode_jpeg
from .uint8 import resize_crop


class EncodedBatch:
    """A collated batch of EncodedImage: decoded, cropped and flipped on the training device by
    to_model_input."""

    def __init__(self, items: List[EncodedImage], size: Tuple[int, int]):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> "EncodedBatch":  # called by the DataLoader's pinning thread
        for it in self.items:
            if it.pixels is not None:
                it.pixels = it.pixels.pin_memory()
        return self

    def decode(self, device: torch.device) -> torch.Tensor:
        """(N, 3, S, S) uint8 on `device`."""
        out = torch.empty((len(self.items), 3, *self.size), dtype=torch.uint8, device=device)
        jpegs = [k for k, it in enumerate(self.items) if it.data is not None]
        decoded = {}
        if jpegs:
            try:
                decoded = dict(zip(jpegs, decode_jpeg([self.items[k].data for k in jpegs], mode=ImageReadMode.RGB,
                                                      device=device)))
            except RuntimeError:  # a file whose header parses but whose data does not: find it
                decoded = {k: img for k in jpegs if (img := self._decode_one(k, device)) is not None}
        for k, img in decoded.items():
            it = self.items[k]
            crop = resize_crop(img, it.box, self.size)
            out[k] = crop.flip(-1) if it.flip else crop
        for k, it in enumerate(self.items):
            if it.pixels is not None:
                out[k] = it.pixels.to(device, non_blocking=True)
        good = [k for k, it in enumerate(self.items) if k in decoded or it.pixels is not None]
        for k in set(range(len(self.items))) - set(good):
            if not good:
                raise RuntimeError(f"no image of the batch could be decoded (first: {self.items[0].path})")
            out[k] = out[good[k % len(good)]]  # as the loader replaces unreadable files: by another sample
        return out

    def _decode_one(self, k: int, device: torch.device) -> Optional[torch.Tensor]:
        try:
            return decode_jpeg(self.items[k].data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            print(f"warning: unreadable image {self.items[k].path} ({e}); another image of its batch takes "
                  "its place", file=sys.stderr, flush=True)
            return None


def collate(batch):
    """default_collate, except that EncodedImage samples become one EncodedBatch."""
    if isinstance(batch[0], (tuple, list)) and isinstance(batch[0][0], EncodedImage):
        rest = default_collate([sample[1:] for sample in batch])
        return (EncodedBatch([sample[0] for sample in batch], batch[0][0].out_size), *rest)
    return default_collate(batch)


_NORM_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(x: torch.Tensor, device: torch.device,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Move a batch to the device; a uint8 batch is then normalised there (float32), exactly as
    ToTensor + Normalize would have on the host. Float batches pass through unchanged."""
    x = x.decode(device) if isinstance(x, EncodedBatch) else x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    key = (x.device, tuple(mean), tuple(std))
    if key not in _NORM_CACHE:
        _NORM_CACHE[key] = (torch.tensor(mean, device=x.device).view(-1, 1, 1),
                            torch.tensor(std, device=x.device).view(-1, 1, 1))
    m, s = _NORM_CACHE[key]
    return x.float().div_(255).sub_(m).div_(s)
