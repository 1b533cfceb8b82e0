r"""The ``torch`` engine: the pure-torch solver of :mod:`spkver.losses.softargmax`, for any :math:`\alpha > 1`.

It serves every call with :math:`\alpha > 1`: a general reference measure
``log_q``, any :math:`\alpha` (also above 2, where the kernels' Newton is not
monotone), any device.  It solves on the certified top candidates of each
row (one ``topk``), so it reads the device to size them: the kernels are
faster where they apply, and are tested against this engine.
"""
from __future__ import annotations

import torch

from spkver.losses.checks import row_max
from spkver.losses.engines.base import Engine, LossCall, SparsityStatistics, reduce_loss
from spkver.losses.softargmax import log_alpha_of_inverse, solve_alpha_softargmax

__all__ = ["TorchSolverEngine"]


class _AlphaDivergenceLoss(torch.autograd.Function):
    """Per-row Fenchel--Young loss; backward is a scaling of the saved :math:`p - e_y`.

    With ``target_logits`` the target's logit is that tensor, not the column
    of ``logits``: the gradient :math:`p_y - 1` goes to it, and zero to the column.
    """

    @staticmethod
    def forward(ctx, logits, targets, alpha, log_q, log_q_target, row_max, candidates_hint, target_logits,
                logit_scale):
        detached_target = None if target_logits is None else target_logits.detach().float()
        rows = solve_alpha_softargmax(
            logits, alpha, log_q=log_q, targets=targets, log_q_target=log_q_target, row_max=row_max,
            candidates_hint=candidates_hint, target_logits=detached_target, logit_scale=logit_scale,
        )
        if log_q_target is not None:
            log_q_y = log_q_target
        elif log_q is not None:
            log_q_y = log_q[targets] if log_q.dim() == 1 else log_q.gather(1, targets[:, None]).squeeze(1)
        else:
            log_q_y = None
        theta_y = detached_target if detached_target is not None else \
            logits.detach().float().gather(1, targets[:, None]).squeeze(1) * logit_scale
        v_y = theta_y - row_max * logit_scale - rows.tau
        inner = torch.where(rows.probs > 0, rows.probs * rows.shifted, torch.zeros_like(rows.probs))  # -inf masked
        loss = (alpha - 1.0) / alpha * inner.sum(1) - v_y
        if log_q_y is not None:
            loss = loss + log_alpha_of_inverse(log_q_y, alpha) / alpha
        loss = loss.clamp_min(0.0)  # the loss is >= 0; remove float32 rounding below zero
        p_y = rows.at(targets, rows.probs)
        support = rows.support_size()
        columns = torch.tensor(rows.candidates_needed)
        ctx.save_for_backward(rows.probs, rows.index if rows.index is not None else torch.empty(0), targets, p_y)
        ctx.dense = rows.index is None
        ctx.num_classes = logits.shape[1]
        ctx.input_dtype = logits.dtype
        ctx.separate_target = target_logits is not None
        ctx.logit_scale = logit_scale
        ctx.target_dtype = None if target_logits is None else target_logits.dtype
        ctx.mark_non_differentiable(p_y, support, columns)
        return loss, p_y, support, columns

    @staticmethod
    def backward(ctx, grad_loss, _grad_p_y, _grad_support, _grad_columns):
        probs, index, targets, p_y = ctx.saved_tensors
        scale = grad_loss.float()[:, None]
        target_scale = scale  # the target logit's own gradient is in logit units
        if ctx.logit_scale != 1.0:  # d theta / d logits = logit_scale, folded into the kept columns
            scale = scale * ctx.logit_scale
        if ctx.dense:
            grad = probs * scale
        else:
            grad = probs.new_zeros(probs.shape[0], ctx.num_classes).scatter_add_(1, index, probs * scale)
        grad_target = None
        if ctx.separate_target:
            grad.scatter_(1, targets[:, None], 0.0)
            grad_target = ((p_y - 1.0) * target_scale.squeeze(1)).to(ctx.target_dtype)
        else:
            grad.scatter_add_(1, targets[:, None], -scale)
        return grad.to(ctx.input_dtype), None, None, None, None, None, None, grad_target, None


class TorchSolverEngine(Engine):
    name = "torch"
    summary = "the pure-torch solver (top-k candidates, exact root): any alpha > 1, any measure, any device"

    def unsupported(self, call: LossCall, automatic: bool):
        if call.alpha == 1.0:
            return "alpha = 1 is the softmax cross-entropy (engine 'dense')"
        return None

    def run(self, call: LossCall, reduction: str):
        call = call.with_slope_in_graph()
        maxima = row_max(call.logits)
        # The solve reads the device to size its candidates anyway: the inputs are checked first.
        call.input_check(maxima).raise_if_failed()
        loss, p_y, support, columns = _AlphaDivergenceLoss.apply(
            call.logits, call.safe_targets, call.alpha, call.log_q, call.log_q_target_rows, maxima,
            call.candidates_hint, call.target_logits, call.logit_scale,
        )
        return reduce_loss(loss, reduction), SparsityStatistics.of_rows(support, p_y, int(columns))
