"""The pure-torch solver's own mechanics: candidate widths, Newton passes and the exact root.

The loss's behaviour is specified in test_operator.py for every engine; these tests watch the torch
solver's internals, so ``auto`` never picks the CPU kernel in this module.
"""
import numpy as np
import pytest
import torch

from spkver.losses import alpha_divergence_loss, alpha_softargmax, engines
from spkver.losses import softargmax as operator
from tests import reference


@pytest.fixture(autouse=True)
def torch_solver(monkeypatch):
    monkeypatch.setattr(engines, "AUTO_PREFERENCE", ("dense", "torch"))


def test_sparse_candidate_solve_equals_dense_solve(monkeypatch):
    torch.manual_seed(4)
    theta, targets = torch.randn(32, 1000) * 10, torch.randint(0, 1000, (32,))
    theta.requires_grad_(True)
    sparse_p = alpha_softargmax(theta, 1.5)
    sparse_loss = alpha_divergence_loss(theta, targets, 1.5, reduction="none")
    (grad_sparse,) = torch.autograd.grad(sparse_loss.sum(), theta)
    assert operator.solve_alpha_softargmax(theta, 1.5).index is not None  # the sparse path was taken
    monkeypatch.setattr(operator, "_DENSE_FRACTION", 0.0)
    assert operator.solve_alpha_softargmax(theta, 1.5).index is None
    torch.testing.assert_close(alpha_softargmax(theta, 1.5), sparse_p)
    dense_loss = alpha_divergence_loss(theta, targets, 1.5, reduction="none")
    torch.testing.assert_close(dense_loss, sparse_loss)
    (grad_dense,) = torch.autograd.grad(dense_loss.sum(), theta)
    torch.testing.assert_close(grad_dense, grad_sparse)


def test_newton_converges_in_a_few_passes_for_the_papers_alpha(monkeypatch):
    calls = []
    original = operator._powers

    def counting(z, alpha):
        calls.append(1)
        return original(z, alpha)

    monkeypatch.setattr(operator, "_powers", counting)
    torch.manual_seed(8)
    p = alpha_softargmax(torch.randn(256, 5994) * 30 * 0.3, 1.5)
    assert len(calls) <= 8
    torch.testing.assert_close(p.sum(1), torch.ones(256), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_newton_stops_at_float32_resolution_for_wide_supports(alpha, monkeypatch):
    """Cosines uniform in [-1, 1] at s(alpha-1) = 5: tens of classes in every support, whose mass
    carries rounding above the tolerance; sparsemax rows used to take all 60 passes."""
    calls = []
    original = operator._powers
    monkeypatch.setattr(operator, "_powers", lambda z, a: calls.append(1) or original(z, a))
    torch.manual_seed(3)
    theta = (2 * torch.rand(256, 5994) - 1) * 5 / (alpha - 1)
    p = alpha_softargmax(theta, alpha)
    assert len(calls) <= 10
    expected = torch.from_numpy(reference.softargmax(theta[:16].double().numpy(), alpha))
    torch.testing.assert_close(p[:16].double(), expected, atol=1e-5, rtol=0)


def test_a_few_rows_with_wide_supports_are_solved_alone_and_exactly(monkeypatch):
    """Trained-like rows with one or two candidates, and three untrained rows with hundreds: the
    batch's topk stays narrow, the wide rows are redone alone, and the result is exact."""
    torch.manual_seed(5)
    theta = torch.randn(64, 4000) * 0.5
    targets = torch.randint(0, 4000, (64,))
    theta[torch.arange(61), targets[:61]] += 30.0  # sixty-one rows with a clear winner
    widths = []
    original = operator._attempt
    monkeypatch.setattr(operator, "_attempt", lambda theta, k, *args: widths.append((theta.shape[0], k)) or
                        original(theta, k, *args))
    rows = operator.solve_alpha_softargmax(theta, 1.5, candidates_hint=4)
    assert widths[0] == (64, 4) and [batch for batch, _ in widths[1:]] == [3]  # one redo, of the 3 wide rows
    assert rows.candidates_needed <= 4  # the next batch starts narrow again
    expected = torch.from_numpy(reference.softargmax(theta.double().numpy(), 1.5))
    torch.testing.assert_close(rows.dense().double(), expected, atol=1e-5, rtol=0)
    loss = alpha_divergence_loss(theta.clone().requires_grad_(True), targets, 1.5, reduction="none")
    torch.testing.assert_close(loss.double(), torch.from_numpy(reference.loss(theta.double().numpy(),
                                                                              targets.numpy(), 1.5)),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4.0 / 3.0, 1.25, 1.2])
@pytest.mark.parametrize("spread", ["clear winners", "random init", "uniform"])
def test_integer_degree_alphas_are_solved_exactly_without_newton(alpha, spread, monkeypatch):
    """alpha = 1 + 1/k (the papers' 2, 1.5, 1.25): the root comes from sorted prefix sums, one
    pass; Newton is never called, and p, the loss and the target's margin measure match float64."""
    monkeypatch.setattr(operator, "_newton_tau", lambda *args: pytest.fail("Newton was called"))
    generator = torch.Generator().manual_seed(11)
    theta = {"clear winners": torch.randn(32, 500, generator=generator) * 0.3,
             "random init": torch.randn(32, 500, generator=generator) * 0.07 * 5 / (alpha - 1),
             "uniform": (2 * torch.rand(32, 500, generator=generator) - 1) * 5 / (alpha - 1)}[spread]
    targets = torch.randint(0, 500, (32,), generator=generator)
    if spread == "clear winners":
        theta[torch.arange(32), targets] += 4.0
    log_q_target = -10.0 * 0.2  # Q-Margin at s = 10, m = 0.2
    loss = alpha_divergence_loss(theta, targets, alpha, reduction="none", log_q_target=log_q_target)
    log_q = np.zeros(theta.shape)
    log_q[np.arange(32), targets.numpy()] = log_q_target
    expected = reference.loss(theta.double().numpy(), targets.numpy(), alpha, log_q=log_q)
    torch.testing.assert_close(loss.double(), torch.from_numpy(expected), atol=5e-5, rtol=1e-5)
    p = alpha_softargmax(theta, alpha)
    torch.testing.assert_close(p.double(), torch.from_numpy(reference.softargmax(theta.double().numpy(), alpha)),
                               atol=1e-6, rtol=0)


def test_exact_root_leaves_a_measure_too_uneven_for_its_prefix_sums_to_newton(monkeypatch):
    """q spanning e^(+-20) at alpha = 1.5: the prefix sums' terms would span e^80; Newton solves it."""
    calls = []
    original = operator._newton_tau
    monkeypatch.setattr(operator, "_newton_tau", lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(12)
    theta = torch.randn(4, 30)
    log_q = torch.linspace(-20.0, 20.0, 30)
    p = alpha_softargmax(theta, 1.5, log_q)
    assert calls
    expected = reference.softargmax(theta.double().numpy(), 1.5, log_q.double().numpy())
    torch.testing.assert_close(p.double(), torch.from_numpy(expected), atol=1e-5, rtol=0)
