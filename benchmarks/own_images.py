"""The README's own-images command on folders of several sizes (issue 17's checks).

    python benchmarks/own_images.py photos 60 /tmp/photos-60          # scikit-image photographs, crops, flips
    python benchmarks/own_images.py fashion 20000 /tmp/fashion-20k    # Fashion-MNIST train images as PNG, unlabeled
    python tests/test_own_images_e2e.py /tmp/fashion-20k /tmp/project  # then run the command on the folder

``fashion`` writes the first N images of the ``train`` IDX file as flat PNG files
(no class folders: an unlabeled collection), from the Debian package
``dataset-fashion-mnist``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photo_folder import make_photo_folder  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def fashion_folder(folder: Path, count: int) -> int:
    from mom.datasets.fashion_mnist import read_idx

    images = read_idx(FASHION)[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    return len(images)


if __name__ == "__main__":
    kind, count, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if kind == "photos":
        print(make_photo_folder(out, count))
    else:
        print(fashion_folder(out, count), "images")
