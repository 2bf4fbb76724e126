"""Export a checkpoint of ours (or an official / transformers / timm one) to timm, transformers or the
official release files, with a model card (README.md) written from the checkpoint.

    python scripts/export.py --checkpoint output_dir/checkpoint-last.pth --to timm --output export/timm
    python scripts/export.py --checkpoint output_dir/checkpoint-last.pth --to transformers --output export/hf
    python scripts/export.py --checkpoint output_dir/checkpoint-last.pth --to official --output export/official

timm: model.safetensors + config.json (timm's hub layout): timm.create_model("local-dir:export/timm",
pretrained=True), or "hf-hub:<user>/<repo>" once the folder is uploaded. transformers:
ViTMAEForPreTraining for a pretraining checkpoint (--encoder_only: ViTModel), ViTModel for encoder
weights, ViTForImageClassification for a class-token classifier and BeitForImageClassification
(configured as a plain ViT with mean pooling) for a --global_pool one. official: mae_pretrain_*.pth
(encoder) and mae_visualize_*.pth (encoder and decoder), or mae_finetuned_*.pth.
"""
import argparse
import os
import sys

import models  # noqa: F401  (registers the model families)
from engine.interop.export import WRITERS, load_source
from engine.interop.model_card import write_model_card
from util.cli import run_cli
from util.errors import UserError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export MAE weights to timm, transformers or the official release files")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint of main_pretrain.py / main_finetune.py / main_linprobe.py, an official "
                             "file, a .safetensors file, or a transformers / timm folder")
    parser.add_argument("--to", required=True, choices=sorted(WRITERS), help="the format to write")
    parser.add_argument("--output", required=True, help="the folder to write (created; files in it are replaced)")
    parser.add_argument("--model", default=None,
                        help="the architecture, for files that do not record it (e.g. mae_vit_base_patch16)")
    parser.add_argument("--encoder_only", action="store_true",
                        help="--to transformers: export a pretraining checkpoint's encoder as ViTModel")
    return parser


def training_cli(src):
    """(script, parser) of the CLI that trained the checkpoint, for the model card's command line."""
    if src.kind == "classify" and src.linear_probe:
        import main_linprobe as cli
        return "main_linprobe.py", cli.get_args_parser()
    if src.kind == "classify":
        import main_finetune as cli
        return "main_finetune.py", cli.get_args_parser()
    import main_pretrain as cli
    return "main_pretrain.py", cli.get_args_parser()


def main(args) -> None:
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a file: give a folder to write the export into")
    if args.encoder_only and args.to != "transformers":
        raise UserError("--encoder_only applies to --to transformers (timm exports are the encoder already; "
                        "official exports write the encoder-only mae_pretrain_*.pth anyway): drop the flag")
    src = load_source(args.checkpoint, args.model)
    if args.encoder_only and src.kind != "pretrain":
        raise UserError(f"--encoder_only: {args.checkpoint} has no decoder to leave out; drop the flag")
    try:
        os.makedirs(args.output, exist_ok=True)
        kwargs = {"encoder_only": True} if args.encoder_only else {}
        files = WRITERS[args.to](src, args.output, **kwargs)
        script, parser = training_cli(src)
        card = write_model_card(src, args.output, args.to, files, script, parser, args.encoder_only)
    except OSError as e:
        raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
    for path in files + [card]:
        print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
