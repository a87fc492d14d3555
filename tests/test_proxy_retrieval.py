"""The proxy retrieval benchmark: object choice, views and ground truth,
mAP of an oracle and of a hand-worked case, the in-memory store adapter, and
the stage command on a tiny image store."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mom import networks, whitening
from mom import proxy_retrieval as proxy
from mom.augment import augmented_views
from mom.extraction import embed_store
from mom.imagestore import ImageStore, write_image_store
from stages import proxy_retrieval as stage


def garments(n, seed=0, size=28):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = np.zeros((size, size, 1), dtype=np.uint8)
        top, left, bottom, right = rng.integers(2, 8), rng.integers(2, 8), rng.integers(20, 26), rng.integers(20, 26)
        image[top:bottom, left:right] = rng.integers(60, 250)
        image[rng.integers(0, size, 20), rng.integers(0, size, 20)] = 255
        images.append(image)
    return images


def write_store(folder, images):
    n = len(images)
    write_image_store(folder, images, {"source": ["synthetic"] * n, "split": ["test"] * n,
                                       "origin": [f"test#{i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
    return ImageStore.open(folder)


def test_select_objects():
    chosen = proxy.select_objects(100, 10, seed=0)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert np.all(np.diff(chosen) > 0) and chosen.min() >= 0 and chosen.max() < 100
    np.testing.assert_array_equal(chosen, proxy.select_objects(100, 10, seed=0))
    assert not np.array_equal(chosen, proxy.select_objects(100, 10, seed=1))
    np.testing.assert_array_equal(proxy.select_objects(5, 0, seed=0), np.arange(5))
    np.testing.assert_array_equal(proxy.select_objects(5, 9, seed=0), np.arange(5))


def test_benchmark_views_and_ground_truth():
    images = garments(6)
    items = np.array([1, 4, 5])
    views = 4
    benchmark = proxy.build_benchmark(images, items, "strong", views, seed=2)
    assert len(benchmark.queries) == 3 and len(benchmark.database) == 12
    for position, item in enumerate(items):
        expected = augmented_views(images[item], "strong", 2, item, range(views + 1))
        np.testing.assert_array_equal(benchmark.queries[position], expected[0])
        for view in range(views):
            np.testing.assert_array_equal(benchmark.database[position * views + view], expected[1 + view])
    positives = benchmark.positives
    for query, query_positives in enumerate(positives):
        # Exactly the query's own object's views; no junk, every other view a negative.
        np.testing.assert_array_equal(query_positives, np.arange(query * views, (query + 1) * views))


def test_views_do_not_depend_on_the_other_objects():
    images = garments(6)
    alone = proxy.build_benchmark(images, [4], "mild", 2, seed=0)
    together = proxy.build_benchmark(images, [0, 4], "mild", 2, seed=0)
    np.testing.assert_array_equal(alone.queries[0], together.queries[1])
    np.testing.assert_array_equal(alone.database[1], together.database[3])


def test_ground_truth_matches_brute_force_on_a_shuffled_database():
    rng = np.random.default_rng(0)
    database_object = rng.permutation(np.repeat(np.arange(7), 3))
    query_object = rng.integers(0, 9, size=12)  # objects 7 and 8 have no database view
    positives = proxy.ground_truth(query_object, database_object)
    for query, found in zip(query_object, positives):
        np.testing.assert_array_equal(found, [j for j in range(len(database_object)) if database_object[j] == query])


def test_oracle_embedding_scores_one():
    objects, views = 20, 4
    query_object = np.arange(objects)
    database_object = np.repeat(np.arange(objects), views)
    rng = np.random.default_rng(0)
    one_hot = np.eye(objects, dtype=np.float32)
    queries = one_hot[query_object]
    database = one_hot[database_object] + 0.01 * rng.standard_normal((objects * views, objects)).astype(np.float32)
    result = proxy.evaluate(queries, database, proxy.ground_truth(query_object, database_object), (1, 5, 10))
    assert result == {"map": pytest.approx(1.0), "mp_at_1": 1.0, "mp_at_5": 1.0, "mp_at_10": 1.0}


def test_hand_worked_case():
    # Two objects, two database views each: ids 0, 1 (object 0) and 2, 3 (object 1).
    database = np.eye(4, dtype=np.float32)
    queries = np.array([[4, 2, 3, 1],    # ranking 0, 2, 1, 3: positives at ranks 0 and 2
                        [1, 2, 4, 3]],   # ranking 2, 3, 1, 0: positives at ranks 0 and 1
                       dtype=np.float32)
    positives = proxy.ground_truth(np.array([0, 1]), np.array([0, 0, 1, 1]))
    result = proxy.evaluate(queries, database, positives, (1, 5))
    # Query 0, trapezoid AP: ((1 + 1) + (1/2 + 2/3)) / (2 * 2) = 19/24; query 1: AP 1.
    assert result["map"] == pytest.approx((19 / 24 + 1) / 2)
    assert result["mp_at_1"] == pytest.approx(1.0)
    # mP@5 (denominator min(k, rank of the last positive)): query 0 2/3, query 1 2/2.
    assert result["mp_at_5"] == pytest.approx((2 / 3 + 1) / 2)


def test_raw_pixel_descriptors():
    images = garments(3)
    descriptors = proxy.raw_pixel_descriptors(images)
    flat = np.stack([image.reshape(-1) for image in images]).astype(np.float64)
    np.testing.assert_allclose(descriptors, flat / np.linalg.norm(flat, axis=1, keepdims=True), rtol=1e-6)
    mixed = images[:2] + [np.zeros((10, 12, 3), np.uint8) + 9]
    with pytest.raises(ValueError, match="one shape"):
        proxy.raw_pixel_descriptors(mixed)
    resized = proxy.raw_pixel_descriptors(mixed, side=8)
    assert resized.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(resized, axis=1), 1.0, rtol=1e-6)


class MeanColour(nn.Module):
    """A stand-in network: l2-normalized mean of each channel plus the image's spatial variance."""

    def forward(self, x):
        out = torch.cat([x.mean(dim=(2, 3)), x.var(dim=(2, 3))], dim=1)
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def test_view_store_embeds_like_an_image_store(tmp_path):
    images = garments(5) + [np.full((14, 20, 3), 90, np.uint8)]
    store = write_store(tmp_path / "store", images)
    np.testing.assert_array_equal(proxy.ViewStore(images).shapes, store.shapes)
    from_views = embed_store(MeanColour(), proxy.ViewStore(images), (16, 24), batch_size=2, progress=False)
    from_store = embed_store(MeanColour(), store, (16, 24), batch_size=2, progress=False)
    np.testing.assert_array_equal(from_views, from_store)


# --------------------------------------------------------------------------
# The stage command.


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    write_store(root / "new_images", garments(10))
    write_store(root / "new_classes", garments(8))
    (root / "report.json").write_text("{}")
    # A "fine-tuned" checkpoint that is the pretrained network itself, with an
    # identity whitening: its rows must equal the initial ones.
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0))
    networks.save_checkpoint(root / "model.pt", net, extra={"embedding": {"scales": [32], "aggregation": "sum"}})
    whitening.save_whitening(root / "whitening.npz", *whitening.identity_whitening(net.dim), method="none")
    return root


def run_stage(root, *extra):
    args = ["--prepared", str(root), "--objects", "6", "--scales", "32", "--batch_size", "16",
            "--plots-dir", str(root / "plots"), *extra]
    return CliRunner().invoke(stage.main, args, catch_exceptions=False)


def test_stage_without_a_model(workspace):
    out = workspace / "plain.json"
    result = run_stage(workspace, "--model", "", "--whitening", "", "--report", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert "PROXY" in metrics["note"] and "not Oxford/Paris" in metrics["note"]
    for split in ("new_images", "new_classes"):
        section = metrics[split]
        assert (section["objects"], section["queries"], section["database"]) == (6, 6, 24)
        assert set(section["levels"]) == {"strong", "mild"}
        for level in section["levels"].values():
            assert set(level) == {"raw_pixels", "initial"}
            for row in level.values():
                assert set(row) == {"map", "mp_at_1", "mp_at_5", "mp_at_10"}
                assert all(0.0 <= value <= 1.0 for value in row.values())
    # the same objects and views whatever else is benchmarked: new_images alone gives the same numbers
    alone = workspace / "alone"
    alone.mkdir(exist_ok=True)
    (alone / "report.json").write_text("{}")
    if not (alone / "new_images").exists():
        (alone / "new_images").symlink_to(workspace / "new_images")
    result = CliRunner().invoke(stage.main, ["--prepared", str(alone), "--objects", "6", "--scales", "32",
                                             "--batch_size", "16", "--model", "", "--whitening", "",
                                             "--plots-dir", "", "--report", str(alone / "m.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((alone / "m.json").read_text())["new_images"] == metrics["new_images"]
    assert "new_classes" not in json.loads((alone / "m.json").read_text())


def test_stage_with_model_and_whitening_is_deterministic(workspace):
    paths = [workspace / "a.json", workspace / "b.json"]
    for path in paths:
        result = run_stage(workspace, "--model", str(workspace / "model.pt"), "--whitening",
                           str(workspace / "whitening.npz"), "--levels", "mild", "--no-raw_pixels",
                           "--report", str(path))
        assert result.exit_code == 0, result.output
    assert paths[0].read_bytes() == paths[1].read_bytes()
    metrics = json.loads(paths[0].read_text())
    for split in ("new_images", "new_classes"):  # the plot data: one bar per level and descriptor
        bars = json.loads((workspace / "plots" / "proxy_map" / f"{split}.json").read_text())["proxy_map"]
        assert bars == [{"bar": f"mild: {name}", "map": entry["map"]}
                        for name, entry in metrics[split]["levels"]["mild"].items()]
    rows = metrics["new_classes"]["levels"]["mild"]
    assert set(rows) == {"initial", "finetuned", "finetuned_whitened"}
    assert rows["finetuned"] == rows["initial"] == rows["finetuned_whitened"]
    assert metrics["settings"]["finetuned"]["whitening"]["method"] == "none"
    # --no-initial (the grid's cells): the same fine-tuned rows, without the initial network's
    skipped = workspace / "no_initial.json"
    result = run_stage(workspace, "--model", str(workspace / "model.pt"), "--whitening",
                       str(workspace / "whitening.npz"), "--levels", "mild", "--no-raw_pixels", "--no-initial",
                       "--report", str(skipped))
    assert result.exit_code == 0, result.output
    for split in ("new_images", "new_classes"):
        expected = {name: row for name, row in metrics[split]["levels"]["mild"].items() if name != "initial"}
        assert json.loads(skipped.read_text())[split]["levels"]["mild"] == expected


def test_stage_skips_when_prepare_wrote_no_evaluation_split(workspace):
    prepared = workspace / "retrieval-prepared"
    (prepared / "query").mkdir(parents=True)
    (prepared / "report.json").write_text("{}")
    out = workspace / "skipped.json"
    result = CliRunner().invoke(stage.main, ["--prepared", str(prepared), "--model", "", "--whitening", "",
                                             "--report", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert "PROXY" in metrics["note"] and "no evaluation split" in metrics["skipped"]
    assert "new_images" not in metrics and "new_classes" not in metrics
    # Without prepare's report the folder is not prepare's output: an error, not a skip.
    result = CliRunner().invoke(stage.main, ["--prepared", str(workspace / "nowhere"), "--model", "",
                                             "--whitening", "", "--report", str(out)])
    assert result.exit_code == 2 and "file not found" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--objects", "1"], "--objects"),
    (["--levels", "medium"], "--levels"),
    (["--views_in_database", "0"], "--views_in_database"),
    (["--precision_ks", "0"], "--precision_ks"),
    (["--backbone", "alexnet"], "--backbone"),
    (["--whitening", "w.npz", "--model", ""], "--whitening"),
    (["--no-initial", "--no-raw_pixels"], "nothing to rank"),
])
def test_stage_rejects_bad_options_in_one_line(workspace, extra, message):
    result = CliRunner().invoke(stage.main, ["--prepared", str(workspace), "--model", "", "--whitening", "",
                                             "--report", str(workspace / "never.json"), *extra])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxy_retrieval: error: ") and message in lines[0]
    assert not (workspace / "never.json").exists()


def test_objects_is_a_cap_on_a_smaller_split(workspace):
    out = workspace / "capped.json"
    result = CliRunner().invoke(stage.main, ["--prepared", str(workspace), "--model", "", "--whitening", "",
                                             "--report", str(out), "--plots-dir", "", "--objects", "500",
                                             "--levels", "mild", "--views_in_database", "1", "--no-raw_pixels"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["new_images"]["objects"] == 10  # every item of the 10-item split
