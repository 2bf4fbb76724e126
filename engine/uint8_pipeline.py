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
import warnings
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision deprecated its decoders in 0.29 (for torchcodec); PIL still works
    decode_jpeg = None
# Raised on every call since torchvision 0.29; the decoder itself is unchanged and 1.4x PIL's
# decode + convert + copy here, so it stays while it exists.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_JPEG_MAGIC = b"\xff\xd8\xff"


def read_uint8(path: str) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 tensor (RGB; greyscale replicated, as PIL's convert)."""
    with open(path, "rb") as f:
        data = f.read()
    if decode_jpeg is not None and data[:3] == _JPEG_MAGIC:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            direct = header.format == "JPEG" and header.mode in ("RGB", "L")
        if direct:
            # No EXIF rotation, as the official PIL loader. bytearray: decode_jpeg wants a writable buffer.
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # HWC memory, as decode_jpeg returns


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio, bicubic, antialias) + RandomHorizontalFlip(0.5) on a
    (3, H, W) uint8 tensor; returns (3, size, size) uint8."""

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3. / 4., 4. / 3.)):
        self.size, self.scale, self.ratio = (size, size), scale, ratio

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        # The vectorised uint8 kernel needs channels-last; decode_jpeg's output already is (HWC memory).
        crop = img[:, i:i + h, j:j + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = F.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)[0]
        if torch.rand(1) < 0.5:  # torchvision's RandomHorizontalFlip draw, after the crop's
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                "bicubic+antialias on uint8, hflip 0.5)")


_NORM_CACHE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def to_model_input(x: torch.Tensor, device: torch.device,
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Move a batch to the device; a uint8 batch is then normalised there (float32), exactly as
    ToTensor + Normalize would have on the host. Float batches pass through unchanged."""
    x = x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    key = (x.device, tuple(mean), tuple(std))
    if key not in _NORM_CACHE:
        _NORM_CACHE[key] = (torch.tensor(mean, device=x.device).view(-1, 1, 1),
                            torch.tensor(std, device=x.device).view(-1, 1, 1))
    m, s = _NORM_CACHE[key]
    return x.float().div_(255).sub_(m).div_(s)
