"""The same images as an ImageFolder, as WebDataset shards and as a Hugging Face dataset."""
from pathlib import Path


def as_shards(folder: Path, out: Path, max_per_shard: int = 4, splits=None) -> Path:
    """scripts/make_shards.py of the folder (train, and val when it has one)."""
    from scripts import make_shards

    argv = ["--data_path", str(folder), "--out", str(out), "--max_per_shard", str(max_per_shard)]
    make_shards.main(make_shards.get_args_parser().parse_args(argv + (["--splits", *splits] if splits else [])))
    return out


def as_hf(folder: Path, out: Path, layout: str = "disk") -> Path:
    """The folder's splits as a DatasetDict (train, validation) with an Image and a ClassLabel
    column: save_to_disk (layout "disk") or parquet files in the Hub's layout (data/<split>-*.parquet)."""
    import datasets

    from engine.data import image_folder

    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        if not (folder / split).is_dir():
            continue
        src = image_folder(str(folder), split)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=src.classes)})
        rows = {"image": [{"bytes": src[i][0], "path": None} for i in range(len(src))], "label": src.targets}
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
    if layout == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(out))
    else:
        (out / "data").mkdir(parents=True)
        for name, ds in splits.items():
            ds.to_parquet(str(out / "data" / f"{name}-00000-of-00001.parquet"))
    return out
