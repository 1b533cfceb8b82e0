"""Specification of the margin objectives: baselines against SpeechBrain, the alpha family's margins."""
import math
import warnings

import numpy as np
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
    qmargin_zero_loss_gap,
)
from tests import reference


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


@pytest.mark.parametrize("form", ["exp", "exp_alpha"])
@pytest.mark.parametrize("margin", [0.1, 0.2, 0.35])
def test_qmargin_reduces_to_cosface_as_alpha_tends_to_one(margin, form):
    cosine, targets = _batch(3)
    cosface = CosFace(30.0, margin)(cosine, targets)
    torch.testing.assert_close(QMargin(30.0, margin, alpha=1.0, form=form)(cosine, targets), cosface)
    close = QMargin(30.0, margin, alpha=1.0005, form=form)(cosine, targets)
    torch.testing.assert_close(close, cosface, atol=0.02 * cosface.item(), rtol=0)


@pytest.mark.parametrize("scale, alpha", [(20.0, 1.25), (10.0, 1.5), (5.0, 2.0), (10.0, 1.75)])
def test_qmargin_default_is_the_papers_loss_with_log_q_target_minus_s_m(scale, alpha):
    """The alpha-divergence Fenchel-Young loss with q_y = exp(-s m), q_j = 1, by float64 bisection."""
    cosine, targets = _batch(6, batch=16, classes=12)
    margin = 0.2
    log_q = torch.zeros(cosine.shape, dtype=torch.float64).scatter(1, targets[:, None], -scale * margin)
    expected = reference.loss(scale * cosine.detach().double().numpy(), targets.numpy(), alpha, log_q.numpy())
    loss = QMargin(scale, margin, alpha, reduction="none")(cosine, targets)
    torch.testing.assert_close(loss.double(), torch.from_numpy(expected), atol=2e-4, rtol=1e-4)


def _zero_loss_boundary(scale, margin, alpha, log_q_target):
    """The smallest cosine lead at which the float64 reference posterior is one-hot, by bisection."""
    def one_hot(gap):
        theta = scale * np.array([[gap, 0.0]])
        return reference.softargmax(theta, alpha, np.array([[log_q_target, 0.0]]))[0, 1] == 0.0
    low, high = 0.0, 4.0
    for _ in range(50):
        low, high = (low, (low + high) / 2) if one_hot((low + high) / 2) else ((low + high) / 2, high)
    return high


# The zero-loss cosine gap of the issue's table: the papers' q_y = exp(-s m) against the exp_alpha form.
BOUNDARIES = [((20.0, 1.25), 0.1, 0.33, 0.30), ((10.0, 1.5), 0.1, 0.33, 0.30), ((5.0, 2.0), 0.1, 0.33, 0.30),
              ((20.0, 1.25), 0.2, 0.54, 0.40), ((10.0, 1.5), 0.2, 0.54, 0.40), ((5.0, 2.0), 0.2, 0.54, 0.40),
              ((20.0, 1.25), 0.3, 0.90, 0.50), ((10.0, 1.5), 0.3, 0.90, 0.50), ((5.0, 2.0), 0.3, 0.90, 0.50),
              ((30.0, 1.5), 0.2, 1.34, 0.27)]


@pytest.mark.parametrize("pair, margin, papers_gap, exp_alpha_gap", BOUNDARIES)
def test_qmargin_zero_loss_boundary_reproduces_the_table(pair, margin, papers_gap, exp_alpha_gap):
    scale, alpha = pair
    for form, table in (("exp", papers_gap), ("exp_alpha", exp_alpha_gap)):
        closed_form = qmargin_zero_loss_gap(scale, margin, alpha, form)
        bisected = _zero_loss_boundary(scale, margin, alpha, qmargin_log_q_target(scale, margin, alpha, form))
        assert closed_form == pytest.approx(bisected, abs=1e-6)
        assert round(closed_form, 2) == table
        # ... and the objective itself: a one-hot posterior (no gradient) just beyond the boundary, a
        # loss short of it.
        objective = QMargin(scale, margin, alpha, form=form, reduction="none")
        target = torch.tensor([0])
        beyond = torch.tensor([[1.0, 1.0 - closed_form - 1e-3]], requires_grad=True)
        loss = objective(beyond, target)
        loss.backward()
        assert float(loss) < 1e-6 and objective.last_statistics.support_size == 1.0
        assert torch.count_nonzero(beyond.grad) == 0
        assert float(objective(torch.tensor([[1.0, 1.0 - closed_form + 0.05]]), target)) > 1e-4


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_exp_alpha_qmargin_vanishes_exactly_beyond_an_additive_cosine_margin(alpha):
    scale, margin = 30.0, 0.2
    gap = 1.0 / ((alpha - 1.0) * scale) + margin  # required cosine lead of the target
    objective = QMargin(scale, margin, alpha, form="exp_alpha", reduction="none")
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


def test_at_a_mismatched_pair_the_papers_form_asks_far_more_than_the_exp_alpha_form():
    scale, margin, alpha = 30.0, 0.2, 1.5
    papers = QMargin(scale, margin, alpha, reduction="none")
    exp_alpha = QMargin(scale, margin, alpha, form="exp_alpha", reduction="none")
    cosine = torch.tensor([[0.95, 0.1, 0.0]])  # a cosine lead of 0.85: beyond 1/15 + 0.2, short of 1.34
    assert float(exp_alpha(cosine, torch.tensor([0]))) == 0.0
    assert float(papers(cosine, torch.tensor([0]))) > 0.5
    assert papers.form == "exp" and "form=exp" in repr(papers)


@pytest.mark.parametrize("make", [lambda: QMargin(30.0, 0.2, 1.5), lambda: AlphaDiv(30.0, 1.5),
                                  lambda: A3M(30.0, 0.2, 1.5), lambda: QMargin(10.0, 0.2, 2.5)])
def test_an_alpha_objective_far_outside_the_trainable_band_warns_naming_the_pair(make):
    with pytest.warns(UserWarning, match=r"\(scale=\d+, alpha=[\d.]+\): s\(alpha-1\) = [\d.]+ is outside the "
                                         r"trainable band \[2, 10\]; the papers choose s and alpha together"):
        make()


@pytest.mark.parametrize("make", [lambda: QMargin(20.0, 0.1, 1.25), lambda: QMargin(10.0, 0.2, 1.5),
                                  lambda: QMargin(5.0, 0.2, 2.0), lambda: A3M(10.0, 0.2, 1.75),
                                  lambda: AlphaDiv(10.0, 1.5), lambda: CosFace(32.0, 0.2), lambda: ArcFace(32.0, 0.2),
                                  lambda: QMargin(32.0, 0.2, 1.0), lambda: Softmax(30.0)])
def test_the_papers_pairs_and_every_alpha_one_objective_do_not_warn(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


def test_qmargin_refuses_an_unknown_form():
    with pytest.raises(ValueError, match=r"form must be one of \('exp', 'exp_alpha'\), got 'naive'"):
        QMargin(10.0, 0.2, 1.5, form="naive")


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


def test_qmargin_target_mass_formulas():
    assert qmargin_log_q_target(10.0, 0.2, 1.5) == -2.0 and qmargin_log_q_target(10.0, 0.2, 1.0) == -2.0
    assert qmargin_log_q_target(30.0, 0.2, 1.5, "exp_alpha") == pytest.approx(-math.log(1 + 0.5 * 30 * 0.2) / 0.5)
    assert qmargin_log_q_target(30.0, 0.2, 1.0 + 1e-9, "exp_alpha") == pytest.approx(-6.0, abs=1e-6)


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


@pytest.mark.parametrize("make", [lambda: QMargin(10.0, 0.2, 1.5), lambda: QMargin(5.0, 0.2, 2.0),
                                  lambda: QMargin(10.0, 0.1, 1.5, form="exp_alpha"), lambda: A3M(10.0, 0.2, 1.5),
                                  lambda: AlphaDiv(20.0, 1.25)])
def test_one_hot_rows_are_exactly_the_rows_the_loss_gives_no_gradient(make):
    objective = make()
    objective.reduction = "none"
    torch.manual_seed(7)
    prototypes = F.normalize(torch.randn(50, 256), dim=1)
    targets = torch.randint(0, 50, (64,))
    pull = torch.linspace(0.0, 8.0, 64)[:, None]  # from untrained rows to rows sitting on their prototype
    embeddings = F.normalize(torch.randn(64, 256) / 16 + pull / 8 * prototypes[targets], dim=1)
    cosine = (embeddings @ prototypes.T).requires_grad_(True)
    objective(cosine, targets).sum().backward()
    no_gradient = (cosine.grad == 0).all(1)
    assert 0 < int(no_gradient.sum()) < 64  # both kinds of row
    assert torch.equal(objective.one_hot_rows(cosine, targets), no_gradient)


def test_no_row_is_one_hot_at_alpha_one():
    cosine, targets = _batch(8)
    assert not CosFace(32.0, 0.2).one_hot_rows(10 * cosine, targets).any()


@pytest.mark.parametrize("make, scale, alpha", [
    (lambda: QMargin(10.0, 0.2, 1.5), 10.0, 1.5), (lambda: QMargin(20.0, 0.2, 1.25), 20.0, 1.25),
    (lambda: A3M(5.0, 0.2, 2.0), 5.0, 2.0), (lambda: AlphaDiv(10.0, 1.5), 10.0, 1.5),
])
def test_alpha_objectives_loss_and_cosine_gradient_equal_the_float64_fenchel_young_loss(make, scale, alpha):
    """The objectives scale only the candidate columns; the loss and d loss / d cos = s (p - e_y)
    (through the margin for A3M) must equal a float64 evaluation on the full scaled logits."""
    torch.manual_seed(13)
    embeddings = F.normalize(torch.randn(48, 32), dim=1)
    prototypes = F.normalize(torch.randn(600, 32), dim=1)
    targets = torch.randint(0, 600, (48,))
    prototypes[targets[:24]] = F.normalize(embeddings[:24] + 0.3 * torch.randn(24, 32), dim=1)  # some trained rows
    cosine = (embeddings @ prototypes.T).requires_grad_(True)
    objective = make()
    objective(cosine, targets).backward()
    double = cosine.detach().double().requires_grad_(True)
    rows = torch.arange(48)
    target_cosine = objective.target_cosine(double[rows, targets])
    logits = (scale * double).index_put((rows, targets), scale * target_cosine)
    log_q = np.zeros((48, 600))
    log_q[rows.numpy(), targets.numpy()] = objective.target_log_q() or 0.0
    p = torch.from_numpy(reference.softargmax(logits.detach().numpy(), alpha, log_q))
    expected_loss = torch.from_numpy(reference.loss(logits.detach().numpy(), targets.numpy(), alpha, log_q)).mean()
    # Fenchel-Young: d L / d logits = p - e_y; chain through the scale and the margin.
    (logits * (p - F.one_hot(targets, 600).double())).sum().div(48).backward()
    torch.testing.assert_close(objective(cosine.detach(), targets).double(), expected_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cosine.grad.double(), double.grad, atol=1e-6, rtol=1e-4)
