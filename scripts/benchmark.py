"""Benchmarks of MAE pretraining: the training step against a peer, and the data pipeline.

--mode step (default): the training step itself, engine.trainer.train_step, with the loss of
engine/pretrain.py (one optimizer step per iteration, no gradient accumulation), on any
pretraining model (MAE or MixMIM) / batch / precision / compile setting, CPU or CUDA:

    with autocast(amp):  loss = model(images, mask_ratio, noise)[0]     (engine.pretrain.mae_loss)
    scaler.scale(loss).backward(); scaler.unscale_(optimizer)           (GradScaler: on for fp16 only)
    grad_total_norm(params); scaler.step(optimizer); scaler.update()    (AdamW fused, engine.optim.adamw)
    optimizer.zero_grad(set_to_none=True)                               no host sync inside the step

Images are synthetic (built once) unless --data_path is given: then batches come from the
training loader (engine.data, --data_pipeline, --num_workers) and the share of the step spent
waiting for data is reported. With --peer, transformers' ViTMAEForPreTraining of the same
architecture (numerically the official model) is timed in the same process, interleaved
with ours (ours, peer, ours, peer, ... medians), in the official training loop: AdamW with
torch's default implementation, official NativeScaler (grad norm by torch.norm of norms),
loss.item() and a device synchronisation every step.

--mode loader: the training data pipeline in images/s per worker process on a folder of real
JPEGs: 'official' (torchvision ImageFolder + the official transform + DataLoader, as the
official main_pretrain.py), 'pil' (this engine's loader with the same PIL transform), 'uint8'
(this engine's default: decode to uint8, crop and flip on uint8, normalise on --device) and,
when asked for, 'device_decode' (decoding, crop and flip on --device in the consuming process),
interleaved, medians. The consumer moves each batch to --device and normalises it there.

    python scripts/benchmark.py --model mae_vit_base_patch16 --batch_size 8 --peer --json out.json
    python scripts/benchmark.py --model mae_vit_large_patch16 --batch_size 64 --amp bf16 --compile --peer
    python scripts/benchmark.py --mode loader --data_path data/sample --num_workers 1
    python scripts/benchmark.py --mode plan --model mae_vit_6p5b_patch14 --world_size 8 --dist_strategy fsdp \
        --amp bf16 --grad_ckpt --batch_size 32

--mode plan: per-rank memory of a pretraining run, for any --model / --batch_size / --world_size /
--dist_strategy (ddp, fsdp; --fsdp_shard_size for hybrid sharding) / --amp (none, bf16) / --grad_ckpt,
without the GPUs: parameter, gradient and AdamW-state bytes measured on the tensors a rank holds
(the model sharded on the meta device over a fake process group of --world_size ranks), activation
bytes of one step estimated from the tensors autograd saves (scripts/memory_plan.py says how),
and the largest per-GPU batch that fits each of --gpu_gb.

Reported: images/s and s/step (median over --repeats), analytic model FLOPs per step
(scripts/flops.py), achieved FLOP/s, a matmul peak measured in the same process on the same
device and dtype, MFU = achieved / measured peak, peak memory, a table and (--json) all of it.
"""
import os
import sys

# scripts/ is not a package: make the repo root importable when run as `python scripts/...`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, SCRIPTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

from engine.data import (  # noqa: E402
    DATA_FORMATS,
    LoaderSettings,
    ResumableSampler,
    ShardOrderSampler,
    open_source,
    pretrain_transform,
    to_model_input,
    train_loader,
)
from engine.distributed import DDPStrategy  # noqa: E402
from engine.model_factory import build_model  # noqa: E402
from engine.optim import adamw  # noqa: E402
from engine.precision import configure_backends, resolve_amp  # noqa: E402
from engine.pretrain import mae_loss  # noqa: E402
from engine.trainer import NonFiniteWatch, TrainingRun, train_step  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.meters import max_memory_mb  # noqa: E402

import memory_plan  # noqa: E402
from flops import (  # noqa: E402
    CpuShare,
    counted_forward_flops,
    device_name,
    mae_forward_flops_per_image,
    mae_train_flops,
    measure_matmul_peak,
    sync,
)

WEIGHT_DECAY = 0.05   # engine default (--weight_decay)
LR = 1.5e-4           # value irrelevant for speed; the official ViT-L blr
PIPELINES = ("official", "pil", "uint8", "device_decode")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "benchmark", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=["step", "loader", "plan"], default="step")
    parser.add_argument("--model", default="mae_vit_base_patch16", help="registered MAE model name")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step / per loader batch")
    parser.add_argument("--input_size", default=224, type=int, help="image size")
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="fraction of patches removed (default: the model's, 0.75 MAE / 0.5 MixMIM)")
    parser.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixel targets")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                        help="autocast precision (default as in training: bf16 on CUDA if supported, "
                             "else fp16; none on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (compiled in warm-up)")
    parser.add_argument("--peer", action="store_true",
                        help="also time transformers' ViTMAEForPreTraining in the official loop, interleaved")
    parser.add_argument("--peer_attention", choices=["sdpa", "eager"], default="sdpa",
                        help="the peer's attention: transformers' default (sdpa) or eager, the explicit "
                             "softmax(QK^T)V of the official code's timm 0.3 blocks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps (batches) before the first repeat")
    parser.add_argument("--iters", default=10, type=int, help="timed steps per repeat (loader mode: batches)")
    parser.add_argument("--repeats", default=3, type=int, help="timed repeats; the median is reported")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch.set_num_threads (default: leave torch's setting)")
    parser.add_argument("--data_path", default=None,
                        help="step mode: feed real batches from <data_path>/train; loader mode: the JPEG folder")
    parser.add_argument("--data_format", choices=DATA_FORMATS, default="auto",
                        help="what --data_path holds (folder, wds tar shards, hf dataset; auto: detected)")
    parser.add_argument("--data_pipeline", choices=["uint8", "device_decode", "pil"], default="uint8",
                        help="step mode with --data_path: the training data pipeline")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES[:3]),
                        help="loader mode: pipelines to compare")
    parser.add_argument("--num_workers", default=1, type=int, help="loader worker processes")
    parser.add_argument("--data_order", choices=["global", "shard"], default="global",
                        help="loader mode: the training order timed (shard: tar shards' shard-local order)")
    parser.add_argument("--shuffle_shards", default=4, type=int,
                        help="loader mode on tar shards: the shard-local order's window")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--world_size", nargs="+", default=[8], type=int,
                        help="plan mode: ranks (GPUs) of the run; several give a row each")
    parser.add_argument("--dist_strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp"],
                        help="plan mode: strategy; several give a row each")
    parser.add_argument("--fsdp_shard_size", default=0, type=int,
                        help="plan mode, fsdp: ranks per sharding group (0: all; fewer: hybrid sharding)")
    parser.add_argument("--grad_ckpt", action="store_true", help="plan mode: activation checkpointing per block")
    parser.add_argument("--gpu_gb", nargs="+", default=[40.0, 80.0], type=float,
                        help="plan mode: GPU memory sizes (GB) to fit the largest per-GPU batch to")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results to this file")
    return parser.parse_args(argv)


def check_args(args) -> torch.device:
    for name, least in (("batch_size", 1), ("input_size", 1), ("iters", 1), ("repeats", 1), ("warmup", 0),
                        ("num_workers", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if args.mode == "plan":
        for world in args.world_size:
            if world < 1:
                raise UserError(f"--world_size must be at least 1, got {world}")
            if args.fsdp_shard_size < 0 or world % (args.fsdp_shard_size or world):
                raise UserError(f"--fsdp_shard_size {args.fsdp_shard_size} does not divide --world_size "
                                f"{world}: give a divisor, or 0 to shard over all ranks")
        if args.amp == "fp16":
            raise UserError("--mode plan takes --amp none or bf16")
    if args.mode == "loader" and not args.data_path:
        raise UserError("--mode loader needs --data_path (a folder with train/<class>/*.jpg, e.g. data/sample)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device: use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {args.device!r}: only cuda and cpu are supported")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if args.compile and args.warmup < 1:
        print("# warning: --compile with --warmup 0: compilation falls in the first timed repeat", file=sys.stderr)
    return device


# --------------------------------------------------------------------------- the two training steps
class OurStep:
    """engine.trainer.train_step, the step the training loop runs, on a run as engine/pretrain.py
    builds it (wrapped by the same strategy), without accumulation."""

    def __init__(self, model, args, device, amp_dtype, batches: Optional[Callable] = None):
        strategy = DDPStrategy(device, compile=args.compile)
        optimizer = adamw(param_groups_weight_decay(model, WEIGHT_DECAY), LR, device, betas=(0.9, 0.95))
        self.run = TrainingRun(model=strategy.wrap(model), compute_loss=mae_loss(args.mask_ratio, device),
                               optimizer=optimizer, device=device, strategy=strategy, amp_dtype=amp_dtype,
                               scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))
        self.watch = NonFiniteWatch(device, epoch=0)
        self.batches, self.data_wait, self.it = batches, 0.0, 0
        self.loss = self.grad_norm = None

    def __call__(self):
        t0 = time.perf_counter()
        batch = self.batches()
        self.data_wait += time.perf_counter() - t0
        self.loss, self.grad_norm = train_step(self.run, batch, self.it, self.watch)
        self.it += 1


def peer_model(model, attention: str = "sdpa"):
    """transformers' ViTMAEForPreTraining with the architecture of our `model`."""
    try:
        import transformers
    except ImportError:
        raise UserError("--peer needs transformers: pip install -r requirements-dev.txt") from None
    enc, dec = model.blocks[0], model.decoder_blocks[0]
    cfg = transformers.ViTMAEConfig(
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_size, num_channels=model.in_chans,
        hidden_size=model.cls_token.shape[-1], num_hidden_layers=len(model.blocks),
        num_attention_heads=enc.attn.num_heads, intermediate_size=enc.mlp.fc1.out_features,
        decoder_hidden_size=model.mask_token.shape[-1], decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dec.attn.num_heads, decoder_intermediate_size=dec.mlp.fc1.out_features,
        layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, norm_pix_loss=model.norm_pix_loss, attn_implementation=attention)
    return transformers.ViTMAEForPreTraining(cfg)


class OfficialStep:
    """One step of the official main_pretrain.py / engine_pretrain.py loop on the peer model."""

    def __init__(self, peer, args, device, amp_dtype, images, num_patches: int):
        peer.config.mask_ratio = args.mask_ratio
        # The official optimizer: torch's default AdamW implementation (for-loop on CPU, foreach on CUDA).
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(peer, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        self.peer, self.device, self.images = peer, device, images
        self.num_patches = num_patches
        self.data_wait = 0.0

    def __call__(self):
        noise = torch.rand(self.images.shape[0], self.num_patches, device=self.device)
        with self.autocast:
            loss = self.peer(pixel_values=self.images, noise=noise).loss
        loss_value = loss.item()  # the official loop reads the loss (and checks it) every step
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.peer.parameters() if p.grad is not None]
        torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params]), 2.0)  # NativeScaler's norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        sync(self.device)
        return loss_value


def time_interleaved(steps: Dict[str, Callable], args, device) -> Dict[str, Dict]:
    """Warm up every step, then time `iters` steps of each in turn for `repeats` rounds."""
    out = {name: {"warmup_s": [], "step_s": [], "peak_mem_mb": 0.0} for name in steps}
    for name, step in steps.items():
        for _ in range(args.warmup):
            t0 = time.perf_counter()
            step()
            sync(device)
            out[name]["warmup_s"].append(time.perf_counter() - t0)
    cpu_share = CpuShare()
    for _ in range(args.repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step.data_wait = 0.0
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync(device)
            seconds = time.perf_counter() - t0
            out[name]["step_s"].append(seconds / args.iters)
            out[name].setdefault("data_wait_share", []).append(step.data_wait / seconds)
            out[name]["peak_mem_mb"] = max(out[name]["peak_mem_mb"], max_memory_mb(device))
    contention = cpu_share.stop()
    for r in out.values():
        r["cpu_contention"] = contention
    return out


def real_batches(args, model, device):
    """Batches of the training loader (as engine/pretrain.py builds it), endlessly."""
    folder = open_source(args.data_path, "train", data_format=args.data_format)
    feed = LoaderSettings(args.batch_size, args.seed, args.num_workers, device.type == "cuda")
    loader = train_loader(folder, pretrain_transform(args.input_size, args.data_pipeline), args.data_pipeline, feed,
                          noise_len=model.mask_noise_len, torch_rng_only=True)
    state = {"epoch": 0, "it": iter(())}

    def next_batch():
        while True:
            try:
                return next(state["it"])
            except StopIteration:
                loader.set_position(state["epoch"])
                state["epoch"] += 1
                state["it"] = iter(loader)
    return next_batch


def counted_train_flops(model, images, mask_ratio: float) -> int:
    """3 x torch's FLOP count of one forward pass (the model-FLOPs convention of mae_train_flops)."""
    return 3 * sum(counted_forward_flops(model, images, mask_ratio).values())


def run_step(args, device) -> Dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_backends(device)
    amp_dtype = resolve_amp(args.amp, device)
    compute_dtype = amp_dtype or torch.float32
    torch.manual_seed(args.seed)

    model = build_model(args.model, "pretrain", img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    vit_mae = model.plain_vit_mae  # the layout of scripts/flops.py's formulas and of transformers' ViTMAE
    if args.peer and not vit_mae:
        raise UserError(f"--peer: transformers has no {type(model).__name__}; the peer exists for ViT MAE models only")
    if args.mask_ratio is None:
        args.mask_ratio = model.default_mask_ratio
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")

    # The matmul peak first, before the models take memory.
    peak = measure_matmul_peak(device, compute_dtype)
    n, size = args.batch_size, args.input_size
    model.to(device).train(True)
    images = torch.randn(n, model.in_chans, size, size, device=device)
    if args.data_path:
        batches = real_batches(args, model, device)
    else:
        batches = lambda: (images, None, torch.rand(n, model.mask_noise_len, device=device))  # noqa: E731
    steps = {"ours": OurStep(model, args, device, amp_dtype, batches)}
    if args.peer:
        peer = peer_model(model, args.peer_attention).to(device).train(True)
        steps["peer"] = OfficialStep(peer, args, device, amp_dtype, images, model.mask_noise_len)
    timings = time_interleaved(steps, args, device)

    if vit_mae:
        flops_per_step = mae_train_flops(model, n, args.mask_ratio, size)
        breakdown = mae_forward_flops_per_image(model, args.mask_ratio, size)
    else:  # hierarchical models: torch's count of one forward pass (matmuls, convolutions, attention)
        flops_per_step = counted_train_flops(model, images, args.mask_ratio)
        breakdown = {"forward (FlopCounterMode)": flops_per_step // (3 * n)}
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[compute_dtype]
    if device.type == "cuda" and compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        dtype_name = "fp32 (tf32 matmul)"
    rows = []
    for name, t in timings.items():
        median = statistics.median(t["step_s"])
        achieved = flops_per_step / median
        rows.append({
            "impl": name if name == "ours" else "peer (transformers, official loop)",
            "model": args.model, "batch_size": n, "input_size": size, "mask_ratio": args.mask_ratio,
            "amp": "none" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
            "compile": bool(args.compile) and name == "ours", "device": device.type,
            "img_per_s": n / median, "s_per_step": median, "gflop_per_step": flops_per_step / 1e9,
            "achieved_tflop_per_s": achieved / 1e12, "peak_tflop_per_s_measured": peak["flops_per_s"] / 1e12,
            "mfu_percent": 100 * achieved / peak["flops_per_s"],
            "data_wait_percent": 100 * statistics.median(t["data_wait_share"]),
            "peak_mem_mb": t["peak_mem_mb"],
            "img_per_s_repeats": [n / s for s in t["step_s"]], "s_per_step_repeats": t["step_s"],
            "warmup_s_per_step": t["warmup_s"], "cpu_contention": t["cpu_contention"],
        })
    result = {
        "mode": "step", "rows": rows,
        "speedup_vs_peer": rows[0]["img_per_s"] / rows[1]["img_per_s"] if args.peer else None,
        "peer_attention": getattr(steps["peer"].peer.config, "_attn_implementation", None) if args.peer else None,
        "data": (f"{args.data_path} ({args.data_pipeline}, {args.num_workers} workers)" if args.data_path
                 else "synthetic"),
        "peak_mem_kind": ("torch.cuda.max_memory_allocated, per implementation" if device.type == "cuda"
                          else "process peak RSS (ru_maxrss), shared by both implementations"),
        "flops_source": "analytic (scripts/flops.py)" if vit_mae else "torch FlopCounterMode forward x 3 (math attention)",
        "forward_gflop_per_image": {k: v / 1e9 for k, v in breakdown.items()},
        "peak_matmul": {"size": peak["size"], "dtype": dtype_name, "op": peak["op"], "best_seconds": peak["seconds"]},
        "num_params": sum(p.numel() for p in model.parameters()),
        "last_loss": float(steps["ours"].loss.detach()),
        "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
    }
    return result


# --------------------------------------------------------------------------- the data pipeline
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


# --------------------------------------------------------------------------- memory planning
def run_plan(args) -> Dict:
    """Rank 0's memory of one training step (scripts/memory_plan.py), a row per strategy and world
    size: the state measured, the activations estimated once (they depend on neither)."""
    amp = torch.bfloat16 if args.amp == "bf16" else None
    kwargs = dict(img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    with torch.device("meta"):
        build_model(args.model, "pretrain", **kwargs)  # the registry's one-line errors for a bad name or size
    try:
        act = memory_plan.activation_bytes(args.model, kwargs, args.input_size, args.mask_ratio, amp, args.grad_ckpt)
    except ValueError as e:
        raise UserError(f"--model: {e}") from None
    per_image, per_step = act["activation_bytes_per_image"], act["activation_bytes_per_step"]
    gb, rows = memory_plan.GB, []
    for strategy in args.dist_strategy:
        for world in args.world_size:
            shard_size = args.fsdp_shard_size if strategy == "fsdp" else 0
            state = memory_plan.state_bytes(args.model, kwargs, world, strategy, shard_size)
            cache = memory_plan.autocast_cache_bytes(state["num_params"], amp, args.grad_ckpt, strategy)
            held = state["param_bytes"] + state["grad_bytes"] + state["optimizer_bytes"]
            fixed = held + state["ddp_bucket_bytes"] + state["fsdp_transient_bytes"] + cache
            rows.append({
                "dist_strategy": strategy, "world_size": world, "fsdp_shard_size": shard_size,
                # measured: rank 0's tensors
                "param_gb": state["param_bytes"] / gb, "grad_gb": state["grad_bytes"] / gb,
                "optimizer_gb": state["optimizer_bytes"] / gb, "state_gb": held / gb,
                # estimated
                "ddp_bucket_gb": state["ddp_bucket_bytes"] / gb, "fsdp_transient_gb": state["fsdp_transient_bytes"] / gb,
                "autocast_cache_gb": cache / gb, "fixed_gb": fixed / gb,
                "total_gb": (fixed + per_step + args.batch_size * per_image) / gb,
                "max_batch": {f"{g:g}": memory_plan.max_batch(fixed, per_step, per_image, g) for g in args.gpu_gb},
            })
    return {
        "mode": "plan", "rows": rows, "model": args.model, "num_params": state["num_params"],
        "amp": args.amp or "none", "grad_ckpt": args.grad_ckpt, "batch_size": args.batch_size,
        "input_size": args.input_size, "mask_ratio": act["mask_ratio"],
        "activation_gb_per_image": per_image / gb, "activation_gb_per_step": per_step / gb,
        "measured": "param_gb, grad_gb, optimizer_gb, state_gb: rank 0's local tensors (fully_shard on the meta "
                    "device over a fake process group for fsdp, the whole model for ddp; AdamW's state after "
                    "one step on them)",
        "estimated": "activations: bytes saved for backward on CPU (one encoder and one decoder block at batch "
                     "1 and 2, scaled to the depth); DDP buckets, FSDP unsharded buffers, autocast cache: "
                     "scripts/memory_plan.py",
        "usable_fraction": memory_plan.USABLE, "gpu_gb": args.gpu_gb,
    }


PLAN_COLUMNS = [("strategy", "dist_strategy", "{}"), ("ranks", "world_size", "{}"),
                ("params GB", "param_gb", "{:.2f}"), ("grads GB", "grad_gb", "{:.2f}"),
                ("AdamW GB", "optimizer_gb", "{:.2f}"), ("state GB", "state_gb", "{:.2f}"),
                ("buffers+cache GB", "extra_gb", "{:.2f}"), ("total GB", "total_gb", "{:.1f}")]


def print_plan(r: Dict) -> None:
    print(f"# {r['model']} ({r['num_params'] / 1e9:.2f}B parameters), amp {r['amp']}, grad_ckpt {r['grad_ckpt']}, "
          f"input {r['input_size']}, mask ratio {r['mask_ratio']}; rank 0 per GPU, batch {r['batch_size']}")
    rows = [{**row, "extra_gb": row["fixed_gb"] - row["state_gb"],
             **{f"fit {g}": b for g, b in row["max_batch"].items()}} for row in r["rows"]]
    fits = [(f"max batch {g} GB", f"fit {g}", "{}") for g in r["rows"][0]["max_batch"]]
    print(format_table(rows, PLAN_COLUMNS + fits))
    print(f"# measured: params, grads, AdamW (rank 0's sharded tensors). estimated: activations "
          f"{r['activation_gb_per_image']:.3f} GB per image + {r['activation_gb_per_step']:.2f} GB per step "
          f"(saved tensors on CPU), DDP buckets / FSDP unsharded buffers / autocast cache; max batch within "
          f"{r['usable_fraction']:.0%} of the GPU")


# --------------------------------------------------------------------------- output
STEP_COLUMNS = [  # (header, key, format)
    ("impl", "impl", "{}"), ("model", "model", "{}"), ("batch", "batch_size", "{}"), ("amp", "amp", "{}"),
    ("compile", "compile", "{}"), ("img/s", "img_per_s", "{:.2f}"), ("s/step", "s_per_step", "{:.3f}"),
    ("GFLOP/step", "gflop_per_step", "{:.1f}"), ("TFLOP/s", "achieved_tflop_per_s", "{:.3f}"),
    ("peak TFLOP/s", "peak_tflop_per_s_measured", "{:.3f}"), ("MFU %", "mfu_percent", "{:.1f}"),
    ("data wait %", "data_wait_percent", "{:.1f}"), ("peak mem MB", "peak_mem_mb", "{:.0f}"),
]
LOADER_COLUMNS = [("pipeline", "pipeline", "{}"), ("img/s", "img_per_s", "{:.1f}"),
                  ("img/s per worker", "img_per_s_per_worker", "{:.1f}"), ("x official", "vs_official", "{:.2f}")]
READ_COLUMNS = [("source", "source", "{}"), ("order", "order", "{}"), ("samples", "samples", "{:d}"),
                ("bytes/sample", "bytes_per_sample", "{:.0f}"), ("image bytes/sample", "image_bytes_per_sample", "{:.0f}"),
                ("seeks/sample", "seeks_per_sample", "{:.2f}"),
                ("opens/sample", "opens_per_sample", "{:.3f}")]


def format_table(rows: List[Dict], columns) -> str:
    cells = [[h for h, _, _ in columns]] + [["-" if r[k] is None else fmt.format(r[k]) for _, k, fmt in columns]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    text_cols = sum(1 for _, _, fmt in columns if fmt == "{}")
    lines = [" | ".join(c.ljust(w) if i < text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_contention(c: Dict, threads: int) -> str:
    if c["other_processes_cores"] is None:
        return ""
    busy = c["other_processes_cores"] + c["steal_cores"] > 0.1 * threads
    return (f"# cores used while timing: this process {c['own_cores']:.2f}, other processes "
            f"{c['other_processes_cores']:.2f}, hypervisor steal {c['steal_cores']:.2f}"
            + ("  WARNING: the CPU was shared; the numbers are low" if busy else ""))


def write_json(path: str, r: Dict) -> None:
    """--json: the results (nothing when path is empty)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
            f.write("\n")


def main(args) -> None:
    device = check_args(args)
    if args.mode == "plan":
        r = run_plan(args)
        r.update({"torch_version": torch.__version__, "command": shlex.join(["python"] + sys.argv),
                  "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        print_plan(r)
        write_json(args.json, r)
        return
    r = run_step(args, device) if args.mode == "step" else run_loader(args, device)
    r.update({"device": device.type, "device_name": device_name(device),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "torch_version": torch.__version__,
              "timm_version": timm.__version__, "python_version": platform.python_version(),
              "command": shlex.join(["python"] + sys.argv),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    print(f"# {r['device_name']} ({r['device']}, {r['threads']} threads), torch {r['torch_version']}, "
          f"timm {r['timm_version']}; {r['iters']} {'steps' if args.mode == 'step' else 'batches'} x "
          f"{r['repeats']} repeats after {r['warmup']} warm-up, interleaved, medians")
    if args.mode == "step":
        print(format_table(r["rows"], STEP_COLUMNS))
        if r["speedup_vs_peer"] is not None:
            print(f"# ours / peer: {r['speedup_vs_peer']:.2f}x (peer attention: {r['peer_attention']})")
        print(f"# data: {r['data']}; peak: {r['peak_matmul']['size']}^2 {r['peak_matmul']['dtype']} "
              f"{r['peak_matmul']['op']}; peak mem: {r['peak_mem_kind']}; final loss {r['last_loss']:.4f}")
        contention = r["rows"][0]["cpu_contention"]
    else:
        print(f"# {r['images']} images from {r['data_path']} ({r['data_order']} order), batch {r['batch_size']}, "
              f"{r['num_workers']} worker(s), input {r['input_size']}; consumer normalises on {r['device']}")
        print(format_table(r["rows"], LOADER_COLUMNS))
        print(format_table(r["reads"], READ_COLUMNS))
        contention = r["cpu_contention"]
    line = describe_contention(contention, r["threads"])
    if line:
        print(line)
    if args.json:
        write_json(args.json, r)
        print(f"# results written to {args.json}")


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args()))
