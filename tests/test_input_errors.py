"""Bad input gets one clear line naming the problem and the fix, and exit code 2.

Most cases run the CLIs' preflight functions in-process (the same functions main() calls first);
a few real CLI runs prove the one-line output and that nothing is trained."""
import shutil
import subprocess

import pytest
import torch

import models
from engine import finetune as finetune_engine
from engine import linprobe as linprobe_engine
from engine import pretrain as pretrain_engine
from util.errors import UserError

import main_finetune
import main_linprobe
import main_pretrain
from conftest import MINI, REPO, assert_ok, cli_env, main_cmd, one_line_error, pretrain

FT = ["--model", "vit_mini_patch16", "--input_size", "64", "--nb_classes", "2", "--num_workers", "0",
      "--log_dir", "", "--warmup_epochs", "1"]


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist: point it at a dataset folder"),
    ("no_train", "has no 'train' folder: expected"),
    ("no_class_folders", "no class folders in"),
    ("empty", "no images found under"),
])
def test_dataset_layout_errors(tmp_path, case, expected):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no_class_folders":
        (root / "train").mkdir()
        (root / "train" / "a.txt").write_text("not an image")
    if case == "empty":
        (root / "train" / "cls").mkdir(parents=True)
    err = one_line_error(pretrain([*MINI, "--data_path", root, "--output_dir", tmp_path / "o"]))
    assert expected in err and str(root) in err


def test_batch_larger_than_per_rank_dataset(photos, tmp_path):
    err = one_line_error(pretrain([*MINI, "--data_path", photos, "--batch_size", 15, "--output_dir", tmp_path]))
    assert "gets 14 of the 14 images, fewer than --batch_size 15: lower --batch_size" in err


@pytest.mark.parametrize("flags, expected", [
    (["--model", "mae_vit_nope"], "unknown model 'mae_vit_nope'; choose one of: mae_vit_2b_patch14, "
                                  "mae_vit_6p5b_patch14, mae_vit_base_patch16"),
    (["--model", "vit_mini_patch16"], "--model vit_mini_patch16 is not a pretraining model; choose one of: "
                                      "mae_vit_2b_patch14"),
    (["--input_size", "72"], "--input_size 72 is not divisible by the patch size 16"),
    (["--accum_iter", "2", "--save_every_steps", "3"], "--save_every_steps 3 must be a multiple of --accum_iter 2"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be between 0 and 1"),
    (["--device", "cuda"], "CUDA is not available: use --device cpu"),
    (["--resume", "/nonexistent/ckpt.pth"], "--resume /nonexistent/ckpt.pth does not exist"),
])
def test_bad_flags(photos, tmp_path, flags, expected):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = one_line_error(pretrain([*MINI, "--data_path", photos, "--output_dir", tmp_path, *flags]))
    assert expected in err


def test_unreadable_image_is_replaced_with_a_warning(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    victim = sorted((data / "train" / "photos").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    (data / "train" / "photos" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    proc = pretrain([*MINI, "--data_path", data, "--batch_size", 5, "--epochs", 1, "--output_dir", tmp_path / "o"])
    assert_ok(proc)
    assert f"warning: unreadable image {victim}" in proc.stderr
    assert "garbage.jpg" in proc.stderr and "in its place" in proc.stderr
    assert (tmp_path / "o" / "checkpoint-last.pth").exists()


# ----------------------------------------------------------------------------- preflight, in-process
def parse(cli, argv):
    return cli.get_args_parser().parse_args([str(a) for a in argv])


@pytest.fixture
def files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, this is not a checkpoint\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


PRETRAIN_REFUSED = [
    (["--lr", "-1"], "--lr must be 0 or more, got -1.0"),
    (["--blr=-1e-3"], "--blr must be 0 or more, got -0.001"),
    (["--min_lr=-1e-6"], "--min_lr must be 0 or more"),
    (["--weight_decay", "-0.05"], "--weight_decay must be 0 or more"),
    (["--weight_decay", "nan"], "--weight_decay must be 0 or more, got nan"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be 0 or more, got -1"),
    (["--clip_grad", "-1"], "--clip_grad must be a positive gradient norm, got -1.0"),
    (["--clip_grad", "0"], "--clip_grad must be a positive gradient norm, got 0.0"),
    (["--keep_last", "-1"], "--keep_last must be 0 or more (0 keeps every checkpoint-<epoch>.pth), got -1"),
    (["--num_workers", "-1"], "--num_workers must be 0 or more (0 loads in the training process), got -1"),
    (["--start_epoch", "3", "--epochs", "3"], "--start_epoch 3 is not below --epochs 3, so there is nothing to "
                                              "train: raise --epochs"),
    (["--input_size", "0"], "--input_size must be a positive image size in pixels"),
    (["--input_size", "-64"], "--input_size must be a positive image size in pixels (a multiple of the model's "
                              "patch size, e.g. 224), got -64"),
    (["--mask_ratio", "0.99"], "--mask_ratio 0.99 leaves no visible patch of the 16 patches at --input_size 64 "
                               "(all are removed): lower --mask_ratio"),
    (["--model", "mixmim_mini", "--mask_ratio", "0.2"], "--mask_ratio 0.2 masks no patch of the 4 tokens at "
                                                        "--input_size 64: raise --mask_ratio or --input_size"),
    (["--model", "mixmim_mini", "--mask_ratio", "0.8", "--range_mask_ratio", "0.3"],
     "--mask_ratio 0.8 leaves no visible patch of the 4 tokens at --input_size 64 (all are replaced (with "
     "--range_mask_ratio at its maximum)): lower --mask_ratio or --range_mask_ratio"),
    (["--dist_on_itp"], "--dist_on_itp takes the ranks from OpenMPI's environment, but OMPI_COMM_WORLD_RANK, "
                        "OMPI_COMM_WORLD_SIZE"),
    (["--device", "gpu"], "--device gpu is not a device: use cuda or cpu"),
    (["--resume", "{tmp}/notes.txt"], "--resume {tmp}/notes.txt is not a checkpoint file: it is a text file "
                                      "starting 'hello, this is not a checkpoint', not a torch checkpoint"),
    (["--resume", "{tmp}/empty.pth"], "--resume {tmp}/empty.pth is not a checkpoint file: it is an empty file"),
    (["--resume", "{tmp}"], "--resume {tmp} is a folder, not a checkpoint file"),
    (["--output_dir", "{tmp}/a_file"], "--output_dir {tmp}/a_file is an existing file, not a folder"),
    (["--output_dir", "{tmp}/a_file/run/%j"], "--output_dir {tmp}/a_file/run/%j cannot be created: "
                                              "{tmp}/a_file is a file, not a folder"),
    (["--log_dir", "{tmp}/a_file"], "--log_dir {tmp}/a_file is an existing file, not a folder"),
    (["--model", "mae_vit_nope"], "mixmim_base, mixmim_huge, mixmim_large, mixmim_mini, or mae_<timm ViT name>"),
]


@pytest.mark.parametrize("flags, expected", PRETRAIN_REFUSED, ids=[" ".join(f) for f, _ in PRETRAIN_REFUSED])
def test_pretrain_preflight_refuses(photos, files, flags, expected):
    argv = [*MINI, "--data_path", photos, "--output_dir", files / "out", "--batch_size", 7,
            *[f.format(tmp=files) for f in flags]]
    args = parse(main_pretrain, argv)
    before = vars(args).copy()
    with pytest.raises(UserError) as e:
        pretrain_engine.preflight(args, 1)
    msg = str(e.value)
    assert expected.format(tmp=files) in msg and "\n" not in msg, msg
    assert vars(args) == before  # preflight only looks
    assert not (files / "out").exists()  # and creates nothing


def test_pretrain_preflight_accepts_and_creates_nothing(photos, tmp_path):
    args = parse(main_pretrain, [*MINI, "--data_path", photos, "--output_dir", tmp_path / "a" / "b",
                                 "--batch_size", 7])
    plan = pretrain_engine.preflight(args, 2)
    assert len(plan.train_source) == 14 and plan.meta_model.patch_size == 16
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="each of the 3 process"):
        pretrain_engine.preflight(args, 3)  # ceil(14 / 3) = 5 images per process < 7


def test_preflight_for_a_launcher_skips_what_only_the_job_knows(photos, tmp_path):
    """The SLURM launcher submits from a machine that may have no GPU: --device cuda is the job's."""
    argv = [*MINI, "--data_path", photos, "--output_dir", tmp_path / "jobs" / "%j", "--batch_size", 7,
            "--device", "cuda"]
    pretrain_engine.preflight(parse(main_pretrain, argv), 2, on_this_machine=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pretrain_engine.preflight(parse(main_pretrain, argv), 2)
    with pytest.raises(UserError, match="drop --dist_on_itp"):
        pretrain_engine.preflight(parse(main_pretrain, [*argv, "--dist_on_itp"]), 2, on_this_machine=False)
    ft = [*FT, "--data_path", photos, "--device", "cuda", "--eval", "--resume", tmp_path / "nope.pth"]
    with pytest.raises(UserError, match="--resume .*nope.pth does not exist"):
        finetune_engine.preflight(parse(main_finetune, ft), 2, on_this_machine=False)


@pytest.mark.parametrize("flags, warning", [
    (["--world_size", "2"], "warning: --world_size 2 is ignored: the number of processes is the launcher's, and "
                            "this run has 1; start 2 with torchrun --nproc_per_node 2"),
    (["--amp", "fp16", "--device", "cpu"], "warning: --amp fp16 on CPU: fp16 autocast on CPUs is slow and unusual"),
])
def test_preflight_warnings(photos, tmp_path, capsys, flags, warning):
    args = parse(main_pretrain, [*MINI, "--data_path", photos, "--output_dir", tmp_path, "--batch_size", 7, *flags])
    pretrain_engine.preflight(args, 1)
    assert warning in capsys.readouterr().err


def test_free_space_is_checked_before_training(photos, tmp_path, monkeypatch):
    import os

    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_bavail, self.f_frsize, self.f_flag = 1, st.f_frsize, st.f_flag

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny(real(p)))
    args = parse(main_pretrain, [*MINI, "--data_path", photos, "--output_dir", tmp_path, "--batch_size", 7])
    with pytest.raises(UserError, match=r"--output_dir .* has 0.0 MB free, but a checkpoint of this model takes "
                                        r"about 12.1 MB: free space on that disk or give another --output_dir"):
        pretrain_engine.preflight(args, 1)


FINETUNE_REFUSED = [
    (["--eval"], "--eval needs --resume CHECKPOINT"),
    (["--finetune", "{tmp}/nope.pth"], "--finetune {tmp}/nope.pth does not exist: give the path of a checkpoint"),
    (["--finetune", "{tmp}/notes.txt"], "--finetune {tmp}/notes.txt is not a checkpoint file: it is a text file"),
    (["--drop_path", "1.5"], "--drop_path must be in [0, 1), got 1.5"),
    (["--smoothing", "-0.1"], "--smoothing must be in [0, 1), got -0.1"),
    (["--layer_decay", "0"], "--layer_decay must be positive"),
    (["--mixup", "0.8", "--batch_size", "5"], "need an even --batch_size, got 5"),
    (["--nb_classes", "0"], "--nb_classes must be at least 1, got 0"),
    (["--input_size", "72"], "--input_size 72 is not divisible by the patch size 16"),
    (["--aa", "foo"], "--aa 'foo' is not an auto-augment policy"),
    (["--model", "vit_nope"], "vit_tiny_patch16, mixmim_base"),
    (["--output_dir", "{tmp}/a_file"], "--output_dir {tmp}/a_file is an existing file, not a folder"),
]


@pytest.mark.parametrize("flags, expected", FINETUNE_REFUSED, ids=[" ".join(f) for f, _ in FINETUNE_REFUSED])
def test_finetune_preflight_refuses(two_classes, files, flags, expected):
    argv = [*FT, "--data_path", two_classes, "--output_dir", files / "out", "--batch_size", 4,
            *[f.format(tmp=files) for f in flags]]
    with pytest.raises(UserError) as e:
        finetune_engine.preflight(parse(main_finetune, argv), 1)
    assert expected.format(tmp=files) in str(e.value), str(e.value)


def classifier_checkpoint(path):
    """An untrained classifier as fine-tuning writes it (pooled head): --eval only needs it to load."""
    model = models.create_model("vit_mini_patch16", img_size=64, num_classes=2, global_pool=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def test_eval_needs_only_val(two_classes, tmp_path):
    """--eval reads val/ alone: no train/ needed, no batch-size check against it, no output folder."""
    data = tmp_path / "data"
    shutil.copytree(two_classes / "val", data / "val")
    ckpt = classifier_checkpoint(tmp_path / "classifier.pth")
    args = parse(main_finetune, [*FT, "--data_path", data, "--eval", "--resume", ckpt, "--batch_size", 64,
                                 "--output_dir", tmp_path / "out"])
    plan = finetune_engine.preflight(args, 1)
    assert plan.train_source is None and len(plan.val_source) == 41
    probe = parse(main_linprobe, [*FT, "--data_path", data, "--eval", "--resume", ckpt, "--batch_size", 64])
    assert linprobe_engine.preflight(probe, 1).train_source is None
    with pytest.raises(UserError, match="has no 'train' folder"):  # training still needs it
        finetune_engine.preflight(parse(main_finetune, [*FT, "--data_path", data, "--batch_size", 4]), 1)


def test_eval_cli_with_a_small_train_split(two_classes, tmp_path):
    """The report's command: --eval --batch_size 16 on a folder with 10 train images evaluates."""
    data = tmp_path / "data"
    shutil.copytree(two_classes / "val", data / "val")
    for cls in (two_classes / "train").iterdir():
        (data / "train" / cls.name).mkdir(parents=True)
        for p in sorted(cls.glob("*.jpg"))[:5]:
            shutil.copy(p, data / "train" / cls.name / p.name)
    ckpt = classifier_checkpoint(tmp_path / "classifier.pth")
    proc = subprocess.run(main_cmd("main_finetune.py", [*FT, "--data_path", data, "--eval", "--resume", ckpt,
                                                        "--batch_size", 16, "--output_dir", tmp_path / "out"]),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert "Accuracy of the network on the 41 test images" in proc.stdout
    assert not (tmp_path / "out").exists()  # evaluation writes nothing


# ----------------------------------------------------------------------------- real CLI runs
@pytest.fixture(scope="module")
def cli_errors(photos, tmp_path_factory):
    """Bad input as real processes, started together (they mostly wait on imports)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "a_file").write_text("x")
    (tmp / "notes.txt").write_text("hello\n")
    base = [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1]
    cases = {
        "output_is_a_file": [*base, "--output_dir", tmp / "a_file"],
        "under_a_file": [*base, "--output_dir", tmp / "a_file" / "run"],
        "dist_on_itp": [*base, "--output_dir", tmp / "itp", "--dist_on_itp"],
        "start_epoch": [*base, "--output_dir", tmp / "se", "--start_epoch", 1],
        "negative_lr": [*base, "--output_dir", tmp / "lr", "--lr=-1e-4"],
        "text_resume": [*base, "--output_dir", tmp / "tr", "--resume", tmp / "notes.txt"],
    }
    procs = {name: subprocess.Popen(main_cmd("main_pretrain.py", args), cwd=REPO, env=cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in cases.items()}
    results = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return tmp, results


@pytest.mark.parametrize("case, expected", [
    ("output_is_a_file", "error: --output_dir {tmp}/a_file is an existing file, not a folder"),
    ("under_a_file", "error: --output_dir {tmp}/a_file/run cannot be created: {tmp}/a_file is a file"),
    ("dist_on_itp", "error: --dist_on_itp takes the ranks from OpenMPI's environment, but"),
    ("start_epoch", "error: --start_epoch 1 is not below --epochs 1, so there is nothing to train"),
    ("negative_lr", "error: --lr must be 0 or more, got -0.0001"),
    ("text_resume", "error: --resume {tmp}/notes.txt is not a checkpoint file: it is a text file"),
])
def test_cli_refuses_in_one_line_before_training(cli_errors, case, expected):
    tmp, results = cli_errors
    proc = results[case]
    assert one_line_error(proc).startswith(expected.format(tmp=tmp))
    assert "Epoch:" not in proc.stdout and "Start training" not in proc.stdout


def test_finished_run_says_so_and_succeeds(photos, tmp_path):
    """Rerunning a finished command (or a requeued job whose run had ended) trains nothing, says why,
    and exits 0; the checkpoint is untouched."""
    args = [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--output_dir", tmp_path]
    assert_ok(pretrain(args))
    last = tmp_path / "checkpoint-last.pth"
    before = last.read_bytes()
    proc = pretrain(args)
    assert_ok(proc)
    assert (f"note: {last} has trained all 1 --epochs: nothing left to train (raise --epochs to train longer"
            in proc.stderr)
    assert "Epoch:" not in proc.stdout and last.read_bytes() == before
