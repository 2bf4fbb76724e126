"""Shared fixtures: small real-image datasets and a runner for the CLIs as real processes."""
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "data" / "sample" / "train" / "photos"

# scripts/ and benchmarks/ import the project as installed (pip install -e .); the tests run from a clone,
# so the processes they start (CLIs, SLURM jobs) find it where an editable install would put it.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

# A model and input size that make a CLI run take seconds on a 2-core CPU.
MINI = ["--model", "mae_vit_mini_patch16", "--input_size", "64", "--num_workers", "0",
        "--warmup_epochs", "1", "--log_dir", ""]


# 14 photos, batch 2: 7 iterations per epoch; checkpoint-last refreshed every 2 iterations.
RUN = [*MINI, "--batch_size", 2, "--epochs", 3, "--save_every_steps", 2, "--print_freq", 1]


def make_image_folder(root: Path, size: int = 96, copies: int = 1) -> Path:
    """root/train/photos/*.jpg: the bundled photos, shrunk so that decoding is cheap."""
    out = root / "train" / "photos"
    out.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        for p in sorted(PHOTOS.glob("*.jpg")):
            img = Image.open(p)
            img.thumbnail((size, size))
            img.save(out / f"{p.stem}_{c}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """14 real photos (7 grayscale) in ImageFolder layout."""
    return make_image_folder(tmp_path_factory.mktemp("photos"))


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def main_cmd(script: str, args, nproc: int = 1):
    if nproc == 1:
        return [sys.executable, str(REPO / script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / script), *map(str, args)]


def run_main(script: str, args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_cmd(script, args, nproc), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def pretrain(args, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_main("main_pretrain.py", args, nproc, timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single 'error: ...' line of a CLI that exited 2, without a traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def two_classes(tmp_path_factory) -> Path:
    """Colour vs grayscale crops of the bundled photos; 41 val images."""
    from scripts.make_sample_dataset import make_classification_set

    return make_classification_set(tmp_path_factory.mktemp("two_classes"), task="color")


@contextlib.contextmanager
def restored_process_state():
    """An in-process CLI run replaces the root logging handlers and installs signal handlers
    (StopRequest); both are put back, so that later tests of the signal path see their own."""
    from engine.launch.preemption import SIGNALS
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(scope="session")
def uninterrupted(photos, tmp_path_factory):
    """RUN from start to end: the reference of the kill -9, hang and restart tests."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(pretrain([*RUN, "--data_path", photos, "--output_dir", out]))
    return out


@pytest.fixture(scope="session")
def uninterrupted_2proc(photos, tmp_path_factory):
    """2 processes with batch 1: the same data per step as RUN, but all-reduced gradients."""
    out = tmp_path_factory.mktemp("uninterrupted_2proc")
    assert_ok(pretrain([*MINI, "--batch_size", 1, "--epochs", 3, "--data_path", photos, "--output_dir", out],
                       nproc=2))
    return out
