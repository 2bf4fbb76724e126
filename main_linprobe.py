"""Linear probing CLI (flags and defaults of facebookresearch/mae's main_linprobe.py).

    torchrun --nproc_per_node=8 main_linprobe.py --finetune mae_pretrain_vit_base.pth \
        --model vit_base_patch16 --cls_token --batch_size 512 --epochs 90 --blr 0.1 \
        --weight_decay 0.0 --dist_eval --data_path $IMAGENET
"""
import argparse
import sys

from engine.args import add_classification_args, add_training_args


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE linear probing for image classification", add_help=False)
    parser.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                        help="name of the model to train: one of models/vit.py, or the name of a plain timm "
                             "ViT (e.g. vit_small_patch16_224) for the encoder pretrained as mae_<that name>")
    add_classification_args(parser)
    add_training_args(parser)
    parser.set_defaults(batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, warmup_epochs=10, save_every=1)
    return parser


if __name__ == "__main__":
    from engine.linprobe import main
    from util.cli import run_training_cli

    parser = argparse.ArgumentParser("MAE linear probing for image classification", parents=[get_args_parser()])
    sys.exit(run_training_cli(main, parser))
