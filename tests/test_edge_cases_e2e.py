"""Numerical edge cases end to end (issue 8): graph -> anchors -> diffuse ->
mine chained on the same small synthetic collection (click, in-process), for
collections with exact duplicates, items without a reciprocal neighbour,
several connected components, identical (constant-image) and all-zero
features, and NaN/inf features. Each either runs through, with every numeric
value of every output finite, or stops with one line ``stage: error: ...``
(exit status 2) naming the rows. The per-function cases are in
tests/test_graph.py, test_anchors.py, test_diffusion.py and test_pools.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mom import artifacts
from mom.imagestore import write_image_store
from mom.training_log import read_training_log
from stages import anchors as anchors_stage
from stages import diffuse as diffuse_stage
from stages import graph as graph_stage
from stages import mine as mine_stage

DIM = 8
K = 5  # graph neighbours (the item counts itself): smaller than every cluster, so clusters are components
# mine.k_neg = diffuse.k = 6 is below every component's size (the smallest,
# of exact duplicates, has 9 items): diffuse lists only items with s_m > 0,
# so a component smaller than k_neg cannot fill it (a test below)


def normalized(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clusters(n_clusters: int, per_cluster: int, seed: int, spread: float = 0.05) -> np.ndarray:
    """Tight clusters around orthogonal directions, in order: no graph edge
    between two clusters (a cluster may still split into components)."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(np.eye(DIM)[:n_clusters], per_cluster, axis=0)
    return normalized(centres + spread * rng.normal(size=centres.shape))


def with_duplicates() -> np.ndarray:
    base = clusters(2, 12, seed=1)
    return np.concatenate([base, base[:6], base[:3]])  # rows 0-2 three times, 3-5 twice


def with_outliers() -> np.ndarray:
    """Two clusters and two far-off items between them: each outlier's k nearest
    are cluster items that are nearer to each other, so no edge reaches it."""
    base = clusters(2, 12, seed=2)
    rng = np.random.default_rng(3)
    outliers = normalized(np.eye(DIM)[[2, 3]] + 0.3 * np.eye(DIM)[0] + 0.01 * rng.normal(size=(2, DIM)))
    return np.concatenate([base, outliers])


def several_components() -> np.ndarray:
    return clusters(4, 8, seed=4)


def constant_images() -> np.ndarray:
    """What extract gives for all-zero images: every row the same vector."""
    return np.tile(normalized(np.ones((1, DIM))), (20, 1))


def half_constant() -> np.ndarray:
    """A real collection plus a block of identical rows (blank images in it)."""
    return np.concatenate([clusters(2, 10, seed=5), np.tile(normalized(np.ones((1, DIM))), (8, 1))])


def zero_rows() -> np.ndarray:
    """Rows of zeros (a descriptor that could not be normalized): similarity 0 to all."""
    features = clusters(2, 12, seed=6)
    features[[3, 17]] = 0
    return features


COLLECTIONS = {"duplicates": with_duplicates, "no_reciprocal_neighbour": with_outliers,
               "components": several_components, "constant_block": half_constant, "zero_rows": zero_rows}


def run(stage, args):
    return CliRunner().invoke(stage.main, [str(arg) for arg in args], catch_exceptions=False)


def write_collection(folder: Path, features: np.ndarray) -> None:
    n = len(features)
    artifacts.save_npy(folder / "features.npy", features)
    write_image_store(folder / "prepared", (np.zeros((2, 2), np.uint8) for _ in range(n)),
                      {"source": ["edge"] * n, "split": ["train"] * n, "origin": [str(i) for i in range(n)],
                       "label": [i % 2 for i in range(n)]})


def mining_steps(folder: Path, k_neg: int = 6):
    """(stage, args) of the four mining stages on ``folder``'s collection."""
    out = folder / "out"
    return [
        (graph_stage, ["--k", K, "--features", folder / "features.npy", "--out-dir", out / "graph"]),
        (anchors_stage, ["--strategy", "all", "--graph", out / "graph/adjacency.npz", "--out-dir", out / "anchors"]),
        (diffuse_stage, ["--k", k_neg, "--graph", out / "graph/adjacency.npz", "--features", folder / "features.npy",
                         "--anchors", out / "anchors/anchors.parquet", "--out-dir", out / "diffuse"]),
        (mine_stage, ["--k_pos", 3, "--k_neg", k_neg, "--positive_cap", 4, "--negative_cap", 4,
                      "--features", folder / "features.npy", "--anchors", out / "anchors/anchors.parquet",
                      "--manifold", out / "diffuse/manifold_knn.parquet", "--prepared", folder / "prepared",
                      "--out-dir", out / "mine"]),
    ]


def run_mining(folder: Path, features: np.ndarray, stages: int = 4) -> Path:
    write_collection(folder, features)
    for stage, args in mining_steps(folder)[:stages]:
        result = run(stage, args)
        assert result.exit_code == 0, f"{stage.__name__}: {result.output}"
    return folder / "out"


# ------------------------------------------------------------ finiteness of outputs


def non_finite_in_json(value, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in non_finite_in_json(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [bad for index, item in enumerate(value) for bad in non_finite_in_json(item, f"{where}[{index}]")]
    return [where] if isinstance(value, float) and not np.isfinite(value) else []


def non_finite_values(path: Path) -> list[str]:
    """Where ``path`` (Parquet, NPY, NPZ or JSON) holds NaN or inf (nulls are allowed)."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return [name for name, column in zip(table.column_names, table.columns)
                if pa.types.is_floating(column.type)
                and (pc.any(pc.is_nan(column)).as_py() or pc.any(pc.is_inf(column)).as_py())]
    if path.suffix == ".npy":
        return [] if np.isfinite(np.load(path, allow_pickle=False)).all() else [path.name]
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return [name for name in archive.files
                    if np.issubdtype(archive[name].dtype, np.floating) and not np.isfinite(archive[name]).all()]
    if path.suffix == ".json":
        return non_finite_in_json(json.loads(path.read_text()))
    raise AssertionError(f"unexpected output {path}")


def assert_all_outputs_finite(out: Path, count: int = 9) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == count, files  # graph 3, anchors 2 (parquet, report), diffuse 2, mine 2
    bad = {str(p.relative_to(out)): non_finite_values(p) for p in files}
    assert not any(bad.values()), bad


def test_the_finiteness_check_can_fail(tmp_path):
    artifacts.save_npy(tmp_path / "a.npy", np.array([1.0, np.nan], np.float32))
    pq.write_table(pa.table({"x": pa.array([1.0, None, np.inf])}), tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text('{"a": [1.0, {"b": NaN}]}')
    assert non_finite_values(tmp_path / "a.npy") == ["a.npy"]
    assert non_finite_values(tmp_path / "b.parquet") == ["x"]
    assert non_finite_values(tmp_path / "c.json") == [".a[1].b"]


# ------------------------------------------------------------ runs through


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """Every collection of COLLECTIONS through the four stages: name -> output folder."""
    return {name: run_mining(tmp_path_factory.mktemp(name), make()) for name, make in COLLECTIONS.items()}


def tables_without_pools(out: Path) -> dict:
    return {"knn": pq.read_table(out / "graph/knn.parquet").to_pydict(),
            "anchors": pq.read_table(out / "anchors/anchors.parquet").to_pydict(),
            "manifold": pq.read_table(out / "diffuse/manifold_knn.parquet").to_pydict(),
            "graph": json.loads((out / "graph/report.json").read_text())}


def tables(out: Path) -> dict:
    return {**tables_without_pools(out), "pools": pq.read_table(out / "mine/pools.parquet").to_pydict()}


@pytest.mark.parametrize("name", COLLECTIONS)
def test_every_output_is_finite(mined, name):
    assert_all_outputs_finite(mined[name])


def test_duplicates_are_each_others_nearest_and_mine_runs(mined):
    t = tables(mined["duplicates"])
    knn = {(i, j): s for i, j, s in zip(t["knn"]["item"], t["knn"]["neighbour"], t["knn"]["similarity"])}
    for copy, original in ((24, 0), (30, 0), (27, 3)):
        assert knn.get((copy, original), knn.get((original, copy))) == pytest.approx(1.0, abs=1e-5)
    adjacency = artifacts.load_csr(mined["duplicates"] / "graph/adjacency.npz")
    assert adjacency.diagonal().max() == 0 and (adjacency != adjacency.T).nnz == 0
    assert len(t["pools"]["anchor"]) > 0


def test_items_without_reciprocal_neighbour_are_isolated_with_zero_probability_and_empty_pools(mined):
    t = tables(mined["no_reciprocal_neighbour"])
    adjacency = artifacts.load_csr(mined["no_reciprocal_neighbour"] / "graph/adjacency.npz")
    isolated = set(np.flatnonzero(adjacency.getnnz(axis=1) == 0).tolist())
    assert {24, 25} <= isolated and t["graph"]["isolated_nodes"] == len(isolated)
    probability = dict(zip(t["anchors"]["item"], t["anchors"]["probability"]))
    assert all(probability[item] == 0 for item in isolated)
    assert sum(probability.values()) == pytest.approx(1.0)
    # Diffusion from an isolated anchor reaches nothing: no manifold neighbours, no positives.
    assert not isolated & set(t["manifold"]["anchor"])
    positives = {a for a, kind in zip(t["pools"]["anchor"], t["pools"]["kind"]) if kind == "positive"}
    assert not isolated & positives
    assert set(t["pools"]["anchor"]) - isolated, "the connected items get pools"


def test_several_components_keep_manifold_neighbours_inside_their_component(mined):
    t = tables(mined["components"])
    assert t["graph"]["components"]["count"] >= 4  # a cluster may split further
    component = lambda item: item // 8  # noqa: E731 (clusters of 8, in order)
    pairs = list(zip(t["manifold"]["anchor"], t["manifold"]["neighbour"]))
    assert pairs and all(component(a) == component(b) for a, b in pairs)
    assert all(s > 0 for s in t["manifold"]["similarity"])


def test_a_block_of_constant_images_joins_the_graph_finitely(mined):
    t = tables(mined["constant_block"])
    blank = set(range(20, 28))
    similarity = {(i, j): s for i, j, s in zip(t["knn"]["item"], t["knn"]["neighbour"], t["knn"]["similarity"])}
    assert all(s == pytest.approx(1.0, abs=1e-5) for (i, j), s in similarity.items() if i in blank and j in blank)
    adjacency = artifacts.load_csr(mined["constant_block"] / "graph/adjacency.npz")
    assert adjacency.diagonal().max() == 0 and (adjacency != adjacency.T).nnz == 0
    assert sum(t["anchors"]["probability"]) == pytest.approx(1.0)


def test_a_collection_of_constant_images_is_refused_by_mine_in_one_line(tmp_path):
    """All rows equal: every similarity ties at 1, the neighbour search breaks
    ties by item id, so the first K items form the one clique and the rest are
    isolated; no anchor can have k_neg manifold neighbours and mine says so
    (naming the options) instead of mining from ties. Earlier outputs finite."""
    out = run_mining(tmp_path, constant_images(), stages=3)
    assert_all_outputs_finite(out, count=7)  # graph 3, anchors 2, diffuse 2
    t = tables_without_pools(out)
    assert t["graph"]["isolated_nodes"] == 20 - K and t["graph"]["components"]["count_without_isolated"] == 1
    assert sum(t["anchors"]["probability"]) == pytest.approx(1.0)
    stage, args = mining_steps(tmp_path)[3]
    line = one_line_error(run(stage, args), "mine")
    assert "diffuse.k" in line and "mine.k_neg" in line and "graph component" in line
    assert not (out / "mine").exists()


def test_components_smaller_than_k_neg_are_refused_by_mine_in_one_line(tmp_path):
    """diffuse.k = 12 (enough), k_neg = largest component size: refused;
    one less: mined."""
    write_collection(tmp_path, several_components())
    for stage, args in mining_steps(tmp_path, k_neg=12)[:3]:
        assert run(stage, args).exit_code == 0
    largest = json.loads((tmp_path / "out/graph/report.json").read_text())["components"]["largest"]
    assert largest < 12
    stage, args = mining_steps(tmp_path, k_neg=largest)[3]
    line = one_line_error(run(stage, args), "mine")
    assert f"at most {largest - 1} manifold neighbours" in line and f"at most {largest} items" in line
    stage, args = mining_steps(tmp_path, k_neg=largest - 1)[3]
    assert run(stage, args).exit_code == 0
    assert_all_outputs_finite(tmp_path / "out")


def test_zero_rows_are_isolated(mined):
    adjacency = artifacts.load_csr(mined["zero_rows"] / "graph/adjacency.npz")
    degree = adjacency.getnnz(axis=1)
    assert degree[3] == 0 and degree[17] == 0


# ------------------------------------------------------------ refused in one line


def one_line_error(result, stage_name: str) -> str:
    """The error line (the output may also hold an erased progress bar)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "\r" not in line and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{stage_name}: error: "), result.output
    return lines[0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_stop_the_graph_naming_the_rows(tmp_path, value):
    features = clusters(2, 10, seed=7)
    features[4, 2] = value
    features[13, 0] = value
    write_collection(tmp_path, features)
    stage, args = mining_steps(tmp_path)[0]
    line = one_line_error(run(stage, args), "graph")
    assert "rows 4, 13" in line and "NaN or inf" in line
    assert not (tmp_path / "out").exists()


def test_non_finite_features_after_the_graph_stop_diffuse_and_mine(tmp_path):
    """Features replaced between stages (a stale or corrupted train.npy):
    mine, and diffuse when it reads them (--truncate), check them first."""
    features = clusters(2, 10, seed=8)
    run_mining(tmp_path, features)
    features[6] = np.nan
    artifacts.save_npy(tmp_path / "features.npy", features)
    steps = mining_steps(tmp_path)
    diffuse_args = [*steps[2][1], "--truncate", 10, "--agreement_sample", 0]
    assert "rows 6" in one_line_error(run(diffuse_stage, diffuse_args), "diffuse")
    assert "rows 6" in one_line_error(run(mine_stage, steps[3][1]), "mine")


def test_non_finite_features_outside_the_anchors_never_reach_the_pools(tmp_path):
    """Only some items are anchors (stationary strategy) and a non-anchor row
    turns NaN after the graph: mine searches all rows for Euclidean neighbours,
    so it checks all (it checked only the anchor rows, and a NaN
    euclidean_similarity reached pools.parquet)."""
    features = clusters(2, 10, seed=9)
    write_collection(tmp_path, features)
    steps = mining_steps(tmp_path)
    steps[1] = (anchors_stage, ["--strategy", "stationary", "--count", 4, *steps[1][1][2:]])
    for stage, args in steps[:3]:
        assert run(stage, args).exit_code == 0
    anchors = set(pq.read_table(tmp_path / "out/anchors/anchors.parquet").column("item").to_pylist())
    victim = min(set(range(20)) - anchors)
    features[victim] = np.nan
    artifacts.save_npy(tmp_path / "features.npy", features)
    assert f"rows {victim};" in one_line_error(run(mine_stage, steps[3][1]), "mine")
    assert not (tmp_path / "out/mine").exists()


# ------------------------------------------------------------ one epoch of fine-tuning


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_one_epoch_on_pools_with_constant_images_stays_finite(mined, tmp_path, loss):
    """The constant_block collection's pools, over images whose last 8 are
    all-zero pixels (identical embeddings: zero distances in the loss)."""
    import torch

    from stages import finetune as finetune_stage

    out = mined["constant_block"]
    n = 28
    rng = np.random.default_rng(10)
    images = [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) if item < 20 else np.zeros((28, 28), np.uint8)
              for item in range(n)]
    write_image_store(tmp_path / "train", images, {"source": ["edge"] * n, "split": ["train"] * n,
                                                   "origin": [str(i) for i in range(n)]})
    blank_anchors = {a for a, m in zip(*pq.read_table(out / "mine/pools.parquet", columns=["anchor", "member"])
                                       .to_pydict().values()) if a >= 20 or m >= 20}
    assert blank_anchors, "the pools do not involve the constant images"
    result = run(finetune_stage, [
        "--train", tmp_path / "train", "--val", tmp_path / "no-val", "--no-validate",
        "--pools", out / "mine/pools.parquet", "--anchors", out / "anchors/anchors.parquet",
        "--out-dir", tmp_path / "finetune", "--checkpoint-dir", tmp_path / "ckpt", "--loss", loss,
        "--image_size", 32, "--scales", 32, "--trainable_blocks", 1, "--head_init", "random", "--epochs", 1,
        "--batch_size", 4, "--lr", 0.05, "--threads", 1])
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "finetune/model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    assert non_finite_values(tmp_path / "finetune/summary.json") == []
    rows = read_training_log(tmp_path / "finetune/live")
    assert len(rows) == 1 and all(math.isfinite(value) for value in rows[0].values()), rows
