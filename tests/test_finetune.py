"""Fine-tuning, linear probing and evaluation (models/vit.py, engine/finetune.py)."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import models
from engine.checkpoint import load_model_weights, load_pretrained_encoder
from engine.optim import LARS, param_groups_lrd
from util.errors import UserError

from conftest import MINI, assert_ok, one_line_error, pretrain, run_main

FT = ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
      "--log_dir", "", "--warmup_epochs", "1", "--print_freq", "100"]


def finetune(args, nproc=1):
    return run_main("main_finetune.py", args, nproc)


def linprobe(args, nproc=1):
    return run_main("main_linprobe.py", args, nproc)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def acc_lines(stdout):
    return [tuple(map(float, m)) for m in re.findall(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)", stdout)]


@pytest.fixture(scope="module")
def pretrained(photos, tmp_path_factory):
    """A short MAE pretraining of the mini model at 64 px: this project's checkpoint format."""
    out = tmp_path_factory.mktemp("pretrained")
    assert_ok(pretrain([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 2, "--output_dir", out]))
    return out / "checkpoint-last.pth"


# ----------------------------------------------------------------------------- model and loading
def official_forward(model, x):
    """The official models_vit forward, written out: pool patch tokens + fc_norm, or cls + norm."""
    x = model.patch_embed(x)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + model.pos_embed
    for blk in model.blocks:
        x = blk(x)
    if model.uses_global_pool:
        x = model.fc_norm(x[:, 1:, :].mean(dim=1))
    else:
        x = model.norm(x)[:, 0]
    return model.head(x)


@pytest.mark.parametrize("global_pool", [True, False])
def test_vit_keys_and_logits_match_official(global_pool):
    torch.manual_seed(0)
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=3, global_pool=global_pool).eval()
    keys = set(model.state_dict())
    if global_pool:
        assert {"fc_norm.weight", "fc_norm.bias"} <= keys and not any(k.startswith("norm.") for k in keys)
    else:
        assert {"norm.weight", "norm.bias"} <= keys and not any(k.startswith("fc_norm") for k in keys)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), official_forward(model, x), rtol=1e-5, atol=1e-5)


def test_official_vit_layouts():
    for name, (dim, depth, p) in {"vit_base_patch16": (768, 12, 16), "vit_large_patch16": (1024, 24, 16),
                                  "vit_huge_patch14": (1280, 32, 14)}.items():
        with torch.device("meta"):
            sd = models.create_model(name, num_classes=1000, global_pool=True).state_dict()
        assert sd["pos_embed"].shape == (1, (224 // p) ** 2 + 1, dim)
        assert sd["head.weight"].shape == (1000, dim) and sd["fc_norm.weight"].shape == (dim,)
        assert sd[f"blocks.{depth - 1}.mlp.fc1.weight"].shape == (4 * dim, dim) and f"blocks.{depth}.norm1.weight" not in sd
        assert sd["blocks.0.attn.qkv.bias"].shape == (3 * dim,)


def test_load_pretrained_encoder(pretrained):
    mae_sd = load(pretrained)["model"]
    torch.manual_seed(0)
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=True)
    load_pretrained_encoder(model, str(pretrained), head_init_std=2e-5)
    sd = model.state_dict()
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.mlp.fc2.weight"):
        assert torch.equal(sd[k], mae_sd[k]), k
    assert 1.4e-5 < sd["head.weight"].std() < 2.6e-5  # trunc_normal(std=2e-5), the official head init
    assert torch.equal(sd["fc_norm.weight"], torch.ones(128))  # fresh, not the pretraining norm
    # cls-token head keeps the pretrained final norm
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=False)
    load_pretrained_encoder(model, str(pretrained), head_init_std=0.01)
    assert torch.equal(model.state_dict()["norm.weight"], mae_sd["norm.weight"])


def test_pretrained_position_embedding_is_resampled(pretrained, tmp_path):
    mae_sd = load(pretrained)["model"]
    model = models.create_model("vit_mini_patch16", img_size=112, num_classes=2)
    load_pretrained_encoder(model, str(pretrained), head_init_std=2e-5)
    got = model.state_dict()["pos_embed"]
    assert got.shape == (1, 50, 128)
    # Independent resampling: bicubic, no antialiasing, cls row kept (official interpolate_pos_embed).
    grid = mae_sd["pos_embed"][:, 1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
    expected = torch.cat([mae_sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, 49, 128)], dim=1)
    torch.testing.assert_close(got, expected)


def test_encoder_only_and_bad_checkpoints(pretrained, tmp_path):
    mae_sd = load(pretrained)["model"]
    encoder = {k: v for k, v in mae_sd.items() if not k.startswith(("decoder_", "mask_token"))}
    bare = tmp_path / "encoder.pth"
    torch.save(encoder, bare)  # a bare state dict, as some encoder exports are
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2)
    load_pretrained_encoder(model, str(bare), head_init_std=2e-5)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], encoder["blocks.0.attn.qkv.weight"])

    broken = dict(encoder)
    del broken["blocks.1.attn.qkv.weight"]
    broken["blocks.9.mlp.fc1.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(UserError) as e:
        load_pretrained_encoder(model, str(tmp_path / "broken.pth"), head_init_std=2e-5)
    msg = str(e.value)
    assert "missing keys: blocks.1.attn.qkv.weight" in msg and "unexpected keys: blocks.9.mlp.fc1.weight" in msg
    with pytest.raises(UserError, match=r"shape mismatch: cls_token \(1, 1, 128\) vs \(1, 1, 192\)"):
        load_pretrained_encoder(models.create_model("vit_tiny_patch16", img_size=64, num_classes=2),
                                str(bare), head_init_std=2e-5)


def test_finetune_errors_talk_about_finetune(pretrained, tmp_path):
    """--finetune problems name --finetune (never --resume) and say what the checkpoint records."""
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(pretrained.read_bytes()[:5000])
    for path, start in ((tmp_path / "nope.pth", f"--finetune {tmp_path / 'nope.pth'} does not exist: give the path "
                                                "of a checkpoint file"),
                        (truncated, f"--finetune {truncated} is truncated or corrupt (")):
        with pytest.raises(UserError) as e:
            load_pretrained_encoder(model, str(path), head_init_std=2e-5)
        assert str(e.value).startswith(start) and "resume" not in str(e.value), str(e.value)
        assert "copy or download the pretraining checkpoint again, or give another --finetune" in str(e.value) \
            or "does not exist" in str(e.value)
    tiny = models.create_model("vit_tiny_patch16", img_size=64, num_classes=2)
    with pytest.raises(UserError, match=r"check that --model matches the pretrained encoder \(it records --model "
                                        r"mae_vit_mini_patch16\)$"):
        load_pretrained_encoder(tiny, str(pretrained), head_init_std=2e-5)


def test_checkpoint_of_another_kind_says_what_it_is(pretrained):
    ckpt = load(pretrained)
    pooled = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=True)
    with pytest.raises(UserError, match=rf"checkpoint {pretrained} is a pretraining checkpoint of "
                                        rf"mae_vit_mini_patch16 \(encoder and decoder\), not a classifier: start "
                                        rf"fine-tuning or linear probing from it with --finetune {pretrained};"):
        load_model_weights(pooled, ckpt["model"], str(pretrained), ckpt["args"], "vit_mini_patch16")
    encoder = {k: v for k, v in ckpt["model"].items() if not k.startswith(("decoder_", "mask_token"))}
    with pytest.raises(UserError, match=r"holds encoder weights without a classification head .*--finetune"):
        load_model_weights(pooled, encoder, "enc.pth")
    cls_token = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=False)
    with pytest.raises(UserError, match=r"its head was trained with --global_pool \(averaged patch tokens, "
                                        r"fc_norm\); pass that flag$"):
        load_model_weights(cls_token, pooled.state_dict(), "ft.pth")
    mae = models.create_model("mae_vit_mini_patch16", "pretrain", img_size=64)
    with pytest.raises(UserError, match=r"is a classifier \(fine-tuned or linear-probed\), not a pretraining "
                                        r"checkpoint"):
        load_model_weights(mae, pooled.state_dict(), "ft.pth")


def test_eval_of_a_pretraining_checkpoint_suggests_finetune(two_classes, pretrained, tmp_path):
    err = one_line_error(finetune([*FT, "--data_path", two_classes, "--eval", "--resume", pretrained,
                                   "--batch_size", 4]))
    assert f"is a pretraining checkpoint of mae_vit_mini_patch16 (encoder and decoder), not a classifier: start " \
           f"fine-tuning or linear probing from it with --finetune {pretrained}" in err


# ----------------------------------------------------------------------------- optimizers
def official_layer_groups(model, weight_decay, layer_decay):
    """The BEiT / official MAE rule, written out independently."""
    num_layers = len(model.blocks) + 1
    no_wd = {"cls_token", "pos_embed"}
    groups = {}
    for n, p in model.named_parameters():
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            layer = 0
        elif n.startswith("blocks."):
            layer = int(n.split(".")[1]) + 1
        else:
            layer = num_layers
        wd = 0.0 if (p.ndim == 1 or n in no_wd) else weight_decay
        key = (round(layer_decay ** (num_layers - layer), 12), wd)
        groups.setdefault(key, set()).add(n)
    return groups


@pytest.mark.parametrize("global_pool", [True, False], ids=["global_pool", "cls_token"])
@pytest.mark.parametrize("name", ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "vit_small_patch16_224"])
def test_layer_decay_groups_follow_the_official_rule(name, global_pool):
    with torch.device("meta"):
        model = models.create_model(name, num_classes=10, global_pool=global_pool)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.65):
        key = (round(g["lr_scale"], 12), g["weight_decay"])
        got.setdefault(key, set()).update(names[id(p)] for p in g["params"])
    expected = official_layer_groups(model, 0.05, 0.65)
    assert got == expected
    depth = len(model.blocks)
    assert min(k[0] for k in got) == pytest.approx(0.65 ** (depth + 1))  # patch embedding, cls, pos
    final_norm = "fc_norm" if global_pool else "norm"
    assert {n for k, ns in got.items() if k[0] == 1.0 for n in ns} == {
        f"{final_norm}.weight", f"{final_norm}.bias", "head.weight", "head.bias"}


def test_lars_matches_the_official_update():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3), torch.randn(4)
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9)
    for step in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # By hand: trust ratio on the matrix only, momentum buffer starting at zero.
    mu_w, mu_b, ew, eb = torch.zeros_like(w0), torch.zeros_like(b0), w0.clone(), b0.clone()
    for step in range(2):
        dw = gw + 0.1 * ew
        dw = dw * (0.001 * ew.norm() / dw.norm())
        mu_w = 0.9 * mu_w + dw
        mu_b = 0.9 * mu_b + gb
        ew, eb = ew - 0.5 * mu_w, eb - 0.5 * mu_b
    torch.testing.assert_close(w.detach(), ew)
    torch.testing.assert_close(b.detach(), eb)


# ----------------------------------------------------------------------------- CLIs
def test_finetune_two_processes_dist_eval_matches_single_process(two_classes, pretrained, tmp_path):
    out = tmp_path / "ft"
    proc = finetune([*FT, "--data_path", two_classes, "--finetune", pretrained, "--batch_size", 4, "--epochs", 1,
                     "--output_dir", out, "--dist_eval", "--mixup", "0.8", "--cutmix", "1.0", "--drop_path", 0.1],
                    nproc=2)
    assert_ok(proc)
    assert "Accuracy of the network on the 41 test images" in proc.stdout  # 41 does not divide by 2
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["test_samples"] == 41 and {"test_acc1", "test_acc5", "train_loss", "max_accuracy"} <= set(record)
    ckpt = out / "checkpoint-last.pth"
    single = finetune([*FT, "--data_path", two_classes, "--eval", "--resume", ckpt, "--batch_size", 4])
    sharded = finetune([*FT, "--data_path", two_classes, "--eval", "--resume", ckpt, "--batch_size", 4,
                        "--dist_eval"], nproc=2)
    assert_ok(single)
    assert_ok(sharded)
    (a1, a5, la), = acc_lines(single.stdout)
    (b1, b5, lb), = acc_lines(sharded.stdout)
    assert (a1, a5) == (b1, b5) and la == pytest.approx(lb, abs=1e-3)
    assert a1 == pytest.approx(record["test_acc1"], abs=1e-3)
    assert "on the 41 test images" in single.stdout and "on the 41 test images" in sharded.stdout


def test_finetune_learns_the_easy_task(two_classes, tmp_path):
    proc = finetune([*FT, "--data_path", two_classes, "--batch_size", 8, "--epochs", 4, "--blr", "5e-3",
                     "--output_dir", tmp_path, "--smoothing", "0", "--reprob", "0", "--aa", "", "--drop_path", 0])
    assert_ok(proc)
    records = [json.loads(x) for x in (tmp_path / "log.txt").read_text().splitlines()]
    # 23 colour and 18 grayscale validation crops: always answering "colour" gives 56%.
    assert max(r["test_acc1"] for r in records) >= 80.0, [r["test_acc1"] for r in records]
    assert records[-1]["max_accuracy"] == max(r["test_acc1"] for r in records)
    best = load(tmp_path / "checkpoint-best.pth")
    assert best["max_accuracy"] == records[-1]["max_accuracy"]


def test_pretrain_finetune_eval_round_trip_with_new_resolution(two_classes, pretrained, tmp_path):
    args = [*FT, "--input_size", "112", "--data_path", two_classes, "--batch_size", 8, "--epochs", 2,
            "--output_dir", tmp_path, "--blr", "1e-2"]
    proc = finetune([*args, "--finetune", pretrained])
    assert_ok(proc)
    assert "Resampled the position embedding" in proc.stdout and "to a 7x7 patch grid" in proc.stdout
    best_acc = json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])["max_accuracy"]
    proc = finetune([*args, "--eval", "--resume", tmp_path / "checkpoint-best.pth"])
    assert_ok(proc)
    (acc1, _, _), = acc_lines(proc.stdout)
    assert acc1 == pytest.approx(best_acc, abs=1e-3)


def test_finetune_resume_is_exact_with_mixup_and_drop_path(two_classes, pretrained, tmp_path):
    """Mixup draws from numpy, drop path from torch: the per-rank RNG states must be restored."""
    args = [*FT, "--data_path", two_classes, "--finetune", pretrained, "--batch_size", 6, "--mixup", "0.8",
            "--cutmix", "1.0", "--drop_path", "0.2"]
    assert_ok(finetune([*args, "--epochs", 2, "--output_dir", tmp_path / "straight"]))
    assert_ok(finetune([*args, "--epochs", 1, "--output_dir", tmp_path / "split"]))
    assert_ok(finetune([*args, "--epochs", 2, "--output_dir", tmp_path / "split"]))  # auto-resume
    a, b = load(tmp_path / "straight" / "checkpoint-last.pth"), load(tmp_path / "split" / "checkpoint-last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_linprobe_trains_only_the_head(two_classes, pretrained, tmp_path):
    proc = linprobe([*FT, "--data_path", two_classes, "--finetune", pretrained, "--batch_size", 6, "--epochs", 2,
                     "--output_dir", tmp_path, "--dist_eval"], nproc=2)
    assert_ok(proc)
    assert "Optimizer: LARS" in proc.stdout
    mae_sd, sd = load(pretrained)["model"], load(tmp_path / "checkpoint-last.pth")["model"]
    for k in ("cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(sd[k], mae_sd[k]), k  # frozen (cls token head is the default)
    assert {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"} <= set(sd)
    assert "head.0.weight" not in sd  # BatchNorm without affine parameters
    assert sd["head.0.running_mean"].abs().sum() > 0  # the BatchNorm head ran in training mode
    proc = linprobe([*FT, "--data_path", two_classes, "--eval", "--resume", tmp_path / "checkpoint-last.pth",
                     "--batch_size", 6])
    assert_ok(proc)
    assert len(acc_lines(proc.stdout)) == 1


@pytest.mark.parametrize("flags, expected", [
    (["--nb_classes", "1"], "the dataset has 2 classes but --nb_classes is 1: pass --nb_classes 2"),
    (["--mixup", "0.8", "--batch_size", "5"], "need an even --batch_size, got 5"),
    (["--eval"], "--eval needs --resume CHECKPOINT"),
    (["--data_pipeline", "uint8"], "--data_pipeline uint8 cannot fine-tune: RandAugment and random erasing"),
    (["--model", "vit_nope"], "unknown model 'vit_nope'; choose one of: vit_2b_patch14, vit_6p5b_patch14, vit_base_patch16"),
    (["--model", "mae_vit_mini_patch16"], "--model mae_vit_mini_patch16 is not a classifier; choose one of: "
                                          "mixmim_base, mixmim_huge, mixmim_large, mixmim_mini, vit_2b_patch14"),
])
def test_finetune_bad_input(two_classes, tmp_path, flags, expected):
    proc = finetune([*FT, "--data_path", two_classes, "--output_dir", tmp_path, "--batch_size", 4, *flags])
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert expected in proc.stderr


def test_finetune_checkpoint_mismatch_is_one_line(two_classes, pretrained, tmp_path):
    proc = finetune([*FT, "--model", "vit_tiny_patch16", "--data_path", two_classes, "--finetune", pretrained,
                     "--output_dir", tmp_path])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "does not fit VisionTransformer" in proc.stderr and "shape mismatch" in proc.stderr
