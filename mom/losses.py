"""Tuple losses of method.md section 6 (eqs. (7)-(8)).

Every function takes embeddings of anchors, positives and negatives, each
``(b, d)`` and l2-normalized by the network, and returns the per-tuple losses
``(b,)``; :func:`reduce_losses` turns them into the scalar to back-propagate.
"""
from __future__ import annotations

import torch


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """``||z_r - z+||^2 + [m - ||z_r - z-||]_+^2`` per tuple (method.md eq. (7))."""
    positive_term = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = (anchor - negative).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()
    return positive_term + torch.relu(margin - negative_distance).pow(2)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """``[m + ||z_r - z+||^2 - ||z_r - z-||^2]_+`` per tuple, squared distances
    as in the authors' code (method.md eq. (8))."""
    positive_distance = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = (anchor - negative).pow(2).sum(dim=1)
    return torch.relu(margin + positive_distance - negative_distance)


LOSSES = {"contrastive": contrastive_loss, "triplet": triplet_loss}


def tuple_losses(
    kind: str,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-tuple loss of ``kind`` (contrastive | triplet); the weighted variant
    multiplies each tuple's loss by its weight (the positive's manifold
    similarity ``s_m(x_r, x+)``)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {kind!r}")
    losses = LOSSES[kind](anchor, positive, negative, margin)
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses


def reduce_losses(losses: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``mean`` or ``sum`` of the per-tuple losses."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def active_fraction(losses: torch.Tensor) -> float:
    """Fraction of tuples with a non-zero loss (the training log's 'active')."""
    return float((losses > 0).float().mean()) if losses.numel() else 0.0
