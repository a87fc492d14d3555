"""Global pooling of a convolutional feature map into one descriptor (docs/method.md section 1).

Pure functions on ``(B, C, H, W)`` tensors returning ``(B, C)``, plus thin
``nn.Module`` wrappers. None of them l2-normalizes its output except
:func:`rmac` (whose definition includes the normalizations);
:class:`mom.networks.EmbeddingNet` normalizes after pooling.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
POOLINGS = ("mac", "spoc", "gem", "rmac")

# R-MAC: desired overlap of neighbouring regions, and the candidate numbers of
# regions along the longer side at the coarsest level (Tolias et al. 2016).
RMAC_OVERLAP = 0.4
RMAC_LONG_STEPS = (2, 3, 4, 5, 6, 7)


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC: per-channel maximum over the spatial map."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """SPoC: per-channel mean over the spatial map."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = EPS) -> torch.Tensor:
    """GeM(p): ``(mean(x^p))^(1/p)`` per channel, activations clamped at ``eps``
    so fractional powers are defined (p = 1 is SPoC, p -> inf tends to MAC)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Rows of ``x`` divided by their l2 norm (plus ``eps``, so zero rows stay zero)."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


def rmac_extra_steps(height: int, width: int, overlap: float = RMAC_OVERLAP) -> int:
    """How many more regions the longer side gets than the shorter one.

    At the coarsest level the square regions have the side ``s = min(h, w)``;
    with ``n`` regions along the longer side ``L`` the step is
    ``b = (L - s) / (n - 1)`` and the overlap of neighbours ``1 - b / s``. The
    ``n`` in :data:`RMAC_LONG_STEPS` whose overlap is nearest to ``overlap`` wins
    (first on ties); the extra count is ``n - 1``. Square maps get 0.
    """
    short, long = min(height, width), max(height, width)
    if short == long:
        return 0
    gaps = [abs(1.0 - (long - short) / (n - 1) / short - overlap) for n in RMAC_LONG_STEPS]
    return RMAC_LONG_STEPS[gaps.index(min(gaps))] - 1


def _region_starts(length: int, side: int, count: int) -> list[int]:
    """``count`` start offsets of windows of ``side`` spread evenly over ``length``
    (first at 0, last at ``length - side``)."""
    if count == 1:
        return [0]
    # floor(i * (length - side) / (count - 1)) in integers: exact, no rounding surprises
    return [(i * (length - side)) // (count - 1) for i in range(count)]


@lru_cache(maxsize=256)
def rmac_regions(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int, int], ...]:
    """The R-MAC regions of an ``height x width`` map as ``(top, left, h, w)``.

    The first region is the whole map (the convention of cnnimageretrieval-pytorch,
    which adds the global MAC to the regional ones). Level ``l = 1..levels`` has
    square regions of side ``floor(2 min(h, w) / (l + 1))``, ``l`` of them along
    the shorter side and ``l + e`` along the longer (``e`` from
    :func:`rmac_extra_steps`), evenly spaced from edge to edge (about 40% overlap).
    Levels whose side would be 0 are skipped. Regions may repeat on tiny maps;
    repeats count in the sum, as in the reference implementation.
    """
    if height < 1 or width < 1 or levels < 1:
        raise ValueError(f"rmac_regions: need height, width, levels >= 1, got {height}, {width}, {levels}")
    extra = rmac_extra_steps(height, width)
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        side = (2 * min(height, width)) // (level + 1)
        if side == 0:
            continue
        tops = _region_starts(height, side, level + extra_h)
        lefts = _region_starts(width, side, level + extra_w)
        regions.extend((top, left, side, side) for top in tops for left in lefts)
    return tuple(regions)


def rmac(x: torch.Tensor, levels: int = 3, eps: float = EPS) -> torch.Tensor:
    """R-MAC: MAC of every region of :func:`rmac_regions`, each l2-normalized,
    summed, and the sum l2-normalized.

    Regions of one side are read off a single stride-1 max-pooling of the map.
    """
    height, width = x.shape[-2:]
    regions = rmac_regions(int(height), int(width), levels)
    total = torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for top, left, h, w in regions:
        by_shape.setdefault((h, w), []).append((top, left))
    for (h, w), corners in by_shape.items():
        pooled = F.max_pool2d(x, kernel_size=(h, w), stride=1)  # (B, C, H - h + 1, W - w + 1)
        tops = torch.tensor([top for top, _ in corners], device=x.device)
        lefts = torch.tensor([left for _, left in corners], device=x.device)
        region_macs = pooled[:, :, tops, lefts]  # (B, C, regions)
        total = total + l2n(region_macs.transpose(1, 2), eps).sum(dim=1)
    return l2n(total, eps)


class MAC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mac(x)


class SPoC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spoc(x)


class GeM(nn.Module):
    """GeM pooling with a fixed exponent, or a learnable one (``learn_p=True``)."""

    def __init__(self, p: float = 3.0, learn_p: bool = False, eps: float = EPS):
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM: p must be positive, got {p}")
        self.eps = eps
        if learn_p:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            # persistent, so a checkpoint of a learned p loads into a fixed-p module
            self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, learnable={isinstance(self.p, nn.Parameter)}"


class RMAC(nn.Module):
    def __init__(self, levels: int = 3):
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmac(x, self.levels)


def make_pooling(name: str, gem_p: float = 3.0, learn_p: bool = False) -> nn.Module:
    """The pooling module called ``name`` (one of :data:`POOLINGS`)."""
    if name == "mac":
        return MAC()
    if name == "spoc":
        return SPoC()
    if name == "gem":
        return GeM(gem_p, learn_p=learn_p)
    if name == "rmac":
        return RMAC()
    raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {name!r}")
