r"""The alpha-divergence loss on the CPU in compiled code: one selection pass per row, no ``topk``.

The torch solver of :mod:`spkver.losses.softargmax` keeps the top candidates of
each row with a ``topk``, and at the papers' small scales (s = 20, alpha =
1.25 early in training) a row keeps some 300 of 5,994 classes: that ``topk``
alone costs more than the whole cross-entropy it is compared with, and the
dozens of small torch operations around it cost as much again.  This module
compiles ``cpu_kernel.c`` (plain C and POSIX threads, about a second with the
system's C compiler) and runs the loss row by row:

1. the largest non-target logit gives :math:`\tau_{lo} = \max(\max_{j \ne y}
   \theta_j, b_y)`, :math:`b_y = \theta_y - \log_\alpha(1/q_y)`, a lower
   bound of the root :math:`\tau` of :math:`\sum_j p_j = 1`;
2. one pass keeps the classes with :math:`\theta_j > \tau_{lo} - 1/(\alpha-1)`:
   no other can be in the support;
3. Newton from :math:`\tau_{lo}` on :math:`\varphi(\tau) = M(\tau)^{\alpha-1} - 1`
   over the kept classes, in float64.  For :math:`1 < \alpha \le 2`,
   :math:`\varphi` is convex and decreasing, so the iterates rise monotonically
   to the root and a class whose :math:`p_j` has reached zero is dropped for
   good: the passes shrink to the support;
4. :math:`s(p - e_y)` is written as the row's gradient and
   :math:`L = \tfrac{\alpha-1}{\alpha}\langle p, \theta - \tau\rangle - (\theta_y - \tau) + \log_\alpha(1/q_y)/\alpha`
   as its loss.

The measure is unit except at the target (Q-Margin's :math:`q_y`), whose logit
may also be given apart (a margin): exactly the cases of the objectives.  The
registry (:mod:`spkver.losses.engines`) picks this engine, ``cpu``, for CPU
tensors with :math:`1 < \alpha \le 2` and no general ``log_q`` when it
compiled; the ``torch`` engine serves the rest (other :math:`\alpha`, a
general measure, no compiler) and is the oracle the tests hold this kernel
to.  The compiled library is cached under ``$SPKVER_CACHE_DIR`` (default
``~/.cache/spkver``), named by a hash of its source and flags.

>>> import torch
>>> from spkver.losses.engines.cpu_kernel import cpu_kernel_loss_rows
>>> cosine = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.25, 0.1]])
>>> loss, grad, p_y, support = cpu_kernel_loss_rows(cosine, torch.tensor([0, 1]), 1.5, scale=10.0)
>>> support.tolist(), round(float(p_y[0]), 3)
([1, 3], 1.0)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from spkver.losses.engines.base import Engine, LossCall, SparsityStatistics, reduce_loss

__all__ = ["CpuKernelEngine", "cpu_kernel_loss_rows", "CpuAlphaDivergenceLoss"]

_SOURCE = Path(__file__).with_name("cpu_kernel.c")
_FLAGS = ["-O3", "-fopenmp-simd", "-std=c99", "-D_GNU_SOURCE", "-shared", "-fPIC", "-pthread"]


def _cache_dir() -> Path:
    configured = os.environ.get("SPKVER_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spkver"


@functools.lru_cache(maxsize=None)
def _library(compiler: str, cache_dir: str) -> Optional[ctypes.CDLL]:
    """The compiled kernel, built once per source and flags; ``None`` (with one warning) if it cannot be."""
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join([compiler] + _FLAGS).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_kernel-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside its final name and renamed: ranks of a job building at once never load half a file.
            handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(handle)
            try:
                done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", partial, "-lm"],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{compiler} failed on {_SOURCE}:\n{done.stderr.strip()}")
                os.replace(partial, target)
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"spkver's CPU loss kernel is unavailable, the torch solver is used instead "
                      f"(slower at small s): {error}", RuntimeWarning, stacklevel=3)
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    library.spkver_alpha_loss_rows.argtypes = [pointer, size, size, size, pointer, pointer, pointer, real, real,
                                               pointer, pointer, pointer, pointer, pointer, pointer, ctypes.c_int]
    library.spkver_alpha_loss_gradient.argtypes = [pointer, size, size, size, pointer, pointer, pointer,
                                                   pointer, pointer, real, real, pointer, pointer, ctypes.c_int]
    library.spkver_alpha_loss_rows.restype = library.spkver_alpha_loss_gradient.restype = ctypes.c_int
    return library


def _loaded() -> Optional[ctypes.CDLL]:
    return _library(os.environ.get("CC", "cc"), str(_cache_dir()))


def _kernel_inputs(values: torch.Tensor, targets: torch.Tensor):
    values = values.detach()
    if values.dtype != torch.float32:
        values = values.float()
    if values.stride(1) != 1:
        values = values.contiguous()
    return values, targets.detach().to(torch.int64).contiguous()


def _solve(values, targets, alpha, scale, log_q_target, target_logits):
    """The forward kernel on prepared inputs: ``(loss, p_y, support, tau, total, row_max)``."""
    batch, classes = values.shape
    extras = [None if t is None else t.detach().float().contiguous() for t in (target_logits, log_q_target)]
    loss, p_y = torch.empty(batch, dtype=torch.float32), torch.empty(batch, dtype=torch.float32)
    support = torch.empty(batch, dtype=torch.int32)
    tau, total = torch.empty(batch, dtype=torch.float64), torch.empty(batch, dtype=torch.float64)
    row_max = torch.empty(batch, dtype=torch.float32)
    status = _loaded().spkver_alpha_loss_rows(
        values.data_ptr(), batch, classes, values.stride(0), targets.data_ptr(),
        *(None if t is None else t.data_ptr() for t in extras), float(alpha), float(scale),
        loss.data_ptr(), p_y.data_ptr(), support.data_ptr(), tau.data_ptr(), total.data_ptr(), row_max.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"spkver's CPU loss kernel could not allocate its work memory for {classes} classes")
    return loss, p_y, support, tau, total, row_max


def _gradient(values, targets, alpha, scale, target_slope, p_y, tau, total, upstream):
    """The backward kernel: ``upstream * scale * p`` off the target, ``upstream * target_slope * (p_y - 1)`` at it."""
    batch, classes = values.shape
    upstream = upstream.detach().float().contiguous()
    slope = target_slope.detach().float().contiguous()
    grad = torch.empty(batch, classes, dtype=torch.float32)
    _loaded().spkver_alpha_loss_gradient(
        values.data_ptr(), batch, classes, values.stride(0), targets.data_ptr(), slope.data_ptr(),
        p_y.data_ptr(), tau.data_ptr(), total.data_ptr(), float(alpha), float(scale), upstream.data_ptr(),
        grad.data_ptr(), torch.get_num_threads(),
    )
    return grad


def _target_slope(batch, scale, target_logits, target_logit_slope):
    """d(target logit)/d(target column): ``scale``; 0 when the target logit takes its own gradient; or given."""
    if target_logit_slope is not None:
        return target_logit_slope
    return torch.full((batch,), 0.0 if target_logits is not None else float(scale))


def cpu_kernel_loss_rows(values: torch.Tensor, targets: torch.Tensor, alpha: float, scale: float = 1.0,
                         log_q_target: Optional[torch.Tensor] = None,
                         target_logits: Optional[torch.Tensor] = None):
    r"""``(loss (B,), grad (B, C), p_y (B,), support (B,))`` of the logits ``scale * values``.

    ``grad`` is :math:`s(p - e_y)`, the gradient of the loss with respect to
    ``values`` (float32); with ``target_logits`` (B,) the target's logit is
    that tensor, its column of ``grad`` is 0 and its own gradient is
    :math:`p_y - 1`.  ``log_q_target`` (B,) is :math:`\log q_y` (unit measure
    elsewhere).  The inputs are assumed validated (finite where they must be,
    targets in range: :class:`CpuKernelEngine` checks them) and :math:`1 < \alpha \le 2`.
    """
    if _loaded() is None:
        raise RuntimeError("spkver's CPU loss kernel could not be built (see the warning above)")
    values, targets = _kernel_inputs(values, targets)
    loss, p_y, support, tau, total, _ = _solve(values, targets, alpha, scale, log_q_target, target_logits)
    slope = _target_slope(len(loss), scale, target_logits, None)
    grad = _gradient(values, targets, alpha, scale, slope, p_y, tau, total, torch.ones_like(loss))
    return loss, grad, p_y, support


class CpuAlphaDivergenceLoss(torch.autograd.Function):
    """The loss rows of ``logit_scale * logits`` through the kernel.

    ``apply(logits, targets, alpha, log_q_target, target_logits, logit_scale, target_logit_slope)``
    returns ``(loss, p_y, support, row_max)`` (``row_max`` of ``logits``, NaN
    where a row has one: the caller's input check).  Forward saves only per-row numbers (and
    the logits, by reference); backward writes :math:`g\\,s(p - e_y)` in one
    pass, and ``target_logits`` receives :math:`g(p_y - 1)`; with
    ``target_logit_slope`` (B,), :math:`\\partial\theta_y/\\partial x_y` of a margin,
    the target logit is a function of its column and :math:`g(p_y - 1)` times the
    slope goes to the column instead (no (B, C) gradient is made for the margin).
    """

    @staticmethod
    def forward(ctx, logits, targets, alpha, log_q_target, target_logits, logit_scale, target_logit_slope=None):
        values, safe_targets = _kernel_inputs(logits, targets)
        loss, p_y, support, tau, total, row_max = _solve(values, safe_targets, alpha, logit_scale, log_q_target,
                                                         target_logits)
        slope = _target_slope(len(loss), logit_scale, target_logits, target_logit_slope)
        ctx.save_for_backward(values, safe_targets, p_y, tau, total, slope)
        ctx.alpha, ctx.logit_scale = alpha, logit_scale
        ctx.input_dtype = logits.dtype
        ctx.target_dtype = None if target_logits is None or target_logit_slope is not None else target_logits.dtype
        ctx.mark_non_differentiable(p_y, support, row_max)
        ctx.set_materialize_grads(False)
        return loss, p_y, support, row_max

    @staticmethod
    def backward(ctx, grad_loss, _grad_p_y, _grad_support, _grad_row_max):
        if grad_loss is None:
            return (None,) * 7
        values, targets, p_y, tau, total, slope = ctx.saved_tensors
        grad = _gradient(values, targets, ctx.alpha, ctx.logit_scale, slope, p_y, tau, total, grad_loss)
        separate = ctx.target_dtype is not None
        grad_target = ((p_y - 1.0) * grad_loss.float()).to(ctx.target_dtype) if separate else None
        return grad.to(ctx.input_dtype), None, None, None, grad_target, None, None


class CpuKernelEngine(Engine):
    name = "cpu"
    summary = "the compiled CPU kernel (one selection pass per row): CPU tensors, 1 < alpha <= 2, Q-Margin's measure"

    def unsupported(self, call: LossCall, automatic: bool):
        if call.logits.device.type != "cpu":
            return f"it runs on CPU tensors (these are on {call.logits.device})"
        if not 1.0 < call.alpha <= 2.0:
            return f"it serves 1 < alpha <= 2 (alpha = {call.alpha:g})"
        if call.log_q is not None:
            return "it serves the unit measure with the target's own q_y, not a general log_q"
        if _loaded() is None:
            return "it could not be compiled (see the warning above)"
        return None

    def run(self, call: LossCall, reduction: str):
        call = call.with_target_logits()  # the kernel sends the margin's slope to the target's column itself
        # The kernel reads every row once and returns its maximum: the input is checked on that, after it.
        loss, p_y, support, maxima = CpuAlphaDivergenceLoss.apply(
            call.logits, call.safe_targets, call.alpha, call.log_q_target_rows, call.target_logits, call.logit_scale,
            call.target_logit_slope)
        call.input_check(maxima).raise_if_failed()
        return reduce_loss(loss, reduction), SparsityStatistics.of_rows(support, p_y, int(support.max()) + 1)
