r"""Margin objectives on cosine similarities: the baselines and the alpha-divergence family.

Every objective takes the cosines :math:`\cos(x, w_j)` (B, C) between
L2-normalised embeddings and class prototypes, and integer targets (B,).  It
forms logits :math:`\theta_j = s\cos_j` with a margin on the target, and scores
them with the alpha-divergence loss of :mod:`spkver.losses.loss` (cross-entropy
at :math:`\alpha = 1`):

==============  ==========================================  ======================  =========
objective       target logit :math:`\theta_y`               reference :math:`q`     alpha
==============  ==========================================  ======================  =========
``Softmax``     :math:`s\cos_y`                             1                       1
``CosFace``     :math:`s(\cos_y - m)`                       1                       1
``ArcFace``     :math:`s\cos(\phi_y + m)`                   1                       1
``AlphaDiv``    :math:`s\cos_y`                             1                       > 1
``QMargin``     :math:`s\cos_y`                             :math:`q_y = e^{-sm}`   > 1
``A3M``         :math:`s\cos(\phi_y + m)`                   1                       > 1
==============  ==========================================  ======================  =========

Each objective keeps its configured ``base_margin`` and a current ``margin``
that a :class:`MarginWarmup` moves with :meth:`CosineMarginObjective.update`,
and leaves the :class:`~spkver.losses.engines.base.SparsityStatistics` of its
last batch in ``last_statistics`` and the engine that ran it (and why) in
``last_engine``.

Every objective takes ``engine`` (:mod:`spkver.losses.engines`): ``auto``
by default, or a name.  On CUDA the objectives run as one fused kernel that
also forms the margin, checks the inputs and sums the statistics; nothing is
read back until ``last_statistics`` is read, which raises the same error for
bad input as the other engines raise at the call.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from spkver.losses.checks import LossInputError, check_alpha, check_reduction
from spkver.losses.engines import EngineChoice, check_engine_name, select_engine
from spkver.losses.engines.base import SparsityStatistics, TargetMargin
from spkver.losses.engines.triton_kernel import MARGIN_ANGULAR, MARGIN_COSINE, MARGIN_NONE
from spkver.losses.loss import build_call, run_call
from spkver.losses.softargmax import log_alpha_of_inverse

__all__ = [
    "CosineMarginObjective",
    "Softmax",
    "CosFace",
    "ArcFace",
    "AlphaDiv",
    "QMargin",
    "A3M",
    "MarginWarmup",
    "additive_angular_cosine",
    "qmargin_log_q_target",
    "qmargin_zero_loss_gap",
    "QMARGIN_FORMS",
    "TRAINABLE_BAND",
]


def additive_angular_cosine(cosine: torch.Tensor, margin: float) -> torch.Tensor:
    r"""ArcFace's :math:`\cos(\phi + m)` with the usual fallback past :math:`\pi`.

    .. math::
        \psi(\cos\phi) = \begin{cases}
            \cos(\phi + m) & \phi + m \le \pi \\
            \cos\phi - m\sin m & \text{otherwise,}
        \end{cases}

    which keeps :math:`\psi` decreasing in :math:`\phi` (InsightFace's rule).

    Examples
    --------
    >>> additive_angular_cosine(torch.tensor([1.0, 0.0, -1.0]), 0.5)
    tensor([ 0.8776, -0.4794, -1.2397])
    """
    if margin == 0:
        return cosine
    cosine = cosine.clamp(-1.0, 1.0)
    sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-12))
    shifted = cosine * math.cos(margin) - sine * math.sin(margin)
    return torch.where(cosine > math.cos(math.pi - margin), shifted, cosine - margin * math.sin(margin))


#: Q-Margin's forms of the target's reference mass (see :func:`qmargin_log_q_target`).
QMARGIN_FORMS = ("exp", "exp_alpha")

#: The band of s(alpha - 1) in which the alpha objectives train; the papers' pairs (20, 1.25),
#: (10, 1.5), (5, 2) all have s(alpha - 1) = 5.
TRAINABLE_BAND = (2.0, 10.0)


def qmargin_log_q_target(scale: float, margin: float, alpha: float, form: str = "exp") -> float:
    r"""Q-Margin's target reference mass :math:`\log q_y` (:math:`q_j = 1` for :math:`j \ne y`).

    ``form="exp"`` (the papers' definition, the default): :math:`q_y = e^{-s m}`.
    ``form="exp_alpha"``: :math:`q_y = 1/\exp_\alpha(s m)`, i.e.

    .. math::
        \log q_y = -\frac{\log(1 + (\alpha-1) s m)}{\alpha - 1},

    an additive cosine margin :math:`m` on top of the alpha-divergence's own
    separation. Both tend to :math:`-s m` (CosFace) as :math:`\alpha \to 1`;
    :func:`qmargin_zero_loss_gap` gives the cosine lead each asks for.

    Examples
    --------
    >>> qmargin_log_q_target(10.0, 0.2, 1.5)
    -2.0
    >>> round(qmargin_log_q_target(10.0, 0.2, 1.5, form="exp_alpha"), 4)
    -1.3863
    >>> qmargin_log_q_target(30.0, 0.2, 1.0, form="exp_alpha")
    -6.0
    """
    if form not in QMARGIN_FORMS:
        raise LossInputError(f"form must be one of {QMARGIN_FORMS}, got {form!r}")
    if form == "exp" or alpha == 1.0:
        return -scale * margin
    return -math.log1p((alpha - 1.0) * scale * margin) / (alpha - 1.0)


def qmargin_zero_loss_gap(scale: float, margin: float, alpha: float, form: str = "exp") -> float:
    r"""The cosine lead :math:`\cos_y - \max_{j \ne y}\cos_j` at which Q-Margin's loss becomes exactly 0.

    The loss vanishes iff :math:`s\cos_y - s\cos_j \ge \log_\alpha(1/q_y) + 1/(\alpha-1)` for every
    :math:`j \ne y`, which is

    .. math::
        \text{exp:}\ \frac{e^{(\alpha-1) s m}}{s(\alpha-1)}, \qquad
        \text{exp\_alpha:}\ m + \frac{1}{s(\alpha-1)}.

    The papers' form grows exponentially in :math:`(\alpha-1)s m`, so :math:`s` must shrink as
    :math:`\alpha` grows. At :math:`\alpha = 1` no finite lead gives a zero loss (``inf``).

    Examples
    --------
    >>> round(qmargin_zero_loss_gap(10.0, 0.2, 1.5), 2)     # a papers' pair
    0.54
    >>> round(qmargin_zero_loss_gap(30.0, 0.2, 1.5), 2)     # a mismatched pair: beyond any embedding
    1.34
    """
    if alpha == 1.0:
        return math.inf
    log_q = qmargin_log_q_target(scale, margin, alpha, form)
    return (log_alpha_of_inverse(log_q, alpha) + 1.0 / (alpha - 1.0)) / scale


class CosineMarginObjective(nn.Module):
    r"""Alpha-divergence loss of :math:`s\cos` with a margin on the target.

    Subclasses choose the target cosine (:meth:`target_cosine`) and the
    target's reference mass (:meth:`target_log_q`).

    Parameters
    ----------
    scale : float
        :math:`s > 0`.
    margin : float
        Final margin :math:`m \ge 0` (``base_margin``); ``margin`` is the current one.
    alpha : float
        :math:`\alpha \ge 1` (1 is softmax cross-entropy).
    reduction : {"mean", "sum", "none"}
    engine : {"auto", "triton", "cpu", "dense", "torch"}
        The loss engine (:mod:`spkver.losses.engines`); ``auto`` picks the
        fastest that serves the call, a name is used or refused with the reason.
    """

    def __init__(self, scale: float, margin: float = 0.0, alpha: float = 1.0, reduction: str = "mean",
                 engine: str = "auto"):
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise LossInputError(f"scale must be a finite number > 0, got {scale!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise LossInputError(f"margin must be a finite number >= 0, got {margin!r}")
        self.scale = float(scale)
        self.base_margin = float(margin)
        self.margin = float(margin)
        self.alpha = check_alpha(alpha)
        self.reduction = check_reduction(reduction)
        self.engine = check_engine_name(engine)
        self.last_statistics: Optional[SparsityStatistics] = None
        self.last_engine: Optional[EngineChoice] = None
        low, high = TRAINABLE_BAND
        if self.alpha > 1.0 and not low <= self.scale * (self.alpha - 1.0) <= high:
            warnings.warn(
                f"{type(self).__name__}(scale={self.scale:g}, alpha={self.alpha:g}): s(alpha-1) = "
                f"{self.scale * (self.alpha - 1.0):g} is outside the trainable band [{low:g}, {high:g}]; the "
                f"papers choose s and alpha together, s(alpha-1) = 5: (s, alpha) = (20, 1.25), (10, 1.5), (5, 2)",
                UserWarning, stacklevel=3)

    def update(self, margin: float) -> None:
        """Set the current margin (called by schedules such as :class:`MarginWarmup`)."""
        if not (math.isfinite(margin) and margin >= 0):
            raise LossInputError(f"margin must be a finite number >= 0, got {margin!r}")
        self.margin = float(margin)

    def target_cosine(self, cosine_y: torch.Tensor) -> torch.Tensor:
        """The target's cosine after the geometric margin; identity by default."""
        return cosine_y

    def target_log_q(self) -> Optional[float]:
        r""":math:`\log q_y` of the target; ``None`` means the unit measure."""
        return None

    @torch.no_grad()
    def one_hot_rows(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""Rows whose posterior is exactly :math:`e_y`: zero loss and zero gradient (B,) bool.

        Alone, the target sets :math:`\tau = b_y = \theta_y - \log_\alpha(1/q_y)`; the
        posterior is one-hot iff every other logit is out of reach of it,
        :math:`\max_{j \ne y} s\cos_j \le b_y - 1/(\alpha-1)`. Never at :math:`\alpha = 1`
        (softmax is dense). Exact and solve-free: the fine-tuning diagnostic.

        >>> QMargin(10.0, 0.2, 1.5).one_hot_rows(torch.tensor([[0.9, 0.3], [0.9, 0.5]]), torch.tensor([0, 0]))
        tensor([ True, False])
        """
        cosine = cosine.detach().float()
        if self.alpha == 1.0:
            return torch.zeros(cosine.shape[0], dtype=torch.bool, device=cosine.device)
        column = targets.reshape(-1, 1)
        bound = self.target_bound(self.scale * self.target_cosine(cosine.gather(1, column).squeeze(1)))
        others = self.scale * cosine.scatter(1, column, -math.inf).amax(1)
        return others <= bound - 1.0 / (self.alpha - 1.0)

    def target_bound(self, target_logit: torch.Tensor) -> torch.Tensor:
        r""":math:`b_y = \theta_y - \log_\alpha(1/q_y)`: the root :math:`\tau` when the target is alone
        (:math:`\alpha > 1`), and the lower bound of :math:`\tau` it contributes."""
        log_q = self.target_log_q()
        return target_logit if log_q is None else target_logit - log_alpha_of_inverse(log_q, self.alpha)

    def check_engine(self, device="cpu") -> EngineChoice:
        """The engine this objective's calls on ``device`` will run on, or the :class:`EngineError` saying
        why the one it names cannot (checked before training, on a (2, 2) call of the same kind)."""
        call = build_call(torch.zeros(2, 2, device=device), torch.zeros(2, dtype=torch.long, device=device),
                          self.alpha, log_q_target=self.target_log_q(), logit_scale=self.scale)
        return select_engine(self.engine, call)

    def forward(self, cosine: torch.Tensor, targets: torch.Tensor, engine: Optional[str] = None) -> torch.Tensor:
        """The loss of ``cosine`` (B, C) against ``targets`` (B,), on ``engine`` (default: this objective's)."""
        if not isinstance(cosine, torch.Tensor) or cosine.dim() != 2:
            shape = tuple(cosine.shape) if isinstance(cosine, torch.Tensor) else type(cosine).__name__
            raise LossInputError(f"cosine must be a (batch, classes) tensor, got {shape}")
        # Consecutive batches need about as many candidates; a little slack avoids a redo (torch engine).
        hint = None if self.last_statistics is None else self.last_statistics.candidates * 5 // 4 + 8
        margin = TargetMargin(self.target_cosine, self.margin, _KERNEL_MARGINS.get(type(self).target_cosine))
        call = build_call(cosine, targets, self.alpha, log_q_target=self.target_log_q(), candidates_hint=hint,
                          logit_scale=self.scale, margin=margin)
        loss, self.last_statistics, self.last_engine = run_call(call, check_engine_name(engine or self.engine),
                                                                self.reduction)
        return loss

    def extra_repr(self) -> str:
        engine = "" if self.engine == "auto" else f", engine={self.engine}"
        return f"scale={self.scale}, margin={self.margin} (base {self.base_margin}), alpha={self.alpha}{engine}"


class Softmax(CosineMarginObjective):
    r"""Normalised softmax: cross-entropy of :math:`s\cos`.

    >>> loss = Softmax(scale=30.0)(torch.tensor([[0.9, 0.1]]), torch.tensor([0]))
    >>> float(loss) < 1e-9
    True
    """

    def __init__(self, scale: float, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, 0.0, 1.0, reduction, engine)


class CosFace(CosineMarginObjective):
    r"""Additive cosine margin (CosFace / AM-softmax): :math:`\theta_y = s(\cos_y - m)`."""

    def __init__(self, scale: float, margin: float, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, margin, 1.0, reduction, engine)

    def target_cosine(self, cosine_y):
        return cosine_y - self.margin if self.margin else cosine_y


class ArcFace(CosineMarginObjective):
    r"""Additive angular margin: :math:`\theta_y = s\cos(\phi_y + m)` (see :func:`additive_angular_cosine`)."""

    def __init__(self, scale: float, margin: float, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, margin, 1.0, reduction, engine)

    def target_cosine(self, cosine_y):
        return additive_angular_cosine(cosine_y, self.margin) if self.margin else cosine_y


class AlphaDiv(CosineMarginObjective):
    r"""Alpha-divergence loss of :math:`s\cos`, unit :math:`q`, no margin.

    Zero loss once :math:`s\cos_y - s\cos_j \ge 1/(\alpha-1)` for every :math:`j \ne y`.

    >>> AlphaDiv(scale=10.0, alpha=1.5)(torch.tensor([[0.5, 0.2, 0.0]]), torch.tensor([0]))
    tensor(0.)
    """

    def __init__(self, scale: float, alpha: float, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, 0.0, alpha, reduction, engine)


class QMargin(CosineMarginObjective):
    r"""Margin in the reference measure (Q-Margin).

    Logits :math:`s\cos` without a geometric margin; :math:`q_j = 1` for
    :math:`j \ne y` and :math:`\log q_y` from :func:`qmargin_log_q_target`:
    by default the papers' :math:`q_y = e^{-s m}`, whose loss vanishes exactly
    when :math:`\cos_y - \cos_j \ge e^{(\alpha-1)s m}/(s(\alpha-1))`
    (:func:`qmargin_zero_loss_gap`). Either form gives ``CosFace(s, m)`` as
    :math:`\alpha \to 1`.

    Parameters
    ----------
    form : {"exp", "exp_alpha"}
        ``"exp"``: :math:`q_y = e^{-s m}` (the papers'); ``"exp_alpha"``:
        :math:`q_y = 1/\exp_\alpha(s m)`, an additive cosine margin :math:`m`
        on top of the separation :math:`1/(s(\alpha-1))`, linear in :math:`m` at any :math:`s`.
    log_q_target : float, optional
        Overrides both forms with a fixed :math:`\log q_y` (for experiments);
        warm-up then scales it by ``margin / base_margin``.

    >>> QMargin(scale=10.0, margin=0.2, alpha=1.5).target_log_q()
    -2.0
    >>> QMargin(scale=10.0, margin=0.2, alpha=1.5, form="exp_alpha").target_log_q() == \
    ...     qmargin_log_q_target(10.0, 0.2, 1.5, form="exp_alpha")
    True
    """

    def __init__(self, scale: float, margin: float, alpha: float, form: str = "exp",
                 log_q_target: Optional[float] = None, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, margin, alpha, reduction, engine)
        if form not in QMARGIN_FORMS:
            raise LossInputError(f"form must be one of {QMARGIN_FORMS}, got {form!r}")
        if log_q_target is not None and not math.isfinite(log_q_target):
            raise LossInputError(f"log_q_target must be finite, got {log_q_target!r}")
        self.form = form
        self.log_q_target_override = log_q_target

    def target_log_q(self) -> Optional[float]:
        if self.log_q_target_override is not None:
            ramp = self.margin / self.base_margin if self.base_margin else 1.0
            return self.log_q_target_override * ramp
        if self.margin == 0:
            return None
        return qmargin_log_q_target(self.scale, self.margin, self.alpha, self.form)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}"


class A3M(CosineMarginObjective):
    r"""Margin in the logits (A3M): ArcFace's :math:`s\cos(\phi_y + m)` under the alpha-divergence loss, unit :math:`q`.

    Prone to :math:`p_y = 0` early in training; see
    :class:`~spkver.losses.reinit.ReinitializationPolicy` (A3M-I).
    """

    def __init__(self, scale: float, margin: float, alpha: float, reduction: str = "mean", engine: str = "auto"):
        super().__init__(scale, margin, alpha, reduction, engine)

    target_cosine = ArcFace.target_cosine


#: The fused kernel's code for each ``target_cosine`` it implements. Looked up by the function
#: itself, so a subclass that overrides ``target_cosine`` (a margin the kernel does not know)
#: takes the general path.
_KERNEL_MARGINS = {
    CosineMarginObjective.target_cosine: MARGIN_NONE,
    CosFace.target_cosine: MARGIN_COSINE,
    ArcFace.target_cosine: MARGIN_ANGULAR,
}


class MarginWarmup:
    r"""Linear margin warm-up: :math:`m(t) = m_{final}\,\mathrm{clip}((t - t_0)/T, 0, 1)`.

    ``t`` is training progress in epochs (fractional within an epoch), so the
    schedule can be stepped per batch or per epoch.

    Parameters
    ----------
    warmup_epochs : float
        :math:`T`, epochs to reach the full margin (0 disables warm-up).
    start_epoch : float
        :math:`t_0`, epochs trained with zero margin first.

    Examples
    --------
    >>> objective = CosFace(scale=30.0, margin=0.2)
    >>> warmup = MarginWarmup(warmup_epochs=2.0)
    >>> warmup.step(objective, 0.5)
    0.05
    >>> warmup.step(objective, 10.0)
    0.2
    """

    def __init__(self, warmup_epochs: float, start_epoch: float = 0.0):
        if warmup_epochs < 0 or start_epoch < 0:
            raise LossInputError(
                f"warmup_epochs and start_epoch must be >= 0, got {warmup_epochs!r} and {start_epoch!r}"
            )
        self.warmup_epochs = float(warmup_epochs)
        self.start_epoch = float(start_epoch)

    def fraction(self, progress: float) -> float:
        """Fraction of the final margin at ``progress`` epochs."""
        if progress < self.start_epoch:
            return 0.0
        if self.warmup_epochs == 0:
            return 1.0
        return min(1.0, (progress - self.start_epoch) / self.warmup_epochs)

    def step(self, objective: CosineMarginObjective, progress: float) -> float:
        """Set ``objective``'s margin for ``progress`` epochs; return it."""
        margin = objective.base_margin * self.fraction(progress)
        objective.update(margin)
        return margin
