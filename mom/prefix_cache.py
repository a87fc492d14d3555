"""Frozen-prefix outputs computed once and shared between runs.

Fine-tuning freezes the first trunk stages (``finetune.trainable_blocks``), and
with the default two trainable stages the frozen prefix holds ~80% of the
network's FLOPs at 64 px. Every run that starts from the same pretrained
weights computes the same prefix outputs: the fine-tuning of the training and
validation splits, and the embedding of the evaluation splits (the prefix of a
fine-tuned network is still the pretrained one). The Table 1 grid runs 39 such
cells; a prefix cache folder lets them share one computation.

A cache folder holds, per split, ``<split>.npy``: float32 ``(n, C, H, W)``, the
prefix's output for every item of the split, in store order, resized square to
``image_size`` (:class:`mom.training.SquarePixels`); and ``prefix.json``, what
produced them: the first trainable stage, the image size, a digest of the
frozen stages' weights and, per split, the item count and a digest of the
split's files. A run reads a split's outputs only when all of these match its
own network and images, and refuses with one line otherwise. The outputs are
what the run would compute itself, by the same functions: bit-identical where
the batches are the same (a whole split in order, at the run's batch size: the
default's fine-tuning and evaluation), equal up to float rounding otherwise
(oneDNN's kernels round differently at other batch sizes), as
tests/test_prefix_cache.py checks.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from mom import artifacts
from mom.errors import InputError

RECORD_NAME = "prefix.json"
FORMAT = "mom-prefix-cache/1"


def frozen_digest(net: torch.nn.Module, start: int) -> str:
    """sha256 of what the prefix computes with: the input normalization and the
    weights and buffers of trunk stages ``0..start-1``."""
    digest = hashlib.sha256(f"start={int(start)}".encode())
    tensors = [("pixel_mean", net.pixel_mean), ("pixel_std", net.pixel_std)]
    for index, (name, module) in enumerate(net.trunk_blocks()[:start]):
        tensors += [(f"{index}.{name}.{key}", value) for key, value in module.state_dict().items()]
    for key, value in tensors:
        array = value.detach().cpu().contiguous().numpy()
        digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def split_digest(folder: str | os.PathLike) -> str:
    """sha256 of a prepared split's files (its manifest and pixels)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def write_cache(out_dir: str | os.PathLike, net, start: int, image_size: int, outputs: dict) -> dict:
    """Write the prefix outputs ``{split: (folder, float32 tensor (n, C, H, W))}``
    of ``net``'s frozen stages ``0..start-1`` and the record; return the record."""
    out_dir = Path(out_dir)
    record = {"format": FORMAT, "start": int(start), "image_size": int(image_size),
              "frozen_digest": frozen_digest(net, start), "splits": {}}
    for name, (folder, tensor) in outputs.items():
        artifacts.save_npy(out_dir / f"{name}.npy", tensor.numpy().astype(np.float32, copy=False))
        record["splits"][name] = {"items": len(tensor), "shape": list(tensor.shape[1:]), "digest": split_digest(folder)}
    artifacts.save_json(out_dir / RECORD_NAME, record)
    return record


def read_record(cache_dir: str | os.PathLike) -> dict:
    path = Path(cache_dir) / RECORD_NAME
    record = artifacts.load_json(artifacts.require_file(path))
    if record.get("format") != FORMAT or not isinstance(record.get("splits"), dict):
        raise InputError(f"{path}: not a prefix cache record ({FORMAT}); rebuild it with the prefix stage")
    return record


def read_outputs(cache_dir: str | os.PathLike, store, net, start: int, image_size: int) -> torch.Tensor:
    """The cached prefix outputs of ``store``'s split (named by its folder; every item, in order),
    after checking that they are what ``net``'s frozen stages ``0..start-1`` give
    for these images at ``image_size``; :class:`InputError` naming the mismatch."""
    cache_dir, split = Path(cache_dir), Path(store.folder).name
    record = read_record(cache_dir)
    entry = record["splits"].get(split)
    where = f"{cache_dir}: prefix cache"
    if entry is None:
        raise InputError(f"{where} has no split {split!r} (it holds {sorted(record['splits'])})")
    if (record["start"], record["image_size"]) != (int(start), int(image_size)):
        raise InputError(f"{where} of trunk stages 0..{record['start'] - 1} at {record['image_size']} px; this run "
                         f"freezes stages 0..{int(start) - 1} at {int(image_size)} px")
    if record["frozen_digest"] != frozen_digest(net, start):
        raise InputError(f"{where} was computed with other frozen weights than this network's")
    if entry["digest"] != split_digest(store.folder) or entry["items"] != len(store):
        raise InputError(f"{where}: split {split!r} was computed from other images than {store.folder}")
    outputs = artifacts.load_npy(cache_dir / f"{split}.npy")
    if outputs.shape != (len(store), *entry["shape"]) or outputs.dtype != np.float32:
        raise InputError(f"{cache_dir / split}.npy: {outputs.dtype} {outputs.shape}, the record says float32 "
                         f"{(len(store), *entry['shape'])}; rebuild the cache")
    return torch.from_numpy(outputs)


def embed_cached(net, outputs: torch.Tensor, start: int, batch_size: int) -> np.ndarray:
    """``net``'s l2-normalized descriptors ``(n, d)`` of the items whose prefix
    outputs are ``outputs``: its stages ``start..``, pooling and head, run as
    :func:`mom.extraction.embed_store` runs the whole network (eval mode, channels-last)."""
    was_training = net.training
    net.eval().to(memory_format=torch.channels_last)
    descriptors = []
    try:
        with torch.inference_mode():
            for first in range(0, len(outputs), batch_size):
                batch = outputs[first:first + batch_size].contiguous(memory_format=torch.channels_last)
                descriptors.append(net.forward_from(batch, start).float().numpy())
    finally:
        net.train(was_training)
    return np.concatenate(descriptors) if descriptors else np.zeros((0, net.dim), np.float32)


def embed_split(cache_dir: str | os.PathLike, net, store, scales, batch_size: int) -> np.ndarray:
    """``net``'s descriptors of every item of ``store`` from the cached prefix
    outputs: what ``embed_store(net, store, scales)`` gives, for a single scale
    equal to the cache's image size and square images (the cache resizes square)."""
    record = read_record(cache_dir)
    start, size = record["start"], record["image_size"]
    if [int(scale) for scale in scales] != [size]:
        raise InputError(f"{cache_dir}: prefix cache at {size} px; this embedding is at scales {list(scales)}")
    shapes = store.shapes
    if len(shapes) and (shapes[:, 0] != shapes[:, 1]).any():
        raise InputError(f"{store.folder}: images of several aspect ratios: the prefix cache's square resize "
                         "is not the embedding's (embed without --prefix-cache)")
    return embed_cached(net, read_outputs(cache_dir, store, net, start, size), start, batch_size)
