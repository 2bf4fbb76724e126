"""MAE pretraining CLI (flags and defaults of facebookresearch/mae's main_pretrain.py).

    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_large_patch16 \
        --batch_size 64 --norm_pix_loss --blr 1.5e-4 --data_path $IMAGENET
"""
import argparse
import sys

from engine.args import add_training_args


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training", add_help=False)
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                        help="name of the model to train (see models/mae.py)")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use per-patch normalized pixels as targets")
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument("--vis_every", default=0, type=int, metavar="N",
                        help="draw reconstructions of the first 4 training images (fixed masks) every N epochs "
                             "and after the last into <output_dir>/reconstructions/ and tensorboard (0: off)")
    add_training_args(parser)
    return parser


if __name__ == "__main__":
    from engine.pretrain import main
    from util.cli import run_cli

    parser = argparse.ArgumentParser("MAE pre-training", parents=[get_args_parser()])
    sys.exit(run_cli(main, parser.parse_args()))
