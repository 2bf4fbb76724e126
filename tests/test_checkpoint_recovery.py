"""A checkpoint that failed to load is never rotated into checkpoint-prev.pth: after the automatic
fallback, the recovery copy stays a readable one."""
import os
from argparse import Namespace

import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.checkpoint import FILE_LAST as LAST
from engine.checkpoint import FILE_PREV as PREV
from engine.checkpoint import UNREADABLE_SUFFIX, make_checkpointer, plain_args
from engine.distributed import DDPStrategy

from conftest import MINI, assert_ok, pretrain


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def corrupt(path):
    """Truncate `path` as a full disk or a crash on a non-atomic copy would, without touching the
    files hard-linked to it (checkpoint-<epoch>.pth shares checkpoint-last.pth's inode)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:len(data) // 2])
    return data[:len(data) // 2]


def checkpointer(out, unreadable=()):
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = Namespace(model="linear", resume="", no_auto_resume=False, output_dir=str(out))
    return make_checkpointer(DDPStrategy(), str(out), model, optimizer, scaler, plain_args(args),
                             unreadable=unreadable), args


def find_resume(args, unreadable):
    return ckpt_lib.find_resume_checkpoint(args.resume, args.output_dir, not args.no_auto_resume, False, unreadable)


def position(path):
    ckpt = load(path)
    return ckpt["epoch"], ckpt["epoch_iter"]


@pytest.mark.parametrize("broken", [[LAST], [LAST, PREV]], ids=["last", "last_and_prev"])
def test_unreadable_checkpoints_are_set_aside_not_rotated(tmp_path, broken):
    ck, args = checkpointer(tmp_path)
    ck.save(0, 1, 2, 4)
    ck.save(0, 2, 2, 8, numbered=True)  # last: end of epoch 0 (= checkpoint-0.pth), prev: iteration 1
    bad = {name: corrupt(tmp_path / name) for name in broken}

    unreadable = []
    found = find_resume(args, unreadable)
    expected = "checkpoint-0.pth" if PREV in broken else PREV
    assert found["_path"] == str(tmp_path / expected)
    assert unreadable == [str(tmp_path / name) for name in broken]

    ck, _ = checkpointer(tmp_path, unreadable)
    for name, data in bad.items():  # kept for inspection under a name nothing loads
        assert not (tmp_path / name).exists() and (tmp_path / (name + UNREADABLE_SUFFIX)).read_bytes() == data
    ck.save(1, 1, 2, 4)
    assert position(tmp_path / LAST) == (1, 1)
    if PREV in broken:
        assert not (tmp_path / PREV).exists()  # nothing readable to keep yet
    else:
        assert position(tmp_path / PREV) == (0, 1)  # the fallback that was used, not the broken file
    assert ckpt_lib.numbered_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-0.pth")]


def test_broken_last_that_cannot_be_moved_is_not_rotated(tmp_path, monkeypatch):
    ck, args = checkpointer(tmp_path)
    ck.save(0, 1, 2, 4)
    ck.save(0, 2, 2, 8)
    corrupt(tmp_path / LAST)
    unreadable = []
    find_resume(args, unreadable)
    real_replace = os.replace

    def no_renaming_aside(src, dst):
        if str(dst).endswith(UNREADABLE_SUFFIX):
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_renaming_aside)
    ck, _ = checkpointer(tmp_path, unreadable)
    ck.save(1, 1, 2, 4)
    assert position(tmp_path / PREV) == (0, 1) and position(tmp_path / LAST) == (1, 1)
    ck.save(1, 2, 2, 8)  # from now on, a readable checkpoint-last.pth rotates as usual
    assert position(tmp_path / PREV) == (1, 1)


def test_cli_fallback_keeps_the_readable_previous_checkpoint(photos, tmp_path):
    """The same command after checkpoint-last.pth was damaged: it falls back to checkpoint-prev.pth,
    finishes the epoch with one save, and checkpoint-prev.pth is still that readable fallback
    (before, the broken file was rotated into it)."""
    args = [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--save_every_steps", 1,
            "--output_dir", tmp_path]
    assert_ok(pretrain(args))
    assert position(tmp_path / PREV) == (0, 1) and position(tmp_path / LAST) == (0, 2)
    damaged = corrupt(tmp_path / LAST)
    proc = pretrain(args)
    assert_ok(proc)
    assert f"{tmp_path / LAST} is truncated or corrupt" in proc.stderr
    assert f"Resumed from {tmp_path / PREV}: continuing at epoch 0, sample 7" in proc.stdout
    assert position(tmp_path / PREV) == (0, 1) and position(tmp_path / LAST) == (0, 2)
    assert f"renamed the unreadable {tmp_path / LAST} to {tmp_path / LAST}{UNREADABLE_SUFFIX}" in proc.stderr
    assert (tmp_path / (LAST + UNREADABLE_SUFFIX)).read_bytes() == damaged
