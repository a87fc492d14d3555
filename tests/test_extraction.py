"""embed_store: rows follow the manifest, per-image definition, subsets, determinism, multi-scale."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mom import extraction
from mom.imagestore import ImageStore, write_image_store
from mom.networks import build_network, make_meta

RNG = np.random.default_rng(0)
GRAY = [RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(10)]


def make_store(folder, images) -> ImageStore:
    n = len(images)
    write_image_store(folder, images, {"source": ["t"] * n, "split": ["train"] * n, "origin": [str(i) for i in range(n)]})
    return ImageStore.open(folder)


@pytest.fixture(scope="module")
def net():
    return build_network(make_meta("efficientnet_lite0", "gem", 3.0))


def embed_one(net, image: np.ndarray, scale: int) -> torch.Tensor:
    """The definition, one image at a time: 3-channel float pixels, longer side
    resized to ``scale`` (bilinear, antialiased), through the network."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    size = extraction.resized_size(image.shape[0], image.shape[1], scale)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    x = x.repeat(1, 3 // x.shape[1], 1, 1)
    with torch.inference_mode():
        return net(x)[0]


def test_resized_size_keeps_aspect():
    assert extraction.resized_size(28, 28, 64) == (64, 64)
    assert extraction.resized_size(20, 30, 64) == (43, 64)
    assert extraction.resized_size(30, 20, 64) == (64, 43)
    assert extraction.resized_size(1, 500, 64) == (1, 64)


def test_rows_follow_the_manifest_and_the_definition(tmp_path, net):
    images = GRAY[:6] + [RNG.integers(0, 256, shape, dtype=np.uint8) for shape in [(20, 30, 3), (30, 20, 3), (20, 30, 1)]]
    store = make_store(tmp_path / "a", images)
    features = extraction.embed_store(net, store, [32], batch_size=4, progress=False)
    assert features.dtype == np.float32 and features.shape == (len(images), 1280)
    for row, image in enumerate(images):
        assert np.allclose(features[row], embed_one(net, image, 32).numpy(), atol=1e-5), row
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)

    order = RNG.permutation(len(images))
    shuffled = make_store(tmp_path / "b", [images[i] for i in order])
    assert np.allclose(extraction.embed_store(net, shuffled, [32], batch_size=3, progress=False), features[order], atol=1e-5)


class ListStore:
    """The minimal store API (len, getitem): no manifest shapes."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_minimal_store_api(tmp_path, net):
    images = GRAY[:3] + [RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)]
    expected = extraction.embed_store(net, make_store(tmp_path / "s", images), [32], progress=False)
    assert np.allclose(extraction.embed_store(net, ListStore(images), [32], progress=False), expected, atol=1e-6)


def test_index_subsets(tmp_path, net):
    store = make_store(tmp_path / "s", GRAY)
    full = extraction.embed_store(net, store, [32], batch_size=4, progress=False)
    subset = [7, 2, 2, 9]
    assert np.allclose(extraction.embed_store(net, store, [32], batch_size=4, indices=subset, progress=False),
                       full[subset], atol=1e-5)
    empty = extraction.embed_store(net, store, [32], indices=[], progress=False)
    assert empty.shape == (0, 1280)
    with pytest.raises(IndexError):
        extraction.embed_store(net, store, [32], indices=[10], progress=False)


def test_same_bytes_twice(tmp_path, net):
    store = make_store(tmp_path / "s", GRAY[:6])
    first = extraction.embed_store(net, store, [32, 48], batch_size=4, progress=False)
    second = extraction.embed_store(net, store, [32, 48], batch_size=4, progress=False)
    assert first.tobytes() == second.tobytes()


def test_multi_scale_aggregation(tmp_path, net):
    store = make_store(tmp_path / "s", GRAY[:5])
    small, large = (extraction.embed_store(net, store, [s], batch_size=8, progress=False).astype(np.float64) for s in (32, 48))
    summed = small + large
    expected_sum = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    got_sum = extraction.embed_store(net, store, [32, 48], batch_size=8, aggregation="sum", progress=False)
    assert np.allclose(got_sum, expected_sum, atol=1e-5)

    p = 3.0
    gem = ((small ** p + large ** p) / 2) ** (1 / p)
    expected_gem = gem / np.linalg.norm(gem, axis=1, keepdims=True)
    got_gem = extraction.embed_store(net, store, [32, 48], batch_size=8, aggregation="gem", aggregation_p=p, progress=False)
    assert np.allclose(got_gem, expected_gem, atol=1e-5)
    assert not np.allclose(got_gem, got_sum, atol=1e-4)


def test_gem_aggregation_needs_non_negative_descriptors():
    with pytest.raises(ValueError, match="non-negative"):
        extraction.aggregate_scales([torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]])], "gem")


def test_batches_group_equal_sizes_in_given_order():
    shapes = np.array([[28, 28, 1], [20, 30, 3], [28, 28, 3], [20, 30, 1], [28, 28, 1]])
    batches = extraction.plan_batches(shapes, [64], batch_size=2)
    assert [b.tolist() for b in batches] == [[0, 2], [4], [1, 3]]


def test_training_mode_is_restored(tmp_path, net):
    store = make_store(tmp_path / "s", GRAY[:2])
    net.train()
    try:
        extraction.embed_store(net, store, [32], progress=False)
        assert net.training
    finally:
        net.eval()


# --- the stage command on a tiny prepared folder ---

def make_prepared(root):
    """train: 6 unlabeled-for-mining images; new_classes: 8 images of 2 classes; no val or new_images split."""
    write_image_store(root / "train", GRAY[:6], {"source": ["t"] * 6, "split": ["train"] * 6,
                                                 "origin": [str(i) for i in range(6)], "label": [5, 5, 6, 6, 7, 7]})
    test_images = [np.full((28, 28, 1), 30 * (i % 2) + i, np.uint8) for i in range(8)]
    write_image_store(root / "new_classes", test_images, {"source": ["t"] * 8, "split": ["new_classes"] * 8,
                                                   "origin": [str(i) for i in range(8)], "label": [i % 2 for i in range(8)]})


def run_stage(*args):
    from click.testing import CliRunner

    from stages.extract import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_stage_writes_aligned_features_and_metrics(tmp_path, net):
    from mom import artifacts
    from mom.metrics import recall_at_k

    make_prepared(tmp_path / "prepared")
    out = tmp_path / "features"
    result = run_stage("--prepared", tmp_path / "prepared", "--out-dir", out, "--scales", 32, "--batch_size", 4)
    assert result.exit_code == 0, result.output
    train, val, new_images, test = (np.load(out / f"{split}.npy") for split in ("train", "val", "new_images", "new_classes"))
    assert train.dtype == np.float32 and train.shape == (6, 1280) and test.shape == (8, 1280)
    assert val.shape == new_images.shape == (0, 1280)
    expected = extraction.embed_store(net, ImageStore.open(tmp_path / "prepared" / "train"), [32], progress=False)
    assert np.allclose(train, expected, atol=1e-5)

    metrics = artifacts.load_json(out / "report.json")
    assert metrics["count"] == 14 and metrics["dim"] == 1280 and metrics["splits"]["val"]["count"] == 0
    assert metrics["images_per_second"] > 0 and metrics["seconds"] > 0
    recall = recall_at_k(test, np.arange(8) % 2, (1, 2, 4))  # K = 8 needs 9 test items
    assert metrics["new_images"] is None
    assert metrics["new_classes"] == {f"recall_at_{k}": pytest.approx(v, abs=1e-6) for k, v in recall.items()}

    before = {split: (out / f"{split}.npy").read_bytes() for split in ("train", "val", "new_classes")}
    assert run_stage("--prepared", tmp_path / "prepared", "--out-dir", out, "--scales", 32, "--batch_size", 3).exit_code == 0
    assert before == {split: (out / f"{split}.npy").read_bytes() for split in ("train", "val", "new_classes")}


def test_stage_embeds_query_and_database_of_retrieval_benchmarks(tmp_path, net):
    make_prepared(tmp_path / "prepared")
    rng = np.random.default_rng(3)
    make_store(tmp_path / "prepared" / "query", [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(3)])
    make_store(tmp_path / "prepared" / "database", [rng.integers(0, 256, (24, 24, 1), dtype=np.uint8) for _ in range(5)])
    out = tmp_path / "features"
    assert run_stage("--prepared", tmp_path / "prepared", "--out-dir", out, "--scales", 32).exit_code == 0
    for split, count in (("query", 3), ("database", 5)):
        expected = extraction.embed_store(net, ImageStore.open(tmp_path / "prepared" / split), [32], progress=False)
        assert np.load(out / f"{split}.npy").shape == (count, 1280)
        assert np.allclose(np.load(out / f"{split}.npy"), expected, atol=1e-5)


def test_stage_pca_whitening_is_learned_on_train(tmp_path):
    from mom.whitening import apply_whitening, learn_pca_whitening

    make_prepared(tmp_path / "prepared")
    raw, white = tmp_path / "raw", tmp_path / "white"
    common = ["--prepared", tmp_path / "prepared", "--scales", 32, "--pooling", "mac"]
    assert run_stage(*common, "--out-dir", raw).exit_code == 0
    assert run_stage(*common, "--out-dir", white, "--pca_whiten", "--pca_dim", 4).exit_code == 0
    mean, projection = learn_pca_whitening(np.load(raw / "train.npy"), 4)
    for split in ("train", "new_classes"):
        assert np.allclose(np.load(white / f"{split}.npy"), apply_whitening(np.load(raw / f"{split}.npy"), mean, projection), atol=1e-4)
    assert np.load(white / "val.npy").shape == (0, 4)


@pytest.mark.parametrize("args,message", [
    (["--scales", "0"], "--scales"),
    (["--batch_size", "0"], "--batch_size"),
    (["--gem_p", "-1"], "--gem_p"),
    (["--pca_whiten", "--pca_dim", "5000"], "--pca_dim"),
    (["--device", "tpu"], "--device"),
])
def test_stage_rejects_bad_options_in_one_line(tmp_path, args, message):
    make_prepared(tmp_path / "prepared")
    result = run_stage("--prepared", tmp_path / "prepared", "--out-dir", tmp_path / "out", "--scales", 32, *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "out" / "train.npy").exists()


def test_stage_without_prepared_train(tmp_path):
    result = run_stage("--prepared", tmp_path / "nothing", "--out-dir", tmp_path / "out")
    assert result.exit_code == 2 and "prepare" in result.output
