"""The fused Triton kernel equals the pure-torch solver (on a GPU, or under Triton's CPU interpreter)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from spkver.losses.engines import select_engine
    from spkver.losses.engines.base import LossCall
    from spkver.losses.engines.triton_kernel import fused_loss_rows
    from spkver.losses.loss import loss_rows_and_statistics

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
        assert select_engine("triton", LossCall(x, y, alpha)).name == "triton"
        loss, grad, p_y, support = fused_loss_rows(x, y, alpha, log_q_target, target)
        reference = x.detach().cpu().clone().requires_grad_(True)
        ref_target = None if target is None else target.cpu().clone().requires_grad_(True)
        operator_loss, _ = loss_rows_and_statistics(  # the oracle: the pure-torch solver
            reference, y.cpu(), alpha, log_q_target=None if log_q_target is None else log_q_target.cpu(),
            target_logits=ref_target, engine="torch" if alpha > 1 else "dense")
        operator_loss.sum().backward()
        torch.testing.assert_close(loss.cpu(), operator_loss.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(grad.cpu(), reference.grad, atol=2e-6, rtol=0)
        if ref_target is not None:
            torch.testing.assert_close((p_y - 1).cpu(), ref_target.grad, atol=2e-6, rtol=0)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    print("fused kernel agrees")
""")


OBJECTIVES_CHECK = textwrap.dedent("""
    import torch
    from spkver.losses import A3M, AlphaDiv, ArcFace, CosFace, QMargin, Softmax, alpha_divergence_loss

    device = "{device}"

    def run(call, fused_kernel, *tensors):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        if isinstance(call, torch.nn.Module):  # an objective: the kernel, or the torch engine of its alpha
            engine = "triton" if fused_kernel else ("torch" if call.alpha > 1 else "dense")
            loss = call(*leaves, engine=engine)
            call.last_statistics.check()  # the kernel's input checks are read here, with the statistics
        else:  # a function of logits and targets
            loss = call(*leaves, fused_kernel=fused_kernel)
        loss.sum().backward()
        return loss.detach().cpu(), [t.grad.cpu() for t in leaves if t.grad is not None]

    def error(call, fused_kernel, *tensors):
        try:
            run(call, fused_kernel, *tensors)
        except ValueError as caught:
            return str(caught)
        raise AssertionError("no error")

    torch.manual_seed(0)
    for classes in (4500, 300):  # three tiles, the last one partial; one tile (kept for the checks below)
        cosine = (torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
                  @ torch.nn.functional.normalize(torch.randn(classes, 8), dim=1).T).to(device)
        targets = torch.randint(0, classes, (16,)).to(device)
        # The clamps of the angular margin: cos_y at, beyond and just inside +-1.
        cosine[0, targets[0]], cosine[1, targets[1]], cosine[2, targets[2]] = 1.0, -1.0, 0.9999999
        cosine[3, targets[3]] = -0.999
        for objective in (AlphaDiv(30.0, 1.5), QMargin(30.0, 0.2, 1.5), QMargin(30.0, 0.2, 1.3, log_q_target=-2.0),
                          A3M(30.0, 0.2, 1.5), A3M(30.0, 0.5, 2.0), A3M(30.0, 0.2, 1.7, reduction="none"),
                          Softmax(30.0), CosFace(30.0, 0.2, reduction="sum"), ArcFace(30.0, 0.5),
                          QMargin(30.0, 0.2, 1.0, reduction="none")):
            kernel = run(objective, True, cosine, targets)
            assert objective.last_engine.name == "triton"
            kernel_statistics = objective.last_statistics
            torch_path = run(objective, False, cosine, targets)
            torch.testing.assert_close(kernel[0], torch_path[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(kernel[1][0], torch_path[1][0], atol=2e-5, rtol=1e-5)
            for name in ("support_size", "target_zero_fraction", "target_prob"):
                assert abs(getattr(kernel_statistics, name) - getattr(objective.last_statistics, name)) < 1e-6, name
            if classes > 300:
                continue
            # bfloat16 cosines: the kernel forms the logits in float32, so it matches float32 to one bf16 step.
            half = run(objective, True, cosine.bfloat16(), targets)
            exact = run(objective, False, cosine.bfloat16().float(), targets)
            assert half[1][0].dtype == torch.bfloat16
            torch.testing.assert_close(half[0], exact[0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(half[1][0].float(), exact[1][0], atol=1e-5, rtol=2 ** -7)

    # Bad input: the same error from the kernel's checks as from the torch path, objectives and function alike.
    objective = A3M(30.0, 0.2, 1.5)
    functional = lambda logits, y, override=None, fused_kernel=True: alpha_divergence_loss(
        logits, y, 1.5, reduction="none", log_q_target=override, engine="triton" if fused_kernel else "torch")
    nan, inf = float("nan"), float("inf")
    bad_cosines = [cosine.clone() for _ in range(4)]
    bad_cosines[0][3, 7] = nan
    bad_cosines[1][4, 9] = inf
    bad_cosines[2][5] = -inf
    bad_cosines[3][6, targets[6]] = -inf
    bad_targets = targets.clone()
    bad_targets[2] = classes
    cases = [(objective, (c, targets)) for c in bad_cosines[:3]] + [(objective, (cosine, bad_targets))]
    cases += [(functional, (c, targets)) for c in bad_cosines] + [(functional, (cosine, bad_targets))]
    cases += [(functional, (cosine, targets, torch.full((16,), nan, device=device)))]
    cross_entropy = lambda logits, y, fused_kernel=True: alpha_divergence_loss(
        logits, y, 1.0, reduction="none", engine="triton" if fused_kernel else "dense")
    cases += [(ArcFace(30.0, 0.2), (bad_cosines[0], targets)), (cross_entropy, (cosine, bad_targets))]
    for call, tensors in cases:
        message = error(call, True, *tensors)
        assert message == error(call, False, *tensors), message

    # On the kernel the objective does not wait for the host: the call returns, and the error comes at the
    # next read of its statistics, the same error.
    deferred = A3M(30.0, 0.2, 1.5, engine="triton")
    deferred(bad_cosines[0], targets)
    try:
        deferred.last_statistics.support_size
    except ValueError as caught:
        assert str(caught) == error(objective, False, bad_cosines[0], targets), str(caught)
    else:
        raise AssertionError("bad input was not reported at the read")

    # The kernel marks a bad row's loss NaN (never a plausible number) besides counting the problem.
    from spkver.losses.engines.triton_kernel import fused_loss_and_totals
    rows, _, _, totals = fused_loss_and_totals(cosine, bad_targets, 1.5, scale=30.0)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(16) != 2]).all() and totals[-1] == 1
    print("fused objectives agree")
""")


NEWTON_CHECK = textwrap.dedent("""
    import numpy as np
    import torch
    from spkver.losses.engines import triton_kernel
    from tests import reference

    # The papers' (s, alpha) pairs with Q-Margin (m = 0.2) and without a margin, on the cosines of three
    # moments of training, C = 5,994 (VoxCeleb2's speakers): the fixed Newton passes against float64.
    rng = np.random.default_rng(0)
    batch, classes, dim = 8, 5994, 192
    rows = np.arange(batch)

    def cosines(regime):
        targets = rng.integers(0, classes, batch)
        if regime == "random init":
            unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
            cosine = unit(rng.standard_normal((batch, dim))) @ unit(rng.standard_normal((classes, dim))).T
        else:
            spread, low, high = (0.15, 0.3, 0.6) if regime == "mid-training" else (0.1, 0.6, 0.9)
            cosine = np.clip(rng.normal(0.0, spread, (batch, classes)), -1, 1)
            cosine[rows, targets] = rng.uniform(low, high, batch)
        return cosine.astype(np.float32), targets

    worst_mass = worst_loss = 0.0
    for scale, alpha in ((10.0, 1.5), (20.0, 1.25), (5.0, 2.0)):
        for margin in (0.2, 0.0):
            for regime in ("random init", "mid-training", "trained-like"):
                cosine, targets = cosines(regime)
                log_q_y = -scale * margin
                loss, grad, _, totals = triton_kernel.fused_loss_and_totals(
                    torch.from_numpy(cosine), torch.from_numpy(targets), alpha, scale=scale, log_q_y=log_q_y)
                assert float(totals[-1]) == 0
                theta = scale * cosine.astype(np.float64)
                log_q = np.zeros_like(theta)
                log_q[rows, targets] = log_q_y
                expected = reference.loss(theta, targets, alpha, log_q=log_q)
                # The kernel's tau, from its outputs: with p normalised, L = tau / alpha + (terms without tau).
                p = grad.double().numpy() / scale + np.eye(classes)[targets]
                log_alpha_inverse = np.expm1((1 - alpha) * log_q_y) / (alpha - 1)
                tau = alpha * (loss.double().numpy() - (alpha - 1) / alpha * (p * theta).sum(1)
                               + theta[rows, targets] - log_alpha_inverse / alpha)
                z = np.clip(1 + (alpha - 1) * (theta - tau[:, None]), 0, None)
                mass = (np.exp(log_q) * z ** (1 / (alpha - 1))).sum(1)
                # float32 cancels terms of size s in the loss: one float32 unit of tau is its floor
                floor = 2 * np.spacing(np.abs(tau).astype(np.float32)).astype(np.float64)
                loss_error = np.abs(loss.double().numpy() - expected) - floor
                assert np.all(np.abs(mass - 1) <= 1e-3), (scale, alpha, margin, regime, mass)
                assert np.all(loss_error <= 1e-4 * np.abs(expected)), (scale, alpha, margin, regime, loss_error)
                worst_mass = max(worst_mass, float(np.abs(mass - 1).max()))
                worst_loss = max(worst_loss, float((np.abs(loss.double().numpy() - expected)
                                                    / np.maximum(np.abs(expected), 1e-3)).max()))
    print(f"newton passes enough: mass within {{worst_mass:.1e}}, loss within {{worst_loss:.1e}}")
""")


def _interpreter_works() -> bool:
    probe = "import numpy; assert tuple(int(v) for v in numpy.__version__.split('.')[:2]) < (2, 4)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


needs_kernel = pytest.mark.skipif(not torch.cuda.is_available() and not _interpreter_works(),
                                  reason="needs a CUDA device or Triton's interpreter (numpy < 2.4)")


def _run_on_the_kernel(script: str, expected: str) -> None:
    """Run ``script`` on the GPU, or on the CPU under Triton's interpreter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", script.format(device=device)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


@needs_kernel
def test_fused_kernel_matches_the_torch_solver_loss_and_gradients():
    _run_on_the_kernel(CHECK, "fused kernel agrees")


@needs_kernel
def test_objectives_in_one_kernel_match_the_torch_path_and_raise_the_same_errors():
    """Margin, scale, reference mass, gradient, statistics and input checks all run inside the kernel."""
    _run_on_the_kernel(OBJECTIVES_CHECK, "fused objectives agree")


def test_an_objective_call_launches_no_more_kernels_than_cross_entropy(replace_fused_kernel_by_a_noop,
                                                                          launch_counter):
    """An isolated call on a GPU is bound by its launches: the fused path needs no more than cross_entropy.

    The kernel itself is replaced by a no-op, so this counts what surrounds it, on any machine.
    """
    from spkver.losses import A3M, AlphaDiv, ArcFace, QMargin

    replace_fused_kernel_by_a_noop()
    cosine = torch.rand(8, 100) * 2 - 1
    targets = torch.randint(0, 100, (8,))
    counts = {}
    for name, call in (("cross_entropy", lambda x: torch.nn.functional.cross_entropy(30.0 * x, targets)),
                       ("AlphaDiv", lambda x: AlphaDiv(30.0, 1.5, engine="triton")(x, targets)),
                       ("QMargin", lambda x: QMargin(30.0, 0.2, 1.5, engine="triton")(x, targets)),
                       ("A3M", lambda x: A3M(30.0, 0.2, 1.5, engine="triton")(x, targets)),
                       ("ArcFace", lambda x: ArcFace(30.0, 0.2, engine="triton")(x, targets))):
        x = cosine.clone().requires_grad_(True)
        with launch_counter() as counter:
            call(x).backward()
        counts[name] = counter.launches
    assert len(counts["cross_entropy"]) == 7, counts["cross_entropy"]
    for name in ("AlphaDiv", "QMargin", "A3M", "ArcFace"):
        # zeroing the totals, autograd's seed gradient (cross_entropy has it too), the backward product
        assert sorted(counts[name]) == ["mul", "ones_like", "zeros"], (name, counts[name])
        assert len(counts[name]) + 1 < len(counts["cross_entropy"])  # + 1: the fused kernel itself


class _HostReads(TorchDispatchMode):
    """Records the torch operations that read a tensor's value on the host (``.item()``, ``bool()``, ``.cpu()``)."""

    READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS or (name == "_to_copy" and (kwargs or {}).get("device") == torch.device("cpu")):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_on_the_gpu_path_the_objective_reads_nothing_back_until_its_statistics_are_read(
        replace_fused_kernel_by_a_noop, monkeypatch):
    """No host sync in the step: the input checks and statistics stay on the device until asked for."""
    from spkver.losses import A3M, CosFace, QMargin
    from spkver.losses.engines import base

    replace_fused_kernel_by_a_noop()
    transfers = []
    monkeypatch.setattr(base, "to_host", lambda tensor: transfers.append(tuple(tensor.shape)) or tensor.tolist())
    cosine, targets = torch.rand(8, 100) * 2 - 1, torch.randint(0, 100, (8,))
    for objective in (QMargin(10.0, 0.2, 1.5, engine="triton"), A3M(10.0, 0.2, 1.5, engine="triton"),
                      CosFace(30.0, 0.2, engine="triton")):
        x = cosine.clone().requires_grad_(True)
        with _HostReads() as host:
            objective(x, targets).backward()
            objective(x, targets).backward()  # a second step: still nothing read
        assert host.reads == [] and transfers == [], (objective, host.reads, transfers)
        assert objective.last_engine.name == "triton"
        objective.last_statistics.support_size  # asking reads the statistics and the checks, in one transfer
        objective.last_statistics.target_prob
        assert transfers == [(4,)]
        transfers.clear()


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


def _compile_for_h100(dtype: str, **constants) -> dict:
    """Compile the kernel ahead of time for sm_90 (Triton's bundled ptxas: no GPU needed); return its assembly."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as compile_kernel

    from spkver.losses.engines import triton_kernel

    kernel = triton_kernel._alpha_loss_kernel
    names = kernel.arg_names
    pointers = {"logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "loss_ptr": "*fp32", "p_y_ptr": "*fp32",
                "support_ptr": "*i32", "targets_ptr": "*i64", "target_logit_ptr": "*fp32", "log_q_y_ptr": "*fp32",
                "tile_max_ptr": "*fp32", "totals_ptr": "*fp32"}
    signature = {name: pointers.get(name) or ("i32" if name in ("classes", "stride", "tiles") else
                                              "constexpr" if name.isupper() else "fp32") for name in names}
    constants = {"ITERATIONS": 12, "BLOCK": 2048, "SOFTMAX": False, "SQUARE": False, "REDUCE": False, **constants}
    assert {name for name in names if name.isupper()} == set(constants), "every constexpr needs a value"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return compile_kernel(source, target=GPUTarget("cuda", 90, 32)).asm


@needs_kernel
def test_the_kernels_fixed_newton_passes_reach_the_float64_root_at_the_papers_settings():
    """12 passes at (s, alpha) = (10, 1.5), (20, 1.25), (5, 2) from random-init to trained cosines: the mass
    at the kernel's tau within 1e-3 of 1, the loss within 1e-4 of float64 (the worst case, (5, 2) at random
    init, needs 9 passes; docs/losses.md has the measurement)."""
    assert triton_newton_iterations() == 12
    _run_on_the_kernel(NEWTON_CHECK, "newton passes enough")


def triton_newton_iterations() -> int:
    from spkver.losses.engines import triton_kernel

    return triton_kernel._NEWTON_ITERATIONS


@pytest.mark.parametrize("dtype, constants", [
    # a whole objective: A3M at alpha 1.5 (mean), QMargin at another alpha (general powers, per row),
    # CosFace's margin in bf16 (sum)
    ("fp32", dict(HAS_TARGET_LOGIT=False, HAS_LOG_Q=False, MARGIN=2, TOTALS=True, REDUCE=True, SQUARE=True)),
    ("fp32", dict(HAS_TARGET_LOGIT=False, HAS_LOG_Q=False, MARGIN=0, TOTALS=True, SQUARE=False)),
    ("bf16", dict(HAS_TARGET_LOGIT=False, HAS_LOG_Q=False, MARGIN=1, TOTALS=True, REDUCE=True, SQUARE=True)),
    # alpha_divergence_loss with per-row target logits and log q_y; fused_loss_rows without totals
    ("fp32", dict(HAS_TARGET_LOGIT=True, HAS_LOG_Q=True, MARGIN=0, TOTALS=True, SQUARE=False)),
    ("fp16", dict(HAS_TARGET_LOGIT=False, HAS_LOG_Q=False, MARGIN=0, TOTALS=False, SQUARE=True)),
    # alpha = 1: ArcFace, and cross-entropy with target logits and log q_y
    ("fp32", dict(HAS_TARGET_LOGIT=False, HAS_LOG_Q=False, MARGIN=2, TOTALS=True, REDUCE=True, SOFTMAX=True)),
    ("bf16", dict(HAS_TARGET_LOGIT=True, HAS_LOG_Q=True, MARGIN=0, TOTALS=True, SOFTMAX=True)),
])
def test_the_kernel_compiles_for_an_h100_without_one(dtype, constants):
    """The interpreter accepts code a GPU compiler rejects: compile every branch to an sm_90 binary."""
    assembly = _compile_for_h100(dtype, **constants)
    assert len(assembly["cubin"]) > 10_000
    atomics = assembly["ptx"].count("atom.global")
    assert atomics == (4 + constants.get("REDUCE", False) if constants["TOTALS"] else 0)  # statistics, loss
