"""The fused Triton kernel equals the pure-torch solver (on a GPU, or under Triton's CPU interpreter)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from spkver.losses import operator
    from spkver.losses.fused import fused_available, fused_loss_rows

    device = "{device}"
    torch.manual_seed(0)
    cases = [(50, 1.5, None, False), (300, 1.3, -1.2, False), (70, 2.0, None, True), (1000, 1.5, -2.77, True),
             (20000, 1.5, None, False), (9000, 1.7, -0.5, True)]
    for classes, alpha, log_q, override in cases:
        x = (torch.randn(6, classes) * 8).to(device)
        y = torch.randint(0, classes, (6,)).to(device)
        x[0] = 3.0  # a constant row
        x[1, :] = -1e4
        x[1, y[1]] = 1e4  # a huge, already separated row
        log_q_target = None if log_q is None else torch.full((6,), log_q, device=device)
        target = x.gather(1, y[:, None]).squeeze(1) - 3.0 if override else None
        assert fused_available(x, alpha, None)
        loss, grad, p_y, support = fused_loss_rows(x, y, alpha, log_q_target, target)
        reference = x.detach().cpu().clone().requires_grad_(True)
        ref_target = None if target is None else target.cpu().clone().requires_grad_(True)
        import spkver.losses.fused as fused
        fused.fused_available = lambda *a: False  # the oracle: the pure-torch path
        operator_loss, _ = operator.loss_rows_and_statistics(
            reference, y.cpu(), alpha, log_q_target=None if log_q_target is None else log_q_target.cpu(),
            target_logits=ref_target)
        operator_loss.sum().backward()
        fused.fused_available = fused_available
        torch.testing.assert_close(loss.cpu(), operator_loss.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad.cpu(), reference.grad, atol=2e-6, rtol=0)
        if ref_target is not None:
            torch.testing.assert_close((p_y - 1).cpu(), ref_target.grad, atol=2e-6, rtol=0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    print("fused kernel agrees")
""")


def _interpreter_works() -> bool:
    probe = "import numpy; assert tuple(int(v) for v in numpy.__version__.split('.')[:2]) < (2, 4)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.skipif(not torch.cuda.is_available() and not _interpreter_works(),
                    reason="needs a CUDA device or Triton's interpreter (numpy < 2.4)")
def test_fused_kernel_matches_the_torch_solver_loss_and_gradients():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", CHECK.format(device=device)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused kernel agrees" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_objectives_use_the_fused_kernel_on_cuda_and_agree_with_the_cpu():
    from spkver.losses import A3M, QMargin

    torch.manual_seed(1)
    cosine = torch.nn.functional.normalize(torch.randn(64, 32), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(3000, 32), dim=1).T
    targets = torch.randint(0, 3000, (64,))
    for objective in (QMargin(30.0, 0.2, 1.5), A3M(30.0, 0.2, 1.5)):
        results = []
        for device in ("cpu", "cuda"):
            x = cosine.detach().to(device).requires_grad_(True)
            loss = objective(x, targets.to(device))
            loss.backward()
            results.append((loss.detach().cpu(), x.grad.cpu()))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)
