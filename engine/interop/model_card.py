"""The model card (README.md) of an export folder, written from what the checkpoint records: the
architecture, the data and its size, the epochs, the effective batch, the final loss (log.txt beside
the checkpoint), the command line, and how to load the folder with timm, transformers and this repo.
"""
import json
import os
import shlex
from typing import List, Optional

from util.walk import walk_once

from .export import Source, hf_class, official_names, timm_config

_SKIPPED_FLAGS = {"world_size", "local_rank", "dist_url", "dist_on_itp", "device", "port", "gpu", "rank",
                  "distributed", "dist_backend"}


def final_record(checkpoint: str) -> Optional[dict]:
    """The last line of the log.txt beside the checkpoint (one JSON record per epoch), if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.txt")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def dataset_size(data_path: Optional[str], split: str = "train") -> Optional[int]:
    """Images under <data_path>/<split>/<class>/ when the folder is there at export time."""
    if not data_path:
        return None
    from torchvision.datasets.folder import IMG_EXTENSIONS
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        return None
    return sum(name.lower().endswith(IMG_EXTENSIONS) for _, _, names in walk_once(root)
               for name in names)


def command_line(args: dict, script: str, parser) -> str:
    """The command the checkpoint's run was started with, as far as its flags tell: every recorded
    flag whose value differs from the CLI's default (an lr computed from --blr is left out)."""
    words = []
    by_dest = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    eff = effective_batch(args)
    for dest, value in args.items():
        if dest in _SKIPPED_FLAGS or dest not in by_dest:
            continue
        if dest == "lr" and value is not None and eff and args.get("blr") is not None and \
                abs(value - args["blr"] * eff / 256) <= 1e-9 * max(abs(value), 1e-12):
            continue
        actions = by_dest[dest]
        flag = next((a for a in actions if a.nargs == 0 and a.const == value), None)
        if flag is not None:
            if value != actions[0].default:
                words.append(flag.option_strings[0])
            continue
        action = next((a for a in actions if a.option_strings and a.nargs != 0), None)
        if action is None or value == action.default or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        words += [action.option_strings[0]] + [str(v) for v in values]
    world = int(args.get("world_size") or 1)
    launch = f"torchrun --nproc_per_node={world} " if world > 1 else "python "
    return launch + " ".join(shlex.quote(w) for w in [script] + words)


def effective_batch(args: dict) -> Optional[int]:
    if not args.get("batch_size"):
        return None
    return int(args["batch_size"]) * int(args.get("accum_iter") or 1) * int(args.get("world_size") or 1)


def _epochs(src: Source) -> str:
    ckpt, args = src.ckpt, src.args
    if src.epoch is None:
        return f"{args['epochs']} (--epochs; the checkpoint does not record its epoch)" if args.get("epochs") else \
            "not recorded"
    done = ckpt.get("epoch_iter", 1) >= ckpt.get("epoch_iters", 1)
    trained = src.epoch + 1 if done else src.epoch
    text = f"{trained}" + (f" of --epochs {args['epochs']}" if args.get("epochs") else "")
    if not done:
        text += f" (and {ckpt['epoch_iter']} of the {ckpt['epoch_iters']} iterations of epoch {src.epoch})"
    return text


def loading_snippets(src: Source, folder: str, target: str, encoder_only: bool = False) -> List[str]:
    """Markdown sections: how to load this folder with timm, transformers and this repo."""
    out = []
    if target == "timm":
        cfg = timm_config(src)
        args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
        out += ["### timm", "```python", "import timm",
                f'model = timm.create_model("local-dir:{folder}", pretrained=True)  # or "hf-hub:<user>/<repo>" '
                "once uploaded",
                "# the same, naming the file:",
                f'model = timm.create_model("{cfg["architecture"]}", pretrained=True, num_classes={cfg["num_classes"]},',
                f'                          pretrained_cfg_overlay=dict(file="{folder}/model.safetensors", '
                f'num_classes={cfg["num_classes"]}), {args})',
                "features = model.forward_features(images)  # (N, 1 + patches, width): the MAE encoder's output"
                if src.kind != "classify" else "logits = model(images)", "```"]
    if target == "transformers":
        cls = hf_class(src, encoder_only)
        extra = ", add_pooling_layer=False" if cls == "ViTModel" else ""
        use = {"ViTMAEForPreTraining": "out = model(pixel_values=images, noise=noise)  # out.loss, out.logits "
                                       "(pred), out.mask",
               "ViTModel": "features = model(pixel_values=images).last_hidden_state"}.get(
            cls, "logits = model(pixel_values=images).logits")
        out += ["### transformers", "```python", f"from transformers import {cls}",
                f'model = {cls}.from_pretrained("{folder}"{extra})', use, "```"]
    ours = _ours_command(src, folder, target, encoder_only)
    out += ["### this repo", "```bash", *ours, "```"]
    return out


def _ours_command(src: Source, folder: str, target: str, encoder_only: bool) -> List[str]:
    weights = folder
    if target == "official":
        weights = os.path.join(folder, next(iter(official_names(src).values())))
    if src.kind == "classify":
        return [f"python main_finetune.py --eval --resume {weights} --model {src.encoder_name} "
                f"--nb_classes {src.num_classes} --data_path <dataset>"]
    lines = [f"python main_finetune.py --finetune {weights} --model {src.encoder_name} --data_path <dataset>",
             f"python main_linprobe.py --finetune {weights} --model {src.encoder_name} --data_path <dataset>"]
    if src.kind == "pretrain" and (target == "official" or target == "transformers" and not encoder_only):
        if target == "official":
            weights = os.path.join(folder, official_names(src)["visualize"])
        lines.append(f"python scripts/visualize.py --checkpoint {weights} --images <images> --output_dir <folder>")
    return lines


def write_model_card(src: Source, folder: str, target: str, files: List[str], script: str, parser,
                     encoder_only: bool = False) -> str:
    """README.md in `folder`; script and parser: the CLI that trained the checkpoint (main_*.py)."""
    args = src.args
    record = final_record(src.path) or {}
    loss_key = "train_loss"
    final_loss = record.get(loss_key)
    n_images = dataset_size(args.get("data_path"), "train")
    arch = src.arch
    kind = {"pretrain": "MAE pretraining (encoder and decoder)", "encoder": "MAE encoder",
            "classify": "linear-probed classifier" if src.linear_probe else "fine-tuned classifier"}[src.kind]
    rows = [
        ("architecture", f"{src.model_name}: ViT, width {arch['embed_dim']}, {arch['depth']} blocks, "
                         f"{arch['num_heads']} heads, patch {arch['patch_size']}, {arch['img_size']} px"
                         + (f"; decoder width {src.decoder['embed_dim']}, {src.decoder['depth']} blocks"
                            if src.decoder else "")),
        ("weights", kind + (f", {src.num_classes} classes, "
                            f"{'global pool' if src.global_pool else 'class token'}" if src.kind == "classify" else "")),
        ("data", f"{args.get('data_path', 'not recorded')}"
                 + (f" ({n_images} images in train/)" if n_images is not None else " (size unknown at export time)")),
        ("epochs", _epochs(src)),
        ("effective batch", f"{effective_batch(args)} (batch_size {args.get('batch_size')} x accum_iter "
                            f"{args.get('accum_iter', 1)} x {args.get('world_size', 1)} processes)"
         if effective_batch(args) else "not recorded"),
        ("final loss", f"{final_loss:.4f} ({loss_key}, epoch {record.get('epoch')}, log.txt)"
         if isinstance(final_loss, (int, float)) else "not recorded (no log.txt beside the checkpoint)"),
        ("source checkpoint", os.path.abspath(src.path)),
    ]
    if isinstance(record.get("test_acc1"), (int, float)):
        rows.insert(-1, ("accuracy", f"top-1 {record['test_acc1']:.2f}%, top-5 {record.get('test_acc5', 0):.2f}% on "
                                     f"val/ (epoch {record.get('epoch')}; best top-1 "
                                     f"{record.get('max_accuracy', record['test_acc1']):.2f}%)"))
    if "norm_pix_loss" in args and src.kind == "pretrain":
        rows.insert(2, ("target", "normalised pixels (--norm_pix_loss)" if args["norm_pix_loss"] else "pixels"))
    lines = [f"# {src.model_name} ({target})", "", f"Exported by scripts/export.py --to {target}.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Command line", "", "```bash", command_line(args, script, parser) if args else "not recorded", "```", "",
             "## Files", "", *[f"- `{os.path.basename(f)}`" for f in files], "", "## How to load it", "",
             *loading_snippets(src, folder, target, encoder_only), ""]
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
