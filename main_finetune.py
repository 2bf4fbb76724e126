"""Fine-tuning / evaluation CLI (flags and defaults of facebookresearch/mae's main_finetune.py).

    torchrun --nproc_per_node=8 main_finetune.py --finetune mae_pretrain_vit_base.pth \
        --model vit_base_patch16 --batch_size 32 --epochs 100 --blr 5e-4 --layer_decay 0.65 \
        --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval \
        --data_path $IMAGENET
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 \
        --batch_size 16 --data_path $IMAGENET
"""
import argparse
import sys

from engine.args import add_classification_args, add_training_args


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", add_help=False)
    parser.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                        help="name of the model to train: one of models/vit.py, or the name of a plain timm "
                             "ViT (e.g. vit_small_patch16_224) for the encoder pretrained as mae_<that name>")
    parser.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    parser.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")

    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                     help="color jitter factor (enabled only when not using auto augment)")
    aug.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                     help='auto augment policy in timm\'s syntax: rand-m9-mstd0.5-inc1 (RandAugment, the official '
                          'default) or another rand-..., augmix-..., v0, v0r, original, originalr, 3a; '
                          '"none" (or "") turns it off')
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase prob")
    aug.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    aug.add_argument("--recount", type=int, default=1, help="random erase count")
    aug.add_argument("--resplit", action="store_true", default=False,
                     help="do not random erase the first (clean) augmentation split")
    aug.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0")
    aug.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    aug.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                     help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
    aug.add_argument("--mixup_prob", type=float, default=1.0,
                     help="probability of performing mixup or cutmix when either/both is enabled")
    aug.add_argument("--mixup_switch_prob", type=float, default=0.5,
                     help="probability of switching to cutmix when both mixup and cutmix enabled")
    aug.add_argument("--mixup_mode", type=str, default="batch", help='how to apply mixup/cutmix: "batch", '
                     '"pair", or "elem"')

    add_classification_args(parser)
    add_training_args(parser)
    parser.set_defaults(epochs=50, min_lr=1e-6, warmup_epochs=5, save_every=1)
    return parser


if __name__ == "__main__":
    from engine.finetune import main
    from util.cli import run_training_cli

    parser = argparse.ArgumentParser("MAE fine-tuning for image classification", parents=[get_args_parser()])
    sys.exit(run_training_cli(main, parser))
