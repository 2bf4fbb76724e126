"""Convert between the two checkpoint formats, without a process group or a GPU.

    # a sharded checkpoint (directory, --dist_strategy fsdp) -> one file of the DDP format
    python scripts/convert_checkpoint.py output_dir/checkpoint-last output_dir/checkpoint-last.pth
    # and back: a checkpoint file -> a sharded directory (any number of ranks resumes it)
    python scripts/convert_checkpoint.py checkpoint-last.pth output_dir/checkpoint-last

The file holds what a DDP run writes: {'model': state dict with the official keys, 'optimizer':
optimizer.state_dict()'s layout, 'epoch', 'epoch_iter', ..., 'args', 'rng', 'scaler'}, so it
fine-tunes, draws reconstructions, exports and resumes like any checkpoint of this repository
(main_finetune.py --finetune and scripts/visualize.py also take the directory directly). The whole
checkpoint is held in this process's memory (about 16 bytes per parameter with the optimizer
state: ~104 GB for ViT-6.5B; --weights_only keeps 4).

A file -> directory conversion names the optimizer's parameters by rebuilding the recorded model
(on the meta device) and the recipe's parameter groups; an official checkpoint without that
record, or whose groups do not match, converts its weights only (a run resuming it starts
training afresh from them), which is said in one line.
"""
import argparse
import os
import sys
from typing import List, Optional

import torch
from timm.optim import param_groups_weight_decay

from engine.checkpoint import is_sharded, read_checkpoint, recorded_args, save_full_as_sharded
from engine.model_factory import build_model
from engine.optim import param_groups_lrd
from engine.pretrain_model import decoder_kwargs
from models.state_dict import checkpoint_kind
from util.checkpoint_io import atomic_save
from util.cli import run_cli
from util.errors import UserError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Convert a sharded checkpoint directory to one file, or back",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sharded checkpoint directory, or a checkpoint file")
    parser.add_argument("destination", help="the file (from a directory) or directory (from a file) to write; "
                        "it must not exist")
    parser.add_argument("--weights_only", action="store_true",
                        help="keep only the model weights and the run's args ({'model': ..., 'args': ...})")
    return parser


def parameter_names(ckpt: dict) -> Optional[List[str]]:
    """The optimizer's parameters by name in its numbering: the recorded model rebuilt on the meta
    device, with the recipe's parameter groups (engine/pretrain.py, engine/finetune.py)."""
    saved, groups = recorded_args(ckpt), (ckpt.get("optimizer") or {}).get("param_groups")
    kind = checkpoint_kind(ckpt["model"])
    if not saved.get("model") or not groups or kind == "encoder":
        return None
    try:
        with torch.device("meta"):
            if kind == "pretrain":
                model = build_model(saved["model"], "pretrain", img_size=saved.get("input_size", 224),
                                    norm_pix_loss=bool(saved.get("norm_pix_loss")), **decoder_kwargs(saved))
                made = param_groups_weight_decay(model, saved.get("weight_decay", 0.05))
            else:
                model = build_model(saved["model"], "classify", img_size=saved.get("input_size", 224),
                                    num_classes=ckpt["model"]["head.weight"].shape[0],
                                    global_pool=bool(saved.get("global_pool", True)))
                made = param_groups_lrd(model, saved.get("weight_decay", 0.05),
                                        no_weight_decay_list=model.no_weight_decay(),
                                        layer_decay=saved.get("layer_decay", 0.75))
    except (UserError, ValueError, TypeError, KeyError):
        return None
    if [len(g["params"]) for g in made] != [len(g["params"]) for g in groups]:
        return None
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in made for p in g["params"]]
    shapes = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
    for i, state in ckpt["optimizer"]["state"].items():
        moment = state.get("exp_avg")
        if moment is not None and tuple(moment.shape) != shapes[names[i]]:
            return None
    return names


def main(args) -> None:
    src, dst = args.source, args.destination
    if os.path.lexists(dst):
        raise UserError(f"{dst} exists: give a new path (the conversion never overwrites)")
    ckpt = read_checkpoint(src, "source", foreign=False)  # a sharded directory gathered into one dict
    ckpt.pop("_path", None)
    if is_sharded(src):
        if args.weights_only:
            ckpt = {"model": ckpt["model"], "args": ckpt.get("args")}
        atomic_save(ckpt, dst)
        print(f"wrote {dst} ({len(ckpt['model'])} model tensors{', optimizer state' if 'optimizer' in ckpt else ''})")
        return
    if not isinstance(ckpt.get("model"), dict):
        ckpt = {"model": ckpt}  # a bare state dict
    names = None if args.weights_only else parameter_names(ckpt)
    if names is None and ckpt.get("optimizer") and not args.weights_only:
        print(f"note: the optimizer state of {src} cannot be matched to named parameters (no recorded model, "
              "or other parameter groups): its weights only are converted", file=sys.stderr)
    if args.weights_only:
        ckpt = {"model": ckpt["model"], "args": ckpt.get("args")}
    save_full_as_sharded(ckpt, dst, names)
    print(f"wrote {dst} ({len(ckpt['model'])} model tensors{', optimizer state' if names else ''})")


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
