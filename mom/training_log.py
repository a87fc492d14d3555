"""The fine-tuning log in DVCLive's format: its one writer and one reader.

Layout (DVCLive's, so ``dvc exp show``, ``dvc metrics diff`` and ``dvc plots``
read it as they read any DVCLive run):

- ``<folder>/plots/metrics/<name>.tsv``: columns ``step`` (the epoch) and
  ``<name>``, one row per epoch, for ``loss`` (mean loss of the epoch),
  ``active`` (fraction of tuples with a non-zero loss) and ``val_recall_at_1``
  (validation Recall@1 after the epoch; step 0 = before the first step);
- ``<folder>/metrics.json``: the summary, the last value of each and ``step``.

The history is written once, after training, from the rows that
:func:`mom.training.fit` returns (a resumed run returns the epochs before the
interruption too): each file is published by an atomic rename, so a killed
stage leaves no half-written log, and the bytes depend on the history only
(no timestamps).
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path

from mom import artifacts
from mom.errors import InputError

STEP_METRICS = ("loss", "active", "val_recall_at_1",
                # HDML's training status and terms (docs/method.md section 10), logged only when it trains
                "j_avg", "synthetic_weight", "farther", "j_syn", "j_metric", "j_recon", "j_soft", "j_gen", "j_ce")
SUMMARY = "metrics.json"
METRICS_DIR = Path("plots") / "metrics"


def write_training_log(folder: str | os.PathLike, history: list[dict], initial_val_recall: float | None = None) -> None:
    """Log ``history`` (one dict per epoch: ``epoch`` and any of STEP_METRICS)
    into ``folder`` with DVCLive's writers; ``initial_val_recall`` is logged at
    step 0. (Not through ``dvclive.Live``: it opens the repository around the
    working directory, initializes DVC in a git checkout without it and fails in
    one without commits; a stage needs none of that.)"""
    from dvclive.plots import Metric
    from dvclive.serialize import dump_json

    folder = Path(folder)
    steps = [(0, {"val_recall_at_1": initial_val_recall})] if initial_val_recall is not None else []
    steps += [(int(row["epoch"]), row) for row in history]
    with tempfile.TemporaryDirectory(prefix="mom-dvclive-") as scratch:  # outside every DVC output
        writers, summary = {}, {}
        for step, row in steps:
            for name in STEP_METRICS:
                if row.get(name) is not None:
                    writer = writers.setdefault(name, Metric(name, str(Path(scratch) / "plots")))
                    writer.step = step
                    writer.dump(float(row[name]))
                    summary[name] = float(row[name])
        summary = {name: summary[name] for name in STEP_METRICS if name in summary}  # last values, fixed order
        if steps:
            summary["step"] = steps[-1][0]
        dump_json(summary, str(Path(scratch) / SUMMARY))
        for path in sorted(Path(scratch).rglob("*")):
            if path.is_file():
                with artifacts.atomic_path(folder / path.relative_to(scratch)) as tmp:
                    tmp.write_bytes(path.read_bytes())


def read_training_log(folder: str | os.PathLike) -> list[dict]:
    """One dict per step (``epoch`` = the step, and each logged metric), in
    step order; ``[]`` when the folder holds no metric file. A missing folder,
    an unreadable file, a step logged twice or a non-finite value is one
    :class:`InputError` line naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: training log folder not found (run finetune first)")
    rows: dict[int, dict] = {}
    for name in STEP_METRICS:
        path = folder / METRICS_DIR / f"{name}.tsv"
        if path.exists():
            for step, value in _read_series(path, name):
                rows.setdefault(step, {"epoch": step})[name] = value
    return [rows[step] for step in sorted(rows)]


def _read_series(path: Path, name: str) -> list[tuple[int, float]]:
    try:
        text = artifacts.require_file(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a DVCLive metric file (not UTF-8 text)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    if reader.fieldnames is None or not {"step", name} <= set(reader.fieldnames):
        raise InputError(f"{path}: not a DVCLive metric file (expected columns step, {name})")
    series, seen = [], set()
    try:
        for line, row in enumerate(reader, start=2):
            try:
                step, value = int(row["step"]), float(row[name])
            except (TypeError, ValueError):
                raise InputError(f"{path}: line {line}: step and {name} must be numbers") from None
            if step < 0 or step in seen or not math.isfinite(value):
                raise InputError(f"{path}: line {line}: step {step} repeated or negative, or {name} not finite")
            seen.add(step)
            series.append((step, value))
    except csv.Error as error:
        raise InputError(f"{path}: not a DVCLive metric file ({error})") from None
    if not series:
        raise InputError(f"{path}: no rows (an interrupted write; rerun finetune)")
    return series
