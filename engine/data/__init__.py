"""Training and evaluation data, source to model input.

Every random draw made for a sample (crop, flip, and the MAE mask noise) is a pure function of
(seed, epoch, sample index). The data a step sees therefore does not depend on the number of
processes, loader workers, or where a run was resumed: a 2-process run sees the same samples
as a 1-process run with twice the batch, and a resumed run continues with the very batches the
uninterrupted run would have seen.

    sources.py     where the images come from: ImageSource (index -> (encoded image, label)),
                   FolderSource and image_folder (ImageNet-layout folders), open_source (which
                   source --data_path names)
    shards.py      WebDataset tar shards (read with wids), ShardSource
    hfds.py        a Hugging Face dataset on disk (read with datasets), HFSource
    keyed.py       KeyedSamples, sample_seed, keyed_rng: the sample-keyed randomness
    sampler.py     ResumableSampler, ShardOrderSampler, ShardSampler: which keys each process
                   reads, from where
    decode.py      raw image -> what the pipeline's transform takes (PIL, uint8, still encoded)
    transforms.py  the official recipes: pretraining, fine-tuning, linear probing, evaluation
    augment.py     timm's auto-augment on current Pillow, the --aa check
    uint8.py       random resized crop + flip on uint8 tensors
    device.py      the batch: collated, pinned, decoded/normalised on the training device
    loader.py      LoaderSettings, train_loader / eval_loader (every loader of the engine), TrainLoader
"""
from .augment import check_auto_augment
from .decode import DECODERS, EncodedImage, decode_deferred, decode_pil, decode_uint8, pil_image, read_uint8
from .device import EncodedBatch, collate, to_model_input
from .keyed import KeyedSamples, keyed_rng, sample_seed
from .loader import LoaderSettings, TrainLoader, build_loader, check_batch_fits, eval_loader, train_loader
from .sampler import ResumableSampler, ShardOrderSampler, ShardSampler
from .sources import (
    BUNDLED_DATA,
    DATA_FORMATS,
    FolderSource,
    ImageSource,
    RawImage,
    detect_format,
    image_folder,
    open_source,
    source_from_args,
    train_order,
)
from .transforms import eval_transform, finetune_transform, linprobe_transform, pretrain_transform
from .uint8 import RandomResizedCropFlip, resize_crop

__all__ = [
    "BUNDLED_DATA", "DATA_FORMATS", "DECODERS", "EncodedBatch", "EncodedImage", "FolderSource", "ImageSource", "KeyedSamples",
    "LoaderSettings", "RandomResizedCropFlip", "RawImage", "ResumableSampler", "ShardOrderSampler", "ShardSampler", "TrainLoader",
    "build_loader", "check_auto_augment", "check_batch_fits", "collate", "decode_deferred", "decode_pil",
    "decode_uint8", "detect_format", "eval_loader", "eval_transform", "finetune_transform", "image_folder", "keyed_rng",
    "linprobe_transform", "open_source", "pil_image", "pretrain_transform", "read_uint8", "resize_crop",
    "sample_seed", "source_from_args", "to_model_input", "train_loader", "train_order",
]
