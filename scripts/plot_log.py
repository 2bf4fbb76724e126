"""Plot training curves from the log.txt of one or more runs.

    python scripts/plot_log.py output_dir/demo --output demo_log.png
    python scripts/plot_log.py runs/base runs/large/log.txt --output cmp.png --keys train_loss train_lr

log.txt is what main_pretrain.py writes into --output_dir: one JSON object per line, per
finished epoch, e.g. {"train_loss": 0.61, "train_lr": 0.00015, "epoch": 3}. Each key gets one
subplot (value vs epoch) with one line per run, labelled by the run's folder name. When an
epoch appears more than once (a run restarted in the same folder), its last record counts. A
last line cut short (a run killed while writing it) is skipped.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

from util.cli import run_cli
from util.errors import UserError

FIG_WIDTH_IN, SUBPLOT_HEIGHT_IN, DPI = 7.0, 2.8, 100


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Plot MAE training logs", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG", help="run folders (containing log.txt) or log files")
    p.add_argument("--output", required=True, help="PNG file to write")
    p.add_argument("--keys", nargs="+", default=["train_loss", "train_lr"], help="log entries to plot")
    return p


def log_path(run: str) -> str:
    path = os.path.join(run, "log.txt") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        if os.path.isdir(run):
            raise UserError(f"run folder {run} has no log.txt: give the --output_dir of a training run")
        raise UserError(f"{run} does not exist: give a run folder (its --output_dir) or its log.txt")
    return path


def read_log(path: str) -> Dict[int, dict]:
    """epoch -> record (the last one for a repeated epoch)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = {}
    for k, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if k == len(numbered) - 1:
                print(f"warning: skipping the incomplete last line of {path}", file=sys.stderr)
                continue
            raise UserError(f"line {lineno} of {path} is not JSON: expected one JSON object per line") from None
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise UserError(f"line {lineno} of {path} has no 'epoch': is it a log.txt of main_pretrain.py?")
        records[int(rec["epoch"])] = rec
    if not records:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return records


def run_label(path: str) -> str:
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path


def curves(records: Dict[int, dict], key: str) -> Tuple[List[int], List[float]]:
    pts = [(e, r[key]) for e, r in sorted(records.items()) if isinstance(r.get(key), (int, float))]
    return [e for e, _ in pts], [float(v) for _, v in pts]


def main(args) -> None:
    paths = [log_path(r) for r in args.runs]
    logs = [read_log(p) for p in paths]
    labels = [run_label(p) for p in paths]
    if len(set(labels)) < len(labels):  # same folder names: show the paths instead
        labels = [os.path.dirname(p) or p for p in paths]
    for key in args.keys:
        if not any(curves(log, key)[0] for log in logs):
            available = sorted({k for log in logs for r in log.values() for k in r if k != "epoch"})
            raise UserError(f"no run logs '{key}': available keys are {', '.join(available)}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.keys), 1, sharex=True, squeeze=False,
                             figsize=(FIG_WIDTH_IN, SUBPLOT_HEIGHT_IN * len(args.keys)), dpi=DPI)
    for ax, key in zip(axes[:, 0], args.keys):
        for log, label in zip(logs, labels):
            epochs, values = curves(log, key)
            if epochs:
                ax.plot(epochs, values, marker="." if len(epochs) < 50 else None, label=label)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    try:
        fig.savefig(args.output, format="png")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {args.output} ({type(e).__name__}: {e})") from None
    finally:
        plt.close(fig)
    print(args.output)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
