"""Atomic, deterministic reading and writing of the artifacts stages exchange.

Every writer goes through :func:`atomic_path`: the data is written to a
temporary file in the destination folder and renamed over the destination only
when complete, so an interrupted stage never leaves a half-written output.
Writers avoid timestamps and unordered containers so that the same inputs give
the same bytes (DVC's cache and early cut-off rely on it).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import scipy.sparse as sp

from mom.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception the destination is untouched and the temporary file is
    removed. A kill (SIGKILL, power loss) before the rename leaves the
    destination untouched and the temporary file behind, with a ``.tmp-``
    prefix that no reader looks at; the next successful write of the same
    destination removes such leftovers (they would otherwise sit inside a DVC
    directory output and change its hash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{path.name}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
        _remove_leftovers(path.parent, prefix)
    finally:
        tmp_path.unlink(missing_ok=True)


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Delete temporaries of earlier, killed writes of one destination
    (``prefix`` = ``.tmp-<name>-``). DVC runs one writer per output at a time."""
    for leftover in folder.glob(_glob_escape(prefix) + "*"):
        leftover.unlink(missing_ok=True)


def _glob_escape(text: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


@contextlib.contextmanager
def open_npy_for_writing(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> Iterator[np.memmap]:
    """A writable memory map of a new ``.npy`` file, published atomically on exit.

    For outputs too large to hold in memory (features of a million images).
    """
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def save_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write a Parquet table (no pandas metadata, fixed compression)."""
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def load_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first)")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None


def save_csr(path: str | os.PathLike, matrix: sp.spmatrix) -> None:
    """Write a CSR matrix in scipy's ``.npz`` layout, byte-deterministically
    (``scipy.sparse.save_npz`` stamps the zip entries with the current time)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sort_indices()
    arrays = {
        "indices": matrix.indices,
        "indptr": matrix.indptr,
        "format": np.array(b"csr"),
        "shape": np.array(matrix.shape),
        "data": matrix.data,
    }
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w") as handle:
                    np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)


def load_csr(path: str | os.PathLike) -> sp.csr_matrix:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first)")
    return sp.load_npz(path).tocsr()


def save_json(path: str | os.PathLike, data: dict) -> None:
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n"
    save_text(path, text)


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (run the stage that writes it first)")
    return json.loads(path.read_text())


def save_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(path: str | os.PathLike, figure) -> None:
    """Save a matplotlib figure as PNG without timestamps in its metadata."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def to_jsonable(value):
    """Convert numpy scalars/arrays (recursively) into plain JSON types."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
