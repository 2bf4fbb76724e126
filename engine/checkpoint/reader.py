"""The one reader of checkpoints and weights, whatever the door (--resume, automatic resume,
--finetune, --eval --resume, scripts/visualize.py, scripts/export.py, scripts/convert_checkpoint.py),
and the checks that a checkpoint's weights fit the model they are loaded into.

    ckpt = read_checkpoint(path, "--finetune")  # {'model': state dict in the official layout, 'args': ..., '_path': path}
"""
import logging
from typing import Optional

import torch

from models import registry
from models.state_dict import checkpoint_kind, other_head_pooling, trained_input_size, without_decoder
from util.checkpoint_io import CheckpointError, load_checkpoint_file
from util.errors import UserError

from ..distributed import DDPStrategy
from . import dcp
from .foreign import read_weight_source
from .format import FORMAT_VERSION, is_sharded, recorded_args

log = logging.getLogger("mae")


def read_checkpoint(path: str, flag: Optional[str] = None, foreign: bool = True, gather: bool = True) -> dict:
    """Any checkpoint as a dict of ours, with '_path'. flag: the option that named it, for messages.

    foreign: also the weights of other libraries (transformers / timm folders, safetensors, torch
    files in their layouts: engine/checkpoint/foreign.py); a run's own checkpoints are read
    as they are. A sharded checkpoint directory (--dist_strategy fsdp) is gathered into the
    single-file format, or with gather=False only its plain entries are read, with '_sharded': a
    sharded strategy then loads its slices (dcp.load_into) and no process holds all of it."""
    if is_sharded(path):
        ckpt = dcp.load_full(path, flag) if gather else dcp.load_meta(path, flag)
    else:
        ckpt = read_weight_source(path, flag) if foreign else load_checkpoint_file(path, flag)
    version = ckpt.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{flag or 'checkpoint'} {path} has checkpoint format {version}, newer than the {FORMAT_VERSION} "
                        "this code reads: update the code (git pull) to the version that wrote it")
    ckpt["_path"] = path
    return ckpt


def weights_of(ckpt: dict) -> dict:
    """The state dict of a read checkpoint: its 'model', or the file itself when it has none (the
    callers name what is missing), without the reader's own entries."""
    if isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    return {k: v for k, v in ckpt.items() if k not in ("_path", "_format")}


def mismatch_report(own: dict, state: dict, allowed_missing=()) -> str:
    """'missing keys: ...; unexpected keys: ...; shape mismatch: ...' (empty when they fit)."""
    missing = [k for k in own if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    return "; ".join(f"{what}: {', '.join(keys[:6])}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                     for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatch", shapes)) if keys)


def load_model_weights(model, state_dict: dict, source: str, recorded: Optional[dict] = None,
                       model_name: Optional[str] = None, strategy=None) -> None:
    """Strict load with a one-line error naming the mismatching keys, what the checkpoint is when
    it is of another kind (e.g. pretraining weights given to a classifier), and the architecture
    the checkpoint records (`recorded`: its args) against this run's `model_name`. `strategy`
    loads the weights (a sharded model takes its slices of them)."""
    problems = mismatch_report(model.state_dict(), state_dict)
    if not problems:
        (strategy or DDPStrategy()).load_model_state(model, state_dict)
        return
    have, want = checkpoint_kind(state_dict), checkpoint_kind(model.state_dict())
    saved = (recorded or {}).get("model")
    what = f" of {saved}" if saved else ""
    if want == "classify" and have == "pretrain":
        raise UserError(f"checkpoint {source} is a pretraining checkpoint{what} (encoder and decoder), not a "
                        f"classifier: start fine-tuning or linear probing from it with --finetune {source}; "
                        "--resume and --eval take the checkpoints of a fine-tuning or linear-probing run")
    if want == "classify" and have == "encoder":
        raise UserError(f"checkpoint {source} holds encoder weights without a classification head (like the "
                        f"official mae_pretrain_vit_*.pth): start from it with --finetune {source}; --resume and "
                        "--eval take the checkpoints of a fine-tuning or linear-probing run")
    if want == "pretrain" and have == "classify":
        raise UserError(f"checkpoint {source} is a classifier{what} (fine-tuned or linear-probed), not a "
                        "pretraining checkpoint: resume pretraining from a checkpoint of main_pretrain.py, or "
                        "evaluate this one with main_finetune.py --eval --resume")
    other_head = other_head_pooling(model.state_dict(), state_dict)
    if want == have == "classify" and other_head:
        head = ("--global_pool (averaged patch tokens, fc_norm)" if other_head == "avg"
                else "--cls_token (class token after the final norm)")
        raise UserError(f"checkpoint {source} does not fit the model ({problems}): its head was trained with "
                        f"{head}; pass that flag")
    ours = f"--model {model_name}" if model_name else "the model"
    if saved:
        size = (recorded or {}).get("input_size")
        flags = f"--model {saved}" + (f" --input_size {size}" if size else "")
        fix = f"it records {flags}: use the same flags" if saved != model_name else \
            "check --input_size and the model flags against the checkpoint"
    else:
        fix = "check --model/--input_size against the checkpoint"
    raise UserError(f"checkpoint {source} does not fit {ours} ({problems}): {fix}")


def load_pretrained_encoder(model, path: str, head_init_std: float, model_name: Optional[str] = None,
                            strategy=None) -> None:
    """--finetune: encoder weights from a pretraining checkpoint into a classifier.

    Accepts this project's checkpoints, official ones ({'model': ...}) and bare encoder state
    dicts. The classifier adapts them (models/base.py PretrainedClassifier.adapt_pretrained: the
    decoder dropped, position tables fitted to its grid, ...) and re-initialises its head
    (trunc_normal, std head_init_std). Only its allowed_missing_keys may be missing; anything
    else missing or unexpected is an error.
    """
    ckpt = read_checkpoint(path, "--finetune")
    if "_format" in ckpt:  # transformers / timm / safetensors weights: name both architectures
        check_architecture(model.state_dict(), ckpt, path, "--finetune", model_name)
    state = weights_of(ckpt)
    try:
        state = model.adapt_pretrained(state)
    except ValueError as e:
        raise UserError(str(e)) from None
    problems = mismatch_report(model.state_dict(), state, model.allowed_missing_keys)
    if problems:
        saved = recorded_args(ckpt).get("model")
        what = f" (it records --model {saved})" if saved else ""
        raise UserError(f"--finetune checkpoint {path} does not fit {type(model).__name__} "
                        f"({problems}): check that --model matches the pretrained encoder{what}")
    (strategy or DDPStrategy()).load_model_state(model, state, strict=False)
    (strategy or DDPStrategy()).init_head(model, head_init_std)
    log.info("Loaded pre-trained encoder from %s", path)


def describe_vit(state: dict) -> str:
    """'ViT width 768, 12 blocks, patch 16': the encoder of a plain-ViT state dict ('' when it is not one)."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.dim() != 4 or "cls_token" not in state or "blocks.0.norm1.weight" not in state:
        return ""  # not a plain ViT (MixMIM's stages, ...): the key-by-key report of the caller applies
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return f"ViT width {proj.shape[0]}, {depth} blocks, patch {proj.shape[-1]}"


def check_architecture(own: dict, ckpt: dict, path: str, flag: str, model_name: Optional[str]) -> None:
    """One line naming both architectures when the weights are of another ViT than the model
    (`own`: the model's state dict): width, depth or patch size differ."""
    state = ckpt.get("model", {})
    have, want = describe_vit(state), describe_vit(own)
    if not have or not want or have == want:
        return
    args = recorded_args(ckpt)
    name = args.get("model") or args.get("timm_architecture") or ckpt.get("_format")
    theirs = f"{name} ({have})" if name else have
    ours = f"--model {model_name} ({want})" if model_name else f"this model ({want})"
    fix = "pass the --model of those weights"
    if name and model_name:
        task = registry.model_task(model_name)
        for candidate in (name, registry.counterpart(name)):
            if candidate != model_name and set(task) & set(registry.model_task(candidate)):
                fix = f"pass --model {candidate}"
                break
    raise CheckpointError(f"{flag + ' ' if flag else ''}{path} holds the weights of {theirs}, not of {ours}: {fix}, or give "
                          "weights of this architecture")


def matching_model(state: dict, task: str, num_heads: Optional[int] = None,
                   prefer: tuple = ()) -> Optional[str]:
    """The first model name (`prefer` first, then the registered ones) of `task` whose state dict has
    the keys and shapes of `state` (and num_heads attention heads, when known): the architecture of
    a file that does not record it (official release files, transformers and timm folders)."""
    size = trained_input_size(state) or 224
    wanted = state if task == "pretrain" else without_decoder(state)
    for name in list(prefer) + registry.list_models(task=task):
        try:
            with torch.device("meta"):
                model = registry.create_model(name, task, img_size=size, **_decoder_of(state, task))
        except (ValueError, TypeError, RuntimeError):
            continue
        own = model.state_dict()
        heads = getattr(getattr(getattr(model, "blocks", [None])[0], "attn", None), "num_heads", None)
        if num_heads is not None and heads != num_heads:
            continue
        keys = [k for k in own if task == "pretrain" or not k.startswith(("head.", "fc_norm."))]
        if all(k in wanted and wanted[k].shape == own[k].shape for k in keys) and \
                all(k in own for k in wanted if not k.startswith(("head.", "fc_norm.", "norm."))):
            return name
    return None


def _decoder_of(state: dict, task: str) -> dict:
    """The decoder sizes a pretraining state dict shows (its heads are not in the shapes: the
    model's own, so a non-default head count needs the recorded args)."""
    if task != "pretrain" or "decoder_embed.weight" not in state:
        return {}
    depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    return {"decoder_embed_dim": state["decoder_embed.weight"].shape[0], "decoder_depth": depth}
