r"""The alpha-divergence loss as a function: validate the call, let the registry choose an engine, run it.

.. math::
    L(\theta, y; q) = \langle p - e_y, \theta\rangle
    + \frac{q_y^{1-\alpha} - \sum_j q_j^{1-\alpha} p_j^\alpha}{\alpha(\alpha-1)} \;\ge 0,

with :math:`p` the f-softargmax of :mod:`spkver.losses.softargmax`.  The
maths lives there, the input checks in :mod:`spkver.losses.checks`, the
engines that compute it and the registry that picks one in
:mod:`spkver.losses.engines`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from spkver.losses.checks import (
    check_alpha,
    check_log_q,
    check_log_q_target,
    check_log_q_y,
    check_logits_structure,
    check_reduction,
    check_scale,
    check_target_overrides,
    check_targets,
)
from spkver.losses.engines import EngineChoice, select_engine
from spkver.losses.engines.base import LossCall, SparsityStatistics, TargetMargin, reduce_loss

__all__ = ["alpha_divergence_loss", "loss_rows_and_statistics", "build_call", "run_call"]


def build_call(logits, targets, alpha, log_q=None, log_q_target=None, candidates_hint=None, target_logits=None,
               logit_scale=1.0, target_logit_slope=None, margin: Optional[TargetMargin] = None) -> LossCall:
    """The validated :class:`~spkver.losses.engines.base.LossCall` of these arguments (structure only:
    the values are checked by the engine, on the device)."""
    alpha = check_alpha(alpha)
    check_logits_structure(logits)
    targets = check_targets(targets, logits)
    check_target_overrides(logits, target_logits, target_logit_slope)
    log_q_y = None
    if isinstance(log_q_target, (int, float)):  # one number for every row: a (B,) tensor is made only if needed
        log_q_y, log_q_target = check_log_q_y(log_q_target), None
    return LossCall(logits=logits, targets=targets, alpha=alpha, log_q=check_log_q(log_q, logits),
                    log_q_target=check_log_q_target(log_q_target, logits), log_q_y=log_q_y,
                    target_logits=target_logits, target_logit_slope=target_logit_slope,
                    logit_scale=check_scale(logit_scale), candidates_hint=candidates_hint, margin=margin)


def run_call(call: LossCall, engine: str = "auto", reduction: str = "none"
             ) -> Tuple[torch.Tensor, SparsityStatistics, Optional[EngineChoice]]:
    """``(loss, statistics, choice)`` of ``call`` on ``engine`` (``choice`` is ``None`` for an empty batch)."""
    if call.batch == 0:
        empty = call.logits.new_zeros(0, dtype=torch.float32).requires_grad_(call.logits.requires_grad)
        return reduce_loss(empty, reduction), SparsityStatistics(math.nan, math.nan, math.nan), None
    choice = select_engine(engine, call)
    loss, statistics = choice.engine.run(call, reduction)
    return loss, statistics, choice


def loss_rows_and_statistics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    log_q_target: Optional[torch.Tensor] = None,
    candidates_hint: Optional[int] = None,
    target_logits: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    target_logit_slope: Optional[torch.Tensor] = None,
    engine: str = "auto",
) -> Tuple[torch.Tensor, SparsityStatistics]:
    """Per-row loss (B,) with its :class:`~spkver.losses.engines.base.SparsityStatistics`.

    See :func:`alpha_divergence_loss` for the arguments.  ``candidates_hint``
    is the number of top logits the ``torch`` engine tries first;
    ``target_logits`` (B,) replaces each row's target logit (a margin) without
    a modified copy of ``logits`` and receives its gradient.  ``logit_scale``
    multiplies ``logits`` (not ``target_logits``, already in logit units):
    the margin objectives pass cosines and :math:`s`, so that only the kept
    columns are scaled.  ``target_logit_slope`` (B,) says that
    ``target_logits`` is a function of the target's column with this
    derivative: its gradient then goes to that column.  For :math:`\\alpha = 1`
    the support is reported as all C classes.  The statistics are read from
    the device (with the input checks) when first asked.
    """
    call = build_call(logits, targets, alpha, log_q, log_q_target, candidates_hint, target_logits, logit_scale,
                      target_logit_slope)
    loss, statistics, _ = run_call(call, engine)
    return loss, statistics


def alpha_divergence_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    log_q: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    log_q_target: Optional[torch.Tensor] = None,
    engine: str = "auto",
) -> torch.Tensor:
    r"""Fenchel--Young loss of the alpha-divergence.

    .. math::
        L(\theta, y; q) = \langle p - e_y, \theta\rangle
        + \frac{q_y^{1-\alpha} - \sum_j q_j^{1-\alpha} p_j^\alpha}{\alpha(\alpha-1)}
        \;\ge 0,

    with :math:`p` = :func:`~spkver.losses.softargmax.alpha_softargmax` :math:`(\theta; q)`; zero iff
    :math:`p = e_y`.  :math:`\partial L/\partial\theta = p - e_y` exactly.  At
    :math:`\alpha = 1` it is the cross-entropy of :math:`\theta + \log q`, and
    with :math:`q \equiv 1` the entmax loss.

    Parameters
    ----------
    logits : Tensor (B, C)
        Any floating dtype (computed in float32; the gradient has the input dtype).
    targets : Tensor (B,)
        Integer classes in ``[0, C)``.
    alpha : float
        :math:`\alpha \ge 1`.
    log_q : Tensor (C,) or (B, C), optional
        Log reference measure (a constant); default :math:`q \equiv 1`.
    reduction : {"mean", "sum", "none"}
    log_q_target : Tensor (B,) or float, optional
        :math:`\log q_y` of each row's target, overriding ``log_q`` there: the
        Q-Margin measure without building a (B, C) tensor.
    engine : {"auto", "triton", "cpu", "dense", "torch"}
        Which engine computes it (:mod:`spkver.losses.engines`); ``auto`` picks the fastest that can.

    The loss is returned in float32; its value overflows to ``inf`` only when
    the exact value exceeds float32's range (possible only for extreme ``q``
    and large ``alpha``, e.g. :math:`q_y^{1-\alpha} > 10^{38}`).  Bad input
    raises at the call (a function has no later read to defer it to).

    Examples
    --------
    >>> logits = torch.tensor([[3.0, 2.5, 0.0], [0.0, 1.0, 4.0]])
    >>> alpha_divergence_loss(logits, torch.tensor([0, 2]), alpha=1.5, reduction="none")
    tensor([0.1844, 0.0000])
    """
    check_reduction(reduction)
    loss, statistics = loss_rows_and_statistics(logits, targets, alpha, log_q=log_q, log_q_target=log_q_target,
                                                engine=engine)
    statistics.check()
    return reduce_loss(loss, reduction)
