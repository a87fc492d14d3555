"""mom.figures and stage ``pool_figure``: the qualitative pools figure on a tiny pool table."""
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from matplotlib.colors import to_hex

from mom import artifacts
from mom.figures import (OTHER_LABEL, SAME_LABEL, UNKNOWN_LABEL, border_colour, choose_anchors, pool_members,
                         pools_figure)
from mom.imagestore import write_image_store
from stages import pool_figure as pool_figure_stage

N = 12
LABELS = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int32)


def pools(rows: list[tuple[int, int, str, int]]) -> pa.Table:
    anchor, member, kind, rank = zip(*rows)
    return pa.table({"anchor": pa.array(anchor, pa.int64()), "member": pa.array(member, pa.int64()),
                     "kind": pa.array(kind, pa.string()), "rank": pa.array(rank, pa.int32()),
                     "manifold_similarity": pa.array([0.5] * len(rows), pa.float32()),
                     "euclidean_similarity": pa.array([0.4] * len(rows), pa.float32())})


# anchors 0 and 2 have all four pools; anchor 4 lacks baseline negatives. Rows are out of rank order on purpose.
OURS = pools([(0, 4, "positive", 2), (0, 1, "positive", 1), (0, 3, "negative", 1), (0, 8, "negative", 2),
              (2, 3, "positive", 1), (2, 5, "negative", 1), (4, 6, "positive", 1), (4, 7, "negative", 1)])
BASELINE = pools([(0, 2, "positive", 1), (0, 9, "negative", 1), (2, 7, "positive", 1), (2, 4, "negative", 1),
                  (2, 10, "negative", 2), (4, 8, "positive", 1)])


def images() -> list[np.ndarray]:
    return [np.full((6, 5, 1), 20 * i, dtype=np.uint8) for i in range(N)]


def image_axes(figure) -> list:
    return [axis for axis in figure.axes if axis.get_images()]


def spine_colour(axis) -> str:
    return to_hex(axis.spines["top"].get_edgecolor())


def test_border_colour_by_label_agreement():
    assert border_colour(3, 3) == SAME_LABEL
    assert border_colour(3, 4) == OTHER_LABEL
    assert border_colour(-1, 4) == border_colour(3, -1) == UNKNOWN_LABEL


def test_members_in_rank_order_and_anchor_choice():
    assert pool_members(OURS, 0, "positive", 5) == [1, 4]
    assert pool_members(OURS, 0, "positive", 1) == [1]
    assert pool_members(BASELINE, 4, "negative", 5) == []
    assert choose_anchors(OURS, BASELINE, 5, seed=0) == [0, 2]
    assert choose_anchors(OURS, BASELINE, 1, seed=3) == choose_anchors(OURS, BASELINE, 1, seed=3)
    assert choose_anchors(OURS, BASELINE, 1, seed=3)[0] in (0, 2)
    with pytest.raises(ValueError):
        choose_anchors(OURS, BASELINE.filter(pc.equal(BASELINE.column("kind"), "positive")), 2, 0)


def test_figure_panels_and_borders():
    members = 2
    figure = pools_figure(images(), LABELS, OURS, BASELINE, [0, 2], members)
    assert len(figure.axes) == 2 * (1 + 4 * members)
    shown = image_axes(figure)
    # anchor 0: itself + P+ {1, 4} + P- {3, 8} + NN {2} + random {9}; anchor 2: itself + 1 + 1 + 1 + 2
    assert len(shown) == 7 + 6
    grid = np.array(figure.axes, dtype=object).reshape(2, 1 + 4 * members)
    expected_members = {0: [1, 4, 3, 8, 2, None, 9, None], 2: [3, None, 5, None, 7, None, 4, 10]}
    for row, anchor in enumerate((0, 2)):
        assert grid[row, 0].get_images()[0].get_array()[0, 0] == 20 * anchor
        for slot, member in enumerate(expected_members[anchor]):
            axis = grid[row, 1 + slot]
            if member is None:
                assert not axis.get_images() and not axis.axison
                continue
            assert axis.get_images()[0].get_array()[0, 0] == 20 * member, (anchor, slot)
            expected = SAME_LABEL if LABELS[member] == LABELS[anchor] else OTHER_LABEL
            assert spine_colour(axis) == expected, (anchor, member)
    plt.close(figure)


def test_figure_without_labels_has_grey_borders():
    figure = pools_figure(images(), None, OURS, BASELINE, [0], 1)
    members = image_axes(figure)[1:]
    assert len(members) == 4 and {spine_colour(axis) for axis in members} == {UNKNOWN_LABEL}
    plt.close(figure)


def write_store(folder, labels) -> None:
    n = len(images())
    write_image_store(folder, images(), {"source": ["test"] * n, "split": ["train"] * n,
                                         "origin": [f"x#{i}" for i in range(n)],
                                         "label": list(labels) if labels is not None else [None] * n})


def save_cells(grid_dir, **cells) -> None:
    for cell, table in cells.items():
        artifacts.save_parquet(grid_dir / cell / "mine" / "pools.parquet", table)


@pytest.mark.parametrize("labelled", [True, False])
def test_stage_writes_a_png(tmp_path, labelled):
    write_store(tmp_path / "train", LABELS if labelled else None)
    save_cells(tmp_path / "grid", ours=OURS, base=BASELINE)
    args = ["--train", str(tmp_path / "train"), "--grid-dir", str(tmp_path / "grid"), "--ours", "ours",
            "--baseline", "base", "--out", str(tmp_path / "pools.png"), "--members", "2"]
    result = CliRunner().invoke(pool_figure_stage.main, args)
    assert result.exit_code == 0, result.output
    first = (tmp_path / "pools.png").read_bytes()
    assert first[:4] == b"\x89PNG"
    assert CliRunner().invoke(pool_figure_stage.main, args).exit_code == 0
    assert (tmp_path / "pools.png").read_bytes() == first, "same inputs, same bytes"


def test_stage_refuses_bad_options_and_pools(tmp_path):
    write_store(tmp_path / "train", LABELS)
    save_cells(tmp_path / "grid", ours=OURS, bad=pools([(0, N, "positive", 1)]))
    base = ["--train", str(tmp_path / "train"), "--grid-dir", str(tmp_path / "grid"), "--ours", "ours",
            "--out", str(tmp_path / "pools.png")]
    for extra, message in ((["--baseline", "ours", "--members", "0"], "--members"),
                           (["--baseline", "ours", "--anchors", "0"], "--anchors"),
                           (["--baseline", "ours", "--seed", "-1"], "--seed"),
                           (["--baseline", "../ours"], "--baseline: must be a grid cell name"),
                           (["--baseline", "bad"], "outside 0..11"),
                           (["--baseline", "missing"], "file not found")):
        result = CliRunner().invoke(pool_figure_stage.main, base + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    assert not (tmp_path / "pools.png").exists()
