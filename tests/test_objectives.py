"""Specification of the margin objectives: baselines against SpeechBrain, the alpha family's margins."""
import math

import pytest
import torch
import torch.nn.functional as F
from speechbrain.nnet.losses import AdditiveAngularMargin, AngularMargin, LogSoftmaxWrapper

from spkver.losses import (
    A3M,
    AlphaDiv,
    ArcFace,
    CosFace,
    MarginWarmup,
    QMargin,
    Softmax,
    alpha_divergence_loss,
    qmargin_log_q_target,
)


def _batch(seed=0, batch=32, classes=20):
    torch.manual_seed(seed)
    x = F.normalize(torch.randn(batch, 16), dim=1)
    w = F.normalize(torch.randn(classes, 16), dim=1)
    return (x @ w.T).requires_grad_(True), torch.randint(0, classes, (batch,))


def test_softmax_is_cross_entropy_of_scaled_cosine():
    cosine, targets = _batch()
    torch.testing.assert_close(Softmax(30.0)(cosine, targets), F.cross_entropy(30 * cosine, targets))


def test_cosface_matches_speechbrain_additive_cosine_margin():
    cosine, targets = _batch(1)
    speechbrain = LogSoftmaxWrapper(AngularMargin(margin=0.2, scale=30.0))
    torch.testing.assert_close(CosFace(30.0, 0.2)(cosine, targets), speechbrain(cosine[:, None], targets[:, None]))


def test_arcface_matches_speechbrain_additive_angular_margin():
    cosine, targets = _batch(2)
    speechbrain = LogSoftmaxWrapper(AdditiveAngularMargin(margin=0.2, scale=30.0))
    torch.testing.assert_close(ArcFace(30.0, 0.2)(cosine, targets), speechbrain(cosine[:, None], targets[:, None]),
                               atol=1e-4, rtol=1e-4)


def test_arcface_target_logit_is_decreasing_in_the_angle_past_pi():
    target_cosine = torch.linspace(-1, 1, 2001)
    cosine = torch.stack([target_cosine, torch.zeros(2001)], dim=1)
    objective = ArcFace(1.0, 0.5, reduction="none")
    targets = torch.zeros(2001, dtype=torch.long)
    loss = objective(cosine, targets)  # loss grows as the target cosine falls
    assert torch.all(loss[:-1] >= loss[1:] - 1e-6)


@pytest.mark.parametrize("margin", [0.1, 0.2, 0.35])
def test_qmargin_reduces_to_cosface_as_alpha_tends_to_one(margin):
    cosine, targets = _batch(3)
    cosface = CosFace(30.0, margin)(cosine, targets)
    torch.testing.assert_close(QMargin(30.0, margin, alpha=1.0)(cosine, targets), cosface)
    close = QMargin(30.0, margin, alpha=1.0005)(cosine, targets)
    torch.testing.assert_close(close, cosface, atol=0.02 * cosface.item(), rtol=0)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_qmargin_loss_vanishes_exactly_beyond_the_cosine_margin(alpha):
    scale, margin = 30.0, 0.2
    gap = 1.0 / ((alpha - 1.0) * scale) + margin  # required cosine lead of the target
    objective = QMargin(scale, margin, alpha, reduction="none")
    others = torch.tensor([0.1, -0.2, 0.05])
    just_beyond = torch.cat([torch.tensor([0.1 + gap + 1e-3]), others])[None]
    just_short = torch.cat([torch.tensor([0.1 + gap - 0.02]), others])[None]
    target = torch.tensor([0])
    assert float(objective(just_beyond, target)) == 0.0
    assert float(objective(just_short, target)) > 0.0


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_alphadiv_loss_vanishes_once_the_target_leads_by_one_over_alpha_minus_one(alpha):
    scale = 30.0
    gap = 1.0 / ((alpha - 1.0) * scale)
    objective = AlphaDiv(scale, alpha, reduction="none")
    assert float(objective(torch.tensor([[0.3 + gap + 1e-3, 0.3, 0.0]]), torch.tensor([0]))) == 0.0
    assert float(objective(torch.tensor([[0.3 + gap - 0.02, 0.3, 0.0]]), torch.tensor([0]))) > 0.0


def test_naive_qmargin_is_far_stronger_than_the_alpha_log_form():
    # The naive log q_y = -s m asks for a cosine lead of (e^{(alpha-1)sm} - 1)/(alpha-1)/s + 1/(alpha-1)/s.
    scale, margin, alpha = 30.0, 0.2, 1.5
    naive = QMargin(scale, margin, alpha, log_q_target=-scale * margin, reduction="none")
    principled = QMargin(scale, margin, alpha, reduction="none")
    cosine = torch.tensor([[0.95, 0.1, 0.0]])  # a cosine lead of 0.85: beyond 1/15 + 0.2
    assert float(principled(cosine, torch.tensor([0]))) == 0.0
    assert float(naive(cosine, torch.tensor([0]))) > 0.5


def test_a3m_reduces_to_arcface_at_alpha_one():
    cosine, targets = _batch(4)
    torch.testing.assert_close(A3M(30.0, 0.2, alpha=1.0)(cosine, targets), ArcFace(30.0, 0.2)(cosine, targets))


def test_a3m_applies_the_angular_margin_to_the_target_logit_only():
    cosine, targets = _batch(5)
    phi = torch.acos(cosine.detach().gather(1, targets[:, None]).clamp(-1, 1))
    logits = 30.0 * cosine.detach().scatter(1, targets[:, None], torch.cos(phi + 0.2))
    # The fallback only applies past pi - m; these random cosines stay below it.
    assert bool((phi + 0.2 < math.pi).all())
    expected = alpha_divergence_loss(logits, targets, 1.5)
    torch.testing.assert_close(A3M(30.0, 0.2, 1.5)(cosine, targets), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: Softmax(30.0), lambda: CosFace(30.0, 0.2), lambda: ArcFace(30.0, 0.2),
    lambda: AlphaDiv(30.0, 1.5), lambda: QMargin(30.0, 0.2, 1.5), lambda: A3M(30.0, 0.2, 1.5),
])
def test_every_objective_reports_sparsity_statistics_and_has_finite_gradients(make):
    cosine, targets = _batch(6)
    objective = make()
    loss = objective(cosine, targets)
    loss.backward()
    assert torch.isfinite(cosine.grad).all()
    stats = objective.last_statistics
    assert 1.0 <= stats.support_size <= cosine.shape[1]
    assert 0.0 <= stats.target_zero_fraction <= 1.0
    assert 0.0 <= stats.target_prob <= 1.0
    if objective.alpha == 1.0:
        assert stats.support_size == cosine.shape[1] and stats.target_zero_fraction == 0.0


def test_sparse_objectives_have_small_support_at_the_papers_scale():
    cosine, targets = _batch(7, batch=64, classes=500)
    objective = AlphaDiv(30.0, 1.5)
    objective(cosine, targets)
    assert objective.last_statistics.support_size < 20


@pytest.mark.parametrize("make", [lambda: CosFace(30.0, 0.2), lambda: ArcFace(30.0, 0.2),
                                  lambda: QMargin(30.0, 0.2, 1.5), lambda: A3M(30.0, 0.2, 1.5)])
def test_margin_warmup_ramps_every_margin_objective_from_zero(make):
    cosine, targets = _batch(8)
    objective = make()
    warmup = MarginWarmup(warmup_epochs=4, start_epoch=1)
    assert warmup.step(objective, 0.5) == 0.0
    no_margin = objective(cosine, targets)
    expected_no_margin = (Softmax(30.0) if objective.alpha == 1 else AlphaDiv(30.0, 1.5))(cosine, targets)
    torch.testing.assert_close(no_margin, expected_no_margin)
    assert warmup.step(objective, 3.0) == pytest.approx(0.1)
    half = objective(cosine, targets)
    warmup.step(objective, 5.0)
    full = objective(cosine, targets)
    assert objective.margin == objective.base_margin == 0.2
    assert float(no_margin.detach()) < float(half.detach()) < float(full.detach())


def test_qmargin_target_mass_formula():
    assert qmargin_log_q_target(30.0, 0.2, 1.5) == pytest.approx(-math.log(1 + 0.5 * 30 * 0.2) / 0.5)
    assert qmargin_log_q_target(30.0, 0.2, 1.0 + 1e-9) == pytest.approx(-6.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"),
    (dict(margin=-0.1), "margin"), (dict(alpha=0.9), "alpha"), (dict(reduction="avg"), "reduction"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    args = dict(scale=30.0, margin=0.2, alpha=1.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        QMargin(**args)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="cosine"):
        QMargin(30.0, 0.2, 1.5)(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        QMargin(30.0, 0.2, 1.5)(torch.zeros(4, 3), torch.full((4,), 3))
