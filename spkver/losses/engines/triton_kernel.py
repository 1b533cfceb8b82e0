r"""A fused Triton kernel for the dense alpha-divergence loss: one launch per batch, one program per row.

Each program finds the row maximum over the non-target classes, starts Newton
at the lower bound :math:`\tau_{lo} = \max(b_y, \max_{j \ne y}\theta_j)` and
iterates a fixed number of times on
:math:`\varphi(\tau) = (\sum_j z_j^k)^{1/k} - 1` (monotone for
:math:`1 < \alpha \le 2`, see :mod:`spkver.losses.softargmax`), then writes
:math:`p - e_y` and the loss.  The row is streamed in tiles of 2,048 classes;
the first pass records each tile's maximum, and since :math:`\tau` only rises,
a tile whose maximum is out of reach (:math:`\le \tau - 1/(\alpha-1)`) is
skipped by the Newton passes and written as zeros without being read: on
sparse rows the kernel reads the logits about once.  The target may
carry its own logit (a margin) and its own :math:`\log q_y` (Q-Margin).  At
:math:`\alpha = 1` the same program computes the softmax cross-entropy of
:math:`\theta + \log q` instead (three passes: maximum, normaliser, write),
so the baselines share the launch-saving below.

On a GPU a loss call of a few milliseconds' worth of arithmetic is bound by
its kernel launches, so the kernel also does what would otherwise be some
forty small launches around it: it forms the logits :math:`s\cos` and the
target's margin (:class:`FusedCosineObjective`), checks the inputs (NaN,
+inf, all ``-inf`` rows, targets out of range) and sums the batch statistics
into four numbers that the caller reads back once (a bad row's loss is NaN).

The registry (:mod:`spkver.losses.engines`) picks this engine, ``triton``, for
CUDA tensors with :math:`1 \le \alpha \le 2` and no general ``log_q``: the
loss functions and the objectives whose margin the kernel knows; the ``torch``
engine stays the oracle.  The kernel also runs under Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors when asked for by name
(``engine="triton"``), which is how the tests check it without a GPU.

Nothing is read back from the device: the statistics and the input checks
stay in the kernel's ``totals`` until someone reads them
(:class:`~spkver.losses.engines.base.SparsityStatistics`), so a step that uses
this engine has no host sync and no graph break.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch

from spkver.losses.checks import InputCheck
from spkver.losses.engines.base import Engine, LossCall, SparsityStatistics, reduce_loss

__all__ = ["TritonEngine", "fused_loss_rows", "fused_loss_and_totals", "FusedAlphaDivergenceLoss",
           "FusedCosineObjective", "MARGIN_NONE", "MARGIN_COSINE", "MARGIN_ANGULAR", "TOTALS_SIZE"]

_NEWTON_ITERATIONS = 12
#: Classes per tile: the granularity at which rows are streamed and out-of-reach parts skipped.
_TILE = 2048

try:  # Triton is optional: CPU-only installations do without the kernel.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


MARGIN_NONE, MARGIN_COSINE, MARGIN_ANGULAR = 0, 1, 2

if triton is not None:

    @triton.jit
    def _target_logit(cos_y, scale, margin, cos_m, sin_m, threshold, MARGIN: tl.constexpr):
        r"""The target's logit :math:`s\psi(\cos_y)` and its derivative :math:`s\psi'(\cos_y)`.

        The same function, clamps included, as
        :func:`~spkver.losses.objectives.additive_angular_cosine` under autograd.
        """
        if MARGIN == 1:  # CosFace: psi(c) = c - m
            theta_y = scale * (cos_y - margin)
            slope = scale + 0.0 * cos_y
        elif MARGIN == 2:  # ArcFace: psi(c) = cos(phi + m), or c - m sin m past pi
            c = tl.minimum(tl.maximum(cos_y, -1.0), 1.0)
            inside = ((cos_y >= -1.0) & (cos_y <= 1.0)).to(tl.float32)
            one_minus_square = 1.0 - c * c
            sine = tl.sqrt(tl.maximum(one_minus_square, 1e-12))
            d_sine = tl.where(one_minus_square >= 1e-12, -c / sine, 0.0)
            use_angle = c > threshold
            theta_y = scale * tl.where(use_angle, c * cos_m - sine * sin_m, c - margin * sin_m)
            slope = scale * inside * tl.where(use_angle, cos_m - sin_m * d_sine, 1.0)
        else:
            theta_y = scale * cos_y
            slope = scale + 0.0 * cos_y
        return theta_y, slope

    @triton.jit
    def _tile_logits(row_logits, start, classes, target, scale, BLOCK: tl.constexpr):
        """One tile's column offsets and logits ``scale * x`` in float32, the target and padding at ``-inf``."""
        offsets = start + tl.arange(0, BLOCK)
        x = scale * tl.load(row_logits + offsets, mask=offsets < classes, other=-float("inf")).to(tl.float32)
        return offsets, tl.where(offsets == target, -float("inf"), x)

    @triton.jit
    def _tile_mass(row_logits, start, classes, target, tau, alpha, k, scale,
                   SQUARE: tl.constexpr, BLOCK: tl.constexpr):
        """Sum of z^k and of z^(k-1) over one tile (target excluded), and its logits and z^k."""
        offsets, x = _tile_logits(row_logits, start, classes, target, scale, BLOCK)
        z = tl.maximum(1.0 + (alpha - 1.0) * (x - tau), 0.0)
        if SQUARE:
            w = z * z
            w_prime = z
        else:
            log_z = tl.log(tl.where(z > 0, z, 1.0))
            w = tl.where(z > 0, tl.exp(k * log_z), 0.0)
            w_prime = tl.where(z > 0, tl.exp((k - 1.0) * log_z), 0.0)
        return tl.sum(w, axis=0), tl.sum(w_prime, axis=0), x, w

    @triton.jit
    def _row_mass(row_logits, row_tiles, classes, target, tau, reach, alpha, k, scale, steepness_y, bound_y,
                  SQUARE: tl.constexpr, BLOCK: tl.constexpr):
        r""":math:`\sum_j z_j^k` and :math:`\sum_j a_j z_j^{k-1}` at ``tau`` (out-of-reach tiles skipped).

        Also returns the target's own :math:`z_y^k`.
        """
        mass = 0.0
        slope = 0.0
        for start in range(0, classes, BLOCK):
            if tl.load(row_tiles + start // BLOCK) > tau - reach:
                tile_mass, tile_slope, x, w = _tile_mass(row_logits, start, classes, target, tau, alpha, k, scale,
                                                         SQUARE, BLOCK)
                mass += tile_mass
                slope += tile_slope
        z_y = tl.maximum(1.0 + (alpha - 1.0) * steepness_y * (bound_y - tau), 0.0)
        log_z_y = tl.log(tl.where(z_y > 0, z_y, 1.0))
        w_y = tl.where(z_y > 0, tl.exp(k * log_z_y), 0.0)
        slope += steepness_y * tl.where(z_y > 0, tl.exp((k - 1.0) * log_z_y), 0.0)
        return mass + w_y, slope, w_y

    @triton.jit
    def _sparse_row(row_logits, row_grad, row_tiles, classes, target, scale, grad_scale, alpha, theta_y, log_q_y,
                    other_max, SQUARE: tl.constexpr, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
        """alpha > 1: tau by Newton, then p (times ``grad_scale``) into ``row_grad``; returns (loss, p_y, support)."""
        k = 1.0 / (alpha - 1.0)
        reach = k
        steepness_y = tl.exp((alpha - 1.0) * log_q_y)
        log_alpha_inverse_q = (tl.exp((1.0 - alpha) * log_q_y) - 1.0) * k
        bound_y = theta_y - log_alpha_inverse_q
        tau = tl.maximum(other_max, bound_y)
        # Newton from the lower bound: the iterates rise monotonically to the root, so a tile
        # whose maximum is out of reach of tau (p = 0 on all of it) stays out: skip it.
        for _ in tl.static_range(ITERATIONS):
            mass, slope, w_y = _row_mass(row_logits, row_tiles, classes, target, tau, reach, alpha, k, scale,
                                         steepness_y, bound_y, SQUARE, BLOCK)
            safe_mass = tl.maximum(mass, 1e-30)
            step = safe_mass * (1.0 - tl.exp(-(alpha - 1.0) * tl.log(safe_mass))) / ((alpha - 1.0) * slope)
            tau = tl.where(slope > 0, tau + step, tau)
        # The mass at the final tau, then the pass that writes the gradient (zeros without reading).
        mass, slope, w_y = _row_mass(row_logits, row_tiles, classes, target, tau, reach, alpha, k, scale,
                                     steepness_y, bound_y, SQUARE, BLOCK)
        inner = 0.0
        support = 0
        for start in range(0, classes, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            valid = offsets < classes
            if tl.load(row_tiles + start // BLOCK) > tau - reach:
                tile_mass, tile_slope, x, w = _tile_mass(row_logits, start, classes, target, tau, alpha, k, scale,
                                                         SQUARE, BLOCK)
                p = w / mass
                inner += tl.sum(tl.where(p > 0, p * (x - tau), 0.0), axis=0)
                support += tl.sum((p > 0).to(tl.int32), axis=0)
                tl.store(row_grad + offsets, (grad_scale * p).to(row_grad.dtype.element_ty), mask=valid)
            else:
                tl.store(row_grad + offsets, tl.zeros([BLOCK], dtype=row_grad.dtype.element_ty), mask=valid)
        p_y = w_y / mass
        inner += p_y * (theta_y - tau)
        support += (p_y > 0).to(tl.int32)
        loss = (alpha - 1.0) / alpha * inner - (theta_y - tau) + log_alpha_inverse_q / alpha
        return loss, p_y, support

    @triton.jit
    def _softmax_row(row_logits, row_grad, classes, target, scale, grad_scale, target_logit, other_max,
                     BLOCK: tl.constexpr):
        """alpha = 1: cross-entropy; softmax (times ``grad_scale``) into ``row_grad``; returns (loss, p_y, C)."""
        top = tl.maximum(other_max, target_logit)
        total = tl.exp(target_logit - top)
        for start in range(0, classes, BLOCK):
            offsets, x = _tile_logits(row_logits, start, classes, target, scale, BLOCK)
            total += tl.sum(tl.exp(x - top), axis=0)
        for start in range(0, classes, BLOCK):
            offsets, x = _tile_logits(row_logits, start, classes, target, scale, BLOCK)
            tl.store(row_grad + offsets, (grad_scale * tl.exp(x - top) / total).to(row_grad.dtype.element_ty),
                     mask=offsets < classes)
        p_y = tl.exp(target_logit - top) / total
        return tl.log(total) + top - target_logit, p_y, (classes + 0 * target).to(tl.int32)

    @triton.jit
    def _alpha_loss_kernel(logits_ptr, grad_ptr, loss_ptr, p_y_ptr, support_ptr, targets_ptr, target_logit_ptr,
                           log_q_y_ptr, tile_max_ptr, totals_ptr, classes, stride, tiles, alpha, scale, log_q_y_value,
                           margin, cos_m, sin_m, threshold, row_weight,
                           HAS_TARGET_LOGIT: tl.constexpr, HAS_LOG_Q: tl.constexpr, MARGIN: tl.constexpr,
                           TOTALS: tl.constexpr, REDUCE: tl.constexpr, SOFTMAX: tl.constexpr, SQUARE: tl.constexpr,
                           ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for 10 GB logits
        row_logits = logits_ptr + row * stride
        row_grad = grad_ptr + row * stride
        row_tiles = tile_max_ptr + row * tiles
        target = tl.load(targets_ptr + row)
        bad_target = (target < 0) | (target >= classes)
        target = tl.minimum(tl.maximum(target, 0), classes - 1)  # never index out of range; flagged below
        # Pass 1: each tile's maximum over the non-target classes (kept to skip tiles later);
        # NaN, +inf and all -inf rows are counted for the caller's checks.
        other_max = -float("inf")
        row_max = -float("inf")
        bad_values = 0
        for start in range(0, classes, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = scale * tl.load(row_logits + offsets, mask=offsets < classes, other=-float("inf")).to(tl.float32)
            bad_values += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
            row_max = tl.maximum(row_max, tl.max(x, axis=0))
            x = tl.where(offsets == target, -float("inf"), x)
            tile_max = tl.max(x, axis=0)
            tl.store(row_tiles + start // BLOCK, tile_max)
            other_max = tl.maximum(other_max, tile_max)
        if HAS_TARGET_LOGIT:
            theta_y = tl.load(target_logit_ptr + row).to(tl.float32)
            d_theta_y = 1.0
        else:
            cos_y = tl.load(row_logits + target).to(tl.float32)
            theta_y, d_theta_y = _target_logit(cos_y, scale, margin, cos_m, sin_m, threshold, MARGIN)
        if HAS_LOG_Q:
            log_q_y = tl.load(log_q_y_ptr + row).to(tl.float32)
        else:
            log_q_y = log_q_y_value
        # The gradient is written already weighted by the reduction (1/B for a mean).
        if SOFTMAX:
            loss, p_y, support = _softmax_row(row_logits, row_grad, classes, target, scale, scale * row_weight,
                                              theta_y + log_q_y, other_max, BLOCK)
        else:
            loss, p_y, support = _sparse_row(row_logits, row_grad, row_tiles, classes, target, scale,
                                             scale * row_weight, alpha, theta_y, log_q_y, other_max, SQUARE,
                                             ITERATIONS, BLOCK)
        if not HAS_TARGET_LOGIT:
            tl.store(row_grad + target, (row_weight * d_theta_y * (p_y - 1.0)).to(row_grad.dtype.element_ty))
        loss = tl.maximum(loss, 0.0)
        if TOTALS:  # the input checks: a bad row's loss is NaN, never a plausible number
            problems = bad_target.to(tl.int32) + bad_values + (row_max == -float("inf")).to(tl.int32) \
                + ((theta_y != theta_y) | (tl.abs(theta_y) == float("inf"))).to(tl.int32) \
                + ((log_q_y != log_q_y) | (tl.abs(log_q_y) == float("inf"))).to(tl.int32)
            loss = tl.where(problems > 0, float("nan"), loss)
        if not REDUCE:
            tl.store(loss_ptr + row, loss)
        if TOTALS:  # the reduced loss, the statistics' sums and the problems, in one small buffer
            if REDUCE:
                tl.atomic_add(totals_ptr + 0, row_weight * loss, sem="relaxed")
            tl.atomic_add(totals_ptr + 1, support.to(tl.float32), sem="relaxed")
            tl.atomic_add(totals_ptr + 2, (p_y == 0).to(tl.float32), sem="relaxed")
            tl.atomic_add(totals_ptr + 3, p_y, sem="relaxed")
            tl.atomic_add(totals_ptr + 4, problems.to(tl.float32), sem="relaxed")
        else:
            tl.store(support_ptr + row, support)
        if HAS_TARGET_LOGIT or not TOTALS:  # a separate target logit needs p_y for its gradient
            tl.store(p_y_ptr + row, p_y)


#: Entries of the kernel's ``totals`` buffer: the reduced loss, then the sums of the support sizes,
#: of [p_y = 0] and of p_y, and the number of input problems.
TOTALS_SIZE = 5


def _launch(values, targets, alpha, *, scale=1.0, log_q_target=None, log_q_y=0.0, target_logits=None,
            margin_kind=MARGIN_NONE, margin=0.0, totals=False, reduction="none"):
    """Run the kernel on ``values`` (B, C), logits ``scale * values``.

    Returns ``(loss, grad, p_y, support, totals)``: ``loss`` is (B,) or, when
    reduced, a 0-d view of the totals buffer; ``p_y`` and ``support`` are
    per-row tensors without ``totals`` and ``None`` with them (``p_y`` is kept
    with ``target_logits``, whose gradient needs it); ``totals`` is the
    buffer's four statistics entries (or ``None``).
    """
    values, targets = values.contiguous(), targets.contiguous()
    batch, classes = values.shape
    device = values.device
    reduce = reduction != "none"
    grad = torch.empty_like(values)
    buffer = torch.zeros(TOTALS_SIZE, dtype=torch.float32, device=device) if totals else None
    rows = None if reduce else torch.empty(batch, dtype=torch.float32, device=device)
    p_y = torch.empty(batch, dtype=torch.float32, device=device) if not totals or target_logits is not None \
        else None
    support = None if totals else torch.empty(batch, dtype=torch.int32, device=device)
    block = min(1 << (classes - 1).bit_length(), _TILE)  # a power of two, host arithmetic only
    tiles = -(-classes // block)
    tile_max = torch.empty(batch, tiles, dtype=torch.float32, device=device)
    unused = tile_max  # an unused pointer argument must still be a tensor
    # Triton launches on the current device: make it the tensors' one (e.g. cuda:1 without set_device).
    on_other_device = values.is_cuda and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if on_other_device else contextlib.nullcontext():
        _alpha_loss_kernel[(batch,)](
            values, grad, unused if rows is None else rows, unused if p_y is None else p_y,
            unused if support is None else support, targets,
            unused if target_logits is None else target_logits.detach().float().contiguous(),
            unused if log_q_target is None else log_q_target.float().contiguous(),
            tile_max, unused if buffer is None else buffer, classes, values.stride(0), tiles, float(alpha),
            float(scale), float(log_q_y), float(margin), math.cos(margin), math.sin(margin),
            math.cos(math.pi - margin), 1.0 / batch if reduction == "mean" else 1.0,
            HAS_TARGET_LOGIT=target_logits is not None, HAS_LOG_Q=log_q_target is not None, MARGIN=margin_kind,
            TOTALS=bool(totals), REDUCE=reduce, SOFTMAX=alpha == 1.0, SQUARE=math.isclose(alpha, 1.5),
            ITERATIONS=_NEWTON_ITERATIONS, BLOCK=block, num_warps=4,  # tiles are at most 2,048 wide
        )
    loss = buffer[0] if reduce else rows
    return loss, grad, p_y, support, None if buffer is None else buffer[1:]


def fused_loss_rows(logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                    log_q_target: Optional[torch.Tensor] = None, target_logits: Optional[torch.Tensor] = None):
    """``(loss (B,), grad (B, C), p_y (B,), support (B,))`` from one kernel launch.

    ``grad`` is :math:`p - e_y` in the dtype of ``logits``; with ``target_logits``
    its target column is 0 and the target's gradient is ``p_y - 1``.  The
    inputs are assumed validated (:func:`fused_loss_and_totals` checks them).
    """
    loss, grad, p_y, support, _ = _launch(logits, targets, alpha, log_q_target=log_q_target,
                                          target_logits=target_logits)
    return loss, grad, p_y, support


def fused_loss_and_totals(values: torch.Tensor, targets: torch.Tensor, alpha: float, reduction: str = "none",
                          **options):
    r"""``(loss, grad, p_y, totals)`` from one kernel launch, for unvalidated inputs.

    ``values`` (B, C) are cosines (with ``scale``, ``margin_kind``, ``margin``
    and ``log_q_y`` as in :class:`FusedCosineObjective`) or logits (with
    ``log_q_target`` and ``target_logits`` as in :func:`fused_loss_rows`).
    ``loss`` is (B,), or the 0-d mean or sum for ``reduction``; ``grad`` is the
    gradient of ``loss`` (times the reduction's weight) for a unit upstream
    gradient; ``p_y`` (B,) is returned with ``target_logits`` (``None``
    otherwise); ``totals`` (4,) float32 holds the batch sums of the support
    size, of :math:`[p_y = 0]` and of :math:`p_y`, and the number of input
    problems (NaN/+inf values, all ``-inf`` rows, targets out of range, a
    non-finite target logit or :math:`\log q_y`).  Read ``totals`` back (one
    sync) and do not use the loss when the last entry is non-zero.  Sums are
    accumulated with atomics: the reduced loss and the statistics may differ
    in their last bits from run to run; the gradient is deterministic.
    """
    loss, grad, p_y, _, totals = _launch(values, targets, alpha, totals=True, reduction=reduction, **options)
    return loss, grad, p_y, totals


class FusedAlphaDivergenceLoss(torch.autograd.Function):
    """The loss rows of logits (B, C) and the ``totals`` of :func:`fused_loss_and_totals`, in one launch.

    ``apply(logits, targets, alpha, log_q_target, target_logits)``: the engine's
    path for logits (a margin the kernel does not know comes as ``target_logits``).
    Backward scales the saved :math:`p - e_y` (and gives ``target_logits``
    the gradient :math:`p_y - 1`).
    """

    @staticmethod
    def forward(ctx, logits, targets, alpha, log_q_target, target_logits):
        loss, grad, p_y, totals = fused_loss_and_totals(logits.detach(), targets, alpha, log_q_target=log_q_target,
                                                        target_logits=target_logits)
        ctx.save_for_backward(grad, p_y)
        ctx.separate_target = target_logits is not None
        ctx.target_dtype = None if target_logits is None else target_logits.dtype
        ctx.mark_non_differentiable(totals)
        ctx.set_materialize_grads(False)
        return loss, totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        grad, p_y = ctx.saved_tensors
        grad_logits = grad * grad_loss[:, None].to(grad.dtype)
        grad_target = ((p_y - 1.0) * grad_loss).to(ctx.target_dtype) if ctx.separate_target else None
        return grad_logits, None, None, None, grad_target


class FusedCosineObjective(torch.autograd.Function):
    r"""A whole margin objective in one launch: the loss of :math:`s\cos` with a target margin.

    ``apply(cosine, targets, alpha, scale, margin_kind, margin, log_q_y, reduction)``
    returns the loss (reduced as ``reduction`` says) and the ``totals`` of
    :func:`fused_loss_and_totals` (read them; a non-zero last entry means bad
    input).  The logits :math:`s\cos`, the target's :math:`s\psi(\cos_y)`
    (``margin_kind``: :data:`MARGIN_NONE`, :data:`MARGIN_COSINE`
    :math:`\cos_y - m` or :data:`MARGIN_ANGULAR` :math:`\cos(\phi_y + m)`), the
    reduction and the gradient with respect to the cosines are all formed
    inside the kernel: a forward and backward call costs three launches
    (zeroing the totals, the kernel, the backward product) and one read-back,
    where the same objective in torch operations takes some forty.
    """

    @staticmethod
    def forward(ctx, cosine, targets, alpha, scale, margin_kind, margin, log_q_y, reduction):
        loss, grad, _, totals = fused_loss_and_totals(cosine.detach(), targets, alpha, reduction, scale=scale,
                                                      log_q_y=log_q_y, margin_kind=margin_kind, margin=margin)
        ctx.save_for_backward(grad)
        ctx.reduced = reduction != "none"
        ctx.mark_non_differentiable(totals)
        ctx.set_materialize_grads(False)
        return loss, totals

    @staticmethod
    def backward(ctx, grad_loss, _grad_totals):
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 8
        # A 0-d upstream gradient keeps grad's dtype; a (B, 1) one must be cast to it.
        upstream = grad_loss if ctx.reduced else grad_loss[:, None].to(grad.dtype)
        return (grad * upstream,) + (None,) * 7


class TritonEngine(Engine):
    name = "triton"
    summary = "the fused Triton kernel (one launch, no host sync): CUDA, 1 <= alpha <= 2, Q-Margin's measure"

    def unsupported(self, call: LossCall, automatic: bool):
        if triton is None:
            return "Triton is not installed"
        if not call.logits.is_cuda:
            if automatic:
                return f"auto uses it on CUDA tensors only (these are on {call.logits.device})"
            if os.environ.get("TRITON_INTERPRET") != "1":
                return (f"it runs on CUDA tensors (these are on {call.logits.device}; on the CPU only under "
                        "Triton's interpreter, TRITON_INTERPRET=1)")
        if not 1.0 <= call.alpha <= 2.0:
            return f"it serves 1 <= alpha <= 2 (alpha = {call.alpha:g})"
        if call.log_q is not None:
            return "it serves the unit measure with the target's own q_y, not a general log_q"
        return None

    def run(self, call: LossCall, reduction: str):
        margin = call.margin
        if margin is not None and margin.kernel_code is not None and call.target_logits is None:
            # The whole objective in one launch: logits, margin, reduction and gradient in the kernel.
            kind = margin.kernel_code if margin.value else MARGIN_NONE
            loss, totals = FusedCosineObjective.apply(call.logits, call.targets, call.alpha, call.logit_scale, kind,
                                                      margin.value, call.log_q_y or 0.0, reduction)
        else:
            call = call.with_slope_in_graph()
            loss, totals = FusedAlphaDivergenceLoss.apply(call.scaled_logits(), call.targets, call.alpha,
                                                          call.log_q_target_rows, call.target_logits)
            loss = reduce_loss(loss, reduction)
        # The kernel counted the bad inputs in totals[3]; the precise error is worked out only if it did.
        check = InputCheck(totals[3], lambda: call.with_target_logits().input_check().explain())
        return loss, SparsityStatistics.on_device(totals[:3], call.batch, call.classes, check)
