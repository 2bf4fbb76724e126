"""--mode loader: the training data pipeline (official, pil, uint8, device_decode) in images/s,
and the read pattern of one epoch (benchmarks/benchmark.py says what is timed)."""
import statistics
import time
from typing import Dict

import torch

from benchmarks.flops import CpuShare, sync
from engine.data import (
    LoaderSettings,
    ResumableSampler,
    ShardOrderSampler,
    open_source,
    pretrain_transform,
    to_model_input,
    train_loader,
)
from util.errors import UserError

PIPELINES = ("official", "pil", "uint8", "device_decode")


def official_loader(args, folder):
    """The official main_pretrain.py data path: ImageFolder + its transform + a shuffling loader."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(folder.root, transform=pretrain_transform(args.input_size, "pil"))
    dataset.samples = folder.samples
    return torch.utils.data.DataLoader(dataset, sampler=torch.utils.data.RandomSampler(dataset),
                                       batch_size=args.batch_size, num_workers=args.num_workers,
                                       pin_memory=args.device.startswith("cuda"), drop_last=True)


class Cycled:
    """An image source repeated to `length` samples (sample i is source[i % len(source)])."""

    def __init__(self, source, length: int):
        self.source, self.length, self.root, self.classes = source, length, source.root, source.classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.source[i % len(self.source)]

    def name(self, i: int) -> str:
        return self.source.name(i % len(self.source))


def read_pattern(args, order: str) -> Dict:
    """One epoch of rank 0 of 2 processes read in this process, as the loader reads it: per sample,
    the bytes read (shards: counted at the file layer, tar headers and label members included;
    folders and HF datasets: the encoded image, which is at least what the file or the memory map
    gives), the reads that did not continue the previous one (seeks) and the shards opened."""
    source = open_source(args.data_path, "train", data_format=args.data_format)
    shards = hasattr(source, "shard_ranges")
    if order == "shard":
        source.open_shards = args.shuffle_shards
        sampler = ShardOrderSampler(source, source.shard_ranges, args.shuffle_shards, 2, 0, args.seed)
    else:
        sampler = ResumableSampler(source, 2, 0, args.seed)
    keys = [i for _, i in sampler]
    image_bytes = sum(len(source[i][0]) for i in keys)
    stats = source.stats.as_dict() if shards else {}
    n = len(keys)
    return {"source": type(source).__name__, "order": order, "samples": n,
            "bytes_per_sample": (stats["bytes"] if shards else image_bytes) / n,
            "image_bytes_per_sample": image_bytes / n,
            "seeks_per_sample": stats["seeks"] / n if shards else None,
            "opens_per_sample": stats["opens"] / n if shards else 1.0 if image_folder_like(source) else None,
            "shards": len(source.shards) if shards else None}


def image_folder_like(source) -> bool:
    return hasattr(source, "samples")


def run_loader(args, device) -> Dict:
    folder = open_source(args.data_path, "train", data_format=args.data_format)
    # Enough samples for warm-up and every repeat in one pass, so no epoch restarts are timed.
    need = args.batch_size * (args.warmup + args.iters + 1)
    n_images = len(folder)
    if image_folder_like(folder):
        folder.samples = (folder.samples * (need // len(folder.samples) + 1))[:max(need, len(folder.samples))]
    else:
        if args.data_order == "shard" and need > len(folder):
            raise UserError(f"--data_order shard times one epoch: {len(folder)} samples are fewer than the "
                            f"{need} needed; lower --iters or --batch_size")
        if args.data_order != "shard":
            folder = Cycled(folder, max(need, len(folder)))
        if "official" in args.pipelines:  # torchvision's ImageFolder reads folders only
            args.pipelines = [p for p in args.pipelines if p != "official"]
    num_patches = (args.input_size // 16) ** 2  # mask noise rows, as for a patch-16 MAE
    timings = {p: [] for p in args.pipelines}
    cpu_share = CpuShare()
    for _ in range(args.repeats):
        for pipeline in args.pipelines:
            if pipeline == "official":
                loader = official_loader(args, folder)
            else:
                loader = train_loader(folder, pretrain_transform(args.input_size, pipeline), pipeline,
                                      LoaderSettings(args.batch_size, args.seed, args.num_workers,
                                                     device.type == "cuda", order=args.data_order,
                                                     shuffle_shards=args.shuffle_shards),
                                      noise_len=num_patches, torch_rng_only=True)
            it = iter(loader)
            for _ in range(args.warmup + 1):  # worker start-up and the first batches
                next(it)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                x = to_model_input(next(it)[0], device)
            sync(device)
            timings[pipeline].append(args.iters * args.batch_size / (time.perf_counter() - t0))
            assert x.dtype == torch.float32
            del it, loader
    contention = cpu_share.stop()
    workers = max(args.num_workers, 1)
    rows = [{"pipeline": p, "img_per_s": statistics.median(v), "img_per_s_per_worker": statistics.median(v) / workers,
             "img_per_s_repeats": v} for p, v in timings.items()]
    base = timings.get("official")
    for r in rows:
        r["vs_official"] = r["img_per_s"] / statistics.median(base) if base else None
    reads = [read_pattern(args, "global")]
    if hasattr(getattr(folder, "source", folder), "shard_ranges"):
        reads.append(read_pattern(args, "shard"))
    return {"mode": "loader", "rows": rows, "num_workers": args.num_workers, "batch_size": args.batch_size,
            "input_size": args.input_size, "images": n_images, "data_path": args.data_path, "reads": reads,
            "data_order": args.data_order,
            "iters": args.iters, "repeats": args.repeats, "warmup": args.warmup,
            "cpu_contention": contention}



LOADER_COLUMNS = [("pipeline", "pipeline", "{}"), ("img/s", "img_per_s", "{:.1f}"),
                  ("img/s per worker", "img_per_s_per_worker", "{:.1f}"), ("x official", "vs_official", "{:.2f}")]
READ_COLUMNS = [("source", "source", "{}"), ("order", "order", "{}"), ("samples", "samples", "{:d}"),
                ("bytes/sample", "bytes_per_sample", "{:.0f}"), ("image bytes/sample", "image_bytes_per_sample", "{:.0f}"),
                ("seeks/sample", "seeks_per_sample", "{:.2f}"),
                ("opens/sample", "opens_per_sample", "{:.3f}")]
