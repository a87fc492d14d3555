"""mom.distributed and extraction under torchrun: shards, the row gather (gloo, real
processes) and the extract stage's output byte-identical to one process."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from mom import artifacts, distributed
from mom.errors import InputError
from mom.extraction import plan_batches, shard_items
from mom.imagestore import write_image_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_range_is_a_balanced_contiguous_partition(n, world_size):
    shards = [distributed.shard_range(n, rank, world_size) for rank in range(world_size)]
    assert [item for shard in shards for item in shard] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_balanced_pieces_are_contiguous_runs_near_equal_shares(seed, world_size):
    sizes = np.random.default_rng(seed).integers(0, 20, size=30)
    runs = distributed.balanced_pieces(sizes, world_size)
    assert len(runs) == world_size
    assert [piece for run in runs for piece in run] == list(range(len(sizes)))
    share = sizes.sum() / world_size
    for run in runs:  # within one piece of the equal share
        assert abs(sizes[list(run)].sum() - share) <= sizes.max()


def test_balanced_pieces_of_nothing():
    assert distributed.balanced_pieces([], 3) == [range(0, 0)] * 3
    assert [len(run) for run in distributed.balanced_pieces([0] * 4, 2)] == [2, 2]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:1"])
def test_check_device_accepts_what_the_machine_has(monkeypatch, device):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert distributed.check_device(device) == device


@pytest.mark.parametrize("device,gpus,message", [
    ("tpu", 2, "cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda0", 2, "cpu, cuda or cuda:N"),
    ("cuda:", 2, "cpu, cuda or cuda:N"),
    ("CPU", 2, "cpu, cuda or cuda:N"),
    ("cuda", 0, "no CUDA device is available"),
    ("cuda:1", 0, "no CUDA device is available"),
    ("cuda:2", 2, "this machine has 2 CUDA device(s), cuda:0..cuda:1"),
])
def test_check_device_names_the_option_and_what_is_there(monkeypatch, device, gpus, message):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(InputError) as error:
        distributed.check_device(device)
    assert str(error.value).startswith("--device: ") and message in str(error.value)
    assert "\n" not in str(error.value)


class ShapesOnly:
    """What shard_items reads of a store: its length and item shapes."""

    def __init__(self, shapes):
        self.shapes = np.asarray(shapes)

    def __len__(self):
        return len(self.shapes)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_keep_every_batch_of_the_one_process_plan(seed, world_size):
    rng = np.random.default_rng(seed)
    sides = [(20, 28, 1), (28, 28, 3), (28, 20, 3), (40, 56, 3)]
    store = ShapesOnly([sides[i] for i in rng.integers(0, len(sides), size=61)])
    scales, batch_size = [32, 64], 4
    whole = {tuple(batch) for batch in plan_batches(store.shapes, scales, batch_size)}
    shards = [shard_items(store, scales, batch_size, rank, world_size) for rank in range(world_size)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(store)))
    planned = set()
    for items in shards:  # the batches embed_store forms over this rank's items, as item ids
        planned |= {tuple(items[batch]) for batch in plan_batches(store.shapes[items], scales, batch_size)}
    assert planned == whole
    counts = [len(items) for items in shards]
    assert max(counts) - min(counts) <= 2 * batch_size


def test_gather_rows_in_one_process_places_rows():
    ctx = distributed.init()
    assert not ctx.distributed and ctx.is_main and ctx.backend is None
    local = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert distributed.gather_rows(ctx, local, [0, 1, 2], 3) is local
    np.testing.assert_array_equal(distributed.gather_rows(ctx, local, [4, 0, 2], 5),
                                  [[2, 3], [0, 0], [4, 5], [0, 0], [0, 1]])


N_ROWS, WIDTH = 23, 5


def expected_rows():
    return np.arange(N_ROWS * WIDTH, dtype=np.float32).reshape(N_ROWS, WIDTH) / 7


def gather_worker(rank, world_size, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.CHUNK_BYTES = 3 * WIDTH * 4  # three rows a message: several chunks per rank
    with distributed.session("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world_size, "gloo")
        # strided, uneven shards; the last rank holds nothing
        rows = np.arange(rank, N_ROWS, world_size - 1) if rank < world_size - 1 else np.zeros(0, np.int64)
        local = expected_rows()[rows]
        out = np.lib.format.open_memmap(folder / "out.npy", "w+", np.float32, (N_ROWS, WIDTH)) if ctx.is_main else None
        result = distributed.gather_rows(ctx, local, rows, N_ROWS, out=out)
        seed = distributed.broadcast_object(ctx, {"seed": 7} if ctx.is_main else None)
        distributed.barrier(ctx)
        if ctx.is_main:
            assert result is out
            result.flush()
        else:
            assert result is None
        np.save(folder / f"seed{rank}.npy", seed["seed"])


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gather_rows_across_gloo_processes(tmp_path):
    world_size = 3
    mp.start_processes(gather_worker, args=(world_size, free_port(), tmp_path), nprocs=world_size,
                       start_method="spawn", join=True)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected_rows())
    assert [int(np.load(tmp_path / f"seed{rank}.npy")) for rank in range(world_size)] == [7] * world_size


def tiny_prepared(root: Path) -> Path:
    """Gray and colour images of three shapes in train/val/new_classes, all labelled."""
    rng = np.random.default_rng(0)
    sides = [(20, 28), (28, 28), (28, 20)]
    for split, n in (("train", 37), ("val", 5), ("new_classes", 12)):
        images = (rng.integers(0, 256, sides[i % 3] + ((3,) if i % 2 else ()), dtype=np.uint8) for i in range(n))
        write_image_store(root / split, images, {"source": ["t"] * n, "split": [split] * n,
                                                 "origin": [str(i) for i in range(n)],
                                                 "label": [i % 3 for i in range(n)]})
    return root


def run_extract(launcher, prepared, out_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [*launcher, "-m", "stages.extract", "--batch_size", "4", "--scales", "48", "--scales", "64",
               "--prepared", str(prepared), "--out-dir", str(out_dir)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_extract_is_byte_identical_to_one_process(tmp_path):
    prepared = tiny_prepared(tmp_path / "prepared")
    run_extract([sys.executable], prepared, tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_extract(torchrun, prepared, tmp_path / "two")
    files = ["database.npy", "new_classes.npy", "new_images.npy", "query.npy", "report.json", "train.npy", "val.npy"]
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == files  # no per-rank leftovers
    for split in ("train", "val", "new_images", "new_classes", "query", "database"):
        assert (tmp_path / "one" / f"{split}.npy").read_bytes() == (tmp_path / "two" / f"{split}.npy").read_bytes()
    one, two = (artifacts.load_json(tmp_path / name / "report.json") for name in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["count"] == 54 and two["new_classes"] == one["new_classes"]
