"""Output folders that cannot be written: refused before training, in one line; a disk that fills
up during the run stops it in one line and keeps the previous checkpoint.

Root ignores permission bits, so read-only folders are real read-only mounts (a tmpfs remounted
read-only) where mount works, else immutable folders (chattr +i), else permission bits for a
non-root user; full disks are small tmpfs mounts. Every mount is undone, also on failure. The
in-process test of a failed save runs everywhere."""
import contextlib
import errno
import os
import shutil
import subprocess

import pytest
import torch

from engine import pretrain as pretrain_engine
from engine.checkpoint import FILE_LAST as LAST
from engine.checkpoint import FILE_PREV as PREV
from engine.checkpoint import make_checkpointer
from engine.distributed import DDPStrategy
from util import checkpoint_io
from util.errors import UserError

import main_pretrain
from conftest import MINI, assert_ok, one_line_error, pretrain


def _run(*cmd) -> bool:
    return subprocess.run(list(map(str, cmd)), capture_output=True).returncode == 0


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A tmpfs of `size` at path (skips the test where mounting is not possible)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")
            and _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        yield path
    finally:
        if not _run("umount", path):
            _run("umount", "-l", path)


@pytest.fixture
def read_only_dir(tmp_path):
    """An existing folder that no process here can write to, however that can be made."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if shutil.which("mount") and _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path):
        try:
            if _run("mount", "-o", "remount,ro", path):
                yield path
                return
        finally:
            if not _run("umount", path):
                _run("umount", "-l", path)
    if shutil.which("chattr") and _run("chattr", "+i", path):
        try:
            yield path
        finally:
            _run("chattr", "-i", path)
        return
    pytest.skip("root here can neither mount a read-only tmpfs nor make a folder immutable (chattr +i), and "
                "permission bits do not stop root")


def preflight(photos, *flags):
    args = main_pretrain.get_args_parser().parse_args(
        [str(a) for a in [*MINI, "--data_path", photos, "--batch_size", 7, *flags]])
    return pretrain_engine.preflight(args, 1)


def test_read_only_output_dir_is_refused_before_training(photos, read_only_dir):
    assert not _writable(read_only_dir)
    with pytest.raises(UserError, match=rf"--output_dir {read_only_dir} is not writable \(.*\): make it writable "
                                        "or give another folder"):
        preflight(photos, "--output_dir", read_only_dir)
    with pytest.raises(UserError, match=rf"--output_dir {read_only_dir}/run cannot be created: {read_only_dir} "
                                        r"(is on a read-only file system|is not writable \(no permission\))"):
        preflight(photos, "--output_dir", read_only_dir / "run")
    with pytest.raises(UserError, match=rf"--log_dir {read_only_dir}/tb cannot be created"):
        preflight(photos, "--output_dir", "", "--log_dir", read_only_dir / "tb")
    # The CLI says so at once: before this check, the first epoch ran before the first save failed.
    proc = pretrain([*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 1, "--output_dir", read_only_dir])
    assert one_line_error(proc).startswith(f"error: --output_dir {read_only_dir} is not writable")
    assert "Epoch:" not in proc.stdout


def _writable(path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


def test_full_disk_during_training_keeps_the_previous_checkpoint(photos, tmp_path):
    """20 MB: room for one 12.7 MB checkpoint of the mini model (preflight passes), not for the
    second, written next to the first before it replaces it."""
    args = [*MINI, "--data_path", photos, "--batch_size", 7, "--epochs", 2, "--save_every_steps", 1]
    with tmpfs(tmp_path / "disk", "20m") as disk:
        out = disk / "run"
        proc = pretrain([*args, "--output_dir", out])
        err = one_line_error(proc)
        assert err.startswith(f"error: cannot write {out}/{LAST}: No space left on device [errno 28 ENOSPC]; the "
                              f"previous {LAST} is intact and a rerun of the same command resumes from it: free "
                              f"space on the disk of {out}"), err
        ckpt = torch.load(out / LAST, map_location="cpu", weights_only=True)
        assert (ckpt["epoch"], ckpt["epoch_iter"]) == (0, 1)  # the mid-epoch save before the failed one
        assert sorted(os.listdir(out)) == [".run.lock", LAST, "config.yaml"]  # no half-written temp file left behind
        assert _run("mount", "-o", "remount,size=80m", disk)
        proc = pretrain([*args, "--output_dir", out])  # space freed: the same command resumes and finishes
        assert_ok(proc)
        assert "continuing at epoch 0, sample 7 of the epoch" in proc.stdout
        assert torch.load(out / LAST, map_location="cpu", weights_only=True)["epoch"] == 1


def test_disk_too_small_for_one_checkpoint_is_refused_up_front(photos, tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        with pytest.raises(UserError, match=r"has 4.0 MB free, but a checkpoint of this model takes about 12.1 MB"):
            preflight(photos, "--output_dir", disk / "run")


# ----------------------------------------------------------------------------- in-process, everywhere
def checkpointer(out):
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return make_checkpointer(DDPStrategy(), str(out), model, optimizer, scaler, {"model": "linear"})


def full_disk_save(written: int):
    """torch.save as it fails on a full disk: some bytes out, then the zip writer's RuntimeError
    raised on top of the OSError (ENOSPC) that caused it (the former double traceback)."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * written)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    return save


def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = checkpointer(tmp_path)
    ck.save(0, 1, 4, 8)
    ck.save(0, 2, 4, 16)
    last, prev = (tmp_path / LAST).read_bytes(), (tmp_path / PREV).read_bytes()
    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk_save(10_000))
    with pytest.raises(UserError) as e:
        ck.save(0, 3, 4, 24)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {tmp_path}/{LAST}: No space left on device "
                                              f"[errno 28 ENOSPC]; the previous {LAST} is intact")
    assert (tmp_path / LAST).read_bytes() == last and (tmp_path / PREV).read_bytes() == prev
    assert sorted(os.listdir(tmp_path)) == [LAST, PREV]  # the temp file is gone


def test_failed_first_save_says_nothing_was_written(tmp_path, monkeypatch):
    ck = checkpointer(tmp_path)
    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk_save(10))
    with pytest.raises(UserError, match=r"; no checkpoint of this run was written: free space on the disk of"):
        ck.save(0, 1, 4, 8)
    assert os.listdir(tmp_path) == []


def test_other_errors_of_torch_save_are_not_hidden(tmp_path, monkeypatch):
    """Only OS-level write failures become one-line errors; a bug keeps its traceback."""
    def broken(obj, f, *args, **kwargs):
        raise TypeError("cannot pickle this")
    monkeypatch.setattr(checkpoint_io.torch, "save", broken)
    with pytest.raises(TypeError):
        checkpointer(tmp_path).save(0, 1, 4, 8)
    assert os.listdir(tmp_path) == []
