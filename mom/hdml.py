"""HDML, hardness-aware deep metric learning (Zheng, Chen, Lu, Zhou, CVPR 2019):
docs/method.md section 10, one function per equation.

Notation: ``y`` is the pooled descriptor (the trunk's feature, before the FC
head) and ``z = l2n(head(y))`` the embedding. The metric being trained is any
module with ``pooled(x) -> y`` and ``embed_pooled(y) -> z``
(:class:`mom.training.NetworkSuffix`) whose ``net.head`` is the FC layer. HDML
needs that head: its generator maps embeddings back to pooled features, which
are re-embedded through the head. A network without a head (``head_dim`` 0,
the retrieval model) is refused (:func:`synthesis_dims`): with ``z = l2n(y)``
the "synthetic features" would only be rescaled embeddings.

Gradient routing. Three parameter sets train, each by its own objective, and
every objective is built so that the gradient of their *sum* reaches each set
only from its own objective (one backward pass, so DDP averages all of them):

- the metric (trainable trunk stages and head): ``J_metric``. ``J_syn`` reaches
  the head directly and, as in the authors' code (no stop-gradient there),
  also flows back through the generator, whose parameters it never updates
  (:func:`generate_for_metric`), and the augmentation to the real embeddings;
- the generator: ``J_gen = J_recon + lambda J_soft``; it sees the embeddings
  detached (:func:`generate_for_generator`), the reconstruction target
  detached, and the softmax layer's weights detached (:func:`soft_loss`);
- the softmax layer: ``J_ce`` on the real features, detached (:func:`softmax_loss`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mom.losses import npair_loss, triplet_loss
from mom.metrics import kmeans_clusters

LAYOUTS = ("triplet", "npair")


# ------------------------------------------------------------ section 1: augmentation


def _decay(scale: float, signal: float) -> float:
    """``exp(-scale / signal)`` for ``scale, signal >= 0``, with its limits:
    0 at ``signal = 0`` (``scale > 0``), 1 at ``signal = inf`` or ``scale = 0``."""
    if not (scale >= 0 and signal >= 0):
        raise ValueError(f"need a scale >= 0 and a training signal >= 0, got {scale} and {signal}")
    if scale == 0 or math.isinf(signal):
        return 1.0
    if signal == 0:
        return 0.0
    return math.exp(-scale / signal)


def hardness_factor(alpha: float, j_avg: float) -> float:
    """``exp(-alpha / J_avg)``: the share of ``d- - d+`` a moved negative keeps;
    0 (as hard as the positive) as ``J_avg -> 0``, 1 (unchanged) as ``J_avg -> inf``."""
    return _decay(alpha, j_avg)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance over the last dimension, kept as a size-1 dimension."""
    return torch.linalg.vector_norm(a - b, dim=-1, keepdim=True)


def augment_negatives(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                      alpha: float, j_avg: float) -> torch.Tensor:
    """Hardness-aware augmentation (docs/method.md section 10.1), broadcast over the
    leading dimensions: where ``d- > d+``,
    ``z^- = z + [d+ + (d- - d+) exp(-alpha / J_avg)] / d- * (z- - z)``, else ``z^- = z-``."""
    factor = hardness_factor(alpha, j_avg)
    d_pos, d_neg = _distance(anchor, positive), _distance(anchor, negative)
    farther = d_neg > d_pos
    # where d- <= d+ the moved value is discarded; the clamp keeps its gradient finite (d- may be 0 there)
    scale = (d_pos + (d_neg - d_pos) * factor) / torch.where(farther, d_neg, torch.ones_like(d_neg))
    moved = anchor + scale * (negative - anchor)
    return torch.where(farther, moved, negative.expand_as(moved))


def farther_fraction(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per leading index, 1 where the negative is farther than the positive
    (``d- > d+``: the augmentation moves it, by a factor ``exp(-alpha / J_avg)``
    of ``d- - d+``), else 0."""
    with torch.no_grad():
        return (_distance(anchor, negative) > _distance(anchor, positive)).squeeze(-1).float()


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """``(n, n, ...)`` -> ``(n, n - 1, ...)``: row ``i`` without its column ``i``."""
    n = square.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=square.device)
    return square[keep].reshape(n, n - 1, *square.shape[2:])


def npair_negatives(anchor: torch.Tensor, positive: torch.Tensor, alpha: float, j_avg: float) -> torch.Tensor:
    """N-pair augmentation ``(n, n - 1, d)``: row ``i`` holds the other pairs'
    positives ``p_j`` (``j != i``, ascending), each moved towards anchor ``i``
    with anchor ``i``'s ``d+`` as the reference distance."""
    moved = augment_negatives(anchor[:, None], positive[:, None], positive[None, :], alpha, j_avg)
    return _off_diagonal(moved)


# ------------------------------------------------------------ section 2: generator


class Generator(nn.Module):
    """``i``: embedding ``z`` -> pooled feature ``y``; two fully connected layers,
    ``Linear(dim, hidden) -> ReLU -> Linear(hidden, channels)`` (the paper's 512
    hidden units; its batch norm after the first layer is left out, as the
    network trains in eval mode and batches are a few dozen tuples)."""

    def __init__(self, embedding_dim: int, feature_dim: int, hidden: int = 512):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def generate_for_metric(generator: Generator, z: torch.Tensor) -> torch.Tensor:
    """``i(z)`` with the generator's parameters detached: ``J_metric``'s gradient
    flows through ``i`` to ``z`` but never reaches ``i``'s parameters."""
    detached = {name: parameter.detach() for name, parameter in generator.named_parameters()}
    return torch.func.functional_call(generator, detached, (z,))


def generate_for_generator(generator: Generator, z: torch.Tensor) -> torch.Tensor:
    """``i(z)`` with ``z`` detached: ``J_gen``'s gradient reaches the generator only."""
    return generator(z.detach())


def reconstruction_loss(features: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """``J_recon`` per sample: ``||y - i(z)||^2`` (the real feature a target, detached)."""
    return (features.detach() - reconstructed).pow(2).sum(dim=-1)


def softmax_loss(softmax: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``J_ce`` per sample: cross-entropy of ``softmax(W y + b)`` on the real
    features (detached): trains the softmax layer only."""
    return nn.functional.cross_entropy(softmax(features.detach()), labels, reduction="none")


def soft_loss(softmax: nn.Linear, synthetic_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``J_soft`` per synthetic sample: cross-entropy of ``softmax(W y^- + b)``
    against the negative's label, ``(W, b)`` detached: its gradient reaches
    ``y^-`` (the generator) and never the softmax layer."""
    logits = nn.functional.linear(synthetic_features, softmax.weight.detach(), softmax.bias.detach())
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       reduction="none").reshape(labels.shape)


def generator_objective(j_recon: torch.Tensor, j_soft: torch.Tensor, lam: float) -> torch.Tensor:
    """``J_gen = J_recon + lambda J_soft``."""
    return j_recon + lam * j_soft


# ------------------------------------------------------------ section 3: metric objective


def synthesis_weight(beta: float, j_gen: float) -> float:
    """``exp(-beta / J_gen)``, the real tuples' weight in ``J_metric``: 1 while
    the generator is poor (``J_gen -> inf``), 0 once it is perfect (``J_gen -> 0``)."""
    return _decay(beta, j_gen)


def metric_objective(j_m: torch.Tensor, j_syn: torch.Tensor, beta: float, j_gen: float) -> torch.Tensor:
    """``J_metric = exp(-beta / J_gen) J_m + (1 - exp(-beta / J_gen)) J_syn``."""
    weight = synthesis_weight(beta, j_gen)
    return weight * j_m + (1.0 - weight) * j_syn


# ------------------------------------------------------------ without labels (hdml.md section 6)


def pseudo_labels(embeddings: np.ndarray, n_clusters: int, seed: int, n_init: int = 10) -> np.ndarray:
    """Pseudo-labels for HDML's softmax layer without class labels: the k-means
    clusters (:func:`mom.metrics.kmeans_clusters`) of the embeddings of the
    training items, ``0 .. n_clusters - 1``."""
    if not 2 <= n_clusters <= len(embeddings):
        raise ValueError(f"pseudo-labels need 2 .. {len(embeddings)} clusters, got {n_clusters}")
    return kmeans_clusters(embeddings, n_clusters, seed, n_init).astype(np.int64)


# ------------------------------------------------------------ the training status


@dataclass(frozen=True)
class TrainingStatus:
    """HDML's signals of how far training has come: the previous epoch's mean
    metric loss ``J_avg`` (on the real tuples) and mean generator loss ``J_gen``,
    per anchor. Infinite before the first epoch: no negative moves and the
    synthetic tuples get no weight until the generator has trained once."""

    j_avg: float = math.inf
    j_gen: float = math.inf


class StatusTracker:
    """Accumulates ``J_m`` and ``J_gen`` over an epoch; :meth:`end_epoch` makes
    their means the status of the next epoch (an empty epoch keeps the status)."""

    def __init__(self, status: TrainingStatus | None = None):
        self.status = status or TrainingStatus()
        self._sums = [0.0, 0.0, 0.0]  # J_m, J_gen, anchors

    def add(self, j_m: torch.Tensor, j_gen: torch.Tensor) -> None:
        """Record a batch's per-anchor ``J_m`` and ``J_gen``."""
        self._sums[0] += float(j_m.detach().sum())
        self._sums[1] += float(j_gen.detach().sum())
        self._sums[2] += float(j_m.numel())

    def totals(self) -> list[float]:
        """The epoch's sums ``[J_m, J_gen, anchors]`` (for a sum over ranks)."""
        return list(self._sums)

    def end_epoch(self, totals: list[float] | None = None) -> TrainingStatus:
        """Close the epoch with ``totals`` (default: this tracker's own)."""
        j_m, j_gen, count = totals if totals is not None else self._sums
        if count > 0:
            self.status = TrainingStatus(j_avg=j_m / count, j_gen=j_gen / count)
        self._sums = [0.0, 0.0, 0.0]
        return self.status

    def state_dict(self) -> dict:
        return {"j_avg": self.status.j_avg, "j_gen": self.status.j_gen}

    def load_state_dict(self, state: dict) -> None:
        self.status = TrainingStatus(float(state["j_avg"]), float(state["j_gen"]))
        self._sums = [0.0, 0.0, 0.0]


# ------------------------------------------------------------ the whole objective


@dataclass(frozen=True)
class HDMLSettings:
    alpha: float = 7.0        # pulling factor (paper: 7 triplet, 90 N-pair)
    beta: float = 5e3         # synthetic weight's scale
    lam: float = 0.5          # lambda: weight of J_soft in J_gen
    margin: float = 0.5       # triplet margin
    npair_l2: float = 0.0     # N-pair embedding l2 penalty

    def check(self) -> None:
        for name in ("alpha", "beta", "lam", "npair_l2"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")


def synthesis_dims(net: nn.Module | None) -> tuple[int, int]:
    """``(embedding dim, pooled feature dim)`` of an ``EmbeddingNet``'s head;
    ValueError without a head."""
    head = getattr(net, "head", None)
    if head is None:
        raise ValueError("HDML needs an FC head (head_dim > 0): synthetic features are re-embedded through it")
    return head.out_features, head.in_features


class HDML(nn.Module):
    """The metric and HDML's own trainable parts (generator; softmax layer when
    there are ``n_classes`` labels or pseudo-labels, else ``J_soft`` is off).
    ``forward`` returns the per-anchor terms of :func:`triplet_terms` or
    :func:`npair_terms`; back-propagating ``terms["total"]`` trains all three
    parameter sets by their own objectives (module docstring)."""

    def __init__(self, metric: nn.Module, n_classes: int | None = None, hidden: int = 512, seed: int = 0):
        super().__init__()
        embedding_dim, feature_dim = synthesis_dims(getattr(metric, "net", None))
        self.metric = metric
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = Generator(embedding_dim, feature_dim, hidden)
            self.softmax = nn.Linear(feature_dim, n_classes) if n_classes else None

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    def softmax_parameters(self) -> list[nn.Parameter]:
        return [] if self.softmax is None else list(self.softmax.parameters())

    def forward(self, x: torch.Tensor, layout: str, status: TrainingStatus, settings: HDMLSettings,
                labels: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                groups: int = 1) -> dict[str, torch.Tensor]:
        """Per-anchor terms of the rows ``x`` (inputs of the metric): one block
        of triplets, or ``groups`` consecutive N-pair groups of equal size."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if (labels is None) != (self.softmax is None):
            raise ValueError("labels are needed exactly when the model has a softmax layer (n_classes)")
        features = self.metric.pooled(x)
        embeddings = self.metric.embed_pooled(features)
        if layout == "triplet":
            return triplet_terms(self, features, embeddings, status, settings, labels, weights)
        if weights is not None:
            raise ValueError("the N-pair layout takes no tuple weights")
        if len(x) % groups:
            raise ValueError(f"{len(x)} rows do not split into {groups} equal N-pair groups")
        group_labels = [None] * groups if labels is None else labels.chunk(groups)
        per_group = [npair_terms(self, group_features, group_embeddings, status, settings, group_label)
                     for group_features, group_embeddings, group_label
                     in zip(features.chunk(groups), embeddings.chunk(groups), group_labels)]
        return {name: torch.cat([terms[name] for terms in per_group]) for name in per_group[0]}


def _per_anchor(per_row: torch.Tensor, rows_per_anchor: int) -> torch.Tensor:
    """Mean over each anchor's rows, laid out as ``rows_per_anchor`` blocks."""
    return per_row.reshape(rows_per_anchor, -1).mean(dim=0)


def _combine(model: HDML, settings: HDMLSettings, status: TrainingStatus, terms: dict,
             features: torch.Tensor, generated: torch.Tensor, rows_per_anchor: int,
             labels: torch.Tensor | None, synthetic_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Add the generator's and softmax layer's terms and the weighted totals."""
    n_real = len(features)
    terms["j_recon"] = _per_anchor(reconstruction_loss(features, generated[:n_real]), rows_per_anchor)
    if labels is None:
        terms["j_soft"] = torch.zeros_like(terms["j_recon"])
        terms["j_ce"] = torch.zeros_like(terms["j_recon"])
    else:
        synthetic = generated[n_real:].reshape(*synthetic_labels.shape, -1)
        terms["j_soft"] = soft_loss(model.softmax, synthetic, synthetic_labels).reshape(len(terms["j_m"]), -1).mean(1)
        terms["j_ce"] = _per_anchor(softmax_loss(model.softmax, features, labels), rows_per_anchor)
    terms["j_metric"] = metric_objective(terms["j_m"], terms["j_syn"], settings.beta, status.j_gen)
    terms["j_gen"] = generator_objective(terms["j_recon"], terms["j_soft"], settings.lam)
    terms["total"] = terms["j_metric"] + terms["j_gen"] + terms["j_ce"]
    return terms


def triplet_terms(model: HDML, features: torch.Tensor, embeddings: torch.Tensor, status: TrainingStatus,
                  settings: HDMLSettings, labels: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-tuple HDML terms for ``b`` triplets, rows laid out ``[anchors;
    positives; negatives]`` (``features`` ``(3b, channels)``, ``embeddings``
    ``(3b, d)``, ``labels`` ``(3b,)``; ``weights`` ``(b,)`` multiply ``J_m``
    and ``J_syn``, the weighted variant of docs/method.md section 6).

    ``J_m`` = triplet loss of the real tuple; ``J_syn`` = triplet loss of
    ``(f(i(z)), f(i(z+)), f(i(z^-)))``; ``J_recon`` and ``J_ce`` = means over
    the tuple's three real rows; ``J_soft`` on ``i(z^-)`` with the negative's label.
    """
    if len(embeddings) % 3:
        raise ValueError(f"triplet rows come in three blocks, got {len(embeddings)} rows")
    anchor, positive, negative = embeddings.chunk(3)
    moved = augment_negatives(anchor, positive, negative, settings.alpha, status.j_avg)
    synthetic = model.metric.embed_pooled(generate_for_metric(model.generator, torch.cat([anchor, positive, moved])))
    terms = {"j_m": triplet_loss(anchor, positive, negative, settings.margin),
             "j_syn": triplet_loss(*synthetic.chunk(3), settings.margin),
             "farther": farther_fraction(anchor, positive, negative)}
    if weights is not None:
        weights = weights.to(terms["j_m"].dtype)
        terms["j_m"], terms["j_syn"] = terms["j_m"] * weights, terms["j_syn"] * weights
    generated = generate_for_generator(model.generator, torch.cat([embeddings, moved]))
    negative_labels = None if labels is None else labels.chunk(3)[2]
    return _combine(model, settings, status, terms, features, generated, 3, labels, negative_labels)


def npair_terms(model: HDML, features: torch.Tensor, embeddings: torch.Tensor, status: TrainingStatus,
                settings: HDMLSettings, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-anchor HDML terms for ``n`` pairs of distinct classes, rows laid out
    ``[anchors; positives]`` (``features`` ``(2n, channels)``, ``embeddings``
    ``(2n, d)``, ``labels`` ``(2n,)``).

    ``J_m`` = N-pair loss of the real pairs (negatives of anchor ``i``: the
    other positives); ``J_syn`` = N-pair loss of the re-embedded anchors and
    positives, with anchor ``i``'s moved negatives (:func:`npair_negatives`)
    re-embedded as its negatives; ``J_recon``, ``J_ce`` = means over the pair's
    two real rows; ``J_soft`` = mean over anchor ``i``'s moved negatives.
    """
    if len(embeddings) % 2 or len(embeddings) < 4:
        raise ValueError(f"N-pair rows come in two blocks of at least 2 pairs, got {len(embeddings)} rows")
    anchor, positive = embeddings.chunk(2)
    n = len(anchor)
    if labels is not None and len(torch.unique(labels[:n])) != n:
        raise ValueError("an N-pair batch needs pairs of distinct classes")
    moved = npair_negatives(anchor, positive, settings.alpha, status.j_avg)  # (n, n - 1, d)
    synthetic = model.metric.embed_pooled(
        generate_for_metric(model.generator, torch.cat([anchor, positive, moved.reshape(-1, moved.shape[-1])])))
    synthetic_anchor, synthetic_positive = synthetic[:n], synthetic[n:2 * n]
    synthetic_negatives = synthetic[2 * n:].reshape(n, n - 1, -1)
    terms = {"j_m": npair_loss(anchor, positive, l2_reg=settings.npair_l2),
             "j_syn": npair_loss(synthetic_anchor, synthetic_positive, synthetic_negatives, settings.npair_l2),
             "farther": farther_fraction(anchor[:, None], positive[:, None], _off_diagonal(
                 positive[None].expand(n, n, -1))).mean(1)}
    generated = generate_for_generator(model.generator, torch.cat([embeddings, moved.reshape(-1, moved.shape[-1])]))
    negative_labels = None if labels is None else _off_diagonal(labels[n:][None].expand(n, n))
    return _combine(model, settings, status, terms, features, generated, 2, labels, negative_labels)
