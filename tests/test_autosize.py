"""mom/autosize.py: the one rule behind every ``auto`` size, checked against its
definition, against today's values on the embedded default, and for every
collection size from 50 to 1M images (each value fits the collection)."""
from __future__ import annotations

import numpy as np
import pytest

from mom import autosize
from mom.errors import InputError

# The embedded default: 6,000 training images of 28 x 28 px, every one an anchor.
DEFAULT_ITEMS = 6000
DEFAULT_VALUES = {"graph.k": 30, "anchors.count": 1500, "diffuse.k": 2000, "mine.k_neg": 2000, "mine.k_pos": 50,
                  "finetune.batch_size": 42}


def test_auto_on_the_embedded_default_gives_its_tuned_values():
    assert {name: autosize.auto_size(name, DEFAULT_ITEMS) for name in DEFAULT_VALUES} == DEFAULT_VALUES
    assert autosize.input_side(np.tile([28, 28, 1], (DEFAULT_ITEMS, 1))) == 64


@pytest.mark.parametrize("name", sorted(autosize.RULES))
def test_rule_against_its_definition(name):
    rule = autosize.RULES[name]
    for n in [50, 51, 99, 100, 149, 150, 1000, 5999, 6000, 20_000, 10**6]:
        expected = max(rule.floor, min(rule.reference, n // rule.divisor))
        assert autosize.auto_size(name, n) == expected, (name, n)


@pytest.mark.parametrize("n", [50, 60, 98, 1000, 20_000, 10**6])
def test_every_auto_value_fits_the_collection(n):
    values = autosize.auto_values(n)
    for name in autosize.BELOW_N:
        assert 1 <= values[name] < n, (name, values)
    assert values["mine.k_neg"] <= values["diffuse.k"]  # mine needs manifold neighbours that deep
    assert values["mine.k_pos"] <= values["diffuse.k"]
    assert values["mine.k_neg"] <= n // 2  # the authors' cap
    assert 2 <= values["prepare.holdout"] <= n // 5
    assert 1 <= values["anchors.count"] <= n


def test_holdout_is_zero_below_fifty_images_and_capped_at_a_thousand():
    assert autosize.auto_size("prepare.holdout", 49) == 0
    assert autosize.auto_size("prepare.holdout", 50) == 10
    assert autosize.auto_size("prepare.holdout", 10**6) == 1000


def test_too_small_a_collection_is_a_one_line_error():
    with pytest.raises(InputError, match=r"graph.k=auto: the collection has 4 training items"):
        autosize.auto_size("graph.k", 4)


def test_resolve_records_only_auto_values():
    chosen = {}
    assert autosize.resolve("graph.k", "auto", 60, chosen) == 12
    assert autosize.resolve("diffuse.k", 7, 60, chosen) == 7
    assert chosen == {"graph.k": {"value": 12, "n": 60, "rule": autosize.rule_text("graph.k")}}


def test_too_large_names_every_param_and_values_that_work():
    line = autosize.too_large({"diffuse.k": 2000, "mine.k_neg": None}, 97, bound="diffuse.k < 97 items")
    assert "\n" not in line
    assert "diffuse.k=2000" in line and "mine.k_neg" in line
    assert "-S diffuse.k=32 -S mine.k_neg=32" in line


@pytest.mark.parametrize("sides, expected", [([28], 64), ([28, 28, 300], 64), ([128], 64), ([129], 224),
                                             ([512, 384, 64], 224)])
def test_input_side_from_the_median_longer_side(sides, expected):
    shapes = np.array([[side, max(1, side // 2), 3] for side in sides])
    assert autosize.input_side(shapes) == expected


def test_scales_auto_stands_alone_and_reads_shapes_only_then():
    def never():
        raise AssertionError("shapes read for explicit scales")

    assert autosize.resolve_scales("extract.scales", [224, 317], never) == [224, 317]
    chosen = {}
    assert autosize.resolve_scales("extract.scales", ["auto"], lambda: np.array([[480, 640, 3]]), chosen) == [224]
    assert chosen["extract.scales"]["median_side"] == 640
    with pytest.raises(InputError, match="auto stands alone"):
        autosize.resolve_scales("extract.scales", ["auto", 64], never)


def test_holdout_items_are_deterministic_and_distinct():
    a = autosize.holdout_items(100, 20, seed=0)
    assert np.array_equal(a, autosize.holdout_items(100, 20, seed=0))
    assert len(set(a.tolist())) == 20 and np.all(np.diff(a) > 0) and a.max() < 100
    assert not np.array_equal(a, autosize.holdout_items(100, 20, seed=1))
    with pytest.raises(InputError, match="holdout"):
        autosize.holdout_items(10, 10, seed=0)
