"""Search a collection by inner product of l2-normalized embeddings, and show the answers.

- :func:`build_index` puts embeddings (one row per item) in an exact faiss
  inner-product index (``IndexFlatIP``). For unit vectors the inner product is
  the cosine similarity, and the ranking is the same as by Euclidean distance.
  Exact search stays fast well past the default collection's size
  (``benchmarks/search.py``), so no approximate index is offered.
- :func:`search` returns the top-k rows per query in a fixed order: descending
  similarity, ties by ascending row, i.e. the first k of
  ``lexsort((rows, -X @ q))``, optionally leaving out one row per query (the
  query's own row when it is an item of the collection).
- :func:`save_index` / :func:`load_index` write and read an index file;
  :func:`save_items` / :func:`load_items` the table that says which item of
  which split each index row is.
- :func:`contact_sheet`: the query and its top-k tiles, one row per embedding.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import pyarrow as pa

from mom import artifacts
from mom.errors import InputError

NORM_TOLERANCE = 1e-3

ITEMS_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("split", pa.string()),
    ("item", pa.int64()),
    ("origin", pa.string()),
])


def check_embeddings(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """``embeddings`` as a C-contiguous float32 ``(n, d)`` array of finite unit rows, else an InputError."""
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] < 1:
        raise InputError(f"{name}: expected a 2-D (items, dims) array, got shape {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise InputError(f"{name}: NaN or inf in row {int(np.flatnonzero(~finite)[0])}")
    norms = np.linalg.norm(array, axis=1)
    off = np.abs(norms - 1) > NORM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise InputError(f"{name}: rows must be l2-normalized; row {row} has norm {norms[row]:.4f}")
    return array


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """An exact inner-product index holding ``embeddings`` (rows l2-normalized); row i = index id i."""
    array = check_embeddings(embeddings)
    index = faiss.IndexFlatIP(array.shape[1])
    index.add(array)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int,
           exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``index`` for each query: ``(rows int64 (m, k), similarities float32 (m, k))``.

    Order: descending inner product, ties by ascending row. ``exclude``: one
    row per query left out of its answer (-1: none). Ties at the k-th place
    are resolved over every tied row, not over whichever faiss returned first:
    the search is widened until the last row fetched is strictly below the
    k-th similarity (or the whole index is fetched).
    """
    queries = check_embeddings(np.atleast_2d(queries), "queries")
    total = index.ntotal
    if queries.shape[1] != index.d:
        raise InputError(f"queries: {queries.shape[1]}-d, the index holds {index.d}-d embeddings")
    exclude = np.full(len(queries), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    if exclude.shape != (len(queries),):
        raise InputError(f"exclude: need one row per query ({len(queries)}), got {exclude.shape}")
    available = total - int((exclude >= 0).any())
    if not 1 <= k <= available:
        raise InputError(f"k={k}: must be in 1..{available} (the index holds {total} items"
                         f"{', one of them the query' if available < total else ''})")
    fetch = min(total, k + 1)
    while True:
        sims, rows = index.search(queries, fetch)
        left_out = rows == exclude[:, None]
        sims = np.where(left_out, -np.inf, sims)
        kth = -np.sort(-sims, axis=1)[:, k - 1]
        lowest_fetched = np.where(left_out, np.inf, sims).min(axis=1)
        if fetch == total or (lowest_fetched < kth).all():
            break
        fetch = min(total, 2 * fetch)
    order = np.lexsort((rows, -sims), axis=1)[:, :k]
    return np.take_along_axis(rows, order, 1).astype(np.int64), np.take_along_axis(sims, order, 1)


def save_index(path: str | os.PathLike, index: faiss.Index) -> None:
    """Write ``index`` atomically (faiss's own format; the same index gives the same bytes)."""
    with artifacts.atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | os.PathLike) -> faiss.Index:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the index stage first)")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a readable faiss index ({reason})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes: ties an index to the model that embedded it."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def items_table(splits: Sequence[str], items: Sequence[int], origins: Sequence[str]) -> pa.Table:
    """Row r of an index is ``items[r]`` of split ``splits[r]`` (manifest id), from ``origins[r]``."""
    return pa.Table.from_arrays([
        pa.array(np.arange(len(items), dtype=np.int64)), pa.array(list(splits), pa.string()),
        pa.array(np.asarray(items, dtype=np.int64)), pa.array(list(origins), pa.string()),
    ], schema=ITEMS_SCHEMA)


def save_items(path: str | os.PathLike, table: pa.Table) -> None:
    artifacts.save_parquet(path, table.cast(ITEMS_SCHEMA))


def load_items(path: str | os.PathLike) -> pa.Table:
    table = artifacts.load_parquet(path)
    if table.schema.names != ITEMS_SCHEMA.names:
        raise InputError(f"{path}: expected columns {ITEMS_SCHEMA.names}, got {table.schema.names}")
    table = table.cast(ITEMS_SCHEMA)
    if not np.array_equal(table.column("row").to_numpy(), np.arange(len(table))):
        raise InputError(f"{path}: column row must be 0..{len(table) - 1} in order")
    return table


@dataclass(frozen=True)
class Tile:
    """One image of a contact sheet: uint8 ``(h, w)`` or ``(h, w, 1|3)`` pixels and a caption."""

    pixels: np.ndarray
    caption: str


TILE_INCHES = 1.4


def contact_sheet(query: Tile, rows: Sequence[tuple[str, Sequence[Tile]]]):
    """A matplotlib figure: one row per ``(name, tiles)`` of ``rows``, the query in
    its first column and the tiles (ranked answers) after it; ``name`` labels the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # imported here: the text/JSON search answers without matplotlib

    if not rows:
        raise InputError("contact sheet: no rows of answers to show")
    columns = 1 + max(len(tiles) for _, tiles in rows)
    figure, axes = plt.subplots(len(rows), columns, squeeze=False,
                                figsize=(TILE_INCHES * columns, (TILE_INCHES + 0.45) * len(rows)))
    for axis_row, (name, tiles) in zip(axes, rows):
        for axis, tile in zip(axis_row, [query, *tiles]):
            _draw_tile(axis, tile)
        for axis in axis_row[1 + len(tiles):]:
            axis.set_axis_off()
        axis_row[0].set_ylabel(name, fontsize=9)
    figure.tight_layout()
    return figure


def _draw_tile(axis, tile: Tile) -> None:
    pixels = np.asarray(tile.pixels)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    axis.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(tile.caption, fontsize=7)
