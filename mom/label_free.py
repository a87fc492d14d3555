"""Label-free evaluation of an embedding on held-out images (no labels, no ground truth).

What can honestly be measured without labels, on images that were never mined
nor trained on (a folder's ``new_images`` split, carved by ``prepare``):

- the proxy retrieval benchmark (:mod:`mom.proxy_retrieval`, its own stage):
  can the embedding find augmented copies of an image among the others? A
  higher mAP after fine-tuning means more invariance to those augmentations;
  it says nothing about semantic classes.
- ``manifold_agreement@k`` (:func:`mom.metrics.manifold_agreement`): the
  fraction of an image's k Euclidean nearest neighbours that are among its k
  manifold neighbours, where the manifold is built the method's way (reciprocal
  kNN graph, diffusion; method.md sections 2 and 4) from the *initial* features
  of the held-out images. Fine-tuning trains the network so that Euclidean
  neighbours follow the manifold; a rise on held-out images says that what was
  learned carries over to images the network never saw. It measures agreement
  with the method's own target, not correctness.
- ``neighbours_kept@k`` (:func:`mom.metrics.neighbour_overlap`): the fraction of
  an image's k nearest neighbours under the initial features that are still
  among its k nearest after fine-tuning. It measures how much fine-tuning
  changed the neighbourhoods (1 = unchanged), not whether for the better.
"""
from __future__ import annotations

import numpy as np

from mom import autosize, metrics
from mom.diffusion import manifold_neighbours
from mom.graph import knn_search, reciprocal_graph

K = 10          # neighbours compared per image
GAMMA = 3.0     # the graph's similarity power (the authors' and params.yaml's graph.gamma)
ALPHA = 0.99    # diffusion parameter (diffuse.alpha)


def measured_k(n: int) -> int:
    """The neighbourhood size compared on ``n`` held-out images: K, fewer for tiny splits."""
    return max(1, min(K, (n - 1) // 2))


def held_out_manifold(features: np.ndarray, depth: int) -> np.ndarray:
    """The first ``depth`` manifold neighbours (ids, -1 where fewer) of every
    item, from its own reciprocal kNN graph (``graph.k`` auto for ``n``) and
    diffusion."""
    n = len(features)
    graph_k = min(autosize.auto_size("graph.k", n), n - 1)
    ids, sims, _ = knn_search(np.ascontiguousarray(features, dtype=np.float32), graph_k, count_self=True)
    adjacency = reciprocal_graph(ids, sims, GAMMA)
    return manifold_neighbours(adjacency, np.arange(n), depth, alpha=ALPHA).ids


def measures(initial: np.ndarray, finetuned: np.ndarray) -> dict:
    """The label-free measures of the initial features and the fine-tuned
    embedding of the same held-out images (module doc)."""
    n = len(initial)
    k = measured_k(n)
    manifold = held_out_manifold(initial, k)
    return {
        "items": int(n),
        "k": k,
        "initial": {f"manifold_agreement_at_{k}": round(metrics.manifold_agreement(initial, manifold, k), 6)},
        "finetuned": {f"manifold_agreement_at_{k}": round(metrics.manifold_agreement(finetuned, manifold, k), 6)},
        f"neighbours_kept_at_{k}": round(metrics.neighbour_overlap(initial, finetuned, k), 6),
    }
