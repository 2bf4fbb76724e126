"""--mode plan: rank 0's memory of a pretraining run per strategy and world size, without the GPUs
(benchmarks/memory_plan.py measures and estimates)."""
from typing import Dict

import torch

from benchmarks import memory_plan
from benchmarks.report import format_table
from engine.model_factory import build_model
from util.errors import UserError


def run_plan(args) -> Dict:
    """Rank 0's memory of one training step (benchmarks/memory_plan.py), a row per strategy and world
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
                     "benchmarks/memory_plan.py",
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
