"""The run's config is resolved once (engine/config.py) and nothing writes into args afterwards;
the parts the trainer takes satisfy their protocols (engine/protocols.py)."""
import argparse
import copy
import dataclasses

import pytest
import torch

from engine import finetune as finetune_engine
from engine import pretrain as pretrain_engine
from engine.config import resolve
from engine.pretrain import PretrainRecipe
from util.dist import LaunchEnv

import main_finetune
import main_pretrain
from conftest import MINI, restored_process_state

SINGLE = LaunchEnv(rank=0, world_size=1, local_rank=0, dist_url=None)


def parse(module, argv) -> argparse.Namespace:
    return module.get_args_parser().parse_args([str(a) for a in argv])


def pretrain_config(argv, launch=SINGLE, resumed=None):
    args = parse(main_pretrain, argv)
    return args, resolve(args, "pretrain", launch, **PretrainRecipe.model_facts(args, None, resumed))


def test_resolve_fills_what_the_official_code_writes_into_args():
    argv = [*MINI, "--batch_size", 8, "--accum_iter", 2, "--blr", 1.5e-4, "--device", "cpu"]
    args, cfg = pretrain_config(argv, LaunchEnv(rank=1, world_size=4, local_rank=1, dist_url=None))
    before = copy.deepcopy(vars(args))
    assert cfg.optim.effective_batch == 8 * 2 * 4 and cfg.optim.lr == pytest.approx(1.5e-4 * 64 / 256)
    assert cfg.model.mask_ratio == 0.75 and cfg.model.decoder == {}
    record = cfg.record
    # The official Namespace after init_distributed_mode, mask ratio default, decoder and lr scaling.
    assert (record["rank"], record["world_size"], record["gpu"], record["distributed"]) == (1, 4, 1, True)
    assert record["dist_backend"] == "gloo" and record["dist_url"] == "env://"
    assert (record["decoder_embed_dim"], record["decoder_depth"], record["decoder_num_heads"]) == (64, 2, 4)
    assert record["mask_ratio"] == 0.75 and record["lr"] == cfg.optim.lr
    # The flags keep their places, the new keys come last as in the official args.
    assert list(record)[:len(before)] == list(before) and list(record)[len(before):] == [
        "rank", "gpu", "distributed", "dist_backend"]
    assert vars(args) == before  # read, not written
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(TypeError):
        cfg.record["lr"] = 1.0


def test_given_lr_and_mask_ratio_win_and_a_checkpoint_sets_the_decoder():
    resumed = {"_path": "ckpt.pth", "args": {"decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 2}}
    _, cfg = pretrain_config([*MINI, "--lr", 0.5, "--mask_ratio", 0.6], resumed=resumed)
    assert cfg.optim.lr == 0.5 and cfg.model.mask_ratio == 0.6
    assert dict(cfg.model.decoder) == {"decoder_depth": 1, "decoder_embed_dim": 32, "decoder_num_heads": 2}
    assert cfg.record["decoder_embed_dim"] == 32 and cfg.record["distributed"] is False
    assert "dist_backend" not in cfg.record


def test_classification_pooling_default_is_resolved():
    args = parse(main_finetune, ["--model", "vit_mini_patch16", "--input_size", 64])
    cfg = resolve(args, "finetune", SINGLE, **finetune_engine.FinetuneRecipe().model_facts(args, None, None))
    assert cfg.model.global_pool is True and cfg.record["global_pool"] is True and args.global_pool is None
    assert cfg.augment.smoothing == 0.1 and cfg.data.pipeline == "pil"


def test_a_pretraining_and_a_finetuning_leave_args_unchanged(photos, two_classes, tmp_path):
    """The whole run in this process: args after the run equals args as parsed."""
    out = tmp_path / "pt"
    args = parse(main_pretrain, [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1,
                                 "--output_dir", out, "--device", "cpu", "--accum_iter", 2, "--save_every_steps", 2])
    parsed = copy.deepcopy(vars(args))
    with restored_process_state():
        pretrain_engine.main(args)
    assert vars(args) == parsed
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert saved["args"]["lr"] == pytest.approx(1e-3 * 14 / 256) and saved["args"]["mask_ratio"] == 0.75

    args = parse(main_finetune, ["--model", "vit_mini_patch16", "--input_size", 64, "--num_workers", 0,
                                 "--log_dir", "", "--data_path", two_classes, "--nb_classes", 2, "--batch_size", 8,
                                 "--epochs", 1, "--warmup_epochs", 0, "--finetune", out / "checkpoint-last.pth",
                                 "--output_dir", tmp_path / "ft", "--device", "cpu", "--mixup", 0.8])
    parsed = copy.deepcopy(vars(args))
    with restored_process_state():
        finetune_engine.main(args)
    assert vars(args) == parsed
    saved = torch.load(tmp_path / "ft" / "checkpoint-last.pth", weights_only=True)
    assert saved["args"]["global_pool"] is True and saved["epoch"] == 0
