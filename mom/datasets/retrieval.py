"""Shared shape of the retrieval benchmarks (Oxford, Paris, Holidays, INSTRE).

A benchmark source parses its released ground truth into a :class:`Benchmark`
(database files, query files with their crop boxes, relevance triples) and
:func:`retrieval_dataset` turns it into the splits ``query``, ``database``,
``train`` (and an empty ``val``) plus the ground-truth table.

Ground truth (``ground_truth.parquet``, :data:`GROUND_TRUTH_SCHEMA`): one row
per (query, database item) pair the benchmark annotates; ``query`` and
``database`` are item ids of the ``query`` and ``database`` splits and
``relevance`` one of :data:`RELEVANCE_LEVELS`. Pairs not listed are negatives.
The protocols (:data:`PROTOCOLS`) say which levels count as positives and which
are ignored (junk) when ranking; :func:`protocol_lists` applies one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from mom.artifacts.tables import GROUND_TRUTH
from mom.datasets import PreparedDataset
from mom.datasets.images import FileItem, display_path, empty_split, file_split, list_files, require_files
from mom.errors import InputError

GROUND_TRUTH_SCHEMA = GROUND_TRUTH.schema  # the contract of ground_truth.parquet: mom.artifacts.tables

RELEVANCE_LEVELS = ("easy", "hard", "junk", "good", "ok", "positive")

# protocol -> (levels that are positives, levels that are ignored as junk)
PROTOCOLS = {
    # Revisited Oxford/Paris (Radenovic et al. 2018): Easy, Medium, Hard.
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
    # Classic Oxford5k/Paris6k: good and ok are positives, junk is ignored.
    "classic": (("good", "ok"), ("junk",)),
    # Holidays, INSTRE (and user ground truth): positives; junk = the query itself.
    "positive": (("positive",), ("junk",)),
}


@dataclass
class Benchmark:
    """A parsed retrieval benchmark: ``relevance`` holds ``(query index,
    database index, level)`` with indices into ``queries`` / ``database``."""

    name: str
    database: list[FileItem]
    queries: list[FileItem]
    relevance: list[tuple[int, int, str]]
    protocols: tuple[str, ...]
    info: dict = field(default_factory=dict)


def ground_truth_table(relevance: Iterable[tuple[int, int, str]], n_queries: int, n_database: int) -> pa.Table:
    """The ground-truth table, sorted by (query, database), validated."""
    rows = sorted(set(relevance))
    queries = np.array([row[0] for row in rows], dtype=np.int64)
    database = np.array([row[1] for row in rows], dtype=np.int64)
    levels = [row[2] for row in rows]
    unknown = sorted(set(levels) - set(RELEVANCE_LEVELS))
    if unknown:
        raise InputError(f"ground truth: unknown relevance levels {unknown} (allowed: {list(RELEVANCE_LEVELS)})")
    if len(rows) and (queries.min() < 0 or queries.max() >= n_queries):
        raise InputError(f"ground truth: query index outside 0..{n_queries - 1}")
    if len(rows) and (database.min() < 0 or database.max() >= n_database):
        raise InputError(f"ground truth: database index outside 0..{n_database - 1}")
    pairs = queries * max(n_database, 1) + database
    if len(np.unique(pairs)) != len(pairs):
        duplicate = rows[int(np.flatnonzero(np.diff(pairs) == 0)[0])]
        raise InputError(f"ground truth: query {duplicate[0]} lists database item {duplicate[1]} under two levels")
    return pa.table(
        [pa.array(queries, pa.int64()), pa.array(database, pa.int64()), pa.array(levels, pa.string())],
        schema=GROUND_TRUTH_SCHEMA,
    )


def protocol_lists(table: pa.Table, n_queries: int, protocol: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, ``(positives, junk)``: sorted database item ids under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol: unknown {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    positive_levels, junk_levels = PROTOCOLS[protocol]
    queries = table.column("query").to_numpy()
    order = np.argsort(queries, kind="stable")
    database = table.column("database").to_numpy()[order]
    levels = np.array(table.column("relevance").to_pylist(), dtype=object)[order]
    is_positive, is_junk = np.isin(levels, positive_levels), np.isin(levels, junk_levels)
    bounds = np.searchsorted(queries[order], np.arange(n_queries + 1))
    lists = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        rows = slice(start, stop)
        lists.append((np.sort(database[rows][is_positive[rows]]), np.sort(database[rows][is_junk[rows]])))
    return lists


def crop_origin(relative: str, box: Sequence[float]) -> str:
    return f"{relative}#crop={','.join(f'{float(v):g}' for v in box)}"


def checked_box(box, where: str) -> tuple[float, float, float, float]:
    """A crop box ``(x0, y0, x1, y1)`` with x1 > x0 and y1 > y0, or an InputError."""
    try:
        values = np.asarray(box, dtype=np.float64).ravel()
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{where}: bounding box is not four numbers (x0, y0, x1, y1)") from None
    if values.shape != (4,) or not np.isfinite(values).all() or values[2] <= values[0] or values[3] <= values[1]:
        raise InputError(f"{where}: bounding box {values.tolist()} is not (x0, y0, x1, y1) with x1 > x0, y1 > y0")
    return tuple(float(v) for v in values)


def distractor_items(distractors_root: str | Path) -> tuple[list[FileItem], list[str]]:
    """Every image under ``distractors_root`` (folder rules), and the other files."""
    root = Path(distractors_root)
    if not root.is_dir():
        raise InputError(f"distractors_root: {root} is not a directory")
    candidates, skipped = list_files(root)
    items = [FileItem(path=root / rel, origin=f"distractors/{display_path(rel)}") for rel in candidates]
    return items, skipped


def retrieval_dataset(
    benchmark: Benchmark,
    max_side: int,
    workers: int = 1,
    distractors_root: str | Path | None = None,
    train_root: str | Path | None = None,
) -> PreparedDataset:
    """Splits ``query`` (cropped queries), ``database`` (benchmark images, then
    the optional distractors) and ``train`` (the images of ``train_root`` when
    given, else the database images), plus the ground-truth table.

    Benchmark images keep their stored pixel order (no EXIF rotation: the boxes
    refer to it) and must all decode; distractor and training files follow the
    folder rules (skipped and reported when unusable).
    """
    require_files(benchmark.database, "database images")
    require_files(benchmark.queries, "query images")
    table = ground_truth_table(benchmark.relevance, len(benchmark.queries), len(benchmark.database))
    dataset = PreparedDataset(source=benchmark.name, splits={}, ground_truth=table)
    database = list(benchmark.database)
    distractors = 0
    if distractors_root:
        items, skipped = distractor_items(distractors_root)
        database += items
        distractors = len(items)
        dataset.rejected += [{"split": "database", "path": f"distractors/{display_path(rel)}", "reason": reason}
                             for rel, reason in skipped]
    train_items = database
    if train_root:
        root = Path(train_root)
        if not root.is_dir():
            raise InputError(f"train_root: {root} is not a directory")
        candidates, skipped = list_files(root)
        if not candidates:
            raise InputError(f"train_root: no image files under {root}")
        train_items = [FileItem(path=root / rel, origin=display_path(rel)) for rel in candidates]
        dataset.rejected += [{"split": "train", "path": display_path(rel), "reason": reason} for rel, reason in skipped]
    name = benchmark.name
    dataset.splits = {
        "query": file_split(name, "query", benchmark.queries, dataset, max_side, workers),
        "database": file_split(name, "database", database, dataset, max_side, workers),
        "train": file_split(name, "train", train_items, dataset, max_side, workers, exif=bool(train_root)),
        "val": empty_split(),
    }
    dataset.info = {
        "benchmark": name,
        "protocols": list(benchmark.protocols),
        "queries": len(benchmark.queries),
        "database_benchmark_images": len(benchmark.database),
        "distractors_listed": distractors,
        "train_from": "train_root" if train_root else "database",
        "ground_truth_pairs": {level: int(count) for level, count in _level_counts(table).items()},
        **benchmark.info,
    }
    return dataset


def _level_counts(table: pa.Table) -> dict[str, int]:
    levels = table.column("relevance").to_pylist()
    return {level: levels.count(level) for level in RELEVANCE_LEVELS if level in levels}
