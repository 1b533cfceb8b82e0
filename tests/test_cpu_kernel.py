"""The compiled CPU kernel equals the float64 definition and the torch solver, and is what the CPU runs."""
import math
import warnings

import numpy as np
import pytest
import torch

from spkver.losses import A3M, QMargin, alpha_divergence_loss
from spkver.losses.engines import ENGINES, cpu_kernel, torch_solver
from spkver.losses.engines.base import LossCall
from spkver.losses.engines.cpu_kernel import cpu_kernel_loss_rows
from spkver.losses.loss import loss_rows_and_statistics
from tests import reference

PAIRS = [(20.0, 1.25), (10.0, 1.5), (5.0, 2.0)]


def cpu_kernel_available(cosine, alpha, log_q):
    """Whether the registry's ``cpu`` engine serves this call (as ``auto`` asks)."""
    call = LossCall(cosine, torch.zeros(cosine.shape[0], dtype=torch.long), alpha, log_q=log_q)
    return ENGINES["cpu"].unsupported(call, automatic=True) is None


def _cosines(family, batch, classes, generator):
    """Cosines at the start of training, spread uniformly, or trained (a clear target)."""
    if family == "random init":
        cosine = torch.randn(batch, classes, generator=generator) * 0.07
    elif family == "uniform":
        cosine = 2 * torch.rand(batch, classes, generator=generator) - 1
    else:
        cosine = torch.randn(batch, classes, generator=generator) * 0.07
    targets = torch.randint(0, classes, (batch,), generator=generator)
    if family == "trained":
        cosine[torch.arange(batch), targets] = 0.9
    return cosine, targets


def _reference_loss_and_p(cosine, targets, alpha, scale, log_q_y):
    """Float64 loss rows and p from the bisection reference with the target's measure."""
    theta = scale * cosine.double().numpy()
    log_q = np.zeros(theta.shape)
    log_q[np.arange(len(targets)), targets.numpy()] = log_q_y
    loss = reference.loss(theta, targets.numpy(), alpha, log_q=log_q)
    return torch.from_numpy(loss), torch.from_numpy(reference.softargmax(theta, alpha, log_q))


def test_the_kernel_is_built_here_and_runs_the_cpu_objectives(monkeypatch):
    """With a C compiler (as on every supported machine) the objectives never reach the torch solver."""
    cosine, targets = _cosines("random init", 8, 500, torch.Generator().manual_seed(0))
    assert cpu_kernel_available(cosine, 1.5, None)
    assert not cpu_kernel_available(cosine, 1.0, None) and not cpu_kernel_available(cosine, 2.5, None)
    assert not cpu_kernel_available(cosine, 1.5, torch.zeros(500))  # a general measure: the torch solver
    monkeypatch.setattr(torch_solver, "solve_alpha_softargmax", lambda *a, **k: pytest.fail("torch solver used"))
    for objective in (QMargin(10.0, 0.2, 1.5), A3M(10.0, 0.2, 1.5)):
        cosine.requires_grad_(True)
        objective(cosine, targets).backward()
        assert torch.isfinite(cosine.grad).all()
        cosine.grad = None


@pytest.mark.parametrize("scale, alpha", PAIRS)
@pytest.mark.parametrize("family", ["random init", "uniform", "trained"])
def test_loss_and_gradient_equal_the_float64_definition_at_the_papers_settings(scale, alpha, family):
    """Q-Margin's measure q_y = exp(-s m) at the papers' (s, alpha), supports from 1 to hundreds of classes."""
    cosine, targets = _cosines(family, 12, 3000, torch.Generator().manual_seed(1))
    log_q_y = -scale * 0.2
    loss, grad, p_y, support = cpu_kernel_loss_rows(cosine, targets, alpha, scale,
                                                    log_q_target=torch.full((12,), log_q_y))
    expected_loss, expected_p = _reference_loss_and_p(cosine, targets, alpha, scale, log_q_y)
    torch.testing.assert_close(loss.double(), expected_loss, atol=2e-5, rtol=1e-5)
    one_hot = torch.nn.functional.one_hot(targets, 3000).double()
    torch.testing.assert_close(grad.double(), scale * (expected_p - one_hot), atol=2e-6 * scale, rtol=0)
    torch.testing.assert_close(p_y.double(), expected_p[torch.arange(12), targets], atol=2e-6, rtol=0)
    # the support, up to classes at its edge whose p (z^k for z near 0) is below float64's resolution of tau
    assert ((expected_p > 1e-12).sum(1) <= support).all() and (support <= (expected_p > 0).sum(1)).all()


@pytest.mark.parametrize("alpha", [1.1, 1.3, 4.0 / 3.0, 1.7, 2.0])
@pytest.mark.parametrize("override", [False, True])
def test_the_kernel_and_the_torch_solver_agree_with_a_margin_and_a_target_measure(alpha, override, monkeypatch):
    """Non-integer and integer 1/(alpha-1), a target logit given apart (a margin): loss, both gradients, p_y."""
    generator = torch.Generator().manual_seed(2)
    cosine = torch.randn(16, 700, generator=generator) * 0.3
    targets = torch.randint(0, 700, (16,), generator=generator)
    log_q_target = torch.full((16,), -1.5)

    def run(engine):
        x = cosine.clone().requires_grad_(True)
        margin = (x.detach().gather(1, targets[:, None]).squeeze(1) * 12.0 - 1.0).requires_grad_(True)
        loss, statistics = loss_rows_and_statistics(
            x, targets, alpha, log_q_target=log_q_target, target_logits=margin if override else None,
            logit_scale=12.0, engine=engine)
        (loss * torch.linspace(0.5, 1.5, 16)).sum().backward()
        return loss.detach(), x.grad, margin.grad, statistics

    kernel, solver = run("cpu"), run("torch")
    torch.testing.assert_close(kernel[0], solver[0], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(kernel[1], solver[1], atol=3e-5, rtol=0)
    if override:
        torch.testing.assert_close(kernel[2], solver[2], atol=3e-6, rtol=0)
    assert kernel[3].support_size == pytest.approx(solver[3].support_size)
    assert kernel[3].target_prob == pytest.approx(solver[3].target_prob, abs=1e-6)


def test_hostile_rows_give_the_definitions_values():
    """A constant row, a row separated by 2e4, masked (-inf) classes, a lone allowed class, one class in all."""
    theta = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 5
    targets = torch.tensor([0, 1, 2, 3, 0])
    theta[0] = 3.0
    theta[1] = -1e4
    theta[1, 1] = 1e4
    theta[2, 20:] = -math.inf
    theta[3] = -math.inf
    theta[3, 3] = 0.5
    for alpha in (1.25, 1.5, 2.0):
        loss, grad, _, support = cpu_kernel_loss_rows(theta, targets, alpha)
        expected = reference.loss(theta.double().numpy(), targets.numpy(), alpha)
        torch.testing.assert_close(loss.double(), torch.from_numpy(expected), atol=1e-4, rtol=1e-5)
        assert torch.isfinite(grad).all() and support[1] == 1 and support[3] == 1 and loss[3] == 0.0
        assert torch.allclose(grad.sum(1), torch.zeros(5), atol=1e-5)  # p sums to 1
        single, single_grad, p_y, _ = cpu_kernel_loss_rows(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), alpha)
        assert torch.equal(single, torch.zeros(3)) and torch.equal(p_y, torch.ones(3))
        assert torch.equal(single_grad, torch.zeros(3, 1))


def test_bad_input_is_named_as_on_the_torch_path(monkeypatch):
    """The kernel's row maxima carry the input check: the same message as the torch solver gives."""
    cosine = torch.randn(6, 50) * 0.3
    targets = torch.randint(0, 50, (6,))
    bad = [cosine.clone() for _ in range(3)]
    bad[0][2, 7] = math.nan
    bad[1][4, 9] = math.inf
    bad[2][5] = -math.inf
    for logits in bad:
        messages = []
        for engine in ("cpu", "torch"):
            with pytest.raises(ValueError) as error:
                QMargin(10.0, 0.2, 1.5, engine=engine)(logits, targets)
            messages.append(str(error.value))
        assert messages[0] == messages[1] and "row" in messages[0]


def test_results_do_not_depend_on_the_thread_count_and_backward_can_run_twice():
    cosine, targets = _cosines("random init", 64, 2000, torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel_loss_rows(cosine, targets, 1.25, 20.0)
        torch.set_num_threads(max(2, threads))
        many = cpu_kernel_loss_rows(cosine, targets, 1.25, 20.0)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    x = cosine.clone().requires_grad_(True)
    loss = alpha_divergence_loss(x, targets, 1.5, reduction="sum")
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_gradient_comes_back_in_the_input_dtype(dtype):
    x = (torch.randn(4, 30) * 3).to(dtype).requires_grad_(True)
    alpha_divergence_loss(x, torch.tensor([0, 1, 2, 3]), 1.5).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_without_a_compiler_the_torch_solver_takes_over_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPKVER_CACHE_DIR", str(tmp_path / "cache"))
    cosine = torch.randn(4, 30)
    with pytest.warns(RuntimeWarning, match="torch solver is used instead"):
        assert not cpu_kernel_available(cosine, 1.5, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        loss = alpha_divergence_loss(cosine, torch.tensor([0, 1, 2, 3]), 1.5)
    assert torch.isfinite(loss)
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu_kernel_loss_rows(cosine, torch.tensor([0, 1, 2, 3]), 1.5)


def test_the_library_is_built_once_into_the_cache_named_by_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("SPKVER_CACHE_DIR", str(tmp_path))
    assert cpu_kernel._loaded() is not None
    built = list(tmp_path.glob("cpu_kernel-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.so.*")) and len(list(tmp_path.iterdir())) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel._library.cache_clear()  # a new process: the cached file is loaded, not rebuilt
    assert cpu_kernel._loaded() is not None and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("objective", [A3M(10.0, 0.2, 1.5), A3M(20.0, 0.1, 1.25)])
def test_a_geometric_margin_takes_its_gradient_through_the_kernel_as_through_the_torch_solver(objective,
                                                                                              monkeypatch):
    """A3M's s cos(phi_y + m): the kernel writes (p_y - 1) s psi'(cos_y) into the target column itself."""
    cosine, targets = _cosines("random init", 32, 1500, torch.Generator().manual_seed(6))
    cosine[torch.arange(0, 32, 2), targets[::2]] = 0.7  # half the rows with a clear target

    def gradient(engine):
        x = cosine.clone().requires_grad_(True)
        objective(x, targets, engine=engine).backward()
        return x.grad

    torch.testing.assert_close(gradient("cpu"), gradient("torch"), atol=2e-6, rtol=1e-4)
