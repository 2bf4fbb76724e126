"""Weights of other libraries as a checkpoint of ours: transformers and timm folders, .safetensors
files, and torch files of any origin (ours, official, timm's, a transformers pytorch_model.bin).
engine/checkpoint/reader.py is the one door: it sends every source that is not a sharded
checkpoint directory here.

Sources: a transformers folder (config.json with model_type vit_mae / vit, model.safetensors or
pytorch_model.bin) and a timm folder (config.json with 'architecture', the hub layout our export
writes too). Keys are converted by the maps of models/mae.py; what the source tells of its
architecture goes into 'args' (model, input_size, norm_pix_loss, decoder sizes), so the callers'
messages and the decoder reconstruction work as for our own checkpoints. Every bad source is one
line (CheckpointError, exit 2).
"""
import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.mae import from_hf_state_dict, from_timm_state_dict, is_hf_state_dict
from util.checkpoint_io import CheckpointError, check_checkpoint_file, load_checkpoint_file, os_error_text

SAFETENSORS_NAME, INDEX_NAME, CONFIG_NAME = "model.safetensors", "model.safetensors.index.json", "config.json"
TORCH_NAMES = ("pytorch_model.bin", "open_clip_pytorch_model.bin")
HF_MODEL_TYPES = ("vit_mae", "vit")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _named(path: str, flag: Optional[str]) -> str:
    return f"{flag} {path}" if flag else path


def is_safetensors(path: str) -> bool:
    return path.endswith(".safetensors")


def check_safetensors_file(path: str, flag: Optional[str] = None) -> dict:
    """The header of a safetensors file ({'__metadata__': ..., name: {dtype, shape, data_offsets}}),
    checked against the file size, without reading the tensors; a truncated file is one line."""
    what = _named(path, flag)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= min(_MAX_HEADER, size - 8) else None
    except OSError as e:
        raise CheckpointError(f"cannot read {what}: {os_error_text(e)}") from None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} is truncated or not a safetensors file (its header is incomplete): copy or "
                              "export it again")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{what} is truncated ({size} bytes, its header announces {8 + n + end}): copy or "
                              "export it again")
    return header


def _load_safetensors(path: str, flag: Optional[str]):
    """(tensors, metadata) of a safetensors file."""
    header = check_safetensors_file(path, flag)
    try:
        return load_file(path, device="cpu"), header.get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{_named(path, flag)} is corrupt ({str(e).splitlines()[0][:200]}): copy or export "
                              "it again") from None


def _folder_format(path: str, flag: Optional[str]):
    """(config, weight file paths) of a transformers or timm folder; one line for any other folder."""
    what = _named(path, flag)
    neither = (f"{what} is a folder that is neither a transformers folder (config.json with model_type "
               f"{' or '.join(HF_MODEL_TYPES)}, and {SAFETENSORS_NAME}) nor a timm folder (config.json with "
               f"'architecture', and {SAFETENSORS_NAME}): give such a folder or a checkpoint file")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{what} is a folder, not a checkpoint file: give a .pth file inside it, a "
                              "sharded checkpoint-* directory of a --dist_strategy fsdp run, or a transformers "
                              f"or timm folder (it has no {CONFIG_NAME}: with model_type "
                              f"{' or '.join(HF_MODEL_TYPES)}, or 'architecture', and {SAFETENSORS_NAME})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: cannot read {config_path} ({str(e)[:200]}): copy or export the folder "
                              "again") from None
    is_hf = isinstance(config, dict) and config.get("model_type") in HF_MODEL_TYPES
    is_timm = isinstance(config, dict) and isinstance(config.get("architecture"), str)
    if not (is_hf or is_timm):
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(neither + (f" (its model_type is {kind})" if kind else ""))
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):  # transformers' sharded weights
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{what}: cannot read {index} ({str(e)[:200]})") from None
        return config, [os.path.join(path, s) for s in shards]
    for name in (SAFETENSORS_NAME,) + TORCH_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return config, [os.path.join(path, name)]
    raise CheckpointError(f"{what} has a {CONFIG_NAME} but no weights ({SAFETENSORS_NAME} or {TORCH_NAMES[0]}): "
                          "copy or export the folder again")


def check_weights_source(path: str, flag: Optional[str] = None) -> None:
    """The cheap checks of read_weight_source (preflight): the path exists and is a supported source."""
    if os.path.isdir(path):
        _, files = _folder_format(path, flag)
        for file in files:
            if is_safetensors(file):
                check_safetensors_file(file, flag)
            else:
                check_checkpoint_file(file, flag)
    elif os.path.isfile(path) and is_safetensors(path):
        check_safetensors_file(path, flag)
    else:
        check_checkpoint_file(path, flag)


def _args_from_hf_config(config: dict) -> dict:
    """The flags of ours that a transformers config fixes (engine/pretrain_model.py reads the decoder)."""
    args = {"input_size": config.get("image_size")}
    if config.get("model_type") == "vit_mae":
        args.update(norm_pix_loss=bool(config.get("norm_pix_loss", False)), mask_ratio=config.get("mask_ratio"),
                    decoder_embed_dim=config.get("decoder_hidden_size"),
                    decoder_depth=config.get("decoder_num_hidden_layers"),
                    decoder_num_heads=config.get("decoder_num_attention_heads"))
    return {k: v for k, v in args.items() if v is not None}


def _args_from_timm_config(config: dict) -> dict:
    size = (config.get("pretrained_cfg") or {}).get("input_size")
    args = {"timm_architecture": config["architecture"]}
    if isinstance(size, (list, tuple)) and len(size) == 3 and size[1] == size[2]:
        args["input_size"] = int(size[1])
    return args


def _read_folder(path: str, flag: Optional[str]) -> dict:
    config, files = _folder_format(path, flag)
    state, metadata = {}, {}
    for file in files:
        if is_safetensors(file):
            tensors, meta = _load_safetensors(file, flag)
            metadata.update(meta)
        else:
            loaded = load_checkpoint_file(file, flag)
            tensors = loaded.get("state_dict", loaded)
        state.update(tensors)
    recorded = _recorded_from_metadata(metadata)
    if config.get("model_type") in HF_MODEL_TYPES:
        fmt = f"transformers {(config.get('architectures') or [config['model_type']])[0]}"
        args = {**_args_from_hf_config(config), **recorded}
    else:
        fmt = f"timm {config['architecture']}"
        args = {**_args_from_timm_config(config), **recorded}
    return {"model": _our_layout(state, path, flag), "args": args, "_format": fmt}


def _recorded_from_metadata(metadata: dict) -> dict:
    """The args our export stores in the safetensors metadata ('args', JSON)."""
    try:
        args = json.loads(metadata.get("args", "{}"))
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _our_layout(state: dict, path: str, flag: Optional[str]) -> dict:
    """A foreign state dict in the official layout: transformers' keys mapped, timm's prefix dropped."""
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if is_hf_state_dict(tensors):
        try:
            return from_hf_state_dict(tensors)
        except ValueError as e:
            raise CheckpointError(f"{_named(path, flag)}: {e}; it is not a ViT / ViTMAE of transformers") from None
    return from_timm_state_dict(tensors)


def read_weight_source(path: str, flag: Optional[str] = None) -> dict:
    """A weight source other than a sharded checkpoint directory as a checkpoint dict of ours: 'model'
    holds the state dict in the official layout; a torch checkpoint keeps its other entries
    (optimizer, epoch, args: our own checkpoints resume fully), the other sources have 'args' (what
    they tell of the architecture) and '_format' (e.g. 'transformers ViTMAEForPreTraining', for
    messages)."""
    if os.path.isdir(path):
        return _read_folder(path, flag)
    if os.path.isfile(path) and is_safetensors(path):
        tensors, metadata = _load_safetensors(path, flag)
        return {"model": _our_layout(tensors, path, flag), "args": _recorded_from_metadata(metadata),
                "_format": "safetensors"}
    ckpt = load_checkpoint_file(path, flag)
    # ours and official: 'model'; timm's training checkpoints: 'state_dict' (and its EMA)
    key = next((k for k in ("model", "state_dict", "state_dict_ema") if isinstance(ckpt.get(k), dict)), None)
    state = ckpt[key] if key is not None else ckpt if ckpt and all(torch.is_tensor(v) for v in ckpt.values()) \
        else None  # a bare state dict (official, timm, transformers)
    if state is None:
        return ckpt  # no weights: the callers name what is missing
    # Files of other libraries are told apart for messages: transformers' keys, timm's training checkpoints.
    foreign = "transformers" if is_hf_state_dict(state) else "timm" if key in ("state_dict", "state_dict_ema") else ""
    out = {**(ckpt if key is not None else {}), "model": _our_layout(state, path, flag)}
    return {**out, "_format": foreign} if foreign else out
