"""A user's own directory of images (``source: folder``).

Rules (the README repeats them):

- Files: every regular file under ``root``, recursively, whose extension is
  one of :data:`IMAGE_EXTENSIONS` (case-insensitive); folders whose name starts
  with a dot are not entered. Order: sorted relative POSIX paths, so the
  manifest does not depend on the file system's listing order.
- Nothing outside the root is read: a symlink is followed only when it
  resolves to a regular file inside the root; symlinks to files elsewhere,
  broken symlinks and symlinked folders (never entered) are skipped and
  reported, as are devices, FIFOs and sockets (never opened). Ground-truth
  query paths must stay inside ``query_root`` (no absolute paths, no ``..``).
- Non-UTF-8 file names (Linux bytes names) are read; the manifest's
  ``origin`` and the report write their undecodable bytes as ``\\xNN``.
- Splits: ``root`` is the ``train`` split; ``val`` is empty. The images of
  ``test_root`` (optional; it and ``root`` must not contain each other) are
  ``new_images`` (new images of the collection's classes) or ``new_classes``
  (classes the collection does not contain): with ``labels_from_folders`` an
  image whose class folder also occurs under ``root`` is a new image, one whose
  class does not is a new class; without labels every test image is a new image.
  Without ``test_root`` (and without ``ground_truth``), ``holdout`` images of
  ``root`` are held out as ``new_images`` (never in ``train``, so never mined
  nor trained on), chosen among the sorted listing by a generator seeded with
  ``seed`` (:func:`mom.autosize.holdout_items`); ``new_classes`` is empty.
- Labels: unlabeled by default. With ``labels_from_folders`` the first
  sub-folder under the root is the class name; class ids are the sorted union
  of the names found under both roots (same name = same id); files directly in
  a root stay unlabeled.
- Pixels: every image becomes RGB ``uint8`` (3 channels, grayscale replicated):
  EXIF orientation applied; 1-bit -> black/white; palette -> its colours;
  16-bit (``I;16*``) and 32-bit integer (``I``) images are read as 16-bit and
  scaled by 255/65535; float (``F``) images are clipped to [0, 255]; CMYK and
  other modes through Pillow's conversion; transparency is composited over
  white. Multi-frame files give their first frame. Images whose longer side
  exceeds ``max_side`` are downscaled (Lanczos) so the longer side is
  ``max_side``, aspect kept (``0`` = keep the size).
- Retrieval evaluation on your own images (optional): ``ground_truth`` names a
  CSV (header ``query,database,relevance``) or Parquet file with those columns:
  ``query`` a path relative to ``query_root`` (or to ``test_root`` when
  ``query_root`` is empty), ``database`` a path relative to ``test_root``,
  ``relevance`` one of positive/junk (or any level of
  :data:`mom.datasets.retrieval.RELEVANCE_LEVELS`; the column may be left out:
  positive). Then the splits are ``train`` (root), ``query`` (the listed
  queries, sorted, whole images), ``database`` (every image of ``test_root``)
  and empty ``val``/``new_images``/``new_classes``, and ``ground_truth.parquet`` is written; the
  protocol is ``positive`` (positives; junk ignored; other pairs negative).
  Listed queries and listed database images must decode; other database files
  follow the skip-and-report rule.
- Skipped and reported (``path``, ``reason``): zero-byte files, files Pillow
  cannot identify, corrupt or truncated images, unreadable files (permission
  denied), images over Pillow's decompression-bomb limit
  (``PIL.Image.MAX_IMAGE_PIXELS``, refused before any pixel is allocated),
  unsupported modes, the links and special files above, and files with other
  extensions.
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from mom import autosize
from mom.datasets import PreparedDataset
from mom.datasets.annotations import confined_paths
from mom.datasets.images import (  # noqa: F401 - re-exported for callers of the folder source
    IMAGE_EXTENSIONS,
    FileItem,
    RejectedImage,
    decode_image,
    display_path,
    downscale,
    empty_split,
    file_split,
    list_files,
)
from mom.datasets.retrieval import RELEVANCE_LEVELS, ground_truth_table
from mom.errors import InputError

SOURCE = "folder"


def _first_folder(relative: str) -> str | None:
    parts = PurePosixPath(relative).parts
    return parts[0] if len(parts) > 1 else None


def _checked_roots(root: str | Path, test_root: str | Path | None) -> tuple[Path, Path | None]:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"root: {root} is not a directory")
    if not test_root:
        return root, None
    test_root = Path(test_root)
    if not test_root.is_dir():
        raise InputError(f"test_root: {test_root} is not a directory")
    a, b = root.resolve(), test_root.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise InputError(f"test_root: {test_root} and root {root} must not contain each other")
    return root, test_root


def prepare_folder(
    root: str | Path,
    test_root: str | Path | None = None,
    labels_from_folders: bool = False,
    max_side: int = 512,
    workers: int = 1,
    query_root: str | Path | None = None,
    ground_truth: str | Path | None = None,
    holdout: int | str = 0,
    seed: int = 0,
) -> PreparedDataset:
    """The ``train`` split from ``root``, ``new_images`` and ``new_classes`` from
    ``test_root`` (or empty), an empty ``val``; with ``ground_truth``, ``query``
    and ``database`` splits instead (module doc). Rejected files are appended to
    the result's ``rejected`` while the splits are streamed."""
    if max_side is not None and max_side < 0:
        raise InputError(f"max_side: must be >= 0 (0 = keep the size), got {max_side}")
    root, test_root = _checked_roots(root, test_root)
    train_listing = list_files(root)
    test_listing = list_files(test_root) if test_root else ([], [])
    if not train_listing[0]:
        raise InputError(
            f"root: no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, recursively)"
        )
    class_ids = {}
    if labels_from_folders:
        names = {_first_folder(rel) for rel in train_listing[0] + test_listing[0]} - {None}
        class_ids = {name: index for index, name in enumerate(sorted(names))}
    dataset = PreparedDataset(source=SOURCE, splits={}, info={"classes": {str(i): n for n, i in class_ids.items()}})
    if test_root is None and not ground_truth:
        train_listing, held_out = carve_holdout(train_listing, holdout, seed, dataset.info)
        _add_split(dataset, "train", root, train_listing, class_ids, max_side, workers)
        dataset.splits["val"] = empty_split()
        _add_split(dataset, "new_images", root, held_out, class_ids, max_side, workers)
        dataset.splits["new_classes"] = empty_split()
        return dataset
    _add_split(dataset, "train", root, train_listing, class_ids, max_side, workers)
    dataset.splits["val"] = empty_split()
    if ground_truth:
        rows = read_ground_truth_file(ground_truth)
        test_items = [_folder_item(test_root, rel, class_ids) for rel in test_listing[0]] if test_root else []
        _add_retrieval_splits(dataset, rows, test_items, test_listing[1], test_root, query_root, max_side, workers,
                              ground_truth)
        return dataset
    collection_classes = {_first_folder(rel) for rel in train_listing[0]} - {None}
    for split, listing in split_by_class(test_listing, collection_classes if labels_from_folders else None).items():
        _add_split(dataset, split, test_root, listing, class_ids, max_side, workers)
    return dataset


def carve_holdout(listing, holdout: int | str, seed: int, info: dict) -> tuple[tuple[list, list], tuple[list, list]]:
    """``(train listing, held-out listing)``: ``holdout`` of the candidate files
    (``auto``: :func:`mom.autosize.auto_size` of ``prepare.holdout``) go to the
    held-out listing; skipped files stay with train (reported once). Records the
    choice in ``info["holdout"]``."""
    candidates, skipped = listing
    n = len(candidates)
    chosen: dict = {}
    count = autosize.resolve("prepare.holdout", holdout, n, chosen)
    if count < 0 or count >= n:
        raise InputError(f"holdout={count}: must be between 0 and {n - 1} (root holds {n} image files); "
                         f"a value that works: -S prepare.holdout={autosize.auto_size('prepare.holdout', n)} (or auto)")
    positions = set(autosize.holdout_items(n, count, seed).tolist())
    info["holdout"] = {"count": count, "of": n, "seed": seed, "split": "new_images",
                       **({"auto": chosen["prepare.holdout"]} if chosen else {})}
    kept = [rel for i, rel in enumerate(candidates) if i not in positions]
    held = [rel for i, rel in enumerate(candidates) if i in positions]
    return (kept, skipped), (held, [])


def split_by_class(listing, collection_classes: set[str] | None) -> dict[str, tuple[list, list]]:
    """Divide a test folder's listing (candidates, skipped) into ``new_images``
    and ``new_classes``: a path whose class folder is not among
    ``collection_classes`` is a new class; with ``None`` (no labels) every path
    is a new image."""
    def is_new_class(relative: str) -> bool:
        name = _first_folder(relative)
        return collection_classes is not None and name is not None and name not in collection_classes

    candidates, skipped = listing
    return {
        "new_images": ([rel for rel in candidates if not is_new_class(rel)],
                       [entry for entry in skipped if not is_new_class(entry[0])]),
        "new_classes": ([rel for rel in candidates if is_new_class(rel)],
                        [entry for entry in skipped if is_new_class(entry[0])]),
    }


def _add_split(dataset, split, folder, listing, class_ids, max_side, workers) -> None:
    candidates, skipped = listing
    dataset.rejected.extend({"split": split, "path": display_path(rel), "reason": reason} for rel, reason in skipped)
    items = [_folder_item(folder, rel, class_ids) for rel in candidates]
    dataset.splits[split] = file_split(SOURCE, split, items, dataset, max_side or 0, workers, exif=True)


def read_ground_truth_file(path: str | Path) -> list[tuple[str, str, str]]:
    """``(query path, database path, relevance)`` rows of a user's CSV or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ground_truth: {path} not found")
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"ground_truth: {path} is not a readable Parquet file ({error})") from None
        records = table.to_pylist()
        columns = table.column_names
    else:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                records = list(reader)
                columns = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error) as error:
            raise InputError(f"ground_truth: {path} is not a readable UTF-8 CSV file ({error})") from None
    if not {"query", "database"} <= set(columns):
        raise InputError(f"ground_truth: {path} needs columns query, database (and optionally relevance)")
    rows = []
    for number, record in enumerate(records, start=2):
        relevance = (record.get("relevance") or "positive").strip()
        if relevance not in RELEVANCE_LEVELS:
            raise InputError(f"ground_truth: {path} row {number}: relevance {relevance!r} not in {list(RELEVANCE_LEVELS)}")
        query, database = str(record["query"] or "").strip(), str(record["database"] or "").strip()
        if not query or not database:
            raise InputError(f"ground_truth: {path} row {number}: empty query or database path")
        rows.append((PurePosixPath(query).as_posix(), PurePosixPath(database).as_posix(), relevance))
    if not rows:
        raise InputError(f"ground_truth: {path} lists no pairs")
    return rows


def _add_retrieval_splits(dataset, rows, test_items, test_skipped, test_root, query_root, max_side, workers,
                          ground_truth) -> None:
    if test_root is None:
        raise InputError("ground_truth: needs test_root (the database images)")
    query_folder = Path(query_root) if query_root else test_root
    if not query_folder.is_dir():
        raise InputError(f"query_root: {query_folder} is not a directory")
    queries = sorted({query for query, _, _ in rows})
    query_paths = confined_paths(query_folder, queries, ground_truth, option="ground_truth")
    missing = [query for query, path in zip(queries, query_paths) if not path.is_file()]
    if missing:
        raise InputError(f"ground_truth: {len(missing)} query images not found under {query_folder}, first: {missing[0]}")
    listed = {database for _, database, _ in rows}
    unknown = sorted(listed - {item.origin for item in test_items})
    if unknown:
        raise InputError(f"ground_truth: {len(unknown)} database images not found under {test_root}, first: {unknown[0]}")
    database = [_required(item) if item.origin in listed else item for item in test_items]
    query_items = [FileItem(path=path, origin=q, required=True) for q, path in zip(queries, query_paths)]
    dataset.splits["database"] = file_split(SOURCE, "database", database, dataset, max_side or 0, workers, exif=True)
    dataset.splits["query"] = file_split(SOURCE, "query", query_items, dataset, max_side or 0, workers, exif=True)
    dataset.rejected.extend({"split": "database", "path": display_path(rel), "reason": reason}
                            for rel, reason in test_skipped)
    query_index = {q: i for i, q in enumerate(queries)}

    def table() -> pa.Table:
        stored = dataset.splits["database"].columns["origin"]
        position = {origin: i for i, origin in enumerate(stored)}
        triples = [(query_index[q], position[d], relevance) for q, d, relevance in rows]
        return ground_truth_table(triples, len(queries), len(stored))

    dataset.ground_truth = table
    dataset.info["protocols"] = ["positive"]


def _required(item: FileItem) -> FileItem:
    return FileItem(item.path, item.origin, item.label, item.class_name, item.crop, required=True)


def _folder_item(folder: Path, relative: str, class_ids: dict[str, int]) -> FileItem:
    name = _first_folder(relative) if class_ids else None
    return FileItem(path=folder / relative, origin=display_path(relative), label=class_ids.get(name),
                    class_name=display_path(name) if name is not None else None)
