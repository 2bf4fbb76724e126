"""Our checkpoints in the formats of timm, transformers and the official MAE release (scripts/export.py).

    src = load_source("output_dir/checkpoint-last.pth")
    write_timm(src, "export/timm")              # model.safetensors + config.json (timm's hub layout)
    write_transformers(src, "export/hf")        # ViTMAEForPreTraining / ViTModel / ViTForImageClassification
    write_official(src, "export/official")      # mae_pretrain_*.pth (encoder) + mae_visualize_*.pth (full)

The architecture comes from the model the checkpoint records (args.model, built on the meta device),
else from the registered model whose keys and shapes the weights have. Keys are renamed by
models/mae.py's maps only; the configs are written here, as plain JSON (neither timm's nor
transformers' code is needed to export, and transformers is not a dependency). Each writer returns
the files written; the model card (engine/interop/model_card.py) is written beside them by the CLI.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models import registry
from models.mae import MaskedAutoencoderViT, to_hf_state_dict, to_timm_state_dict
from models.state_dict import checkpoint_kind, trained_input_size, without_decoder
from models.vit import VisionTransformer, fold_probe_head
from util.checkpoint_io import atomic_save
from util.errors import UserError

from ..checkpoint import matching_model, read_checkpoint

FORMAT_TAG = "mae-export"  # the safetensors metadata 'format_source' of our files
EVAL_CROP_PCT = 0.875       # the official evaluation transform: resize to size / 0.875, center crop
# Our registered encoders under timm's names (the same architecture at 224 pixels).
TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_base_patch16": "vit_base_patch16_224",
              "vit_large_patch16": "vit_large_patch16_224", "vit_huge_patch14": "vit_huge_patch14_224"}


@dataclass
class Source:
    """A checkpoint to export: its weights in the official layout and what it records."""
    path: str
    state: Dict[str, torch.Tensor]
    kind: str                   # checkpoint_kind: 'pretrain', 'encoder' or 'classify'
    args: dict                  # the recorded flags (empty for bare official files)
    model_name: str             # ours: mae_vit_base_patch16, vit_base_patch16, mae_vit_small_patch16_224, ...
    model: torch.nn.Module      # the architecture, on the meta device
    ckpt: dict = field(repr=False, default_factory=dict)

    @property
    def encoder_name(self) -> str:
        """The classifier name of the encoder (vit_base_patch16, vit_small_patch16_224, ...)."""
        name = self.model_name
        return registry.encoder_name(name)

    @property
    def timm_name(self) -> str:
        """timm's model of this encoder: its own name for timm encoders, else the timm ViT with this
        patch size; config.json's model_args give the exact sizes either way."""
        name = self.encoder_name
        if name in TIMM_NAMES:
            return TIMM_NAMES[name]
        import timm
        if timm.is_model(name):
            return name
        return f"vit_base_patch{self.arch['patch_size']}_224"

    @property
    def arch(self) -> dict:
        m = self.model
        block = m.blocks[0]
        dim = m.cls_token.shape[-1]
        return dict(img_size=self.img_size, patch_size=m.patch_embed.patch_size[0],
                    in_chans=m.patch_embed.proj.in_channels, embed_dim=dim, depth=len(m.blocks),
                    num_heads=block.attn.num_heads, mlp_hidden=block.mlp.fc1.out_features,
                    qkv_bias=block.attn.qkv.bias is not None, eps=block.norm1.eps)

    @property
    def img_size(self) -> int:
        return trained_input_size(self.state) or int(self.args.get("input_size") or 224)

    @property
    def decoder(self) -> Optional[dict]:
        """Decoder sizes of a pretraining model with its decoder, else None."""
        if self.kind != "pretrain" or not isinstance(self.model, MaskedAutoencoderViT):
            return None
        m = self.model
        return dict(embed_dim=m.decoder_embed.out_features, depth=len(m.decoder_blocks),
                    num_heads=m.decoder_blocks[0].attn.num_heads, mlp_hidden=m.decoder_blocks[0].mlp.fc1.out_features)

    @property
    def classifier_state(self) -> Dict[str, torch.Tensor]:
        """A classifier's tensors with a linear probe's BatchNorm folded into its head."""
        return fold_probe_head({k: v for k, v in self.state.items() if not k.endswith("num_batches_tracked")})

    @property
    def num_classes(self) -> int:
        return int(self.classifier_state["head.weight"].shape[0]) if self.kind == "classify" else 0

    @property
    def global_pool(self) -> bool:
        return "fc_norm.weight" in self.state

    @property
    def linear_probe(self) -> bool:
        return "head.0.running_mean" in self.state

    @property
    def epoch(self) -> Optional[int]:
        return self.ckpt.get("epoch") if isinstance(self.ckpt.get("epoch"), int) else None


def load_source(path: str, model_name: Optional[str] = None) -> Source:
    """The checkpoint at `path` (any source read_checkpoint takes) with its architecture; model_name
    (--model) for files that do not record it and cannot be told apart by their shapes."""
    ckpt = read_checkpoint(path, "--checkpoint")
    state = ckpt.get("model")
    if not isinstance(state, dict) or not state:
        raise UserError(f"--checkpoint {path} holds no model weights (no 'model' entry)")
    args = ckpt.get("args")
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else dict(args or {})
    kind = checkpoint_kind(state)
    task = "classify" if kind == "classify" else "pretrain"
    name = model_name or args.get("model")
    if name and task not in registry.model_task(name):
        # an encoder-only file recording a pretraining name, or a classifier name for encoder weights
        other = registry.counterpart(name)
        name = other if task in registry.model_task(other) else name
    if not name:
        timm_arch = args.get("timm_architecture")
        prefer = (timm_arch, registry.pretrain_name(timm_arch)) if timm_arch else ()
        name = matching_model(state, task, args.get("num_heads"), tuple(p for p in prefer if p))
        if kind == "encoder" and name is None:
            name = matching_model(state, "classify", args.get("num_heads"), tuple(p for p in prefer if p))
            task = "classify"
    if not name:
        raise UserError(f"--checkpoint {path} does not record its architecture and no registered model has its "
                        "shapes: pass --model (e.g. --model mae_vit_base_patch16)")
    model = _meta_model(name, task, state, args, path)
    return Source(path, state, kind, args, name, model, ckpt)


def _meta_model(name: str, task: str, state: dict, args: dict, path: str):
    size = trained_input_size(state) or int(args.get("input_size") or 224)
    kwargs = dict(img_size=size)
    if task == "pretrain":
        kwargs.update({k: int(args[k]) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
                       if args.get(k)})
    else:
        kwargs.update(global_pool="fc_norm.weight" in state,
                      num_classes=int(fold_probe_head(state).get("head.weight", torch.zeros(0)).shape[0]))
    try:
        with torch.device("meta"):
            model = registry.create_model(name, task, **kwargs)
    except ValueError as e:
        raise UserError(f"--checkpoint {path}: {e}") from None
    if not isinstance(model, (MaskedAutoencoderViT, VisionTransformer)):
        raise UserError(f"--checkpoint {path} is a {name} ({type(model).__name__}): export writes plain-ViT models "
                        "(the MAE models and mae_<timm ViT>), which timm and transformers have; this family has no "
                        "counterpart there")
    own = model.state_dict()
    if task == "pretrain" and checkpoint_kind(state) == "encoder":
        own = without_decoder(own)
    bad = [k for k in own if k not in state and not k.startswith(("head.", "fc_norm."))] + \
        [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if bad:
        raise UserError(f"--checkpoint {path} does not fit {name} (e.g. {', '.join(bad[:3])}): pass the --model "
                        "it was trained with")
    return model


def _metadata(src: Source, arch: str, target: str) -> Dict[str, str]:
    """safetensors metadata (strings only): what the file is and where it comes from."""
    return {"format": "pt", "format_source": FORMAT_TAG, "target": target, "arch": arch, "model": src.model_name,
            "source_checkpoint": os.path.abspath(src.path),
            "epoch": "" if src.epoch is None else str(src.epoch),
            "args": json.dumps({**src.args, "model": src.model_name})}


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """Contiguous, unshared copies (safetensors refuses views of one storage), atomically written."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _write_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _mlp_ratio(hidden: int, dim: int) -> float:
    """timm's Block builds int(dim * mlp_ratio) hidden units: a ratio that lands on `hidden`."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


# ---------------------------------------------------------------------------------------------- timm
def timm_config(src: Source) -> dict:
    """timm's hub config.json (timm.models._hub.save_for_hf's layout): 'architecture', 'num_classes',
    'num_features', 'global_pool', 'model_args' (the exact sizes) and 'pretrained_cfg'."""
    a = src.arch
    pool = "avg" if src.global_pool else "token"
    model_args = dict(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                      embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"],
                      mlp_ratio=_mlp_ratio(a["mlp_hidden"], a["embed_dim"]), qkv_bias=a["qkv_bias"],
                      global_pool=pool)
    size = a["img_size"]
    return {
        "architecture": src.timm_name,
        "num_classes": src.num_classes,
        "num_features": a["embed_dim"],
        "global_pool": pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "mae", "custom_load": False, "input_size": [a["in_chans"], size, size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": EVAL_CROP_PCT, "crop_mode": "center",
            "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD), "num_classes": src.num_classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head", "license": "cc-by-nc-4.0",
        },
    }


def write_timm(src: Source, folder: str) -> List[str]:
    """model.safetensors + config.json that timm loads as its own pretrained weights: the encoder
    (num_classes 0, class-token pooling: forward_features is our encoder's output) or the classifier."""
    os.makedirs(folder, exist_ok=True)
    state = src.classifier_state if src.kind == "classify" else to_timm_state_dict(src.state)
    config = timm_config(src)
    weights = os.path.join(folder, "model.safetensors")
    save_safetensors(state, weights, _metadata(src, config["architecture"], "timm"))
    _write_json(config, os.path.join(folder, "config.json"))
    return [weights, os.path.join(folder, "config.json")]


# --------------------------------------------------------------------------------------- transformers
def hf_class(src: Source, encoder_only: bool = False) -> str:
    if src.kind == "classify":
        return "BeitForImageClassification" if src.global_pool else "ViTForImageClassification"
    return "ViTMAEForPreTraining" if src.kind == "pretrain" and not encoder_only else "ViTModel"


def transformers_config(src: Source, encoder_only: bool = False) -> dict:
    """config.json of the transformers class hf_class() names (written by hand: no transformers import)."""
    a = src.arch
    cls = hf_class(src, encoder_only)
    config = {"architectures": [cls], "hidden_size": a["embed_dim"], "num_hidden_layers": a["depth"],
              "num_attention_heads": a["num_heads"], "intermediate_size": a["mlp_hidden"], "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
              "layer_norm_eps": a["eps"], "image_size": a["img_size"], "patch_size": a["patch_size"],
              "num_channels": a["in_chans"], "qkv_bias": True, "torch_dtype": "float32"}
    if cls == "ViTMAEForPreTraining":
        d = src.decoder
        config.update(model_type="vit_mae", decoder_hidden_size=d["embed_dim"], decoder_num_hidden_layers=d["depth"],
                      decoder_num_attention_heads=d["num_heads"], decoder_intermediate_size=d["mlp_hidden"],
                      norm_pix_loss=bool(src.args.get("norm_pix_loss", False)),
                      mask_ratio=float(src.args.get("mask_ratio") or 0.75))
    elif cls == "BeitForImageClassification":
        # A plain ViT in BEiT's class: absolute positions, no relative bias, no layer scale, mean pooling.
        config.update(model_type="beit", use_mask_token=False, use_absolute_position_embeddings=True,
                      use_relative_position_bias=False, use_shared_relative_position_bias=False,
                      layer_scale_init_value=0.0, drop_path_rate=0.0, use_mean_pooling=True)
        config.pop("qkv_bias")
    else:
        config.update(model_type="vit")
    if src.kind == "classify":
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(src.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(src.num_classes)}
    return config


def transformers_state_dict(src: Source, encoder_only: bool = False) -> Dict[str, torch.Tensor]:
    cls = hf_class(src, encoder_only)
    state = src.classifier_state if src.kind == "classify" else dict(src.state)
    if cls == "ViTModel":
        state = without_decoder(state)
    if not src.arch["qkv_bias"]:  # transformers' ViT has one qkv_bias for all blocks: zeros are the same function
        for k in [k for k in state if k.endswith(".attn.qkv.weight") and k.startswith("blocks.")]:
            state[k[:-len("weight")] + "bias"] = torch.zeros(state[k].shape[0], dtype=state[k].dtype)
    prefix = {"ViTModel": "", "BeitForImageClassification": "beit."}.get(cls, "vit.")
    return to_hf_state_dict(state, prefix, beit=cls == "BeitForImageClassification")


def write_transformers(src: Source, folder: str, encoder_only: bool = False) -> List[str]:
    """config.json + model.safetensors (+ preprocessor_config.json) for from_pretrained(folder)."""
    os.makedirs(folder, exist_ok=True)
    config = transformers_config(src, encoder_only)
    weights = os.path.join(folder, "model.safetensors")
    save_safetensors(transformers_state_dict(src, encoder_only), weights,
                     _metadata(src, config["architectures"][0], "transformers"))
    _write_json(config, os.path.join(folder, "config.json"))
    size = src.arch["img_size"]
    preprocessor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                    "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_DEFAULT_MEAN),
                    "image_std": list(IMAGENET_DEFAULT_STD)}
    _write_json(preprocessor, os.path.join(folder, "preprocessor_config.json"))
    return [weights, os.path.join(folder, "config.json"), os.path.join(folder, "preprocessor_config.json")]


# ------------------------------------------------------------------------------------------ official
def official_names(src: Source) -> Dict[str, str]:
    """The official release file names: mae_pretrain_<arch>.pth (encoder), mae_visualize_<arch>.pth
    (encoder and decoder), mae_finetuned_<arch>.pth (classifier)."""
    short = src.encoder_name
    if src.kind == "classify":
        return {"finetuned": f"mae_finetuned_{short}.pth"}
    names = {"pretrain": f"mae_pretrain_{short}.pth"}
    if src.kind == "pretrain":
        names["visualize"] = f"mae_visualize_{short}.pth"
    return names


def write_official(src: Source, folder: str) -> List[str]:
    """The official release files, {'model': state dict}: torch pickles by definition (the official
    code torch.loads them), holding only tensors and plain data ('args', 'epoch': weights_only loads)."""
    os.makedirs(folder, exist_ok=True)
    extra = {"args": {**src.args, "model": src.model_name}, **({"epoch": src.epoch} if src.epoch is not None else {})}
    tensors = {k: v for k, v in src.state.items() if torch.is_tensor(v)}
    written = []
    for what, name in official_names(src).items():
        state = without_decoder(tensors) if what == "pretrain" else tensors
        path = os.path.join(folder, name)
        atomic_save({"model": {k: v.contiguous() for k, v in state.items()}, **extra}, path)
        written.append(path)
    return written


WRITERS = {"timm": write_timm, "transformers": write_transformers, "official": write_official}
