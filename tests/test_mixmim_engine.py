"""MixMIM through the shared engine: 2-process DDP pretraining, exact resume after kill -9,
reconstruction pictures, fine-tuning and linear probing from its checkpoint, flag errors."""
import json

import pytest
import torch
from PIL import Image
from test_resume import assert_identical, run_and_kill

import models

from conftest import assert_ok, pretrain, run_main

MIX = ["--model", "mixmim_mini", "--input_size", "64", "--num_workers", "0", "--warmup_epochs", "1",
       "--log_dir", "", "--norm_pix_loss"]
CLS = ["--model", "mixmim_mini", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
       "--log_dir", "", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mixmim_run(photos, tmp_path_factory):
    """2 gloo processes x batch 3 (2 iterations per epoch), 2 epochs, pictures every epoch."""
    out = tmp_path_factory.mktemp("mixmim")
    proc = pretrain([*MIX, "--data_path", photos, "--batch_size", 3, "--epochs", 2, "--output_dir", out,
                     "--vis_every", 1, "--range_mask_ratio", 0.1, "--print_freq", 1], nproc=2)
    assert_ok(proc)
    return out, proc


def test_two_process_pretraining_writes_checkpoints_log_and_pictures(mixmim_run):
    out, proc = mixmim_run
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert all(0 < r["train_loss"] < 10 for r in log)
    ckpt = load(out / "checkpoint-last.pth")
    args = ckpt["args"]
    assert (args["model"], args["mask_ratio"], args["range_mask_ratio"], args["world_size"]) == \
        ("mixmim_mini", 0.5, 0.1, 2)  # the MixMIM default ratio, recorded
    assert (args["decoder_embed_dim"], args["decoder_depth"], args["decoder_num_heads"]) == (64, 2, 4)
    fresh = models.create_model("mixmim_mini", "pretrain", img_size=64).state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in fresh.items()}
    assert not torch.equal(ckpt["model"]["layers.0.blocks.0.attn.qkv.weight"],
                           fresh["layers.0.blocks.0.attn.qkv.weight"])  # trained (different init seed aside)
    for epoch in (0, 1):
        picture = Image.open(out / "reconstructions" / f"epoch_{epoch:04d}.png")
        assert picture.mode == "RGB" and picture.width > 4 * 64
    assert "Epoch: [1]  [2/2]" in proc.stdout


def test_pictures_show_the_mixed_input():
    """The 'masked' panel of a MixMIM picture is the mixed image: each removed cell holds the
    batch mirror's pixels."""
    from engine.visualize import fixed_noise, reconstruct

    torch.manual_seed(0)
    model = models.create_model("mixmim_mini", "pretrain", img_size=64)
    imgs = torch.randn(4, 3, 64, 64).clamp(-2, 2)
    res = reconstruct(model, imgs, 0.5, fixed_noise(4, model.mask_noise_len))
    mask = res["mask"][0].reshape(2, 2)
    assert mask.sum() == 2 and torch.equal(res["mask"][0], res["mask"][3])  # one mask for the batch
    r, c = (mask == 1).nonzero()[0].tolist()
    cell = (slice(None), slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
    assert torch.allclose(res["masked"][0][cell], res["original"][3][cell])
    r, c = (mask == 0).nonzero()[0].tolist()
    cell = (slice(None), slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
    assert torch.allclose(res["masked"][0][cell], res["original"][0][cell])


def test_kill9_and_resume_is_bit_identical(photos, tmp_path):
    # 14 photos, batch 2: 7 iterations per epoch; checkpoint-last refreshed every 2 iterations.
    args = [*MIX, "--batch_size", 2, "--epochs", 3, "--save_every_steps", 2, "--print_freq", 1, "--data_path", photos]
    assert_ok(pretrain([*args, "--output_dir", tmp_path / "a"]))
    run_and_kill([*args, "--output_dir", tmp_path / "b"], r"Epoch: \[1\]\s+\[5/7\]")
    assert load(tmp_path / "b" / "checkpoint-last.pth")["epoch"] == 1  # a mid-epoch checkpoint
    proc = pretrain([*args, "--output_dir", tmp_path / "b"])
    assert_ok(proc)
    assert "Resumed" in proc.stdout + proc.stderr
    assert_identical(tmp_path / "a" / "checkpoint-last.pth", tmp_path / "b" / "checkpoint-last.pth")


def test_finetune_and_linprobe_from_the_pretrained_checkpoint(mixmim_run, two_classes, tmp_path):
    ckpt = mixmim_run[0] / "checkpoint-last.pth"
    encoder = load(ckpt)["model"]
    proc = run_main("main_finetune.py", [*CLS, "--data_path", two_classes, "--finetune", ckpt,
                                         "--output_dir", tmp_path / "ft", "--drop_path", 0.1])
    assert_ok(proc)
    assert "Accuracy of the network on the 41 test images" in proc.stdout
    tuned = load(tmp_path / "ft" / "checkpoint-last.pth")
    assert tuned["model"]["head.weight"].shape == (2, 256) and tuned["args"]["global_pool"] is True
    assert set(tuned["model"]) == set(k for k in encoder if not k.startswith(("decoder_", "mask_token"))) | \
        {"head.weight", "head.bias"}
    proc = run_main("main_linprobe.py", [*CLS, "--data_path", two_classes, "--finetune", ckpt,
                                         "--output_dir", tmp_path / "lp"])
    assert_ok(proc)
    probed = load(tmp_path / "lp" / "checkpoint-last.pth")["model"]
    for k in ("layers.2.blocks.1.attn.qkv.weight", "norm.weight"):
        assert torch.equal(probed[k], encoder[k])  # the encoder is frozen: still the pretrained weights


@pytest.mark.parametrize("script, flags, expected", [
    ("main_pretrain.py", ["--model", "mae_vit_mini_patch16", "--range_mask_ratio", "0.1"],
     "--range_mask_ratio is a MixMIM option"),
    ("main_pretrain.py", ["--model", "mixmim_mini", "--input_size", "64", "--range_mask_ratio", "-1"],
     "--range_mask_ratio must be 0 or more, got -1.0"),
    ("main_linprobe.py", ["--model", "mixmim_mini", "--cls_token"], "--cls_token: mixmim_mini has no class token"),
])
def test_bad_flags_are_one_line_errors(tmp_path, script, flags, expected):
    proc = run_main(script, [*flags, "--output_dir", tmp_path, "--device", "cpu"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert expected in proc.stderr


def test_official_mixmim_script_flags(photos, tmp_path):
    """exp/base_600ep/pretrain.sh passes --port and --resume <its own future checkpoint>: a first run
    starts fresh with a note; the second run resumes from the output folder."""
    out = tmp_path / "ckpt"
    flags = [*MIX, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--output_dir", out, "--port", 29528,
             "--resume", out / "checkpoint.pth"]
    proc = pretrain(flags)
    assert_ok(proc)
    assert f"note: --resume {out / 'checkpoint.pth'} does not exist yet" in proc.stderr
    assert (out / "checkpoint-last.pth").is_file()
    proc = pretrain([*flags[:-4], "--epochs", 2, "--resume", tmp_path / "elsewhere.pth"])
    assert proc.returncode == 2 and "does not exist: give the path of a checkpoint file" in proc.stderr
