"""Speed of the extract stage's code path against a bare forward pass.

Prints images/s of :func:`mom.extraction.embed_store` (reading the image store,
converting, resizing, pooling, aggregating) and of the same network's forward
pass on random tensors already in memory, at the same batch size and input
resolution, and their ratio (target: at least 0.85). The two are timed
alternately, several rounds, and the best round of each is kept, so that other
processes on a shared machine disturb the ratio less.

    python benchmarks/extract.py                         # data/prepared/train if present
    python benchmarks/extract.py --prepared none --count 2000 --scale 96
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import click
import numpy as np
import torch

from mom.extraction import embed_store
from mom.imagestore import ImageStore, write_image_store
from mom.networks import build_network, make_meta


def synthetic_store(folder: Path, count: int, side: int = 28) -> ImageStore:
    """``count`` random grayscale ``side x side`` images (the layout of Fashion-MNIST)."""
    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (side, side), dtype=np.uint8) for _ in range(count))
    columns = {"source": ["synthetic"] * count, "split": ["train"] * count, "origin": [str(i) for i in range(count)]}
    write_image_store(folder, images, columns)
    return ImageStore.open(folder)


def stage_rate(net, store, indices, scale, batch_size) -> float:
    start = time.perf_counter()
    embed_store(net, store, [scale], batch_size, "cpu", indices=indices, progress=False)
    return len(indices) / (time.perf_counter() - start)


def bare_forward_rate(net, count, scale, batch_size) -> float:
    batches = [torch.rand(min(batch_size, count - start), 3, scale, scale).mul_(255)
               .contiguous(memory_format=torch.channels_last) for start in range(0, count, batch_size)]
    net.eval().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            net(x)
    return count / (time.perf_counter() - start)


@click.command()
@click.option("--prepared", default="data/prepared/train", show_default=True,
              help="an image store folder; 'none' or missing: random 28x28 grayscale images")
@click.option("--count", default=1536, show_default=True, help="images per timed run")
@click.option("--scale", default=64, show_default=True, help="input resolution (longer side)")
@click.option("--batch_size", default=128, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--pooling", default="gem", show_default=True)
@click.option("--threads", default=0, show_default=True, help="torch threads (0 = torch's default)")
@click.option("--rounds", default=3, show_default=True, help="alternating timing rounds; the best of each is kept")
def main(prepared, count, scale, batch_size, backbone, pooling, threads, rounds):
    if threads:
        torch.set_num_threads(threads)
    net = build_network(make_meta(backbone, pooling))
    with tempfile.TemporaryDirectory() as tmp:
        if prepared != "none" and (Path(prepared) / "manifest.parquet").is_file():
            store = ImageStore.open(prepared)
            where = prepared
        else:
            store = synthetic_store(Path(tmp) / "store", count)
            where = "synthetic 28x28 grayscale"
        count = min(count, len(store))
        indices = np.arange(count)
        stage_rate(net, store, indices[:batch_size], scale, batch_size)  # warm-up
        bare_forward_rate(net, batch_size, scale, batch_size)
        stage, bare = [], []
        for _ in range(rounds):
            stage.append(stage_rate(net, store, indices, scale, batch_size))
            bare.append(bare_forward_rate(net, count, scale, batch_size))
    print(f"store: {where}, images: {count}, backbone: {backbone}, pooling: {pooling}, "
          f"scale: {scale}, batch_size: {batch_size}, torch threads: {torch.get_num_threads()}")
    print(f"extract stage code path: {max(stage):8.1f} images/s  (rounds: {', '.join(f'{r:.1f}' for r in stage)})")
    print(f"bare forward pass:       {max(bare):8.1f} images/s  (rounds: {', '.join(f'{r:.1f}' for r in bare)})")
    print(f"ratio stage / bare:      {max(stage) / max(bare):8.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
