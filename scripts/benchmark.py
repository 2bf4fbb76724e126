"""Benchmark the MAE pretraining step: throughput, FLOPs, MFU and peak memory.

What is timed is the training step of engine/pretrain.py + engine/trainer.py (no gradient
accumulation), on synthetic data and on whatever device is chosen (CPU or CUDA, same code):

    images (N, 3, H, W) random, built once; noise (N, L) uniform, fresh every step
    with autocast(amp):  loss = model(images, mask_ratio, noise)[0]     (engine.pretrain.mae_loss)
    scaler.scale(loss).backward()                                        (GradScaler, on for fp16 only)
    scaler.unscale_(optimizer); grad_total_norm(params)                  (engine.trainer.grad_total_norm)
    scaler.step(optimizer); scaler.update(); optimizer.zero_grad(set_to_none=True)

with AdamW(param_groups_weight_decay(model, 0.05), betas=(0.9, 0.95), fused on CUDA), the
engine's autocast resolution (engine.runtime.resolve_amp: bf16 on CUDA when supported, else
fp16; none on CPU) and the CUDA backend switches of engine.runtime.setup_runtime
(cudnn.benchmark, TF32). The data loader is not part of the measurement. The device is
synchronised only around the timed region (--iters steps), never inside a step, so the GPU
queue stays as full as in training.

Reported per run: images/s and seconds/step (median over --repeats), the analytic model FLOPs
of one step (mae_train_flops), the achieved FLOP/s, a matmul peak measured in the same process
on the same device and dtype, model FLOPs utilisation MFU = achieved / measured peak, and peak
memory (torch.cuda.max_memory_allocated on CUDA; the process's peak RSS on CPU).

    python scripts/benchmark_pretrain.py --model mae_vit_base_patch16 --batch_size 8 \
        --warmup 2 --iters 3 --repeats 3 --json out.json
    python scripts/benchmark_pretrain.py --model mae_vit_large_patch16 --batch_size 64 --amp bf16 --compile
"""
import os
import sys

# scripts/ is not a package: make the repo root importable when run as `python scripts/...`.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple, Union  # noqa: E402

import torch  # noqa: E402
import timm  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

import models  # noqa: E402
from engine.pretrain import mae_loss  # noqa: E402
from engine.runtime import build_model, configure_backends, resolve_amp  # noqa: E402
from engine.trainer import grad_total_norm  # noqa: E402
from util.cli import run_cli  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.meters import max_memory_mb  # noqa: E402

WEIGHT_DECAY = 0.05   # engine default (--weight_decay)
LR = 1.5e-4           # value irrelevant for speed; the official ViT-L blr


# --------------------------------------------------------------------------- FLOPs
def _hw(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    h, w = img_size
    return int(h), int(w)


def mae_forward_flops_per_image(model, mask_ratio: float, img_size) -> Dict[str, int]:
    """Matmul FLOPs (2*m*n*k) of one forward pass for one image, by component.

    See mae_train_flops for what is counted.
    """
    p = model.patch_size
    h, w = _hw(img_size)
    num_patches = (h // p) * (w // p)                       # L
    enc_dim = model.patch_embed.proj.out_channels           # D
    patch_dim = model.patch_embed.proj.in_channels * p * p  # p*p*C
    dec_dim = model.decoder_embed.out_features              # Dd
    t_enc = 1 + int(num_patches * (1 - mask_ratio))         # cls + kept patches, as random_masking
    t_dec = 1 + num_patches                                 # cls + all patches

    def block(blk, tokens: int, dim: int) -> Tuple[int, int]:
        hidden = blk.mlp.fc1.out_features                   # 4*dim for mlp_ratio 4
        linear = 2 * tokens * dim * (3 * dim + dim + 2 * hidden)   # qkv, proj, fc1 + fc2
        attention = 2 * (2 * tokens * tokens * dim)                # QK^T and AV
        return linear, attention

    enc = [block(b, t_enc, enc_dim) for b in model.blocks]
    dec = [block(b, t_dec, dec_dim) for b in model.decoder_blocks]
    return {
        "patch_embed": 2 * num_patches * patch_dim * enc_dim,
        "encoder_linear": sum(lin for lin, _ in enc),
        "encoder_attention": sum(att for _, att in enc),
        "decoder_embed": 2 * t_enc * enc_dim * dec_dim,
        "decoder_linear": sum(lin for lin, _ in dec),
        "decoder_attention": sum(att for _, att in dec),
        "decoder_pred": 2 * t_dec * dec_dim * model.decoder_pred.out_features,
    }


def mae_train_flops(model, batch: int, mask_ratio: float, img_size) -> int:
    """Analytic model FLOPs of one MAE training step (forward + backward) for `batch` images.

    Only matmuls are counted, each as 2*m*n*k; the dimensions are read from the model
    (encoder dim D, depth, decoder dim Dd and depth, patch size p, input channels C, MLP hidden
    width = 4*dim for the registered models). With L = (H/p)*(W/p) patches:

      patch embedding      all L patches:                  2 * L * (p*p*C) * D
      each encoder block   on T_enc = 1 + int(L*(1-mask_ratio)) tokens (cls + kept patches):
                           qkv 3D^2 + proj D^2 + fc1/fc2 8D^2 per token -> 2 * T_enc * 12 D^2
                           attention QK^T and AV, 2 * T_enc^2 * D each  -> 4 * T_enc^2 * D
      decoder_embed        T_enc tokens:                   2 * T_enc * D * Dd
      each decoder block   as an encoder block, on T_dec = 1 + L tokens with width Dd
      decoder_pred         T_dec tokens:                   2 * T_dec * Dd * (p*p*C)

    Training = 3 x forward (the backward pass computes the gradients of both operands of every
    matmul). This is the usual "model FLOPs" convention: layer norms, softmax, GELU, the
    optimizer and the loss are left out, and no attention recomputation is counted. The
    backward of the patch embedding is overcounted by one patch-embedding forward (the images
    need no gradient): 0.4% of the total for ViT-B/16 at 224, 7% for the mini model at 112.
    For ViT-B/16 at 224 with mask ratio 0.75 this is 19.56 GFLOP forward, 58.7 GFLOP per image
    per training step. The forward count equals torch.utils.flop_counter.FlopCounterMode's
    count of one forward pass (convolution, addmm and scaled-dot-product attention).
    """
    return 3 * batch * sum(mae_forward_flops_per_image(model, mask_ratio, img_size).values())


# --------------------------------------------------------------------------- device helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuShare:
    """CPU time used by other processes (and stolen by the hypervisor) while a region runs.

    On CPU the benchmark's numbers are only meaningful on an otherwise idle machine; this
    reads /proc/stat (Linux) before and after and subtracts this process's own CPU time.
    The results are average numbers of cores; None where /proc/stat cannot be read.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (time.perf_counter(), (user + nice + system + irq + softirq) / tick, steal / tick,
                own.ru_utime + own.ru_stime)

    def stop(self) -> Dict[str, Optional[float]]:
        end = self._read()
        if self.start is None or end is None:
            return {"other_processes_cores": None, "steal_cores": None, "own_cores": None}
        wall = end[0] - self.start[0]
        busy, steal, own = (end[i] - self.start[i] for i in (1, 2, 3))
        return {"other_processes_cores": max(busy - own, 0.0) / wall, "steal_cores": steal / wall,
                "own_cores": own / wall}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                        repeats: int = 5) -> Dict[str, float]:
    """Best FLOP/s of a square (size x size) x (size x size) matmul in `dtype` on `device`.

    Two entry points are timed, torch.matmul (a @ b) and F.linear (a @ b.T, the model's
    nn.Linear), and the best of all timings is the peak: on some CPUs one of them has no fast
    kernel for a dtype (fp16 torch.matmul on CPU runs at ~1 GFLOP/s, F.linear at ~50).
    fp32 on CUDA runs with the engine's TF32 setting, like the model's fp32 matmuls.
    """
    if size is None:
        size = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    ops = {"matmul": lambda: torch.matmul(a, b), "linear": lambda: torch.nn.functional.linear(a, b)}
    # Several matmuls per timing on a GPU, so launch and sync overheads vanish.
    per_timing = 10 if device.type == "cuda" else 1
    best, best_op = float("inf"), None
    for name, op in ops.items():
        for _ in range(2):  # warm up (kernel selection, clocks, thread pool)
            op()
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_timing):
                op()
            _sync(device)
            seconds = (time.perf_counter() - t0) / per_timing
            if seconds < best:
                best, best_op = seconds, name
    del a, b, ops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"size": size, "op": best_op, "seconds": best, "flops_per_s": 2 * size ** 3 / best}


# --------------------------------------------------------------------------- benchmark
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        "benchmark_pretrain", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="registered model name (models/mae.py)")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step")
    parser.add_argument("--input_size", default=224, type=int, help="image size")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixel targets")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                        help="autocast precision (default as in training: bf16 on CUDA if supported, "
                             "else fp16; none on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compiled in warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps before the first repeat")
    parser.add_argument("--iters", default=10, type=int, help="timed steps per repeat")
    parser.add_argument("--repeats", default=3, type=int, help="timed repeats; the median is reported")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch.set_num_threads (default: leave torch's setting)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results to this file")
    return parser.parse_args(argv)


def check_args(args) -> torch.device:
    for name, least in (("batch_size", 1), ("input_size", 1), ("iters", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            raise UserError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if not 0 < args.mask_ratio < 1:
        raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
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
        print("# warning: --compile with --warmup 0: compilation falls in the first timed repeat",
              file=sys.stderr)
    return device


def run_benchmark(args) -> Dict:
    device = check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    configure_backends(device)
    amp_dtype = resolve_amp(args.amp, device)
    compute_dtype = amp_dtype or torch.float32
    torch.manual_seed(args.seed)

    model = build_model(args.model, "pretrain", img_size=args.input_size,
                        norm_pix_loss=args.norm_pix_loss)
    if args.input_size % model.patch_size:
        raise UserError(f"--input_size {args.input_size} is not divisible by the patch size {model.patch_size}")

    # The matmul peak first, before the model takes memory; then count peak memory from here.
    peak = measure_matmul_peak(device, compute_dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.to(device)
    model.train(True)
    num_params = sum(p.numel() for p in model.parameters())
    param_groups = param_groups_weight_decay(model, WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(param_groups, lr=LR, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    train_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    compute_loss = mae_loss(args.mask_ratio, device)

    n, size = args.batch_size, args.input_size
    num_patches = (size // model.patch_size) ** 2
    images = torch.randn(n, model.in_chans, size, size, device=device)

    def step():
        noise = torch.rand(n, num_patches, device=device)
        with autocast:
            loss = compute_loss(train_model, (images, None, noise))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = grad_total_norm(params, None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    optimizer.zero_grad(set_to_none=True)
    warmup_s: List[float] = []
    loss = grad_norm = None
    for _ in range(args.warmup):
        t0 = time.perf_counter()
        loss, grad_norm = step()
        _sync(device)
        warmup_s.append(time.perf_counter() - t0)

    step_s: List[float] = []
    cpu_share = CpuShare()
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            loss, grad_norm = step()
        _sync(device)
        step_s.append((time.perf_counter() - t0) / args.iters)
    contention = cpu_share.stop()
    peak_mem_mb = max_memory_mb(device)
    last_loss, last_grad_norm = float(loss.detach()), float(grad_norm)

    flops_breakdown = mae_forward_flops_per_image(model, args.mask_ratio, size)
    flops_per_step = mae_train_flops(model, n, args.mask_ratio, size)
    median_step = statistics.median(step_s)
    achieved = flops_per_step / median_step
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[compute_dtype]
    if device.type == "cuda" and compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        dtype_name = "fp32 (tf32 matmul)"
    return {
        "model": args.model,
        "batch_size": n,
        "input_size": size,
        "mask_ratio": args.mask_ratio,
        "amp": "none" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        "compile": bool(args.compile),
        "device": device.type,
        "img_per_s": n / median_step,
        "s_per_step": median_step,
        "gflop_per_step": flops_per_step / 1e9,
        "achieved_tflop_per_s": achieved / 1e12,
        "peak_tflop_per_s_measured": peak["flops_per_s"] / 1e12,
        "mfu_percent": 100 * achieved / peak["flops_per_s"],
        "peak_mem_mb": peak_mem_mb,
        "peak_mem_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                          else "process peak RSS (ru_maxrss)"),
        # Details.
        "img_per_s_repeats": [n / s for s in step_s],
        "s_per_step_repeats": step_s,
        "warmup_s_per_step": warmup_s,
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "forward_gflop_per_image": {k: v / 1e9 for k, v in flops_breakdown.items()},
        "peak_matmul": {"size": peak["size"], "dtype": dtype_name, "op": peak["op"], "best_seconds": peak["seconds"]},
        "num_params": num_params,
        "last_loss": last_loss,
        "last_grad_norm": last_grad_norm,
        # Average cores used by other processes / stolen by the hypervisor / used by this one
        # during the timed repeats: CPU numbers are only valid when the first two are ~0.
        "cpu_contention": contention,
        "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "command": shlex.join(["python"] + sys.argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


COLUMNS = [  # (header, key, format)
    ("model", "model", "{}"), ("batch", "batch_size", "{}"), ("amp", "amp", "{}"),
    ("compile", "compile", "{}"), ("device", "device", "{}"), ("img/s", "img_per_s", "{:.2f}"),
    ("s/step", "s_per_step", "{:.3f}"), ("GFLOP/step", "gflop_per_step", "{:.1f}"),
    ("TFLOP/s", "achieved_tflop_per_s", "{:.3f}"), ("peak TFLOP/s", "peak_tflop_per_s_measured", "{:.3f}"),
    ("MFU %", "mfu_percent", "{:.1f}"), ("peak mem MB", "peak_mem_mb", "{:.0f}"),
]


def format_table(rows: List[Dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]] + [[fmt.format(r[k]) for _, k, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args) -> None:
    r = run_benchmark(args)
    print(f"# {r['device_name']} ({r['device']}, {r['threads']} threads), torch {r['torch_version']}, "
          f"timm {r['timm_version']}; input {r['input_size']}, mask ratio {r['mask_ratio']}, "
          f"{r['iters']} steps x {r['repeats']} repeats after {r['warmup']} warm-up")
    print(format_table([r]))
    print(f"# repeats img/s: {', '.join(f'{x:.2f}' for x in r['img_per_s_repeats'])} (median reported); "
          f"peak: {r['peak_matmul']['size']}^2 {r['peak_matmul']['dtype']} {r['peak_matmul']['op']}; "
          f"peak mem: {r['peak_mem_kind']}; final loss {r['last_loss']:.4f}")
    c = r["cpu_contention"]
    if c["other_processes_cores"] is not None:
        busy = c["other_processes_cores"] + c["steal_cores"] > 0.1 * r["threads"]
        print(f"# cores used during the timed steps: this process {c['own_cores']:.2f}, other processes "
              f"{c['other_processes_cores']:.2f}, hypervisor steal {c['steal_cores']:.2f}"
              + ("  WARNING: the CPU was shared; the numbers are low" if busy else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
        print(f"# results written to {args.json}")


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args()))
