"""Seconds of one representation-monitor run (engine/monitor.py) for a model at its initial weights:
the embedding of the bank and val subsets, the k-NN and the linear probes, as --monitor_every runs them.

    python -m benchmarks.monitor_cost --model mae_vit_base_patch16 --input_size 224 --data_path $IMAGENET --device cuda
"""
import argparse
import json
import sys
from types import SimpleNamespace

import torch

from benchmarks.flops import CpuShare, device_name
from engine.monitor import Monitor, monitor_sources
from engine.precision import resolve_amp
from engine.pretrain_model import build_pretrain_model


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Cost of one representation-monitor run")
    parser.add_argument("--model", default="mae_vit_mini_patch16")
    parser.add_argument("--input_size", default=64, type=int)
    parser.add_argument("--data_path", required=True, help="labelled images with train and val splits")
    parser.add_argument("--monitor_train_size", default=10000, type=int)
    parser.add_argument("--monitor_val_size", default=5000, type=int)
    parser.add_argument("--batch_size", default=64, type=int)
    parser.add_argument("--num_workers", default=0, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None)
    parser.add_argument("--repeats", default=2, type=int, help="monitor runs timed (the first warms up)")
    return parser


def main(args) -> dict:
    flags = SimpleNamespace(monitor_every=1, monitor_data_path=args.data_path, data_path=args.data_path,
                            data_format="auto", image_column=None, label_column=None, seed=0,
                            monitor_train_size=args.monitor_train_size, monitor_val_size=args.monitor_val_size)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_pretrain_model(args.model, args.input_size, False, 0.0, {}).to(device)
    monitor = Monitor.build(monitor_sources(flags), input_size=args.input_size, batch_size=args.batch_size,
                            device=device, amp_dtype=resolve_amp(args.amp, device), num_workers=args.num_workers)
    share = CpuShare()
    runs = [monitor.measure(model) for _ in range(args.repeats)]
    return {"model": args.model, "input_size": args.input_size, "device": device_name(device),
            "images_per_run": monitor.images, "seconds_per_run": [r["seconds"] for r in runs],
            "numbers": {k: v for k, v in runs[-1].items() if k != "seconds"},
            "threads": torch.get_num_threads(), **share.stop()}


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args()), indent=1))
    sys.exit(0)
