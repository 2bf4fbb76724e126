"""Build a small real classification set (ImageFolder train/ and val/) from the bundled photos.

    python scripts/make_sample_dataset.py OUT_DIR [--task color|photo] [--train_per_photo 6] ...

--task color: two classes, colour vs grayscale photos (an easy, separable task).
--task photo: one class per photo (14 classes): which photo is this random crop from.
Train and val hold different random crops of the same photos; crops are deterministic (--seed).
"""
import argparse
import os
import random
import sys
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "sample" / "train" / "photos"


def make_classification_set(root, task: str = "color", train_per_photo: int = 6, val_per_photo: int = 3,
                            size: int = 80, seed: int = 0) -> Path:
    """The last photo gives one val crop less, so the val set does not divide evenly by 2 processes."""
    root, rng = Path(root), random.Random(seed)
    photos = sorted(PHOTOS.glob("*.jpg"))
    for p in photos:
        img = Image.open(p)
        cls = p.stem if task == "photo" else ("gray" if img.mode == "L" else "color")
        for split, n in (("train", train_per_photo), ("val", val_per_photo - (p == photos[-1]))):
            out = root / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                side = rng.randint(min(img.size) // 3, min(img.size))
                x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
                img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC).save(out / f"{p.stem}_{k}.jpg")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--task", choices=["color", "photo"], default="color")
    parser.add_argument("--train_per_photo", type=int, default=6)
    parser.add_argument("--val_per_photo", type=int, default=3)
    parser.add_argument("--size", type=int, default=80, help="side of the saved crops in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        print(f"error: {args.out_dir} is not empty: choose a new folder", file=sys.stderr)
        return 2
    root = make_classification_set(args.out_dir, args.task, args.train_per_photo, args.val_per_photo, args.size,
                                   args.seed)
    for split in ("train", "val"):
        n = sum(len(files) for _, _, files in os.walk(root / split))
        print(f"{root / split}: {n} images in {len(os.listdir(root / split))} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
