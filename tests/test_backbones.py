"""Backbones: genuine EfficientNet-Lite0 ImageNet weights, trunk splits, offline weight errors."""
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from mom import backbones
from mom.errors import InputError

ESPRESSO = 967  # ImageNet class index


@pytest.fixture(scope="module")
def lite0():
    return backbones.load_backbone("efficientnet_lite0")


def test_lite0_classifies_coffee_as_espresso(lite0):
    pixels = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1)[None].float()  # 400 x 600 RGB
    pixels = F.interpolate(pixels, size=(224, 336), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(lite0.mean).view(1, 3, 1, 1)
    std = torch.tensor(lite0.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        logits = lite0.classifier(lite0.trunk((pixels - mean) / std))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == ESPRESSO


def test_lite0_normalization_and_channels(lite0):
    assert lite0.mean == (127.0,) * 3 and lite0.std == (128.0,) * 3
    assert lite0.channels == 1280
    assert [name for name, _ in lite0.trunk.named_children()] == ["stem"] + [f"block{i}" for i in range(7)] + ["head"]


def test_lite0_random_build_differs_from_pretrained(lite0):
    random = backbones.load_backbone("efficientnet_lite0", pretrained=False)
    a = dict(lite0.trunk.named_parameters())["stem.0.weight"]
    b = dict(random.trunk.named_parameters())["stem.0.weight"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vgg16", "resnet50", "googlenet"])  # resnet101: resnet50's split
def test_trunk_then_classifier_equals_the_whole_model(name):
    """The split into trunk stages + classifier loses nothing: same logits as the
    architecture's own forward (random weights; the layout is what is tested)."""
    spec = backbones._SPECS[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    stages, classifier = spec.split(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        feature_map = torch.nn.Sequential(*[module for _, module in stages])(x)
        assert feature_map.shape[1] == spec.channels == backbones.channels_of(name)
        assert torch.allclose(classifier(feature_map), model(x), atol=1e-4)


def test_missing_torchvision_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InputError) as error:
        backbones.load_backbone("resnet50")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "--weights" in message and "--download_weights" in message
    with pytest.raises(InputError, match="not found"):
        backbones.load_backbone("vgg16", weights=tmp_path / "nope.pth")


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """A file under torchvision's name in the hub cache is loaded (GoogLeNet: the
    auxiliary classifiers the trunk does not use are dropped)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(1)
    state = backbones._SPECS["googlenet"].build().state_dict()
    state["aux1.fc2.weight"] = torch.zeros(1000, 1024)
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "googlenet-1378be20.pth")
    backbone = backbones.load_backbone("googlenet")
    loaded = dict(backbone.trunk.named_parameters())["stem.0.conv.weight"]
    assert torch.equal(loaded, state["conv1.conv.weight"])


def test_weights_that_do_not_fit_are_rejected(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="tensors"):
        backbones.load_backbone("efficientnet_lite0", weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights"):
        backbones.load_backbone("efficientnet_lite0", weights=tmp_path / "junk.pth")


def test_unknown_backbone():
    with pytest.raises(InputError, match="backbone must be one of"):
        backbones.load_backbone("alexnet")
