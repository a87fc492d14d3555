"""CUB-200-2011 (Wah et al. 2011) in its released layout::

    CUB_200_2011/images.txt              <image_id> <relative path>
    CUB_200_2011/image_class_labels.txt  <image_id> <class_id 1..200>
    CUB_200_2011/classes.txt             <class_id> <name, e.g. 001.Black_footed_Albatross>
    CUB_200_2011/images/<relative path>

Zero-shot split of the metric-learning literature (and of the paper): classes
1-100 form the (unlabeled) training collection, 101-200 the test set; the
official train_test_split.txt is not used. Full set: 11,788 images, 5,864
train and 5,924 test. Labels are ``class_id - 1``. Images in the order of
images.txt.
"""
from __future__ import annotations

from pathlib import Path

from mom.datasets import PreparedDataset
from mom.datasets.annotations import confined_paths
from mom.datasets.category import as_int, published_split_dataset, read_table
from mom.datasets.download import extract, fetch
from mom.datasets.images import FileItem
from mom.errors import InputError

SOURCE = "cub"
TRAIN_CLASSES = range(1, 101)
FULL_TOTAL = 11788
FULL_SPLITS = {"train": 5864, "new_classes": 5924}
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"


def dataset_folder(root: str | Path) -> Path:
    """``root`` itself or its ``CUB_200_2011`` sub-folder, whichever holds images.txt."""
    root = Path(root)
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise InputError(f"root: no images.txt in {root} or {root / 'CUB_200_2011'} (turn on download or fix root)")


def download_cub(root: Path) -> None:
    if (root / "images.txt").is_file() or (root / "CUB_200_2011" / "images.txt").is_file():
        return
    archive = fetch(URL, root / "CUB_200_2011.tgz")
    extract(archive, root)
    archive.unlink()


def load_cub(root: str | Path) -> dict[str, list[FileItem]]:
    folder = dataset_folder(root)
    paths = {as_int(i, "images.txt"): p for i, p in read_table(folder / "images.txt", 2)}
    labels = {as_int(i, "image_class_labels.txt"): as_int(c, "image_class_labels.txt")
              for i, c in read_table(folder / "image_class_labels.txt", 2)}
    names = {as_int(c, "classes.txt"): n for c, n in read_table(folder / "classes.txt", 2)}
    if set(paths) != set(labels):
        raise InputError(f"root: images.txt and image_class_labels.txt list different image ids in {folder}")
    unknown = sorted(set(labels.values()) - set(names))
    if unknown:
        raise InputError(f"root: image_class_labels.txt uses classes {unknown[:5]} missing from classes.txt")
    splits: dict[str, list[FileItem]] = {"train": [], "new_classes": []}
    ids = sorted(paths)
    images = confined_paths(folder / "images", [paths[image_id] for image_id in ids], folder / "images.txt")
    for image_id, image in zip(ids, images):
        class_id = labels[image_id]
        split = "train" if class_id in TRAIN_CLASSES else "new_classes"
        splits[split].append(FileItem(path=image, origin=f"images/{paths[image_id]}",
                                      label=class_id - 1, class_name=names[class_id]))
    return splits


def prepare_cub(
    root: str | Path, max_side: int = 512, workers: int = 1, download: bool = False
) -> PreparedDataset:
    if download:
        download_cub(Path(root))
    return published_split_dataset(SOURCE, "CUB-200-2011", load_cub(root), FULL_TOTAL, FULL_SPLITS,
                                   "classes 1-100 train, 101-200 new_classes", max_side, workers)
