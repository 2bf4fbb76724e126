"""--data_path beyond a folder: WebDataset tar shards and Hugging Face datasets (engine/data/shards.py,
hfds.py, the shard-local order of sampler.py, scripts/make_shards.py): the same batches and weights
as from the folder, the shard-local order, exact kill -9 resume, bad input."""
import io
import os
import shutil
import tarfile

import pytest
import torch
from test_resume import assert_identical, mid_epoch_position, run_and_kill

from engine.data import (
    KeyedSamples,
    LoaderSettings,
    ShardOrderSampler,
    image_folder,
    open_source,
    pretrain_transform,
    to_model_input,
    train_loader,
    train_order,
)
from engine.data.shards import SHARD_INDEX
from util.errors import UserError

from conftest import assert_ok, make_image_folder, one_line_error, pretrain, run_main
from source_copies import as_hf, as_shards

TINY = ["--model", "mae_vit_mini_patch16", "--input_size", "32", "--num_workers", "0", "--warmup_epochs", "1",
        "--log_dir", "", "--device", "cpu"]
# 14 photos, 2 processes x batch 1: 7 iterations per epoch; checkpoint-last every 2.
RUN2 = [*TINY, "--batch_size", 1, "--epochs", 1, "--save_every_steps", 2, "--print_freq", 1]
FT = ["--model", "vit_mini_patch16", "--input_size", "32", "--nb_classes", "2", "--num_workers", "0",
      "--log_dir", "", "--warmup_epochs", "1", "--print_freq", "100", "--epochs", "1", "--batch_size", "4",
      "--device", "cpu", "--data_order", "global"]


@pytest.fixture(scope="module", autouse=True)
def hf_cache(tmp_path_factory):
    """datasets' parquet cache in the test's folder, for this process and the CLIs it starts."""
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_cache"))
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE")
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 14 photos at 32 px as a folder, as shards of 4 (4 shards) and as a save_to_disk dataset."""
    root = tmp_path_factory.mktemp("tiny")
    folder = make_image_folder(root / "folder", size=32)
    return {"folder": folder, "wds": as_shards(folder, root / "wds", 4), "hf": as_hf(folder, root / "hf"),
            "parquet": as_hf(folder, root / "parquet", layout="parquet")}


def batches(path, order="global", world=2, pipeline="uint8"):
    """Every rank's batches of one epoch (epoch 1), rank-major."""
    out = []
    for rank in range(world):
        source = open_source(str(path), "train")
        feed = LoaderSettings(batch_size=3, seed=7, world_size=world, rank=rank, order=order, shuffle_shards=2)
        loader = train_loader(source, pretrain_transform(32, pipeline), pipeline, feed, noise_len=4,
                              torch_rng_only=True)
        loader.set_position(1)
        out += list(loader)
    return out


# ----------------------------------------------------------------------------- the same data
def test_same_batches_from_folder_shards_and_hf(tiny):
    ref = batches(tiny["folder"])
    assert len(ref) == 2 * (7 // 3)
    for kind in ("wds", "hf", "parquet"):
        got = batches(tiny[kind])
        assert len(got) == len(ref)
        for (x, _, noise), (y, _, noise2) in zip(ref, got):
            assert torch.equal(x, y), kind  # same images, same crops and flips
            assert torch.equal(noise, noise2), kind  # same masks
    for pipeline in ("pil", "device_decode"):  # device_decode: decoded by to_model_input, here on the CPU
        a, b = batches(tiny["folder"], world=1, pipeline=pipeline), batches(tiny["hf"], world=1, pipeline=pipeline)
        assert len(a) == len(b) == 4
        assert all(torch.equal(to_model_input(x[0], torch.device("cpu")), to_model_input(y[0], torch.device("cpu")))
                   for x, y in zip(a, b))


def test_sources_read_the_folder_bytes_and_labels(tiny):
    folder = image_folder(str(tiny["folder"]), "train")
    for kind in ("wds", "hf", "parquet"):
        source = open_source(str(tiny[kind]), "train")
        assert len(source) == len(folder) == 14
        assert [source[i][0] for i in range(14)] == [folder[i][0] for i in range(14)], kind
        assert source.classes == folder.classes == ["photos"], kind  # classes.txt, ClassLabel names
        labelled = open_source(str(tiny[kind]), "train", need_labels=True)
        assert [labelled[i][1] for i in range(14)] == folder.targets


# ----------------------------------------------------------------------------- shard-local order
def test_shard_order_visits_every_sample_once_and_reads_each_shard_once(tiny):
    source = open_source(str(tiny["wds"]), "train")
    assert [c for c in source.counts] == [4, 4, 4, 2]
    world, window = 2, 2
    seen = []
    for rank in range(world):
        s = ShardOrderSampler(KeyedSamples(source, None, 0), source.shard_ranges, window, world, rank, seed=3)
        s.set_epoch(5)
        keys = [i for _, i in s]
        seen += keys
        reader = open_source(str(tiny["wds"]), "train")
        reader.open_shards = window
        for i in keys[:len(keys) - (s.total_size - 14 > rank)]:  # the padding repeats a sample
            reader[i]
        shards_touched = len({reader.locate(i)[0] for i in keys})
        assert reader.stats.opens == shards_touched  # no shard reopened within the epoch
    assert sorted(seen[:7] + seen[7:]) == sorted(range(14))  # 14 divides by 2: no padding
    # windows: the global order is consecutive blocks, each all the members of `window` whole shards
    order = ShardOrderSampler(KeyedSamples(source, None, 0), source.shard_ranges, window, 1, 0, seed=3)
    order.set_epoch(5)
    where = {}
    for pos, i in enumerate(order.global_order()):
        where.setdefault(source.locate(i)[0], []).append(pos)
    by_start = sorted(where, key=lambda s: where[s][0])
    start = 0
    for w in range(0, len(by_start), window):
        block = sorted(p for s in by_start[w:w + window] for p in where[s])
        assert block == list(range(start, start + len(block)))
        start += len(block)
    assert any(max(where[s]) - min(where[s]) >= source.counts[s] for s in where)  # shuffled within a window
    order.set_epoch(6)
    assert order.global_order() != ShardOrderSampler(KeyedSamples(source, None, 0), source.shard_ranges, window,
                                                     1, 0, seed=3).global_order()  # reshuffled per epoch


def test_shard_order_is_independent_of_the_world_size_and_resumes_on_another():
    ranges = [(0, 5), (5, 10), (10, 15), (15, 17)]
    data = list(range(17))

    def order(world, start=0):
        keys = []
        for rank in range(world):
            s = ShardOrderSampler(data, ranges, 2, world, rank, seed=1)
            s.set_epoch(2, start)
            keys.append([i for _, i in s])
        # rank r holds global samples start + r, start + r + world, ...: interleave them back
        return [keys[r][k] for k in range(len(keys[0])) for r in range(world)]

    whole = ShardOrderSampler(data, ranges, 2, 1, 0, seed=1)
    whole.set_epoch(2)
    glob = whole.global_order()
    assert sorted(glob) == data
    assert order(1) == glob and order(3)[:17] == glob  # world 3 pads with one repeat: 18 samples
    # 2 processes, batch 2 (G = 4): 2 global batches done; the rest on 1 process, batch 4
    assert order(2)[:8] + order(1, start=8) == glob
    assert order(2)[:8] + order(4, start=8)[:9] == glob


# ----------------------------------------------------------------------------- make_shards
def test_make_shards_is_deterministic_and_checks_round_trips(two_classes, tmp_path, capsys):
    from scripts import make_shards

    a, b = as_shards(two_classes, tmp_path / "a", 30), as_shards(two_classes, tmp_path / "b", 30)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert [str(f) for f in files if f.suffix == ".tar"] == ["train/train-000000.tar", "train/train-000001.tar",
                                                            "train/train-000002.tar", "val/val-000000.tar",
                                                            "val/val-000001.tar"]
    assert {SHARD_INDEX, "classes.txt", "train-000000.tar.index"} <= {f.name for f in files}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with tarfile.open(a / "train" / "train-000000.tar") as t:
        m = t.getmembers()[0]
        assert (m.name, m.mtime, m.uid, m.gid) == ("00000000.cls", 0, 0, 0)
    check = make_shards.get_args_parser()
    make_shards.main(check.parse_args(["--data_path", str(two_classes), "--out", str(a), "--check"]))
    assert f"{a} matches {two_classes}: train 84 samples, val 41 samples" in capsys.readouterr().out
    # --index rebuilds the indexes of shards that came without them, identically
    shutil.rmtree(b)
    b = shutil.copytree(a, tmp_path / "b")
    for f in files:
        if f.suffix == ".index" or f.name == SHARD_INDEX:
            (b / f).unlink()
    make_shards.main(check.parse_args(["--index", str(b)]))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # a shard of 1 MB holds them all; a changed source image is found
    as_shards(two_classes, tmp_path / "c", 1000)
    assert len(list((tmp_path / "c" / "train").glob("*.tar"))) == 1
    changed = shutil.copytree(two_classes, tmp_path / "changed")
    victim = sorted((changed / "val").rglob("*.jpg"))[5]
    victim.write_bytes(sorted((changed / "val").rglob("*.jpg"))[6].read_bytes())
    with pytest.raises(UserError, match=r"does not match .*val: the image of sample 5"):
        make_shards.main(check.parse_args(["--data_path", str(changed), "--out", str(a), "--check"]))


# ----------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def folder_2proc(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("folder_2proc")
    assert_ok(pretrain([*RUN2, "--data_path", tiny["folder"], "--output_dir", out], nproc=2))
    return out


def test_shards_global_order_same_weights_as_folder(tiny, folder_2proc, tmp_path):
    assert_ok(pretrain([*RUN2, "--data_path", tiny["wds"], "--data_order", "global", "--output_dir", tmp_path],
                       nproc=2))
    assert_identical(folder_2proc / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_hf_kill9_two_processes_resume_is_bit_identical_and_equals_folder(tiny, folder_2proc, tmp_path):
    args = [*RUN2, "--data_path", tiny["hf"]]
    run_and_kill([*args, "--output_dir", tmp_path], r"Epoch: \[0\]  \[3/7\]", nproc=2)
    done = mid_epoch_position(tmp_path, epoch=0)
    proc = pretrain([*args, "--output_dir", tmp_path], nproc=2)
    assert_ok(proc)
    assert f"continuing at epoch 0, sample {2 * done} of the epoch" in proc.stdout
    assert_identical(folder_2proc / "checkpoint-last.pth", tmp_path / "checkpoint-last.pth")


def test_shards_kill9_resume_bit_identical_and_on_one_process(tiny, tmp_path):
    """The shard-local order (the default for shards): kill -9 of 2 processes mid-epoch, resumed
    by 2 processes (bit-identical) and, from a copy, by 1 process with the same global batch (the
    sample sequence continues: the run ends at the epoch's end, no sample repeated or skipped, see
    test_shard_order_is_independent_of_the_world_size_and_resumes_on_another)."""
    args = [*RUN2, "--data_path", tiny["wds"], "--shuffle_shards", "2"]
    ref = tmp_path / "ref"
    assert_ok(pretrain([*args, "--output_dir", ref], nproc=2))
    out = tmp_path / "killed"
    run_and_kill([*args, "--output_dir", out], r"Epoch: \[0\]  \[3/7\]", nproc=2)
    done = mid_epoch_position(out, epoch=0)
    other = shutil.copytree(out, tmp_path / "one_process")
    proc = pretrain([*args, "--output_dir", out], nproc=2)
    assert_ok(proc)
    assert f"continuing at epoch 0, sample {2 * done} of the epoch" in proc.stdout
    assert_identical(ref / "checkpoint-last.pth", out / "checkpoint-last.pth")
    one = [*TINY, "--batch_size", 2, "--epochs", 1, "--print_freq", 1, "--data_path", tiny["wds"],
           "--shuffle_shards", "2"]  # batch 2 on 1 process: the same global batch
    proc = pretrain([*one, "--output_dir", other])
    assert_ok(proc)
    assert f"continuing at epoch 0, sample {2 * done} of the epoch" in proc.stdout
    assert f"Epoch: [0]  [{done + 1}/7]" in proc.stdout and "Epoch: [0]  [7/7]" in proc.stdout


def _accuracy(proc) -> str:
    assert_ok(proc)
    return [line for line in proc.stdout.splitlines() if "Accuracy of the network" in line][-1].split("]")[-1]


@pytest.fixture(scope="module")
def small_classes(two_classes, tmp_path_factory):
    """16 train and 11 val images of the two classes (colour, grey) at 32 px."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small_classes")
    for split, n in (("train", 8), ("val", 6)):
        for c in ("color", "gray"):
            (root / split / c).mkdir(parents=True)
            for p in sorted((two_classes / split / c).glob("*"))[:n - (split == "val" and c == "gray")]:
                with Image.open(p) as img:
                    img.resize((32, 32)).save(root / split / c / f"{p.stem}.jpg", quality=90)
    return root


@pytest.mark.parametrize("script", ["main_finetune.py", "main_linprobe.py"])
def test_finetune_and_linprobe_same_accuracy_from_shards_and_hf(small_classes, tmp_path, script):
    """train/ and val/ of the folder, as shards and as an HF dataset (parquet files for
    fine-tuning, save_to_disk for linear probing): the same evaluation after one epoch."""
    layout = "parquet" if script == "main_finetune.py" else "disk"
    paths = {"folder": small_classes, "wds": as_shards(small_classes, tmp_path / "wds", 5),
             "hf": as_hf(small_classes, tmp_path / "hf", layout=layout)}
    results = {name: _accuracy(run_main(script, [*FT, "--data_path", path, "--output_dir", tmp_path / name]))
               for name, path in paths.items()}
    assert "on the 11 test images" in results["folder"]
    assert results["hf"] == results["folder"] == results["wds"], results


# ----------------------------------------------------------------------------- bad input
def _corrupt_shards(tmp_path):
    """Shards of 3 samples: a good one, one whose jpg member is not an image, one without an image."""
    import webdataset as wds

    folder = tmp_path / "bad"
    folder.mkdir()
    good = next(iter(sorted((make_image_folder(tmp_path / "src", size=32) / "train" / "photos").glob("*.jpg"))))
    with wds.TarWriter(str(folder / "train-000000.tar"), encoder=False, mtime=0) as w:
        w.write({"__key__": "a", "jpg": good.read_bytes(), "cls": b"0"})
        w.write({"__key__": "b", "jpg": b"\xff\xd8\xff" + b"garbage" * 40, "cls": b"0"})
        w.write({"__key__": "c", "txt": b"no image here", "cls": b"0"})
    return folder


def test_corrupt_member_and_member_without_image_are_replaced_with_a_warning(tmp_path, capsys):
    source = open_source(str(_corrupt_shards(tmp_path)), "train")
    samples = KeyedSamples(source, pretrain_transform(32, "uint8"), seed=0, pipeline="uint8")
    assert samples[(0, 1)][0].shape == samples[(0, 2)][0].shape == (3, 32, 32)  # both replaced by sample 0
    err = capsys.readouterr().err
    assert "warning: unreadable image " in err and "train-000000.tar#1" in err and "in its place" in err
    assert "train-000000.tar#2 (ValueError: no image member (jpg/jpeg/png/webp) among cls, txt)" in err


def _pretrain_error(tmp_path, data, *flags):
    return one_line_error(pretrain([*TINY, "--batch_size", 2, "--data_path", data, *flags,
                                    "--output_dir", tmp_path / "o"]))


def test_truncated_shard_is_one_line(tiny, tmp_path):
    shards = shutil.copytree(tiny["wds"], tmp_path / "wds")
    victim = shards / "train" / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    err = _pretrain_error(tmp_path, shards)
    assert f"shard {victim} is truncated or changed (5000 bytes, {SHARD_INDEX} says" in err
    (shards / "train" / SHARD_INDEX).unlink()  # no index: the reader finds it too
    with pytest.raises(UserError, match=f"shard {victim} is truncated"):
        open_source(str(shards), "train")


def test_patterns_of_shards(tiny, small_classes, tmp_path):
    """A pattern's val split, and a missing shard of a pattern (the launchers' one-line output for
    it: test_slurm_launchers_check_shards_and_hf_before_submitting)."""
    shards = as_shards(small_classes, tmp_path / "wds", 5)  # train: 4 shards, val: 3
    train = open_source(f"{shards}/train/train-{{000000..000003}}.tar", "train", need_labels=True, num_classes=2)
    val = open_source(f"{shards}/train/train-{{000000..000003}}.tar", "val", need_labels=True, num_classes=2)
    assert (len(train), len(val), val.root, val.classes) == (16, 11, str(shards / "val"), ["color", "gray"])
    pattern = f"{tiny['wds']}/train/train-{{000000..000009}}.tar"
    with pytest.raises(UserError) as e:
        open_source(pattern, "train")
    assert f"6 of the 10 shards of {pattern} are missing, first {tiny['wds']}/train/train-000004.tar" in str(e.value)
    ok = open_source(f"{tiny['wds']}/train/train-{{000000..000003}}.tar", "train")
    assert len(ok) == 14


def test_hf_missing_column_label_and_empty_split(tiny, tmp_path):
    import datasets

    with pytest.raises(UserError, match=r"has no column 'picture' \(columns: image, label\): pass the image column "
                                        "with --image_column"):
        open_source(str(tiny["parquet"]), "train", image_column="picture")
    no_label = tmp_path / "no_label"
    datasets.load_from_disk(str(tiny["hf"]))["train"].remove_columns("label").save_to_disk(str(no_label))
    assert len(open_source(str(no_label), "train")) == 14  # pretraining needs no label
    with pytest.raises(UserError, match=r"has no label column \(columns: image; .*name it with --label_column"):
        open_source(str(no_label), "train", need_labels=True)
    err = one_line_error(run_main("main_finetune.py", [*FT, "--data_path", no_label, "--output_dir", tmp_path / "f"]))
    assert f"{no_label} has no label column (columns: image; looked for a ClassLabel feature or label/labels/cls): " \
           "name it with --label_column" in err
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    datasets.load_from_disk(str(tiny["hf"]))["train"].select([]).to_parquet(str(empty / "data" / "train-0.parquet"))
    with pytest.raises(UserError, match=r"the 'train' split under .* is empty: its 1 parquet file\(s\) hold no rows"):
        open_source(str(empty), "train")
    with pytest.raises(UserError, match=r"no parquet files of the 'val' split under"):
        open_source(str(empty), "val")
    with pytest.raises(UserError, match=r"is a single Dataset, used as the train split; 'val' needs a DatasetDict"):
        open_source(str(no_label), "val")


def test_shards_without_labels_or_samples(tiny, tmp_path):
    from scripts import make_shards

    make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(tiny["folder"]), "--out", str(tmp_path / "nl"), "--no_labels"]))
    assert len(open_source(str(tmp_path / "nl"), "train")) == 14
    with pytest.raises(UserError, match=r"has no label member \(\.cls\) in its samples \(members: jpg\)"):
        open_source(str(tmp_path / "nl"), "train", need_labels=True)
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match=r"no 'val' shards under"):
        open_source(str(tmp_path / "nl"), "val")
    with tarfile.open(tmp_path / "none" / "train-0.tar", "w") as t:
        t.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    with pytest.raises(UserError, match=r"hold no samples"):
        open_source(str(tmp_path / "none"), "train")
    with pytest.raises(UserError, match=r"--data_order shard needs tar shards"):
        train_order(open_source(str(tiny["folder"]), "train"), "shard")


def test_slurm_launchers_check_shards_and_hf_before_submitting(tiny, small_classes, tmp_path, capsys):
    from test_launcher import dry_run, run_launch

    rel = os.path.relpath(tiny["wds"] / "train", os.getcwd())
    lines = dry_run(capsys, ["--model", "mae_vit_mini_patch16", "--input_size", "32", "--batch_size", "2",
                             "--nodes", "1", "--ngpus", "2", "--data_path", f"{rel}/train-{{000000..000003}}.tar",
                             "--job_dir", tmp_path / "%j"])
    assert lines["arg.data_path"] == f"{tiny['wds']}/train/train-{{000000..000003}}.tar"  # absolute for the job
    assert lines["checks"] == "passed (engine.pretrain:preflight)"
    err = run_launch(capsys, ["--dry_run", "--model", "mae_vit_mini_patch16", "--input_size", "32", "--nodes", "1",
                              "--ngpus", "2", "--data_path", f"{tiny['wds']}/train/train-{{000000..000004}}.tar",
                              "--job_dir", tmp_path / "%j"]).stderr
    assert "1 of the 5 shards of" in err and "are missing" in err
    hf = as_hf(small_classes, tmp_path / "hf", layout="parquet")
    lines = dry_run(capsys, ["--model", "vit_mini_patch16", "--input_size", "32", "--nb_classes", "2", "--nodes", "1",
                             "--ngpus", "1", "--batch_size", "2", "--data_path", hf, "--job_dir", tmp_path / "%j"],
                    which="finetune")
    assert lines["checks"] == "passed (engine.finetune:preflight)"


def test_loader_benchmark_reads_shards_and_reports_the_read_pattern(tiny, tmp_path):
    from test_benchmark_script import bench

    r, stdout = bench(tmp_path, "--mode", "loader", "--data_path", tiny["wds"], "--batch_size", 2, "--iters", 1,
                      "--repeats", 1, "--warmup", 0, "--input_size", 32, "--pipelines", "official", "uint8",
                      "--data_order", "shard", "--shuffle_shards", 2)
    assert [row["pipeline"] for row in r["rows"]] == ["uint8"]  # official: torchvision's ImageFolder, folders only
    assert r["images"] == 14 and r["data_order"] == "shard"
    reads = {x["order"]: x for x in r["reads"]}
    assert reads.keys() == {"global", "shard"} and reads["shard"]["samples"] == 7
    assert reads["shard"]["opens_per_sample"] == pytest.approx(4 / 7)  # each of the 4 shards once
    assert reads["shard"]["bytes_per_sample"] > reads["shard"]["image_bytes_per_sample"] > 0
    assert "seeks/sample" in stdout
