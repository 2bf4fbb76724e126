"""The official fine-tuning augmentation on current Pillow / timm (engine/data/augment.py) and --aa.

The RandAugment ops are forced to their edge magnitudes instead of waiting for the draw: the
official rand-m9-mstd0.5-inc1 asks for 0-bit posterize in about 2% of its draws, which Pillow 13
refuses, and older Pillow turned into a black image.
"""
import copy

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from engine.data import KeyedSamples, check_auto_augment, finetune_transform, image_folder, keyed_rng, pil_image
from util.errors import UserError

import main_finetune
from conftest import PHOTOS

OFFICIAL = main_finetune.get_args_parser().parse_args([])  # --aa rand-m9-mstd0.5-inc1, --reprob 0.25, 224 px
PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))
BLACK = -torch.tensor(IMAGENET_DEFAULT_MEAN) / torch.tensor(IMAGENET_DEFAULT_STD)  # black after Normalize


def args_with(**kw):
    args = copy.copy(OFFICIAL)
    vars(args).update(kw)
    return args


def rand_augment_index(transform) -> int:
    return next(k for k, t in enumerate(transform.transforms) if isinstance(t, timm_aa.RandAugment))


def forced(transform, name: str, magnitude: float):
    """A copy of the transform whose RandAugment applies only op `name`, always, at `magnitude`."""
    t = copy.deepcopy(transform)
    ra = t.transforms[rand_augment_index(t)]
    op = next(o for o in ra.ops if o.name == name)
    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
    ra.ops, ra.num_layers = [op], 1
    return t, op


def old_pillow_posterize(img: Image.Image, bits: int) -> Image.Image:
    """Pillow 10's ImageOps.posterize, as it was: no range check, so 0 bits masks every value to 0."""
    mask = ~(2 ** (8 - bits) - 1)
    lut = [i & mask for i in range(256)]
    return img.point(lut * 3 if img.mode == "RGB" else lut)


def test_the_photos_include_greyscale_ones():
    modes = {Image.open(p).mode for p in PHOTO_FILES}
    assert modes == {"L", "RGB"}
    assert {pil_image(str(p)).mode for p in PHOTO_FILES} == {"RGB"}  # what the transform gets


@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negated"])
@pytest.mark.parametrize("magnitude", [0, 10])
@pytest.mark.parametrize("policy, ops", [("rand-m9-mstd0.5-inc1", timm_aa._RAND_INCREASING_TRANSFORMS),
                                         ("rand-m9-mstd0.5", timm_aa._RAND_TRANSFORMS)], ids=["inc1", "inc0"])
def test_every_rand_op_at_its_edge_magnitudes(policy, ops, magnitude, sign, monkeypatch):
    # The ops with a random sign (rotate, shear, translate, the increasing enhancements) get each sign.
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: sign * v)
    full = finetune_transform(args_with(aa=policy), True)
    ra_at = rand_augment_index(full)
    assert [op.name for op in full.transforms[ra_at].ops] == ops
    zero_bits = []
    for name in ops:
        t, op = forced(full, name, magnitude)
        before, upto = T.Compose(t.transforms[:ra_at]), T.Compose(t.transforms[:ra_at + 1])
        for k, path in enumerate(PHOTO_FILES):
            img = pil_image(str(path))
            with keyed_rng(k):
                x = t(img)
            assert x.shape == (3, 224, 224) and torch.isfinite(x).all(), (name, path.name)
            if not name.startswith("Posterize"):
                continue
            with keyed_rng(k):
                crop = before(img)
            with keyed_rng(k):
                got = upto(img)  # the same crop (same keyed draws), then the op
            bits = op.level_fn(magnitude, op.hparams)[0]
            want = crop if bits >= 8 else old_pillow_posterize(crop, bits)  # timm skips >= 8 itself
            assert got.mode == "RGB" and got.size == crop.size == (224, 224)
            assert np.array_equal(np.asarray(got), np.asarray(want)), (name, bits, path.name)
            if bits == 0:
                assert np.asarray(got).max() == 0
                zero_bits.append(name)
    # The draws that crash on Pillow 13: PosterizeIncreasing at 10, Posterize at 0.
    expected = {("inc1", 10): "PosterizeIncreasing", ("inc0", 0): "Posterize"}.get(
        ("inc1" if "inc1" in policy else "inc0", magnitude))
    assert set(zero_bits) == ({expected} if expected else set())


def test_fewer_than_zero_bits_is_black_too():
    """mmax above 10 lets PosterizeIncreasing ask for -4 bits: black under old Pillow as well."""
    t, op = forced(finetune_transform(args_with(aa="rand-m9-mstd0.5-inc1-mmax20"), True), "PosterizeIncreasing", 20)
    assert op.level_fn(20, op.hparams)[0] == -4
    ra_at = rand_augment_index(t)
    for k, path in enumerate(PHOTO_FILES[:4]):
        img = pil_image(str(path))
        with keyed_rng(k):
            crop = T.Compose(t.transforms[:ra_at])(img)
        with keyed_rng(k):
            got = T.Compose(t.transforms[:ra_at + 1])(img)
        assert np.array_equal(np.asarray(got), np.asarray(old_pillow_posterize(crop, -4)))
        assert np.asarray(got).max() == 0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_zero_bit_posterize_in_loader_workers(photos, context):
    """The op table is patched in the training process; workers must get the patched op too."""
    t, _ = forced(finetune_transform(OFFICIAL, True), "PosterizeIncreasing", 10)
    ds = KeyedSamples(image_folder(str(photos), "train"), t, seed=0)
    keys = [(0, i) for i in range(4)]
    loader = DataLoader(ds, sampler=keys, batch_size=2, num_workers=2, multiprocessing_context=context)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.stack([ds[key][0] for key in keys]))  # same keyed draws as in-process
    # Black except where random erasing (--reprob 0.25, at most a third of the image) drew noise.
    black = torch.isclose(got, BLACK.view(1, 3, 1, 1).expand_as(got)).all(dim=1).float().mean(dim=(1, 2))
    assert (black >= 0.6).all(), black


@pytest.mark.parametrize("aa", ["none", "None", ""])
def test_aa_none_turns_auto_augment_off(aa):
    assert check_auto_augment(aa) is None
    off = [type(t).__name__ for t in finetune_transform(args_with(aa=aa), True).transforms]
    official = [type(t).__name__ for t in finetune_transform(OFFICIAL, True).transforms]
    assert "RandAugment" in official
    assert off == [n for n in official if n != "RandAugment"]


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1-mmax15", "augmix-m5-w4-d2", "v0",
                                "original-mstd0.5", "3a"])
def test_valid_policies_pass_unchanged(aa):
    assert check_auto_augment(aa) == aa


@pytest.mark.parametrize("aa, reason", [
    ("foo", "Unknown AA policy foo"),
    ("rand-m9-bogus1", "Unknown RandAugment config section"),
    ("rand-m9x", "invalid literal for int()"),
    ("augmix-q1", "Unknown AugMix config section"),
    ("randaugment", ""),
])
def test_unknown_policy_is_a_one_line_user_error(aa, reason):
    with pytest.raises(UserError) as e:
        check_auto_augment(aa)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--aa {aa!r} is not an auto-augment policy") and reason in msg
    for form in ("rand-m9-mstd0.5-inc1", "augmix-", "v0", "original", "none"):
        assert form in msg
    with pytest.raises(UserError):
        finetune_transform(args_with(aa=aa), True)
