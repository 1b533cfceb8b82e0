r"""The ``dense`` engine: :math:`\alpha = 1`, the softmax cross-entropy of :math:`\theta + \log q`.

The exact limit of the alpha-divergence loss as :math:`\alpha \to 1`
(:mod:`spkver.losses.softargmax`), and the loss of the baselines (Softmax,
CosFace, ArcFace): ``torch.nn.functional.cross_entropy`` over every class,
with the target's logit and :math:`\log q_y` overridable.  On an accelerator
the input checks stay on the device with the statistics (no sync).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spkver.losses.engines.base import Engine, LossCall, SparsityStatistics, reduce_loss

__all__ = ["DenseEngine"]


def _cross_entropy_rows(logits, targets, log_q, log_q_target, target_logits) -> torch.Tensor:
    """Cross-entropy of theta + log q per row (with the target's logit and log q overridable)."""
    shifted = logits.float()
    if target_logits is not None:
        shifted = shifted.scatter(1, targets[:, None], target_logits.float()[:, None])
    if log_q is not None:
        shifted = shifted + log_q
    if log_q_target is not None:
        theta_y = shifted.gather(1, targets[:, None])
        if log_q is not None:
            theta_y = theta_y - (log_q if log_q.dim() == 2 else log_q[None, :].expand_as(shifted)) \
                .gather(1, targets[:, None])
        shifted = shifted.scatter(1, targets[:, None], theta_y + log_q_target[:, None])
    return F.cross_entropy(shifted, targets, reduction="none")


class DenseEngine(Engine):
    name = "dense"
    summary = "softmax cross-entropy over every class (torch): alpha = 1, any measure, any device"

    def unsupported(self, call: LossCall, automatic: bool):
        if call.alpha != 1.0:
            return f"cross-entropy is the alpha = 1 loss (alpha = {call.alpha:g})"
        return None

    def run(self, call: LossCall, reduction: str):
        call = call.with_slope_in_graph()
        logits = call.scaled_logits()
        check = call.input_check()
        if not logits.is_cuda:  # free on the CPU: raise at the call, before anything is computed
            check.raise_if_failed()
        loss = _cross_entropy_rows(logits, call.safe_targets, call.log_q, call.log_q_target_rows, call.target_logits)
        p_y = torch.exp(-loss.detach())
        support = torch.full_like(p_y, call.classes)
        statistics = SparsityStatistics.of_rows(support, p_y, call.classes, None if not logits.is_cuda else check)
        return reduce_loss(loss, reduction), statistics
