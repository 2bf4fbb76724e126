"""The hostile inputs of tests/test_robustness.py, built once: damaged, empty, odd-mode and huge
images, link loops, broken shards and datasets, checkpoints of the wrong kind, model, version or
length. Kept apart from the table so that the table reads as a table."""
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch
from PIL import Image

from conftest import MINI, PHOTOS, make_image_folder, restored_process_state


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb to PIL) with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _folder(root: Path, files: dict) -> Path:
    cls = root / "train" / "cls"
    cls.mkdir(parents=True)
    for name, data in files.items():
        (cls / name).write_bytes(data)
    return root


def _odd_modes() -> dict:
    base = Image.open(sorted(PHOTOS.glob("*.jpg"))[0]).convert("RGB").resize((80, 64))
    out = {}
    for name, img, fmt in [("cmyk.jpg", base.convert("CMYK"), "JPEG"), ("i16.png", base.convert("I;16"), "PNG"),
                           ("p.png", base.convert("P"), "PNG"), ("rgba.png", base.convert("RGBA"), "PNG"),
                           ("la.png", base.convert("LA"), "PNG"), ("bw.png", base.convert("1"), "PNG"),
                           ("one_pixel.png", base.resize((1, 1)), "PNG"), ("tall.png", base.resize((4, 300)), "PNG"),
                           ("gray.jpg", base.convert("L"), "JPEG"), ("f.tiff", base.convert("F"), "TIFF")]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


def _shards(root: Path, labels, name: str = "train-000000.tar") -> Path:
    import webdataset as wds

    folder = root / "train"
    folder.mkdir(parents=True)
    jpg = sorted(PHOTOS.glob("*.jpg"))[0].read_bytes()
    with wds.TarWriter(str(folder / name), encoder=False, mtime=0) as w:
        for i, label in enumerate(labels):
            w.write({"__key__": f"{i:04d}", "jpg": jpg, "cls": str(label).encode()})
    shutil.copytree(folder, root / "val")
    return root


def _hf(root: Path, labels, label_feature=None) -> Path:
    import datasets

    jpg = sorted(PHOTOS.glob("*.jpg"))[0].read_bytes()
    features = datasets.Features({"image": datasets.Image(), "label": label_feature or datasets.Value("int64")})
    rows = {"image": [{"bytes": jpg, "path": None}] * len(labels), "label": list(labels)}
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(root))
    return root


def _pretrain_checkpoint(w: Path, data: Path) -> Path:
    from engine import pretrain

    import main_pretrain

    out = w / "run"
    args = main_pretrain.get_args_parser().parse_args(
        [*MINI, "--data_path", str(data), "--batch_size", "7", "--epochs", "1", "--output_dir", str(out)])
    with restored_process_state():
        pretrain.main(args)
    return out / "checkpoint-last.pth"


def _finetune_checkpoint(w: Path, data: Path) -> Path:
    from engine import finetune

    import main_finetune

    out = w / "ft_run"
    args = main_finetune.get_args_parser().parse_args(
        ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0", "--log_dir",
         "", "--warmup_epochs", "1", "--batch_size", "2", "--epochs", "1", "--data_path", str(data),
         "--output_dir", str(out)])
    with restored_process_state():
        finetune.main(args)
    return out / "checkpoint-last.pth"


def build(w: Path) -> Path:
    """Every input of the table under w."""
    good = make_image_folder(w / "good", size=64)
    jpgs = {p.name: p.read_bytes() for p in sorted((good / "train" / "photos").glob("*.jpg"))[:3]}
    loop = _folder(w / "loop", jpgs)
    os.symlink("..", loop / "train" / "cls" / "up")
    os.symlink(".", loop / "train" / "cls" / "self")
    _folder(w / "garbage", {f"{i}.jpg": b"this is not a jpeg" for i in range(3)})
    _folder(w / "zero", {f"{i}.jpg": b"" for i in range(3)})
    _folder(w / "bomb", {f"{i}.png": _png_claiming(40000, 40000) for i in range(3)})
    _folder(w / "modes", _odd_modes())
    dangling = _folder(w / "dangling", {})
    for i in range(3):
        os.symlink("/nonexistent/x.jpg", dangling / "train" / "cls" / f"{i}.jpg")
    _folder(w / "no_ext", {f"{i}.txt": b"x" for i in range(3)})
    shutil.copytree(good / "train" / "photos", w / "unicode" / "train" / "ç l ä s s")
    nested = w / "deep" / "train" / "cls"
    nested.mkdir(parents=True)
    for k, (n, b) in enumerate(jpgs.items()):
        d = nested / "/".join(["d"] * (k * 20 + 1))
        d.mkdir(parents=True)
        (d / n).write_bytes(b)
    _shards(w / "wds_text", ["cat", "dog", "cat"])
    _shards(w / "wds_big", [0, 1, 7, 1])
    from scripts import make_shards
    shutil.copytree(w / "wds_big", w / "wds_big_indexed")
    make_shards.main(make_shards.get_args_parser().parse_args(["--index", str(w / "wds_big_indexed")]))
    _shards(w / "wds_neg", [-1, 0, 1, 0])
    notar = w / "wds_notar" / "train"
    notar.mkdir(parents=True)
    (notar / "train-000000.tar").write_text("not a tar at all")
    trunc = _shards(w / "wds_trunc", [0, 1, 0, 1])
    for split in ("train", "val"):
        t = trunc / split / "train-000000.tar"
        t.write_bytes(t.read_bytes()[:2048])
    (w / "wds_empty" / "train").mkdir(parents=True)
    (w / "wds_empty" / "train" / "train-000000.tar").write_bytes(b"")
    import datasets
    _hf(w / "hf_text", ["cat", "dog", "cat"], datasets.Value("string"))
    _hf(w / "hf_big", [0, 1, 9])
    _hf(w / "hf_class", [0, 1, 1], datasets.ClassLabel(names=["a", "b"]))
    (w / "hf_broken").mkdir()
    (w / "hf_broken" / "dataset_dict.json").write_text("{not json")
    (w / "hf_parquet_bad" / "train").mkdir(parents=True)
    (w / "hf_parquet_bad" / "train" / "x.parquet").write_bytes(b"PAR1 but no more")

    ckpt = _pretrain_checkpoint(w, good)
    (w / "ckpt").mkdir()
    shutil.copy(ckpt, w / "ckpt" / "good.pth")
    raw = ckpt.read_bytes()
    (w / "ckpt" / "half.pth").write_bytes(raw[: len(raw) // 2])
    (w / "ckpt" / "text.pth").write_text("hello\n")
    (w / "ckpt" / "zero.pth").write_bytes(b"")
    (w / "ckpt" / "list.pth").write_bytes(b"")
    torch.save([1, 2, 3], w / "ckpt" / "list.pth")
    torch.save({"weights": 1}, w / "ckpt" / "nomodel.pth")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    future = dict(state, format_version=999) if "format_version" in state else dict(state, version=999)
    torch.save(future, w / "ckpt" / "future.pth")
    other = dict(state, model={k: v[..., :1] if v.ndim else v for k, v in state["model"].items()})
    torch.save(other, w / "ckpt" / "other_shapes.pth")
    import models
    clf = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=True)
    torch.save({"model": clf.state_dict()}, w / "ckpt" / "classifier.pth")
    shutil.copy(_finetune_checkpoint(w, w / "hf_class"), w / "ckpt" / "finetuned.pth")
    (w / "ckpt" / "adir").mkdir()
    (w / "a_file").write_text("x")
    return w
