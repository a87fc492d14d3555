"""Pooling functions against hand-computed values; the R-MAC region grid."""
import math

import pytest
import torch

from mom import pooling

# One image, two channels, a 2x2 map.
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 5.0], [1.0, 0.0]]]])


def test_mac_spoc_hand_values():
    assert torch.allclose(pooling.mac(X), torch.tensor([[4.0, 5.0]]))
    assert torch.allclose(pooling.spoc(X), torch.tensor([[2.5, 1.5]]))


def test_gem_hand_values():
    expected = torch.tensor([[(100 / 4) ** (1 / 3), (126 / 4) ** (1 / 3)]])  # (1+8+27+64)/4, (0+125+1+0)/4
    assert torch.allclose(pooling.gem(X, p=3.0), expected, atol=1e-5)


def test_gem_limits():
    positive = torch.rand(3, 4, 5, 6) + 0.1
    assert torch.allclose(pooling.gem(positive, p=1.0), pooling.spoc(positive), atol=1e-6)
    assert torch.allclose(pooling.gem(positive.double(), p=500.0), pooling.mac(positive.double()), rtol=1e-2)


def test_gem_module_fixed_and_learnable():
    fixed = pooling.GeM(3.0)
    learnable = pooling.GeM(3.0, learn_p=True)
    assert list(fixed.parameters()) == []
    assert [name for name, _ in learnable.named_parameters()] == ["p"]
    assert torch.allclose(fixed(X), pooling.gem(X, 3.0)) and torch.allclose(learnable(X), fixed(X))
    learnable(X).sum().backward()
    assert learnable.p.grad is not None
    # a learned p is saved and loads into a fixed-p module
    learnable.p.data.fill_(2.0)
    fixed.load_state_dict(learnable.state_dict())
    assert torch.allclose(fixed(X), pooling.gem(X, 2.0))


def test_rmac_regions_square_3x3():
    whole = [(0, 0, 3, 3)]
    level1 = [(0, 0, 3, 3)]
    level2 = [(t, l, 2, 2) for t in (0, 1) for l in (0, 1)]
    level3 = [(t, l, 1, 1) for t in (0, 1, 2) for l in (0, 1, 2)]
    assert list(pooling.rmac_regions(3, 3)) == whole + level1 + level2 + level3


def test_rmac_regions_wide_2x3():
    # overlap at level 1 with n regions along the width: 1 - (3-2)/(n-1)/2 -> n = 2 (0.5) is nearest 0.4
    assert pooling.rmac_extra_steps(2, 3) == 1
    level1 = [(0, 0, 2, 2), (0, 1, 2, 2)]
    level2 = [(t, l, 1, 1) for t in (0, 1) for l in (0, 1, 2)]
    level3 = [(t, l, 1, 1) for t in (0, 0, 1) for l in (0, 0, 1, 2)]
    assert list(pooling.rmac_regions(2, 3)) == [(0, 0, 2, 3)] + level1 + level2 + level3


def test_rmac_regions_tall_10x7():
    assert pooling.rmac_extra_steps(10, 7) == 1
    level1 = [(0, 0, 7, 7), (3, 0, 7, 7)]
    level2 = [(t, l, 4, 4) for t in (0, 3, 6) for l in (0, 3)]
    level3 = [(t, l, 3, 3) for t in (0, 2, 4, 7) for l in (0, 2, 4)]
    assert list(pooling.rmac_regions(10, 7)) == [(0, 0, 10, 7)] + level1 + level2 + level3


@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (3, 5), (7, 10), (10, 7), (4, 30)])
def test_rmac_regions_inside_and_evenly_spread(height, width):
    regions = pooling.rmac_regions(height, width)
    for top, left, h, w in regions:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # every level reaches both far edges
    for side in {h for _, _, h, _ in regions[1:]}:
        level = [r for r in regions[1:] if r[2] == side]
        assert max(t + side for t, _, _, _ in level) == height
        assert max(l + side for _, l, _, _ in level) == width


def test_rmac_wide_map_overlap_near_40_percent():
    # 10 x 30: level 1 squares of side 10; n = 4 along the width gives step 20/3, overlap 1/3
    assert pooling.rmac_extra_steps(10, 30) == 3
    level1 = [r for r in pooling.rmac_regions(10, 30)[1:] if r[2] == 10]
    assert [left for _, left, _, _ in level1] == [0, 6, 13, 20]


def _unit(v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


def test_rmac_hand_value_2x2():
    # regions of a 2x2 map: whole map twice (global + level 1), level 2 the four
    # pixels, level 3 the pixels at starts (0, 0, 1): (0,0) x4, (0,1) x2, (1,0) x2, (1,1) x1
    total = (
        2 * _unit([4, 5])
        + 5 * _unit([1, 0])  # pixel (0,0): channels (1, 0)
        + 3 * _unit([2, 5])  # pixel (0,1)
        + 3 * _unit([3, 1])  # pixel (1,0)
        + 2 * _unit([4, 0])  # pixel (1,1)
    )
    expected = (total / total.norm()).float()[None]
    assert torch.allclose(pooling.rmac(X), expected, atol=1e-5)


def test_rmac_matches_region_loop():
    x = torch.rand(2, 5, 7, 10)
    total = torch.zeros(2, 5)
    for top, left, h, w in pooling.rmac_regions(7, 10):
        region = x[:, :, top:top + h, left:left + w].amax(dim=(-2, -1))
        total += region / region.norm(dim=1, keepdim=True)
    expected = total / total.norm(dim=1, keepdim=True)
    assert torch.allclose(pooling.rmac(x), expected, atol=1e-5)
    assert torch.allclose(pooling.rmac(x).norm(dim=1), torch.ones(2), atol=1e-5)


def test_make_pooling_names():
    for name in pooling.POOLINGS:
        out = pooling.make_pooling(name)(X)
        assert out.shape == (1, 2) and math.isfinite(float(out.sum()))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling.make_pooling("max")
