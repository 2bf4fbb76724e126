"""The fast training data path: JPEG -> uint8 tensor -> random resized crop + flip on uint8 in
the loader workers; conversion to float and normalisation on the training device.

It produces the official pipeline's samples (PIL decode, RandomResizedCrop bicubic, flip,
ToTensor, Normalize) faster and with a quarter of the bytes per image between processes and
over PCIe:
- the crop box and the flip are drawn by the same torchvision calls in the same order, so under
  the same keyed seed (engine.data.KeyedSamples) they are the same box and flip;
- libjpeg-turbo decodes in both pipelines (torchvision.io.decode_jpeg here, PIL there);
- the resize is torch's antialiased bicubic on channels-last uint8, which implements PIL's
  filter (a = -0.5, support scaled with the reduction) and stays within a grey level or two
  of it; it is about 8x faster than PIL's resize, which dominates the official pipeline's time;
- `to_model_input` does ToTensor's /255 and Normalize's (x - mean) / std with the same
  arithmetic on the device, so identical uint8 images give bit-identical inputs.
Anything that is not a plain RGB or greyscale JPEG (PNG, CMYK JPEG, ...) is decoded by PIL
exactly as the official loader does, then takes the same uint8 path.
"""
import io
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision deprecated its decoders in 0.29 (for torchcodec); PIL still works
    decode_jpeg = None
# Raised on every call since torchvision 0.29; the decoder itself is unchanged and 1.4x PIL's
# decode + convert + copy here, so it stays while it exists.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_JPEG_MAGIC = b"\xff\xd8\xff"


def _plain_jpeg(data: bytes) -> Optional[Tuple[int, int]]:
    """(H, W) of an RGB or greyscale JPEG that decode_jpeg decodes as PIL would, else None
    (PNG, CMYK JPEG, ...: PIL's conversion is the reference for those)."""
    if decode_jpeg is None or data[:3] != _JPEG_MAGIC:
        return None
    with Image.open(io.BytesIO(data)) as header:  # reads the header only
        if header.format == "JPEG" and header.mode in ("RGB", "L"):
            return header.size[1], header.size[0]
    return None


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # decode_jpeg wants a writable buffer


def _pil_uint8(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # HWC memory, as decode_jpeg returns


def read_uint8(path: str) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 tensor (RGB; greyscale replicated, as PIL's convert)."""
    with open(path, "rb") as f:
        data = f.read()
    if _plain_jpeg(data):
        # No EXIF rotation, as the official PIL loader.
        return decode_jpeg(_encoded(data), mode=ImageReadMode.RGB)
    return _pil_uint8(data)


@dataclass
class EncodedImage:
    """A sample of the device_decode pipeline: a JPEG still encoded, with the crop box and flip
    already drawn (so the draws stay keyed per sample in the workers); or, for files that are not
    plain JPEGs, the finished uint8 crop."""
    data: Optional[torch.Tensor] = None      # encoded JPEG bytes
    size: Tuple[int, int] = (0, 0)           # (H, W) of the decoded image
    box: Tuple[int, int, int, int] = (0, 0, 0, 0)  # i, j, h, w
    flip: bool = False
    pixels: Optional[torch.Tensor] = None    # (3, S, S) uint8 for the PIL route
    out_size: Tuple[int, int] = (0, 0)       # (S, S), the crop's output size
    path: str = ""


def read_encoded(path: str):
    """device_decode reading: an EncodedImage for a plain JPEG (header parsed, not decoded), else
    the decoded (3, H, W) uint8 tensor of read_uint8."""
    with open(path, "rb") as f:
        data = f.read()
    size = _plain_jpeg(data)
    if size:
        return EncodedImage(data=_encoded(data), size=size, path=path)
    return _pil_uint8(data)


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio, bicubic, antialias) + RandomHorizontalFlip(0.5) on a
    (3, H, W) uint8 tensor; returns (3, size, size) uint8."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3. / 4., 4. / 3.), deferred: bool = False):
        """deferred (the device_decode pipeline): every sample becomes an EncodedImage."""
        self.size, self.scale, self.ratio, self.deferred = (size, size), scale, ratio, deferred

    def __call__(self, img):
        if isinstance(img, EncodedImage):  # device_decode: draw now, decode and crop on the device
            img.box = tuple(T.RandomResizedCrop.get_params(torch.empty((3, *img.size), device="meta"),
                                                          self.scale, self.ratio))
            img.flip = bool(torch.rand(1) < 0.5)
            img.out_size = self.size
            return img
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        out = resize_crop(img, (i, j, h, w), self.size)
        if torch.rand(1) < 0.5:  # torchvision's RandomHorizontalFlip draw, after the crop's
            out = out.flip(-1)
        if isinstance(img, torch.Tensor) and self.deferred:
            return EncodedImage(pixels=out, out_size=self.size)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                "bicubic+antialias on uint8, hflip 0.5)")


def resize_crop(img: torch.Tensor, box: Tuple[int, int, int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of img[:, i:i+h, j:j+w] to `size`, uint8 in and out. On the CPU
    the vectorised uint8 kernel (which needs channels-last; decode_jpeg's output already is);
    elsewhere in float, rounded back to uint8."""
    i, j, h, w = box
    crop = img[:, i:i + h, j:j + w].unsqueeze(0)
    if crop.device.type == "cpu":
        crop = crop.contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    out = F.interpolate(crop.float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


class EncodedBatch:
    """A collated batch of EncodedImage: decoded (nvjpeg on CUDA, batched), cropped and flipped
    on the training device by to_model_input."""

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
