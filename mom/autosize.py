"""Sizes that adapt to the collection: what ``auto`` means for a param.

One rule for every count-like param (docs/stages.md, "auto sizes"):

    auto = max(floor, min(reference, n // divisor))

(the held-out images of a folder: 0 below 50 images, too few to spare any).
``n`` is the number of training items (for ``finetune.batch_size``: the number
of anchors), ``reference`` the value tuned for the embedded default (6,000
Fashion-MNIST training images), so on the default ``auto`` gives exactly the
reference values, and on a smaller collection the value shrinks in proportion.
:data:`RULES` holds the constants. The result must fit the collection (a
neighbourhood smaller than ``n``); a collection too small for any value is an
:class:`~mom.errors.InputError`.

The input resolution follows the images' median longer side: at most
:data:`THUMBNAIL_SIDE` px (thumbnails such as Fashion-MNIST's 28 px) gives
:data:`THUMBNAIL_INPUT` (64, upsampled), larger gives :data:`PHOTO_INPUT` (224,
the ImageNet training size of the backbones).

Pure functions: the stages call them with what they read and log/report the
result (:func:`describe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from mom.errors import InputError

AUTO = "auto"
THUMBNAIL_SIDE = 128
THUMBNAIL_INPUT = 64
PHOTO_INPUT = 224


@dataclass(frozen=True)
class Rule:
    reference: int  # the embedded default's value
    divisor: int    # at most n // divisor
    floor: int      # at least this (if the collection allows it)
    counts: str     # what n counts
    zero_below: int = 0  # fewer items than this: 0 (none)


RULES = {
    "graph.k": Rule(30, 5, 5, "training items"),
    "anchors.count": Rule(1500, 4, 1, "training items"),
    "diffuse.k": Rule(2000, 3, 2, "training items"),
    "mine.k_neg": Rule(2000, 3, 2, "training items"),
    "mine.k_pos": Rule(50, 10, 5, "training items"),
    "finetune.batch_size": Rule(42, 8, 2, "anchors"),
    "prepare.holdout": Rule(1000, 5, 2, "images of the folder", zero_below=50),
}
# Params whose value must stay below n (a neighbourhood of other items).
BELOW_N = ("graph.k", "diffuse.k", "mine.k_neg", "mine.k_pos")


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def auto_size(name: str, n: int) -> int:
    """The ``auto`` value of param ``name`` (a key of :data:`RULES`) for ``n`` items."""
    rule = RULES[name]
    if n < rule.zero_below:
        return 0
    value = max(rule.floor, min(rule.reference, n // rule.divisor))
    limit = n - 1 if name in BELOW_N else n
    if value > limit or value < 1:
        raise InputError(f"{name}=auto: the collection has {n} {rule.counts}, too few for any value "
                         f"(needs at least {rule.floor + (name in BELOW_N)}); add images")
    return value


def rule_text(name: str) -> str:
    rule = RULES[name]
    text = f"max({rule.floor}, min({rule.reference}, n // {rule.divisor})), n = {rule.counts}"
    return text + (f"; 0 when n < {rule.zero_below}" if rule.zero_below else "")


def describe(name: str, value: int, n: int) -> dict:
    """What a report records about an ``auto`` size: the value, n and the rule."""
    return {"value": int(value), "n": int(n), "rule": rule_text(name)}


def resolve(name: str, value, n: int, chosen: dict | None = None) -> int:
    """``value`` as an int: ``auto`` resolved for ``n`` (and recorded in ``chosen``
    under ``name``), anything else converted."""
    if is_auto(value):
        size = auto_size(name, n)
        if chosen is not None:
            chosen[name] = describe(name, size, n)
        return size
    return int(value)


def too_large(involved: dict[str, object], n: int, counts: str = "training items", bound: str = "") -> str:
    """The one-line refusal of explicit values too large for the collection:
    names every param involved with its value (``None``: another stage's param
    that moves with it, not known here) and values that work (their ``auto``
    values for ``n``)."""
    given = ", ".join(f"{name}={value}" if value is not None else f"{name} (moves with it)"
                      for name, value in involved.items())
    works = " ".join(f"-S {name}={auto_size(name, n)}" for name in involved)
    rule = f"; must be {bound}" if bound else ""
    return (f"{given}: too large for the collection ({n} {counts}{rule}); values that work: {works} "
            f"(or {AUTO} for each)")


def median_side(shapes: np.ndarray) -> float:
    """Median longer side of images of shapes ``(n, 3)`` (height, width, channels)."""
    shapes = np.asarray(shapes).reshape(-1, 3)
    if len(shapes) == 0:
        raise InputError("auto input size: no images to measure")
    return float(np.median(shapes[:, :2].max(axis=1)))


def input_side(shapes: np.ndarray) -> int:
    """The ``auto`` input resolution (longer side, px) for images of these shapes."""
    return THUMBNAIL_INPUT if median_side(shapes) <= THUMBNAIL_SIDE else PHOTO_INPUT


def input_rule_text() -> str:
    return (f"{THUMBNAIL_INPUT} if the median longer side of the training images <= {THUMBNAIL_SIDE} px, "
            f"else {PHOTO_INPUT}")


def resolve_scales(name: str, scales: Sequence, shapes_of, chosen: dict | None = None) -> list[int]:
    """A list of scales where ``auto`` (alone) means ``[input_side(shapes_of())]``;
    ``shapes_of`` is called only then."""
    scales = list(scales)
    if not any(is_auto(scale) for scale in scales):
        return [int(scale) for scale in scales]
    if len(scales) != 1:
        raise InputError(f"{name}: auto stands alone (one resolution chosen from the images), got {scales}")
    shapes = shapes_of()
    side = input_side(shapes)
    if chosen is not None:
        chosen[name] = {"value": [side], "median_side": median_side(shapes), "rule": input_rule_text()}
    return [side]


def holdout_items(n: int, count: int, seed: int) -> np.ndarray:
    """Sorted positions of ``count`` of ``n`` items held out, deterministic in ``seed``."""
    if not 0 <= count < n:
        raise InputError(f"prepare.holdout={count}: must be between 0 and {n - 1} (the folder has {n} images)")
    rng = np.random.default_rng([int(seed), n, 17])
    return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)


def auto_values(n: int, names: Iterable[str] = RULES) -> dict[str, int]:
    """Every ``auto`` size for ``n`` (documentation, tests)."""
    return {name: auto_size(name, n) for name in names}
