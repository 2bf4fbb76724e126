"""Reconstruction pictures (engine/visualize.py, scripts/visualize.py) and log plots (scripts/plot_log.py).

Real photos, real checkpoint files, the CLIs as real processes. The PNG checks read the pixels
back: in the masked panel exactly the removed patches are MASK_GREY_U8, and the
"reconstruction + visible" panel shows the input on the visible patches.
"""
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import ImageFolder

import models
from engine import visualize as vis
from util.cli import run_cli

from conftest import MINI, REPO, assert_ok, cli_env, one_line_error, pretrain

SIZE, P = 64, 16          # MINI input size and patch size
L = (SIZE // P) ** 2      # 16 patches
ARCH = "mae_vit_mini_patch16"


def removed_count(ratio: float) -> int:
    return L - int(L * (1 - ratio))


# ---------------------------------------------------------------- helpers
def mini_model(norm_pix=False, seed=0):
    torch.manual_seed(seed)
    return models.create_model(ARCH, img_size=SIZE, norm_pix_loss=norm_pix)


def save_checkpoint(path, norm_pix=False, encoder_only=False, with_args=True):
    sd = mini_model(norm_pix).state_dict()
    if encoder_only:
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}
    ckpt = {"model": sd}
    if with_args:
        ckpt["args"] = {"model": ARCH, "input_size": SIZE, "norm_pix_loss": norm_pix}
    torch.save(ckpt, path)
    return path


def expected_size(rows: int, size: int = SIZE):
    """(width, height) from the layout constants documented in engine/visualize.py."""
    panel = size * max(1, math.ceil(vis.MIN_PANEL_PX / size))
    return (vis.MARGIN + 4 * (panel + vis.MARGIN),
            vis.HEADER_H + rows * (vis.ROW_TITLE_H + panel + vis.MARGIN))


def read_panels(path, rows: int, size: int = SIZE) -> np.ndarray:
    """(rows, 4, size, size, 3) uint8: every panel of a PNG, back at image resolution."""
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img.shape[1], img.shape[0]) == expected_size(rows, size)
    scale = max(1, math.ceil(vis.MIN_PANEL_PX / size))
    panel = size * scale
    out = np.empty((rows, 4, size, size, 3), np.uint8)
    for r in range(rows):
        for c in range(4):
            x = vis.MARGIN + c * (panel + vis.MARGIN)
            y = vis.HEADER_H + r * (vis.ROW_TITLE_H + panel + vis.MARGIN) + vis.ROW_TITLE_H
            block = img[y:y + panel, x:x + panel]
            small = block[::scale, ::scale]
            # nearest-neighbour upscaling: every panel pixel is an image pixel
            assert np.array_equal(block, small.repeat(scale, 0).repeat(scale, 1))
            out[r, c] = small
    return out


def blanked_patches(panel: np.ndarray) -> np.ndarray:
    """(L,) bool in patchify order: patches that are MASK_GREY_U8 in every pixel and channel."""
    g = SIZE // P
    patches = panel.reshape(g, P, g, P, 3).transpose(0, 2, 1, 3, 4).reshape(L, -1)
    return (patches == vis.MASK_GREY_U8).all(axis=1)


def patch_mask_pixels(patch_mask: np.ndarray) -> np.ndarray:
    """(L,) bool -> (SIZE, SIZE) bool."""
    g = SIZE // P
    return patch_mask.reshape(g, g).repeat(P, 0).repeat(P, 1)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_cmd(name: str, args):
    return [sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, args)]


@pytest.fixture(scope="module")
def visualize_cli():
    return load_script("visualize")


@pytest.fixture(scope="module")
def images(photos):
    return photos / "train" / "photos"


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """A real run of main_pretrain.py: 2 epochs of the mini model on the photos."""
    out = tmp_path_factory.mktemp("trained")
    assert_ok(pretrain([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 2, "--output_dir", out,
                        "--vis_every", 1, "--log_dir", out]))
    return out


# ---------------------------------------------------------------- engine/visualize.py
def test_fixed_batch_is_deterministic_rgb_and_in_dataset_order(photos, images):
    batch = vis.fixed_batch(photos / "train", SIZE, 5)
    assert batch.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(batch, vis.fixed_batch(photos / "train", SIZE, 5))
    # a folder, a list of files and the training ImageFolder give the same first images
    first = sorted(images.glob("*.jpg"))[:5]
    assert vis.find_images([photos]) == [str(p) for p in sorted(images.glob("*.jpg"))]
    assert torch.equal(batch, vis.fixed_batch(first, SIZE))
    assert torch.equal(batch, vis.fixed_batch(ImageFolder(str(photos / "train")), SIZE, 5))
    gray = next(p for p in first if Image.open(p).mode == "L")
    rgb = vis.denormalize(vis.load_image(str(gray), SIZE)[None])[0]
    assert torch.allclose(rgb[0], rgb[1], atol=1e-6) and torch.allclose(rgb[0], rgb[2], atol=1e-6)


def test_fixed_batch_unreadable_image(images, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"this is not a jpeg")
    for name in ("coins_0.jpg", "flower_0.jpg"):
        (folder / name).write_bytes((images / name).read_bytes())
    with pytest.raises(vis.UserError, match=f"cannot read image {folder / 'a_broken.jpg'}"):
        vis.fixed_batch(folder, SIZE, 2)
    # the training hook skips it: the next image takes its place
    batch = vis.fixed_batch(folder, SIZE, 2, skip_unreadable=True)
    assert torch.equal(batch, vis.fixed_batch([folder / "coins_0.jpg", folder / "flower_0.jpg"], SIZE))
    assert "warning: cannot read image" in capsys.readouterr().err


def test_has_decoder():
    sd = mini_model().state_dict()
    assert vis.has_decoder(sd)
    assert not vis.has_decoder({k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")})


def test_reconstruct_panels(photos):
    model = mini_model().train()
    imgs = vis.fixed_batch(photos / "train", SIZE, 4)
    noise = vis.fixed_noise(4, L)
    res = vis.reconstruct(model, imgs, 0.75, noise)
    assert model.training  # mode restored
    for key in vis.PANELS:
        assert res[key].shape == imgs.shape and 0 <= res[key].min() and res[key].max() <= 1
    mask = res["mask"].bool()
    assert mask.sum(1).tolist() == [removed_count(0.75)] * 4

    # masked: exactly the removed patches are grey
    grey = (model.patchify(res["masked"]) == vis.MASK_GREY).all(-1)
    assert torch.equal(grey, mask)
    # the input, de-normalised
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    assert torch.allclose(res["original"], (imgs * std + mean).clamp(0, 1), atol=1e-6)
    # pasted: the input on visible patches (exactly), the reconstruction on removed ones
    pasted, orig, rec = (model.patchify(res[k]) for k in ("pasted", "original", "reconstruction"))
    assert torch.equal(pasted[~mask], orig[~mask])
    assert torch.equal(pasted[mask], rec[mask])
    # reconstruction: the model's prediction, unpatchified and de-normalised
    with torch.no_grad():
        _, pred, mask2 = model.eval()(imgs, 0.75, noise)
    assert torch.equal(mask2.bool(), mask)
    assert torch.allclose(res["reconstruction"], (model.unpatchify(pred) * std + mean).clamp(0, 1), atol=1e-6)


def test_norm_pix_prediction_is_denormalised_with_target_patch_stats(photos):
    model = mini_model(norm_pix=True)
    imgs = vis.fixed_batch(photos / "train", SIZE, 2)
    noise = vis.fixed_noise(2, L)
    res = vis.reconstruct(model, imgs, 0.75, noise)
    assert res["norm_pix"]
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75, noise)

    # By hand, for one removed patch of image 1: the target patch's mean and unbiased variance.
    j = int(mask[1].nonzero()[0])
    row, col = divmod(j, SIZE // P)
    box = (slice(None), slice(row * P, (row + 1) * P), slice(col * P, (col + 1) * P))
    values = imgs[1][box].permute(1, 2, 0).reshape(-1)           # (p, q, c) order, as patchify
    mu = values.mean()
    var = ((values - mu) ** 2).sum() / (values.numel() - 1)
    pixels = (pred[1, j] * math.sqrt(var + 1e-6) + mu).reshape(P, P, 3).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    expected = (pixels * std + mean).clamp(0, 1)
    assert torch.allclose(res["reconstruction"][1][box], expected, atol=1e-5)
    # ... which is not what the raw prediction would show
    raw = (pred[1, j].reshape(P, P, 3).permute(2, 0, 1) * std + mean).clamp(0, 1)
    assert (raw - expected).abs().max() > 0.05


def test_render_grid_layout_and_pixels(photos, tmp_path):
    model = mini_model()
    imgs = vis.fixed_batch(photos / "train", SIZE, 2)
    noise = vis.fixed_noise(2, L, seed=3)
    ratios = [0.75, 0.5]
    results = [vis.reconstruct(model, imgs, r, noise) for r in ratios]
    path = tmp_path / "grid.png"
    picture = vis.render_grid(results, ["a.jpg", "b.jpg"], str(path))
    assert picture.size == expected_size(4) == Image.open(path).size
    panels = read_panels(path, rows=4)
    assert np.asarray(Image.open(path))[0, 0].tolist() == [255, 255, 255]
    for r in range(4):
        i, res = r // 2, results[r % 2]
        original, masked, recon, pasted = panels[r]
        assert np.array_equal(original, vis.to_uint8(res["original"][i]))
        blank = blanked_patches(masked)
        assert np.array_equal(blank, res["mask"][i].bool().numpy())
        assert blank.sum() == removed_count(ratios[r % 2])
        visible = ~patch_mask_pixels(blank)
        assert np.abs(pasted[visible].astype(int) - original[visible]).max() <= 1
        assert np.array_equal(pasted[~visible], recon[~visible])
        assert np.array_equal(masked[visible], original[visible])


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, step):
        self.calls.append((tag, img, step))


def test_log_reconstructions_for_the_training_hook(photos, tmp_path):
    model = mini_model().train()
    imgs = vis.fixed_batch(ImageFolder(str(photos / "train")), SIZE, 4)
    noise = vis.fixed_noise(len(imgs), model.patch_embed.num_patches, seed=0)
    writer = FakeWriter()
    path = vis.log_reconstructions(model, imgs, noise, 0.75, 7, str(tmp_path), writer)
    assert path == str(tmp_path / "reconstructions" / "epoch_0007.png")
    png = np.asarray(Image.open(path).convert("RGB"))
    assert (png.shape[1], png.shape[0]) == expected_size(4)
    (tag, img, step), = writer.calls
    assert tag == "reconstructions" and step == 7
    assert img.dtype == np.uint8 and np.array_equal(img, png.transpose(2, 0, 1))
    assert model.training
    # the same call with a real tensorboard writer and no output_dir
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(log_dir=str(tmp_path / "tb")) as tb:
        assert vis.log_reconstructions(model, imgs, noise, 0.75, 0, "", tb) is None
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_pretrain_parser_has_vis_every():
    """The training hook's flag: its loss is a regression, not a reason to skip the run below."""
    import main_pretrain

    parser = main_pretrain.get_args_parser()
    assert "--vis_every" in parser._option_string_actions
    assert parser.parse_args(["--vis_every", "3"]).vis_every == 3 and parser.parse_args([]).vis_every == 0


def test_training_run_draws_reconstructions(trained):
    pictures = [trained / "reconstructions" / f"epoch_{e:04d}.png" for e in (0, 1)]
    first, last = (read_panels(p, rows=4) for p in pictures)  # the first 4 images of the dataset
    assert np.array_equal(first[:, 0], last[:, 0])  # fixed images ...
    for r in range(4):
        blank = blanked_patches(first[r, 1])
        assert blank.sum() == removed_count(0.75)
        assert np.array_equal(blank, blanked_patches(last[r, 1]))  # ... and fixed masks
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained), size_guidance={"images": 0})
    events.Reload()
    w, h = expected_size(4)
    assert [(e.step, e.width, e.height) for e in events.Images("reconstructions")] == [(0, w, h), (1, w, h)]


# ---------------------------------------------------------------- scripts/visualize.py
def test_cli_on_a_trained_checkpoint(trained, images, tmp_path):
    files = [images / "astronaut_0.jpg", images / "camera_0.jpg"]
    ratios = [0.75, 0.5, 0.9]
    proc = subprocess.run(script_cmd("visualize", ["--checkpoint", trained / "checkpoint-last.pth", "--images",
                                                   *files, "--output_dir", tmp_path, "--mask_ratio", *ratios]),
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    written = [tmp_path / "astronaut_0.png", tmp_path / "camera_0.png"]
    assert proc.stdout.split() == [str(p) for p in written]
    for png in written:
        panels = read_panels(png, rows=len(ratios))  # checks the picture size too
        blanks = [blanked_patches(panels[r, 1]) for r in range(len(ratios))]
        assert [b.sum() for b in blanks] == [removed_count(r) for r in ratios]
        assert not (blanks[1] & ~blanks[0]).any() and not (blanks[0] & ~blanks[2]).any()  # nested masks
        for r, blank in enumerate(blanks):
            original, _, _, pasted = panels[r]
            visible = ~patch_mask_pixels(blank)
            assert np.abs(pasted[visible].astype(int) - original[visible]).max() <= 1
            assert np.array_equal(original, panels[0, 0])


def test_grid_and_seeds(visualize_cli, images, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt.pth")

    def run(seed, out):
        args = visualize_cli.get_args_parser().parse_args(
            ["--checkpoint", str(ckpt), "--images", str(images / "coins_0.jpg"), str(images / "flower_0.jpg"),
             str(images / "horse_0.jpg"), "--output_dir", str(tmp_path / out), "--grid", "--seed", str(seed),
             "--mask_ratio", "0.75", "0.9"])
        assert run_cli(visualize_cli.main, args) == 0
        path = tmp_path / out / "reconstructions.png"
        assert capsys.readouterr().out.split() == [str(path)]
        return path

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first.read_bytes() == again.read_bytes()
    a, c = read_panels(first, rows=6), read_panels(other, rows=6)  # 3 images x 2 ratios
    masks_a = [blanked_patches(a[r, 1]) for r in range(6)]
    masks_c = [blanked_patches(c[r, 1]) for r in range(6)]
    assert [m.sum() for m in masks_a] == [removed_count(0.75), removed_count(0.9)] * 3
    assert all(not np.array_equal(x, y) for x, y in zip(masks_a, masks_c))
    assert np.array_equal(a[:, 0], c[:, 0])  # same images, same order


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("bad")
    ns = dict(tmp=tmp, photo=images / "astronaut_0.jpg", out=tmp / "out",
              full=save_checkpoint(tmp / "full.pth"),
              bare=save_checkpoint(tmp / "official_style.pth", with_args=False),
              encoder=save_checkpoint(tmp / "mae_pretrain_vit_mini.pth", encoder_only=True),
              classifier=tmp / "finetuned.pth")
    classifier = models.create_model("vit_mini_patch16", img_size=SIZE, num_classes=2, global_pool=True)
    torch.save({"model": classifier.state_dict(), "args": {"model": "vit_mini_patch16", "input_size": SIZE}},
               ns["classifier"])
    (tmp / "empty").mkdir()
    (tmp / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (tmp / "empty_run").mkdir()
    (tmp / "empty_run" / "log.txt").write_text("")
    return ns


def visualize_args(ckpt, out, imgs, *extra):
    return ["--checkpoint", ckpt, "--images", *imgs, "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def error_runs(bad_inputs, trained):
    """Bad input as real processes, started together (they mostly wait on imports)."""
    b = bad_inputs
    tmp, photo, out = b["tmp"], b["photo"], b["out"]
    cases = {
        "encoder_only": (script_cmd("visualize", visualize_args(b["encoder"], out, [photo])),
                         [str(b["encoder"]), "no decoder weights", "cannot reconstruct",
                          "mae_visualize_vit_large.pth or a checkpoint of this repo"]),
        "unreadable_image": (script_cmd("visualize", visualize_args(b["full"], out, [photo, tmp / "garbage.jpg"])),
                             [f"cannot read image {tmp / 'garbage.jpg'}"]),
        "bad_model": (script_cmd("visualize", visualize_args(b["bare"], out, [photo], "--model", "mae_vit_nope")),
                      ["unknown model 'mae_vit_nope'; choose one of: mae_vit_2b_patch14, mae_vit_6p5b_patch14, "
                       "mae_vit_base_patch16"]),
        "plot_missing_log": (script_cmd("plot_log", [tmp / "empty", "--output", tmp / "p.png"]),
                             [f"run folder {tmp / 'empty'} has no log.txt"]),
        "plot_empty_log": (script_cmd("plot_log", [trained, tmp / "empty_run", "--output", tmp / "p.png"]),
                           [f"{tmp / 'empty_run' / 'log.txt'} is empty"]),
        "plot_bad_key": (script_cmd("plot_log", [trained, "--output", tmp / "p.png", "--keys", "nope"]),
                         ["no run logs 'nope': available keys are", "train_loss"]),
    }
    procs = {name: subprocess.Popen(cmd, cwd=tmp, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (cmd, _) in cases.items()}
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        results[name] = (subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), cases[name][1])
    return results


@pytest.mark.parametrize("case", ["encoder_only", "unreadable_image", "bad_model",
                                  "plot_missing_log", "plot_empty_log", "plot_bad_key"])
def test_bad_input_process_exits_2_with_one_line(error_runs, bad_inputs, case):
    proc, expected = error_runs[case]
    err = one_line_error(proc)
    for part in expected:
        assert part in err, err
    assert not bad_inputs["out"].exists() or not list(bad_inputs["out"].rglob("*.png"))  # nothing drawn


@pytest.mark.parametrize("case, expected", [
    ("missing_image", "image path {tmp}/nope.jpg does not exist: give image files or folders of images"),
    ("empty_folder", "no images found in folder {tmp}/empty: supported extensions are"),
    ("no_model", "checkpoint {bare} does not record its architecture: pass --model"),
    ("missing_checkpoint", "--checkpoint {tmp}/nope.pth does not exist"),
    ("classifier", "checkpoint {classifier} is a classifier (vit_mini_patch16), fine-tuned or linear-probed: it "
                   "has a classification head and no decoder, so it cannot reconstruct images; give the "
                   "pretraining checkpoint"),
    ("mask_ratio", "--mask_ratio must be between 0 and 1 (exclusive), got 1.0"),
    ("input_size", "--input_size 72 is not divisible by the patch size 16"),
    ("input_size_0", "--input_size must be a positive image size in pixels"),
])
def test_bad_input_in_process(visualize_cli, bad_inputs, capsys, case, expected):
    b = bad_inputs
    argv = {
        "missing_image": visualize_args(b["full"], b["out"], [b["photo"], b["tmp"] / "nope.jpg"]),
        "empty_folder": visualize_args(b["full"], b["out"], [b["tmp"] / "empty"]),
        "no_model": visualize_args(b["bare"], b["out"], [b["photo"]]),
        "missing_checkpoint": visualize_args(b["tmp"] / "nope.pth", b["out"], [b["photo"]]),
        "classifier": visualize_args(b["classifier"], b["out"], [b["photo"]]),
        "mask_ratio": visualize_args(b["full"], b["out"], [b["photo"]], "--mask_ratio", "0.75", "1.0"),
        "input_size": visualize_args(b["full"], b["out"], [b["photo"]], "--input_size", "72"),
        "input_size_0": visualize_args(b["full"], b["out"], [b["photo"]], "--input_size", "0"),
    }[case]
    code = run_cli(visualize_cli.main, visualize_cli.get_args_parser().parse_args(list(map(str, argv))))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: " + expected.format(**b)), err
    assert not list(b["tmp"].rglob("out/*.png"))


# ---------------------------------------------------------------- scripts/plot_log.py
def test_plot_log_two_runs(trained, tmp_path):
    other = tmp_path / "other_run"
    other.mkdir()
    lines = [json.dumps({"train_loss": 1.5 - 0.1 * e, "train_lr": 1e-4 * (e + 1), "epoch": e}) for e in range(4)]
    (other / "log.txt").write_text("\n".join(lines) + "\n" + '{"train_loss": 1.0, "ep')  # cut-off last line
    out = tmp_path / "plots" / "loss.png"
    proc = subprocess.run(script_cmd("plot_log", [trained, other / "log.txt", "--output", out]),
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert proc.stdout.split() == [str(out)]
    assert "incomplete last line" in proc.stderr
    w, h = Image.open(out).size
    assert (w, h) == (700, 560)  # 7 in x 2.8 in per key, 100 dpi
