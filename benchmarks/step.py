"""--mode step: engine.trainer.train_step against transformers' ViTMAE in the official loop
(benchmarks/benchmark.py says what is timed and reported)."""
import argparse
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from timm.optim import param_groups_weight_decay

from benchmarks.flops import (
    CpuShare,
    counted_forward_flops,
    mae_forward_flops_per_image,
    mae_train_flops,
    measure_matmul_peak,
    sync,
)
from engine.data import LoaderSettings, open_source, pretrain_transform, train_loader
from engine.distributed import DDPStrategy
from engine.launch.watchdog import Watchdog
from engine.model_factory import build_model
from engine.optim import adamw
from engine.precision import configure_backends, resolve_amp
from engine.pretrain import mae_loss
from engine.trainer import NonFiniteWatch, TrainingRun, train_step
from util.errors import UserError
from util.meters import max_memory_mb

WEIGHT_DECAY = 0.05   # engine default (--weight_decay)
LR = 1.5e-4           # value irrelevant for speed; the official ViT-L blr


class OurStep:
    """engine.trainer.train_step, the step the training loop runs, on a run as engine/pretrain.py
    builds it (wrapped by the same strategy), without accumulation."""

    def __init__(self, model, args, device, amp_dtype, batches: Optional[Callable] = None,
                 watchdog: Optional[Watchdog] = None):
        strategy = DDPStrategy(device, compile=args.compile)
        optimizer = adamw(param_groups_weight_decay(model, WEIGHT_DECAY), LR, device, betas=(0.9, 0.95))
        self.run = TrainingRun(model=strategy.wrap(model), compute_loss=mae_loss(args.mask_ratio, device),
                               optimizer=optimizer, device=device, strategy=strategy, amp_dtype=amp_dtype,
                               scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))
        self.watch = NonFiniteWatch(device, epoch=0)
        self.batches, self.data_wait, self.it = batches, 0.0, 0
        self.watchdog = watchdog  # told of every step, as the epoch loop tells it (train_one_epoch)
        self.loss = self.grad_norm = None

    def __call__(self):
        t0 = time.perf_counter()
        batch = self.batches()
        self.data_wait += time.perf_counter() - t0
        self.loss, self.grad_norm = train_step(self.run, batch, self.it, self.watch)
        if self.watchdog is not None:
            self.watchdog.step_done()
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
    vit_mae = model.plain_vit_mae  # the layout of benchmarks/flops.py's formulas and of transformers' ViTMAE
    if args.peer and not vit_mae:
        raise UserError(f"--peer: transformers has no {type(model).__name__}; the peer exists for ViT MAE models only")
    if args.mask_ratio is None:  # the model's default, in a copy: the caller's flags stay as parsed
        args = argparse.Namespace(**{**vars(args), "mask_ratio": model.default_mask_ratio})
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
    watchdog = None
    if args.watchdog:
        # The same model and work, with the hang watchdog's thread running (its training defaults).
        watchdog = Watchdog("", 0, None, startup_timeout_s=1200).start()
        steps["ours + watchdog"] = OurStep(model, args, device, amp_dtype, batches, watchdog=watchdog)
    try:
        timings = time_interleaved(steps, args, device)
    finally:
        if watchdog is not None:
            watchdog.stop()

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
            "impl": {"peer": "peer (transformers, official loop)"}.get(name, name),
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
        "watchdog_overhead_percent": (100 * (rows[-1]["s_per_step"] / rows[0]["s_per_step"] - 1)
                                      if args.watchdog else None),
        "peer_attention": getattr(steps["peer"].peer.config, "_attn_implementation", None) if args.peer else None,
        "data": (f"{args.data_path} ({args.data_pipeline}, {args.num_workers} workers)" if args.data_path
                 else "synthetic"),
        "peak_mem_kind": ("torch.cuda.max_memory_allocated, per implementation" if device.type == "cuda"
                          else "process peak RSS (ru_maxrss), shared by both implementations"),
        "flops_source": "analytic (benchmarks/flops.py)" if vit_mae else "torch FlopCounterMode forward x 3 (math attention)",
        "forward_gflop_per_image": {k: v / 1e9 for k, v in breakdown.items()},
        "peak_matmul": {"size": peak["size"], "dtype": dtype_name, "op": peak["op"], "best_seconds": peak["seconds"]},
        "num_params": sum(p.numel() for p in model.parameters()),
        "last_loss": float(steps["ours"].loss.detach()),
        "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
    }
    return result



STEP_COLUMNS = [  # (header, key, format)
    ("impl", "impl", "{}"), ("model", "model", "{}"), ("batch", "batch_size", "{}"), ("amp", "amp", "{}"),
    ("compile", "compile", "{}"), ("img/s", "img_per_s", "{:.2f}"), ("s/step", "s_per_step", "{:.3f}"),
    ("GFLOP/step", "gflop_per_step", "{:.1f}"), ("TFLOP/s", "achieved_tflop_per_s", "{:.3f}"),
    ("peak TFLOP/s", "peak_tflop_per_s_measured", "{:.3f}"), ("MFU %", "mfu_percent", "{:.1f}"),
    ("data wait %", "data_wait_percent", "{:.1f}"), ("peak mem MB", "peak_mem_mb", "{:.0f}"),
]
