"""Reconstructions of a masked-image model (models/base.py MaskedImageModel: MAE, MixMIM) as
pictures: the shared logic of scripts/visualize.py and the training hook.

    batch = fixed_batch(["a.jpg", "photos/"], input_size=224, n=4)      # normalised (N, 3, H, W)
    noise = fixed_noise(len(batch), model.mask_noise_len, seed=0)
    results = reconstruct(model, batch, mask_ratio=0.75, noise=noise)  # images in [0, 1]
    render_grid(results, ["a", "b", "c", "d"], "reconstructions.png")

reconstruct() returns four (N, 3, H, W) images in [0, 1] (ImageNet mean/std undone, clamped):
  original        the input
  masked          the input with every removed patch set to MASK_GREY (a model that mixes images,
                  MixMIM: the mixed input the encoder saw, whose masked cells hold the batch
                  mirror's pixels)
  reconstruction  the unpatchified prediction for all patches. A model trained with
                  norm_pix_loss predicts each patch in units of that patch's own mean and std;
                  the prediction is mapped back with the TARGET patch's statistics, exactly as the
                  loss normalises the target (models/patches.py denorm_pix_target): pred *
                  sqrt(var + 1e-6) + mean (unbiased variance, over the patch's p*p*3 values of
                  the normalised input). Only the removed patches are trained; visible ones
                  are shown as predicted.
  pasted          the reconstruction on removed patches, the input pixels on visible ones
and `mask` (N, L), 1 for a removed patch (the model's own convention).

Grid layout (render_grid), all sizes in pixels, white background, black text:

    +----------------------------------------------------------------+
    | HEADER_H: figure title                                         |
    | ROW_TITLE_H: row label (line 1), four panel titles (line 2)    |  } one row per image
    | M | panel | M | panel | M | panel | M | panel | M              |  } and mask ratio,
    | M (gap below the row)                                          |  } panel height P_h
    +----------------------------------------------------------------+

    panel = image scaled by an integer factor `scale` (nearest neighbour, so every panel pixel
            is an image pixel); default scale = max(1, ceil(MIN_PANEL_PX / image width))
    width  = MARGIN + 4 * (P_w + MARGIN)
    height = HEADER_H + rows * (ROW_TITLE_H + P_h + MARGIN)
    panel (row r, column c) top-left = (MARGIN + c * (P_w + MARGIN),
                                         HEADER_H + r * (ROW_TITLE_H + P_h + MARGIN) + ROW_TITLE_H)
    columns: original, masked (NN%), reconstruction, reconstruction + visible
    rows: image-major, then mask ratio (image 0 at each ratio, image 1 at each ratio, ...)

Pixels are converted to 8 bits as round(255 * x); removed patches in the masked panel are
exactly MASK_GREY_U8 in all three channels.
"""
import io
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFont
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets.folder import IMG_EXTENSIONS

from models.patches import denorm_pix_target
from models.state_dict import has_decoder  # noqa: F401  (part of this module's interface)
from util.errors import UserError
from util.walk import walk_once

# ---------------------------------------------------------------- layout constants (pixels)
MARGIN = 8
HEADER_H = 24
ROW_TITLE_H = 32
MIN_PANEL_PX = 160          # panels are upscaled by an integer factor to at least this width
FONT_SIZE = 12
MASK_GREY = 0.5             # value of removed patches in the masked panel, in [0, 1]
MASK_GREY_U8 = 128          # the same in the PNG: round(255 * 0.5), half to even
NORM_PIX_NOTE = "(norm_pix: de-normalised with target patch stats)"
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
PANELS = ("original", "masked", "reconstruction", "pasted")

_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


# ---------------------------------------------------------------- images in
def image_transform(input_size: int) -> T.Compose:
    """Deterministic evaluation transform: shorter side to input_size, center crop, normalise."""
    return T.Compose([
        T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def find_images(inputs: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Files as given; folders searched recursively for image files, in sorted order.

    Raises UserError for a path that does not exist or a folder without images.
    """
    found = []
    for item in inputs:
        path = os.fspath(item)
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            images = []
            for root, _, files in walk_once(path):
                images += [os.path.join(root, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
            if not images:
                raise UserError(f"no images found in folder {path}: supported extensions are "
                                f"{' '.join(IMG_EXTENSIONS)}")
            found += images
        else:
            raise UserError(f"image path {path} does not exist: give image files or folders of images")
    return found


def _unreadable(path: str, e: Exception) -> UserError:
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return UserError(f"cannot read image {path} ({type(e).__name__}: {reason})")


def check_images(paths: Sequence[str]) -> None:
    """Read every file's header, so that a non-image fails at once, before any model work."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except Exception as e:  # PIL raises many types for unreadable or non-image files
            raise _unreadable(path, e) from None


def load_image(path: str, input_size: int, data: Optional[bytes] = None) -> torch.Tensor:
    """One image (the file `path`, or its encoded `data` when given: a sample of a shard or dataset
    source, `path` naming it) as a normalised (3, input_size, input_size) tensor; grayscale/RGBA
    become RGB."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img = img.convert("RGB")
    except Exception as e:  # PIL raises many types for unreadable, truncated or non-image files
        raise _unreadable(path, e) from None
    return image_transform(input_size)(img)


def _source_images(source):
    """(name, encoded bytes or None) of an image source's samples, in its order; a sample the
    source cannot give is an unreadable image."""
    for i in range(len(source)):
        try:
            yield source.name(i), source[i][0]
        except Exception:  # the source's reader failed: reported as unreadable by load_image
            yield source.name(i), b""


def fixed_batch(source, input_size: int, n: Optional[int] = None, skip_unreadable: bool = False) -> torch.Tensor:
    """The first n images of `source`, always the same ones, as a normalised (n, 3, S, S) batch.

    source: an image folder (searched recursively, sorted), an image file, a list of files and
    folders, or a torchvision ImageFolder (its own sample order: the first images of the dataset).
    Fewer than n images available: all of them. An unreadable image raises UserError, or with
    skip_unreadable=True is skipped with a warning on stderr (the next image takes its place).
    """
    if hasattr(source, "samples"):
        paths = [p for p, _ in source.samples]
    elif hasattr(source, "name") and hasattr(source, "__getitem__"):  # shards, a Hugging Face dataset
        paths = _source_images(source)
    elif isinstance(source, (str, os.PathLike)):
        paths = find_images([source])
    else:
        paths = find_images(list(source))
    batch = []
    for path in paths:
        if n is not None and len(batch) == n:
            break
        path, data = path if isinstance(path, tuple) else (path, None)
        try:
            batch.append(load_image(path, input_size, data))
        except UserError as e:
            if not skip_unreadable:
                raise
            print(f"warning: {e}; skipped for the reconstruction pictures", file=sys.stderr, flush=True)
    if not batch:
        raise UserError(f"no readable images to visualise in {source}")
    return torch.stack(batch)


def fixed_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Mask noise (n, L) from a torch.Generator seeded with `seed`: the same masks every call."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.rand(n, num_patches, generator=g)


# ---------------------------------------------------------------- reconstruction
def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (N, 3, H, W) -> [0, 1]."""
    return (x * _STD.to(x.device) + _MEAN.to(x.device)).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Run the model on a normalised batch and return the four panels on CPU (see module doc).

    Also returned: 'mask' (N, L; 1 removed), 'loss' (scalar), 'mask_ratio' and 'norm_pix'
    (whether the prediction was de-normalised). The model runs in eval mode, in fp32, on its
    own device; its train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    x = imgs.to(device=device, dtype=torch.float32)
    if noise is not None:
        noise = noise.to(device)
    was_training = model.training
    model.eval()
    try:
        loss, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    finally:
        model.train(was_training)
    pred = pred.float()
    norm_pix = bool(model.norm_pix_loss)
    if norm_pix:
        pred = denorm_pix_target(pred, model.patchify(x))
    grid = model.grid_of(x)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), grid).bool()

    original = denormalize(x)
    reconstruction = denormalize(model.unpatchify(pred, grid))
    if model.mixes_images:  # the masked cells hold another image's pixels, not grey
        masked = denormalize(model.mix(x, mask))
    else:
        masked = torch.where(removed, torch.full_like(original, MASK_GREY), original)
    out = {
        "original": original,
        "masked": masked,
        "reconstruction": reconstruction,
        "pasted": torch.where(removed, reconstruction, original),
    }
    out = {k: v.cpu() for k, v in out.items()}
    out.update(mask=mask.cpu(), loss=loss.detach().float().cpu(), mask_ratio=float(mask_ratio),
               norm_pix=norm_pix)
    return out


def take(results: Dict[str, object], index) -> Dict[str, object]:
    """The results of some images of the batch (index: int, slice or index list)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in results.items()}


def cat_results(parts: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Concatenate results of consecutive batches at the same mask ratio."""
    first = parts[0]
    return {k: (torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
            for k, v in first.items()}


# ---------------------------------------------------------------- images out
def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (N, 3, H, W) in [0, 1] -> uint8 HWC / NHWC, round(255 * x)."""
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.movedim(-3, -1).numpy()


def panel_scale(width: int) -> int:
    return max(1, math.ceil(MIN_PANEL_PX / width))


@dataclass(frozen=True)
class GridLayout:
    rows: int
    panel_h: int
    panel_w: int

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the whole picture."""
        return (MARGIN + len(COLUMNS) * (self.panel_w + MARGIN),
                HEADER_H + self.rows * (ROW_TITLE_H + self.panel_h + MARGIN))

    def panel_origin(self, row: int, col: int) -> Tuple[int, int]:
        """(x, y) of the top-left pixel of a panel."""
        return (MARGIN + col * (self.panel_w + MARGIN),
                HEADER_H + row * (ROW_TITLE_H + self.panel_h + MARGIN) + ROW_TITLE_H)

    def panel_box(self, row: int, col: int) -> Tuple[int, int, int, int]:
        """(left, top, right, bottom) for PIL's Image.crop."""
        x, y = self.panel_origin(row, col)
        return (x, y, x + self.panel_w, y + self.panel_h)


def grid_layout(rows: int, image_hw: Tuple[int, int], scale: Optional[int] = None) -> GridLayout:
    h, w = image_hw
    s = scale or panel_scale(w)
    return GridLayout(rows, h * s, w * s)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """text, shortened with '...' so that it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def ratio_label(mask_ratio: float) -> str:
    pct = 100 * mask_ratio
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-6 else f"{pct:.1f}%"


def render_grid(results, titles: Optional[Sequence[str]] = None, path: Optional[str] = None, *,
                title: str = "MAE reconstructions", scale: Optional[int] = None) -> Image.Image:
    """Draw reconstructions as one picture (layout in the module doc) and write it to `path`.

    results: reconstruct()'s dict, or a list of them (one per mask ratio, same images).
    titles: one label per image (e.g. its file name), shown above its rows.
    Returns the PIL image (RGB).
    """
    runs = [results] if isinstance(results, dict) else list(results)
    n, _, h, w = runs[0]["original"].shape
    if any(r["original"].shape[0] != n for r in runs):
        raise ValueError("every mask ratio needs results for the same images")
    titles = list(titles) if titles is not None else [f"image {i}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    layout = grid_layout(n * len(runs), (h, w), scale)
    s = layout.panel_w // w

    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if any(r.get("norm_pix") for r in runs):
        title = f"{title} {NORM_PIX_NOTE}"
    draw.text((MARGIN, 5), _fit(draw, title, font, layout.size[0] - 2 * MARGIN), fill="black", font=font)

    panels = [{k: to_uint8(r[k]) for k in PANELS} for r in runs]
    row = 0
    for i in range(n):
        for run, arrays in zip(runs, panels):
            x0, y0 = layout.panel_origin(row, 0)
            label = titles[i] if len(runs) == 1 else f"{titles[i]}, mask ratio {ratio_label(run['mask_ratio'])}"
            draw.text((x0, y0 - ROW_TITLE_H + 1), _fit(draw, label, font, layout.size[0] - 2 * MARGIN),
                      fill="black", font=font)
            for col, (key, name) in enumerate(zip(PANELS, COLUMNS)):
                if key == "masked":
                    name = f"masked ({ratio_label(run['mask_ratio'])})"
                x, y = layout.panel_origin(row, col)
                draw.text((x, y - ROW_TITLE_H // 2), _fit(draw, name, font, layout.panel_w), fill="black", font=font)
                img = Image.fromarray(arrays[key][i])
                if s > 1:
                    img = img.resize((layout.panel_w, layout.panel_h), Image.Resampling.NEAREST)
                canvas.paste(img, (x, y))
            row += 1
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        canvas.save(path, format="PNG")
    return canvas


# ---------------------------------------------------------------- training hook
def log_reconstructions(model, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float, epoch: int,
                        output_dir: Optional[str], log_writer=None) -> Optional[str]:
    """Reconstruct a fixed batch with fixed noise and record it for this epoch.

    Writes <output_dir>/reconstructions/epoch_XXXX.png (when output_dir is set) and adds the
    picture to tensorboard as 'reconstructions' (CHW uint8) when log_writer is given. Pass the
    plain model (not the DDP / torch.compile wrapper) and call it on rank 0 only: it runs one
    forward pass of the module itself, with no collective communication. Returns the path.
    """
    results = reconstruct(model, imgs, mask_ratio, noise)
    path = os.path.join(output_dir, "reconstructions", f"epoch_{epoch:04d}.png") if output_dir else None
    picture = render_grid(results, [f"image {i}" for i in range(len(imgs))], path,
                          title=f"epoch {epoch}, mask ratio {ratio_label(mask_ratio)}")
    if log_writer is not None:
        log_writer.add_image("reconstructions", np.asarray(picture).transpose(2, 0, 1), epoch)
    return path
