"""The MAE paper's ablation knobs: the decoder's depth, width and heads (Table 1a/1b) as flags that
checkpoints record and resumes, visualisation and fine-tuning respect; and any standard timm ViT
as the encoder (mae_<timm name>), with its classifier (<timm name>) for fine-tuning."""
import argparse
import importlib.util
import shutil
import subprocess
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

import models
from engine.checkpoint import load_pretrained_encoder
from engine.pretrain import PretrainRecipe
from models import MaskedAutoencoderViT, timm_vit
from util.cli import run_cli
from util.errors import UserError

from conftest import MINI, REPO, assert_ok, cli_env, main_cmd, one_line_error, pretrain, run_main

DEC = ["--decoder_depth", 1, "--decoder_embed_dim", 32, "--decoder_num_heads", 2]
DEC_ARCH = dict(decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
TIMM_VIT = "vit_tiny_patch16_224"  # 192-d, 12 blocks, 3 heads: the smallest plain timm ViT


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def decoder_shape(state: dict) -> dict:
    """Depth and width of the decoder in a state dict (the weights do not show the heads)."""
    depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    return dict(decoder_depth=depth, decoder_embed_dim=state["decoder_embed.weight"].shape[0])


def encoder_layout(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}


# ----------------------------------------------------------------------------- decoder arguments
def test_decoder_arguments_change_the_model():
    default = models.create_model("mae_vit_mini_patch16", img_size=64)
    torch.manual_seed(0)
    m = models.create_model("mae_vit_mini_patch16", img_size=64, **DEC_ARCH)
    assert m.decoder_arch == DEC_ARCH and default.decoder_arch == dict(decoder_depth=2, decoder_embed_dim=64,
                                                                         decoder_num_heads=4)
    assert len(m.decoder_blocks) == 1 and m.decoder_blocks[0].attn.num_heads == 2
    assert m.decoder_embed.weight.shape == (32, 128) and m.mask_token.shape == (1, 1, 32)
    assert m.decoder_pos_embed.shape == (1, 17, 32) and m.decoder_pred.weight.shape == (16 * 16 * 3, 32)
    assert m.decoder_blocks[0].mlp.fc1.out_features == 4 * 32
    assert encoder_layout(m.state_dict()) == encoder_layout(default.state_dict())  # the encoder is untouched
    loss, pred, mask = m(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(loss) and pred.shape == (2, 16, 768) and mask.sum() == 2 * 12


@pytest.mark.parametrize("depth, width", [(1, 128), (8, 1024), (12, 512)])
def test_paper_table_1_decoders_on_vit_large(depth, width):
    with torch.device("meta"):
        m = models.create_model("mae_vit_large_patch16", decoder_depth=depth, decoder_embed_dim=width,
                                decoder_num_heads=16)
    assert len(m.decoder_blocks) == depth and m.decoder_norm.weight.shape == (width,)
    assert m.blocks[0].attn.qkv.weight.shape == (3 * 1024, 1024) and len(m.blocks) == 24


def test_indivisible_widths_are_value_errors():
    with pytest.raises(ValueError, match="^decoder_embed_dim 30 is not divisible by decoder_num_heads 4$"):
        MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=30,
                             decoder_num_heads=4)
    with pytest.raises(ValueError, match="^embed_dim 30 is not divisible by num_heads 4$"):
        MaskedAutoencoderViT(img_size=32, patch_size=16, embed_dim=30, depth=1, num_heads=4)


# ----------------------------------------------------------------------------- timm encoders
def timm_meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch8_224", "deit_tiny_patch16_224"])
def test_timm_encoder_has_timm_architecture_and_default_decoder(name):
    with torch.device("meta"):
        mae = models.create_model("mae_" + name, img_size=64)
        clf = models.create_model(name, img_size=64, num_classes=10, global_pool=False)
    ref = timm_meta(name, img_size=64, num_classes=10)
    ref_layout = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # The MAE encoder has timm's keys and shapes (minus the head); the classifier has all of them.
    assert encoder_layout(mae.state_dict()) == {k: v for k, v in ref_layout.items() if not k.startswith("head.")}
    assert {k: tuple(v.shape) for k, v in clf.state_dict().items()} == ref_layout
    assert isinstance(clf, models.VisionTransformer)
    assert mae.patch_size == ref.patch_embed.patch_size[0] and mae.norm.eps == ref.blocks[0].norm1.eps
    # The paper's default decoder: 512-d, 8 blocks, 16 heads, MLP ratio 4.
    assert mae.decoder_arch == dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    assert mae.decoder_blocks[0].mlp.fc1.out_features == 2048
    # Without img_size, timm's default size.
    with torch.device("meta"):
        assert models.create_model("mae_" + name).patch_embed.img_size == (224, 224)


def test_timm_encoder_keeps_qkv_bias_and_mlp_ratio():
    with torch.device("meta"):
        no_bias = models.create_model("mae_vit_base_patch16_224_miil", img_size=64)  # qkv_bias=False
        giant = models.create_model("mae_vit_giant_patch14_224", img_size=56, decoder_depth=1)  # MLP ratio 48/11
    assert no_bias.blocks[0].attn.qkv.bias is None and no_bias.decoder_blocks[0].attn.qkv.bias is not None
    assert giant.blocks[0].mlp.fc1.out_features == timm_meta("vit_giant_patch14_224").blocks[0].mlp.fc1.out_features
    assert giant.decoder_blocks[0].mlp.fc1.out_features == 2048


def test_timm_encoder_is_initialised_like_a_direct_construction():
    """Reading timm's architecture (a meta-device build) draws no random numbers: a seed gives the
    weights of MaskedAutoencoderViT built directly with that architecture."""
    timm_vit._timm_arch.cache_clear()
    torch.manual_seed(0)
    a = models.create_model("mae_vit_small_patch8_224", img_size=32, decoder_depth=1).state_dict()
    torch.manual_seed(0)
    b = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=384, depth=12, num_heads=6, decoder_depth=1,
                             decoder_mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, reason", [
    ("vit_small_patch14_reg4_dinov2", "it has 4 register tokens"),
    ("vit_small_patch14_dinov2", "its blocks.0.ls1 is LayerScale() where a standard ViT has Identity() "
                                 "(layer scale)"),
    ("vit_base_patch16_clip_224", "pre_norm, as CLIP"),
    ("vit_base_patch16_siglip_224", "it has no class token"),
    ("vit_small_patch16_18x2_224", "its blocks.0 is of class ParallelThingsBlock, not timm's Block"),
    # The module's own repr: torch versions differ in it (bias=True or not).
    ("beit3_base_patch16_224", f"its blocks.0.attn.norm is {nn.LayerNorm(768, eps=1e-5)!r} where a standard ViT "
                               "has Identity() (a norm inside attention)"),
    ("deit_tiny_distilled_patch16_224", "is of class VisionTransformerDistilled, not VisionTransformer"),
    ("resnet18", "is of class ResNet, not VisionTransformer"),
])
def test_non_standard_timm_models_are_refused(name, reason):
    for model_name, task in (("mae_" + name, "pretrain"), (name, "classify")):
        with pytest.raises(ValueError) as e:
            models.create_model(model_name, task, img_size=64)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"timm's {name} ") and reason in msg, msg


def test_names_and_rule():
    assert models.model_task("mae_vit_small_patch16_224") == ["pretrain"]
    assert models.model_task(TIMM_VIT) == ["classify"]
    assert models.model_task("mae_vit_nope") == []
    assert not models.list_models("mae_vit_small")  # timm names are resolved, not listed
    # Registered names win over timm's: the repo's tiny MAE has its own small decoder.
    with torch.device("meta"):
        assert models.create_model("mae_vit_tiny_patch16").decoder_arch["decoder_embed_dim"] == 128
        assert models.create_model("mae_vit_tiny_patch16_224").decoder_arch["decoder_embed_dim"] == 512
    with pytest.raises(ValueError) as e:
        models.create_model("mae_vit_nope", "pretrain")
    assert str(e.value).startswith("unknown model 'mae_vit_nope'; choose one of: mae_vit_2b_patch14, "
                                   "mae_vit_6p5b_patch14, mae_vit_base_patch16, ")
    assert str(e.value).endswith(", or mae_<timm ViT name> (e.g. mae_vit_small_patch16_224)")
    with pytest.raises(ValueError, match=r", or <timm ViT name> \(e.g. vit_small_patch16_224\)$"):
        models.create_model("vit_nope", "classify")


# ----------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def ablation_run(photos, tmp_path_factory):
    """One epoch of the mini MAE with a 1-block, 32-d, 2-head decoder."""
    out = tmp_path_factory.mktemp("ablation")
    assert_ok(pretrain([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--output_dir", out,
                        *DEC]))
    return out


def test_checkpoint_records_the_decoder(ablation_run):
    ckpt = load(ablation_run / "checkpoint-last.pth")
    assert {k: ckpt["args"][k] for k in DEC_ARCH} == DEC_ARCH
    assert decoder_shape(ckpt["model"]) == dict(decoder_depth=1, decoder_embed_dim=32)
    assert ckpt["model"]["decoder_blocks.0.attn.qkv.weight"].shape == (96, 32)


def test_resume_without_the_flags_rebuilds_the_recorded_decoder(ablation_run, photos, tmp_path):
    out = shutil.copytree(ablation_run, tmp_path / "run")
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 2, "--output_dir", out])
    assert_ok(proc)
    assert (f"Decoder as recorded in {out / 'checkpoint-last.pth'}: decoder_depth=1, decoder_embed_dim=32, "
            "decoder_num_heads=2") in proc.stdout
    assert f"Resumed from {out / 'checkpoint-last.pth'}: continuing at epoch 1" in proc.stdout
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 1 and {k: ckpt["args"][k] for k in DEC_ARCH} == DEC_ARCH
    assert decoder_shape(ckpt["model"]) == dict(decoder_depth=1, decoder_embed_dim=32)


def test_bad_flags_exit_2_with_one_line(ablation_run, photos, tmp_path):
    """A flag that contradicts the resumed checkpoint, and a refused timm ViT, as real processes
    (started together: they mostly wait on imports)."""
    base = [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 2]
    cases = {
        "conflict": ([*base, "--output_dir", tmp_path / "new", "--resume", ablation_run / "checkpoint-last.pth",
                      "--decoder_embed_dim", 64],
                     f"--decoder_embed_dim 64 conflicts with decoder_embed_dim=32 recorded in "
                     f"{ablation_run / 'checkpoint-last.pth'}, the checkpoint this run resumes: drop the flag to "
                     "continue it, or drop --resume for a new run"),
        "non_standard_timm": ([*base, "--output_dir", tmp_path / "timm", "--model",
                               "mae_vit_small_patch14_reg4_dinov2"],
                              "--model: timm's vit_small_patch14_reg4_dinov2 is not a standard ViT that "
                              "MaskedAutoencoderViT can represent: it has 4 register tokens"),
    }
    procs = {name: subprocess.Popen(main_cmd("main_pretrain.py", args), cwd=REPO, env=cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        err = one_line_error(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        assert cases[name][1] in err, (name, err)
    assert not (tmp_path / "new" / "checkpoint-last.pth").exists()


def pretrain_args(**flags) -> argparse.Namespace:
    args = dict(model="mae_vit_mini_patch16", input_size=64, norm_pix_loss=False, resume="", range_mask_ratio=0.0,
                decoder_depth=None, decoder_embed_dim=None, decoder_num_heads=None)
    return argparse.Namespace(**{**args, **flags})


def decoder_of(args, ckpt) -> dict:
    """The effective decoder the pretraining recipe resolves for args and a resumed checkpoint."""
    return PretrainRecipe.model_facts(args, None, ckpt)["decoder_arch"]


@pytest.mark.parametrize("flags, expected", [
    (dict(decoder_depth=0), "--decoder_depth must be at least 1, got 0"),
    (dict(decoder_num_heads=-2), "--decoder_num_heads must be at least 1, got -2"),
    (dict(decoder_embed_dim=30), "--decoder_embed_dim 30 is not divisible by --decoder_num_heads 4 "
                                 "(mae_vit_mini_patch16's default): every head needs an equal share"),
    (dict(decoder_num_heads=5), "--decoder_embed_dim 64 (mae_vit_mini_patch16's default) is not divisible by "
                                "--decoder_num_heads 5"),
    (dict(decoder_embed_dim=30, decoder_num_heads=4), "--decoder_embed_dim 30 is not divisible by "
                                                      "--decoder_num_heads 4: every head"),
    (dict(model=TIMM_VIT), f"--model {TIMM_VIT} is not a pretraining model; choose one of: mae_vit_2b_patch14, "
                           "mae_vit_6p5b_patch14, mae_vit_base_patch16, "),
])
def test_bad_decoder_flags(flags, expected):
    with pytest.raises(UserError) as e:
        decoder_of(pretrain_args(**flags), None)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_the_effective_decoder_is_resolved_without_writing_args():
    args = pretrain_args(decoder_embed_dim=48)
    assert decoder_of(args, None) == dict(decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4)
    assert (args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads) == (48, None, None)
    # Resuming: the recorded values fill the unset flags; an equal flag is fine.
    args = pretrain_args(decoder_depth=1)
    ckpt = {"_path": "ckpt.pth", "args": {**DEC_ARCH, "model": "mae_vit_mini_patch16"}}
    assert decoder_of(args, ckpt) == DEC_ARCH and args.decoder_embed_dim is None
    # Official checkpoints record no decoder (and their args are a Namespace).
    official = {"_path": "official.pth", "args": argparse.Namespace(model="mae_vit_mini_patch16")}
    assert decoder_of(pretrain_args(), official)["decoder_embed_dim"] == 64


def test_visualize_rebuilds_the_recorded_decoder(ablation_run, photos, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("_script_visualize", REPO / "scripts" / "visualize.py")
    vis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vis)
    ckpt_path = ablation_run / "checkpoint-last.pth"
    model, name, size = vis.model_from_checkpoint(vis.get_args_parser().parse_args(
        ["--checkpoint", str(ckpt_path), "--images", "x", "--output_dir", "y"]), load(ckpt_path), torch.device("cpu"))
    assert (name, size) == ("mae_vit_mini_patch16", 64) and model.decoder_arch == DEC_ARCH
    image = sorted((photos / "train" / "photos").glob("*.jpg"))[0]
    args = vis.get_args_parser().parse_args(["--checkpoint", str(ckpt_path), "--images", str(image),
                                             "--output_dir", str(tmp_path)])
    assert run_cli(vis.main, args) == 0
    assert (tmp_path / f"{image.stem}.png").stat().st_size > 0


def test_finetune_drops_the_ablated_decoder(ablation_run):
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=True)
    load_pretrained_encoder(model, str(ablation_run / "checkpoint-last.pth"), head_init_std=2e-5)
    state = load(ablation_run / "checkpoint-last.pth")["model"]
    assert torch.equal(model.blocks[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])


def test_timm_encoder_pretrains_and_fine_tunes(photos, two_classes, tmp_path):
    out = tmp_path / "pretrain"
    proc = pretrain(["--model", f"mae_{TIMM_VIT}", "--input_size", 64, "--num_workers", 0, "--warmup_epochs", 1,
                     "--log_dir", "", "--data_path", photos, "--batch_size", 14, "--epochs", 1, "--output_dir", out,
                     *DEC])
    assert_ok(proc)
    ckpt = load(out / "checkpoint-last.pth")
    assert ckpt["args"]["model"] == f"mae_{TIMM_VIT}" and {k: ckpt["args"][k] for k in DEC_ARCH} == DEC_ARCH
    assert ckpt["model"]["blocks.11.attn.qkv.weight"].shape == (3 * 192, 192)

    # The classifier of the same name takes the encoder (in process, then as the CLI does).
    clf = models.create_model(TIMM_VIT, img_size=64, num_classes=2, global_pool=True)
    load_pretrained_encoder(clf, str(out / "checkpoint-last.pth"), head_init_std=2e-5)
    assert torch.equal(clf.blocks[11].attn.qkv.weight, ckpt["model"]["blocks.11.attn.qkv.weight"])
    proc = run_main("main_finetune.py", ["--model", TIMM_VIT, "--finetune", out / "checkpoint-last.pth",
                                         "--input_size", 64, "--nb_classes", 2, "--num_workers", 0, "--log_dir", "",
                                         "--warmup_epochs", 1, "--data_path", two_classes, "--batch_size", 40,
                                         "--epochs", 1, "--output_dir", tmp_path / "finetune"])
    assert_ok(proc)
    assert f"Loaded pre-trained encoder from {out / 'checkpoint-last.pth'}" in proc.stdout
    assert "* Acc@1" in proc.stdout and (tmp_path / "finetune" / "checkpoint-last.pth").exists()
