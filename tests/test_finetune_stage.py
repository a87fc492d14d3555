"""The finetune stage on a tiny synthetic collection: outputs, determinism,
option errors, and a real SIGKILL mid-training followed by an exact resume."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from mom import artifacts, extraction, networks
from mom.imagestore import write_image_store
from mom.training_log import read_training_log
from stages import finetune

ROOT = Path(__file__).resolve().parents[1]


def synthetic_images(n, seed):
    """Class 0: bright horizontal bars, class 1: vertical bars, class 2: blobs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = []
    for label in labels:
        image = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
        offset = rng.integers(0, 4)
        if label == 0:
            image[offset::4, :] = 230
        elif label == 1:
            image[:, offset::4] = 230
        else:
            image[8 + offset:18 + offset, 8:20] = 200
        images.append(image)
    return images, labels


def write_split(folder, split, n, seed):
    images, labels = synthetic_images(n, seed)
    write_image_store(folder, images, {
        "source": ["synthetic"] * n, "split": [split] * n,
        "origin": [f"{split}#{i}" for i in range(n)], "label": labels.tolist(),
        "class_name": [f"c{label}" for label in labels],
    })
    return labels


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    labels = write_split(root / "train", "train", 36, seed=0)
    write_split(root / "val", "val", 15, seed=1)
    n = len(labels)
    # Pools from the labels stand in for the mine stage's output here.
    rows = []
    for anchor in range(n):
        same = [j for j in range(n) if labels[j] == labels[anchor] and j != anchor][:4]
        other = [j for j in range(n) if labels[j] != labels[anchor]][:8]
        rows += [(anchor, j, "positive", r + 1, 0.9 - 0.1 * r, 0.5) for r, j in enumerate(same)]
        rows += [(anchor, j, "negative", r + 1, 0.0, 0.6) for r, j in enumerate(other)]
    anchor, member, kind, rank, manifold, euclidean = zip(*rows)
    artifacts.save_parquet(root / "pools.parquet", pa.table({
        "anchor": pa.array(anchor, pa.int64()), "member": pa.array(member, pa.int64()),
        "kind": pa.array(kind, pa.string()), "rank": pa.array(rank, pa.int32()),
        "manifold_similarity": pa.array(manifold, pa.float32()),
        "euclidean_similarity": pa.array(euclidean, pa.float32()),
    }))
    artifacts.save_parquet(root / "anchors.parquet", pa.table({
        "item": pa.array(range(n), pa.int64()), "probability": pa.array([1 / n] * n, pa.float64()),
        "rank": pa.array(range(1, n + 1), pa.int32()), "strategy": pa.array(["all"] * n, pa.string()),
    }))
    return root


def stage_args(root, out, epochs=2, **extra):
    args = ["--train", root / "train", "--val", root / "val", "--pools", root / "pools.parquet",
            "--anchors", root / "anchors.parquet", "--out-dir", out, "--checkpoint-dir", out.parent / f"{out.name}-ckpt",
            "--image_size", "32", "--scales", "32", "--trainable_blocks", "1", "--head_dim", "64", "--head_init", "random", "--epochs", str(epochs), "--batch_size", "8",
            "--lr", "0.05", "--lr_step", "5", "--threads", "1"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return [str(a) for a in args]


def log_bytes(out_dir: Path) -> dict[str, bytes]:
    """Every file of the DVCLive training log of one finetune output folder."""
    live = out_dir / "live"
    return {path.relative_to(live).as_posix(): path.read_bytes() for path in sorted(live.rglob("*")) if path.is_file()}


def test_finetune_writes_a_rebuildable_model_a_log_and_is_deterministic(workspace, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(finetune.main, stage_args(workspace, tmp_path / name))
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert log_bytes(a) == log_bytes(b)
    rows = read_training_log(a / "live")
    assert [row["epoch"] for row in rows] == [0, 1, 2], "val Recall@1 before training at step 0, then each epoch"
    assert set(rows[0]) == {"epoch", "val_recall_at_1"}
    assert all(set(row) == {"epoch", "loss", "active", "val_recall_at_1"} for row in rows[1:])
    live_summary = artifacts.load_json(a / "live" / "metrics.json")
    assert live_summary == {**{key: rows[-1][key] for key in ("loss", "active", "val_recall_at_1")}, "step": 2}
    net, _ = networks.load_checkpoint(a / "model.pt")
    assert net.dim == 64
    fresh = networks.build_network(net.meta, seed=0)
    trained_head = dict(net.named_parameters())["head.weight"]
    assert not torch.equal(trained_head, dict(fresh.named_parameters())["head.weight"])
    # the frozen stages did not move
    assert torch.equal(dict(net.named_parameters())["trunk.stem.0.weight"],
                       dict(fresh.named_parameters())["trunk.stem.0.weight"])
    summary = artifacts.load_json(a / "summary.json")
    assert summary["anchors_with_tuples"] == 36 and summary["anchors_dropped"] == 0
    assert not list((tmp_path / "a-ckpt").glob("*.pt")), "the checkpoint is removed after success"


@pytest.mark.parametrize("option,value,message", [
    ("loss", "hinge", "loss must be one of"),
    ("trainable_blocks", "12", "trainable_blocks"),
    ("epochs", "0", "epochs must be >= 1"),
])
def test_bad_options_fail_in_one_line(workspace, tmp_path, option, value, message):
    result = CliRunner().invoke(finetune.main, stage_args(workspace, tmp_path / "x", **{option: value}))
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x" / "model.pt").exists()


@pytest.mark.parametrize("device,gpus,message", [
    ("tpu", 0, "--device: must be cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda", 0, "--device: cuda requested but no CUDA device is available"),
    ("cuda:1", 1, "--device: cuda:1 requested but this machine has 1 CUDA device(s)"),
])
def test_an_unusable_device_fails_in_one_line(workspace, tmp_path, monkeypatch, device, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    result = CliRunner().invoke(finetune.main, stage_args(workspace, tmp_path / "x", device=device))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune: error: {message}"), lines
    assert not (tmp_path / "x").exists() and not (tmp_path / "x-ckpt").exists()


def test_pca_head_init(workspace, tmp_path):
    runner = CliRunner()
    result = runner.invoke(finetune.main, stage_args(workspace, tmp_path / "a", head_init="pca"))
    assert result.exit_code == 2 and "at least 64 training items" in result.output
    result = runner.invoke(finetune.main, stage_args(workspace, tmp_path / "b", head_init="pca", head_dim=8))
    assert result.exit_code == 0, result.output
    summary = artifacts.load_json(tmp_path / "b" / "summary.json")
    assert summary["head_init"] == "pca" and 0 < summary["head_pca_explained_variance"] <= 1


def test_the_untrained_start_is_the_network_before_its_first_step(workspace, tmp_path):
    from mom import metrics
    from mom.imagestore import ImageStore

    args = stage_args(workspace, tmp_path / "out", head_init="pca_whiten", head_dim=8)
    assert CliRunner().invoke(finetune.main, args).exit_code == 0
    summary = artifacts.load_json(tmp_path / "out" / "summary.json")
    assert summary["head_init"] == "pca_whiten"
    start, extra = networks.load_checkpoint(tmp_path / "out" / "start.pt")
    assert extra["epochs"] == 0 and start.meta["head_dim"] == 8
    val = ImageStore.open(workspace / "val")
    embedded = extraction.embed_store(start, val, scales=[32], progress=False)
    assert metrics.recall_at_k(embedded, val.labels, (1,))[1] == pytest.approx(summary["val_recall_at_1_initial"])
    trained, _ = networks.load_checkpoint(tmp_path / "out" / "model.pt")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))


def test_an_empty_validation_split_only_skips_validation(workspace, tmp_path):
    write_image_store(tmp_path / "empty", iter([]), {"source": [], "split": [], "origin": []})
    args = stage_args(workspace, tmp_path / "out", epochs=1)
    args[args.index("--val") + 1] = str(tmp_path / "empty")
    result = CliRunner().invoke(finetune.main, args)
    assert result.exit_code == 0, result.output
    rows = read_training_log(tmp_path / "out" / "live")
    assert [row["epoch"] for row in rows] == [1] and set(rows[0]) == {"epoch", "loss", "active"}


def test_missing_pools_is_a_clear_error(workspace, tmp_path):
    args = stage_args(workspace, tmp_path / "x")
    args[args.index("--pools") + 1] = str(tmp_path / "none.parquet")
    result = CliRunner().invoke(finetune.main, args)
    assert result.exit_code == 2 and "none.parquet: file not found" in result.output


def run_stage(args, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "stages.finetune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# HDML on the mined pools with k-means pseudo-labels: generator, softmax layer and status in the checkpoint
HDML_OPTIONS = dict(synthesis="hdml", supervision="kmeans", pseudo_labels=3, hdml_alpha=0.2, hdml_beta=50)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, HDML_OPTIONS], ids=["mom", "hdml"])
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_result(workspace, tmp_path, options):
    epochs = 12
    reference = run_stage(stage_args(workspace, tmp_path / "ref", epochs=epochs, **options))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "run"
    checkpoints = tmp_path / "run-ckpt"
    victim = run_stage(stage_args(workspace, out, epochs=epochs, **options))
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.pt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    (checkpoint,) = checkpoints.glob("*.pt")
    finished = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= finished < epochs
    assert not (out / "model.pt").exists()

    resumed = run_stage(stage_args(workspace, out, epochs=epochs, **options))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming after epoch {finished} of {epochs}" in output
    assert (out / "model.pt").read_bytes() == (tmp_path / "ref" / "model.pt").read_bytes()
    assert log_bytes(out) == log_bytes(tmp_path / "ref")


# ------------------------------------------------------------ whiten, evaluate


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """A fine-tuned model, the prepared folder (train/val/new_images/new_classes),
    initial features and a manifold kNN table: what whiten and evaluate read."""
    out = tmp_path_factory.mktemp("trained")
    result = CliRunner().invoke(finetune.main, stage_args(workspace, out / "finetune"))
    assert result.exit_code == 0, result.output
    prepared = out / "prepared"
    prepared.mkdir()
    for split in ("train", "val"):
        (prepared / split).symlink_to(workspace / split)
    test_labels, initial = {}, {}
    rng = np.random.default_rng(5)
    for split, n, seed in (("new_images", 21, 3), ("new_classes", 30, 2)):
        test_labels[split] = write_split(prepared / split, split, n, seed=seed)
        initial[split] = rng.normal(size=(n, 6)).astype(np.float32)
        initial[split] /= np.linalg.norm(initial[split], axis=1, keepdims=True)
        artifacts.save_npy(out / "features" / f"{split}.npy", initial[split])
    n_train = 36
    train_labels = np.arange(n_train) % 3
    rows = [(a, b, r + 1) for a in range(n_train)
            for r, b in enumerate([j for j in range(n_train) if train_labels[j] == train_labels[a] and j != a][:5])]
    anchor, neighbour, rank = zip(*rows)
    artifacts.save_parquet(out / "manifold_knn.parquet", pa.table({
        "anchor": pa.array(anchor, pa.int64()), "neighbour": pa.array(neighbour, pa.int64()),
        "rank": pa.array(rank, pa.int32()), "similarity": pa.array([0.5] * len(rows), pa.float32())}))
    return out, test_labels, initial


def whiten_args(out, method, **extra):
    args = ["--model", out / "finetune" / "model.pt", "--train", out / "prepared" / "train",
            "--manifold-knn", out / "manifold_knn.parquet", "--out-dir", out / f"whiten-{method}",
            "--method", method]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return [str(a) for a in args]


@pytest.mark.parametrize("method,dim", [("none", 64), ("pca", 16), ("lw", 64)])
def test_whiten_writes_a_projection_of_the_requested_dims(trained, method, dim):
    from stages import whiten
    from mom import extraction, whitening

    out, _, _ = trained
    extra = {"dim": 16} if method == "pca" else {"lw_neighbours": 3} if method == "lw" else {}
    result = CliRunner().invoke(whiten.main, whiten_args(out, method, **extra))
    assert result.exit_code == 0, result.output
    mean, projection, saved_method = whitening.load_whitening(out / f"whiten-{method}" / "whitening.npz")
    assert saved_method == method and projection.shape == (dim, 64) and mean.shape == (64,)
    if method == "none":
        assert np.array_equal(projection, np.eye(64))
        return
    from mom.imagestore import ImageStore
    net, _ = networks.load_checkpoint(out / "finetune" / "model.pt")
    train = extraction.embed_store(net, ImageStore.open(out / "prepared" / "train"), scales=[32], progress=False)
    if method == "pca":  # the training descriptors come out with identity covariance
        whitened = (train - mean) @ projection.T
        assert np.allclose(np.cov(whitened.T, bias=True), np.eye(16), atol=1e-2)


def test_whiten_rejects_bad_method(trained):
    from stages import whiten

    out, _, _ = trained
    result = CliRunner().invoke(whiten.main, whiten_args(out, "zca"))
    assert result.exit_code == 2 and "method: must be one of pca, lw, none" in result.output


def test_evaluate_compares_initial_start_and_finetuned_on_both_evaluations(trained, tmp_path):
    from stages import evaluate
    from mom import metrics
    from mom.imagestore import ImageStore

    out, test_labels, initial = trained
    assert CliRunner().invoke(whiten_main(), whiten_args(out, "none")).exit_code == 0
    args = ["--model", out / "finetune" / "model.pt", "--start", out / "finetune" / "start.pt",
            "--whitening", out / "whiten-none" / "whitening.npz",
            "--prepared", out / "prepared", "--features", out / "features",
            "--finetune-log", out / "finetune" / "live", "--report", tmp_path / "report.json",
            "--metrics", tmp_path / "metrics.json", "--proxy-report", "",
            "--plots-dir", tmp_path / "plots", "--kmeans_n_init", "2"]
    result = CliRunner().invoke(evaluate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(tmp_path / "report.json")
    for split, items in (("new_images", 21), ("new_classes", 30)):
        section, labels = report[split], test_labels[split]
        assert section["items"] == items and section["classes"] == 3
        assert section["kmeans"]["n_clusters"] == 3 and section["kmeans"]["n_init"] == 2 and section["kmeans"]["seed"] == 0
        store = ImageStore.open(out / "prepared" / split)
        for name, embeddings in (("initial", initial[split]),
                                 ("start", embed_with(out / "finetune" / "start.pt", store)),
                                 ("finetuned", embed_with(out / "finetune" / "model.pt", store))):
            expected = metrics.recall_at_k(embeddings, labels)
            assert [section[name][f"recall_at_{k}"] for k in (1, 2, 4, 8)] == pytest.approx(
                [expected[k] for k in (1, 2, 4, 8)], abs=1e-6), name
            assert section[name]["nmi"] == pytest.approx(metrics.nmi_kmeans(embeddings, labels, 3, 0, 2), abs=1e-6)
    assert report["whitening"] == {"method": "none", "dim": 64}
    assert report["scales"] == [32] and report["aggregation"] == "sum"  # recorded by finetune
    assert "retrieval" not in report
    for name in ("recall_at_k.png", "training.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    headline = artifacts.load_json(tmp_path / "metrics.json")
    assert headline.pop("evaluations") == report["evaluations"]
    assert report["evaluations"] == "ran: R@K/NMI new_images, R@K/NMI new_classes; not run: retrieval (no ground truth), proxy (no report given)"
    assert headline == {split: {version: {key: report[split][version][key] for key in ("recall_at_1", "recall_at_8", "nmi", "f1")}
                                for version in ("initial", "finetuned")} for split in ("new_images", "new_classes")}
    for split in ("new_images", "new_classes"):
        series = artifacts.load_json(tmp_path / "plots" / "recall_at_k" / f"{split}.json")["recall_at_k"]
        assert series == [{"k": k, **{name: report[split][name][f"recall_at_{k}"]
                                      for name in ("initial", "start", "finetuned")}} for k in (1, 2, 4, 8)]
    # same inputs, same bytes
    second = tmp_path / "again.json"
    args[args.index("--report") + 1] = second
    assert CliRunner().invoke(evaluate.main, [str(a) for a in args]).exit_code == 0
    assert second.read_bytes() == (tmp_path / "report.json").read_bytes()
    # --no-initial (the grid's cells): the same report without the initial features' sections
    skipped = tmp_path / "no_initial.json"
    args[args.index("--report") + 1] = skipped
    assert CliRunner().invoke(evaluate.main, [str(a) for a in args] + ["--no-initial"]).exit_code == 0
    for split in ("new_images", "new_classes"):
        del report[split]["initial"]
    assert artifacts.load_json(skipped) == report


def embed_with(checkpoint, store):
    from mom import extraction

    net, extra = networks.load_checkpoint(checkpoint)
    return extraction.embed_store(net, store, scales=extra["embedding"]["scales"], progress=False)


def whiten_main():
    from stages import whiten
    return whiten.main


def test_evaluate_retrieval_protocols_with_junk(trained, tmp_path):
    from stages import evaluate
    from mom import metrics

    out, _, _ = trained
    prepared = tmp_path / "prepared"
    write_split(prepared / "query", "query", 3, seed=7)
    write_split(prepared / "database", "database", 12, seed=8)
    relevance = [(0, 0, "easy"), (0, 3, "hard"), (0, 6, "junk"), (1, 1, "easy"), (1, 4, "junk"),
                 (2, 2, "hard"), (2, 5, "easy")]
    query, database, level = zip(*relevance)
    artifacts.save_parquet(prepared / "ground_truth.parquet", pa.table({
        "query": pa.array(query, pa.int64()), "database": pa.array(database, pa.int64()),
        "relevance": pa.array(level, pa.string())}))
    rng = np.random.default_rng(9)
    features = {}
    for split, n in (("query", 3), ("database", 12)):
        features[split] = rng.normal(size=(n, 5)).astype(np.float32)
        artifacts.save_npy(tmp_path / "features" / f"{split}.npy", features[split])
    assert CliRunner().invoke(whiten_main(), whiten_args(out, "none")).exit_code == 0
    args = ["--model", out / "finetune" / "model.pt", "--start", "", "--whitening", out / "whiten-none" / "whitening.npz",
            "--prepared", prepared, "--features", tmp_path / "features", "--finetune-log", "",
            "--report", tmp_path / "report.json", "--metrics", tmp_path / "metrics.json", "--proxy-report", "",
            "--plots-dir", tmp_path / "plots"]
    result = CliRunner().invoke(evaluate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    retrieval = artifacts.load_json(tmp_path / "report.json")["retrieval"]
    headline = artifacts.load_json(tmp_path / "metrics.json")["retrieval_map"]
    assert headline == {version: {protocol: retrieval[version][protocol]["map"] for protocol in ("easy", "medium", "hard")}
                        for version in ("initial", "finetuned")}
    assert retrieval["protocols"] == ["easy", "medium", "hard"]
    rankings = metrics.rank_database(features["query"], features["database"])
    easy, hard, junk = [[0], [1], [5]], [[3], [], [2]], [[6], [4], []]
    expected = metrics.revisited_evaluation(rankings, easy, hard, junk, ks=(1, 5, 10))
    for protocol in ("easy", "medium", "hard"):
        assert retrieval["initial"][protocol]["map"] == pytest.approx(expected[protocol]["map"])
        assert retrieval["initial"][protocol]["mp_at_5"] == pytest.approx(expected[protocol]["mp_at_k"][5])
    assert retrieval["initial"]["hard"]["queries"] == 2  # query 1 has no hard positive
    assert 0 <= retrieval["finetuned"]["medium"]["map"] <= 1


def test_weighted_training_needs_manifold_weights(workspace, tmp_path):
    table = artifacts.load_parquet(workspace / "pools.parquet")
    zero = pa.array([0.0] * len(table), pa.float32())
    baseline = table.set_column(table.schema.get_field_index("manifold_similarity"), "manifold_similarity", zero)
    artifacts.save_parquet(tmp_path / "baseline.parquet", baseline)
    args = stage_args(workspace, tmp_path / "out", epochs=1)
    args[args.index("--pools") + 1] = str(tmp_path / "baseline.parquet")
    result = CliRunner().invoke(finetune.main, args)
    assert result.exit_code == 2 and "--no-weighted" in result.output
    result = CliRunner().invoke(finetune.main, args + ["--no-weighted"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------ HDML and supervision (method.md section 10)


def test_hdml_runs_record_their_supervision_and_are_deterministic(workspace, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(finetune.main, stage_args(workspace, tmp_path / name, epochs=3, **HDML_OPTIONS))
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert read_training_log(a / "live") == read_training_log(b / "live")
    logged = set(read_training_log(a / "live")[-1])
    assert {"j_avg", "synthetic_weight", "j_syn", "j_recon", "j_soft", "j_gen", "j_ce"} <= logged
    summary = artifacts.load_json(a / "summary.json")
    assert (summary["supervision"], summary["labels_used"], summary["synthesis"], summary["pseudo_labels"]) == (
        "kmeans", False, "hdml", 3)
    _, extra = networks.load_checkpoint(a / "model.pt")
    assert (extra["supervision"], extra["synthesis"]) == ("kmeans", "hdml")


@pytest.mark.parametrize("loss,synthesis", [("triplet", "none"), ("npair", "hdml")])
def test_supervised_reference_trains_from_the_labels_without_pools(workspace, tmp_path, loss, synthesis):
    args = stage_args(workspace, tmp_path / "out", epochs=2, loss=loss, synthesis=synthesis, supervision="labels")
    for option in ("--pools", "--anchors"):  # not read
        args[args.index(option) + 1] = str(tmp_path / "absent.parquet")
    result = CliRunner().invoke(finetune.main, args + ["--no-weighted"])
    assert result.exit_code == 0, result.output
    summary = artifacts.load_json(tmp_path / "out" / "summary.json")
    assert (summary["supervision"], summary["labels_used"], summary["synthesis"]) == ("labels", True, synthesis)
    assert summary["anchors_with_tuples"] == 36 and summary["positive_weight_mean"] is None


def test_labels_are_read_only_under_supervision_labels(workspace, tmp_path, monkeypatch):
    from mom.imagestore import ImageStore

    def no_labels(store):
        raise AssertionError("the training labels were read")

    monkeypatch.setattr(ImageStore, "labels", property(no_labels))
    for name, options in (("mom", {}), ("hdml", HDML_OPTIONS)):
        result = CliRunner().invoke(finetune.main, stage_args(workspace, tmp_path / name, epochs=1, **options)
                                    + ["--no-validate"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(finetune.main, stage_args(workspace, tmp_path / "labels", epochs=1, supervision="labels")
                                + ["--no-validate", "--no-weighted"])
    assert result.exit_code != 0


def test_supervision_labels_is_refused_for_a_collection_without_labels(workspace, tmp_path):
    images, _ = synthetic_images(12, seed=4)
    write_image_store(tmp_path / "unlabelled", images, {
        "source": ["synthetic"] * 12, "split": ["train"] * 12, "origin": [f"u#{i}" for i in range(12)]})
    args = stage_args(workspace, tmp_path / "out", supervision="labels")
    args[args.index("--train") + 1] = str(tmp_path / "unlabelled")
    result = CliRunner().invoke(finetune.main, args + ["--no-weighted"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"finetune: error: supervision: labels needs a label on every training item; {tmp_path / 'unlabelled'} has "
        "12 unlabelled (use supervision none or kmeans)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(synthesis="gan"), "synthesis: must be one of none, hdml"),
    (dict(supervision="oracle"), "supervision: must be one of none, labels, kmeans"),
    (dict(loss="npair"), "loss: npair needs N-pair groups of distinct classes, i.e. supervision labels"),
    (dict(supervision="kmeans"), "supervision: kmeans pseudo-labels only feed HDML's softmax"),
    (dict(supervision="labels"), "weighted: needs mined pools"),
    (dict(synthesis="hdml", head_dim=0), "synthesis: hdml needs an FC head"),
    (dict(synthesis="hdml", loss="contrastive"), "synthesis: hdml is defined for loss triplet or npair"),
    (dict(synthesis="hdml", hdml_alpha=-1), "hdml_alpha must be >= 0"),
    (dict(synthesis="hdml", generator_lr=0), "generator_lr must be > 0"),
    (dict(synthesis="hdml", supervision="kmeans", pseudo_labels=1), "pseudo_labels: must be >= 2"),
])
def test_bad_hdml_options_fail_in_one_line(workspace, tmp_path, options, message):
    result = CliRunner().invoke(finetune.main, stage_args(workspace, tmp_path / "x", **options))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finetune: error: {message}"), lines
    assert not (tmp_path / "x").exists()
