"""finetune under torchrun (2 gloo processes) on the tiny collection of
test_finetune_stage: one set of outputs, the same tuples on both ranks, and the
same training as one process (DDP's averaged gradient is the whole batch's mean)."""
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mom import artifacts, networks
from mom.training_log import read_training_log
from test_finetune_stage import HDML_OPTIONS, ROOT, stage_args, workspace  # noqa: F401  (workspace: the fixture)

# 36 tuples in batches of 7: the last batch holds one tuple, so rank 1 sits it out with a zero loss
ARGS = dict(epochs=2, batch_size=7, loss="contrastive")  # the triplet loss is already 0 on this easy data
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_finetune(launcher, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "stages.finetune", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_torchrun_finetune_trains_like_one_process(workspace, tmp_path):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    run_finetune([sys.executable], stage_args(workspace, one, **ARGS))
    output = run_finetune(TORCHRUN, stage_args(workspace, two, **ARGS))

    assert sorted(path.name for path in two.iterdir()) == ["live", "model.pt", "start.pt", "summary.json"]
    assert not list((tmp_path / "two-ckpt").glob("*.pt")), "rank 0 removes the checkpoint once model.pt is written"
    assert artifacts.load_json(two / "summary.json")["processes"] == 2
    assert "processes" not in artifacts.load_json(one / "summary.json")

    agreed = re.findall(r"epoch (\d+): 36 tuples, sha256 ([0-9a-f]{64}) on all 2 ranks", output)
    assert [epoch for epoch, _ in agreed] == ["1", "2"], output[-3000:]

    rows_one, rows_two = read_training_log(one / "live")[1:], read_training_log(two / "live")[1:]  # after step 0
    assert [row["epoch"] for row in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two):
        assert math.isfinite(b["loss"]) and b["loss"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["val_recall_at_1"] == pytest.approx(a["val_recall_at_1"], abs=1 / 15 + 1e-9)

    net_one, _ = networks.load_checkpoint(one / "model.pt")
    net_two, _ = networks.load_checkpoint(two / "model.pt")
    fresh = networks.build_network(net_two.meta, seed=0)
    head = {name: dict(net.named_parameters())["head.weight"] for name, net in
            (("one", net_one), ("two", net_two), ("fresh", fresh))}
    assert not torch.equal(head["two"], head["fresh"]), "the torchrun run trained"
    # same steps as one process up to float rounding: a world_size-times larger step would be far off
    moved = (head["one"] - head["fresh"]).abs().max()
    assert (head["two"] - head["one"]).abs().max() < 1e-2 * moved
    assert torch.equal(dict(net_two.named_parameters())["trunk.stem.0.weight"],
                       dict(fresh.named_parameters())["trunk.stem.0.weight"]), "the frozen prefix did not move"


def kill_with_workers(launcher):
    """SIGKILL the ranks, then the torchrun launcher (the ranks run in their own sessions)."""
    workers = []
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        workers += [int(pid) for pid in (task / "children").read_text().split()]
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.wait(timeout=60)


@pytest.mark.slow
def test_torchrun_supervised_hdml_npair_trains_like_one_process(workspace, tmp_path):  # noqa: F811
    # 36 labelled images of 3 classes: 12 N-pair groups of 3, two per step (batch_size 7): one per rank
    args = dict(epochs=2, batch_size=7, loss="npair", synthesis="hdml", supervision="labels", hdml_alpha=1.0)
    one, two = tmp_path / "one", tmp_path / "two"
    run_finetune([sys.executable], stage_args(workspace, one, **args) + ["--no-weighted"])
    output = run_finetune(TORCHRUN, stage_args(workspace, two, **args) + ["--no-weighted"])
    agreed = re.findall(r"epoch (\d+): 12 tuples, sha256 ([0-9a-f]{64}) on all 2 ranks", output)
    assert [epoch for epoch, _ in agreed] == ["1", "2"], output[-3000:]
    epochs = [[row for row in read_training_log(out / "live") if "loss" in row] for out in (one, two)]
    for a, b in zip(*epochs, strict=True):
        for column in ("loss", "j_syn", "j_recon", "j_soft", "j_ce", "j_avg", "synthetic_weight"):
            assert b[column] == pytest.approx(a[column], rel=1e-3), column
    assert artifacts.load_json(two / "summary.json")["labels_used"] is True


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, HDML_OPTIONS], ids=["mom", "hdml"])
def test_torchrun_finetune_killed_then_resumed_gives_the_uninterrupted_result(workspace, tmp_path, options):  # noqa: F811
    epochs, env = 12, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_finetune(TORCHRUN, stage_args(workspace, tmp_path / "ref", epochs=epochs, batch_size=7, **options))

    out, checkpoints = tmp_path / "run", tmp_path / "run-ckpt"
    victim = subprocess.Popen([*TORCHRUN, "-m", "stages.finetune",
                               *stage_args(workspace, out, epochs=epochs, batch_size=7, **options)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              )
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("*.pt")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_with_workers(victim)
    (checkpoint,) = checkpoints.glob("*.pt")
    finished = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= finished < epochs, "the run finished before it could be killed"
    assert not (out / "model.pt").exists()

    output = run_finetune(TORCHRUN, stage_args(workspace, out, epochs=epochs, batch_size=7, **options))
    assert f"resuming after epoch {finished} of {epochs}" in output
    assert (out / "model.pt").read_bytes() == (tmp_path / "ref" / "model.pt").read_bytes()
    assert read_training_log(out / "live") == read_training_log(tmp_path / "ref" / "live")
    assert (out / "live" / "metrics.json").read_bytes() == (tmp_path / "ref" / "live" / "metrics.json").read_bytes()
