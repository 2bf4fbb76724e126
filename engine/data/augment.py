"""timm's auto-augment policies on current Pillow, and the --aa check.

Current Pillow (13 here) refuses ImageOps.posterize with 0 bits ("bits must be between or equal to 1
and 8"). timm still asks for 0 bits: PosterizeIncreasing at magnitude 10 (about 2% of the draws of
the official rand-m9-mstd0.5-inc1, whose magnitudes are clipped at 10), Posterize at magnitude 0,
and fewer than 0 bits with an `mmax` above 10. Older Pillow masked every value with
~(2**(8 - bits) - 1), i.e. 0 bits gave a black image, which is what the official recipe was trained
with. Only timm's op table is changed (its posterize entries), not its RandAugment: the policies,
their magnitudes and their random draws stay timm's.
"""
from typing import Optional

import timm.data.auto_augment as timm_aa
from PIL import Image, ImageOps
from timm.data import create_transform

from util.errors import UserError

_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")

VALID_FORMS = ("rand-m9-mstd0.5-inc1 (the official RandAugment), another rand-..., augmix-..., v0, v0r, "
               "original, originalr, 3a (timm's syntax), or none")


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize with old Pillow's answer for 0 (or fewer) bits: a black image of the same
    mode and size, for the modes old Pillow posterized (L, RGB). Other modes keep Pillow's error,
    as old Pillow raised one for them too."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def use_pillow_compatible_ops() -> None:
    """Point timm's posterize ops at `posterize`. timm binds NAME_TO_OP[name] when an AugmentOp is
    built, so this must run before the transform is made; loader workers (fork or spawn) get the
    ops with the transform, and a spawned worker unpickles them as engine.data.augment.posterize."""
    for name in _POSTERIZE_OPS:
        if timm_aa.NAME_TO_OP.get(name) is timm_aa.posterize:
            timm_aa.NAME_TO_OP[name] = posterize


def check_auto_augment(aa: Optional[str]) -> Optional[str]:
    """The --aa value for timm's create_transform: None for "none"/"" (no auto-augment), else the
    policy string, parsed by timm itself; an unknown policy is a UserError naming the valid forms."""
    if aa is None or aa.strip().lower() in ("", "none"):
        return None
    try:
        # The same parser the fine-tuning transform uses (it dispatches on the policy's prefix).
        create_transform(224, is_training=True, auto_augment=aa)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = f" ({e})" if str(e) else ""
        raise UserError(f"--aa {aa!r} is not an auto-augment policy{reason}: use one of {VALID_FORMS}") from None
    return aa
