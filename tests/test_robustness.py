"""Hostile input, table-driven (issue #22; the table with what each row did before the fix is
docs/robustness.md): each row runs a CLI's main in-process through util.cli.run_cli, as the
command line does, and states the exit code, a fragment of the one line it prints, and the files
that must come out unchanged (checkpoints already written). A row that prints a traceback, exits
with another code, or changes a protected file fails. One real process proves that the
link-loop dataset of issue #22 trains within a bounded time."""
import errno
import hashlib
import importlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest
from robustness_world import _shards, build

from util.cli import run_cli

from conftest import MINI, REPO, cli_env, main_cmd, restored_process_state

CLIS = {  # name: (module with get_args_parser, module with main)
    "pretrain": ("main_pretrain", "engine.pretrain"),
    "finetune": ("main_finetune", "engine.finetune"),
    "linprobe": ("main_linprobe", "engine.linprobe"),
    "make_shards": ("scripts.make_shards", "scripts.make_shards"),
    "export": ("scripts.export", "scripts.export"),
    "convert": ("scripts.convert_checkpoint", "scripts.convert_checkpoint"),
    "visualize": ("scripts.visualize", "scripts.visualize"),
}
P = shlex.join(MINI) + " --batch_size 3 --epochs 1 --output_dir {out}"
F = ("--model vit_mini_patch16 --input_size 64 --nb_classes 2 --num_workers 0 --log_dir '' --warmup_epochs 1 "
     "--batch_size 2 --epochs 1 --output_dir {out}")

# (id, cli, argv ({w}: the built world, {out}: a fresh output folder), exit code, fragment of stderr, protected)
CASES = [
    # --- data readers: image folders
    ("folder-link-loop", "pretrain", P + " --data_path {w}/loop", 0, "not following 2 directory link(s)", ()),
    ("folder-all-garbage", "pretrain", P + " --data_path {w}/garbage", 2, "none of the 3 images under", ()),
    ("folder-all-zero-bytes", "pretrain", P + " --data_path {w}/zero", 2, "none of the 3 images under", ()),
    ("folder-decompression-bombs", "pretrain", P + " --data_path {w}/bomb", 2, "none of the 3 images under", ()),
    ("folder-odd-modes", "pretrain", P + " --data_path {w}/modes", 0, "", ()),
    ("folder-dangling-links", "pretrain", P + " --data_path {w}/dangling", 2, "none of the 3 images under", ()),
    ("folder-no-image-extensions", "pretrain", P + " --data_path {w}/no_ext", 2, "no images found under", ()),
    ("folder-unicode-class", "pretrain", P + " --data_path {w}/unicode", 0, "", ()),
    ("folder-deep-nesting", "pretrain", P + " --data_path {w}/deep", 0, "", ()),
    ("folder-is-a-file", "pretrain", P + " --data_path {w}/a_file", 2, "does not exist: point it at a dataset", ()),
    ("folder-batch-too-big", "pretrain", P.replace("3", "99", 1) + " --data_path {w}/loop", 2,
     "fewer than --batch_size", ()),
    ("finetune-no-val-folder", "finetune", F.replace("--nb_classes 2", "--nb_classes 1")
     + " --data_path {w}/modes --eval --resume {w}/ckpt/classifier.pth", 2, "has no 'val' folder", ()),
    # --- tar shards
    ("shards-text-labels", "finetune", F + " --data_path {w}/wds_text", 2, "has the label 'cat', not a class index", ()),
    ("shards-label-too-big", "finetune", F + " --data_path {w}/wds_big --data_order global", 2,
     "has label 7, outside 0..1 (--nb_classes 2)", ()),
    ("shards-label-too-big-in-a-worker", "finetune", F.replace("--num_workers 0", "--num_workers 1")
     + " --data_path {w}/wds_big --data_order global", 2, "has label 7, outside 0..1 (--nb_classes 2)", ()),
    ("shards-index-label-too-big", "finetune", F + " --data_path {w}/wds_big_indexed", 2,
     "the labels of {w}/wds_big_indexed/train run from 0 to 7, outside 0..1 (--nb_classes 2)", ()),
    ("shards-negative-label", "finetune", F + " --data_path {w}/wds_neg --data_order global", 2,
     "has label -1, outside 0..1 (--nb_classes 2)", ()),
    ("shards-not-a-tar", "pretrain", P + " --data_path {w}/wds_notar", 2, "cannot be read as a tar file", ()),
    ("shards-truncated", "finetune", F + " --data_path {w}/wds_trunc", 2, "cannot be read as a tar file", ()),
    ("shards-empty-file", "pretrain", P + " --data_path {w}/wds_empty", 2, "cannot be read as a tar file", ()),
    ("shards-pattern-missing", "pretrain", P + " --data_path {w}/wds_big/train/train-{{000000..000003}}.tar", 2,
     "3 of the 4 shards", ()),
    ("shards-order-on-folder", "pretrain", P + " --data_path {w}/loop --data_order shard", 2,
     "--data_order shard needs tar shards", ()),
    # --- Hugging Face datasets
    ("hf-image-column-is-label", "pretrain", P + " --data_path {w}/hf_class --image_column label", 2,
     "--image_column label: the column 'label' of", ()),
    ("hf-image-column-missing", "pretrain", P + " --data_path {w}/hf_class --image_column picture", 2,
     "has no column 'picture'", ()),
    ("hf-text-labels", "finetune", F + " --data_path {w}/hf_text", 2, "holds string (the first label is 'cat')", ()),
    ("hf-label-too-big", "finetune", F + " --data_path {w}/hf_big", 2, "run from 0 to 9, outside 0..1", ()),
    ("hf-label-column-is-image", "finetune", F + " --data_path {w}/hf_class --label_column image", 2,
     "holds Image, not class indices", ()),
    ("hf-broken-dict", "pretrain", P + " --data_path {w}/hf_broken", 2, "cannot be loaded with datasets", ()),
    ("hf-parquet-not-parquet", "pretrain", P + " --data_path {w}/hf_parquet_bad", 2, "cannot be read", ()),
    ("hf-classes-exceed-nb-classes", "finetune", F.replace("--nb_classes 2", "--nb_classes 1")
     + " --data_path {w}/hf_class", 2, "the dataset has 2 classes but --nb_classes is 1", ()),
    # --- checkpoint doors
    ("resume-truncated", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/half.pth", 2,
     "--resume {w}/ckpt/half.pth is truncated or corrupt", ()),
    ("resume-text", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/text.pth", 2, "it is a text file", ()),
    ("resume-empty", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/zero.pth", 2, "it is an empty file", ()),
    ("resume-a-list", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/list.pth", 2,
     "is not a dict of state dicts (got list)", ()),
    ("resume-no-model-entry", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/nomodel.pth", 2,
     "has no 'model' entry", ()),
    ("resume-a-folder", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/adir", 2, "is a folder", ()),
    ("resume-future-version", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/future.pth --epochs 2", 2,
     "has checkpoint format 999, newer than the 1 this code reads", ()),
    ("resume-wrong-shapes", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/other_shapes.pth --epochs 2", 2,
     "does not fit --model mae_vit_mini_patch16 (shape mismatch", ()),
    ("resume-classifier-into-pretrain", "pretrain", P + " --data_path {w}/good --resume {w}/ckpt/classifier.pth "
     "--epochs 2", 2, "is a classifier (fine-tuned or linear-probed), not a pretraining checkpoint", ()),
    ("resume-other-model", "pretrain", P.replace("mae_vit_mini_patch16", "mixmim_mini")
     + " --data_path {w}/good --resume {w}/ckpt/good.pth --epochs 2", 2, "does not fit --model mixmim_mini", ()),
    ("finetune-from-truncated", "finetune", F + " --data_path {w}/hf_class --finetune {w}/ckpt/half.pth", 2,
     "--finetune {w}/ckpt/half.pth is truncated or corrupt", ()),
    ("finetune-from-list", "finetune", F + " --data_path {w}/hf_class --finetune {w}/ckpt/list.pth", 2,
     "--finetune {w}/ckpt/list.pth is not a dict of state dicts", ()),
    ("eval-pretrain-checkpoint", "finetune", F + " --data_path {w}/hf_class --eval --resume {w}/ckpt/good.pth", 2,
     "is a pretraining checkpoint of mae_vit_mini_patch16 (encoder and decoder), not a classifier", ()),
    ("eval-truncated", "finetune", F + " --data_path {w}/hf_class --eval --resume {w}/ckpt/half.pth", 2,
     "--resume {w}/ckpt/half.pth is truncated or corrupt", ()),
    ("export-text", "export", "--checkpoint {w}/ckpt/text.pth --to timm --output {out}", 2,
     "is not a checkpoint file: it is a text file", ()),
    ("export-truncated", "export", "--checkpoint {w}/ckpt/half.pth --to timm --output {out}", 2,
     "half.pth is truncated or corrupt", ()),
    ("export-list", "export", "--checkpoint {w}/ckpt/list.pth --to timm --output {out}", 2,
     "list.pth is not a dict of state dicts", ()),
    ("export-missing", "export", "--checkpoint {w}/ckpt/nope.pth --to timm --output {out}", 2, "nope.pth does not exist", ()),
    ("export-output-is-file", "export", "--checkpoint {w}/ckpt/good.pth --to timm --output {w}/a_file", 2,
     "a_file is a file: give a folder", ()),
    ("convert-text", "convert", "{w}/ckpt/text.pth {out}/c.pth", 2, "text.pth is not a checkpoint file", ()),
    ("convert-truncated", "convert", "{w}/ckpt/half.pth {out}/c.pth", 2, "half.pth is truncated or corrupt", ()),
    ("convert-empty-dir", "convert", "{w}/ckpt/adir {out}/x.pth", 2, "adir is a folder, not a checkpoint file", ()),
    ("convert-onto-itself", "convert", "{w}/ckpt/good.pth {w}/ckpt/good.pth", 2, "exists: give a new path", ("ckpt/good.pth",)),
    ("visualize-text-checkpoint", "visualize", "--checkpoint {w}/ckpt/text.pth --images {w}/good --output_dir {out}",
     2, "text.pth is not a checkpoint file", ()),
    ("visualize-no-images", "visualize", "--checkpoint {w}/ckpt/good.pth --images {w}/no_ext --output_dir {out}", 2,
     "no images found in folder", ()),
    ("visualize-link-loop", "visualize", "--checkpoint {w}/ckpt/good.pth --images {w}/loop --output_dir {out} "
     "--input_size 64", 0, "", ()),
    ("visualize-garbage-image", "visualize", "--checkpoint {w}/ckpt/good.pth --images {w}/garbage/train/cls/0.jpg "
     "--output_dir {out} --input_size 64", 2, "cannot read image {w}/garbage/train/cls/0.jpg", ()),
    # --- make_shards
    ("make-shards-out-is-source", "make_shards", "--data_path {w}/good --out {w}/good", 2,
     "is the source folder", ("good/train/photos/astronaut_0.jpg",)),
    ("make-shards-out-inside-source", "make_shards", "--data_path {w}/good --out {w}/good/shards", 2,
     "is inside the source folder", ()),
    ("make-shards-index-not-a-tar", "make_shards", "--index {w}/wds_notar", 2, "is not a tar file", ()),
    ("make-shards-index-truncated", "make_shards", "--index {w}/wds_trunc/train", 2, "is truncated", ()),
    ("make-shards-index-empty-folder", "make_shards", "--index {w}/ckpt/adir", 2, "no .tar files there", ()),
    ("make-shards-index-link-loop", "make_shards", "--index {w}/loop", 2, "no .tar files there", ()),
    ("make-shards-text-labels", "make_shards", "--data_path {w}/wds_text --out {out}", 2,
     "has the label 'cat', not a class index", ()),
    ("make-shards-nothing-given", "make_shards", "", 2, "give --data_path", ()),
    # --- distributed set-up and options
    ("fsdp-shard-does-not-divide", "pretrain", P + " --data_path {w}/good --dist_strategy fsdp --fsdp_shard_size 3",
     2, "--fsdp_shard_size 3 does not divide", ()),
    ("fsdp-with-fp16", "pretrain", P + " --data_path {w}/good --dist_strategy fsdp --amp fp16", 2,
     "--amp fp16 with --dist_strategy fsdp", ()),
    ("shard-size-without-fsdp", "pretrain", P + " --data_path {w}/good --fsdp_shard_size 2", 2,
     "is an option of --dist_strategy fsdp", ()),
    ("port-in-use", "pretrain", P + " --data_path {w}/good", 2, "rank 0 of 2 cannot join the process group at", ()),
    ("rank-cannot-reach-rank-0", "pretrain", P + " --data_path {w}/good --dist_timeout_s 2", 2,
     "rank 1 of 2 cannot join the process group at", ()),
    ("wandb-not-installed", "pretrain", P + " --data_path {w}/good --wandb_project x", 2,
     "the wandb package is not installed", ()),
    ("wandb-flags-without-project", "pretrain", P + " --data_path {w}/good --wandb_entity me", 2,
     "without --wandb_project", ()),
    ("eval-without-resume", "finetune", F + " --data_path {w}/hf_class --eval", 2, "--eval needs --resume", ()),
    ("mixup-odd-batch", "finetune", F.replace("--batch_size 2", "--batch_size 3") + " --data_path {w}/hf_class "
     "--mixup 0.8", 2, "need an even --batch_size", ()),
    # --- output side ({out} starts with a checkpoint of an earlier run where SEEDED says so)
    ("output-read-only", "pretrain", P + " --data_path {w}/good --epochs 2", 2, "is not writable (Read-only file system",
     ("{out}/checkpoint-last.pth",)),
    ("output-disk-full", "pretrain", P + " --data_path {w}/good --epochs 2", 2, "No space left on device",
     ("{out}/checkpoint-last.pth",)),
    ("output-held-by-another-run", "pretrain", P + " --data_path {w}/good --epochs 2", 2,
     "is in use by another run", ("{out}/checkpoint-last.pth",)),
    ("output-under-a-file", "pretrain", P.replace("{out}", "{w}/a_file/run") + " --data_path {w}/good", 2,
     "{w}/a_file is a file, not a folder", ("a_file",)),
    ("log-dir-is-a-file", "pretrain", P + " --data_path {w}/good --log_dir {w}/a_file", 2, "is an existing file", ()),
    ("resume-dataset-shrank", "pretrain", P + " --data_path {w}/deep --epochs 2", 0, "Resumed from", ()),
    ("resume-mid-epoch-dataset-shrank", "pretrain", P + " --data_path {w}/deep --epochs 2", 0,
     "stopped epoch 0 at sample 6, but the data now has 3 samples", ()),
    ("resume-bad-label-mid-training", "finetune", F + " --data_path {w}/wds_big --data_order global --epochs 2", 2,
     "has label 7, outside 0..1 (--nb_classes 2)", ("{out}/checkpoint-last.pth",)),
    ("resume-future-version-auto", "pretrain", P + " --data_path {w}/good --epochs 2", 2,
     "has checkpoint format 999, newer than the 1", ("{out}/checkpoint-last.pth",)),
    ("hf-image-column-is-text", "pretrain", P + " --data_path {w}/hf_text --image_column label", 2,
     "--image_column label: the column 'label' of {w}/hf_text[train] holds text whose first value 'cat' is not an "
     "image file", ()),
    ("finetune-peak-tflops-unused", "finetune", F + " --data_path {w}/hf_class --peak_tflops 100", 0,
     "warning: --peak_tflops 100.0 is not used: TFLOP/s and MFU are reported by pretraining only", ()),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    old = os.environ.get("HF_DATASETS_CACHE")
    w = tmp_path_factory.mktemp("world")
    os.environ["HF_DATASETS_CACHE"] = str(w / "hf_cache")
    yield build(w)
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE")
    else:
        os.environ["HF_DATASETS_CACHE"] = old


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_row(cli: str, argv: list, capsys) -> tuple:
    parser_mod, main_mod = (importlib.import_module(m) for m in CLIS[cli])
    capsys.readouterr()
    with restored_process_state():
        try:
            code = run_cli(main_mod.main, parser_mod.get_args_parser().parse_args(argv))
        except SystemExit as e:  # argparse
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(world, tmp_path, capsys, monkeypatch, case):
    check_row(world, tmp_path, capsys, monkeypatch, case)


@pytest.mark.parametrize("name", ["shards-text-labels", "shards-label-too-big-in-a-worker", "shards-negative-label"])
def test_a_bad_sample_is_one_line_from_whichever_rank_meets_it(world, tmp_path, capsys, monkeypatch, name):
    """An input error that every rank meets is printed by rank 0 alone; a bad sample is met only by
    the rank whose share holds it, so that rank (here: 1) must say it."""
    monkeypatch.setenv("RANK", "1")
    check_row(world, tmp_path, capsys, monkeypatch, next(c for c in CASES if c[0] == name))


def check_row(world, tmp_path, capsys, monkeypatch, case) -> None:
    name, cli, argv, code, fragment, protected = case
    fill = {"w": world, "out": tmp_path / "out"}
    argv = [a.format(**fill) for a in shlex.split(argv.replace("{{", "\0").replace("}}", "\1"))]
    argv = [a.replace("\0", "{").replace("\1", "}") for a in argv]
    (tmp_path / "out").mkdir()
    if name in SEEDED:
        shutil.copy(world / "ckpt" / SEEDED[name], tmp_path / "out" / "checkpoint-last.pth")
    SETUPS.get(name, lambda *_: None)(monkeypatch, world, tmp_path / "out")
    protected = [world / p.format(**fill) for p in protected]
    before = {p: _digest(p) for p in protected}
    if os.environ.get("ROBUSTNESS_OBSERVE"):  # docs/robustness.md's columns: what a checkout does, unasserted
        return _observe(name, cli, argv, capsys, world, before)
    got, out, err = run_row(cli, argv, capsys)
    assert "Traceback" not in out + err, err[-3000:]
    assert got == code, f"exit {got}, expected {code}\n{err[-3000:]}"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        assert fragment.format(**fill) in errors[0], errors[0]
    else:
        assert fragment.format(**fill) in out + err, err[-3000:]
        made = ["checkpoint-last.pth"] if cli in ("pretrain", "finetune") else []
        made += [p.name for p in (tmp_path / "out").glob("*.png")] if cli == "visualize" else []
        assert made and all((tmp_path / "out" / m).is_file() for m in made), "a run that succeeds leaves its output"
    assert {p: _digest(p) for p in protected} == before


def _observe(name, cli, argv, capsys, world, before) -> None:
    import json
    import signal
    import traceback

    class Hang(BaseException):  # not OSError's TimeoutError: glob and os.walk swallow OSErrors
        pass

    def hang(*_):
        raise Hang("hang: still running after 60 s")

    signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        got, out, err = run_row(cli, argv, capsys)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        seen = "Traceback; " + err.strip().splitlines()[-1] if "Traceback" in out + err else \
            (lines[0] if lines else err.strip().splitlines()[-1] if err.strip() else "")
    except BaseException as e:  # what escapes run_cli is a traceback on the command line
        got, seen = "traceback", f"{type(e).__name__}: {e}".splitlines()[0]
        traceback.print_exc()
    finally:
        signal.alarm(0)
    changed = [str(p) for p, d in before.items() if _digest(p) != d]
    with open(os.environ["ROBUSTNESS_OBSERVE"], "a") as f:
        f.write(json.dumps({"id": name, "exit": got, "line": seen[:300], "changed": changed}) + "\n")


# ----------------------------------------------------------------------------- what some rows need
def _two_ranks(monkeypatch, rank: int, port: int) -> None:
    for k, v in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)


def _port_in_use(monkeypatch, world, out):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    HELD.append(sock)
    _two_ranks(monkeypatch, 0, sock.getsockname()[1])


def _nobody_listens(monkeypatch, world, out):

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    _two_ranks(monkeypatch, 1, port)


def _no_wandb(monkeypatch, world, out):
    monkeypatch.setitem(sys.modules, "wandb", None)


def _read_only(monkeypatch, world, out):
    import tempfile

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _disk_full(monkeypatch, world, out):
    import torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)


def _another_run_holds(monkeypatch, world, out):
    # The run lock is a POSIX record lock, which a process never conflicts with itself on: the other
    # run must be another process.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom engine.launch import runlock\n"
                               "runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(out)],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, text=True)
    HELD.append(holder)
    assert holder.stdout.readline().strip() == "held"


def _mid_epoch(monkeypatch, world, out):
    import torch

    state = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    torch.save(dict(state, epoch=0, epoch_iter=2, epoch_iters=4, samples_in_epoch=6), out / "checkpoint-last.pth")


def _future_version(monkeypatch, world, out):
    import torch

    state = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    torch.save(dict(state, format_version=999), out / "checkpoint-last.pth")


HELD: list = []  # sockets and locks a row holds while it runs
SETUPS = {"port-in-use": _port_in_use, "rank-cannot-reach-rank-0": _nobody_listens, "wandb-not-installed": _no_wandb,
          "output-read-only": _read_only, "output-disk-full": _disk_full,
          "output-held-by-another-run": _another_run_holds, "resume-future-version-auto": _future_version,
          "resume-mid-epoch-dataset-shrank": _mid_epoch}
SEEDED = {"output-read-only": "good.pth", "output-disk-full": "good.pth", "output-held-by-another-run": "good.pth",
          "resume-dataset-shrank": "good.pth", "resume-bad-label-mid-training": "finetuned.pth",
          "resume-future-version-auto": "good.pth", "resume-mid-epoch-dataset-shrank": "good.pth"}


@pytest.fixture(autouse=True)
def _release_held():
    yield
    while HELD:
        h = HELD.pop()
        if isinstance(h, subprocess.Popen):
            h.kill()
            h.wait()
        else:
            h.close() if isinstance(h, socket.socket) else os.close(h)


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_index_of_a_label_that_only_looks_numeric_records_no_range(tmp_path):
    """'²' passes str.isdigit() but not int(): --index wrote no index and died with a traceback."""
    import json

    from scripts import make_shards
    root = _shards(tmp_path / "s", ["\u00b2", 1])
    assert run_cli(make_shards.main, make_shards.get_args_parser().parse_args(["--index", str(root)])) == 0
    entries = json.loads((root / "train" / make_shards.SHARD_INDEX).read_text())["shardlist"]
    assert [e["nsamples"] for e in entries] == [2] and "label_range" not in entries[0]


@pytest.mark.parametrize("out", [".", "shards", "train/photos"])
def test_make_shards_refuses_an_out_in_its_source_and_leaves_it_as_it_was(world, tmp_path, capsys, out):
    """Issue #22: shards were written into the source; a second run then died on a file the first left."""
    src = shutil.copytree(world / "good", tmp_path / "src")
    before = _tree(src)
    for _ in range(2):  # the second run meets what a first one would have left
        code, _, err = run_row("make_shards", ["--data_path", str(src), "--out", str(src / out)], capsys)
        assert code == 2 and err.count("error: ") == 1 and "give an --out outside --data_path" in err, err
    assert _tree(src) == before


# ----------------------------------------------------------------------------- a real process
def test_link_loop_trains_in_a_real_process_within_a_bounded_time(world, tmp_path):
    """Issue #22's hang: a class folder with `up -> ..` and `self -> .` printed nothing for 5 minutes."""
    start = time.monotonic()
    proc = subprocess.run(main_cmd("main_pretrain.py", [*MINI, "--data_path", world / "loop", "--batch_size", 3,
                                                        "--epochs", 1, "--output_dir", tmp_path]),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{world}/loop/train/cls/self -> ." in proc.stderr and f"{world}/loop/train/cls/up -> .." in proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "checkpoint-last.pth").exists()
    assert time.monotonic() - start < 120
