"""Raw images (a source's encoded bytes, or a decoded PIL image) into what each pipeline's
transform takes, in the loader workers:

- "pil": an RGB PIL image, as the official loader reads it (PIL decode, convert("RGB"));
- "uint8": a (3, H, W) uint8 tensor of the same pixels: libjpeg-turbo decodes in both
  (torchvision.io.decode_jpeg here, PIL there);
- "device_decode": a plain JPEG stays encoded (EncodedImage, its header parsed), to be decoded on
  the training device (engine.data.device).
Anything that is not a plain RGB or greyscale JPEG (PNG, CMYK JPEG, ...) is decoded by PIL exactly
as the official loader does, then takes the uint8 path.
"""
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .sources import RawImage

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # torchvision deprecated its decoders in 0.29 (for torchcodec); PIL still works
    ImageReadMode, decode_jpeg = None, None
# Raised on every call since torchvision 0.29; the decoder itself is unchanged and 1.4x PIL's
# decode + convert + copy here, so it stays while it exists.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_JPEG_MAGIC = b"\xff\xd8\xff"


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


def decode_pil(raw: RawImage, name: str = "") -> Image.Image:
    """The official loader's image (PIL, converted to RGB), fully decoded so errors surface here."""
    if isinstance(raw, Image.Image):
        return raw.convert("RGB")
    with Image.open(io.BytesIO(raw)) as img:
        return img.convert("RGB")


def _pil_uint8(raw: RawImage) -> torch.Tensor:
    rgb = np.asarray(decode_pil(raw))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # HWC memory, as decode_jpeg returns


def decode_uint8(raw: RawImage, name: str = "") -> torch.Tensor:
    """A (3, H, W) uint8 tensor (RGB; greyscale replicated, as PIL's convert)."""
    if isinstance(raw, bytes) and _plain_jpeg(raw):
        # No EXIF rotation, as the official PIL loader.
        return decode_jpeg(_encoded(raw), mode=ImageReadMode.RGB)
    return _pil_uint8(raw)


def decode_deferred(raw: RawImage, name: str = "") -> Union[EncodedImage, torch.Tensor]:
    """device_decode: an EncodedImage for a plain JPEG (header parsed, not decoded; `name` for
    the device's warning if its data is corrupt), else the decoded uint8 tensor of decode_uint8."""
    size = _plain_jpeg(raw) if isinstance(raw, bytes) else None
    if size:
        return EncodedImage(data=_encoded(raw), size=size, path=name)
    return _pil_uint8(raw)


DECODERS: Dict[str, Callable] = {"pil": decode_pil, "uint8": decode_uint8, "device_decode": decode_deferred}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pil_image(path: str) -> Image.Image:
    """An image file as the official loader reads it."""
    return decode_pil(_read(path))


def read_uint8(path: str) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 tensor (decode_uint8)."""
    return decode_uint8(_read(path))
