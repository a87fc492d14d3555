"""Shared shape of the category-level datasets (CUB-200-2011, Cars196, SOP):
zero-shot splits by class, ``train`` unlabeled for mining (labels kept for
evaluation reports only) and ``new_classes`` on held-out classes (the
zero-shot protocol: the collection contains none of them)."""
from __future__ import annotations

from pathlib import Path

from mom.datasets import PreparedDataset
from mom.datasets.annotations import read_annotation_text
from mom.datasets.images import FileItem, empty_split, file_split, require_files
from mom.errors import InputError


def read_table(path: Path, columns: int, header: bool = False) -> list[list[str]]:
    """Whitespace-separated rows of a released text file; the last column may
    hold spaces only when it is a path (split at most ``columns - 1`` times)."""
    if not path.is_file():
        raise InputError(f"root: {path} not found (is root the dataset's top folder?)")
    rows = []
    lines = read_annotation_text(path).splitlines()
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise InputError(f"root: {path}:{number}: expected {columns} fields, got {line!r}")
        rows.append(fields)
    return rows


def as_int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"root: {where}: {value!r} is not an integer") from None


def category_dataset(
    source: str, splits: dict[str, list[FileItem]], max_side: int, workers: int, info: dict
) -> PreparedDataset:
    """``train``/``new_classes`` from the given items (missing files: an error before
    decoding; corrupt ones: skipped and reported), empty ``val``."""
    for split, items in splits.items():
        require_files(items, f"{split} images")
    dataset = PreparedDataset(source=source, splits={}, info=info)
    for split, items in splits.items():
        dataset.splits[split] = file_split(source, split, items, dataset, max_side, workers)
    dataset.splits.setdefault("val", empty_split())
    return dataset


def check_full_counts(name: str, counts: dict[str, int], full_total: int, expected: dict[str, int]) -> bool:
    """When the whole dataset is listed, its split sizes must be the published ones."""
    if sum(counts.values()) != full_total:
        return False
    if counts != expected:
        raise InputError(f"root: {name} lists {full_total} images but splits them {counts}, expected {expected}")
    return True


def published_split_dataset(source: str, title: str, splits: dict[str, list[FileItem]], full_total: int,
                            full_splits: dict[str, int], split_rule: str, max_side: int, workers: int) -> PreparedDataset:
    """A benchmark with a published class split (Cars196, SOP): its splits,
    with ``info`` saying the rule and whether the whole published set is there."""
    counts = {split: len(items) for split, items in splits.items()}
    full = check_full_counts(title, counts, full_total, full_splits)
    return category_dataset(source, splits, max_side, workers, {"split_rule": split_rule, "full_set": full})
