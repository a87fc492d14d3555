"""Batched multi-scale embedding of an image store with a network (docs/method.md section 1).

:func:`embed_store` is the one code path that turns images into descriptors:
the ``extract`` stage uses it with a pretrained network, later stages with a
fine-tuned one. Each image is converted to 3-channel float pixels, resized so
its longer side equals each scale, embedded (the network l2-normalizes), and
the per-scale descriptors are aggregated and l2-normalized again.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mom.distributed import balanced_pieces

AGGREGATIONS = ("sum", "gem")


def resized_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """``(h, w)`` after resizing so that the longer side is ``scale`` (aspect kept,
    shorter side rounded, at least 1)."""
    longer = max(height, width)
    return (
        max(1, int(round(height * scale / longer))),
        max(1, int(round(width * scale / longer))),
    )


def aggregate_scales(descriptors: Sequence[torch.Tensor], aggregation: str = "sum", p: float = 3.0) -> torch.Tensor:
    """Combine per-scale l2-normalized descriptors ``(B, d)`` into one, l2-normalized.

    ``sum``: ``l2n(sum_s v_s)``. ``gem``: ``l2n((mean_s v_s^p)^(1/p))``, the
    generalized mean of cnnimageretrieval-pytorch's multi-scale extraction;
    defined for non-negative descriptors only (no FC head, no whitening).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    stacked = torch.stack(list(descriptors))  # (S, B, d)
    if aggregation == "sum":
        combined = stacked.sum(dim=0)
    else:
        if bool((stacked < 0).any()):
            raise ValueError("aggregation 'gem' needs non-negative descriptors (a network without FC head); use 'sum'")
        combined = stacked.pow(p).mean(dim=0).pow(1.0 / p)
    return combined / combined.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _shapes_of(store, indices: np.ndarray) -> np.ndarray:
    """``(len(indices), 3)`` height, width, channels, from the store's manifest when it has one."""
    shapes = getattr(store, "shapes", None)
    if shapes is not None:
        return np.asarray(shapes)[indices]
    return np.array([store[int(i)].shape for i in indices], dtype=np.int64).reshape(-1, 3)


def plan_batches(shapes: np.ndarray, scales: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Batches of positions into ``shapes``: items whose resized sizes agree at
    every scale share a batch; groups in order of first appearance, items in
    their given order (so the plan, and hence the output bytes, is deterministic)."""
    groups: dict[tuple, list[int]] = {}
    for position, (height, width, _) in enumerate(shapes.tolist()):
        key = tuple(resized_size(height, width, scale) for scale in scales)
        groups.setdefault(key, []).append(position)
    batches = []
    for members in groups.values():
        members = np.asarray(members, dtype=np.int64)
        batches.extend(members[start:start + batch_size] for start in range(0, len(members), batch_size))
    return batches


def shard_items(store, scales: Sequence[int], batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Items of ``store`` that ``rank`` of ``world_size`` processes embeds: whole
    batches of the one-process plan (:func:`plan_batches` over all items),
    a contiguous run of them with about ``len(store) / world_size`` items.

    A descriptor's last bits depend on the batch it was computed in (kernels
    are chosen per batch shape), so every batch is kept as one process forms
    it: :func:`embed_store` over these items re-plans exactly these batches,
    and the gathered rows are byte-identical to a one-process run.
    """
    indices = np.arange(len(store), dtype=np.int64)
    batches = plan_batches(_shapes_of(store, indices), [int(scale) for scale in scales], batch_size)
    mine = balanced_pieces([len(batch) for batch in batches], world_size)[rank]
    return np.concatenate([batches[number] for number in mine]) if len(mine) else np.zeros(0, np.int64)


def _to_pixels(images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(h, w, c)`` images -> float ``(B, 3, *size)`` channels-last pixels in [0, 255].

    Images of one shape are resized together (one interpolation call); the
    bilinear filter is antialiased so downscaling does not alias.
    """
    if len({image.shape for image in images}) == 1:
        return _resize(torch.from_numpy(np.stack(images)), size)
    return torch.cat([_resize(torch.from_numpy(image[None].copy()), size) for image in images])


def _resize(batch_hwc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = batch_hwc.permute(0, 3, 1, 2).float()  # (B, c, h, w), channels-last strides
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last)


def _load_batch(store, items: np.ndarray, scales: Sequence[int]) -> list[torch.Tensor]:
    images = [store[int(item)] for item in items]
    height, width = images[0].shape[:2]
    return [_to_pixels(images, resized_size(height, width, scale)) for scale in scales]


def _prefetched(store, batches: list[np.ndarray], indices: np.ndarray, scales) -> Iterator[tuple[np.ndarray, list]]:
    """Yield ``(positions, per-scale pixels)``, reading/resizing the next batch in a
    background thread while the network runs on the current one."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, store, indices[batches[0]], scales)
        for number, positions in enumerate(batches):
            pixels = pending.result()
            if number + 1 < len(batches):
                pending = pool.submit(_load_batch, store, indices[batches[number + 1]], scales)
            yield positions, pixels


def embed_store(
    net: nn.Module,
    store,
    scales: Sequence[int] = (64,),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    aggregation: str = "sum",
    aggregation_p: float = 3.0,
    indices: Sequence[int] | None = None,
    out: np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Descriptors of ``store`` items, float32 ``(n, d)``, l2-normalized; row r is
    item ``indices[r]`` (all items in order when ``indices`` is None).

    ``net`` maps float RGB pixels ``(B, 3, H, W)`` in [0, 255] to l2-normalized
    ``(B, d)`` descriptors (:class:`mom.networks.EmbeddingNet`); it is moved to
    ``device`` and channels-last, run in eval mode under ``torch.inference_mode``,
    and put back in training mode afterwards if it was. ``scales``: longer image
    side in pixels, one or more; descriptors of several scales are combined by
    :func:`aggregate_scales`. ``out``: an optional preallocated ``(n, d)`` array
    (a memory map for large collections) to fill and return.
    """
    scales = [int(scale) for scale in scales]
    if not scales or min(scales) < 1:
        raise ValueError(f"scales must be positive integers, got {scales}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")
    indices = np.arange(len(store), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(store)):
        raise IndexError(f"indices must be in 0..{len(store) - 1}")
    dim = int(net.meta["dim"]) if hasattr(net, "meta") else None
    batches = plan_batches(_shapes_of(store, indices), scales, batch_size)

    was_training = net.training
    net.eval().to(device=device, memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            for positions, pixels in tqdm(_prefetched(store, batches, indices, scales), total=len(batches),
                                          desc="embed", unit="batch", disable=not progress, mininterval=2.0):
                per_scale = [net(x.to(device, non_blocking=True)) for x in pixels]
                descriptors = per_scale[0] if len(scales) == 1 else aggregate_scales(per_scale, aggregation, aggregation_p)
                if out is None:
                    dim = descriptors.shape[1] if dim is None else dim
                    out = np.zeros((len(indices), dim), dtype=np.float32)
                out[positions] = descriptors.float().cpu().numpy()
    finally:
        net.train(was_training)
    if out is None:  # no items
        out = np.zeros((0, dim or 0), dtype=np.float32)
    return out
