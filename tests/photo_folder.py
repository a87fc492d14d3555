"""A small folder of real photographs for end-to-end tests: scikit-image's
bundled sample images (no download), each with a few crops and flips, plus one
corrupt JPEG. Deterministic: same arguments, same files.

    python tests/photo_folder.py /tmp/photos 100
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Sample images shipped inside the scikit-image wheel (skimage/data/*.png|jpg), natural photographs
# and a few scientific/textured ones; those fetched over the network are not used.
SAMPLES = ("astronaut", "camera", "cat", "coffee", "chelsea", "horse", "hubble_deep_field", "immunohistochemistry",
           "moon", "page", "retina", "rocket", "coins", "brick", "grass", "gravel", "motorcycle_left", "clock",
           "logo", "text")
CORRUPT_NAME = "broken.jpg"


def sample_images() -> list[tuple[str, np.ndarray]]:
    """The bundled sample images that load offline, as RGB uint8."""
    import skimage.data

    images = []
    for name in SAMPLES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            image = np.asarray(loader())
        except Exception:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).astype(np.uint8)
        images.append((name, image[..., :3]))
    return images


def variants(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` views of one photograph: the whole image, then random crops
    (40-90% of each side), every other one mirrored."""
    h, w = image.shape[:2]
    views = [image]
    while len(views) < count:
        ch, cw = int(h * rng.uniform(0.4, 0.9)), int(w * rng.uniform(0.4, 0.9))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        view = image[top:top + ch, left:left + cw]
        views.append(view[:, ::-1] if len(views) % 2 else view)
    return views


def make_photo_folder(folder: Path, total: int = 100, seed: int = 0) -> dict:
    """Write ``total`` JPEG/PNG photographs and one corrupt file under ``folder``;
    returns ``{"images": n, "corrupt": relative path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = sample_images()
    per_sample = -(-total // len(samples))
    written = 0
    for name, image in samples:
        for index, view in enumerate(variants(image, per_sample, rng)):
            if written == total:
                break
            suffix = "jpg" if index % 2 else "png"
            (folder / name).mkdir(exist_ok=True)
            Image.fromarray(np.ascontiguousarray(view)).save(folder / name / f"{index:02d}.{suffix}")
            written += 1
    (folder / CORRUPT_NAME).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return {"images": written, "corrupt": CORRUPT_NAME}


if __name__ == "__main__":
    print(make_photo_folder(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 100))
