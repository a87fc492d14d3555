import math

import pytest
import torch

from mom import losses


def unit(*angles_deg):
    """Unit vectors in the plane at the given angles."""
    radians = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_triplet_hand_computed():
    anchor = unit(0, 0)
    positive = unit(90, 0)    # squared distances: 2, 0
    negative = unit(180, 90)  # squared distances: 4, 2
    values = losses.triplet_loss(anchor, positive, negative, margin=0.5)
    # tuple 0: [0.5 + 2 - 4]_+ = 0 (zero-loss case); tuple 1: [0.5 + 0 - 2]_+ = 0
    assert values.tolist() == pytest.approx([0.0, 0.0])
    values = losses.triplet_loss(anchor, unit(90, 60), unit(60, 90), margin=0.5)
    # tuple 0: 0.5 + 2 - 1 = 1.5 ; tuple 1: 0.5 + 1 - 2 = -0.5 -> 0
    assert values.tolist() == pytest.approx([1.5, 0.0])


def test_contrastive_hand_computed():
    anchor = unit(0, 0, 0)
    positive = unit(60, 0, 90)     # squared distances 1, 0, 2
    negative = unit(60, 180, 0)    # distances 1, 2, 0
    values = losses.contrastive_loss(anchor, positive, negative, margin=0.7)
    # 1 + [0.7 - 1]_+^2 = 1 ; 0 + [0.7 - 2]_+^2 = 0 (zero loss) ; 2 + 0.7^2
    assert values.tolist() == pytest.approx([1.0, 0.0, 2.0 + 0.49])


def test_contrastive_gradient_is_finite_for_identical_negative():
    anchor = unit(10).requires_grad_(True)
    values = losses.contrastive_loss(anchor, unit(20), anchor.detach().clone(), margin=0.7)
    values.sum().backward()
    assert torch.isfinite(anchor.grad).all()


def test_weighted_variant_multiplies_each_tuple_by_its_weight():
    anchor, positive, negative = unit(0, 0), unit(90, 60), unit(60, 90)
    weights = torch.tensor([0.25, 0.8])
    plain = losses.tuple_losses("triplet", anchor, positive, negative, 0.5)
    weighted = losses.tuple_losses("triplet", anchor, positive, negative, 0.5, weights=weights)
    assert weighted.tolist() == pytest.approx([1.5 * 0.25, 0.0])
    assert weighted.tolist() == pytest.approx((plain * weights).tolist())
    contrastive = losses.tuple_losses("contrastive", anchor, positive, negative, 0.7, weights=weights)
    # tuple 0: 2 + [0.7 - 1]_+^2 = 2 ; tuple 1: 1 + [0.7 - sqrt 2]_+^2 = 1
    assert contrastive.tolist() == pytest.approx([2 * 0.25, 1 * 0.8])


def test_reduction_and_active_fraction():
    values = torch.tensor([0.0, 1.0, 3.0, 0.0])
    assert losses.reduce_losses(values, "mean").item() == pytest.approx(1.0)
    assert losses.reduce_losses(values, "sum").item() == pytest.approx(4.0)
    assert losses.active_fraction(values) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reduction"):
        losses.reduce_losses(values, "max")
    with pytest.raises(ValueError, match="loss must be"):
        losses.tuple_losses("hinge", unit(0), unit(0), unit(0), 0.5)
