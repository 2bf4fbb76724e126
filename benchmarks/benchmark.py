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

    python -m benchmarks.benchmark --model mae_vit_base_patch16 --batch_size 8 --peer --json out.json
    python -m benchmarks.benchmark --model mae_vit_large_patch16 --batch_size 64 --amp bf16 --compile --peer
    python -m benchmarks.benchmark --mode loader --data_path data/sample --num_workers 1
    python -m benchmarks.benchmark --mode plan --model mae_vit_6p5b_patch14 --world_size 8 --dist_strategy fsdp \
        --amp bf16 --grad_ckpt --batch_size 32

--mode plan: per-rank memory of a pretraining run, for any --model / --batch_size / --world_size /
--dist_strategy (ddp, fsdp; --fsdp_shard_size for hybrid sharding) / --amp (none, bf16) / --grad_ckpt,
without the GPUs: parameter, gradient and AdamW-state bytes measured on the tensors a rank holds
(the model sharded on the meta device over a fake process group of --world_size ranks), activation
bytes of one step estimated from the tensors autograd saves (benchmarks/memory_plan.py says how),
and the largest per-GPU batch that fits each of --gpu_gb.

Reported: images/s and s/step (median over --repeats), analytic model FLOPs per step
(benchmarks/flops.py), achieved FLOP/s, a matmul peak measured in the same process on the same
device and dtype, MFU = achieved / measured peak, peak memory, a table and (--json) all of it.

One module per mode (step.py, loader.py, plan.py); this one is the command line.
"""
import argparse
import datetime
import os
import platform
import shlex
import sys

import timm
import torch

from benchmarks.flops import device_name
from benchmarks.loader import LOADER_COLUMNS, PIPELINES, READ_COLUMNS, run_loader
from benchmarks.plan import print_plan, run_plan
from benchmarks.report import describe_contention, format_table, write_json
from benchmarks.step import STEP_COLUMNS, run_step
from engine.data import DATA_FORMATS
from util.cli import run_cli
from util.errors import UserError


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
    parser.add_argument("--watchdog", action="store_true",
                        help="step mode: also time our step with the hang watchdog running (engine/launch/watchdog.py), "
                             "interleaved with the step without it, on the same model")
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
        if r["watchdog_overhead_percent"] is not None:
            print(f"# the watchdog's cost: {r['watchdog_overhead_percent']:+.2f}% s/step (ours + watchdog vs ours)")
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
