"""A Hugging Face dataset on local disk as an indexed image source: HFSource[i] -> (encoded image,
label), read with `datasets`.

Layouts: a `save_to_disk` folder (a DatasetDict with train / validation (or val) splits, or a
single Dataset, used as the train split), or parquet files per split (<root>/<split>/*.parquet,
<root>/data/<split>-*.parquet as on the Hub, or <root>/*<split>*.parquet), loaded with
load_dataset("parquet", data_files=...) (which converts them once into its arrow cache,
HF_DATASETS_CACHE). The image column is cast to Image(decode=False), so a row gives the encoded
bytes and decoding stays in the loader's pipelines (uint8, device_decode).
"""
import glob
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from util.errors import UserError
from util.walk import find_files, walk_once

IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_NAMES = ("label", "labels", "cls")
VAL_NAMES = ("validation", "val")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("reading a Hugging Face dataset needs datasets: pip install 'datasets>=5.2' "
                        "(see requirements.txt)") from None
    datasets.utils.logging.disable_progress_bar()
    return datasets


def is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def _token(split: str) -> re.Pattern:
    return re.compile(rf"(^|[-_.]){re.escape(split)}([-_.]|$)")


def parquet_files(root: str, split: str) -> List[str]:
    names = VAL_NAMES if split in VAL_NAMES else (split,)
    for n in names:
        for folder in (os.path.join(root, n), os.path.join(root, "data", n)):
            files = find_files(folder, (".parquet",)) if os.path.isdir(folder) else []
            if files:
                return files
        for folder in (os.path.join(root, "data"), root):
            files = [f for f in sorted(glob.glob(os.path.join(folder, "*.parquet")))
                     if _token(n).search(os.path.basename(f))]
            if files:
                return files
    return []


def has_parquet(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".parquet") for _, _, files in walk_once(path, hidden=False)
                                       for f in files)


def _load(data_path: str, split: str):
    """(the split's datasets.Dataset, a name for messages)."""
    datasets = _datasets()
    if is_saved_dataset(data_path):
        try:
            loaded = datasets.load_from_disk(data_path)
        except Exception as e:  # datasets raises IndexError for an empty split, OSError, ValueError, ...
            raise UserError(f"--data_path {data_path} cannot be loaded with datasets.load_from_disk "
                            f"({type(e).__name__}: {e}; an empty split cannot be loaded either): save it again "
                            "with save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            names = VAL_NAMES if split in VAL_NAMES else (split,)
            found = next((n for n in names if n in loaded), None)
            if found is None:
                raise UserError(f"the dataset {data_path} has no '{split}' split (it has: {', '.join(loaded)}): "
                                f"save a DatasetDict with a {' or '.join(names)} split")
            return loaded[found], f"{data_path}[{found}]"
        if split != "train":
            raise UserError(f"the dataset {data_path} is a single Dataset, used as the train split; "
                            f"'{split}' needs a DatasetDict with a {split} split (save_to_disk of a DatasetDict)")
        return loaded, data_path
    files = parquet_files(data_path, split)
    if not files:
        raise UserError(f"no parquet files of the '{split}' split under {data_path}: expected "
                        f"{data_path}/{split}/*.parquet or {data_path}/data/{split}-*.parquet")
    import pyarrow.parquet as pq  # datasets' own dependency

    try:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
        raise UserError(f"{files[0]} (or another parquet file of the '{split}' split) cannot be read "
                        f"({type(e).__name__}: {e}): check or re-write it") from None
    if rows == 0:
        raise UserError(f"the '{split}' split under {data_path} is empty: its {len(files)} parquet file(s) hold no "
                        "rows; point --data_path at a dataset with images")
    try:
        return datasets.load_dataset("parquet", data_files={split: files}, split=split), \
            f"{os.path.dirname(files[0])} ({split}, {len(files)} parquet files)"
    except Exception as e:  # pyarrow and datasets raise many types for a damaged file
        raise UserError(f"the parquet files of the '{split}' split under {data_path} cannot be read "
                        f"({type(e).__name__}: {e}): check or re-write them") from None


def _pick(features, given: Optional[str], kind, names, flag: str, what: str, where: str,
          required: bool) -> Optional[str]:
    columns = list(features)
    if given:
        if given not in features:
            raise UserError(f"{where} has no column '{given}' (columns: {', '.join(columns)}): pass the "
                            f"{what} column with {flag}")
        return given
    typed = [c for c in columns if isinstance(features[c], kind)]
    if typed:
        return typed[0]
    named = next((c for c in columns if c.lower() in names), None)
    if named is None and required:
        raise UserError(f"{where} has no {what} column (columns: {', '.join(columns)}; looked for a "
                        f"{kind.__name__} feature or {'/'.join(names)}): name it with {flag}")
    return named


def _holds_images(feature, datasets) -> bool:
    """What cast_column(Image(decode=False)) takes: an Image, encoded bytes, file paths, or the
    {bytes, path} struct an Image column is stored as."""
    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary", "string", "large_string")
    return isinstance(feature, dict) and set(feature) <= {"bytes", "path"} and bool(feature)


def _check_columns(dataset, where: str, image: str, label: Optional[str], datasets) -> None:
    """The image column must hold images, and the label column class indices: both known from the
    features before the first step."""
    features = dataset.features
    if not _holds_images(features[image], datasets):
        holding = [c for c in features if _holds_images(features[c], datasets)]
        raise UserError(f"--image_column {image}: the column '{image}' of {where} holds {features[image]}, not images; "
                        f"the columns that hold images: {', '.join(holding) or 'none'}"
                        + (f": pass --image_column {holding[0]}" if holding else ""))
    if isinstance(features[image], datasets.Value) and features[image].dtype in ("string", "large_string") \
            and len(dataset):
        # Text (captions, names) would pass as paths and fail one row at a time: the first must be a file.
        first = dataset.data.column(image)[0].as_py()
        if not (first and os.path.isfile(first)):
            holding = [c for c in features if c != image and _holds_images(features[c], datasets)]
            raise UserError(f"--image_column {image}: the column '{image}' of {where} holds text whose first value "
                            f"{first!r:.60} is not an image file; the other columns that may hold images: "
                            f"{', '.join(holding) or 'none'}: pass the column of images or image file paths "
                            "with --image_column")
    if label is None or isinstance(features[label], datasets.ClassLabel):
        return
    dtype = features[label].dtype if isinstance(features[label], datasets.Value) else None
    if dtype is None or not dtype.startswith(("int", "uint")):
        seen = f" (the first label is {repr(dataset.data.column(label)[0].as_py())[:40]})" if dtype else ""
        raise UserError(f"the label column '{label}' of {where} holds {dtype or type(features[label]).__name__}{seen}, "
                        f"not class indices: map the names to indices 0..N-1, e.g. dataset.class_encode_column('{label}') "
                        "and save_to_disk (the ClassLabel names are then the run's class list), or name the label "
                        "column with --label_column")


def _label_range(dataset, label: Optional[str]) -> Optional[Tuple[int, int]]:
    """(lowest, highest) label of an integer label column, read once from arrow (a ClassLabel's
    range is its names)."""
    if label is None:
        return None
    import pyarrow.compute as pc  # datasets' own dependency

    bounds = pc.min_max(dataset.data.column(label))
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    return None if high is None else (int(low), int(high))


class HFSource:
    """Rows of a datasets.Dataset: source[i] is (the image column's encoded bytes, the label
    column's int; 0 without a label column)."""

    def __init__(self, dataset, root: str, image_column: str, label_column: Optional[str], classes: List[str]):
        datasets = _datasets()
        keep = [image_column] + ([label_column] if label_column else [])
        self.data = dataset.select_columns(keep).cast_column(image_column, datasets.Image(decode=False))
        self.root, self.image_column, self.label_column, self.classes = root, image_column, label_column, classes
        self.label_range = _label_range(self.data, label_column)  # checked against --nb_classes up front

    def __len__(self) -> int:
        return len(self.data)

    @property
    def targets(self) -> Optional[List[int]]:
        """Every row's label, read from arrow with no image touched (as a folder lists its
        targets); None without a label column, or when one is missing (reading that row names it)."""
        if not self.label_column:
            return None
        labels = np.asarray(self.data.select_columns([self.label_column]).with_format("numpy")[:][self.label_column])
        return labels.astype(np.int64).tolist() if np.issubdtype(labels.dtype, np.integer) else None

    def __getitem__(self, index: int) -> Tuple[bytes, int]:
        row = self.data[index]
        image = row[self.image_column]
        if image is None or (image.get("bytes") is None and not image.get("path")):
            raise ValueError(f"row {index} has no image in column '{self.image_column}'")
        data = image["bytes"]
        if data is None:  # an Image feature may store a path instead of the bytes
            with open(image["path"], "rb") as f:
                data = f.read()
        label = row[self.label_column] if self.label_column else 0
        if label is None:
            raise ValueError(f"row {index} has no label in column '{self.label_column}'")
        return data, int(label)

    def name(self, index: int) -> str:
        return f"{self.root} row {index}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, {len(self)} rows, {len(self.classes)} classes)"


def hf_source(data_path: str, split: str, need_labels: bool, image_column: Optional[str] = None,
              label_column: Optional[str] = None, num_classes: int = 1) -> HFSource:
    """The `split` of the dataset at --data_path, its image and label columns detected (datasets'
    Image / ClassLabel features, else the usual names) or given; one-line errors for a missing
    split or column and an empty split."""
    datasets = _datasets()
    dataset, where = _load(data_path, split)
    features = dataset.features
    image = _pick(features, image_column, datasets.Image, IMAGE_NAMES, "--image_column", "image", where, True)
    label = _pick(features, label_column, datasets.ClassLabel, LABEL_NAMES, "--label_column", "label", where,
                  need_labels)
    if len(dataset) == 0:
        raise UserError(f"{where} has no rows: the '{split}' split is empty; point --data_path at a dataset "
                        "with images")
    _check_columns(dataset, where, image, label if need_labels else None, datasets)
    if label and isinstance(features[label], datasets.ClassLabel):
        classes = list(features[label].names)
    else:
        classes = [str(c) for c in range(num_classes if need_labels else 1)]  # numbered, as for shards
    return HFSource(dataset, where, image, label if need_labels else None, classes)
