"""Export (scripts/export.py) to timm, transformers and the official files, and import from them
(--finetune, --resume, scripts/visualize.py): round trips with equal numbers, the model card, bad inputs."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import models
from engine.checkpoint import load_pretrained_encoder
from engine.checkpoint import read_checkpoint as read_weights
from engine.interop.export import load_source, write_official, write_timm, write_transformers
from engine.linprobe import make_linear_probe
from models.mae import MaskedAutoencoderViT

from conftest import MINI, REPO, assert_ok, cli_env, one_line_error, pretrain, run_main

PRETRAIN = [*MINI, "--batch_size", 4, "--epochs", 2, "--norm_pix_loss", "--blr", "2e-3"]


def export(checkpoint, to, output, *extra):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint", str(checkpoint),
                           "--to", to, "--output", str(output), *extra], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(photos, tmp_path_factory):
    """A real pretraining run of the mini MAE (14 photos, batch 4: 3 iterations per epoch)."""
    out = tmp_path_factory.mktemp("pretrain")
    assert_ok(pretrain([*PRETRAIN, "--data_path", photos, "--output_dir", out]))
    return out


@pytest.fixture(scope="module")
def mae(run):
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    model = models.create_model("mae_vit_mini_patch16", "pretrain", img_size=64, norm_pix_loss=True).eval()
    model.load_state_dict(ckpt["model"])
    return model


def images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def encoder_features(model: MaskedAutoencoderViT, x):
    """Our encoder at mask ratio 0, patches in their order (noise increasing: the identity shuffle)."""
    n, length = x.shape[0], model.mask_noise_len_at(x.shape[-1])
    with torch.no_grad():
        return model.forward_encoder(x, 0.0, torch.arange(length, dtype=torch.float).expand(n, length))[0]


def test_timm_export_gives_our_features_and_imports_back(run, mae, tmp_path):
    folder = tmp_path / "timm"
    write_timm(load_source(str(run / "checkpoint-last.pth")), str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64] and config["pretrained_cfg"]["crop_pct"] == 0.875
    assert config["model_args"]["embed_dim"] == 128 and config["model_args"]["depth"] == 4
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert not any(k.startswith("decoder") for k in f.keys())
    assert meta["arch"] == "vit_base_patch16_224" and meta["epoch"] == "1" and meta["model"] == "mae_vit_mini_patch16"
    assert meta["source_checkpoint"] == str(run / "checkpoint-last.pth")

    x = images()
    ours = encoder_features(mae, x)
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=0, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=0))
    for model in (by_folder, by_file.eval()):
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(x), ours, atol=1e-6, rtol=0)

    # Back: the folder and its safetensors file as --finetune sources, the same encoder.
    for source in (folder, folder / "model.safetensors"):
        clf = models.create_model("vit_mini_patch16", "classify", img_size=64, num_classes=3, global_pool=False)
        load_pretrained_encoder(clf, str(source), 0.01)
        with torch.no_grad():
            torch.testing.assert_close(clf.eval().forward_features(x), ours, atol=1e-6, rtol=0)


def test_transformers_export_gives_our_loss_and_prediction(run, mae, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = load_source(str(run / "checkpoint-last.pth"))
    write_transformers(src, str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ViTMAEForPreTraining"] and config["norm_pix_loss"] is True
    assert config["mask_ratio"] == 0.75 and config["decoder_hidden_size"] == 64
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
    x, noise = images(3), torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, pred, mask = mae(x, 0.75, noise)
        out = hf(pixel_values=x, noise=noise)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.logits, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)

    # Back: the folder as our pretraining state dict, every tensor as trained.
    back = read_weights(str(tmp_path / "hf"), "--resume")
    assert back["args"]["norm_pix_loss"] is True and back["args"]["decoder_depth"] == 2
    own = mae.state_dict()
    assert back["model"].keys() == own.keys()
    assert all(torch.equal(back["model"][k], own[k]) for k in own)

    # The encoder alone: ViTModel, the features of our encoder.
    write_transformers(src, str(tmp_path / "enc"), encoder_only=True)
    vit = transformers.ViTModel.from_pretrained(str(tmp_path / "enc"), add_pooling_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=x).last_hidden_state, encoder_features(mae, x), atol=1e-6, rtol=0)


def test_official_files_load_strictly_in_the_official_layout(run, mae, tmp_path):
    files = write_official(load_source(str(run / "checkpoint-last.pth")), str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["mae_pretrain_vit_mini_patch16.pth",
                                                    "mae_visualize_vit_mini_patch16.pth"]
    full = torch.load(files[1], map_location="cpu", weights_only=True)
    official = models.create_model("mae_vit_mini_patch16", "pretrain", img_size=64)  # models_mae's layout
    official.load_state_dict(full["model"], strict=True)
    encoder = torch.load(files[0], map_location="cpu", weights_only=True)["model"]
    assert not any(k.startswith(("decoder", "mask_token")) for k in encoder)
    # The encoder file: what timm (and the official models_vit, cls token) load directly.
    vit = timm.create_model("vit_base_patch16_224", img_size=64, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    vit.load_state_dict(encoder, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(images()), encoder_features(mae, images()),
                                   atol=1e-6, rtol=0)


def test_model_card_names_the_run(run, tmp_path):
    proc = export(run / "checkpoint-last.pth", "official", tmp_path)
    assert_ok(proc)
    card = (tmp_path / "README.md").read_text()
    final = json.loads((run / "log.txt").read_text().splitlines()[-1])
    args = torch.load(run / "checkpoint-last.pth", weights_only=True)["args"]
    assert f"| data | {args['data_path']} (14 images in train/) |" in card
    assert "| epochs | 2 of --epochs 2 |" in card
    assert "| effective batch | 4 (batch_size 4 x accum_iter 1 x 1 processes) |" in card
    assert f"| final loss | {final['train_loss']:.4f} (train_loss, epoch 1, log.txt) |" in card
    assert "mae_vit_mini_patch16: ViT, width 128, 4 blocks, 4 heads, patch 16, 64 px" in card
    assert "normalised pixels (--norm_pix_loss)" in card
    command = next(line for line in card.splitlines() if line.startswith("python main_pretrain.py"))
    for flag in ("--model mae_vit_mini_patch16", "--batch_size 4", "--epochs 2", "--norm_pix_loss",
                 "--blr 0.002", "--input_size 64"):
        assert flag in command
    assert "--lr " not in command  # computed from --blr
    assert "scripts/visualize.py --checkpoint" in card and "main_finetune.py --finetune" in card


def _classifier(global_pool: bool, probe: bool, name="vit_mini_patch16", size=64):
    torch.manual_seed(0)
    model = models.create_model(name, "classify", img_size=size, num_classes=5, global_pool=global_pool)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    if probe:
        make_linear_probe(model)
        model.head[0].running_mean.normal_()
        model.head[0].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("global_pool, probe", [(True, False), (False, True)], ids=["finetuned", "linprobe"])
def test_classifier_exports_give_our_logits(tmp_path, global_pool, probe):
    transformers = pytest.importorskip("transformers")
    model = _classifier(global_pool, probe)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": {"model": "vit_mini_patch16", "input_size": 64}},
               path)
    src = load_source(str(path))
    write_timm(src, str(tmp_path / "timm"))
    write_transformers(src, str(tmp_path / "hf"))
    cls = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    assert cls == ("BeitForImageClassification" if global_pool else "ViTForImageClassification")
    x = images()
    with torch.no_grad():
        ours = model(x)
        by_timm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(x)
        by_hf = getattr(transformers, cls).from_pretrained(str(tmp_path / "hf")).eval()(pixel_values=x).logits
    torch.testing.assert_close(by_timm, ours, atol=1e-6, rtol=1e-5)  # probe: the BatchNorm folded into the head
    torch.testing.assert_close(by_hf, ours, atol=1e-6, rtol=1e-5)


def test_vit_b_timm_mae_weights_and_classifier_round_trip(tmp_path):
    """ViT-B: timm's own vit_base_patch16_224.mae layout (written by timm) into our classifier, and
    that classifier out to timm and transformers."""
    transformers = pytest.importorskip("transformers")
    from timm.models._hub import save_for_hf
    torch.manual_seed(0)
    theirs = timm.create_model("vit_base_patch16_224.mae", pretrained=False).eval()
    save_for_hf(theirs, str(tmp_path / "timm_mae"))
    ours = models.create_model("vit_base_patch16", "classify", num_classes=4, global_pool=True)
    load_pretrained_encoder(ours, str(tmp_path / "timm_mae"), 2e-5, "vit_base_patch16")
    x = images(1, 224)
    ours.eval()
    with torch.no_grad():
        # The pooled classifier has no final norm (fc_norm after the pooling): apply the .mae's one.
        torch.testing.assert_close(theirs.norm(ours.forward_features(x)), theirs.forward_features(x),
                                   atol=1e-6, rtol=0)
        assert torch.equal(ours.blocks[11].mlp.fc2.weight, theirs.blocks[11].mlp.fc2.weight)
        path = tmp_path / "finetuned.pth"
        torch.save({"model": ours.state_dict(), "args": {"model": "vit_base_patch16"}}, path)
        src = load_source(str(path))
        write_timm(src, str(tmp_path / "timm"))
        write_transformers(src, str(tmp_path / "hf"))
        logits = ours(x)
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()(x),
                                   logits, atol=1e-6, rtol=1e-5)
        hf = transformers.BeitForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
        torch.testing.assert_close(hf(pixel_values=x).logits, logits, atol=1e-5, rtol=1e-5)


def test_clis_take_foreign_weights(run, photos, tmp_path):
    """--finetune of a timm folder (linear probing), scripts/visualize.py of a transformers folder."""
    from scripts.make_sample_dataset import make_classification_set
    src = load_source(str(run / "checkpoint-last.pth"))
    write_timm(src, str(tmp_path / "timm"))
    write_transformers(src, str(tmp_path / "hf"))
    data = make_classification_set(tmp_path / "cls", task="color", train_per_photo=1, val_per_photo=1, size=64)
    proc = run_main("main_linprobe.py", ["--model", "vit_mini_patch16", "--input_size", 64, "--num_workers", 0,
                                         "--log_dir", "", "--epochs", 1, "--batch_size", 4, "--nb_classes", 2,
                                         "--data_path", data, "--output_dir", tmp_path / "lin",
                                         "--finetune", tmp_path / "timm"])
    assert_ok(proc)
    assert f"Loaded pre-trained encoder from {tmp_path / 'timm'}" in proc.stdout + proc.stderr
    proc = run_main("scripts/visualize.py", ["--checkpoint", tmp_path / "hf", "--images", photos / "train",
                                             "--output_dir", tmp_path / "pictures", "--grid"])
    assert_ok(proc)
    assert (tmp_path / "pictures" / "reconstructions.png").is_file()


def test_pretraining_resumes_weights_of_a_transformers_folder(run, mae, tmp_path):
    """main_pretrain.py --resume FOLDER: the weights (and the decoder sizes, norm_pix_loss) of a
    ViTMAEForPreTraining folder, no optimizer state: as for official checkpoints."""
    from engine.checkpoint import find_resume_checkpoint, resume
    from engine.distributed import DDPStrategy
    from engine.pretrain import PretrainRecipe
    from engine.pretrain_model import build_pretrain_model

    import main_pretrain
    write_transformers(load_source(str(run / "checkpoint-last.pth")), str(tmp_path / "hf"))
    args = main_pretrain.get_args_parser().parse_args(["--model", "mae_vit_mini_patch16", "--input_size", "64",
                                                       "--norm_pix_loss", "--resume", str(tmp_path / "hf"),
                                                       "--output_dir", ""])
    found = find_resume_checkpoint(args.resume, args.output_dir, not args.no_auto_resume, False)
    decoder = PretrainRecipe.model_facts(args, None, found)["decoder"]
    assert decoder == dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    model = build_pretrain_model(args.model, args.input_size, args.norm_pix_loss, decoder=decoder)
    pos = resume(found, model, None, None, DDPStrategy(), start_epoch=args.start_epoch, model_name=args.model,
                 explicit=bool(args.resume))
    assert (pos.epoch, pos.samples_in_epoch) == (0, 0)
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_weight_sources_are_one_line(run, photos, tmp_path):
    from engine.checkpoint.foreign import check_weights_source
    from util.errors import UserError
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match=r"--finetune \S+neither is a folder that is neither a transformers folder "
                                        r".* nor a timm folder .*\(its model_type is bert\)"):
        check_weights_source(str(tmp_path / "neither"), "--finetune")
    src = load_source(str(run / "checkpoint-last.pth"))
    write_timm(src, str(tmp_path / "timm"))
    # Another architecture: both named, and the fix.
    clf = models.create_model("vit_tiny_patch16", "classify", img_size=64, num_classes=2)
    with pytest.raises(UserError) as e:
        load_pretrained_encoder(clf, str(tmp_path / "timm"), 0.01, "vit_tiny_patch16")
    assert str(e.value) == (f"--finetune {tmp_path / 'timm'} holds the weights of mae_vit_mini_patch16 (ViT width 128, "
                            "4 blocks, patch 16), not of --model vit_tiny_patch16 (ViT width 192, 12 blocks, patch "
                            "16): pass --model vit_mini_patch16, or give weights of this architecture")
    # A truncated safetensors file, through a CLI: one line at preflight.
    data = (tmp_path / "timm" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) * 9 // 10])
    line = one_line_error(pretrain([*MINI, "--data_path", photos, "--output_dir", tmp_path / "out",
                                    "--resume", tmp_path / "cut.safetensors"]))
    assert line == (f"error: --resume {tmp_path / 'cut.safetensors'} is truncated ({len(data) * 9 // 10} bytes, its "
                    f"header announces {len(data)}): copy or export it again")


def test_timm_vit_encoder_exports_as_that_timm_model(tmp_path):
    """mae_<timm ViT>: exported under the timm name, the same features and the same loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mae = models.create_model("mae_vit_small_patch16_224", "pretrain", img_size=64, decoder_depth=1).eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": mae.state_dict(), "epoch": 0,
                "args": {"model": "mae_vit_small_patch16_224", "input_size": 64, "decoder_depth": 1}}, path)
    src = load_source(str(path))
    write_timm(src, str(tmp_path / "timm"))
    write_transformers(src, str(tmp_path / "hf"))
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "vit_small_patch16_224"
    x, noise = images(), torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval().forward_features(x)
        torch.testing.assert_close(features, encoder_features(mae, x), atol=1e-6, rtol=0)
        loss, pred, _ = mae(x, 0.75, noise)
        out = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()(pixel_values=x,
                                                                                             noise=noise)
    torch.testing.assert_close(out.logits, pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
