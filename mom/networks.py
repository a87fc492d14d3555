"""The embedding network: backbone trunk + global pooling + optional FC head + l2 (method.md sections 1, 6).

``EmbeddingNet`` takes RGB pixels in ``[0, 255]`` (float, ``(B, 3, H, W)``),
normalizes them as its backbone expects, and returns l2-normalized descriptors.
Its ``meta`` dict fully describes how to rebuild it (:func:`build_network`);
checkpoints store ``meta`` with the weights (:func:`save_checkpoint`,
:func:`load_checkpoint`).

Freezing a prefix (for fine-tuning only the last blocks on a CPU):
``net.trunk_blocks()`` lists the trunk's stages in order as ``(name, module)``;
``net.forward_from(x, start)`` runs stages ``start..`` then pooling and head, where
``x`` is pixels when ``start == 0`` and otherwise the output of stage
``start - 1``. So with ``prefix = net.trunk[:start]`` (an ``nn.Sequential``),
``net.forward_from(prefix(net.normalize(pixels)), start) == net(pixels)``, and the
frozen prefix's output can be computed once and cached.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from mom import artifacts, backbones
from mom.errors import InputError
from mom.extraction import AGGREGATIONS
from mom.pooling import POOLINGS, l2n, make_pooling

CHECKPOINT_FORMAT = 1
META_KEYS = ("backbone", "pooling", "gem_p", "head_dim", "normalization", "channels", "dim")


def make_meta(backbone: str, pooling: str = "gem", gem_p: float = 3.0, head_dim: int | None = None) -> dict:
    """The ``meta`` of a network: everything needed to rebuild it."""
    channels = backbones.channels_of(backbone)
    meta = {
        "backbone": backbone,
        "pooling": pooling,
        "gem_p": float(gem_p),
        "head_dim": None if head_dim is None else int(head_dim),
        "normalization": backbones.normalization_of(backbone),
        "channels": channels,
        "dim": channels if head_dim is None else int(head_dim),
    }
    check_meta(meta)
    return meta


def check_meta(meta: dict) -> None:
    """Raise :class:`InputError` unless ``meta`` describes a network this code can build."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise InputError(f"network meta: missing keys {missing}")
    if meta["backbone"] not in backbones.BACKBONES:
        raise InputError(f"network meta: backbone must be one of {list(backbones.BACKBONES)}, got {meta['backbone']!r}")
    if meta["pooling"] not in POOLINGS:
        raise InputError(f"network meta: pooling must be one of {list(POOLINGS)}, got {meta['pooling']!r}")
    if not float(meta["gem_p"]) > 0:
        raise InputError(f"network meta: gem_p must be positive, got {meta['gem_p']}")
    if meta["head_dim"] is not None and int(meta["head_dim"]) < 1:
        raise InputError(f"network meta: head_dim must be a positive integer or None, got {meta['head_dim']}")
    if meta["channels"] != backbones.channels_of(meta["backbone"]):
        raise InputError(f"network meta: backbone {meta['backbone']} has {backbones.channels_of(meta['backbone'])} channels, meta says {meta['channels']}")


class EmbeddingNet(nn.Module):
    """Pixels -> normalize -> trunk -> pooling -> [FC head] -> l2-normalize."""

    def __init__(self, meta: dict, trunk: nn.Sequential):
        super().__init__()
        check_meta(meta)
        self.meta = dict(meta)
        self.trunk = trunk
        self.pool = make_pooling(meta["pooling"], meta["gem_p"])
        self.head = None if meta["head_dim"] is None else nn.Linear(meta["channels"], meta["head_dim"])
        mean = torch.tensor(meta["normalization"]["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(meta["normalization"]["std"], dtype=torch.float32).view(1, 3, 1, 1)
        # constants of the backbone (in meta), not weights: kept out of the state dict
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(pixels - mean) / std``: the input normalization the backbone was trained with."""
        return (pixels - self.pixel_mean) / self.pixel_std

    def trunk_blocks(self) -> list[tuple[str, nn.Module]]:
        """The trunk's stages in order, as ``(name, module)``."""
        return list(self.trunk.named_children())

    def embed_feature_map(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Pool the last conv map, apply the head if any, l2-normalize: ``(B, dim)``."""
        descriptor = self.pool(feature_map)
        if self.head is not None:
            descriptor = self.head(descriptor)
        return l2n(descriptor)

    def forward_from(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Run trunk stages ``start..`` on ``x`` (pixels if ``start == 0``, else the
        output of stage ``start - 1``), then pooling and head."""
        if not 0 <= start <= len(self.trunk):
            raise ValueError(f"start must be in 0..{len(self.trunk)}, got {start}")
        if start == 0:
            x = self.normalize(x)
        for block in self.trunk[start:]:
            x = block(x)
        return self.embed_feature_map(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed_feature_map(self.trunk(self.normalize(pixels)))


def build_network(meta: dict, load_pretrained: bool = True, weights: str | os.PathLike | None = None,
                  download: bool = False, seed: int = 0) -> EmbeddingNet:
    """The network ``meta`` describes, in eval mode.

    ``load_pretrained``: the trunk gets its ImageNet weights (``weights``: a local
    file, else the default source, see :func:`mom.backbones.load_backbone`);
    otherwise the trunk is randomly initialized, to be overwritten by a
    checkpoint. The FC head (if any) is initialized from ``seed``, so the same
    call gives the same network.
    """
    check_meta(meta)
    backbone = backbones.load_backbone(meta["backbone"], weights=weights, download=download, pretrained=load_pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EmbeddingNet(meta, backbone.trunk)
    return net.eval()


def save_checkpoint(path: str | os.PathLike, net: EmbeddingNet, extra: dict | None = None) -> None:
    """Write ``{"format", "meta", "state_dict", "extra"}`` atomically.

    ``extra`` holds whatever the caller wants back (epoch, optimizer state,
    history): plain Python types and tensors only, so ``weights_only`` loading
    reads it. The archive is written through a file handle so its bytes do not
    depend on the temporary file's name.
    """
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "meta": net.meta, "state_dict": state, "extra": extra or {}}
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[EmbeddingNet, dict]:
    """Rebuild the network of a checkpoint from its ``meta`` and load its weights:
    ``(net in eval mode, extra)``."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found (run the stage that writes it first)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or not {"meta", "state_dict"} <= set(payload):
        raise InputError(f"{path}: not a checkpoint of this project (expected keys meta and state_dict)")
    net = build_network(payload["meta"], load_pretrained=False)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise InputError(f"{path}: weights do not fit the network its meta describes ({error})") from None
    return net.to(map_location).eval(), payload.get("extra", {})


def embedding_settings(extra: dict, scales, aggregation) -> tuple[list[int], str]:
    """Scales and multi-scale aggregation to embed with a fine-tuned network: the
    given ones, else those the checkpoint's ``extra["embedding"]`` recorded."""
    recorded = extra.get("embedding", {})
    scales = list(scales) or list(recorded.get("scales", [64]))
    aggregation = aggregation or recorded.get("aggregation", "sum")
    if min(scales) < 8:
        raise InputError(f"scales: need one or more sizes >= 8 pixels, got {scales}")
    if aggregation not in AGGREGATIONS:
        raise InputError(f"aggregation: must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return scales, aggregation
