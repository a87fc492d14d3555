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

from mom import artifacts, networks
from mom.imagestore import write_image_store
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
            "--image_size", "32", "--trainable_blocks", "1", "--epochs", str(epochs), "--batch_size", "8",
            "--lr", "0.05", "--lr_step", "5", "--threads", "1"]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    return [str(a) for a in args]


def test_finetune_writes_a_rebuildable_model_a_log_and_is_deterministic(workspace, tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        result = runner.invoke(finetune.main, stage_args(workspace, tmp_path / name))
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()
    assert (a / "log.tsv").read_text() == (b / "log.tsv").read_text()
    lines = (a / "log.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["epoch", "lr", "loss", "active", "val_recall_at_1"]
    assert [line.split("\t")[0] for line in lines[1:]] == ["1", "2"]
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


def test_missing_pools_is_a_clear_error(workspace, tmp_path):
    args = stage_args(workspace, tmp_path / "x")
    args[args.index("--pools") + 1] = str(tmp_path / "none.parquet")
    result = CliRunner().invoke(finetune.main, args)
    assert result.exit_code == 2 and "none.parquet: file not found" in result.output


def run_stage(args, **popen):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "stages.finetune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_result(workspace, tmp_path):
    epochs = 12
    reference = run_stage(stage_args(workspace, tmp_path / "ref", epochs=epochs))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "run"
    checkpoints = tmp_path / "run-ckpt"
    victim = run_stage(stage_args(workspace, out, epochs=epochs))
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.pt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    (checkpoint,) = checkpoints.glob("*.pt")
    finished = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= finished < epochs
    assert not (out / "model.pt").exists()

    resumed = run_stage(stage_args(workspace, out, epochs=epochs))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming after epoch {finished} of {epochs}" in output
    assert (out / "model.pt").read_bytes() == (tmp_path / "ref" / "model.pt").read_bytes()
    assert (out / "log.tsv").read_text() == (tmp_path / "ref" / "log.tsv").read_text()
