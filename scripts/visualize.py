"""Draw MAE reconstructions of images with a trained checkpoint.

    python scripts/visualize.py --checkpoint output_dir/demo/checkpoint-last.pth \
        --images data/sample/train/photos --output_dir vis --grid
    python scripts/visualize.py --checkpoint mae_visualize_vit_large.pth --model mae_vit_large_patch16 \
        --images cat.jpg dog.jpg --output_dir vis --mask_ratio 0.75 0.9 --device cuda

Each picture has one row per image and mask ratio, with four panels: the input, the input
with the removed patches greyed out, the reconstruction, and the reconstruction pasted into
the visible input (layout: engine/visualize.py). Without --grid, one <image stem>.png per image;
with --grid, all images in reconstructions.png. The paths written are printed.

The architecture (decoder ablations included), the training input size and norm_pix_loss come
from the checkpoint's 'args' (checkpoints of this repo); for official checkpoints, which do not
record them, give --model (and --norm_pix_loss when the weights were trained with it;
mae_visualize_vit_large.pth was not). Encoder-only checkpoints (the official
mae_pretrain_vit_*.pth) and classifiers (fine-tuned or linear-probed) have no decoder and cannot
reconstruct anything: the script says which it was given. Images are resized
(shorter side) and center-cropped to --input_size (default: the training size).

The masks are deterministic: every image's noise comes from a torch.Generator seeded with
--seed, so an image gets the same mask whatever other images are given, and the masks of
several --mask_ratio values are nested (a lower ratio removes a subset of the patches).
"""
import argparse
import os
import sys

import torch

import models
from engine.checkpoint import load_model_weights, matching_model, read_checkpoint, recorded_args
from engine.model_factory import build_model
from engine.pretrain_model import decoder_kwargs
from engine.visualize import (
    cat_results,
    check_images,
    find_images,
    fixed_noise,
    load_image,
    reconstruct,
    render_grid,
    take,
)
from models.state_dict import checkpoint_kind, has_decoder, trained_input_size
from util.cli import run_cli
from util.errors import UserError

BATCH = 8  # images per forward pass
FULL_CHECKPOINT_HINT = "use a full checkpoint such as mae_visualize_vit_large.pth or a checkpoint of this repo"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("MAE reconstruction pictures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint with decoder weights ('model' entry)")
    p.add_argument("--images", required=True, nargs="+", metavar="IMG_OR_DIR",
                   help="image files and/or folders (searched recursively)")
    p.add_argument("--output_dir", required=True, help="where to write the PNG files")
    p.add_argument("--mask_ratio", type=float, nargs="+", default=[0.75], metavar="RATIO",
                   help="one or more mask ratios: one row per ratio (default 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask noise")
    p.add_argument("--model", default=None,
                   help="architecture, for checkpoints that do not record it (official releases)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size (default: the checkpoint's training size, else 224)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--grid", action="store_true", help="one reconstructions.png for all images")
    p.add_argument("--norm_pix_loss", action="store_true",
                   help="the weights were trained with norm_pix_loss (used when the checkpoint does not say)")
    p.add_argument("--scale", type=int, default=None,
                   help="integer upscaling of each panel (default: enough for panels of at least 160 px)")
    return p


def checkpoint_args(ckpt: dict) -> dict:
    return recorded_args(ckpt)


def state_dict_of(ckpt: dict, path: str) -> dict:
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise UserError(f"checkpoint {path} has no 'model' entry: it is not a model checkpoint")


def training_size(state_dict: dict, recorded) -> int:
    """The image size the weights were built for: from the state dict when it tells, else args, else 224."""
    return trained_input_size(state_dict) or int(recorded or 224)


def model_from_checkpoint(args, ckpt: dict, device: torch.device):
    path = args.checkpoint
    sd = state_dict_of(ckpt, path)
    if checkpoint_kind(sd) == "classify":
        name = recorded_args(ckpt).get("model")
        raise UserError(f"checkpoint {path} is a classifier{f' ({name})' if name else ''}, fine-tuned or "
                        "linear-probed: it has a classification head and no decoder, so it cannot reconstruct "
                        "images; give the pretraining checkpoint (main_pretrain.py's) it started from")
    if not has_decoder(sd):
        raise UserError(f"checkpoint {path} has no decoder weights (encoder-only, like the official "
                        f"mae_pretrain_vit_*.pth releases), so it cannot reconstruct images: {FULL_CHECKPOINT_HINT}")
    saved = checkpoint_args(ckpt)
    name = saved.get("model")
    if name and args.model and args.model != name:
        print(f"note: using the architecture recorded in {path} ({name}), not --model {args.model}",
              file=sys.stderr)
    if not name and not args.model and "_format" in ckpt:  # a transformers / timm folder: its shapes tell
        name = matching_model(sd, "pretrain", saved.get("num_heads"))
    name = name or args.model
    if not name:
        raise UserError(f"checkpoint {path} does not record its architecture: pass --model "
                        "(e.g. --model mae_vit_large_patch16 for mae_visualize_vit_large.pth)")
    norm_pix = bool(saved["norm_pix_loss"]) if "norm_pix_loss" in saved else args.norm_pix_loss
    if args.norm_pix_loss and not norm_pix:
        print(f"note: --norm_pix_loss ignored: {path} records norm_pix_loss=False", file=sys.stderr)
    train_size = training_size(sd, saved.get("input_size"))
    # The decoder of a --decoder_* ablation run, as recorded (none recorded: the model's own).
    kwargs = dict(img_size=train_size, norm_pix_loss=norm_pix, **decoder_kwargs(saved))
    # Built without memory or initialisation (every tensor is then loaded from the checkpoint).
    with torch.device("meta"):
        model = build_model(name, "pretrain", **kwargs)
    own = model.state_dict()
    if any(b not in own for b, _ in model.named_buffers()):  # non-persistent buffers: initialise normally
        model = models.create_model(name, "pretrain", **kwargs).to(device)
    else:
        model = model.to_empty(device=device)
    load_model_weights(model, sd, path)
    return model, name, train_size


def unique_names(paths):
    """<stem>.png per image; a repeated stem gets its parent folder's name prepended."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    out, seen = [], set()
    for p, stem in zip(paths, stems):
        name = stem
        if stems.count(stem) > 1:
            name = f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{stem}"
        base, k = name, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        out.append(name)
    return out


def main(args) -> None:
    for r in args.mask_ratio:
        if not 0 < r < 1:
            raise UserError(f"--mask_ratio must be between 0 and 1 (exclusive), got {r}")
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input_size must be a positive image size in pixels (a multiple of the patch size; "
                        f"default: the training size), got {args.input_size}")
    if args.scale is not None and args.scale < 1:
        raise UserError(f"--scale must be at least 1, got {args.scale}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available: use --device cpu")
    paths = find_images(args.images)
    check_images(paths)

    # also a sharded directory (--dist_strategy fsdp, gathered here), transformers / timm folders, safetensors
    ckpt = read_checkpoint(args.checkpoint, "--checkpoint")
    model, name, train_size = model_from_checkpoint(args, ckpt, device)
    size = args.input_size or train_size
    if size % model.patch_size:
        raise UserError(f"--input_size {size} is not divisible by the patch size {model.patch_size}")
    # One noise row per image (MixMIM uses the first image's row for the whole batch).
    try:
        num_patches = model.mask_noise_len_at(size)
    except ValueError as e:
        raise UserError(f"--input_size {size}: {e}; give --input_size {train_size}, its training size") from None

    titles = [os.path.basename(p) for p in paths]
    stems = unique_names(paths)
    header = f"{os.path.basename(args.checkpoint)}: {name}, {size} px, seed {args.seed}"
    os.makedirs(args.output_dir, exist_ok=True)
    grid_parts = [[] for _ in args.mask_ratio]
    written = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        imgs = torch.stack([load_image(p, size) for p in chunk])
        # Every image's noise from a generator seeded with --seed: independent of the other images.
        noise = torch.cat([fixed_noise(1, num_patches, args.seed) for _ in chunk])
        results = [reconstruct(model, imgs, r, noise) for r in args.mask_ratio]
        if args.grid:
            for parts, res in zip(grid_parts, results):
                parts.append(res)
            continue
        for i in range(len(chunk)):
            out = os.path.join(args.output_dir, stems[start + i] + ".png")
            render_grid([take(res, i) for res in results], [titles[start + i]], out, title=header, scale=args.scale)
            written.append(out)
    if args.grid:
        out = os.path.join(args.output_dir, "reconstructions.png")
        render_grid([cat_results(parts) for parts in grid_parts], titles, out, title=header, scale=args.scale)
        written.append(out)
    for out in written:
        print(out)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
