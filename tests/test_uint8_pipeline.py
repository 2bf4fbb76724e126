"""The uint8 training data path against the official PIL pipeline: same decode, same crop boxes
and flips under the same keyed seed, pixels within a grey level or two, bit-identical
normalisation."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from engine.data import (
    KeyedSamples,
    RandomResizedCropFlip,
    image_folder,
    keyed_rng,
    linprobe_transform,
    pil_image,
    pretrain_transform,
    read_uint8,
    to_model_input,
)

from conftest import PHOTOS

JPEGS = sorted(PHOTOS.glob("*.jpg"))
STD_255 = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


def pil_uint8(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil_image(path)).copy()).permute(2, 0, 1)


def test_jpeg_decode_equals_pil():
    modes = set()
    for path in JPEGS:
        modes.add(Image.open(path).mode)
        assert torch.equal(read_uint8(str(path)), pil_uint8(path)), path.name
    assert modes == {"RGB", "L"}  # greyscale JPEGs are replicated to RGB as PIL's convert does


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("BMP", "P")])
def test_other_files_take_the_pil_route(tmp_path, fmt, mode):
    src = Image.open(JPEGS[0]).convert("RGB").resize((70, 50))
    img = src.convert(mode) if mode != "P" else src.quantize(16)
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, fmt)
    out = read_uint8(str(path))
    assert out.dtype == torch.uint8 and out.shape == (3, 50, 70)
    assert torch.equal(out, pil_uint8(path))


def grey_level_diffs(size, scale, official, fast, seeds):
    diffs = []
    for seed in seeds:
        for path in JPEGS:
            with keyed_rng(seed):
                a = official(pil_image(path))
            with keyed_rng(seed):
                b = to_model_input(fast(read_uint8(str(path))).unsqueeze(0), torch.device("cpu"))[0]
            assert b.shape == a.shape == (3, size, size)
            diffs.append(((a - b) * STD_255).abs().flatten())
    return torch.cat(diffs)


@pytest.mark.parametrize("which", ["pretrain", "linprobe"])
def test_same_seed_same_crop_and_flip_within_grey_levels(which):
    if which == "pretrain":
        official, fast = pretrain_transform(96), pretrain_transform(96, "uint8")
    else:
        official, fast = linprobe_transform(96, True), linprobe_transform(96, True, "uint8")
    d = grey_level_diffs(96, None, official, fast, seeds=range(6))
    assert d.mean() < 0.1                       # measured: about 0.02 grey levels
    assert torch.quantile(d[::7], 0.999) <= 2.01  # a different box or flip would give tens of levels
    assert (d < 0.5).float().mean() > 0.97


def test_different_draws_are_far_apart():
    """The comparison above can fail: a box or flip drawn from another seed is nowhere near."""
    official, fast = pretrain_transform(96), pretrain_transform(96, "uint8")
    diffs = []
    for path in JPEGS:
        with keyed_rng(1):
            a = official(pil_image(path))
        with keyed_rng(2):
            b = to_model_input(fast(read_uint8(str(path))).unsqueeze(0), torch.device("cpu"))[0]
        diffs.append(((a - b) * STD_255).abs().mean())
    assert min(diffs) > 5


def test_crop_box_distribution_is_the_official_one():
    """Area fraction and aspect ratio of the boxes (recovered from an index image) follow
    RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3))."""
    h, w = 250, 400
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    # Coordinates as pixel values (x / 2 in red, y in blue), so the output's edges locate the box.
    idx = torch.stack([xs // 2, torch.zeros_like(xs), ys]).to(torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    crop = RandomResizedCropFlip(32, scale=(0.2, 1.0))
    areas, aspects = [], []
    for seed in range(400):
        with keyed_rng(seed):
            i, j, bh, bw = T.RandomResizedCrop.get_params(idx, (0.2, 1.0), (3 / 4, 4 / 3))
            flip = bool(torch.rand(1) < 0.5)
        areas.append(bh * bw / (h * w))
        aspects.append(bw / bh)
        with keyed_rng(seed):
            out = crop(idx).int()
        first, last = 2 * out[0, 16, 0].item(), 2 * out[0, 16, -1].item()
        if flip:
            first, last = last, first
        assert abs(first - j) <= 10 and abs(last - (j + bw - 1)) <= 10, (seed, first, last, j, bw, flip)
        assert abs(out[2, 0, 16].item() - i) <= 10 and abs(out[2, -1, 16].item() - (i + bh - 1)) <= 10
    areas, aspects = np.array(areas), np.array(aspects)
    ref_areas, ref_aspects = reference_boxes(h, w, 20000)
    assert areas.min() >= 0.2 - 1e-3 and areas.max() <= 1.0
    assert aspects.min() >= 3 / 4 - 0.02 and aspects.max() <= 4 / 3 + 0.02
    assert abs(areas.mean() - ref_areas.mean()) < 0.03 and abs(areas.std() - ref_areas.std()) < 0.03
    assert abs(np.log(aspects).mean() - np.log(ref_aspects).mean()) < 0.03


def reference_boxes(h, w, n, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's rule (Inception / MAE), written out with numpy: up to 10 tries of a
    uniform area fraction and a log-uniform aspect ratio, else the whole image's central crop."""
    rng = np.random.default_rng(0)
    areas, aspects = [], []
    for _ in range(n):
        for _ in range(10):
            a = rng.uniform(*scale) * h * w
            r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
            bw, bh = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
            if 0 < bw <= w and 0 < bh <= h:
                break
        else:
            if w / h < ratio[0]:
                bw, bh = w, int(round(w / ratio[0]))
            elif w / h > ratio[1]:
                bw, bh = int(round(h * ratio[1])), h
            else:
                bw, bh = w, h
        areas.append(bw * bh / (h * w))
        aspects.append(bw / bh)
    return np.array(areas), np.array(aspects)


def test_device_normalisation_is_bit_identical_to_totensor_normalize():
    img = pil_image(JPEGS[3])
    official = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])(img)
    ours = to_model_input(pil_uint8(JPEGS[3]).unsqueeze(0), torch.device("cpu"))[0]
    assert ours.dtype == torch.float32 and torch.equal(ours, official)
    floats = torch.randn(2, 3, 4, 4)
    assert to_model_input(floats, torch.device("cpu")) is floats  # float batches pass through


def test_keyed_samples_pipelines_agree(photos):
    folder = image_folder(str(photos), "train")
    pil = KeyedSamples(folder, pretrain_transform(64), seed=3, num_patches=16)
    u8 = KeyedSamples(folder, pretrain_transform(64, "uint8"), seed=3, num_patches=16, pipeline="uint8")
    for key in [(0, 0), (0, 5), (7, 2)]:
        a, ta, na = pil[key]
        b, tb, nb = u8[key]
        assert b.dtype == torch.uint8 and b.shape == (3, 64, 64) and ta == tb
        assert torch.equal(na, nb)  # the mask noise does not depend on the pipeline
        d = ((a - to_model_input(b[None], torch.device("cpu"))[0]) * STD_255).abs()
        assert d.mean() < 0.2


def test_unreadable_file_is_replaced_in_the_uint8_pipeline(tmp_path, capfd):
    root = tmp_path / "train" / "c"
    root.mkdir(parents=True)
    good = root / "b.jpg"
    good.write_bytes(JPEGS[0].read_bytes())
    (root / "a.jpg").write_bytes(JPEGS[0].read_bytes()[:4000])  # truncated JPEG
    ds = KeyedSamples(image_folder(str(tmp_path), "train"), pretrain_transform(32, "uint8"), 0, pipeline="uint8")
    img, _ = ds[(0, 0)]
    assert img.shape == (3, 32, 32)
    err = capfd.readouterr().err
    assert "warning: unreadable image" in err and "a.jpg" in err and "b.jpg" in err


def test_torch_only_keying_draws_the_same_and_restores_the_process_streams():
    torch.manual_seed(5)
    np.random.seed(5)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    with keyed_rng(7, torch_only=True):
        a = torch.rand(3)
    with keyed_rng(7):
        b = torch.rand(3)
    with keyed_rng(8, torch_only=True):
        c = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert (np.random.get_state()[1] == np_state).all()


def test_device_decode_batches_equal_the_uint8_pipeline_on_cpu(tmp_path):
    """Decoding on the device (here the CPU) gives the very batches of the uint8 pipeline: same
    draws in the workers, same decoder, same resize; a PNG takes the PIL route in both."""
    from engine.data import build_loader

    root = tmp_path / "train" / "c"
    root.mkdir(parents=True)
    for path in JPEGS[:5]:
        (root / path.name).write_bytes(path.read_bytes())
    Image.open(JPEGS[5]).convert("RGB").save(root / "z.png")
    folder = image_folder(str(tmp_path), "train")
    batches = {}
    for pipeline in ("uint8", "device_decode"):
        ds = KeyedSamples(folder, pretrain_transform(64, pipeline), 0, 4, pipeline, torch_rng_only=True)
        loader = build_loader(ds, 6, 1, 0, 0, 0, False)
        loader.set_position(3)
        imgs, targets, noise = next(iter(loader))
        batches[pipeline] = to_model_input(imgs, torch.device("cpu")), noise
    assert type(next(iter(loader))[0]).__name__ == "EncodedBatch"
    (a, na), (b, nb) = batches["uint8"], batches["device_decode"]
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b) and torch.equal(na, nb)


def test_device_decode_replaces_a_jpeg_whose_data_is_corrupt(tmp_path, capfd):
    root = tmp_path / "train" / "c"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(JPEGS[0].read_bytes()[:4000])  # header intact, data cut
    (root / "b.jpg").write_bytes(JPEGS[1].read_bytes())
    ds = KeyedSamples(image_folder(str(tmp_path), "train"), pretrain_transform(32, "device_decode"), 0,
                      pipeline="device_decode")
    from engine.data import collate

    imgs, _ = collate([ds[(0, 0)], ds[(0, 1)]])
    out = imgs.decode(torch.device("cpu"))
    assert torch.equal(out[0], out[1])  # the unreadable one replaced by the other
    err = capfd.readouterr().err
    assert "warning: unreadable image" in err and "a.jpg" in err
