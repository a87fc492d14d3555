"""The Parquet tables stages pass each other: one schema, one writer, one reader each.

Ids are the manifest's row ids of the training collection (``0..n-1``); ranks
start at 1. A reader checks the columns and their types, nulls, NaN/inf, ranks
and ids (within ``0..n-1`` when the caller knows ``n``, and consistent with the
other inputs it names) and raises one :class:`~mom.errors.InputError` line
naming the file; it never returns a table that breaks its contract.

============================  ===========  =====================================================
table                         written by   columns
============================  ===========  =====================================================
``anchors.parquet``           anchors      item, probability (stationary d_i / sum d), rank, strategy
``knn.parquet``               graph        item, neighbour, rank (1 = nearest other item), similarity
``manifold_knn.parquet``      diffuse      anchor, neighbour, rank (1 = largest s_m), similarity
``pools.parquet``             mine         anchor, member, kind, rank, manifold_similarity (null:
                                           not stored), euclidean_similarity
``ground_truth.parquet``      prepare      query, database (item ids of those splits), relevance
============================  ===========  =====================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mom.artifacts.files import load_parquet, save_parquet
from mom.errors import InputError


@dataclass(frozen=True)
class TableContract:
    """What a table holds: its schema, the stage that writes it (for the hint
    in errors), its id columns and the columns that may hold nulls."""

    name: str
    schema: pa.Schema
    writer: str
    ids: tuple[str, ...] = ()
    nullable: tuple[str, ...] = ()


ANCHORS = TableContract("anchors.parquet", pa.schema([
    ("item", pa.int64()), ("probability", pa.float64()), ("rank", pa.int32()), ("strategy", pa.string()),
]), writer="anchors", ids=("item",))

KNN = TableContract("knn.parquet", pa.schema([
    ("item", pa.int64()), ("neighbour", pa.int64()), ("rank", pa.int32()), ("similarity", pa.float32()),
]), writer="graph", ids=("item", "neighbour"))

MANIFOLD_KNN = TableContract("manifold_knn.parquet", pa.schema([
    ("anchor", pa.int64()), ("neighbour", pa.int64()), ("rank", pa.int32()), ("similarity", pa.float32()),
]), writer="diffuse", ids=("anchor", "neighbour"))

POOLS = TableContract("pools.parquet", pa.schema([
    ("anchor", pa.int64()), ("member", pa.int64()), ("kind", pa.string()), ("rank", pa.int32()),
    ("manifold_similarity", pa.float32()), ("euclidean_similarity", pa.float32()),
]), writer="mine", ids=("anchor", "member"), nullable=("manifold_similarity",))
POOL_KINDS = ("positive", "negative")

GROUND_TRUTH = TableContract("ground_truth.parquet", pa.schema([
    ("query", pa.int64()), ("database", pa.int64()), ("relevance", pa.string()),
]), writer="prepare", ids=("query", "database"))

CONTRACTS = (ANCHORS, KNN, MANIFOLD_KNN, POOLS, GROUND_TRUTH)


def write_table(path: str | os.PathLike, contract: TableContract, columns: dict, masks: dict | None = None) -> None:
    """Write ``columns`` (name -> values, rows in the order given) with the
    contract's types; ``masks``: name -> True where the value is null."""
    masks = masks or {}
    arrays = [pa.array(columns[field.name], field.type, mask=masks.get(field.name)) for field in contract.schema]
    save_parquet(path, pa.Table.from_arrays(arrays, schema=contract.schema))


def read_table(path: str | os.PathLike, contract: TableContract, n_items: int | None = None,
               owner: str = "the other inputs") -> pa.Table:
    """The table at ``path`` with the contract's columns, in its schema, after
    checking types, nulls, NaN/inf, ranks and ids (``< n_items`` when given:
    the item count of ``owner``, named in the error)."""
    table = load_parquet(path)
    hint = f"rerun {contract.writer}"
    missing = [name for name in contract.schema.names if name not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (expected {contract.schema.names}; {hint})")
    columns = [_checked_column(path, table.column(field.name), field, contract, n_items, owner)
               for field in contract.schema]
    return pa.Table.from_arrays(columns, schema=contract.schema)


def column_kind(data_type: pa.DataType) -> str:
    """integer, floating point, string, or the type itself: what a column must match."""
    if pa.types.is_integer(data_type):
        return "integer"
    if pa.types.is_floating(data_type):
        return "floating point"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "string"
    return str(data_type)


def _checked_column(path, column: pa.ChunkedArray, field: pa.Field, contract: TableContract,
                    n_items: int | None, owner: str) -> pa.ChunkedArray:
    name = field.name
    if column_kind(column.type) != column_kind(field.type):
        raise InputError(f"{path}: column {name} holds {column.type}, expected {field.type}")
    try:
        column = column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"{path}: column {name} has values that do not fit {field.type}") from None
    if column.null_count and name not in contract.nullable:
        raise InputError(f"{path}: column {name} has {column.null_count} null values")
    if column_kind(field.type) == "string":
        return column
    values = column.drop_null().to_numpy() if column.null_count else column.to_numpy()
    if column_kind(field.type) == "floating point" and not np.isfinite(values).all():
        raise InputError(f"{path}: column {name} has NaN or inf values")
    if name == "rank" and len(values) and values.min() < 1:
        raise InputError(f"{path}: column rank must start at 1, found {values.min()}")
    if name in contract.ids and len(values):
        low, high = int(values.min()), int(values.max())
        if low < 0 or (n_items is not None and high >= n_items):
            bound = f"0..{n_items - 1}" if n_items is not None else "ids >= 0"
            bad = low if low < 0 else high
            raise InputError(f"{path}: column {name} has id {bad} outside {bound} (the {n_items} items of {owner}; "
                             f"rerun {contract.writer})")
    return column


# anchors.parquet ------------------------------------------------------------------------------------------------

def write_anchors(path: str | os.PathLike, items: np.ndarray, probability: np.ndarray, strategy: str) -> None:
    """Anchors in rank order (rank 1 = first)."""
    write_table(path, ANCHORS, {"item": items, "probability": probability,
                                "rank": np.arange(1, len(items) + 1, dtype=np.int32),
                                "strategy": [strategy] * len(items)})


def read_anchors(path: str | os.PathLike, n_items: int | None = None, owner: str = "the graph") -> np.ndarray:
    """Anchor ids in rank order: at least one, distinct, each a node of the
    ``n_items``-node graph (when given)."""
    table = read_table(path, ANCHORS, n_items, owner)
    items = table.column("item").to_numpy()
    if len(items) == 0:
        raise InputError(f"{path}: no anchors (rerun anchors)")
    if not (np.diff(table.column("rank").to_numpy()) > 0).all():
        raise InputError(f"{path}: rows not in rank order (rerun anchors)")
    if len(np.unique(items)) != len(items):
        raise InputError(f"{path}: an anchor is listed twice (rerun anchors)")
    return items


# knn.parquet ----------------------------------------------------------------------------------------------------

def write_knn(path: str | os.PathLike, ids: np.ndarray, sims: np.ndarray) -> None:
    """Each item's other neighbours (row i of ``ids``, -1 = none) by rank."""
    n, width = ids.shape
    valid = ids >= 0
    write_table(path, KNN, {
        "item": np.repeat(np.arange(n, dtype=np.int64), width)[valid.ravel()],
        "neighbour": ids[valid],
        "rank": np.tile(np.arange(1, width + 1, dtype=np.int32), n)[valid.ravel()],
        "similarity": sims[valid].astype(np.float32),
    })


def read_knn(path: str | os.PathLike, n_items: int | None = None, owner: str = "the features") -> pa.Table:
    return read_table(path, KNN, n_items, owner)


# manifold_knn.parquet -------------------------------------------------------------------------------------------

def write_manifold_knn(path: str | os.PathLike, anchors: np.ndarray, ids: np.ndarray, sims: np.ndarray) -> None:
    """Row r of ``ids``/``sims`` (-1 = none): anchor ``anchors[r]``'s manifold neighbours by rank."""
    width = ids.shape[1]
    valid = (ids >= 0).ravel()
    write_table(path, MANIFOLD_KNN, {
        "anchor": np.repeat(anchors, width)[valid],
        "neighbour": ids.ravel()[valid],
        "rank": np.tile(np.arange(1, width + 1, dtype=np.int32), len(anchors))[valid],
        "similarity": sims.ravel()[valid],
    })


def read_manifold_knn(path: str | os.PathLike, n_items: int | None = None, anchors: np.ndarray | None = None,
                      owner: str = "the features") -> pa.Table:
    """The manifold neighbour lists; with ``anchors``, every row's anchor must be one of them."""
    table = read_table(path, MANIFOLD_KNN, n_items, owner)
    if anchors is not None:
        unknown = np.setdiff1d(table.column("anchor").to_numpy(), anchors)
        if len(unknown):
            raise InputError(f"{path}: {len(unknown)} anchors not in the anchor list (first: {unknown[0]}; "
                             "rerun diffuse)")
    return table


def manifold_neighbour_matrix(path: str | os.PathLike, table: pa.Table,
                              anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, similarities)``, ``(len(anchors), depth)``: row r holds anchor
    ``anchors[r]``'s neighbours by rank, padded with -1 (similarity 0)."""
    anchor = table.column("anchor").to_numpy()
    neighbour = table.column("neighbour").to_numpy()
    rank = table.column("rank").to_numpy().astype(np.int64)
    similarity = table.column("similarity").to_numpy()
    sorter = np.argsort(anchors)
    found = np.minimum(np.searchsorted(anchors[sorter], anchor), len(anchors) - 1)
    rows = sorter[found]
    if not (anchors[rows] == anchor).all():
        raise InputError(f"{path}: rows for anchors not in the anchor list (rerun diffuse)")
    depth = int(rank.max()) if len(rank) else 0
    ids = np.full((len(anchors), depth), -1, dtype=np.int64)
    # two rows for one (anchor, rank) cell: only one row number stays there, the other reads it back wrong
    # (np.unique of the cells took 19 s at 12M rows; this is linear and needs no other array)
    row_numbers = np.arange(len(rank))
    ids[rows, rank - 1] = row_numbers
    if not np.array_equal(ids[rows, rank - 1], row_numbers):
        raise InputError(f"{path}: an anchor lists two neighbours at the same rank (rerun diffuse)")
    values = np.zeros((len(anchors), depth), dtype=np.float32)
    ids[rows, rank - 1] = neighbour
    values[rows, rank - 1] = similarity
    return ids, values


# pools.parquet --------------------------------------------------------------------------------------------------

def write_pools(path: str | os.PathLike, columns: dict, manifold_found: np.ndarray) -> None:
    """Pool rows as given (anchors in rank order, positives first);
    ``manifold_similarity`` is null where ``manifold_found`` is False."""
    write_table(path, POOLS, columns, masks={"manifold_similarity": ~np.asarray(manifold_found, dtype=bool)})


def read_pools(path: str | os.PathLike, n_items: int | None = None, anchors: np.ndarray | None = None,
               owner: str = "the train split") -> pa.Table:
    """The pools: at least one member, kinds positive/negative, ids below
    ``n_items``; with ``anchors``, every pool anchor must be one of them."""
    table = read_table(path, POOLS, n_items, owner)
    if len(table) == 0:
        raise InputError(f"{path}: no pool members (rerun mine)")
    kinds = set(table.column("kind").unique().to_pylist())
    if not kinds <= set(POOL_KINDS):
        raise InputError(f"{path}: column kind has {sorted(kinds - set(POOL_KINDS))}, expected {list(POOL_KINDS)}")
    if anchors is not None:
        unknown = np.setdiff1d(table.column("anchor").to_numpy(), anchors)
        if len(unknown):
            raise InputError(f"{path}: {len(unknown)} pool anchors are not in the anchors file (first: "
                             f"{unknown[0]}); rerun mine after anchors")
    return table


def pool_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The columns of a read pools table as numpy arrays (null similarity -> NaN)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in POOLS.schema.names}


# ground_truth.parquet -------------------------------------------------------------------------------------------

def read_ground_truth(path: str | os.PathLike, n_queries: int, n_database: int, levels: tuple[str, ...]) -> pa.Table:
    """Relevance of (query, database item) pairs; ids within the two splits, levels among ``levels``."""
    table = read_table(path, GROUND_TRUTH)
    for name, n in (("query", n_queries), ("database", n_database)):
        ids = table.column(name).to_numpy()
        if len(ids) and ids.max() >= n:
            raise InputError(f"{path}: column {name} has id {ids.max()} outside the {n} items of that split "
                             "(rerun prepare)")
    unknown = sorted(set(table.column("relevance").unique().to_pylist()) - set(levels))
    if unknown:
        raise InputError(f"{path}: unknown relevance levels {unknown} (allowed: {list(levels)})")
    return table
