"""Specification of the alpha-divergence f-softargmax and its Fenchel-Young loss."""
import math

import entmax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spkver.losses import alpha_divergence_loss, alpha_softargmax, engines, softargmax
from spkver.losses import loss as operator
from tests import reference

SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module", autouse=True, params=["cpu-kernel", "torch-solver"])
def engine(request):
    """Every test of the loss runs on both CPU engines: the compiled kernel and the pure-torch solver."""
    patch = pytest.MonkeyPatch()
    patch.setattr(engines, "AUTO_PREFERENCE", ("cpu", "dense", "torch") if request.param == "cpu-kernel"
                  else ("dense", "torch"))
    yield request.param
    patch.undo()


def _atol(theta, alpha, base=2e-5):
    """Float32 tolerance of p: for alpha > 2, p ~ z^(1/(alpha-1)) is not Lipschitz at the support's
    edge, so a rounding of theta by eps*|theta| can move p by (eps*|theta|)^(1/(alpha-1))."""
    if alpha <= 2:
        return base
    return base + (2e-7 * max(1.0, float(theta.abs().max()))) ** (1.0 / (alpha - 1.0))
ALPHAS = st.one_of(st.sampled_from([1.25, 1.5, 2.0, 3.0]), st.floats(1.05, 3.0))


@st.composite
def logits_and_targets(draw, max_classes=12):
    batch = draw(st.integers(1, 4))
    classes = draw(st.integers(1, max_classes))
    # A small value set makes ties frequent.
    values = st.one_of(st.floats(-10, 10, width=32), st.sampled_from([0.0, 1.0, -1.0]))
    theta = draw(arrays(np.float32, (batch, classes), elements=values))
    targets = draw(arrays(np.int64, (batch,), elements=st.integers(0, classes - 1)))
    return torch.from_numpy(theta), torch.from_numpy(targets)


@given(logits_and_targets(), ALPHAS)
@SETTINGS
def test_output_rows_sum_to_one_and_are_nonnegative(data, alpha):
    theta, _ = data
    p = alpha_softargmax(theta, alpha)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(1), torch.ones(theta.shape[0]), atol=1e-5, rtol=0)


@given(logits_and_targets(), ALPHAS)
@SETTINGS
def test_unit_measure_matches_entmax_bisect(data, alpha):
    theta, _ = data
    expected = entmax.entmax_bisect(theta.double(), alpha=alpha, dim=1, n_iter=100)
    torch.testing.assert_close(alpha_softargmax(theta, alpha).double(), expected, atol=_atol(theta, alpha), rtol=0)


@given(logits_and_targets(), ALPHAS)
@SETTINGS
def test_unit_measure_loss_matches_entmax_bisect_loss(data, alpha):
    theta, targets = data
    expected = entmax.EntmaxBisectLoss(alpha=alpha, n_iter=100, reduction="none")(theta.double(), targets)
    got = alpha_divergence_loss(theta, targets, alpha, reduction="none")
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_exact_sort_based_operators_agree_with_alpha_1_5_and_2():
    theta = torch.randn(64, 300) * 3
    torch.testing.assert_close(alpha_softargmax(theta, 1.5), entmax.entmax15(theta, dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(alpha_softargmax(theta, 2.0), entmax.sparsemax(theta, dim=1), atol=1e-6, rtol=0)


@given(logits_and_targets(), ALPHAS, st.data())
@SETTINGS
def test_general_measure_matches_float64_bisection_reference(data, alpha, draw):
    theta, targets = data
    log_q = torch.from_numpy(draw.draw(arrays(np.float32, theta.shape, elements=st.floats(-3, 3, width=32))))
    expected_p = reference.softargmax(theta.numpy(), alpha, log_q.numpy())
    # dp_j/dtheta_j = q_j^(alpha-1) p_j^(2-alpha): float32 rounding is amplified by up to q^(alpha-1).
    condition = max(1.0, math.exp((alpha - 1) * float(log_q.max())))
    torch.testing.assert_close(alpha_softargmax(theta, alpha, log_q).double(), torch.from_numpy(expected_p),
                               atol=_atol(theta, alpha) * condition, rtol=0)
    expected_loss = reference.loss(theta.numpy(), targets.numpy(), alpha, log_q.numpy())
    got = alpha_divergence_loss(theta, targets, alpha, log_q=log_q, reduction="none")
    # The loss inherits p's conditioning (for alpha > 2 the root itself is resolved only to that).
    torch.testing.assert_close(got.double(), torch.from_numpy(expected_loss), atol=2e-4 * condition, rtol=1e-4)


@given(logits_and_targets(), ALPHAS)
@SETTINGS
def test_gradient_is_p_minus_onehot(data, alpha):
    theta, targets = data
    theta.requires_grad_(True)
    alpha_divergence_loss(theta, targets, alpha, reduction="sum").backward()
    expected = alpha_softargmax(theta.detach(), alpha) - F.one_hot(targets, theta.shape[1])
    torch.testing.assert_close(theta.grad, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0, 2.7])
def test_gradient_matches_float64_finite_differences(alpha):
    torch.manual_seed(0)
    theta = torch.randn(3, 7) * 2
    targets = torch.tensor([0, 3, 6])
    log_q = torch.randn(7) * 0.5
    theta.requires_grad_(True)
    alpha_divergence_loss(theta, targets, alpha, log_q=log_q, reduction="sum").backward()
    eps = 1e-6
    base = theta.detach().double().numpy()
    numeric = np.zeros_like(base)
    for i in range(base.shape[0]):
        for j in range(base.shape[1]):
            plus, minus = base.copy(), base.copy()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (reference.loss(plus, targets.numpy(), alpha, log_q.numpy()).sum()
                             - reference.loss(minus, targets.numpy(), alpha, log_q.numpy()).sum()) / (2 * eps)
    torch.testing.assert_close(theta.grad.double(), torch.from_numpy(numeric), atol=1e-4, rtol=0)


@pytest.mark.parametrize("alpha", [1.3, 1.5, 2.0, 3.0])
def test_softargmax_jacobian_matches_float64_finite_differences(alpha):
    torch.manual_seed(1)
    theta = (torch.randn(2, 6) * 1.5).requires_grad_(True)
    log_q = torch.randn(6) * 0.3
    weights = torch.randn(2, 6)
    (alpha_softargmax(theta, alpha, log_q) * weights).sum().backward()
    eps = 1e-6
    base = theta.detach().double().numpy()
    numeric = np.zeros_like(base)
    for i in range(2):
        for j in range(6):
            plus, minus = base.copy(), base.copy()
            plus[i, j] += eps
            minus[i, j] -= eps
            diff = reference.softargmax(plus, alpha, log_q.numpy()) - reference.softargmax(minus, alpha, log_q.numpy())
            numeric[i, j] = (diff * weights.double().numpy()).sum() / (2 * eps)
    torch.testing.assert_close(theta.grad.double(), torch.from_numpy(numeric), atol=1e-4, rtol=0)


def test_alpha_one_is_cross_entropy_of_logits_plus_log_q():
    torch.manual_seed(2)
    theta, targets, log_q = torch.randn(16, 50) * 4, torch.randint(0, 50, (16,)), torch.randn(50)
    torch.testing.assert_close(alpha_divergence_loss(theta, targets, 1.0, log_q=log_q),
                               F.cross_entropy(theta + log_q, targets))
    torch.testing.assert_close(alpha_softargmax(theta, 1.0, log_q), torch.softmax(theta + log_q, 1))


@pytest.mark.parametrize("alpha", [1.001, 1.0001])
def test_loss_tends_to_cross_entropy_as_alpha_tends_to_one(alpha):
    torch.manual_seed(3)
    theta, targets = torch.randn(16, 50) * 4, torch.randint(0, 50, (16,))
    ce = F.cross_entropy(theta, targets, reduction="none")
    got = alpha_divergence_loss(theta, targets, alpha, reduction="none")
    torch.testing.assert_close(got, ce, atol=30 * (alpha - 1), rtol=0)
    torch.testing.assert_close(alpha_softargmax(theta, alpha), torch.softmax(theta, 1), atol=30 * (alpha - 1), rtol=0)


@given(logits_and_targets(), ALPHAS, st.floats(-1e3, 1e3))
@SETTINGS
def test_invariant_to_adding_a_constant_to_a_row(data, alpha, shift):
    theta, targets = data
    torch.testing.assert_close(alpha_softargmax(theta + shift, alpha), alpha_softargmax(theta, alpha),
                               atol=1e-4 * (1 + abs(shift) / 100), rtol=0)


@given(logits_and_targets(), ALPHAS, st.floats(0.1, 10.0))
@SETTINGS
def test_scaling_q_by_c_equals_scaling_logits_by_c_to_the_alpha_minus_one(data, alpha, c):
    theta, _ = data
    log_q = torch.full((theta.shape[1],), math.log(c))
    torch.testing.assert_close(alpha_softargmax(theta, alpha, log_q),
                               alpha_softargmax(theta * c ** (alpha - 1), alpha), atol=1e-4, rtol=0)


@given(logits_and_targets(), ALPHAS)
@SETTINGS
def test_loss_is_nonnegative_and_zero_exactly_when_p_is_onehot_at_target(data, alpha):
    theta, targets = data
    loss = alpha_divergence_loss(theta, targets, alpha, reduction="none")
    p = alpha_softargmax(theta, alpha)
    assert torch.all(loss >= 0)
    onehot = p.gather(1, targets[:, None]).squeeze(1) == 1
    assert torch.all(loss[onehot] == 0)
    p_y = p.gather(1, targets[:, None]).squeeze(1)
    # Away from the one-hot the loss is bounded below (strong convexity of the regulariser).
    assert torch.all(loss[p_y < 0.99] > 1e-4)


def test_target_log_q_equals_full_log_q_with_that_entry():
    torch.manual_seed(5)
    theta, targets = torch.randn(8, 40) * 5, torch.randint(0, 40, (8,))
    log_q_y = torch.randn(8)
    full = torch.zeros(8, 40).scatter(1, targets[:, None], log_q_y[:, None])
    for alpha in (1.0, 1.5, 2.5):
        torch.testing.assert_close(
            alpha_divergence_loss(theta, targets, alpha, log_q_target=log_q_y, reduction="none"),
            alpha_divergence_loss(theta, targets, alpha, log_q=full, reduction="none"), atol=1e-5, rtol=1e-5)


def _hostile_rows():
    return {
        "huge": torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1e-3], [-1e4, -1e4, -1e4, -1e4]]),
        "ties": torch.tensor([[2.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
        "constant": torch.full((2, 4), 7.0),
        "masked": torch.tensor([[1.0, -math.inf, 0.5, -math.inf], [-math.inf, -math.inf, 3.0, -math.inf]]),
        "single_class": torch.tensor([[3.0], [-1e4]]),
    }


@pytest.mark.parametrize("alpha", [1.0, 1.0001, 1.01, 1.5, 2.0, 3.0, 4.0])
@pytest.mark.parametrize("case", list(_hostile_rows()))
def test_hostile_inputs_give_finite_outputs_and_gradients(case, alpha):
    theta = _hostile_rows()[case].clone().requires_grad_(True)
    targets = torch.tensor([0, theta.shape[1] - 1]) if case != "masked" else torch.tensor([0, 2])
    if case == "single_class":
        targets = torch.tensor([0, 0])
    p = alpha_softargmax(theta, alpha)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(2), atol=1e-5, rtol=0)
    loss = alpha_divergence_loss(theta, targets, alpha, reduction="sum")
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, 3.0, 4.0])
def test_reference_measure_spanning_sixty_decades_gives_finite_probabilities(alpha):
    torch.manual_seed(6)
    theta = torch.randn(4, 61) * 3
    log_q = torch.linspace(math.log(1e-30), math.log(1e30), 61)
    p = alpha_softargmax(theta, alpha, log_q)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(4), atol=1e-5, rtol=0)
    if alpha <= 2.0:
        # Beyond, p_j moves by q_j^(alpha-1) * (float32 eps) per rounding of theta_j: ill-conditioned.
        expected = reference.softargmax(theta.numpy(), alpha, log_q.numpy())
        torch.testing.assert_close(p.double(), torch.from_numpy(expected), atol=1e-4, rtol=0)
        # Beyond, q_y^(1-alpha) itself exceeds float32 for q_y = 1e-30.
        loss = alpha_divergence_loss(theta, torch.tensor([0, 20, 40, 60]), alpha, log_q=log_q, reduction="none")
        assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_are_computed_in_float32(dtype):
    torch.manual_seed(7)
    theta = (torch.randn(8, 100) * 5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 100, (8,))
    p = alpha_softargmax(theta, 1.5)
    assert p.dtype == dtype
    torch.testing.assert_close(p.float().sum(1), torch.ones(8), atol=1e-2, rtol=0)
    loss = alpha_divergence_loss(theta, targets, 1.5)
    loss.backward()
    assert theta.grad.dtype == dtype
    expected = alpha_divergence_loss(theta.detach().float(), targets, 1.5)
    torch.testing.assert_close(loss.float(), expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(targets=torch.tensor([0, 5])), "targets"),
    (dict(targets=torch.tensor([0, -1])), "targets"),
    (dict(targets=torch.tensor([0])), "targets"),
    (dict(targets=torch.tensor([0.0, 1.0])), "targets"),
    (dict(logits=torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])), "NaN"),
    (dict(logits=torch.tensor([[0.0, float("inf"), 1.0], [0.0, 1.0, 2.0]])), r"\+inf"),
    (dict(logits=torch.full((2, 3), -math.inf)), "entirely -inf"),
    (dict(logits=torch.zeros(2, 3, 1)), "logits"),
    (dict(log_q=torch.zeros(4)), "log_q"),
    (dict(log_q=torch.tensor([0.0, float("nan"), 0.0])), "log_q"),
    (dict(reduction="avg"), "reduction"),
    (dict(logits=torch.tensor([[0.0, -math.inf, 1.0], [0.0, 1.0, 2.0]]), targets=torch.tensor([1, 0])), "-inf"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message):
    args = dict(logits=torch.zeros(2, 3), targets=torch.tensor([0, 1]), alpha=1.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        alpha_divergence_loss(**args)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.5])
@pytest.mark.parametrize("dense", [False, True])
def test_target_logit_override_equals_loss_of_logits_with_that_entry(alpha, dense, monkeypatch):
    if dense:
        monkeypatch.setattr(softargmax, "_DENSE_FRACTION", 0.0)
    torch.manual_seed(9)
    theta, targets = torch.randn(16, 200) * 4, torch.randint(0, 200, (16,))
    theta[:4, :] = theta[:4, :] - 20  # and a few rows where the override becomes the row maximum
    override = theta.gather(1, targets[:, None]).squeeze(1) + torch.randn(16) * 3
    override[:4] += 30
    theta_a, override_a = theta.clone().requires_grad_(True), override.clone().requires_grad_(True)
    loss_a, _ = operator.loss_rows_and_statistics(theta_a, targets, alpha, target_logits=override_a,
                                                  log_q_target=torch.full((16,), -0.7))
    loss_a.sum().backward()
    theta_b = theta.scatter(1, targets[:, None], override[:, None]).requires_grad_(True)
    loss_b = alpha_divergence_loss(theta_b, targets, alpha, log_q_target=torch.full((16,), -0.7), reduction="none")
    loss_b.sum().backward()
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    column_y = theta_b.grad.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(override_a.grad, column_y, atol=1e-5, rtol=0)
    torch.testing.assert_close(theta_a.grad, theta_b.grad.scatter(1, targets[:, None], 0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("logit_scale", [0.0, -10.0, float("nan"), float("inf"), "10"])
def test_a_logit_scale_that_is_not_a_positive_number_is_named(logit_scale):
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        operator.loss_rows_and_statistics(torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), 1.5,
                                          logit_scale=logit_scale)
