"""Runtime switches of the training CLIs."""
import os

import torch

from engine.precision import configure_backends

from conftest import MINI, assert_ok, pretrain


def test_deterministic_switches_on_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        configure_backends(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_run_equals_the_default_run_on_cpu(photos, tmp_path):
    """The CPU kernels are deterministic already: the flag must not change a single bit (and no
    op of the training step may lack a deterministic implementation)."""
    args = [*MINI, "--batch_size", 7, "--epochs", 1, "--data_path", photos]
    assert_ok(pretrain([*args, "--output_dir", tmp_path / "a"]))
    assert_ok(pretrain([*args, "--output_dir", tmp_path / "b", "--deterministic"]))
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
