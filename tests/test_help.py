"""Every CLI and script answers --help (exit 0) and lists every flag its parser has."""
import argparse
import contextlib
import io
import runpy
import sys

import pytest

from conftest import REPO

SCRIPTS = ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "scripts/submitit_pretrain.py",
           "scripts/submitit_finetune.py", "scripts/submitit_linprobe.py", "scripts/visualize.py",
           "scripts/benchmark.py", "scripts/plot_log.py", "scripts/make_sample_dataset.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(script, monkeypatch):
    """In-process (runpy), so the ten scripts cost one torch import; the parser that printed the
    help is captured to know which flags it has."""
    printed = []
    original = argparse.ArgumentParser.print_help

    def capture(self, file=None):
        printed.append(self)
        original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", capture)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out):
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_.value.code in (0, None)
    assert len(printed) == 1
    text = out.getvalue()
    flags = [s for action in printed[0]._actions for s in action.option_strings]
    assert "--help" in flags and len(flags) > 2
    missing = [f for f in flags if f not in text]
    assert not missing, f"{script} --help does not list {missing}"
