"""Every command answers --help (exit 0) and lists every flag it has: each main_*.py, scripts/*.py,
scripts/slurm/*.py and benchmarks/*.py with a `__main__` block, found by glob so that a new one is covered."""
import argparse
import contextlib
import io
import runpy
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

PATTERNS = ["main_*.py", "scripts/*.py", "scripts/slurm/*.py", "benchmarks/*.py"]
# Modules without a command line, and why.
LIBRARIES = {
    "scripts/__init__.py": "package marker, so that the tests import the scripts' functions",
    "scripts/slurm/__init__.py": "package marker",
    "benchmarks/__init__.py": "package marker",
    "benchmarks/step.py": "--mode step of benchmarks/benchmark.py",
    "benchmarks/loader.py": "--mode loader of benchmarks/benchmark.py",
    "benchmarks/plan.py": "--mode plan of benchmarks/benchmark.py",
    "benchmarks/report.py": "benchmarks/benchmark.py's tables and --json",
    "benchmarks/flops.py": "FLOP counts and the matmul peak of benchmarks/benchmark.py",
    "benchmarks/memory_plan.py": "the byte counts of benchmarks/benchmark.py --mode plan",
}
# Commands that must not run in the test process: task_entry.py installs signal handlers on import.
# It has no argparse parser (everything after the target is the target's): its flags are named here.
SUBPROCESS_FLAGS = {"scripts/slurm/task_entry.py": ["--help", "--signal_delay_s", "-m"]}


def discovered():
    return sorted(str(p.relative_to(REPO)) for pattern in PATTERNS for p in REPO.glob(pattern))


COMMANDS = [s for s in discovered() if s not in LIBRARIES]


def test_every_module_is_a_command_or_a_listed_library():
    found = discovered()
    assert "main_pretrain.py" in found and "benchmarks/benchmark.py" in found and "scripts/slurm/task_entry.py" in found
    for script in found:
        has_main = '__name__ == "__main__"' in (REPO / script).read_text()
        assert has_main == (script not in LIBRARIES), \
            f"{script}: a command has a __main__ block and is not in LIBRARIES; a library has none and is listed"
    assert not set(LIBRARIES) - set(found), f"LIBRARIES names files that are gone: {set(LIBRARIES) - set(found)}"


@pytest.mark.parametrize("script", [s for s in COMMANDS if s not in SUBPROCESS_FLAGS])
def test_help_lists_every_flag(script, monkeypatch):
    """In-process (runpy), so the scripts cost one torch import; the parser that printed the help is
    captured to know which flags it has."""
    printed = []
    original = argparse.ArgumentParser.print_help

    def capture(self, file=None):
        printed.append(self)
        original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", capture)
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
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


@pytest.mark.parametrize("script", sorted(SUBPROCESS_FLAGS))
def test_help_of_a_command_run_apart(script):
    proc = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    missing = [f for f in SUBPROCESS_FLAGS[script] if f not in proc.stdout]
    assert not missing, f"{script} --help does not list {missing}"
