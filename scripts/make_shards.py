"""Write any image source (an ImageFolder, tar shards, a Hugging Face dataset) as WebDataset tar
shards that --data_path reads, with the index the reader needs; or check shards written so.

    python scripts/make_shards.py --data_path /data/imagenet --out /data/in1k-shards --shard_size_mb 1000
    python scripts/make_shards.py --data_path /data/imagenet --out /data/in1k-shards --check
    python scripts/make_shards.py --index /data/in22k          # index shards written elsewhere (all .tar below)

Per split (train, val: those the source has): <out>/<split>/<split>-000000.tar, ... written with
webdataset's ShardWriter, a sample per source sample in the source's order (key = its index,
zero-padded; members <key>.<jpg|png|webp> with the encoded bytes as they are, and <key>.cls with
the label); beside them each shard's wids tar index (<shard>.tar.index: the member offsets, so a
shard opens without scanning its headers) and the wids shard index shardindex.json (sample
counts and sizes, which the reader needs to address samples and to detect truncated shards);
<out>/classes.txt names the labels. The output is deterministic: the same input gives
byte-identical files (fixed member order, mtime 0, uid/gid 0, fixed user/group names; ShardWriter
takes them as options, so no tar writing of our own). Images that are neither JPEG, PNG nor WebP
(BMP, TIFF, ...) are stored as PNG (lossless), since the readers take those three.

--check reads every shard back through the training reader and compares it, sample by sample,
with the source: count, label, and the image bytes (decoded pixels for re-encoded images).
"""
import argparse
import io
import json
import os
import re
import sys
import tarfile
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from engine.data import DATA_FORMATS, open_source
from engine.data.shards import CLASSES_FILE, SHARD_INDEX, expand_pattern
from util.cli import run_cli
from util.errors import UserError
from util.walk import find_files

SPLITS = ("train", "val")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", help="the source: an ImageFolder root, tar shards or a Hugging Face dataset")
    parser.add_argument("--data_format", choices=DATA_FORMATS, default="auto")
    parser.add_argument("--image_column", default=None, help="hf: the image column (default: detected)")
    parser.add_argument("--label_column", default=None, help="hf: the label column (default: detected)")
    parser.add_argument("--no_labels", action="store_true", help="write no .cls members (images only)")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to write (default: train, and val when the source has it)")
    parser.add_argument("--out", help="output folder (<out>/<split>/<split>-NNNNNN.tar)")
    parser.add_argument("--shard_size_mb", type=float, default=1000.0, help="target shard size in MB")
    parser.add_argument("--max_per_shard", type=int, default=100000, help="at most this many samples per shard")
    parser.add_argument("--check", action="store_true", help="verify --out against --data_path instead of writing")
    parser.add_argument("--index", metavar="SHARDS", default=None,
                        help="only write the indexes (shardindex.json, <shard>.tar.index) of existing shards: a "
                             "folder (every .tar below it) or a brace pattern")
    return parser


def image_member(data: bytes) -> Tuple[str, bytes]:
    """(member extension, bytes): JPEG, PNG and WebP as they are, anything else as PNG."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg", data
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", data
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.save(out, format="PNG")
    return "png", out.getvalue()


def _read_tar(path: str) -> Tuple[List[str], Optional[List[int]]]:
    """(member names, [lowest, highest] label of its .cls members or None when it has none or one is
    not an integer) of a whole tar file; UserError for a file that is not one or was cut short.

    tarfile stops without a word at a header the file ends inside, and wids indexes a member whose
    data runs past the end: a whole archive ends with the all-zero end-of-archive block right after
    its last member, and nothing else does."""
    names, labels, size = [], [], os.path.getsize(path)
    try:
        with tarfile.open(path, mode="r:") as tar:  # "r:" not "r": a non-tar then fails once, in one line
            for member in tar:
                if member.isfile():
                    names.append(member.name)
                    if member.offset_data + member.size > size:
                        break
                    if member.name.endswith(".cls") and labels is not None:
                        text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                        labels = labels + [int(text)] if re.fullmatch(r"-?[0-9]+", text) else None
            else:
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(512) == bytes(512):
                    return names, [min(labels), max(labels)] if labels else None
    except (tarfile.TarError, EOFError, OSError) as e:
        if not names:
            raise UserError(f"--index: {path} is not a tar file ({type(e).__name__}: {e}): remove it from the "
                            "folder or copy the shard again") from None
    raise UserError(f"--index: {path} is truncated ({size} bytes, cut after {len(names)} member(s)): copy the shard "
                    "again or rebuild it with scripts/make_shards.py")


def write_index(shards: List[str]) -> None:
    """wids's tar index beside each shard, and the wids shard index (shardindex.json) per folder,
    each entry with the shard's label range when its labels are integers (the readers check it
    against --nb_classes before training); every shard is checked first, so a bad one leaves no
    index written."""
    from wids.wids import group_by_key
    from wids.wids_tar import TarFileReader

    read = [_read_tar(path) for path in shards]
    by_folder = {}
    for path, (names, labels) in zip(shards, read):
        if os.path.exists(path + ".index"):
            os.remove(path + ".index")  # TarFileReader loads an existing one; rebuild it from this file
        TarFileReader(path, index_file=path + ".index", verbose=False).close()
        entry = {"url": os.path.basename(path), "nsamples": len(group_by_key(names)), "filesize": os.path.getsize(path)}
        if labels is not None:
            entry["label_range"] = labels
        by_folder.setdefault(os.path.dirname(os.path.abspath(path)), []).append(entry)
    for folder, entries in by_folder.items():
        spec = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": os.path.basename(folder),
                "shardlist": sorted(entries, key=lambda e: e["url"])}
        with open(os.path.join(folder, SHARD_INDEX), "w") as f:
            json.dump(spec, f, indent=2)
            f.write("\n")


def _source_folder(data_path: str) -> str:
    """The real folder a source lives in: the folder itself, or the fixed head of a shard pattern."""
    if os.path.isdir(data_path):
        return os.path.realpath(data_path)
    head = data_path
    for c in "{*?[":
        head = head.split(c)[0]
    return os.path.realpath(os.path.dirname(head) or ".")


def _check_out(data_path: str, out: str, splits: List[str]) -> None:
    """Shards written inside their source would be read back as source data by the next run (and
    writing clears old shards out of <out>/<split>): refuse an --out that overlaps the source."""
    src, dst = _source_folder(data_path), os.path.realpath(out)
    inside = os.path.commonpath([src, dst]) == src
    holds = any(os.path.commonpath([src, os.path.join(dst, s)]) == os.path.join(dst, s) for s in splits)
    if inside or holds:
        where = "is the source folder" if src == dst else ("is inside the source folder" if inside
                                                              else "would overwrite the source")
        raise UserError(f"--out {out} {where} {data_path}: the shards would be written among the data they are "
                        "made from; give an --out outside --data_path")


def _sources(args, check: bool):
    """(split, source) of each split to write; val only when the source has one, unless asked."""
    out = []
    for split in args.splits or SPLITS:
        try:
            out.append((split, open_source(args.data_path, split, data_format=args.data_format,
                                           need_labels=not args.no_labels, allow_empty_classes=False,
                                           image_column=args.image_column, label_column=args.label_column)))
        except UserError as e:
            if args.splits or split == "train":
                raise
            print(f"# no {split} split in {args.data_path} ({e}); not {'checked' if check else 'written'}")
    return out


def write_split(source, split: str, out: str, shard_bytes: float, max_per_shard: int, labels: bool) -> List[str]:
    import webdataset as wds

    folder = os.path.join(out, split)
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # a smaller rewrite must not leave shards of the last one
        if old.endswith((".tar", ".tar.index")) or old == SHARD_INDEX:
            os.remove(os.path.join(folder, old))
    written: List[str] = []
    width = max(8, len(str(len(source))))
    with wds.ShardWriter(os.path.join(folder, f"{split}-%06d.tar"), maxcount=max_per_shard, maxsize=shard_bytes,
                         post=written.append, verbose=0, encoder=False, mtime=0, user="", group="",
                         mode=0o444) as sink:
        for i in range(len(source)):
            raw, label = source[i]
            ext, data = image_member(raw)
            sample = {"__key__": f"{i:0{width}d}", ext: data}
            if labels:
                sample["cls"] = str(int(label)).encode("ascii")
            sink.write(sample)
    write_index(written)
    return written


def check_split(source, split: str, out: str, labels: bool) -> Optional[str]:
    """None when <out>/<split> holds exactly the source's samples, else what differs."""
    shards = open_source(out, split, data_format="wds", need_labels=labels,
                         num_classes=max(len(source.classes), 1))
    if len(shards) != len(source):
        return f"{split}: {len(shards)} samples in the shards, {len(source)} in the source"
    for i in range(len(source)):
        raw, label = source[i]
        got, got_label = shards[i]
        if labels and got_label != label:
            return f"{split}: sample {i} ({source.name(i)}) has label {got_label} in the shards, {label} in the source"
        if got != raw and image_member(raw)[1] != got:
            return f"{split}: the image of sample {i} ({source.name(i)}) differs"
        if got != raw:  # re-encoded as PNG: the pixels must be equal
            with Image.open(io.BytesIO(raw)) as a, Image.open(io.BytesIO(got)) as b:
                if not np.array_equal(np.asarray(a), np.asarray(b)):
                    return f"{split}: the pixels of sample {i} ({source.name(i)}) differ"
    return None


def main(args) -> None:
    if args.index:
        shards = find_files(args.index, (".tar",)) if os.path.isdir(args.index) else expand_pattern(args.index)
        if not shards or not all(os.path.isfile(s) for s in shards):
            raise UserError(f"--index {args.index}: no .tar files there (or some of the pattern are missing)")
        write_index(shards)
        print(f"# indexed {len(shards)} shards of {args.index}")
        return
    if not args.data_path or not args.out:
        raise UserError("give --data_path (the source) and --out (the shard folder), or --index SHARDS")
    if args.shard_size_mb <= 0 or args.max_per_shard < 1:
        raise UserError("--shard_size_mb must be positive and --max_per_shard at least 1")
    labels = not args.no_labels
    if not args.check:
        _check_out(args.data_path, args.out, args.splits or list(SPLITS))
    splits = _sources(args, args.check)
    if args.check:
        problems = [p for split, source in splits if (p := check_split(source, split, args.out, labels))]
        if problems:
            raise UserError(f"{args.out} does not match {args.data_path}: {problems[0]}")
        print(f"# {args.out} matches {args.data_path}: " + ", ".join(f"{s} {len(src)} samples" for s, src in splits))
        return
    classes = splits[0][1].classes
    for split, source in splits:
        if source.classes != classes:
            raise UserError(f"the classes of {split} differ from those of {splits[0][0]}: each split needs the "
                            "same class list")
        written = write_split(source, split, args.out, args.shard_size_mb * 1e6, args.max_per_shard, labels)
        print(f"# {split}: {len(source)} samples in {len(written)} shards under {os.path.join(args.out, split)}")
    with open(os.path.join(args.out, CLASSES_FILE), "w") as f:
        f.write("".join(c + "\n" for c in classes))


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
