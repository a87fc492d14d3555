"""The four mining stages end to end on a small banana collection (click, in-process)."""
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from banana import banana_features
from mom import artifacts
from mom.imagestore import write_image_store
from stages import anchors as anchors_stage
from stages import diffuse as diffuse_stage
from stages import graph as graph_stage
from stages import mine as mine_stage


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    features, curve, _ = banana_features(n_per_curve=100, n_curves=3)
    artifacts.save_npy(root / "features.npy", features)
    n = len(features)
    labels = [int(c) if item % 10 else None for item, c in enumerate(curve)]  # some unknown labels
    write_image_store(root / "prepared", (np.zeros((2, 2), np.uint8) for _ in range(n)),
                      {"source": ["banana"] * n, "split": ["train"] * n, "origin": [str(i) for i in range(n)],
                       "label": labels})
    return root, curve


def run(command, args):
    result = CliRunner().invoke(command.main, [str(arg) for arg in args], catch_exceptions=False)
    return result


def run_pipeline(root, out, mine_args=()):
    assert run(graph_stage, ["--k", 10, "--features", root / "features.npy", "--out-dir", out / "graph"]).exit_code == 0
    assert run(anchors_stage, ["--strategy", "all", "--graph", out / "graph/adjacency.npz",
                               "--out-dir", out / "anchors"]).exit_code == 0
    assert run(diffuse_stage, ["--k", 60, "--graph", out / "graph/adjacency.npz",
                               "--anchors", out / "anchors/anchors.parquet", "--out-dir", out / "diffuse"]).exit_code == 0
    result = run(mine_stage, ["--k_pos", 20, "--k_neg", 60, *mine_args, "--features", root / "features.npy",
                              "--anchors", out / "anchors/anchors.parquet",
                              "--manifold", out / "diffuse/manifold_knn.parquet",
                              "--prepared", root / "prepared", "--out-dir", out / "mine"])
    assert result.exit_code == 0, result.output


def test_stages_write_contracted_outputs_deterministically(collection, tmp_path):
    root, curve = collection
    for run_name in ("a", "b"):
        run_pipeline(root, tmp_path / run_name)
    for name in ("graph/adjacency.npz", "graph/knn.parquet", "graph/report.json", "anchors/anchors.parquet",
                 "diffuse/manifold_knn.parquet", "diffuse/report.json", "mine/pools.parquet", "mine/purity.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    out = tmp_path / "a"
    knn = pq.read_table(out / "graph/knn.parquet")
    assert [str(t) for t in knn.schema.types] == ["int64", "int64", "int32", "float"]
    assert len(knn) == 300 * 9 and knn.column("rank").to_numpy().min() == 1
    report = json.loads((out / "graph/report.json").read_text())
    assert report["convention"]["other_neighbours_per_item"] == 9 and report["search"]["method"] == "exact"
    anchors = pq.read_table(out / "anchors/anchors.parquet")
    assert anchors.column_names == ["item", "probability", "rank", "strategy"] and len(anchors) == 300
    manifold = pq.read_table(out / "diffuse/manifold_knn.parquet")
    assert manifold.column_names == ["anchor", "neighbour", "rank", "similarity"]
    assert (manifold.column("anchor").to_numpy() != manifold.column("neighbour").to_numpy()).all()
    pools = pq.read_table(out / "mine/pools.parquet")
    assert pools.column_names == ["anchor", "member", "kind", "rank", "manifold_similarity", "euclidean_similarity"]
    positives = pools.filter(pc.equal(pools.column("kind"), "positive"))
    assert positives.column("manifold_similarity").null_count == 0
    assert (curve[positives.column("anchor").to_numpy()] == curve[positives.column("member").to_numpy()]).all()
    purity = json.loads((out / "mine/purity.json").read_text())
    assert purity["manifold_positives"]["purity"] == 1.0
    assert purity["manifold_negatives"]["purity"] > purity["random_negatives"]["purity"] - 0.5
    assert purity["written"] == {"positives": "manifold", "negatives": "manifold"}


def test_baseline_variants_are_written_on_request(collection, tmp_path):
    root, _ = collection
    run_pipeline(root, tmp_path, ["--positives", "euclidean", "--negatives", "random"])
    pools = pq.read_table(tmp_path / "mine/pools.parquet")
    positives = pools.filter(pc.equal(pools.column("kind"), "positive"))
    negatives = pools.filter(pc.equal(pools.column("kind"), "negative"))
    assert len(positives) == 300 * 5 and len(negatives) == 300 * 50
    purity = json.loads((tmp_path / "mine/purity.json").read_text())
    assert purity["written"] == {"positives": "euclidean", "negatives": "random"}


def test_errors_are_one_line(collection, tmp_path):
    root, _ = collection
    features = artifacts.load_npy(root / "features.npy").copy()
    features[[4, 9]] = np.nan
    artifacts.save_npy(tmp_path / "bad.npy", features)
    result = run(graph_stage, ["--features", tmp_path / "bad.npy", "--out-dir", tmp_path / "graph"])
    assert result.exit_code == 2 and "rows 4, 9" in result.output
    assert not (tmp_path / "graph").exists()
    result = run(graph_stage, ["--k", 300, "--features", root / "features.npy", "--out-dir", tmp_path / "graph"])
    assert result.exit_code == 2 and "k=300" in result.output
    run_pipeline(root, tmp_path / "ok")
    result = run(mine_stage, ["--k_neg", 100, "--features", root / "features.npy",
                              "--anchors", tmp_path / "ok/anchors/anchors.parquet",
                              "--manifold", tmp_path / "ok/diffuse/manifold_knn.parquet",
                              "--prepared", root / "prepared", "--out-dir", tmp_path / "mine"])
    assert result.exit_code == 2 and "diffuse.k" in result.output


def test_truncated_diffusion_reports_agreement(collection, tmp_path):
    root, _ = collection
    run_pipeline(root, tmp_path)
    result = run(diffuse_stage, ["--k", 60, "--truncate", 120, "--agreement_sample", 20,
                                 "--features", root / "features.npy", "--graph", tmp_path / "graph/adjacency.npz",
                                 "--anchors", tmp_path / "anchors/anchors.parquet", "--out-dir", tmp_path / "trunc"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "trunc/report.json").read_text())
    assert report["truncation"]["sample"] == 20 and 0.5 < report["truncation"]["agreement_at_k"] <= 1


def test_graph_stage_reports_recall_of_approximate_search(collection, tmp_path):
    root, _ = collection
    result = run(graph_stage, ["--k", 10, "--search", "hnsw", "--recall_sample", 50, "--threads", 1,
                               "--features", root / "features.npy", "--out-dir", tmp_path])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["search"]["method"] == "hnsw" and report["search"]["recall_sample"] == 50
    assert 0.9 <= report["search"]["recall_at_k"] <= 1


def test_graph_device_cuda_without_a_gpu_is_one_line(collection, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_stage.faiss, "get_num_gpus", lambda: 0, raising=False)
    root, _ = collection
    result = CliRunner().invoke(graph_stage.main, [str(arg) for arg in ["--device", "cuda", "--features",
                                                   root / "features.npy", "--out-dir", tmp_path / "graph"]])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graph: error: device: cuda needs the GPU build of faiss"), lines
    assert not (tmp_path / "graph").exists()


def test_graph_device_auto_without_a_gpu_writes_the_cpu_bytes(collection, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_stage.faiss, "get_num_gpus", lambda: 0, raising=False)
    root, _ = collection
    for device in ("cpu", "auto"):
        result = run(graph_stage, ["--k", 10, "--device", device, "--features", root / "features.npy",
                                   "--out-dir", tmp_path / device])
        assert result.exit_code == 0, result.output
    for name in ("adjacency.npz", "knn.parquet", "report.json"):
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes(), name
    assert json.loads((tmp_path / "auto/report.json").read_text())["search"]["device"] == "cpu"
