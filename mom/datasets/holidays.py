"""INRIA Holidays (Jegou et al. 2008) in its released layout::

    jpg/100000.jpg, jpg/100001.jpg, ...   (or the images directly in root)

An image ``NNNNXX.jpg`` belongs to group ``NNNN``; the group's first image
(``XX == 00``) is its query. Database: all 1,491 images (queries included, as
the official evaluation ranks the whole set); ground truth per query: the other
images of its group ``positive``, the query itself ``junk`` (ignored).
Protocol ``positive``. Full set: 1,491 images, 500 queries. Many images are
stored rotated; use the manually rotated release if you have it (same names).
Images are used whole (no crop). No stable download address.
"""
from __future__ import annotations

from pathlib import Path

from mom.datasets.annotations import confined_paths
from mom.datasets.images import FileItem
from mom.datasets.retrieval import Benchmark
from mom.errors import InputError

SOURCE = "holidays"
FULL_SIZES = (1491, 500)


def _images_folder(root: Path) -> Path:
    for candidate in (root / "jpg", root):
        if candidate.is_dir() and any(candidate.glob("*.jpg")):
            return candidate
    raise InputError(f"root: no .jpg images in {root}/jpg or {root}")


def load_holidays(root: str | Path) -> Benchmark:
    root = Path(root)
    folder = _images_folder(root)
    paths = sorted(folder.glob("*.jpg"))
    bad = [path.name for path in paths if not (path.stem.isdigit() and len(path.stem) == 6)]
    if bad:
        raise InputError(f"root: Holidays image names are six digits (100000.jpg); found {bad[:3]}")
    confined_paths(folder, [path.name for path in paths], f"the folder listing of {folder}")
    database = [FileItem(path=p, origin=p.relative_to(root).as_posix(), required=True) for p in paths]
    groups: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(int(path.stem) // 100, []).append(i)
    queries, relevance = [], []
    for group, members in sorted(groups.items()):
        first = members[0]
        if int(paths[first].stem) % 100 != 0:
            raise InputError(f"root: group {group} has no query image {group}00.jpg")
        q = len(queries)
        queries.append(FileItem(path=paths[first], origin=database[first].origin, required=True))
        relevance += [(q, i, "junk" if i == first else "positive") for i in members]
    full = (len(database), len(queries)) == FULL_SIZES
    return Benchmark(SOURCE, database, queries, relevance, ("positive",), {"full_set": full})
