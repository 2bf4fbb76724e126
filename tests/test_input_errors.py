"""Bad input gets one clear line naming the problem and the fix, and exit code 2."""
import shutil

import pytest

from conftest import MINI, assert_ok, pretrain


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist: point it at a dataset folder"),
    ("no_train", "has no 'train' folder: expected"),
    ("no_class_folders", "no class folders in"),
    ("empty", "no images found under"),
])
def test_dataset_layout_errors(tmp_path, case, expected):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no_class_folders":
        (root / "train").mkdir()
        (root / "train" / "a.txt").write_text("not an image")
    if case == "empty":
        (root / "train" / "cls").mkdir(parents=True)
    err = one_line_error(pretrain([*MINI, "--data_path", root, "--output_dir", tmp_path / "o"]))
    assert expected in err and str(root) in err


def test_batch_larger_than_per_rank_dataset(photos, tmp_path):
    err = one_line_error(pretrain([*MINI, "--data_path", photos, "--batch_size", 15, "--output_dir", tmp_path]))
    assert "gets 14 of the 14 images, fewer than --batch_size 15: lower --batch_size" in err


@pytest.mark.parametrize("flags, expected", [
    (["--model", "mae_vit_nope"], "unknown model 'mae_vit_nope'; choose one of: mae_vit_base_patch16"),
    (["--model", "vit_mini_patch16"], "--model vit_mini_patch16 is not a pretraining model; choose one of: "
                                      "mae_vit_base_patch16"),
    (["--input_size", "72"], "--input_size 72 is not divisible by the patch size 16"),
    (["--accum_iter", "2", "--save_every_steps", "3"], "--save_every_steps 3 must be a multiple of --accum_iter 2"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be between 0 and 1"),
    (["--device", "cuda"], "CUDA is not available: use --device cpu"),
    (["--resume", "/nonexistent/ckpt.pth"], "--resume /nonexistent/ckpt.pth does not exist"),
])
def test_bad_flags(photos, tmp_path, flags, expected):
    err = one_line_error(pretrain([*MINI, "--data_path", photos, "--output_dir", tmp_path, *flags]))
    assert expected in err


def test_unreadable_image_is_replaced_with_a_warning(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    victim = sorted((data / "train" / "photos").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    (data / "train" / "photos" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    proc = pretrain([*MINI, "--data_path", data, "--batch_size", 5, "--epochs", 1, "--output_dir", tmp_path / "o"])
    assert_ok(proc)
    assert f"warning: unreadable image {victim}" in proc.stderr
    assert "garbage.jpg" in proc.stderr and "in its place" in proc.stderr
    assert (tmp_path / "o" / "checkpoint-last.pth").exists()
