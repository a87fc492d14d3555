"""Stanford Online Products (Song et al. 2016) in its released layout::

    Ebay_train.txt   header "image_id class_id super_class_id path", then one
    Ebay_test.txt    row per image, path like bicycle_final/111085122871_0.JPG
    <super class folder>/<image>.JPG

Standard zero-shot split: Ebay_train.txt (59,551 images of 11,318 products) is
the unlabeled training collection, Ebay_test.txt (60,502 images of 11,316
products) the test set. Labels are ``class_id - 1``; class names are
``<super class folder>/<class_id>``. No stable download address (FTP only).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from mom.datasets import PreparedDataset
from mom.datasets.annotations import confined_paths, read_annotation_text
from mom.datasets.category import as_int, published_split_dataset, read_table
from mom.datasets.images import FileItem
from mom.errors import InputError

SOURCE = "sop"
LISTS = {"train": "Ebay_train.txt", "new_classes": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]
FULL_TOTAL = 59551 + 60502
FULL_SPLITS = {"train": 59551, "new_classes": 60502}


def _read_list(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise InputError(f"root: {path} not found (is root the Stanford_Online_Products folder?)")
    first = read_annotation_text(path).split("\n", 1)[0].split()
    if first != HEADER:
        raise InputError(f"root: {path}: first line must be the header {' '.join(HEADER)}")
    return read_table(path, 4, header=True)


def load_sop(root: str | Path) -> dict[str, list[FileItem]]:
    root = Path(root)
    splits: dict[str, list[FileItem]] = {}
    classes: dict[str, set[int]] = {}
    for split, name in LISTS.items():
        items = []
        rows = _read_list(root / name)
        images = confined_paths(root, [row[3] for row in rows], root / name)
        for (_, class_id, _, relative), image in zip(rows, images):
            label = as_int(class_id, name) - 1
            folder = PurePosixPath(relative).parts[0]
            items.append(FileItem(path=image, origin=relative, label=label, class_name=f"{folder}/{label + 1}"))
        splits[split] = items
        classes[split] = {item.label for item in items}
    shared = classes["train"] & classes["new_classes"]
    if shared:
        raise InputError(f"root: Ebay_train.txt and Ebay_test.txt share class ids (e.g. {min(shared) + 1})")
    return splits


def prepare_sop(root: str | Path, max_side: int = 512, workers: int = 1, download: bool = False) -> PreparedDataset:
    if download:
        raise InputError("download: Stanford Online Products has no stable public address; fetch it by hand")
    return published_split_dataset(SOURCE, "Stanford Online Products", load_sop(root), FULL_TOTAL, FULL_SPLITS,
                                   "Ebay_train.txt train, Ebay_test.txt new_classes", max_side, workers)
