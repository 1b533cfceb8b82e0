r"""A fused Triton kernel for the dense alpha-divergence loss: one launch per batch, one program per row.

Each program finds the row maximum over the non-target classes, starts Newton
at the lower bound :math:`\tau_{lo} = \max(b_y, \max_{j \ne y}\theta_j)` and
iterates a fixed number of times on
:math:`\varphi(\tau) = (\sum_j z_j^k)^{1/k} - 1` (monotone for
:math:`1 < \alpha \le 2`, see :mod:`spkver.losses.operator`), then writes
:math:`p - e_y` and the loss.  The row is streamed in tiles of 2,048 classes;
the first pass records each tile's maximum, and since :math:`\tau` only rises,
a tile whose maximum is out of reach (:math:`\le \tau - 1/(\alpha-1)`) is
skipped by the Newton passes and written as zeros without being read: on
sparse rows the kernel reads the logits about once.  The target may
carry its own logit (a margin) and its own :math:`\log q_y` (Q-Margin).

Used automatically by :func:`~spkver.losses.operator.loss_rows_and_statistics`
for CUDA tensors with :math:`1 < \alpha \le 2` and no general ``log_q``; the
pure-torch solver stays the fallback and the oracle.  The kernel also runs
under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU, which is how
the tests check it without a GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["fused_available", "fused_loss_rows"]

_NEWTON_ITERATIONS = 12
#: Classes per tile: the granularity at which rows are streamed and out-of-reach parts skipped.
_TILE = 2048

try:  # Triton is optional: CPU-only installations do without the kernel.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


def fused_available(logits: torch.Tensor, alpha: float, log_q) -> bool:
    """Whether the fused kernel applies to this call."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and (logits.is_cuda or interpreted) and 1.0 < alpha <= 2.0 and log_q is None
            and logits.dim() == 2 and logits.shape[0] > 0)


if triton is not None:

    @triton.jit
    def _tile_mass(row_logits, start, classes, target, tau, alpha, k, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
        """Sum of z^k and of z^(k-1) over one tile (target excluded), and its logits and z^k."""
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(row_logits + offsets, mask=offsets < classes, other=-float("inf")).to(tl.float32)
        x = tl.where(offsets == target, -float("inf"), x)
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
    def _alpha_loss_kernel(logits_ptr, grad_ptr, loss_ptr, p_y_ptr, support_ptr, targets_ptr, target_logit_ptr,
                           log_q_y_ptr, tile_max_ptr, classes, stride, tiles, alpha,
                           HAS_TARGET_LOGIT: tl.constexpr, HAS_LOG_Q: tl.constexpr, SQUARE: tl.constexpr,
                           ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        row_logits = logits_ptr + row * stride
        row_grad = grad_ptr + row * stride
        row_tiles = tile_max_ptr + row * tiles
        target = tl.load(targets_ptr + row)
        k = 1.0 / (alpha - 1.0)
        reach = k
        # Pass 1: each tile's maximum over the non-target classes (kept to skip tiles later).
        other_max = -float("inf")
        for start in range(0, classes, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = tl.load(row_logits + offsets, mask=offsets < classes, other=-float("inf")).to(tl.float32)
            x = tl.where(offsets == target, -float("inf"), x)
            tile_max = tl.max(x, axis=0)
            tl.store(row_tiles + start // BLOCK, tile_max)
            other_max = tl.maximum(other_max, tile_max)
        if HAS_TARGET_LOGIT:
            theta_y = tl.load(target_logit_ptr + row).to(tl.float32)
        else:
            theta_y = tl.load(row_logits + target).to(tl.float32)
        log_q_y = 0.0
        if HAS_LOG_Q:
            log_q_y = tl.load(log_q_y_ptr + row).to(tl.float32)
        steepness_y = tl.exp((alpha - 1.0) * log_q_y)
        log_alpha_inverse_q = (tl.exp((1.0 - alpha) * log_q_y) - 1.0) * k
        bound_y = theta_y - log_alpha_inverse_q
        tau = tl.maximum(other_max, bound_y)
        # Newton from the lower bound: the iterates rise monotonically to the root, so a tile
        # whose maximum is out of reach of tau (p = 0 on all of it) stays out: skip it.
        for _ in tl.static_range(ITERATIONS):
            mass = 0.0
            slope = 0.0
            for start in range(0, classes, BLOCK):
                if tl.load(row_tiles + start // BLOCK) > tau - reach:
                    tile_mass, tile_slope, x, w = _tile_mass(row_logits, start, classes, target, tau, alpha, k,
                                                             SQUARE, BLOCK)
                    mass += tile_mass
                    slope += tile_slope
            z_y = tl.maximum(1.0 + (alpha - 1.0) * steepness_y * (bound_y - tau), 0.0)
            log_z_y = tl.log(tl.where(z_y > 0, z_y, 1.0))
            mass += tl.where(z_y > 0, tl.exp(k * log_z_y), 0.0)
            slope += steepness_y * tl.where(z_y > 0, tl.exp((k - 1.0) * log_z_y), 0.0)
            safe_mass = tl.maximum(mass, 1e-30)
            step = safe_mass * (1.0 - tl.exp(-(alpha - 1.0) * tl.log(safe_mass))) / ((alpha - 1.0) * slope)
            tau = tl.where(slope > 0, tau + step, tau)
        # The mass at the final tau, then the pass that writes p - e_y (zeros without reading).
        mass = 0.0
        for start in range(0, classes, BLOCK):
            if tl.load(row_tiles + start // BLOCK) > tau - reach:
                tile_mass, tile_slope, x, w = _tile_mass(row_logits, start, classes, target, tau, alpha, k,
                                                         SQUARE, BLOCK)
                mass += tile_mass
        z_y = tl.maximum(1.0 + (alpha - 1.0) * steepness_y * (bound_y - tau), 0.0)
        w_y = tl.where(z_y > 0, tl.exp(k * tl.log(tl.where(z_y > 0, z_y, 1.0))), 0.0)
        mass += w_y
        inner = 0.0
        support = 0
        for start in range(0, classes, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            valid = offsets < classes
            if tl.load(row_tiles + start // BLOCK) > tau - reach:
                tile_mass, tile_slope, x, w = _tile_mass(row_logits, start, classes, target, tau, alpha, k,
                                                         SQUARE, BLOCK)
                p = w / mass
                inner += tl.sum(tl.where(p > 0, p * (x - tau), 0.0), axis=0)
                support += tl.sum((p > 0).to(tl.int32), axis=0)
                tl.store(row_grad + offsets, p.to(row_grad.dtype.element_ty), mask=valid)
            else:
                tl.store(row_grad + offsets, tl.zeros([BLOCK], dtype=row_grad.dtype.element_ty), mask=valid)
        p_y = w_y / mass
        inner += p_y * (theta_y - tau)
        support += (p_y > 0).to(tl.int32)
        if not HAS_TARGET_LOGIT:
            tl.store(row_grad + target, (p_y - 1.0).to(row_grad.dtype.element_ty))
        loss = (alpha - 1.0) / alpha * inner - (theta_y - tau) + log_alpha_inverse_q / alpha
        tl.store(loss_ptr + row, tl.maximum(loss, 0.0))
        tl.store(p_y_ptr + row, p_y)
        tl.store(support_ptr + row, support)


def fused_loss_rows(logits: torch.Tensor, targets: torch.Tensor, alpha: float,
                    log_q_target: Optional[torch.Tensor] = None, target_logits: Optional[torch.Tensor] = None):
    """``(loss (B,), grad (B, C), p_y (B,), support (B,))`` from one kernel launch.

    ``grad`` is :math:`p - e_y` in the dtype of ``logits``; with ``target_logits``
    its target column is 0 and the target's gradient is ``p_y - 1``.
    Inputs are assumed validated (see :func:`~spkver.losses.operator.loss_rows_and_statistics`).
    """
    logits = logits.contiguous()
    batch, classes = logits.shape
    grad = torch.empty_like(logits)
    loss = torch.empty(batch, dtype=torch.float32, device=logits.device)
    p_y = torch.empty(batch, dtype=torch.float32, device=logits.device)
    support = torch.empty(batch, dtype=torch.int32, device=logits.device)
    dummy = loss  # an unused pointer argument must still be a tensor
    if target_logits is not None:
        target_logits = target_logits.detach().float().contiguous()
    block = min(triton.next_power_of_2(classes), _TILE)
    tiles = triton.cdiv(classes, block)
    tile_max = torch.empty(batch, tiles, dtype=torch.float32, device=logits.device)
    _alpha_loss_kernel[(batch,)](
        logits, grad, loss, p_y, support, targets.contiguous(),
        dummy if target_logits is None else target_logits,
        dummy if log_q_target is None else log_q_target.float().contiguous(),
        tile_max, classes, logits.stride(0), tiles, float(alpha),
        HAS_TARGET_LOGIT=target_logits is not None, HAS_LOG_Q=log_q_target is not None,
        SQUARE=math.isclose(alpha, 1.5), ITERATIONS=_NEWTON_ITERATIONS, BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return loss, grad, p_y, support
