r"""What every loss engine shares: the call it serves, the statistics it returns, its contract.

A :class:`LossCall` holds the validated arguments of one alpha-divergence loss
call; an :class:`Engine` says whether it can serve it (:meth:`Engine.unsupported`
gives the reason when not) and runs it (:meth:`Engine.run`), returning the loss
and the :class:`SparsityStatistics` of the batch.  The statistics and the
value checks of the inputs stay on the device until someone reads them: on a
GPU the loss never waits for the host.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch

from spkver.losses.checks import InputCheck, to_host

__all__ = ["TargetMargin", "LossCall", "SparsityStatistics", "Engine", "reduce_loss"]


@dataclasses.dataclass(frozen=True)
class TargetMargin:
    r"""An objective's margin on the target: :math:`\cos_y \mapsto \psi(\cos_y)`.

    ``function`` is the margin in torch operations (any engine can apply it);
    ``kernel_code`` names it for an engine that forms it inside its kernel
    (the Triton kernel's ``MARGIN_*`` codes), ``None`` for a margin no kernel knows.
    """

    function: Callable[[torch.Tensor], torch.Tensor]
    value: float
    kernel_code: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class LossCall:
    r"""The validated arguments of one loss call (see :func:`~spkver.losses.loss.loss_rows_and_statistics`).

    The logits are ``logit_scale * logits`` (the objectives pass cosines and
    :math:`s`); the target's logit is ``target_logits`` when given, else the
    target's column after ``margin``; the reference measure is ``log_q``
    (general), or unit except :math:`\log q_y` = ``log_q_target`` (a number in
    ``log_q_y`` when it is one for every row).  The range of ``targets`` and the
    finiteness of the values are checked by the engines (:class:`~spkver.losses.checks.InputCheck`).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    alpha: float
    log_q: Optional[torch.Tensor] = None
    log_q_target: Optional[torch.Tensor] = None
    log_q_y: Optional[float] = None
    target_logits: Optional[torch.Tensor] = None
    target_logit_slope: Optional[torch.Tensor] = None
    logit_scale: float = 1.0
    candidates_hint: Optional[int] = None
    margin: Optional[TargetMargin] = None

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    @property
    def classes(self) -> int:
        return self.logits.shape[1]

    @property
    def log_q_target_rows(self) -> Optional[torch.Tensor]:
        """:math:`\\log q_y` per row (B,), made from ``log_q_y`` when that one number was given."""
        if self.log_q_target is None and self.log_q_y is not None:
            return torch.full((self.batch,), self.log_q_y, device=self.logits.device)
        return self.log_q_target

    @property
    def safe_targets(self) -> torch.Tensor:
        """The targets clamped into range: every index is safe before the range check is read."""
        return self.targets.clamp(0, self.classes - 1)

    def with_target_logits(self) -> "LossCall":
        r"""The call with ``margin`` applied: the target's logit :math:`s\psi(\cos_y)` and its slope
        :math:`s\psi'(\cos_y)`.

        The margin's value and derivative are formed on (B,) numbers, with no
        (B, C) work; an engine either sends the target's gradient to its
        column itself (the CPU kernel), or puts the slope in the graph
        (:meth:`with_slope_in_graph`).
        """
        if self.margin is None:
            return self
        with torch.enable_grad():
            cosine_y = self.logits.detach().gather(1, self.safe_targets[:, None]).squeeze(1).requires_grad_(True)
            margined = self.margin.function(cosine_y)
            if margined is cosine_y:  # no margin (a zero margin returns its input)
                return dataclasses.replace(self, margin=None)
            (slope,) = torch.autograd.grad(margined.sum(), cosine_y, allow_unused=True)
        slope = torch.zeros_like(cosine_y) if slope is None else slope
        return dataclasses.replace(self, margin=None, target_logits=margined.detach() * self.logit_scale,
                                   target_logit_slope=slope * self.logit_scale)

    def with_slope_in_graph(self) -> "LossCall":
        """The call whose ``target_logits`` carry ``target_logit_slope`` in their graph (d/d column = slope)."""
        call = self.with_target_logits()
        if call.target_logit_slope is None:
            return call
        column = call.logits.gather(1, call.safe_targets[:, None]).squeeze(1)
        target_logits = call.target_logits.detach() + call.target_logit_slope.detach() * (column - column.detach())
        return dataclasses.replace(call, target_logits=target_logits, target_logit_slope=None)

    def scaled_logits(self) -> torch.Tensor:
        """``logit_scale * logits``, made only for the engines that read every logit anyway."""
        return self.logits * self.logit_scale if self.logit_scale != 1.0 else self.logits

    def input_check(self, maxima: Optional[torch.Tensor] = None, flag: Optional[torch.Tensor] = None) -> InputCheck:
        """The value checks of this call (``maxima``: the logits' row maxima, if an engine has them)."""
        return InputCheck.of_call(self.logits, self.targets, self.safe_targets, self.log_q_target,
                                  self.target_logits, maxima, flag)


class SparsityStatistics:
    r"""Per-batch statistics of the posterior :math:`p` behind a loss, read from the device when first asked.

    Attributes (floats; reading one reads them all, in one transfer)
    ----------------------------------------------------------------
    support_size : float
        Mean number of classes with :math:`p_j > 0` per row.
    target_zero_fraction : float
        Fraction of rows whose target has :math:`p_y = 0` (the A3M collapse).
    target_prob : float
        Mean :math:`p_y`.
    candidates : int
        Columns per row the solver needed: the largest number of classes in
        reach of :math:`\tau_{lo}` plus one (C at :math:`\alpha = 1` and on the
        kernels); the objectives start the next batch's ``topk`` from it.

    Statistics made by an engine on a device (:meth:`on_device`) also carry
    the call's :class:`~spkver.losses.checks.InputCheck`: the first read raises
    its error when the inputs were bad.

    >>> SparsityStatistics(3.0, target_zero_fraction=0.25, target_prob=0.5).target_zero_fraction
    0.25
    """

    def __init__(self, support_size: float, target_zero_fraction: float, target_prob: float, candidates: int = 0):
        self._values: Optional[Tuple[float, float, float]] = (support_size, target_zero_fraction, target_prob)
        self._sums: Optional[torch.Tensor] = None
        self._rows = 1
        self._check: Optional[InputCheck] = None
        self.candidates = candidates

    @classmethod
    def on_device(cls, sums: torch.Tensor, rows: int, candidates: int,
                  check: Optional[InputCheck] = None) -> "SparsityStatistics":
        """Statistics from ``sums`` (3,): the batch sums of the support sizes, of :math:`[p_y = 0]` and of
        :math:`p_y`."""
        statistics = cls(math.nan, math.nan, math.nan, candidates)
        statistics._values, statistics._sums, statistics._rows, statistics._check = None, sums, rows, check
        return statistics

    @classmethod
    def of_rows(cls, support: torch.Tensor, p_y: torch.Tensor, candidates: int,
                check: Optional[InputCheck] = None) -> "SparsityStatistics":
        """Statistics of per-row support sizes and :math:`p_y` (B,), without reading them."""
        with torch.no_grad():
            sums = torch.stack([support.float().sum(), (p_y == 0).float().sum(), p_y.float().sum()])
        return cls.on_device(sums, support.shape[0], candidates, check)

    def sums(self) -> Tuple[torch.Tensor, int]:
        """``(sums (3,), rows)`` on the device, unread: for accumulating over batches without a sync."""
        if self._sums is None:
            values = torch.tensor(self._values, dtype=torch.float64)
            return values * self._rows, self._rows
        return self._sums, self._rows

    def _read(self) -> Tuple[float, float, float]:
        if self._values is None:
            flag = [] if self._check is None else [self._check.flag.float().reshape(1)]
            host = to_host(torch.cat([self._sums.float().reshape(3)] + [f.to(self._sums.device) for f in flag]))
            if flag and host[3]:
                self._check.explain()
            self._values = tuple(value / self._rows for value in host[:3])
        return self._values

    def check(self) -> "SparsityStatistics":
        """Read the statistics (and the input checks: their error, if any); return ``self``."""
        self._read()
        return self

    @property
    def support_size(self) -> float:
        return self._read()[0]

    @property
    def target_zero_fraction(self) -> float:
        return self._read()[1]

    @property
    def target_prob(self) -> float:
        return self._read()[2]

    def __repr__(self) -> str:
        if self._values is None:
            return f"SparsityStatistics(<unread, {self._rows} rows on {self._sums.device}>)"
        support, zero, prob = self._values
        return (f"SparsityStatistics(support_size={support:g}, target_zero_fraction={zero:g}, "
                f"target_prob={prob:g}, candidates={self.candidates})")


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class Engine:
    """A way to run the loss: says which calls it can serve and runs them.

    Subclasses set ``name`` and ``summary`` (one line for the engine log) and
    implement :meth:`unsupported` and :meth:`run`.
    """

    name = ""
    summary = ""

    def unsupported(self, call: LossCall, automatic: bool) -> Optional[str]:
        """Why this engine cannot serve ``call`` (``None`` when it can).

        ``automatic``: the registry is choosing (``engine="auto"``); an engine
        may decline calls there that it serves when asked for by name.
        """
        raise NotImplementedError

    def run(self, call: LossCall, reduction: str) -> Tuple[torch.Tensor, SparsityStatistics]:
        """The loss of ``call``, reduced by ``reduction``, and the batch's statistics."""
        raise NotImplementedError
