"""Dataset sources for the ``prepare`` stage.

A source reads a dataset's own released layout from a directory and returns a
:class:`PreparedDataset`: named splits, each a lazily produced stream of uint8
images with one metadata row per image (the columns of
:func:`mom.imagestore.write_image_store`), plus the files it skipped and, for
retrieval benchmarks, a ground-truth table. Sources never write files: the
stage streams each split into an image store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import numpy as np
import pyarrow as pa


@dataclass
class SplitStream:
    """One split: ``images()`` yields uint8 images in manifest order.

    ``columns`` holds the metadata (``source``, ``split``, ``origin``,
    ``label``, ``class_name``). Sources that can only tell whether a file is an
    image by decoding it (the folder source) fill ``columns`` while ``images()``
    is consumed; :func:`mom.imagestore.write_image_store` reads them after the
    stream ends. ``expected`` is the number of candidate items (for progress
    bars; the stored count may be lower when files are rejected).
    """

    images: Callable[[], Iterator[np.ndarray]]
    columns: dict[str, list]
    expected: int


@dataclass
class PreparedDataset:
    """What a source hands to the ``prepare`` stage.

    ``rejected`` lists ``{"path", "reason"}`` for every skipped file (filled
    while the splits are streamed). ``ground_truth`` is a relevance table for
    retrieval benchmarks (query, database item, relevance), else ``None``; a
    callable when it depends on which files decoded (call it after the splits
    are written).
    ``info`` is merged into the stage's report (protocol notes, counts).
    """

    source: str
    splits: dict[str, SplitStream]
    rejected: list[dict] = field(default_factory=list)
    ground_truth: Union[pa.Table, Callable[[], pa.Table], None] = None
    info: dict = field(default_factory=dict)


def per_class_sample(
    labels: np.ndarray, classes: list[int], counts: list[int], seed: int, salt: int = 0
) -> list[np.ndarray]:
    """Disjoint random subsets of the items of each class, deterministic in ``seed``.

    For every class, its item indices are permuted by a generator seeded with
    ``(seed, salt, class)`` (so the sample of one class does not change when
    other classes are added or removed) and cut into consecutive chunks of the
    sizes in ``counts`` (``None`` = all that remain). Returns one sorted index
    array per entry of ``counts``, the union over classes.
    """
    chunks: list[list[np.ndarray]] = [[] for _ in counts]
    for label in classes:
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, salt, int(label)])
        members = members[rng.permutation(len(members))]
        start = 0
        for position, count in enumerate(counts):
            stop = len(members) if count is None else start + count
            chunks[position].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for parts in chunks]
