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


def brute_force_npair(anchor, positive, l2_reg):
    """mean-free N-pair per anchor by its double sum: log(1 + sum_{j != i} exp(a_i.p_j - a_i.p_i)) + penalty."""
    n = len(anchor)
    values = []
    for i in range(n):
        inner = 0.0
        for j in range(n):
            if j != i:
                inner += math.exp(float(anchor[i] @ positive[j] - anchor[i] @ positive[i]))
        penalty = 0.25 * l2_reg * float(anchor[i] @ anchor[i] + positive[i] @ positive[i])
        values.append(math.log(1.0 + inner) + penalty)
    return values


def test_npair_matches_the_double_sum():
    generator = torch.Generator().manual_seed(0)
    anchor = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    positive = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    for l2_reg in (0.0, 0.015):
        values = losses.npair_loss(anchor, positive, l2_reg=l2_reg)
        assert values.tolist() == pytest.approx(brute_force_npair(anchor, positive, l2_reg), rel=1e-12)


def test_npair_hand_computed():
    # a_0 = (1, 0), a_1 = (0, 1), p_0 = (1, 0), p_1 = (1, 1):
    # anchor 0: log(1 + exp(a_0.p_1 - a_0.p_0)) = log(1 + exp(1 - 1)) = log 2
    # anchor 1: log(1 + exp(a_1.p_0 - a_1.p_1)) = log(1 + exp(0 - 1))
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positive = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert losses.npair_loss(anchor, positive).tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(-1))])
    # penalty l2_reg / 4 (|a|^2 + |p|^2): anchor 0: 0.1 / 4 * 2, anchor 1: 0.1 / 4 * 3
    with_penalty = losses.npair_loss(anchor, positive, l2_reg=0.1)
    assert with_penalty.tolist() == pytest.approx([math.log(2) + 0.05, math.log(1 + math.exp(-1)) + 0.075])


def test_npair_with_explicit_negatives_equals_the_other_positives():
    generator = torch.Generator().manual_seed(1)
    anchor = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    positive = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    others = torch.stack([positive[[j for j in range(4) if j != i]] for i in range(4)])  # (4, 3, 6)
    assert torch.allclose(losses.npair_loss(anchor, positive, others, 0.01), losses.npair_loss(anchor, positive, l2_reg=0.01))
    # per-anchor negatives: anchor 0 with one negative n: log(1 + exp(a.n - a.p))
    negatives = torch.randn(4, 1, 6, generator=generator, dtype=torch.float64)
    expected = [math.log1p(math.exp(float(anchor[i] @ negatives[i, 0] - anchor[i] @ positive[i]))) for i in range(4)]
    assert losses.npair_loss(anchor, positive, negatives).tolist() == pytest.approx(expected, rel=1e-12)


def test_npair_is_stable_for_large_logits():
    anchor = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    positive = torch.tensor([[-100.0, 0.0], [0.0, 100.0]])  # anchor 0: a.p_1 - a.p_0 = 10^4
    values = losses.npair_loss(anchor, positive)
    assert torch.isfinite(values).all()
    assert values[0].item() == pytest.approx(1e4, rel=1e-6) and values[1].item() == pytest.approx(0.0, abs=1e-6)
