"""HDML (mom/hdml.py, docs/method.md section 10) against hand-computed values."""
import math

import pytest
import torch

from mom import hdml, losses, networks, training

E = math.exp(1)


def vectors(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------ section 1: augmentation


def test_hardness_factor_and_its_limits():
    assert hdml.hardness_factor(7.0, 7.0) == pytest.approx(1 / E)
    assert hdml.hardness_factor(7.0, 0.0) == 0.0           # J_avg -> 0: hardest
    assert hdml.hardness_factor(7.0, math.inf) == 1.0      # J_avg -> inf: unchanged
    assert hdml.hardness_factor(0.0, 0.0) == 1.0           # no pulling at all
    assert hdml.hardness_factor(7.0, 1e-9) == 0.0 and hdml.hardness_factor(7.0, 1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 0"):
        hdml.hardness_factor(7.0, -1.0)


def test_a_farther_negative_moves_between_d_plus_and_d_minus():
    # anchor at the origin, positive at distance d+ = 1, negative at (0, 3): d- = 3.
    # alpha = J_avg = 2: exp(-1); the new distance is 1 + (3 - 1) / e along the negative's direction.
    anchor, positive, negative = vectors([0.0, 0.0]), vectors([1.0, 0.0]), vectors([0.0, 3.0])
    moved = hdml.augment_negatives(anchor, positive, negative, alpha=2.0, j_avg=2.0)
    assert moved[0].tolist() == pytest.approx([0.0, 1.0 + 2.0 / E])
    distance = moved.norm().item()
    assert 1.0 < distance < 3.0


def test_a_nearer_or_equally_near_negative_stays():
    anchor, positive = vectors([0.0, 0.0], [1.0, 1.0]), vectors([2.0, 0.0], [1.0, 2.0])  # d+ = 2, 1
    negative = vectors([0.0, 0.5], [2.0, 1.0])  # d- = 0.5 < d+ ; d- = 1 = d+
    moved = hdml.augment_negatives(anchor, positive, negative, alpha=2.0, j_avg=0.5)
    assert torch.equal(moved, negative)
    assert hdml.farther_fraction(anchor, positive, negative).tolist() == [0.0, 0.0]


def test_augmentation_limits():
    anchor, positive, negative = vectors([1.0, 1.0]), vectors([1.0, 3.0]), vectors([5.0, 4.0])  # d+ = 2, d- = 5
    hardest = hdml.augment_negatives(anchor, positive, negative, alpha=7.0, j_avg=0.0)
    assert hardest[0].tolist() == pytest.approx([1.0 + 2 * 0.8, 1.0 + 2 * 0.6])  # at distance d+ on the ray to z-
    assert (hardest - anchor).norm().item() == pytest.approx(2.0)
    unchanged = hdml.augment_negatives(anchor, positive, negative, alpha=7.0, j_avg=math.inf)
    assert unchanged[0].tolist() == pytest.approx(negative[0].tolist())
    # in between, the distance grows with J_avg
    distances = [(hdml.augment_negatives(anchor, positive, negative, 7.0, j) - anchor).norm().item()
                 for j in (0.5, 2.0, 7.0, 50.0)]
    assert 2.0 < distances[0] < distances[1] < distances[2] < distances[3] < 5.0
    assert distances[2] == pytest.approx(2.0 + 3.0 / E)


def test_augmentation_of_a_batch_is_row_by_row():
    generator = torch.Generator().manual_seed(0)
    anchor, positive, negative = (torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    batch = hdml.augment_negatives(anchor, positive, negative, alpha=1.0, j_avg=0.8)
    for row in range(6):
        d_pos = (anchor[row] - positive[row]).norm()
        d_neg = (anchor[row] - negative[row]).norm()
        if d_neg > d_pos:
            expected = anchor[row] + (d_pos + (d_neg - d_pos) * math.exp(-1 / 0.8)) / d_neg * (negative[row] - anchor[row])
        else:
            expected = negative[row]
        assert torch.allclose(batch[row], expected)


def test_augmentation_gradient_is_finite_at_zero_distances():
    anchor = vectors([0.5, 0.5]).requires_grad_(True)
    # negative on the anchor (d- = 0, stays); positive on the anchor (d+ = 0, the negative moves)
    for positive, negative in [(vectors([1.0, 0.0]), anchor.detach().clone()), (anchor.detach().clone(), vectors([2.0, 0.5]))]:
        anchor.grad = None
        hdml.augment_negatives(anchor, positive, negative, alpha=1.0, j_avg=1.0).sum().backward()
        assert torch.isfinite(anchor.grad).all()


def test_npair_negatives_are_the_other_positives_moved_towards_each_anchor():
    generator = torch.Generator().manual_seed(1)
    anchor, positive = (torch.randn(4, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    moved = hdml.npair_negatives(anchor, positive, alpha=1.0, j_avg=0.7)
    assert moved.shape == (4, 3, 3)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        for column, j in enumerate(others):  # reference distance: anchor i's own d+
            expected = hdml.augment_negatives(anchor[i], positive[i], positive[j], alpha=1.0, j_avg=0.7)
            assert torch.allclose(moved[i, column], expected)


# ------------------------------------------------------------ sections 2-3: losses and weights


def test_reconstruction_loss_by_hand():
    features = vectors([1.0, 2.0], [0.0, 0.0])
    reconstructed = vectors([0.0, 0.0], [3.0, 4.0])
    assert hdml.reconstruction_loss(features, reconstructed).tolist() == [5.0, 25.0]


def test_generator_objective_and_metric_weighting_limits():
    assert hdml.generator_objective(torch.tensor(2.0), torch.tensor(4.0), 0.5).item() == 4.0
    j_m, j_syn = torch.tensor([1.0, 3.0]), torch.tensor([10.0, 20.0])
    assert torch.equal(hdml.metric_objective(j_m, j_syn, beta=5.0, j_gen=math.inf), j_m)  # poor generator
    assert torch.equal(hdml.metric_objective(j_m, j_syn, beta=5.0, j_gen=0.0), j_syn)     # perfect generator
    assert hdml.metric_objective(j_m, j_syn, beta=5.0, j_gen=5.0).tolist() == pytest.approx(
        [1 / E + 10 * (1 - 1 / E), 3 / E + 20 * (1 - 1 / E)])
    assert hdml.synthesis_weight(5.0, 1e-6) == 0.0 and hdml.synthesis_weight(5.0, 1e9) == pytest.approx(1.0)


def test_status_tracker_averages_each_epoch():
    tracker = hdml.StatusTracker()
    assert tracker.status == hdml.TrainingStatus(math.inf, math.inf)
    tracker.add(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0]))
    tracker.add(torch.tensor([3.0]), torch.tensor([30.0]))
    assert tracker.totals() == [6.0, 60.0, 3.0]
    assert tracker.end_epoch() == hdml.TrainingStatus(2.0, 20.0)
    assert tracker.end_epoch() == hdml.TrainingStatus(2.0, 20.0)  # an empty epoch keeps the status
    assert tracker.end_epoch([8.0, 4.0, 4.0]) == hdml.TrainingStatus(2.0, 1.0)  # totals summed over ranks
    restored = hdml.StatusTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.status == tracker.status


# ------------------------------------------------------------ against the network


@pytest.fixture(scope="module")
def network_and_inputs():
    """An EmbeddingNet (random trunk, FC head to 4 dims), its last stage
    trainable, and 12 cached prefix outputs; rows 4 and 5 (as positives of
    anchors 0 and 1 in a triplet layout) are near copies of rows 0 and 1, so
    some negatives are farther than their positive and move."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random trunk draws from the global generator
        net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, 4), load_pretrained=False)
    prefix, suffix = training.split_for_finetuning(net, trainable_blocks=1)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(12, 3, 32, 32, generator=generator) * 255
    pixels[4:6] = (pixels[0:2] + torch.rand(2, 3, 32, 32, generator=generator) * 5).clamp(0, 255)
    with torch.no_grad():
        inputs = prefix(pixels)
    return suffix, inputs


def model_of(suffix, n_classes=3):
    return hdml.HDML(suffix, n_classes=n_classes, hidden=8, seed=0)


SETTINGS = hdml.HDMLSettings(alpha=0.1, beta=0.5, lam=0.5, margin=0.5, npair_l2=0.01)
STATUS = hdml.TrainingStatus(j_avg=0.2, j_gen=1.0)  # negatives move and synthetic tuples count


def parameter_groups(model):
    return {"metric": [p for p in model.metric.parameters() if p.requires_grad],
            "head": list(model.metric.net.head.parameters()),
            "generator": model.generator_parameters(),
            "softmax": model.softmax_parameters()}


def reached(term, model):
    """Which parameter groups the gradient of ``term.sum()`` reaches (non-zero)."""
    groups = parameter_groups(model)
    result = {}
    for name, parameters in groups.items():
        if not parameters:  # no softmax layer
            continue
        grads = torch.autograd.grad(term.sum(), parameters, retain_graph=True, allow_unused=True)
        result[name] = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    return result


def test_hdml_refuses_a_network_without_head():
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, None), load_pretrained=False)
    _, suffix = training.split_for_finetuning(net, trainable_blocks=1)
    with pytest.raises(ValueError, match="needs an FC head"):
        hdml.HDML(suffix)


def test_gradient_routing_of_each_objective(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0, 1, 2, 0])
    terms = model(inputs, "triplet", STATUS, SETTINGS, labels=labels)
    assert terms["farther"].sum() > 0 and 0 < hdml.synthesis_weight(SETTINGS.beta, STATUS.j_gen) < 1
    # J_soft: the generator only, never the softmax layer or the head
    assert reached(terms["j_soft"], model) == {"metric": False, "head": False, "generator": True, "softmax": False}
    assert reached(terms["j_recon"], model) == {"metric": False, "head": False, "generator": True, "softmax": False}
    assert reached(terms["j_ce"], model) == {"metric": False, "head": False, "generator": False, "softmax": True}
    # J_syn trains the metric (through the head, and back through the generator's fixed weights), never the generator
    assert reached(terms["j_syn"], model) == {"metric": True, "head": True, "generator": False, "softmax": False}
    assert reached(terms["j_m"], model) == {"metric": True, "head": True, "generator": False, "softmax": False}


def test_one_backward_of_the_total_gives_each_group_its_own_objective(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0, 1, 2, 0])
    terms = model(inputs, "triplet", STATUS, SETTINGS, labels=labels)
    groups = parameter_groups(model)
    own = {"metric": terms["j_metric"], "generator": terms["j_gen"], "softmax": terms["j_ce"]}
    for name, objective in own.items():
        together = torch.autograd.grad(terms["total"].mean(), groups[name], retain_graph=True)
        alone = torch.autograd.grad(objective.mean(), groups[name], retain_graph=True)
        for a, b in zip(together, alone):
            assert torch.allclose(a, b, atol=1e-7)


def test_triplet_terms_by_hand(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2, 0, 1, 2, 0])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5])
    terms = model(inputs, "triplet", STATUS, SETTINGS, labels=labels, weights=weights)
    assert 0 < terms["farther"].sum() < 4  # some negatives move, some stay
    with torch.no_grad():
        y = suffix.pooled(inputs)
        z = suffix.embed_pooled(y)
        assert torch.allclose(z, suffix(inputs))
        a, p, n = z.chunk(3)
        moved = hdml.augment_negatives(a, p, n, SETTINGS.alpha, STATUS.j_avg)

        def reembed(e):
            return torch.nn.functional.normalize(model.metric.net.head(model.generator(e)), dim=1)

        j_m = losses.triplet_loss(a, p, n, 0.5) * weights
        j_syn = losses.triplet_loss(reembed(a), reembed(p), reembed(moved), 0.5) * weights
        recon = ((y - model.generator(z)) ** 2).sum(1).reshape(3, 4).mean(0)
        soft = torch.nn.functional.cross_entropy(model.softmax(model.generator(moved)), labels[8:], reduction="none")
        ce = torch.nn.functional.cross_entropy(model.softmax(y), labels, reduction="none").reshape(3, 4).mean(0)
    w = math.exp(-SETTINGS.beta / STATUS.j_gen)
    expected = {"j_m": j_m, "j_syn": j_syn, "j_recon": recon, "j_soft": soft, "j_ce": ce,
                "j_metric": w * j_m + (1 - w) * j_syn, "j_gen": recon + 0.5 * soft}
    expected["total"] = expected["j_metric"] + expected["j_gen"] + ce
    for name, value in expected.items():
        assert torch.allclose(terms[name], value, atol=1e-5, rtol=1e-4), name


def test_first_epoch_status_trains_on_real_tuples_only(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix, n_classes=None)
    terms = model(inputs, "triplet", hdml.TrainingStatus(), SETTINGS)  # J_avg = J_gen = inf
    assert torch.equal(terms["j_metric"], terms["j_m"])
    assert torch.equal(terms["j_soft"], torch.zeros(4)) and torch.equal(terms["j_ce"], torch.zeros(4))
    assert model.softmax is None and reached(terms["total"], model)["generator"]


def test_npair_terms(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix, n_classes=6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    terms = model(inputs, "npair", STATUS, SETTINGS, labels=labels)
    assert all(value.shape == (6,) for value in terms.values())
    with torch.no_grad():
        y = suffix.pooled(inputs)
        a, p = suffix.embed_pooled(y).chunk(2)
        moved = hdml.npair_negatives(a, p, SETTINGS.alpha, STATUS.j_avg)

        def reembed(e):
            return torch.nn.functional.normalize(model.metric.net.head(model.generator(e)), dim=-1)

        j_syn = losses.npair_loss(reembed(a), reembed(p), reembed(moved), SETTINGS.npair_l2)
        negative_labels = torch.tensor([[j for j in range(6) if j != i] for i in range(6)])
        soft = torch.nn.functional.cross_entropy(model.softmax(model.generator(moved)).reshape(30, 6),
                                                 negative_labels.reshape(30), reduction="none").reshape(6, 5).mean(1)
    assert torch.allclose(terms["j_m"], losses.npair_loss(a, p, l2_reg=SETTINGS.npair_l2), atol=1e-6)
    assert torch.allclose(terms["j_syn"], j_syn, atol=1e-5)
    assert torch.allclose(terms["j_soft"], soft, atol=1e-4)
    assert reached(terms["j_soft"], model) == {"metric": False, "head": False, "generator": True, "softmax": False}
    with pytest.raises(ValueError, match="distinct classes"):
        model(inputs, "npair", STATUS, SETTINGS, labels=torch.tensor([0, 0, 2, 3, 4, 5] * 2))


def test_bad_layouts_are_refused(network_and_inputs):
    suffix, inputs = network_and_inputs
    model = model_of(suffix, n_classes=None)
    with pytest.raises(ValueError, match="layout"):
        model(inputs, "quadruplet", STATUS, SETTINGS)
    with pytest.raises(ValueError, match="labels are needed"):
        model(inputs, "triplet", STATUS, SETTINGS, labels=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="three blocks"):
        model(inputs[:10], "triplet", STATUS, SETTINGS)
    with pytest.raises(ValueError, match=">= 0"):
        hdml.HDMLSettings(alpha=-1.0).check()
