"""Weights & Biases logging (optional: --wandb_project), beside tensorboard and with the same data:
the scalars on the same batch-size-independent step axes, the reconstruction pictures, the config.

Step axes. Tensorboard gets train scalars at epoch_1000x (1/1000 epochs: engine/reporting/logs.py) and
per-epoch values (perf/test_*, reconstructions) at the epoch. W&B keeps one internal step per run,
so both axes are logged as W&B metrics ('epoch_1000x', 'epoch') and every value is plotted against
its own (wandb.define_metric step_metric); the internal step only counts rows.

One run across restarts. The run id is stored in every checkpoint ('wandb_run_id') and a resumed
job continues that run (wandb.init(id=..., resume='allow')). Two things make a plain resume wrong:
a job resumed from a mid-epoch checkpoint re-trains, and would re-log, the iterations between that
checkpoint and the kill; and W&B's service writes its run file (offline) or uploads (online) in
batches, so a kill -9 loses the rows it still held, also rows from before the checkpoint, which
are never trained again. W&B's remedies do not cover this (it drops rows below the run's step
online only, and resume_from/fork rewinds a run on the server only). So the writer keeps its own
journal, <output_dir>/wandb-rows-<run id>.jsonl: every row, written before it goes to W&B. A
resumed run first asks what W&B has (offline: the earlier offline run files of this id, read
back by engine/reporting/wandb_files.py; online: the resumed run's summary, its last epoch_1000x and
epoch), re-sends the journal rows W&B lost, and then logs a tag only at steps past the journal's:
no step is repeated and none is missing. Pictures are not journaled (one per epoch; a lost one
stays lost).
"""
import json
import logging
import os
from typing import Optional

import numpy as np

log = logging.getLogger("mae")

JOURNAL = "wandb-rows-{}.jsonl"
CHECKPOINT_KEY = "wandb_run_id"
TRAIN_AXIS, EPOCH_AXIS = "epoch_1000x", "epoch"
_EPOCH_TAGS = ("perf/", "reconstructions", "monitor/")  # what engine/ logs once per epoch, at the epoch


def wandb_available() -> bool:
    """Whether wandb imports (only asked when --wandb_project is given: the import takes a second)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _read_journal(path: str) -> list:
    """[(axis, step, row)] of the journal; a line cut off by a kill is ignored."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    out.append((entry["axis"], int(entry["step"]), entry["row"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return out


def _persisted(folder: str, run, current_dir: str) -> tuple:
    """What W&B holds of the resumed run: ({(tag, step)} read from the earlier offline run files,
    {axis: last step} from the resumed run's summary)."""
    from .wandb_files import offline_run_files, read_run
    pairs = set()
    for path in offline_run_files(folder, run.id):
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(current_dir):
            continue
        try:
            history = read_run(path)["history"]
        except (OSError, ValueError) as e:
            log.warning("warning: cannot read the W&B run file %s (%s): its rows are taken as logged", path, e)
            return None, {}
        for row in history:
            axis = EPOCH_AXIS if EPOCH_AXIS in row and TRAIN_AXIS not in row else TRAIN_AXIS
            if axis in row:
                pairs.update((tag, int(row[axis])) for tag in row
                             if not tag.startswith("_") and tag not in (TRAIN_AXIS, EPOCH_AXIS))
    last = {}
    for axis in (TRAIN_AXIS, EPOCH_AXIS):
        seen = run.summary.get(axis)
        if isinstance(seen, (int, float)):
            last[axis] = int(seen)
    return pairs, last


class WandbWriter:
    """The tensorboard SummaryWriter calls engine/ makes (add_scalar, add_image, flush, close), sent
    to a W&B run. The scalars of a progress line go out as one row at its end (end_row, called by
    engine/reporting/logs.py report_progress); a per-epoch value goes out at once. Each value is plotted
    against its axis (define_metric at its first appearance)."""

    def __init__(self, args, resumed_id: Optional[str] = None, config: Optional[dict] = None):
        import wandb
        folder = args.output_dir or args.log_dir or "."
        os.makedirs(folder, exist_ok=True)
        tags = [t for t in (args.wandb_tags or "").split(",") if t]
        self.run = wandb.init(project=args.wandb_project, entity=args.wandb_entity or None,
                              name=args.wandb_run_name or None, tags=tags or None, id=resumed_id,
                              resume="allow" if resumed_id else None, dir=folder, config=config,
                              settings=wandb.Settings(console="off"))
        if resumed_id and config:
            self.run.config.update(config, allow_val_change=True)
        for axis in (TRAIN_AXIS, EPOCH_AXIS):
            self.run.define_metric(axis)
        self._defined = set()
        self._wandb = wandb
        self._row, self._row_step = {}, None
        self.journal_path = os.path.join(folder, JOURNAL.format(self.run.id))
        self.last = {}  # tag -> the last step sent
        if resumed_id:
            self._catch_up(folder)

    def _catch_up(self, folder: str) -> None:
        """Re-send the journal rows W&B lost; remember every tag's last step sent."""
        journal = _read_journal(self.journal_path)
        if not journal:
            return
        pairs, last = _persisted(folder, self.run, self.run.dir and os.path.dirname(self.run.dir))
        resent = 0
        for axis, step, row in journal:
            if pairs is None or step <= last.get(axis, -1):
                lost = {}
            else:
                lost = {tag: v for tag, v in row.items() if (tag, step) not in pairs}
            if lost:
                self._define(lost, axis)
                self.run.log({**lost, axis: step})
                resent += 1
            self.last.update({tag: step for tag in row})
        if resent:
            log.info("W&B: re-sent %d logged rows that the killed run's W&B service had not written", resent)

    @property
    def run_id(self) -> str:
        return self.run.id

    def _define(self, row: dict, axis: str) -> None:
        for tag in row:
            if tag not in self._defined:
                self.run.define_metric(tag, step_metric=axis)
                self._defined.add(tag)

    def _add(self, tag: str, value, step: int, journal: bool = True) -> None:
        axis = EPOCH_AXIS if tag.startswith(_EPOCH_TAGS) else TRAIN_AXIS
        step = int(step)
        if step <= self.last.get(tag, -1):
            return  # logged already (before a restart)
        if axis == EPOCH_AXIS:
            self._send({tag: value}, axis, step, journal)
            return
        if self._row_step is not None and self._row_step != step:
            self.end_row()
        self._row[tag], self._row_step = value, step

    def add_scalar(self, tag: str, value, step: int) -> None:
        self._add(tag, float(value), step)

    def add_image(self, tag: str, img_chw, step: int) -> None:
        image = self._wandb.Image(np.ascontiguousarray(np.asarray(img_chw).transpose(1, 2, 0)))
        self._add(tag, image, step, journal=False)

    def _send(self, row: dict, axis: str, step: int, journal: bool = True) -> None:
        if journal:  # first the journal: a row W&B may lose is never lost from it
            with open(self.journal_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"axis": axis, "step": step, "row": row}) + "\n")
        self._define(row, axis)
        self.run.log({**row, axis: step})
        self.last.update({tag: step for tag in row})

    def end_row(self) -> None:
        """Send the values of the current train step as one row."""
        if self._row:
            self._send(self._row, TRAIN_AXIS, self._row_step)
        self._row, self._row_step = {}, None

    def flush(self) -> None:
        self.end_row()

    def close(self) -> None:
        self.end_row()
        self.run.finish()
