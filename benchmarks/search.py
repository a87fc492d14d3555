"""Seconds per query of ``python -m stages.search`` (target: under 2 s once the index exists),
and the exact index's load and search time at larger sizes.

1. The whole command, as a user runs it (a fresh process each time; the median
   of ``--repeats`` runs), on a finished pipeline's ``<data>`` folder
   (``index``, ``prepared``, ``finetune``, ``whiten``): an item query
   (``--json``), an item query with a contact sheet, one query file, and
   ``--files`` query files in one call (seconds per query). Query files are
   test items written as PNG.
   Then ``--stdin``, the way to ask many questions one at a time: one process
   answering the ``--files`` files and as many items one line after another:
   the first answer's time from process start, and the median time from a
   line written to its answer for the files and for the items.
2. ``faiss.IndexFlatIP`` of random unit vectors: reading the index file and
   answering one query (top 10), for each ``--sizes`` x ``--dims`` (memory:
   4 * n * d bytes), to show where exact search stops being fast enough.

    python benchmarks/search.py --data data
    python benchmarks/search.py --data none --sizes 100000 --sizes 1000000 --dims 64
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import click  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mom import search  # noqa: E402
from mom.imagestore import ImageStore  # noqa: E402


def data_paths(data: Path) -> list:
    return ["--index-dir", data / "index", "--prepared", data / "prepared", "--model", data / "finetune" / "model.pt",
             "--whitening", data / "whiten" / "whitening.npz"]


def command_seconds(args: list[str], data: Path, repeats: int) -> float:
    """Median wall time of the whole command (process start to exit)."""
    paths = data_paths(data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.search", *map(str, args + paths)], cwd=ROOT, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def query_files(data: Path, folder: Path, count: int) -> list[Path]:
    split = next(name for name in ("new_images", "new_classes", "test", "train") if (data / "prepared" / name).is_dir())
    store = ImageStore.open(data / "prepared" / split)
    files = []
    for item in range(count):
        pixels = store[item]
        files.append(folder / f"{split}-{item}.png")
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(files[-1])
    return files


def time_command(data: Path, repeats: int, count: int) -> None:
    split = next(iter(search.load_items(data / "index" / "items.parquet").column("split").to_pylist()))
    with tempfile.TemporaryDirectory() as folder:
        files = query_files(data, Path(folder), count)
        rows = [
            ("--item, --json", ["--item", f"{split}:0", "--json"], 1),
            ("--item, --sheet", ["--item", f"{split}:0", "--sheet", str(Path(folder) / "sheet.png")], 1),
            ("--query (one file)", ["--query", str(files[0])], 1),
            (f"--query x {count} files", [arg for file in files for arg in ("--query", str(file))], count),
        ]
        for name, args, queries in rows:
            seconds = command_seconds(args, data, repeats)
            print(f"{name:24s} {seconds:6.2f} s per call, {seconds / queries:6.2f} s per query")
    time_stdin(data, count, split)


def stdin_seconds(data: Path, lines: list[str]) -> list[float]:
    """Seconds to each answer of one ``--stdin`` process: the first from process start, the others from
    the moment their line was written (one line at a time, each after the previous answer)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "stages.search", "--stdin", "--json", *map(str, data_paths(data))],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    seconds = []
    for line in lines:
        process.stdin.write(line + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer or "error" in json.loads(answer):
            raise SystemExit(f"--stdin: no answer to {line}: {answer.strip()}")
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
    process.stdin.close()
    process.wait()
    return seconds


def time_stdin(data: Path, count: int, split: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        files = [str(file) for file in query_files(data, Path(folder), count)]
        items = [f"{split}:{item}" for item in range(1, count + 1)]
        seconds = stdin_seconds(data, files + items)
    print(f"--stdin: first answer (a file) {seconds[0]:.2f} s after process start; then per query (median): "
          f"file {statistics.median(seconds[1:count]):.3f} s, item {statistics.median(seconds[count:]):.3f} s")


def time_exact_index(sizes, dims) -> None:
    rng = np.random.default_rng(0)
    query = rng.standard_normal((1, max(dims))).astype(np.float32)
    for dim in dims:
        q = query[:, :dim] / np.linalg.norm(query[:, :dim])
        for size in sizes:
            vectors = rng.standard_normal((size, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "index.faiss"
                search.save_index(path, search.build_index(vectors))
                del vectors
                start = time.perf_counter()
                index = search.load_index(path)
                loaded = time.perf_counter() - start
                start = time.perf_counter()
                search.search(index, q, 10)
                searched = time.perf_counter() - start
                del index
            print(f"exact index {size:>9d} x {dim:<5d} ({4 * size * dim / 2**20:7.0f} MiB): "
                  f"read {loaded:6.3f} s, one top-10 query {searched:6.3f} s")


@click.command()
@click.option("--data", default="data", show_default=True, help="a finished pipeline's data folder ('none': skip)")
@click.option("--repeats", default=5, show_default=True, help="runs of each command (median kept)")
@click.option("--files", "count", type=click.IntRange(min=2), default=10, show_default=True,
              help="query files in the batch call (and lines of the --stdin run)")
@click.option("--sizes", multiple=True, type=int, default=(100_000, 1_000_000), show_default=True)
@click.option("--dims", multiple=True, type=int, default=(64,), show_default=True)
def main(data: str, repeats: int, count: int, sizes, dims) -> None:
    if data != "none":
        time_command(Path(data).resolve(), repeats, count)
    time_exact_index(sizes, dims)


if __name__ == "__main__":
    main()
