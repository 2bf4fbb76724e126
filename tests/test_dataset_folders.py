"""Dataset folders (engine.data.image_folder): empty class folders and directory links.

Pretraining ignores classes, so an empty class folder is skipped there; for classification it is an
error naming the folder. Directory links are followed at most once: torchvision's os.walk follows
`loop -> .` until the path is too long, and two such links never finish.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from engine.data import image_folder
from util.errors import UserError

from conftest import MINI, PHOTOS, REPO, assert_ok, cli_env, copy_tree, one_line_error, pretrain, run_main

PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))


def put_images(folder: Path, n: int, start: int = 0, ext: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + n):
        shutil.copy(PHOTO_FILES[k % len(PHOTO_FILES)], folder / f"img{k}{ext}")


def as_tuple(folder):
    return folder.classes, folder.class_to_idx, folder.samples, folder.targets


# ----------------------------------------------------------------------------- empty class folders
def test_pretraining_skips_empty_class_folders(tmp_path, capsys):
    train = tmp_path / "train"
    put_images(train / "a", 2)
    (train / "b").mkdir()
    put_images(train / "c", 1, start=5)
    (train / "d").mkdir()
    (train / "d" / "notes.txt").write_text("not an image")
    folder = image_folder(str(tmp_path), "train")
    assert folder.classes == ["a", "c"] and folder.class_to_idx == {"a": 0, "c": 1}
    assert [(Path(p).relative_to(train).as_posix(), t) for p, t in folder.samples] == [
        ("a/img0.jpg", 0), ("a/img1.jpg", 0), ("c/img5.jpg", 1)]
    assert folder.targets == [0, 0, 1] and folder.imgs == folder.samples
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping 2 empty class folder(s) under {train}: b, d"]


def test_classification_rejects_an_empty_class_folder(tmp_path):
    put_images(tmp_path / "train" / "a", 2)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(UserError) as e:
        image_folder(str(tmp_path), "train", allow_empty_classes=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"empty class folder(s) {tmp_path / 'train' / 'b'}: every class needs")
    assert image_folder(str(tmp_path), "train", allow_empty_classes=True).classes == ["a"]


@pytest.mark.parametrize("allow_empty_classes", [True, False])
def test_only_empty_class_folders_is_an_error(tmp_path, allow_empty_classes):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(UserError) as e:
        image_folder(str(tmp_path), "train", allow_empty_classes=allow_empty_classes)
    assert str(e.value).startswith(f"no images found under {tmp_path / 'train'}: its class folder(s) a, b hold "
                                   "no image files; supported extensions are .jpg")


# ----------------------------------------------------------------------------- directory links
def test_same_classes_indices_and_order_as_torchvision(tmp_path, capsys):
    """A tree without loops (nested folders whose walk order differs from their sorted order,
    mixed extensions, links to an outside file, folder and class folder) reads as torchvision's."""
    train, outside = tmp_path / "data" / "train", tmp_path / "outside"
    put_images(train / "b", 2)
    put_images(train / "a", 1, start=2, ext=".JPG")
    put_images(train / "a" / "x", 1, start=3, ext=".png")
    put_images(train / "a" / "x-y", 1, start=4)
    put_images(train / "a" / "x" / "z", 2, start=5)
    put_images(train / "a-x", 1, start=7, ext=".jpeg")
    (train / "a" / "readme.txt").write_text("not an image")
    put_images(outside / "folder", 2, start=8)
    put_images(outside / "cls", 1, start=10)
    put_images(outside, 1, start=11)
    os.symlink(outside / "folder", train / "b" / "linked")
    os.symlink(outside / "img11.jpg", train / "a" / "x" / "file_link.jpg")
    os.symlink(outside / "cls", train / "c_linked")
    folder = image_folder(str(tmp_path / "data"), "train")
    assert as_tuple(folder) == as_tuple(ImageFolder(str(train)))
    assert len(folder) == 12 and folder.classes == ["a", "a-x", "b", "c_linked"]
    assert capsys.readouterr().err == ""


def test_a_loop_link_is_not_followed(tmp_path, capsys):
    """torchvision: the 3 images counted 246 times over (train/loop/loop/... until ELOOP)."""
    train = tmp_path / "train"
    put_images(train / "photos", 3)
    os.symlink(".", train / "loop")
    folder = image_folder(str(tmp_path), "train")
    assert len(folder) == 3 and folder.classes == ["photos"]
    assert [Path(p).relative_to(train).as_posix() for p, _ in folder.samples] == [
        "photos/img0.jpg", "photos/img1.jpg", "photos/img2.jpg"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: not following 1 directory link(s) under {train} that lead back into the tree or to a folder "
        f"already read: {train / 'loop'} -> ."]


def test_branching_loop_links_finish(tmp_path):
    """`loop -> .` and `up -> ..` (torchvision never finishes): run in a subprocess so that a
    regression fails after a generous bound instead of hanging the test session."""
    train = tmp_path / "train"
    put_images(train / "photos", 3)
    os.symlink(".", train / "loop")
    os.symlink("..", train / "photos" / "up")
    os.symlink("../..", train / "photos" / "upup")  # tmp_path itself: above the tree
    code = ("import json, sys; from engine.data import image_folder; f = image_folder(sys.argv[1], 'train'); "
            "print(json.dumps([f.classes, f.samples]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    classes, samples = json.loads(proc.stdout)
    assert classes == ["photos"] and [p for p, _ in samples] == [str(train / "photos" / f"img{k}.jpg") for k in range(3)]
    assert proc.stderr.strip().splitlines() == [
        f"warning: not following 3 directory link(s) under {train} that lead back into the tree or to a folder "
        f"already read: {train / 'loop'} -> ., {train / 'photos' / 'up'} -> .., {train / 'photos' / 'upup'} -> ../.."]


def test_links_to_one_folder_are_followed_once(tmp_path, capsys):
    """Two links to one outside folder: read once, through the first. A link to a real class
    folder of the tree: the real folder keeps its images (torchvision counted them twice)."""
    train, outside = tmp_path / "train", tmp_path / "outside"
    put_images(train / "a", 1)
    put_images(train / "b", 2, start=1)
    put_images(outside, 2, start=3)
    os.symlink(outside, train / "a" / "ext1")
    os.symlink(outside, train / "a" / "ext2")
    os.symlink("../b", train / "a" / "alias")
    os.symlink(PHOTO_FILES[6], train / "a" / "file_link.jpg")
    folder = image_folder(str(tmp_path), "train")
    assert [(Path(p).relative_to(train).as_posix(), t) for p, t in folder.samples] == [
        ("a/file_link.jpg", 0), ("a/img0.jpg", 0), ("a/ext1/img3.jpg", 0), ("a/ext1/img4.jpg", 0),
        ("b/img1.jpg", 1), ("b/img2.jpg", 1)]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: not following 2 directory link(s) under {train} that lead back into the tree or to a folder "
        f"already read: {train / 'a' / 'alias'} -> ../b, {train / 'a' / 'ext2'} -> {outside}"]


# ----------------------------------------------------------------------------- the CLIs
def test_pretrain_cli_skips_an_empty_class_folder(photos, tmp_path):
    data = copy_tree(photos, tmp_path / "data")
    (data / "train" / "empty").mkdir()
    proc = pretrain([*MINI, "--data_path", data, "--batch_size", 7, "--epochs", 1, "--output_dir", tmp_path / "out"])
    assert_ok(proc)
    assert f"Dataset: 14 images in 1 classes under {data / 'train'}" in proc.stdout
    assert f"warning: skipping 1 empty class folder(s) under {data / 'train'}: empty" in proc.stderr
    assert (tmp_path / "out" / "checkpoint-last.pth").is_file()


def test_finetune_cli_rejects_an_empty_class_folder(two_classes, tmp_path):
    data = copy_tree(two_classes, tmp_path / "data")
    for split in ("train", "val"):  # in both splits, so only the empty-folder check can catch it
        (data / split / "empty").mkdir()
    proc = run_main("main_finetune.py", ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "3",
                                         "--num_workers", "0", "--log_dir", "", "--batch_size", "4", "--epochs", "1",
                                         "--data_path", data, "--output_dir", tmp_path / "out"])
    err = one_line_error(proc)
    assert err.startswith(f"error: empty class folder(s) {data / 'train' / 'empty'}: every class needs images")
