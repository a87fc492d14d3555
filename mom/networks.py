"""The embedding network: backbone trunk + global pooling + optional FC head + l2 (docs/method.md sections 1, 6).

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

import math
import os

import torch
from torch import nn

from mom import artifacts, backbones
from mom.errors import InputError
from mom.extraction import AGGREGATIONS
from mom.pooling import POOLINGS, l2n, make_pooling

CHECKPOINT_FORMAT = 1
META_KEYS = ("backbone", "pooling", "gem_p", "head_dim", "normalization", "channels", "dim")
MAX_HEAD_DIM = 65536
MAX_GEM_P = 1000.0


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
    """Raise :class:`InputError` unless ``meta`` describes a network this code can
    build, within sane bounds (checked before anything is allocated)."""
    if not isinstance(meta, dict):
        raise InputError(f"network meta: expected a dict, got {type(meta).__name__}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise InputError(f"network meta: missing keys {missing} (not a network of this project?)")
    if not isinstance(meta["backbone"], str) or meta["backbone"] not in backbones.BACKBONES:
        raise InputError(f"network meta: backbone must be one of {list(backbones.BACKBONES)}, got {_shown(meta['backbone'])}")
    if not isinstance(meta["pooling"], str) or meta["pooling"] not in POOLINGS:
        raise InputError(f"network meta: pooling must be one of {list(POOLINGS)}, got {_shown(meta['pooling'])}")
    if not _is_number(meta["gem_p"]) or not 0 < meta["gem_p"] <= MAX_GEM_P:
        raise InputError(f"network meta: gem_p must be a number in (0, {MAX_GEM_P}], got {_shown(meta['gem_p'])}")
    head_dim = meta["head_dim"]
    if head_dim is not None and not (_is_integer(head_dim) and 1 <= head_dim <= MAX_HEAD_DIM):
        raise InputError(f"network meta: head_dim must be None or an integer in 1..{MAX_HEAD_DIM:,}, got {_shown(head_dim)}")
    channels = backbones.channels_of(meta["backbone"])
    if meta["channels"] != channels:
        raise InputError(f"network meta: backbone {meta['backbone']} has {channels} channels, meta says {_shown(meta['channels'])}")
    if meta["dim"] != (channels if head_dim is None else head_dim):
        raise InputError(f"network meta: dim {_shown(meta['dim'])} is neither head_dim nor the backbone's channels")
    _check_normalization(meta["normalization"])


def _check_normalization(normalization) -> None:
    ok = isinstance(normalization, dict) and all(
        isinstance(normalization.get(key), (list, tuple)) and len(normalization[key]) == 3
        and all(_is_number(value) and math.isfinite(value) for value in normalization[key])
        for key in ("mean", "std"))
    if not ok or min(normalization["std"]) <= 0:
        raise InputError("network meta: normalization must be {'mean': 3 numbers, 'std': 3 positive numbers}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


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
    ``(net in eval mode, extra)``. A file that is not such a checkpoint, whose
    meta is out of bounds or whose weights belong to another architecture than
    its meta describes is one :class:`InputError` line saying what differs."""
    payload = read_torch_file(path, map_location, "checkpoint", "run the stage that writes it first")
    if not isinstance(payload, dict):
        raise InputError(f"{path}: holds a {type(payload).__name__}, not a checkpoint of this project "
                         "(a dict with meta and state_dict)")
    missing = [key for key in ("meta", "state_dict") if key not in payload]
    if missing:
        raise InputError(f"{path}: not a checkpoint of this project: missing keys {missing} "
                         f"(it has {_key_sample(payload)})")
    if payload.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {_shown(payload['format'])}; this code reads format {CHECKPOINT_FORMAT}")
    if not isinstance(payload.get("extra", {}), dict):
        raise InputError(f"{path}: 'extra' must be a dict, got {type(payload['extra']).__name__}")
    try:
        check_meta(payload["meta"])
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    net = build_network(payload["meta"], load_pretrained=False)
    check_weights_fit(path, net, payload["state_dict"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise InputError(f"{path}: weights do not fit the network its meta describes ({_first_line(error)})") from None
    return net.to(map_location).eval(), payload.get("extra", {})


def read_torch_file(path: str | os.PathLike, map_location, what: str, hint: str):
    """``torch.load(path, weights_only=True)``; a missing, empty, corrupt or
    unsafe file is one :class:`InputError` line (torch's refusal condensed)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: {what} not found ({hint})")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: {what} is an empty file")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (or, long ago, a pickle)
        raise InputError(f"{path}: not a torch {what} (neither a zip archive nor a pickle)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure on a foreign file is one line
        raise InputError(f"{path}: not a readable {what} ({torch_load_refusal(error)})") from None


def torch_load_refusal(error: Exception) -> str:
    """One line for what ``torch.load`` raised: for an unsafe file, the reason
    of its weights-only unpickler without the surrounding advice."""
    text = str(error)
    if "Weights only load failed" in text:
        paragraphs = [p for p in text.split("\n\n")[1:] if p.strip() and not p.strip().startswith("Check the documentation")]
        return "refused by torch's weights-only loader: " + (" ".join(" ".join(paragraphs).split()) or "unsupported content")
    return f"{type(error).__name__}: {_first_line(error)}"


def check_weights_fit(path, net: nn.Module, state_dict) -> None:
    """Refuse weights whose names or shapes differ from those of ``net``, naming what differs."""
    if not isinstance(state_dict, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()):
        raise InputError(f"{path}: state_dict is not a dict of named tensors")
    expected = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = [f"{key} {given[key]} (expected {expected[key]})" for key in sorted(set(expected) & set(given))
                if given[key] != expected[key]]
    if missing or unexpected or reshaped:
        meta = net.meta
        differences = [f"{label} {len(keys)} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                       for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes for", reshaped))
                       if keys]
        raise InputError(f"{path}: weights of another architecture than its meta describes (backbone "
                         f"{meta['backbone']}, head {meta['head_dim'] or 'none'}): {'; '.join(differences)}")


def _key_sample(mapping: dict) -> str:
    keys = [_shown(key) for key in list(mapping)[:4]]
    return ", ".join(keys) + (", ..." if len(mapping) > 4 else "") if keys else "no keys"


def _first_line(error: Exception, limit: int = 200) -> str:
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


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
