"""The official augmentation recipes: pretraining, fine-tuning, linear probing, evaluation. The
"uint8" and "device_decode" pipelines take the same crop and flip on uint8 tensors
(engine.data.uint8), leaving the normalisation to the device."""
import torchvision.transforms as T
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import augment
from .uint8 import RandomResizedCropFlip

UINT8_PIPELINES = ("uint8", "device_decode")


def pretrain_transform(input_size: int, pipeline: str = "pil"):
    """The official MAE pretraining augmentation, on PIL images, or on uint8 tensors."""
    if pipeline in UINT8_PIPELINES:
        return RandomResizedCropFlip(input_size, scale=(0.2, 1.0), deferred=pipeline == "device_decode")
    return T.Compose([
        T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def finetune_transform(args, is_train: bool):
    """The official fine-tuning augmentation (timm RandAugment, random erasing) and eval crop.
    `--aa none` (or "") turns auto-augment off; engine.data.augment keeps timm's ops working on
    current Pillow."""
    if is_train:
        augment.use_pillow_compatible_ops()
        return create_transform(input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
                                auto_augment=augment.check_auto_augment(args.aa), interpolation="bicubic",
                                re_prob=args.reprob,
                                re_mode=args.remode, re_count=args.recount,
                                re_num_splits=2 if args.resplit else 0, mean=IMAGENET_DEFAULT_MEAN,
                                std=IMAGENET_DEFAULT_STD)
    return eval_transform(args.input_size)


def linprobe_transform(input_size: int, is_train: bool, pipeline: str = "pil"):
    """The official linear-probing augmentation: random resized crop and flip only."""
    if is_train and pipeline in UINT8_PIPELINES:
        return RandomResizedCropFlip(input_size, deferred=pipeline == "device_decode")
    if is_train:
        return T.Compose([T.RandomResizedCrop(input_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return eval_transform(input_size)


def eval_transform(input_size: int):
    """Resize to input_size / 0.875 (up to 224; no margin above), then center crop."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return T.Compose([T.Resize(int(input_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(input_size), T.ToTensor(),
                      T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
