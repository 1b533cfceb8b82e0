"""The engine registry: every engine equals the float64 definition, ``auto`` says what it chose, a named
engine that cannot serve a call is refused with the reason."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spkver.losses import CosFace, QMargin, alpha_divergence_loss
from spkver.losses.engines import ENGINE_NAMES, ENGINES, EngineError, select_engine
from spkver.losses.engines.base import LossCall
from tests import reference

#: (alpha, log q_y of the target or None, with a general log_q): the calls each engine is held to.
CASES = [(1.0, None, False), (1.0, -2.0, False), (1.0, None, True), (1.25, -4.0, False), (1.5, -2.0, False),
         (2.0, None, False), (1.5, None, True), (3.0, None, False)]


def _serves(engine: str, alpha: float, general_measure: bool, device: str = "cpu") -> bool:
    call = LossCall(torch.zeros(2, 3, device=device), torch.zeros(2, dtype=torch.long, device=device), alpha,
                    log_q=torch.zeros(3, device=device) if general_measure else None)
    return ENGINES[engine].unsupported(call, automatic=False) is None


def check_engine_against_the_float64_definition(engine: str) -> int:
    """Loss and gradient of every case ``engine`` serves against tests/reference.py; returns the cases run."""
    generator = torch.Generator().manual_seed(0)
    ran = 0
    for alpha, log_q_y, general in CASES:
        if not _serves(engine, alpha, general):
            continue
        theta = torch.randn(12, 400, generator=generator) * 3.0
        targets = torch.randint(0, 400, (12,), generator=generator)
        log_q = torch.rand(400, generator=generator) * -2.0 if general else None
        reference_log_q = np.zeros((12, 400)) if log_q is None else np.tile(log_q.double().numpy(), (12, 1))
        if log_q_y is not None:
            reference_log_q[np.arange(12), targets.numpy()] = log_q_y
        expected = reference.loss(theta.double().numpy(), targets.numpy(), alpha, log_q=reference_log_q)
        p = reference.softargmax(theta.double().numpy(), alpha, log_q=reference_log_q)
        x = theta.clone().requires_grad_(True)
        loss = alpha_divergence_loss(x, targets, alpha, log_q=log_q, reduction="none",
                                     log_q_target=log_q_y, engine=engine)
        loss.sum().backward()
        np.testing.assert_allclose(loss.detach().double().numpy(), expected, atol=5e-5, rtol=1e-5,
                                   err_msg=f"{engine} at alpha={alpha}")
        gradient = p - np.eye(400)[targets.numpy()]
        np.testing.assert_allclose(x.grad.double().numpy(), gradient, atol=5e-6, err_msg=f"{engine} at alpha={alpha}")
        ran += 1
    return ran


@pytest.mark.parametrize("engine", [name for name in ENGINE_NAMES if name != "auto"])
def test_every_engine_equals_the_float64_definition_on_the_calls_it_serves(engine):
    if engine != "triton":
        assert check_engine_against_the_float64_definition(engine) >= 2
        return
    pytest.importorskip("triton")
    # The Triton kernel on the CPU runs under its interpreter, which must be switched on before Triton loads.
    environment = dict(os.environ, TRITON_INTERPRET="1")
    script = ("from tests.test_engines import check_engine_against_the_float64_definition as check; "
              "print('cases', check('triton'))")
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cases 5" in done.stdout, done.stdout


def test_auto_takes_the_first_engine_that_serves_the_call_and_says_why():
    cosine, targets = torch.rand(4, 50), torch.randint(0, 50, (4,))
    choice = select_engine("auto", LossCall(cosine, targets, 1.5))
    assert choice.name == "cpu"
    assert "triton: auto uses it on CUDA tensors only" in choice.reason
    assert select_engine("auto", LossCall(cosine, targets, 1.0)).name == "dense"
    assert select_engine("auto", LossCall(cosine, targets, 2.5)).name == "torch"  # beyond the kernels' alpha
    general = select_engine("auto", LossCall(cosine, targets, 1.5, log_q=torch.zeros(50)))
    assert general.name == "torch" and "cpu: it serves the unit measure" in general.reason


@pytest.mark.parametrize("engine, alpha, reason", [
    ("cpu", 1.0, "it serves 1 < alpha <= 2"),
    ("cpu", 3.0, "it serves 1 < alpha <= 2"),
    ("dense", 1.5, "cross-entropy is the alpha = 1 loss"),
    ("torch", 1.0, "alpha = 1 is the softmax cross-entropy"),
    ("triton", 1.5, "it runs on CUDA tensors"),
])
def test_an_engine_asked_for_by_name_that_cannot_serve_the_call_is_refused_with_the_reason(engine, alpha, reason,
                                                                                            monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    objective = QMargin(10.0, 0.2, alpha, engine=engine) if alpha > 1 else CosFace(30.0, 0.2, engine=engine)
    with pytest.raises(EngineError, match=f"engine '{engine}' cannot serve this call: {reason}"):
        objective(torch.rand(4, 20), torch.randint(0, 20, (4,)))
    with pytest.raises(ValueError, match=reason):  # the function too, and it is a ValueError
        alpha_divergence_loss(torch.rand(4, 20), torch.randint(0, 20, (4,)), alpha, engine=engine)


def test_an_unknown_engine_name_is_refused_when_the_objective_is_built():
    with pytest.raises(EngineError, match="engine must be one of auto, triton, cpu, dense, torch; got 'cuda'"):
        QMargin(10.0, 0.2, 1.5, engine="cuda")


def test_the_recipe_logs_once_which_engine_ran_and_why(caplog):
    from spkver.brain import log_engine_once

    objective = QMargin(10.0, 0.2, 1.5)
    seen = set()
    with caplog.at_level(logging.INFO, logger="spkver.brain"):
        for _ in range(3):
            objective(torch.rand(4, 20), torch.randint(0, 20, (4,)))
            log_engine_once(objective, seen)
    lines = [record.getMessage() for record in caplog.records if "loss engine" in record.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("loss engine: 'cpu' (the compiled CPU kernel") and "auto: the first engine" in lines[0]
