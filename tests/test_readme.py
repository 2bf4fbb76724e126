"""The README's set-up commands stay runnable, and CI runs the README's test command."""
import re
import shlex

from conftest import REPO, assert_ok, pretrain

README = (REPO / "README.md").read_text()


def readme_command(marker: str) -> str:
    return next(line for line in README.splitlines() if marker in line and not line.startswith("#"))


def test_demo_command_runs(tmp_path):
    line = readme_command("python main_pretrain.py")
    args = shlex.split(line.split("python main_pretrain.py", 1)[1])
    assert "--data_path" not in args  # the demo relies on the bundled photos
    # Same command, shortened: later flags win in argparse.
    proc = pretrain([*args, "--epochs", "2", "--output_dir", tmp_path, "--log_dir", tmp_path])
    assert_ok(proc)
    assert "Dataset: 14 images" in proc.stdout
    assert (tmp_path / "checkpoint-last.pth").exists() and (tmp_path / "log.txt").exists()
    assert "epochs: 2\n" in (tmp_path / "config.yaml").read_text()  # the run's resolved config


def test_ci_runs_the_readme_test_command():
    test_cmd = readme_command("pytest").split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^python3? " + re.escape(test_cmd.split(" ", 1)[1]) + "$", ci, re.M), (test_cmd, ci)
