"""Recipe files (--config), --effective_batch, --print_config and the run's own config.yaml.

The official recipes are checked against the official commands written out here from
facebookresearch/mae PRETRAIN.md / FINETUNE.md (its Linear Probing section) and Sense-X/MixMIM's scripts:
both are resolved for the official number of GPUs and must give the same flags, value by value.
"""
import argparse
import re
from pathlib import Path

import pytest
import torch
import yaml

from engine import finetune as finetune_engine
from engine import linprobe as linprobe_engine
from engine import pretrain as pretrain_engine
from engine.config import config_text, resolve, resolved_flags
from engine.launch.slurm import add_launcher_args, launch
from util.cli import run_training_cli
from util.config_file import parse_args
from util.dist import LaunchEnv

import main_finetune
import main_linprobe
import main_pretrain
from conftest import MINI, REPO, assert_ok, one_line_error, pretrain, restored_process_state

CONFIGS = REPO / "configs"
CLI = {"pretrain": (main_pretrain, pretrain_engine.PretrainRecipe()),
       "finetune": (main_finetune, finetune_engine.FinetuneRecipe()),
       "linprobe": (main_linprobe, linprobe_engine.LinprobeRecipe())}


def task_of(path: Path) -> str:
    return path.parent.name


def parse(task: str, argv) -> object:
    return parse_args(CLI[task][0].get_args_parser(), [str(a) for a in argv])


def flags(task: str, argv, world_size: int) -> dict:
    """The resolved flags (config.yaml's content) of a command on `world_size` processes."""
    args = parse(task, argv)
    recipe = CLI[task][1]
    cfg = resolve(args, task, LaunchEnv(0, world_size, 0, None), **recipe.model_facts(args, None, None))
    return resolved_flags(cfg, args)


def without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


SHIPPED = sorted(CONFIGS.glob("*/*.yaml"))

# (recipe file, the official command's flags (its launcher's --nodes/--use_volta32/--job_dir left out:
# the world size says them), processes of the official launch).
OFFICIAL = [
    *[(f"pretrain/{m}_{ep}ep.yaml",
       f"--batch_size 64 --model {m} --norm_pix_loss --mask_ratio 0.75 --epochs {ep} --warmup_epochs 40 "
       "--blr 1.5e-4 --weight_decay 0.05", 64)
      for m in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14") for ep in (800, 1600)],
    ("finetune/vit_base_patch16.yaml",
     "--batch_size 32 --model vit_base_patch16 --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 "
     "--drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval", 32),
    ("finetune/vit_large_patch16.yaml",
     "--batch_size 32 --model vit_large_patch16 --epochs 50 --blr 1e-3 --layer_decay 0.75 --weight_decay 0.05 "
     "--drop_path 0.2 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval", 32),
    ("finetune/vit_huge_patch14.yaml",
     "--batch_size 16 --model vit_huge_patch14 --epochs 50 --blr 1e-3 --layer_decay 0.75 --weight_decay 0.05 "
     "--drop_path 0.3 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval", 64),
    # FINETUNE.md's single-node form of the ViT-B recipe: 8 GPUs, --accum_iter 4.
    ("finetune/vit_base_patch16.yaml",
     "--accum_iter 4 --batch_size 32 --model vit_base_patch16 --epochs 100 --blr 5e-4 --layer_decay 0.65 "
     "--weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval", 8),
    ("linprobe/vit_base_patch16.yaml",
     "--batch_size 512 --model vit_base_patch16 --cls_token --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval", 32),
    ("linprobe/vit_large_patch16.yaml",
     "--batch_size 512 --model vit_large_patch16 --cls_token --epochs 50 --blr 0.1 --weight_decay 0.0 --dist_eval", 32),
    ("linprobe/vit_huge_patch14.yaml",
     "--batch_size 512 --model vit_huge_patch14 --cls_token --epochs 50 --blr 0.1 --weight_decay 0.0 --dist_eval", 32),
    ("pretrain/mixmim_base_600ep.yaml",
     "--batch_size 128 --model mixmim_base --norm_pix_loss --mask_ratio 0.5 --epochs 600 --accum_iter 1 "
     "--warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05", 16),
    ("finetune/mixmim_base.yaml",
     "--batch_size 128 --model mixmim_base --epochs 100 --blr 5e-4 --layer_decay 0.7 --weight_decay 0.05 "
     "--drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval", 8),
    # This project's own: the README's commands for the billion-parameter models and the CPU demo.
    ("pretrain/mae_vit_2b_patch14_fsdp.yaml",
     "--model mae_vit_2b_patch14 --dist_strategy fsdp --fsdp_shard_size 8 --amp bf16 --grad_ckpt --batch_size 64 "
     "--norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 "
     "--save_every_steps 512 --async_save", 64),
    ("pretrain/mae_vit_6p5b_patch14_fsdp.yaml",
     "--model mae_vit_6p5b_patch14 --dist_strategy fsdp --amp bf16 --grad_ckpt --batch_size 64 --norm_pix_loss "
     "--mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --save_every_steps 512 "
     "--async_save", 64),
    ("pretrain/demo_cpu.yaml",
     "--model mae_vit_mini_patch16 --input_size 112 --batch_size 7 --epochs 30 --warmup_epochs 3 --blr 0.02 "
     "--num_workers 2 --output_dir output_dir/demo --log_dir output_dir/demo", 1),
]


def test_every_shipped_recipe_is_checked_against_a_command():
    assert {CONFIGS / f for f, _, _ in OFFICIAL} == set(SHIPPED) and len(SHIPPED) == 17


@pytest.mark.parametrize("recipe,command,world_size", OFFICIAL, ids=[f"{f}@{w}" for f, _, w in OFFICIAL])
def test_recipe_equals_the_official_command_flag_by_flag(recipe, command, world_size):
    task = task_of(CONFIGS / recipe)
    official = flags(task, command.split(), world_size)
    from_file = flags(task, ["--config", CONFIGS / recipe], world_size)
    # The file says the effective batch; the official command says it through the launch.
    assert from_file["effective_batch"] == official["batch_size"] * official["accum_iter"] * world_size
    assert from_file == official


@pytest.mark.parametrize("recipe", SHIPPED, ids=[f"{p.parent.name}/{p.name}" for p in SHIPPED])
def test_print_config_of_each_recipe_is_stable(recipe, tmp_path, capsys):
    """--print_config's YAML, fed back as --config, prints the same YAML (a fixed point), and
    says the resolved accum_iter and lr."""
    task = task_of(recipe)
    main = CLI[task][0]
    texts = []
    for source in (recipe, tmp_path / "printed.yaml"):
        with restored_process_state():
            assert run_training_cli(CLI_MAIN[task], main.get_args_parser(),
                                    ["--config", str(source), "--print_config"]) == 0
        texts.append(capsys.readouterr().out)
        (tmp_path / "printed.yaml").write_text(texts[-1])
    # The second print names the file it read in its header; the flags are the same.
    assert yaml.safe_load(texts[0]) == yaml.safe_load(texts[1])
    printed = yaml.safe_load(texts[0])
    assert printed["effective_batch"] == printed["batch_size"] * printed["accum_iter"]  # 1 process here
    lr = re.search(r"^# lr: (\S+)$", texts[0], re.M)  # the scaling rule's, shown but not pinned
    assert "lr" not in printed and float(lr.group(1)) == pytest.approx(printed["blr"] * printed["effective_batch"] / 256)


CLI_MAIN = {"pretrain": pretrain_engine.main, "finetune": finetune_engine.main, "linprobe": linprobe_engine.main}


@pytest.mark.parametrize("recipe", ["pretrain/mae_vit_2b_patch14_fsdp.yaml", "pretrain/mae_vit_6p5b_patch14_fsdp.yaml"])
@pytest.mark.parametrize("world_size", [8, 16, 32, 64])
def test_billion_parameter_recipes_launch_on_one_to_eight_nodes(recipe, world_size):
    """The README runs them on 8 x 8 GPUs and on one node: --save_every_steps must divide by the
    accum_iter each launch resolves (500 did not on 8 GPUs, accum_iter 8)."""
    from engine.checks import check_launch

    args = parse("pretrain", ["--config", CONFIGS / recipe])
    check_launch(args, world_size, on_this_machine=False)


def test_command_line_beats_file_beats_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 7\nbatch_size: 3\nnorm_pix_loss: true\nblr: 5e-4\n")
    args = parse("pretrain", ["--config", path, "--epochs", 9])
    assert (args.epochs, args.batch_size, args.norm_pix_loss, args.blr) == (9, 3, True, 5e-4)
    assert args.weight_decay == 0.05 and args.warmup_epochs == 40  # defaults where neither speaks
    # A switch of the file cannot be undone from the command line except by its other flag.
    path.write_text("pin_mem: false\n")
    assert parse("pretrain", ["--config", path]).pin_mem is False
    assert parse("pretrain", ["--config", path, "--pin_mem"]).pin_mem is True
    # Option names work as keys: `cls_token: true` is --cls_token (global_pool False).
    path.write_text("cls_token: true\n")
    assert parse("linprobe", ["--config", path]).global_pool is False
    assert parse("linprobe", ["--config", path, "--global_pool"]).global_pool is True


def test_effective_batch_gives_the_same_batch_and_lr_on_1_2_4_processes(tmp_path):
    seen = set()
    for world, accum in ((1, 8), (2, 4), (4, 2)):
        f = flags("pretrain", [*MINI, "--batch_size", 2, "--effective_batch", 16, "--blr", 1e-3], world)
        assert f["accum_iter"] == accum
        seen.add((f["batch_size"] * f["accum_iter"] * world, f["lr"]))
    assert seen == {(16, 1e-3 * 16 / 256)}
    # The file's effective batch yields to --accum_iter on the command line (the command line wins).
    path = tmp_path / "r.yaml"
    path.write_text("effective_batch: 16\nbatch_size: 2\n")
    assert flags("pretrain", ["--config", path, "--accum_iter", 3], 2)["accum_iter"] == 3
    assert flags("pretrain", ["--config", path, "--batch_size", 4], 2)["accum_iter"] == 2


@pytest.mark.parametrize("nproc, accum", [(2, 4), (4, 2)])
def test_effective_batch_under_torchrun_gives_the_same_batch_and_lr(nproc, accum):
    """The same, from real torchrun launches: each process resolves its launch; rank 0 alone prints."""
    proc = pretrain([*MINI, "--batch_size", 2, "--effective_batch", 16, "--blr", 1e-3, "--print_config"], nproc=nproc)
    assert_ok(proc)
    assert proc.stdout.count("# The resolved config of a main_pretrain.py run") == 1
    assert f"run on {nproc} processes" in proc.stdout
    printed = yaml.safe_load(proc.stdout)
    assert printed["accum_iter"] == accum and printed["batch_size"] * accum * nproc == printed["effective_batch"] == 16
    lr = re.search(r"^# lr: (\S+)$", proc.stdout, re.M)
    assert float(lr.group(1)) == pytest.approx(1e-3 * 16 / 256)


def cli_error(task: str, argv, capsys) -> str:
    """The one line of a bad command, run through the CLI's own entry (in this process)."""
    with restored_process_state():
        code = run_training_cli(CLI_MAIN[task], CLI[task][0].get_args_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def test_bad_effective_batch_is_one_line(capsys):
    line = cli_error("pretrain", [*MINI, "--batch_size", 6, "--effective_batch", 16, "--print_config"], capsys)
    assert line == ("error: --effective_batch 16 is not a multiple of --batch_size 6 x 1 process = 6: choose a "
                    "--batch_size that divides 16, or another --effective_batch")
    line = cli_error("pretrain", [*MINI, "--effective_batch", 16, "--accum_iter", 2], capsys)
    assert "--effective_batch and --accum_iter both given" in line


@pytest.mark.parametrize("content,expected", [
    ("batchsize: 8\n", "unknown key 'batchsize', not a flag of this command (closest: batch_size)"),
    ("zzzz: 1\n", "unknown key 'zzzz', not a flag of this command (see --help for the flags)"),
    ("epochs: many\n", "'epochs' must be an integer (as --epochs on the command line), got 'many'"),
    ("epochs: 12.5\n", "'epochs' must be an integer (as --epochs on the command line), got 12.5"),
    ("blr: [1, 2]\n", "'blr' must be a number (as --blr on the command line), got [1, 2]"),
    ("norm_pix_loss: 3\n", "'norm_pix_loss' must be true or false, got 3"),
    ("dist_strategy: zero3\n", "'dist_strategy' is 'zero3'; choose one of ddp, fsdp"),
    ("epochs: null\n", "'epochs' has no value"),
    ("epochs: 3\n  batch_size: 4\n", "is not valid YAML (line 2, column 13: mapping values are not allowed here)"),
    ("- epochs\n", "must be a mapping of flag names to values (`batch_size: 64`), not a list"),
    ("config: other.yaml\n", "a recipe file cannot name another one"),
])
def test_a_bad_recipe_file_is_one_line(content, expected, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    line = cli_error("pretrain", ["--config", path, "--print_config"], capsys)
    assert line.startswith(f"error: --config {path}") and expected in line


def test_a_missing_recipe_file_is_one_line_also_in_a_real_process(tmp_path):
    line = one_line_error(pretrain(["--config", tmp_path / "nope.yaml"]))
    assert line == f"error: --config {tmp_path / 'nope.yaml'}: no such file"


def test_slurm_launcher_takes_recipes_and_prints_the_jobs_config(tmp_path, capsys):
    argv = ["--config", str(CONFIGS / "pretrain/mae_vit_large_patch16_800ep.yaml"), "--nodes", "4", "--ngpus", "8",
            "--job_dir", str(tmp_path / "job"), "--print_config"]
    parser = main_pretrain.get_args_parser()
    code = launch(argparse.ArgumentParser(parents=[parser]), "engine.pretrain:main", "mae_pretrain", argv,
                  preflight="engine.pretrain:preflight")
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert code == 0 and printed["accum_iter"] == 2  # 4096 / (64 x 32 GPUs)
    lr = re.search(r"^# lr: (\S+)$", text, re.M)
    assert lr and float(lr.group(1)) == pytest.approx(1.5e-4 * 4096 / 256) and "nodes" not in printed
    assert not (tmp_path / "job").exists()  # nothing submitted, nothing written


def test_config_yaml_of_a_slurm_job_leaves_the_launcher_flags_as_comments(tmp_path):
    parser = argparse.ArgumentParser(parents=[main_pretrain.get_args_parser()])
    add_launcher_args(parser)
    args = parse_args(parser, [*MINI, "--nodes", "2", "--ngpus", "4"])
    args.job_name = "mae_pretrain"  # what the launcher adds
    cfg = resolve(args, "pretrain", LaunchEnv(0, 8, 0, None),
                  **pretrain_engine.PretrainRecipe.model_facts(args, None, None))
    text = config_text(cfg, args)
    body = yaml.safe_load(text)
    assert "nodes" not in body and "job_name" not in body and "world_size" not in body
    assert "# nodes: 2\n" in text and "# ngpus: 4\n" in text
    # ... so the training CLI takes it back as it is.
    (tmp_path / "config.yaml").write_text(text)
    back = parse_args(main_pretrain.get_args_parser(), ["--config", str(tmp_path / "config.yaml")])
    assert {k: getattr(back, k) for k in body} == body and back.accum_iter == 1
    # Where it wrote and the lr the scaling rule gave are comments: a rerun with another --blr gets
    # that blr's lr, and writes where it is told (or the default), not into this run's folder.
    assert "lr" not in body and "output_dir" not in body and "log_dir" not in body
    assert f"# lr: {cfg.optim.lr}\n" in text and f"# output_dir: {args.output_dir}\n" in text
    again = parse_args(main_pretrain.get_args_parser(), ["--config", str(tmp_path / "config.yaml"), "--blr", "3e-3"])
    cfg2 = resolve(again, "pretrain", LaunchEnv(0, 8, 0, None),
                   **pretrain_engine.PretrainRecipe.model_facts(again, None, None))
    assert cfg2.optim.lr == pytest.approx(3e-3 * cfg.optim.effective_batch / 256) != cfg.optim.lr


def test_rerun_from_its_own_config_yaml_is_bit_identical(photos, tmp_path):
    """A short CPU pretraining (effective batch 14 as 7 x 2 accumulation), then the same run from
    the config.yaml it wrote, into another folder: the same weights, and the checkpoint records
    the values of config.yaml."""
    first, second = tmp_path / "first", tmp_path / "second"
    argv = [*MINI, "--data_path", photos, "--batch_size", 7, "--effective_batch", 14, "--epochs", 2,
            "--device", "cpu", "--blr", 5e-3, "--output_dir", first]
    with restored_process_state():
        assert run_training_cli(pretrain_engine.main, main_pretrain.get_args_parser(), list(map(str, argv))) == 0
    text = (first / "config.yaml").read_text()
    written = yaml.safe_load(text)
    assert written["accum_iter"] == 2 and written["effective_batch"] == 14 and "output_dir" not in written
    assert f"# output_dir: {first}\n" in text
    with restored_process_state():
        assert run_training_cli(pretrain_engine.main, main_pretrain.get_args_parser(),
                                ["--config", str(first / "config.yaml"), "--output_dir", str(second)]) == 0
    a = torch.load(first / "checkpoint-last.pth", weights_only=True)
    b = torch.load(second / "checkpoint-last.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    recorded = a["args"]
    assert all(recorded[k] == v for k, v in written.items()), {k: (recorded[k], v) for k, v in written.items()
                                                                if recorded[k] != v}
    assert without(yaml.safe_load((second / "config.yaml").read_text()), "output_dir", "log_dir") == \
        without(written, "output_dir", "log_dir")
