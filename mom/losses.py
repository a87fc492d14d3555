"""Tuple losses of docs/method.md section 6 (eqs. (7)-(8)) and HDML's N-pair loss
(docs/method.md section 10).

Every function takes embeddings of anchors, positives and negatives, each
``(b, d)`` and l2-normalized by the network, and returns the per-tuple losses
``(b,)``; :func:`reduce_losses` turns them into the scalar to back-propagate.
The N-pair loss returns one loss per anchor of its batch of pairs.
"""
from __future__ import annotations

import torch


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """``||z_r - z+||^2 + [m - ||z_r - z-||]_+^2`` per tuple (docs/method.md eq. (7))."""
    positive_term = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = (anchor - negative).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()
    return positive_term + torch.relu(margin - negative_distance).pow(2)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """``[m + ||z_r - z+||^2 - ||z_r - z-||^2]_+`` per tuple, squared distances
    as in the authors' code (docs/method.md eq. (8))."""
    positive_distance = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = (anchor - negative).pow(2).sum(dim=1)
    return torch.relu(margin + positive_distance - negative_distance)


def npair_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None,
               l2_reg: float = 0.0) -> torch.Tensor:
    """N-pair loss (Sohn 2016) per anchor (docs/method.md section 10):
    ``log(1 + sum_k exp(a . n_k - a . p)) + l2_reg / 4 * (||a||^2 + ||p||^2)``.

    ``anchor``, ``positive``: ``(n, d)``, pair ``i`` of a batch of ``n`` pairs of
    distinct classes. ``negatives``: ``(n, k, d)``, anchor ``i``'s own negatives;
    by default (the plain N-pair loss) the other anchors' positives, ``k = n - 1``.
    The l2 penalty on the embeddings is the authors' (TensorFlow's
    ``npairs_loss``: ``0.25 * reg_lambda``); on l2-normalized embeddings it is
    the constant ``l2_reg / 2`` and contributes no gradient.
    """
    positive_logit = (anchor * positive).sum(dim=1, keepdim=True)
    if negatives is None:
        # row i of a . p^T holds a_i . p_j; its diagonal (j = i) contributes exp(0) = the 1 of log(1 + ...)
        logits = anchor @ positive.T - positive_logit
    else:
        negative_logits = torch.einsum("nd,nkd->nk", anchor, negatives) - positive_logit
        logits = torch.cat([torch.zeros_like(positive_logit), negative_logits], dim=1)
    penalty = 0.25 * l2_reg * (anchor.pow(2).sum(dim=1) + positive.pow(2).sum(dim=1))
    return torch.logsumexp(logits, dim=1) + penalty


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
