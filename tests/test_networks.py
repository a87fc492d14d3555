"""EmbeddingNet: definition, prefix/suffix split, meta and checkpoint round trip."""
import pytest
import torch

from mom import networks
from mom.errors import InputError
from mom.pooling import gem, l2n


@pytest.fixture(scope="module")
def retrieval_net():
    return networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0))


def _pixels(batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).float()


def test_forward_is_normalize_trunk_pool_l2(retrieval_net):
    pixels = _pixels()
    with torch.inference_mode():
        feature_map = retrieval_net.trunk((pixels - 127.0) / 128.0)
        expected = gem(feature_map, 3.0)
        expected = expected / expected.norm(dim=1, keepdim=True)
        out = retrieval_net(pixels)
    assert out.shape == (2, 1280) == (2, retrieval_net.dim)
    assert torch.allclose(out, expected, atol=1e-6)


def test_head_maps_to_head_dim():
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "mac", head_dim=64))
    pixels = _pixels()
    with torch.inference_mode():
        pooled = net.trunk(net.normalize(pixels)).amax(dim=(-2, -1))
        expected = l2n(net.head(pooled))
        out = net(pixels)
    assert out.shape == (2, 64) and net.meta["dim"] == 64
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_frozen_prefix_then_trainable_suffix(retrieval_net):
    blocks = retrieval_net.trunk_blocks()
    assert [name for name, _ in blocks][-2:] == ["block6", "head"]
    pixels = _pixels()
    with torch.inference_mode():
        whole = retrieval_net(pixels)
        for start in (0, 1, len(blocks) - 2, len(blocks)):
            cached = retrieval_net.trunk[:start](retrieval_net.normalize(pixels))
            assert torch.allclose(retrieval_net.forward_from(cached if start else pixels, start), whole, atol=1e-6)


def test_build_is_deterministic_including_the_head():
    meta = networks.make_meta("efficientnet_lite0", "spoc", head_dim=8)
    a = networks.build_network(meta, load_pretrained=False)
    b = networks.build_network(meta, load_pretrained=False)
    assert torch.equal(a.head.weight, b.head.weight)


def test_checkpoint_round_trip(tmp_path):
    meta = networks.make_meta("efficientnet_lite0", "rmac", head_dim=16)
    net = networks.build_network(meta, seed=3)
    with torch.no_grad():  # weights that no fresh build would have
        net.head.weight.mul_(2.0)
        dict(net.trunk.named_parameters())["head.0.weight"].add_(0.01)
    path = tmp_path / "model.pt"
    networks.save_checkpoint(path, net, {"epoch": 7, "history": [0.5, 0.25]})
    loaded, extra = networks.load_checkpoint(path)
    assert extra == {"epoch": 7, "history": [0.5, 0.25]}
    assert loaded.meta == meta
    pixels = _pixels(seed=4)
    with torch.inference_mode():
        assert torch.equal(loaded(pixels), net(pixels))
    # same network, same bytes (the temporary file's name does not leak into the archive)
    again = tmp_path / "again.pt"
    networks.save_checkpoint(again, loaded, {"epoch": 7, "history": [0.5, 0.25]})
    assert again.read_bytes() == path.read_bytes()


def test_learned_gem_p_survives_the_checkpoint(tmp_path):
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0), load_pretrained=False)
    net.pool.p.fill_(4.5)
    networks.save_checkpoint(tmp_path / "m.pt", net)
    loaded, _ = networks.load_checkpoint(tmp_path / "m.pt")
    assert float(loaded.pool.p) == 4.5


def test_bad_checkpoints_and_meta(tmp_path):
    with pytest.raises(InputError, match="not found"):
        networks.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="meta and state_dict"):
        networks.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(InputError, match="pooling must be one of"):
        networks.make_meta("efficientnet_lite0", "avg")
    meta = networks.make_meta("efficientnet_lite0")
    meta["channels"] = 7
    with pytest.raises(InputError, match="channels"):
        networks.check_meta(meta)
