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
    step order. A missing folder or summary, an unreadable file, a step logged
    twice, or series that disagree with the summary (a file missing, cut short
    or edited) is one :class:`InputError` line naming the file. Values may be
    NaN or inf (a diverged loss, HDML's status before its first step)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: training log folder not found (run finetune first)")
    summary_path = folder / SUMMARY
    summary = artifacts.load_json(summary_path)
    rows: dict[int, dict] = {}
    last_step = None
    for name in STEP_METRICS:
        path = folder / METRICS_DIR / f"{name}.tsv"
        if name not in summary and not path.exists():
            continue
        if name not in summary:
            raise InputError(f"{path}: not in {summary_path} (a log of another run; rerun finetune)")
        series = _read_series(path, name)
        logged = summary[name]
        if not _same_value(series[-1][1], logged):
            raise InputError(f"{path}: last value {series[-1][1]} differs from {logged!r} in {summary_path} "
                             "(cut short or edited; rerun finetune)")
        last_step = max(series[-1][0], last_step if last_step is not None else -1)
        for step, value in series:
            rows.setdefault(step, {"epoch": step})[name] = value
    if last_step is not None and summary.get("step") != last_step:
        raise InputError(f"{summary_path}: step {summary.get('step')!r}, the series end at step {last_step} "
                         "(cut short or edited; rerun finetune)")
    return [rows[step] for step in sorted(rows)]


def _same_value(value: float, logged) -> bool:
    """Whether a series' last value is the summary's (as written: NaN and inf included)."""
    if not isinstance(logged, (int, float)) or isinstance(logged, bool):
        return False
    if math.isnan(value) or math.isnan(logged):
        return math.isnan(value) and math.isnan(logged)
    return value == logged or math.isclose(value, logged, rel_tol=1e-6)


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
            if step < 0 or step in seen:
                raise InputError(f"{path}: line {line}: step {step} repeated or negative")
            seen.add(step)
            series.append((step, value))
    except csv.Error as error:
        raise InputError(f"{path}: not a DVCLive metric file ({error})") from None
    if not series:
        raise InputError(f"{path}: no rows (an interrupted write; rerun finetune)")
    return series
