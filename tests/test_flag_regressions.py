"""Regression tests of the behaviours behind the flags users change most: the weight-decay
exemptions of fine-tuning and pretraining, --smoothing in the mixup/cutmix targets, the fp16
gradient scaler across a resume, clipping after unscaling, the pooling defaults, and the linear
probe's BatchNorm folded on export.

Each test was checked against a hand-made regression of the product code (docs/testing.md lists
them). Every access to a product internal goes through one of the seams right below, so that a
redesign of engine/ only re-points them.
"""

import numpy as np
import pytest
import timm
import torch

import models
from engine import checkpoint as checkpoint_engine
from engine import finetune as finetune_engine
from engine import linprobe as linprobe_engine
from engine import pretrain as pretrain_engine
from engine import recipe as recipe_engine
from engine.config import resolve
from engine.data.sampler import ResumableSampler
from engine.distributed import DDPStrategy
from engine.interop.export import load_source, write_timm
from engine.linprobe import make_linear_probe
from engine.trainer import NonFiniteWatch, TrainingRun, train_step
from util.dist import LaunchEnv

import main_finetune
import main_linprobe
import main_pretrain
from conftest import MINI, restored_process_state

CPU = torch.device("cpu")
SINGLE = LaunchEnv(rank=0, world_size=1, local_rank=0, dist_url=None)
FT = ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
      "--log_dir", "", "--warmup_epochs", "1", "--print_freq", "100", "--device", "cpu"]


# ----------------------------------------------------------------------------- seams to the product
# The CLIs' own parsers (public).
def finetune_args(argv):
    return main_finetune.get_args_parser().parse_args([str(a) for a in argv])


def linprobe_args(argv):
    return main_linprobe.get_args_parser().parse_args([str(a) for a in argv])


def pretrain_args(argv):
    return main_pretrain.get_args_parser().parse_args([str(a) for a in argv])


def config(args, task: str):
    """The run's config as the recipe runner resolves it, for a single process."""
    recipe = {"pretrain": pretrain_engine.PretrainRecipe, "finetune": finetune_engine.FinetuneRecipe,
              "linprobe": linprobe_engine.LinprobeRecipe}[task]()
    return resolve(args, task, SINGLE, **recipe.model_facts(args, None, None))


def learning_rate(args) -> float:
    """The absolute learning rate a run trains with (--lr, else --blr scaled by the effective batch)."""
    return config(args, "pretrain" if hasattr(args, "mask_ratio") else "finetune").optim.lr


def finetune_optimizer(args, model):
    """The optimizer fine-tuning builds for `model` from the flags (engine/finetune.py)."""
    return finetune_engine.FinetuneRecipe().optimizer(config(args, "finetune"), model, CPU)


def linprobe_optimizer(args, model):
    """The optimizer linear probing builds (LARS on the head)."""
    return linprobe_engine.LinprobeRecipe().optimizer(config(args, "linprobe"), model, CPU)


def finetune_mixup(args):
    """The mixup/cutmix function of fine-tuning (None when off): (images, labels) -> (mixed, soft targets)."""
    return finetune_engine.build_mixup(config(args, "finetune").augment)


def default_global_pool(args, linprobe: bool) -> bool:
    """Whether the classifier pools the patch tokens (True) or reads the class token (False)."""
    return config(args, "linprobe" if linprobe else "finetune").model.global_pool


def fold_and_export_timm(checkpoint_path, folder) -> None:
    """The export CLI's timm target for a classifier checkpoint (engine/interop/export.py)."""
    write_timm(load_source(str(checkpoint_path)), str(folder))


def save_training_checkpoint(args, model, optimizer, scaler, epoch, epoch_iter, epoch_iters, samples_in_epoch):
    """What a training run writes to args.output_dir (checkpoint-last.pth, the previous one kept)."""
    checkpoint_engine.make_checkpointer(DDPStrategy(), args.output_dir, model, optimizer, scaler,
                                        checkpoint_engine.plain_args(args)).save(
        epoch, epoch_iter, epoch_iters, samples_in_epoch)


def resume_training(args, model, optimizer, scaler, unreadable=None):
    """The resume a training run starts with: the checkpoint found from the flags loaded into model,
    optimizer and scaler. Returns ((epoch, samples into it) to continue at, whether all --epochs
    are done already, the checkpoint or None)."""
    found = checkpoint_engine.find_resume_checkpoint(args.resume, args.output_dir, not args.no_auto_resume, False,
                                                     unreadable)
    pos = checkpoint_engine.resume(found, model, optimizer, scaler, DDPStrategy(), start_epoch=args.start_epoch,
                                   model_name=args.model, explicit=bool(args.resume))
    return (pos.epoch, pos.samples_in_epoch), checkpoint_engine.already_finished(pos, args.epochs, found), found


def training_sampler(dataset, world_size: int, rank: int, seed: int, epoch: int, start_sample: int = 0):
    """The training order's sampler of one process, from `start_sample` of the epoch (a resume)."""
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    sampler.set_epoch(epoch, start_sample)
    return sampler


def training_run(model, optimizer, scaler, clip_grad=None) -> TrainingRun:
    """What the training step reads (engine/trainer.py TrainingRun), fp32 on the CPU."""
    return TrainingRun(model=model, compute_loss=mse, optimizer=optimizer, scaler=scaler, device=CPU,
                       clip_grad=clip_grad)


def one_step(run, batch):
    """One optimizer step of the recipes' training step: (loss, logged grad norm)."""
    return train_step(run, batch, 0, NonFiniteWatch(CPU, 0))


def run_in_process(engine_module, args, stop_after_resume: bool = False) -> dict:
    """engine_module.main(args) (pretraining or fine-tuning) in this process. Records what the
    runner (engine/recipe.py) hands to the resume: model, optimizer and scaler, and the scaler's
    state right after it; stop_after_resume: no epoch is trained (set-up only). Returns the record."""
    seen = {}
    real_resume, real_finished = recipe_engine.resume, recipe_engine.already_finished

    def recording(found, model, optimizer, scaler, strategy, **kw):
        pos = real_resume(found, model, optimizer, scaler, strategy, **kw)
        seen.update(model=model, optimizer=optimizer, scaler=scaler, scaler_state=dict(scaler.state_dict()))
        return pos

    recipe_engine.resume = recording
    if stop_after_resume:
        recipe_engine.already_finished = lambda pos, epochs, found: True
    try:
        with restored_process_state():
            engine_module.main(args)
    finally:
        recipe_engine.resume, recipe_engine.already_finished = real_resume, real_finished
    return seen


# ----------------------------------------------------------------------------- helpers of the tests
def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def group_of(optimizer, model) -> dict:
    """parameter name -> weight decay of its optimizer group (every trainable parameter in exactly one)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            assert name not in out, f"{name} is in two groups"
            out[name] = g["weight_decay"]
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- weight decay
def test_finetune_cli_exempts_cls_token_pos_embed_and_1d_parameters_from_weight_decay(two_classes, tmp_path):
    args = finetune_args([*FT, "--data_path", two_classes, "--output_dir", tmp_path / "out", "--batch_size", 4,
                          "--weight_decay", 0.3, "--epochs", 1])
    seen = run_in_process(finetune_engine, args, stop_after_resume=True)
    model, optimizer = seen["model"], seen["optimizer"]
    decay = group_of(optimizer, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable
    exempt = {n for n, p in model.named_parameters() if p.ndim <= 1} | {"cls_token", "pos_embed"}
    assert {n for n, wd in decay.items() if wd == 0.0} == exempt
    assert {n for n, wd in decay.items() if wd != 0.0} == trainable - exempt
    assert {wd for n, wd in decay.items() if n not in exempt} == {0.3}
    assert {"cls_token", "pos_embed"} <= set(model.no_weight_decay())  # the model's own list is what exempts them
    assert "blocks.0.attn.qkv.weight" in trainable - exempt and "blocks.0.attn.qkv.bias" in exempt
    assert model.uses_global_pool  # the fine-tuning default, as the CLI builds the model


def test_finetune_optimizer_honours_the_models_no_weight_decay_names():
    """A model that exempts a name of its own (here a 2-D one) gets it exempted by the recipe."""
    model = models.create_model("vit_mini_patch16", "classify", img_size=64, num_classes=2, global_pool=True)
    model.no_weight_decay = lambda: {"cls_token", "pos_embed", "blocks.1.mlp.fc1.weight"}
    optimizer = finetune_optimizer(finetune_args([*FT, "--weight_decay", 0.2, "--lr", 2e-3]), model)
    assert {g["lr"] for g in optimizer.param_groups} == {2e-3} and optimizer.defaults["betas"] == (0.9, 0.999)
    decay = group_of(optimizer, model)
    assert decay["blocks.1.mlp.fc1.weight"] == 0.0 and decay["blocks.0.mlp.fc1.weight"] == 0.2
    assert decay["cls_token"] == decay["pos_embed"] == 0.0


def test_pretrain_cli_decays_all_but_biases_and_norms(photos, tmp_path):
    args = pretrain_args([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--device", "cpu",
                          "--weight_decay", 0.25, "--output_dir", tmp_path / "out"])
    seen = run_in_process(pretrain_engine, args, stop_after_resume=True)
    model, optimizer = seen["model"], seen["optimizer"]
    decay = group_of(optimizer, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable
    assert "pos_embed" not in decay and "decoder_pos_embed" not in decay  # fixed sin-cos tables
    one_d = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1}
    # MAE exempts no name of its own: the official recipe decays cls_token and mask_token.
    assert not hasattr(model, "no_weight_decay")
    assert {n for n, wd in decay.items() if wd == 0.0} == one_d
    assert {n for n, wd in decay.items() if wd != 0.0} == trainable - one_d
    assert {wd for n, wd in decay.items() if n not in one_d} == {0.25}
    assert {"blocks.0.norm1.weight", "blocks.0.norm1.bias", "norm.weight", "decoder_norm.bias",
            "blocks.0.attn.qkv.bias", "decoder_pred.bias"} <= one_d
    assert decay["cls_token"] == decay["mask_token"] == decay["patch_embed.proj.weight"] == 0.25
    assert optimizer.defaults["betas"] == (0.9, 0.95)  # the official pretraining betas


def test_blr_scales_with_the_effective_batch_and_lr_overrides_it():
    assert learning_rate(pretrain_args(["--blr", 1.5e-4, "--batch_size", 64, "--accum_iter", 2])) == \
        pytest.approx(1.5e-4 * 128 / 256, rel=1e-12)
    assert learning_rate(finetune_args(["--blr", 5e-4, "--batch_size", 32])) == pytest.approx(5e-4 * 32 / 256, rel=1e-12)
    assert learning_rate(pretrain_args(["--lr", 3e-3, "--blr", 1.5e-4, "--batch_size", 64, "--accum_iter", 4])) == 3e-3


# ----------------------------------------------------------------------------- --smoothing with mixup / cutmix
@pytest.mark.parametrize("mixing", [["--mixup", 0.8], ["--cutmix", 1.0], ["--mixup", 0.8, "--cutmix", 1.0]],
                         ids=["mixup", "cutmix", "both"])
def test_smoothing_reaches_the_mixed_targets(mixing):
    smoothing, classes = 0.3, 5
    args = finetune_args([*FT, "--nb_classes", classes, "--smoothing", smoothing, *mixing])
    mixup = finetune_mixup(args)
    assert mixup is not None
    np.random.seed(0)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 0])  # mixed with the reversed batch: rows 0 and 3 with their own class
    _, targets = mixup(x, y)
    off, on = smoothing / classes, 1 - smoothing + smoothing / classes
    assert targets.shape == (4, classes)
    torch.testing.assert_close(targets[:, 3:], torch.full((4, 2), off), rtol=0, atol=1e-7)  # never a label
    torch.testing.assert_close(targets[0], torch.tensor([on, off, off, off, off]), rtol=0, atol=1e-7)
    torch.testing.assert_close(targets[3], targets[0], rtol=0, atol=0)
    torch.testing.assert_close(targets.sum(1), torch.ones(4), rtol=0, atol=1e-6)
    # Rows 1 and 2 mix classes 1 and 2 with weights lam, 1 - lam on top of the off-class mass.
    lam = (targets[1, 1] - off) / (on - off)
    assert 0 <= lam <= 1
    torch.testing.assert_close(targets[1, 1:3], torch.stack([off + lam * (on - off), off + (1 - lam) * (on - off)]))
    assert targets[1, 0] == pytest.approx(off, abs=1e-7)


def test_no_mixing_means_no_mixup_function():
    assert finetune_mixup(finetune_args([*FT, "--smoothing", 0.3])) is None


# ----------------------------------------------------------------------------- fp16 gradient scaler and resume
def test_fp16_scaler_runs_on_cpu_and_resumes_at_its_saved_scale(photos, tmp_path):
    out = tmp_path / "out"
    flags = [*MINI, "--data_path", photos, "--batch_size", 7, "--device", "cpu", "--amp", "fp16",
             "--output_dir", out, "--print_freq", 100]
    first = run_in_process(pretrain_engine, pretrain_args([*flags, "--epochs", 1]))
    assert first["scaler"].is_enabled()
    saved = load(out / "checkpoint-last.pth")
    scaler_state = saved["scaler"]
    assert scaler_state["scale"] == 65536.0 and scaler_state["_growth_tracker"] == 2  # 2 finite fp16 steps
    assert scaler_state["growth_interval"] == 2000

    # A run whose scaler had backed off: the resumed scaler continues from its state, not the default.
    saved["scaler"] = {**scaler_state, "scale": 1024.0, "_growth_tracker": 7}
    torch.save(saved, out / "checkpoint-last.pth")
    resumed = run_in_process(pretrain_engine, pretrain_args([*flags, "--epochs", 2]), stop_after_resume=True)
    assert resumed["scaler"].get_scale() == 1024.0
    assert resumed["scaler_state"]["_growth_tracker"] == 7


def small_state(seed):
    """A model, a momentum optimizer with state, and an enabled scaler at a non-default scale."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.amp.GradScaler("cpu", init_scale=2.0 ** (seed + 3), enabled=True)


def test_resume_restores_weights_optimizer_scaler_rng_and_position(tmp_path):
    """The resume path directly (fast): the newest readable checkpoint, its state, where to continue."""
    args = pretrain_args(["--output_dir", tmp_path, "--epochs", 4])
    model, optimizer, scaler = small_state(seed=5)
    save_training_checkpoint(args, model, optimizer, scaler, epoch=1, epoch_iter=3, epoch_iters=5, samples_in_epoch=21)
    expected_draw = torch.rand(3)  # the RNG continues from the state saved with the checkpoint

    fresh_model, fresh_optimizer, fresh_scaler = small_state(seed=0)
    torch.rand(7)
    (epoch, samples), finished, found = resume_training(args, fresh_model, fresh_optimizer, fresh_scaler)
    assert (epoch, samples, finished) == (1, 21, False)  # mid-epoch: the same epoch, 21 samples in
    assert torch.equal(torch.rand(3), expected_draw)
    assert fresh_scaler.get_scale() == 2.0 ** 8 and fresh_scaler.state_dict() == scaler.state_dict()
    for a, b in zip(fresh_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh_model.parameters()]
    for a, p in zip(momentum, model.parameters()):
        assert torch.equal(a, optimizer.state[p]["momentum_buffer"])
    assert found["_path"] == str(tmp_path / "checkpoint-last.pth")

    # The end of an epoch continues at the next one; the last epoch's end has nothing left to train.
    save_training_checkpoint(args, model, optimizer, scaler, epoch=2, epoch_iter=5, epoch_iters=5, samples_in_epoch=35)
    assert resume_training(args, *small_state(0))[:2] == ((3, 0), False)
    save_training_checkpoint(args, model, optimizer, scaler, epoch=3, epoch_iter=5, epoch_iters=5, samples_in_epoch=35)
    assert resume_training(args, *small_state(0))[:2] == ((4, 0), True)
    assert resume_training(pretrain_args(["--output_dir", tmp_path, "--epochs", 5]), *small_state(0))[:2] == \
        ((4, 0), False)
    assert resume_training(pretrain_args(["--output_dir", tmp_path, "--epochs", 3]), *small_state(0))[:2] == \
        ((4, 0), True)


def test_resume_falls_back_and_follows_the_flags(tmp_path):
    args = pretrain_args(["--output_dir", tmp_path, "--epochs", 4, "--start_epoch", 2])
    model, optimizer, scaler = small_state(seed=5)
    save_training_checkpoint(args, model, optimizer, scaler, epoch=0, epoch_iter=5, epoch_iters=5, samples_in_epoch=35)
    save_training_checkpoint(args, model, optimizer, scaler, epoch=1, epoch_iter=2, epoch_iters=5, samples_in_epoch=14)
    (tmp_path / "checkpoint-last.pth").write_bytes(b"truncated")
    unreadable = []
    fresh = small_state(seed=0)
    assert resume_training(args, *fresh, unreadable)[:2] == ((1, 0), False)  # checkpoint-prev.pth, epoch 0 done
    assert unreadable == [str(tmp_path / "checkpoint-last.pth")]
    assert fresh[2].get_scale() == 2.0 ** 8

    # --resume names the file; --no_auto_resume or no --output_dir start fresh at --start_epoch.
    prev = str(tmp_path / "checkpoint-prev.pth")
    assert resume_training(pretrain_args(["--resume", prev, "--output_dir", ""]), *small_state(0))[0] == (1, 0)
    for flags in (["--output_dir", tmp_path, "--no_auto_resume"], ["--output_dir", ""]):
        (epoch, samples), finished, found = resume_training(pretrain_args([*flags, "--start_epoch", 2]), *small_state(0))
        assert (epoch, samples, finished, found) == (2, 0, False, None)

    # Without checkpoint-last/-prev.pth the newest numbered checkpoint is taken.
    (tmp_path / "checkpoint-last.pth").unlink()
    (tmp_path / "checkpoint-prev.pth").rename(tmp_path / "checkpoint-0.pth")
    assert resume_training(args, *small_state(0))[0] == (1, 0)
    prev = str(tmp_path / "checkpoint-0.pth")

    # A disabled scaler (fp32, bf16) ignores the saved scaler state.
    model, optimizer, _ = small_state(seed=0)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    resume_training(pretrain_args(["--resume", prev, "--output_dir", ""]), model, optimizer, disabled)
    assert not disabled.is_enabled() and disabled.state_dict() == {}

    # Switching to --amp fp16: a checkpoint of an fp32 run (empty scaler state) leaves the scaler at its default.
    fp32 = tmp_path / "fp32"
    model, optimizer, _ = small_state(seed=5)
    save_training_checkpoint(pretrain_args(["--output_dir", fp32]), model, optimizer,
                             torch.amp.GradScaler("cpu", enabled=False), 1, 5, 5, 35)
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    assert resume_training(pretrain_args(["--output_dir", fp32]), *small_state(0)[:2], enabled)[0] == (2, 0)
    assert enabled.get_scale() == 65536.0

    # An official checkpoint (no epoch_iter / epoch_iters) is at an epoch's end.
    official = {k: v for k, v in torch.load(fp32 / "checkpoint-last.pth", weights_only=True).items()
                if k not in ("epoch_iter", "epoch_iters", "samples_in_epoch", "rng")}
    torch.save(official, fp32 / "official.pth")
    assert resume_training(pretrain_args(["--resume", fp32 / "official.pth", "--output_dir", ""]),
                           *small_state(0))[0] == (2, 0)


def test_sampler_resumed_mid_epoch_yields_its_length_and_the_rest_of_the_order():
    """14 samples on 3 processes (padded to 15), resumed after 6: each process has 3 left."""
    dataset = list(range(14))
    full = [i for _, i in training_sampler(dataset, 1, 0, seed=5, epoch=2)]
    rest = []
    for rank in range(3):
        sampler = training_sampler(dataset, 3, rank, seed=5, epoch=2, start_sample=6)
        keys = list(sampler)
        assert len(sampler) == len(keys) == 3 and {e for e, _ in keys} == {2}
        rest.append([i for _, i in keys])
    assert sorted(rest[0] + rest[1] + rest[2]) == sorted(full[6:] + full[:1])  # the padding repeats the first


# ----------------------------------------------------------------------------- clipping with an enabled scaler
def linear_problem():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1), (x, y)


def unscaled_grad_norm(model, batch) -> float:
    """The reference: the gradient norm of the plain loss, no scaler involved."""
    probe = torch.nn.Linear(4, 1)
    probe.load_state_dict(model.state_dict())
    mse(probe, batch).backward()
    return torch.cat([p.grad.flatten() for p in probe.parameters()]).norm().item()


@pytest.mark.parametrize("clip", [0.01, None], ids=["clipped", "unclipped"])
def test_grad_norm_and_clipping_are_taken_after_unscaling(clip):
    model, batch = linear_problem()
    reference = unscaled_grad_norm(model, batch)
    assert reference > 0.01 * 10
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    run = training_run(model, torch.optim.SGD(model.parameters(), lr=1.0), scaler, clip_grad=clip)
    before = [p.detach().clone() for p in model.parameters()]
    _, norm = one_step(run, batch)
    update = torch.cat([(a - p.detach()).flatten() for a, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(clip if clip is not None else reference, rel=1e-4)  # lr 1
    assert norm.item() == pytest.approx(reference, rel=1e-5)  # the unscaled norm, not 1024 times it
    assert scaler.get_scale() == 1024.0  # the step was taken (no inf), no growth yet


# ----------------------------------------------------------------------------- pooling defaults
def test_pooling_defaults_fine_tuning_pools_linear_probing_reads_the_class_token():
    vit = ["--model", "vit_mini_patch16"]
    assert default_global_pool(finetune_args(vit), linprobe=False) is True
    assert default_global_pool(linprobe_args(vit), linprobe=True) is False
    # The flags override either default.
    assert default_global_pool(finetune_args([*vit, "--cls_token"]), linprobe=False) is False
    assert default_global_pool(linprobe_args([*vit, "--global_pool"]), linprobe=True) is True
    # A model without a class token pools in both.
    assert default_global_pool(linprobe_args(["--model", "mixmim_mini"]), linprobe=True) is True
    assert default_global_pool(finetune_args(["--model", "mixmim_mini"]), linprobe=False) is True


# ----------------------------------------------------------------------------- linear-probe export
def test_linprobe_export_folds_a_trained_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("vit_mini_patch16", "classify", img_size=64, num_classes=3, global_pool=False)
    make_linear_probe(model)
    bn, linear = model.head
    with torch.no_grad():
        linear.weight.normal_(0, 0.5)
    optimizer = linprobe_optimizer(linprobe_args(["--model", "vit_mini_patch16", "--lr", 0.5, "--weight_decay", 0.]),
                                   model)
    g = torch.Generator().manual_seed(2)
    for step in range(3):  # the recipe's train mode: frozen encoder in eval mode, the head learns
        model.eval()
        model.head.train()
        x, y = torch.randn(6, 3, 64, 64, generator=g) * 2 + 0.5, torch.randint(0, 3, (6,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not bn.affine and int(bn.num_batches_tracked) == 3
    assert bn.running_mean.abs().mean() > 1e-2 and (bn.running_var - 1).abs().mean() > 1e-2  # not the identity
    model.eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 2, "args": {"model": "vit_mini_patch16", "input_size": 64}},
               path)
    fold_and_export_timm(path, tmp_path / "timm")
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert isinstance(exported.head, torch.nn.Linear)
    x = torch.randn(4, 3, 64, 64, generator=g)
    with torch.no_grad():
        ours, theirs = model(x), exported(x)
        # The statistics matter at this tolerance: an identity BatchNorm gives other logits.
        identity = linear(model.forward_head(model.forward_features(x), pre_logits=True))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (identity - ours).abs().max() > 1e-2
