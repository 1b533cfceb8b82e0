r"""Input checks of the alpha-divergence loss: every bad input ends in one error that names it.

Two kinds of check:

* the *structure* of the arguments (types, shapes, dtypes, :math:`\alpha`,
  the reduction, the scale): host work only, done before anything runs;
* the *values* (NaN or +inf logits, rows that are entirely ``-inf``, targets
  out of range, a masked target logit, a non-finite :math:`\log q_y`): these
  need the tensors, so on an accelerator reading them back is a device sync.
  :class:`InputCheck` keeps them as one 0-d flag on the device and reads it
  only when asked (with the statistics of the batch, in one transfer); the
  precise message is worked out only when the flag is set.

>>> import torch
>>> logits = torch.tensor([[0.0, float("nan")]])
>>> check = InputCheck.of_rows(row_max(logits), torch.tensor([0]), 2, logits[:, 0], [])
>>> check.raise_if_failed()
Traceback (most recent call last):
...
spkver.losses.checks.LossInputError: logits contain NaN (first in row 0)
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from spkver.errors import UserError

__all__ = ["LossInputError", "REDUCTIONS", "check_alpha", "check_reduction", "check_scale", "check_targets",
           "check_logits_structure", "row_max", "check_log_q", "check_log_q_y", "check_log_q_target",
           "check_target_overrides", "InputCheck", "to_host"]

REDUCTIONS = ("mean", "sum", "none")


class LossInputError(UserError, ValueError):
    """A loss argument that cannot be scored (a ``ValueError``, as torch's own losses raise)."""


def to_host(tensor: torch.Tensor) -> list:
    """The values of a small device tensor as Python numbers: the one place a loss reads the device."""
    return tensor.tolist()


def check_alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise LossInputError(f"alpha must be a number >= 1, got {alpha!r}") from None
    if not math.isfinite(alpha) or alpha < 1.0:
        raise LossInputError(f"alpha must be a finite number >= 1, got {alpha!r}")
    return alpha


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_scale(logit_scale) -> float:
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise LossInputError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    return float(logit_scale)


def check_logits_structure(logits: torch.Tensor) -> None:
    """Type, shape and dtype of ``logits``: no device work."""
    if not isinstance(logits, torch.Tensor):
        raise LossInputError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise LossInputError(f"logits must have shape (batch, classes), got {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise LossInputError("logits must have at least one class (got 0 columns)")
    if not logits.is_floating_point():
        raise LossInputError(f"logits must be floating point, got dtype {logits.dtype}")


def row_max(logits: torch.Tensor) -> torch.Tensor:
    """Row maxima in float32 (B,): they also reveal NaN, +inf and all ``-inf`` rows."""
    return logits.detach().amax(dim=1).float() if logits.shape[0] else logits.new_zeros(0, dtype=torch.float32)


def check_targets(targets, logits: torch.Tensor) -> torch.Tensor:
    """Check the shape and dtype of ``targets`` (their range is checked with the rows)."""
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets, device=logits.device)
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise LossInputError(
            f"targets must have shape ({logits.shape[0]},) to match logits, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LossInputError(f"targets must be integer class indices, got dtype {targets.dtype}")
    return targets.to(device=logits.device, dtype=torch.long)


def check_log_q(log_q, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """A general reference measure, (C,) or (B, C), float32 on the logits' device."""
    if log_q is None:
        return None
    if not isinstance(log_q, torch.Tensor):
        log_q = torch.as_tensor(log_q, dtype=torch.float32, device=logits.device)
    if log_q.requires_grad:
        raise LossInputError(
            "log_q is treated as a constant reference measure and receives no gradient; "
            "pass log_q.detach()"
        )
    batch, classes = logits.shape
    if tuple(log_q.shape) not in ((classes,), (batch, classes)):
        raise LossInputError(
            f"log_q must have shape ({classes},) or ({batch}, {classes}) to match logits, "
            f"got {tuple(log_q.shape)}"
        )
    log_q = log_q.to(device=logits.device, dtype=torch.float32)
    if bool(torch.isnan(log_q).any()) or bool((log_q == math.inf).any()):
        raise LossInputError("log_q must not contain NaN or +inf (q must be finite and >= 0)")
    return log_q


def check_log_q_y(log_q_y) -> float:
    """One :math:`\\log q_y` for every row: a finite number."""
    if not math.isfinite(log_q_y):
        raise LossInputError(f"log_q_target must be finite, got {log_q_y!r}")
    return float(log_q_y)


def check_log_q_target(log_q_target, logits: torch.Tensor) -> Optional[torch.Tensor]:
    """A (B,) float32 tensor of per-row values, finiteness checked with the rows (one number for every
    row is :func:`check_log_q_y`'s)."""
    if log_q_target is None:
        return None
    log_q_target = torch.as_tensor(log_q_target, dtype=torch.float32, device=logits.device)
    if log_q_target.dim() == 0:
        log_q_target = log_q_target.expand(logits.shape[0])
    if tuple(log_q_target.shape) != (logits.shape[0],):
        raise LossInputError(
            f"log_q_target must be a scalar or have shape ({logits.shape[0]},), "
            f"got {tuple(log_q_target.shape)}"
        )
    return log_q_target.detach()


def check_target_overrides(logits: torch.Tensor, target_logits, target_logit_slope) -> None:
    """``target_logits`` (B,) and ``target_logit_slope`` (B,, only with ``target_logits``)."""
    batch = logits.shape[0]
    if target_logits is not None and (
            not isinstance(target_logits, torch.Tensor) or tuple(target_logits.shape) != (batch,)):
        raise LossInputError(f"target_logits must be a tensor of shape ({batch},)")
    if target_logit_slope is not None and (
            target_logits is None or not isinstance(target_logit_slope, torch.Tensor)
            or tuple(target_logit_slope.shape) != (batch,)):
        raise LossInputError(f"target_logit_slope must be a tensor of shape ({batch},), given with target_logits")


def _problem_flag(row_max, targets, num_classes, target_logit, overrides) -> torch.Tensor:
    """A 0-d boolean tensor, true when some input is bad; computed on the device without a sync."""
    flags = [~torch.isfinite(row_max).all()]
    if targets is not None:
        flags.append(((targets < 0) | (targets >= num_classes)).any())
    if target_logit is not None:
        flags.append((target_logit == -math.inf).any())
    flags += [~torch.isfinite(value).all() for _, value in overrides]
    return torch.stack(flags).any()


def _raise_for_bad_rows(row_max, targets, num_classes, target_logit, overrides) -> None:
    """Raise a :class:`LossInputError` naming the first problem (the inputs are known to hold one)."""
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        value = float(row_max[row])
        if math.isnan(value):
            raise LossInputError(f"logits contain NaN (first in row {row})")
        if value > 0:
            raise LossInputError(f"logits contain +inf (first in row {row})")
        raise LossInputError(f"logits row {row} is entirely -inf: no class is allowed")
    if targets is not None:
        out = (targets < 0) | (targets >= num_classes)
        if bool(out.any()):
            raise LossInputError(f"targets must lie in [0, {num_classes - 1}], got {int(targets[out][0])}")
    for name, value in overrides:
        if not bool(torch.isfinite(value).all()):
            raise LossInputError(f"{name} must be finite")
    row = int((target_logit == -math.inf).nonzero()[0])
    raise LossInputError(f"the target class of row {row} has logit -inf (masked): the loss is infinite")


class InputCheck:
    """The value checks of one loss call: a 0-d flag on the device, and the precise error on demand.

    ``flag`` is true (non-zero) when some input is bad; ``explain()`` raises
    the :class:`LossInputError` that names it.  Nothing is read from the
    device until :meth:`raise_if_failed` (or the statistics that carry the
    flag, :class:`~spkver.losses.engines.base.SparsityStatistics`) asks.
    """

    def __init__(self, flag: torch.Tensor, explain: Callable[[], None]):
        self.flag = flag
        self.explain = explain

    @classmethod
    def of_rows(cls, row_max: torch.Tensor, targets: Optional[torch.Tensor], num_classes: int,
                target_logit: Optional[torch.Tensor], overrides: Sequence[Tuple[str, torch.Tensor]],
                flag: Optional[torch.Tensor] = None) -> "InputCheck":
        """The checks of rows with maxima ``row_max`` (``flag``: one already computed, e.g. by a kernel)."""
        arguments = (row_max, targets, num_classes, target_logit, list(overrides))
        if flag is None:
            flag = _problem_flag(*arguments)
        return cls(flag, lambda: _raise_for_bad_rows(*arguments))

    @classmethod
    def of_call(cls, logits: torch.Tensor, targets: torch.Tensor, safe_targets: torch.Tensor,
                log_q_target: Optional[torch.Tensor], target_logits: Optional[torch.Tensor],
                maxima: Optional[torch.Tensor] = None, flag: Optional[torch.Tensor] = None) -> "InputCheck":
        """The checks of one loss call's arguments (``maxima``: the row maxima, if already known)."""
        target_logit = logits.detach().gather(1, safe_targets[:, None]).squeeze(1) if target_logits is None \
            else target_logits.detach()
        overrides: List[Tuple[str, torch.Tensor]] = [
            (name, value.detach()) for name, value in (("log_q_target", log_q_target),
                                                       ("target_logits", target_logits)) if value is not None]
        maxima = row_max(logits) if maxima is None else maxima
        return cls.of_rows(maxima, targets, logits.shape[1], target_logit, overrides, flag)

    def raise_if_failed(self) -> None:
        """Read the flag (one device sync) and raise the precise error if it is set."""
        if to_host(self.flag.float()):
            self.explain()
