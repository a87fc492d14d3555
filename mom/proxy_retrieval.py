"""An embedded retrieval benchmark built from held-out items: a PROXY, not
Oxford/Paris (docs/method.md section 8 measures, on synthetic queries).

Each selected item of an image store (the held-out ``test`` split: classes the
network never trained on) is an *object*. View 0 of an object (an augmented
copy, :mod:`mom.augment`) is its query; views ``1..V`` go to the database. The
positives of a query are exactly the ``V`` database views of its own object;
every other database view is a negative; there is no junk. Retrieval is ranked
by dot product of l2-normalized descriptors and scored with
:func:`mom.metrics.mean_average_precision` and
:func:`mom.metrics.mean_precision_at_k`.

What it measures: invariance of a descriptor to the augmentations of one level,
among many similar-looking objects (other items of the same classes). It does
not measure what the real benchmarks do (viewpoint, occlusion, clutter of
photographs of buildings), hence "proxy".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mom import metrics
from mom.augment import augmented_views

QUERY_VIEW = 0


def select_objects(n_items: int, objects: int, seed: int) -> np.ndarray:
    """Sorted store item ids of ``objects`` items drawn without replacement
    (all ``n_items`` when ``objects`` is 0 or at least ``n_items``)."""
    if objects < 0:
        raise ValueError(f"objects must be non-negative, got {objects}")
    if objects == 0 or objects >= n_items:
        return np.arange(n_items, dtype=np.int64)
    rng = np.random.default_rng([int(seed), n_items])
    return np.sort(rng.choice(n_items, size=objects, replace=False)).astype(np.int64)


@dataclass
class ProxyBenchmark:
    """Query and database views of one augmentation level, with their objects.

    ``query_object[q]`` / ``database_object[j]``: position in ``items`` of the
    object that view belongs to. Database views are object-major: object ``o``
    holds database ids ``o * V .. o * V + V - 1``.
    """

    level: str
    items: np.ndarray
    queries: list = field(repr=False)
    database: list = field(repr=False)
    query_object: np.ndarray = field(repr=False)
    database_object: np.ndarray = field(repr=False)

    @property
    def positives(self) -> list[np.ndarray]:
        return ground_truth(self.query_object, self.database_object)


def build_benchmark(store, items: Sequence[int], level: str, views_in_database: int, seed: int,
                    progress: bool = False) -> ProxyBenchmark:
    """Augment every object ``store[item]``: view 0 is its query, views
    ``1..views_in_database`` its database entries (seeded per view, see
    :func:`mom.augment.view_generator`)."""
    if views_in_database < 1:
        raise ValueError(f"views_in_database must be at least 1, got {views_in_database}")
    items = np.asarray(items, dtype=np.int64)
    queries, database = [], []
    database_views = range(QUERY_VIEW + 1, QUERY_VIEW + 1 + views_in_database)
    for item in tqdm(items.tolist(), desc=f"augment {level}", unit="object", disable=not progress, mininterval=2.0):
        image = store[item]
        queries.extend(augmented_views(image, level, seed, item, [QUERY_VIEW]))
        database.extend(augmented_views(image, level, seed, item, database_views))
    objects = np.arange(len(items), dtype=np.int64)
    return ProxyBenchmark(level, items, queries, database, objects, np.repeat(objects, views_in_database))


def ground_truth(query_object: np.ndarray, database_object: np.ndarray) -> list[np.ndarray]:
    """Positives of each query: the database ids of the query's own object."""
    database_object = np.asarray(database_object)
    order = np.argsort(database_object, kind="stable")
    sorted_objects = database_object[order]
    starts = np.searchsorted(sorted_objects, query_object, side="left")
    stops = np.searchsorted(sorted_objects, query_object, side="right")
    return [np.sort(order[start:stop]) for start, stop in zip(starts, stops)]


class ViewStore:
    """A list of uint8 ``(h, w, c)`` images with the interface
    :func:`mom.extraction.embed_store` reads (``len``, ``[i]``, ``shapes``)."""

    def __init__(self, images: Sequence[np.ndarray]):
        self._images = list(images)
        self.shapes = np.array([image.shape for image in self._images], dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images[int(index)]


def raw_pixel_descriptors(images: Sequence[np.ndarray], side: int | None = None) -> np.ndarray:
    """The raw-pixel baseline: each image flattened (float) and l2-normalized,
    float32 ``(n, h * w * c)``. Images must share one shape unless ``side`` is
    given, in which case each is first resized to ``side x side`` (bilinear,
    antialiased) and converted to grey (channel mean)."""
    if side is None:
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise ValueError(f"raw pixels need images of one shape (or a side to resize to), got {sorted(shapes)}")
        flat = np.stack([image.reshape(-1) for image in images]).astype(np.float32)
    else:
        flat = np.stack([_grey_resized(image, side).reshape(-1) for image in images])
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-12)


def _grey_resized(image: np.ndarray, side: int) -> np.ndarray:
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None].mean(dim=1, keepdim=True)
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).numpy()


def evaluate(query_descriptors: np.ndarray, database_descriptors: np.ndarray, positives: list[np.ndarray],
             precision_ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """mAP and mP@k (docs/method.md section 8, no junk) of ranking the database by
    dot product for every query: ``{"map", "mp_at_<k>" ...}``."""
    rankings = metrics.rank_database(query_descriptors, database_descriptors)
    result = {"map": metrics.mean_average_precision(rankings, positives)["map"]}
    precision = metrics.mean_precision_at_k(rankings, positives, ks=precision_ks)
    result.update({f"mp_at_{k}": value for k, value in precision.items()})
    return result
