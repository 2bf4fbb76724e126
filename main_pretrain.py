"""MAE pretraining CLI (flags and defaults of facebookresearch/mae's main_pretrain.py).

    torchrun --nproc_per_node=8 main_pretrain.py --model mae_vit_large_patch16 \
        --batch_size 64 --norm_pix_loss --blr 1.5e-4 --data_path $IMAGENET
"""
import argparse
import sys

from engine.args import add_monitor_args, add_training_args


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training", add_help=False)
    parser.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                        help="name of the model to train: one of models/mae.py, or mae_<timm ViT name> for an "
                             "encoder with the architecture of any plain timm ViT (e.g. mae_vit_small_patch16_224; "
                             "no weights are loaded) and the default decoder (512-d, 8 blocks, 16 heads)")
    parser.add_argument("--mask_ratio", default=None, type=float,
                        help="fraction of patches removed (MAE; default 0.75) or filled from another image "
                             "(MixMIM; default 0.5)")
    parser.add_argument("--range_mask_ratio", default=0.0, type=float,
                        help="MixMIM: add a random extra ratio drawn uniformly from [0, this] to every batch's mask")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="use per-patch normalized pixels as targets")
    parser.set_defaults(norm_pix_loss=False)
    parser.add_argument("--vis_every", default=0, type=int, metavar="N",
                        help="draw reconstructions of the first 4 training images (fixed masks) every N epochs "
                             "and after the last into <output_dir>/reconstructions/ and tensorboard (0: off)")
    dec = parser.add_argument_group("decoder ablations (MAE paper, Table 1a/1b); default: the model's own decoder, "
                                    "recorded in checkpoints and taken from the checkpoint on resume")
    dec.add_argument("--decoder_depth", default=None, type=int, metavar="N", help="decoder blocks (paper: 1-12)")
    dec.add_argument("--decoder_embed_dim", default=None, type=int, metavar="D",
                     help="decoder width (paper: 128-1024); divisible by the number of heads")
    dec.add_argument("--decoder_num_heads", default=None, type=int, metavar="H", help="decoder attention heads")
    add_training_args(parser)
    add_monitor_args(parser)
    return parser


if __name__ == "__main__":
    from engine.pretrain import main
    from util.cli import run_training_cli

    parser = argparse.ArgumentParser("MAE pre-training", parents=[get_args_parser()])
    sys.exit(run_training_cli(main, parser))
