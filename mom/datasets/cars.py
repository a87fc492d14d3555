"""Cars196 (Stanford Cars, Krause et al. 2013) in the layout used for metric
learning::

    cars_annos.mat   annotations: struct array with relative_im_path
                     ('car_ims/000001.jpg'), bbox_x1..bbox_y2, class (1..196),
                     test (0/1); class_names: 196 names
    car_ims/000001.jpg ...

Zero-shot split: classes 1-98 train (unlabeled), 99-196 test; the official
train/test flag is not used. Full set: 16,185 images, 8,054 train and 8,131
test. Labels are ``class - 1``. The MATLAB file is read with scipy (no pickle).
The original download address no longer serves the files, so there is no
download option: fetch the dataset by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from mom.datasets import PreparedDataset
from mom.datasets.annotations import confined_paths
from mom.datasets.category import published_split_dataset
from mom.datasets.images import FileItem
from mom.errors import InputError

SOURCE = "cars196"
TRAIN_CLASSES = range(1, 99)
FULL_TOTAL = 16185
FULL_SPLITS = {"train": 8054, "new_classes": 8131}
ANNOTATIONS = "cars_annos.mat"


def _text(value) -> str:
    return str(np.asarray(value).ravel()[0]) if np.asarray(value).size else ""


def load_cars(root: str | Path) -> dict[str, list[FileItem]]:
    root = Path(root)
    path = root / ANNOTATIONS
    if not path.is_file():
        raise InputError(f"root: {path} not found (Cars196 needs cars_annos.mat and car_ims/ in root)")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
        annotations = np.atleast_1d(mat["annotations"])
        names = [_text(name) for name in np.atleast_1d(mat["class_names"])]
        image_paths = [_text(p) for p in annotations["relative_im_path"]]
        classes = [int(c) for c in annotations["class"]]
    except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is one line
        raise InputError(f"root: {path} is not the Cars196 annotation file ({type(error).__name__}: {error})") from None
    if any(not 1 <= c <= len(names) for c in classes):
        raise InputError(f"root: {path}: class ids must lie in 1..{len(names)}")
    splits: dict[str, list[FileItem]] = {"train": [], "new_classes": []}
    for image, relative, class_id in zip(confined_paths(root, image_paths, path), image_paths, classes):
        split = "train" if class_id in TRAIN_CLASSES else "new_classes"
        splits[split].append(FileItem(path=image, origin=relative, label=class_id - 1,
                                      class_name=names[class_id - 1]))
    return splits


def prepare_cars(root: str | Path, max_side: int = 512, workers: int = 1, download: bool = False) -> PreparedDataset:
    if download:
        raise InputError("download: Cars196 has no stable public address; fetch cars_annos.mat and car_ims/ by hand")
    return published_split_dataset(SOURCE, "Cars196", load_cars(root), FULL_TOTAL, FULL_SPLITS,
                                   "classes 1-98 train, 99-196 new_classes", max_side, workers)
