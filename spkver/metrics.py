r"""Verification metrics on the exact ROC: EER, minDCF, TAR at FAR, DET curves; and of calibration.

Numpy (minCllr's pool-adjacent-violators is scikit-learn's isotonic regression); every ROC metric
sorts the scores once (:math:`O(n \log n)`) and reads
the error rates at every distinct threshold — no sampling of thresholds, ties
handled as groups.  A trial is accepted when its score is ``>= threshold``:

.. math::
    P_{miss}(t) = \frac{\#\{\text{targets} < t\}}{N_{tar}}, \qquad
    P_{fa}(t) = \frac{\#\{\text{non-targets} \ge t\}}{N_{non}},

for ``t`` over the distinct scores plus :math:`+\infty` (reject everything).
Metrics know nothing of embeddings; :mod:`spkver.scoring` produces the scores.

Calibration metrics read scores as log-likelihood ratios (natural log):
:func:`cllr` is the prior-averaged cross-entropy of Brümmer and du Preez,

.. math::
    C_{llr} = \frac{1}{2}\Big[\frac{1}{N_{tar}}\sum_{tar}\log_2(1 + e^{-\ell})
              + \frac{1}{N_{non}}\sum_{non}\log_2(1 + e^{\ell})\Big],

1 for an uninformative system that always says :math:`\ell = 0`;
:func:`min_cllr` is its value after the best monotone recalibration (PAV);
:func:`actual_dcf` the normalised cost of the Bayes decisions :math:`\ell \ge
\log\frac{c_{fa}(1-p)}{c_{miss}\,p}` (against :func:`min_dcf`, the cost at the
best threshold in hindsight).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from spkver.errors import UserError

__all__ = [
    "RocCurve",
    "OperatingPoint",
    "roc_curve",
    "eer",
    "min_dcf",
    "tar_at_far",
    "det_curve",
    "plot_det",
    "cllr",
    "min_cllr",
    "bayes_threshold",
    "actual_dcf",
    "bayes_error_curve",
    "plot_bayes_error",
]


class MetricsError(UserError, ValueError):
    """Scores or labels that no metric can be computed on (empty, non-finite, one class only)."""


@dataclass
class RocCurve:
    """Error rates at every distinct threshold, thresholds increasing.

    Attributes
    ----------
    thresholds : ndarray (T,)
        Distinct scores, then ``+inf``.
    p_miss, p_fa : ndarray (T,)
        Miss and false-acceptance rates when accepting ``score >= threshold``.
    num_targets, num_nontargets : int
    """

    thresholds: np.ndarray
    p_miss: np.ndarray
    p_fa: np.ndarray
    num_targets: int
    num_nontargets: int


@dataclass
class OperatingPoint:
    """True-acceptance rate at a false-acceptance rate.

    ``tar`` and ``threshold`` are ``None`` when the trial list has fewer than
    ``1/far`` non-target trials: that FAR cannot be measured on it.
    """

    far: float
    tar: Optional[float]
    threshold: Optional[float]
    num_nontargets: int

    @property
    def defined(self) -> bool:
        return self.tar is not None


def _check_scores_labels(scores, labels) -> Tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise MetricsError(f"scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise MetricsError("no trials: scores is empty")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise MetricsError(f"scores must be finite; trial {bad} has {scores[bad]}")
    if labels.dtype == bool:
        labels = labels.astype(np.int8)
    if not np.isin(labels, (0, 1)).all():
        bad = int(np.flatnonzero(~np.isin(labels, (0, 1)))[0])
        raise MetricsError(f"labels must be 0 (non-target) or 1 (target); trial {bad} has {labels[bad]!r}")
    return scores, labels.astype(bool)


def roc_curve(scores, labels) -> RocCurve:
    """The exact ROC of a trial list.

    Examples
    --------
    >>> roc = roc_curve([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1])
    >>> roc.thresholds.tolist(), roc.p_miss.tolist(), roc.p_fa.tolist()
    ([0.1, 0.4, 0.8, inf], [0.0, 0.0, 0.5, 1.0], [1.0, 0.5, 0.0, 0.0])
    """
    scores, labels = _check_scores_labels(scores, labels)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    num_targets = int(sorted_labels.sum())
    num_nontargets = sorted_labels.size - num_targets
    # First index of each group of equal scores; counts strictly below it.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    targets_below = np.r_[0, np.cumsum(sorted_labels)][starts]
    nontargets_below = starts - targets_below
    thresholds = np.r_[sorted_scores[starts], np.inf]
    misses = np.r_[targets_below, num_targets]
    false_accepts = num_nontargets - np.r_[nontargets_below, num_nontargets]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_miss = misses / num_targets if num_targets else np.full(thresholds.shape, np.nan)
        p_fa = false_accepts / num_nontargets if num_nontargets else np.full(thresholds.shape, np.nan)
    return RocCurve(thresholds, p_miss, p_fa, num_targets, num_nontargets)


def _require_both_classes(roc: RocCurve, metric: str) -> None:
    if roc.num_targets == 0 or roc.num_nontargets == 0:
        raise MetricsError(
            f"{metric} is undefined: the trials have {roc.num_targets} targets and "
            f"{roc.num_nontargets} non-targets (both are needed)"
        )


def eer(scores, labels) -> Tuple[float, float]:
    r"""Equal error rate and its threshold.

    The ROC's operating points are joined by straight lines and the EER is
    where that line crosses :math:`P_{miss} = P_{fa}` (the usual definition
    of Kaldi, SpeechBrain and WeSpeaker, without their threshold sampling);
    the threshold is interpolated the same way.

    Examples
    --------
    >>> eer([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    (0.5, 0.3)
    >>> eer([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])[0]
    0.0
    """
    roc = roc_curve(scores, labels)
    _require_both_classes(roc, "EER")
    difference = roc.p_miss - roc.p_fa  # increasing with the threshold
    i = int(np.searchsorted(difference, 0.0, side="left"))
    if i < difference.size and difference[i] == 0.0:
        threshold = roc.thresholds[i]
        if not np.isfinite(threshold):
            threshold = roc.thresholds[i - 1]
        return float(roc.p_miss[i]), float(threshold)
    lo, hi = i - 1, i  # difference[lo] < 0 < difference[hi]
    step_miss = roc.p_miss[hi] - roc.p_miss[lo]
    step_fa = roc.p_fa[hi] - roc.p_fa[lo]
    t = (roc.p_fa[lo] - roc.p_miss[lo]) / (step_miss - step_fa)
    rate = roc.p_miss[lo] + t * step_miss
    high = roc.thresholds[hi] if np.isfinite(roc.thresholds[hi]) else roc.thresholds[lo]
    return float(rate), float(roc.thresholds[lo] + t * (high - roc.thresholds[lo]))


def min_dcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> Tuple[float, float]:
    r"""Normalised minimum detection cost and its threshold.

    .. math::
        \min_t \frac{c_{miss} P_{miss}(t)\, p + c_{fa} P_{fa}(t)\,(1 - p)}
                    {\min(c_{miss}\, p,\; c_{fa}(1 - p))}

    as NIST SRE and WeSpeaker report it (1.0 is the cost of always
    accepting or always rejecting, whichever is cheaper).

    Examples
    --------
    >>> min_dcf([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], p_target=0.01)
    (0.0, 0.8)
    """
    if not 0.0 < p_target < 1.0:
        raise MetricsError(f"p_target must lie in (0, 1), got {p_target!r}")
    if c_miss <= 0 or c_fa <= 0:
        raise MetricsError(f"c_miss and c_fa must be > 0, got {c_miss!r} and {c_fa!r}")
    roc = roc_curve(scores, labels)
    _require_both_classes(roc, "minDCF")
    cost = c_miss * p_target * roc.p_miss + c_fa * (1.0 - p_target) * roc.p_fa
    best = int(np.argmin(cost))
    return float(cost[best] / min(c_miss * p_target, c_fa * (1.0 - p_target))), float(roc.thresholds[best])


def tar_at_far(scores, labels, fars: Iterable[float] = (1e-2, 1e-3, 1e-4, 1e-5)) -> list:
    """True-acceptance rate at each false-acceptance rate.

    For each ``far`` the lowest threshold whose :math:`P_{fa}` does not exceed
    it gives the highest TAR.  A FAR needs at least ``1/far`` non-target trials
    to be measured; below that the point is returned undefined (``tar=None``).

    Examples
    --------
    >>> [p.tar for p in tar_at_far([0.1, 0.2, 0.8, 0.9] + [0.0] * 98, [0, 0, 1, 1] + [0] * 98, fars=(0.01, 0.001))]
    [1.0, None]
    """
    roc = roc_curve(scores, labels)
    _require_both_classes(roc, "TAR@FAR")
    points = []
    for far in fars:
        if not 0.0 < far < 1.0:
            raise MetricsError(f"every FAR must lie in (0, 1), got {far!r}")
        if roc.num_nontargets * far < 1.0 - 1e-9:
            points.append(OperatingPoint(far, None, None, roc.num_nontargets))
            continue
        allowed = np.flatnonzero(roc.p_fa <= far + 1e-12)[0]  # p_fa decreases with the threshold
        points.append(OperatingPoint(far, float(1.0 - roc.p_miss[allowed]),
                                     float(roc.thresholds[allowed]), roc.num_nontargets))
    return points


def det_curve(scores, labels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p_fa, p_miss, thresholds)`` of the exact ROC, for DET plots."""
    roc = roc_curve(scores, labels)
    _require_both_classes(roc, "the DET curve")
    return roc.p_fa, roc.p_miss, roc.thresholds


def plot_det(curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], path,
             title: str = "DET curve") -> None:
    """Write a DET plot (probit axes, 0.01 % to 50 %) of ``{name: (p_fa, p_miss)}`` to ``path``.

    Needs matplotlib (``pip install 'spkver[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("DET plots need matplotlib: pip install 'spkver[plot]'") from None
    from scipy.stats import norm

    ticks = np.array([1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    labels = [f"{100 * t:g}" for t in ticks]
    clip = (ticks[0] / 2, 1 - 1e-6)
    figure, axes = plt.subplots(figsize=(5.5, 5.5))
    for name, (p_fa, p_miss) in curves.items():
        axes.plot(norm.ppf(np.clip(p_fa, *clip)), norm.ppf(np.clip(p_miss, *clip)), label=name, linewidth=1.5)
    axes.plot(norm.ppf(ticks), norm.ppf(ticks), color="0.7", linestyle=":", linewidth=1, label="EER line")
    for setter, ticker in ((axes.set_xticks, axes.set_xticklabels), (axes.set_yticks, axes.set_yticklabels)):
        setter(norm.ppf(ticks))
        ticker(labels)
    axes.set_xlim(norm.ppf(ticks[0]), norm.ppf(0.5))
    axes.set_ylim(norm.ppf(ticks[0]), norm.ppf(0.5))
    axes.set_xlabel("False acceptance rate (%)")
    axes.set_ylabel("Miss rate (%)")
    axes.set_title(title)
    axes.grid(True, linewidth=0.4, alpha=0.6)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _check_both_classes(labels: np.ndarray, metric: str) -> None:
    targets = int(labels.sum())
    if targets == 0 or targets == labels.size:
        raise MetricsError(f"{metric} is undefined: the trials have {targets} targets and "
                         f"{labels.size - targets} non-targets (both are needed)")


def cllr(llrs, labels) -> float:
    r"""The log-likelihood-ratio cost :math:`C_{llr}` in bits (see the module docstring).

    Examples
    --------
    >>> cllr([0.0, 0.0], [1, 0])  # an uninformative system
    1.0
    >>> round(cllr([10.0, -10.0], [1, 0]), 6)
    6.5e-05
    """
    llrs, labels = _check_scores_labels(llrs, labels)
    _check_both_classes(labels, "Cllr")
    miss_cost = np.logaddexp(0.0, -llrs[labels]).mean()
    false_alarm_cost = np.logaddexp(0.0, llrs[~labels]).mean()
    return float(0.5 * (miss_cost + false_alarm_cost) / np.log(2.0))


def min_cllr(scores, labels) -> float:
    r""":math:`C_{llr}` after the best monotone map of the scores to LLRs: the discrimination part.

    The pool-adjacent-violators algorithm (scikit-learn's isotonic
    regression, ties pooled) gives the posterior of each score at the list's
    own proportion of targets :math:`\pi`; the LLR is its log-odds minus
    :math:`\mathrm{logit}\,\pi`.  ``cllr - min_cllr`` is the calibration loss.

    Examples
    --------
    >>> min_cllr([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])  # separable: no cost once calibrated
    0.0
    """
    from sklearn.isotonic import IsotonicRegression

    scores, labels = _check_scores_labels(scores, labels)
    _check_both_classes(labels, "minCllr")
    posterior = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(scores, labels)
    prior = labels.mean()
    with np.errstate(divide="ignore"):
        # A block of targets only has posterior 1 (LLR +inf) and costs a target nothing, and so on.
        log_odds = np.log(posterior) - np.log1p(-posterior)
    llrs = log_odds - np.log(prior / (1.0 - prior))
    miss_cost = np.logaddexp(0.0, -llrs[labels]).mean()
    false_alarm_cost = np.logaddexp(0.0, llrs[~labels]).mean()
    return float(0.5 * (miss_cost + false_alarm_cost) / np.log(2.0))


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise MetricsError(f"p_target must lie in (0, 1), got {p_target!r}")
    if c_miss <= 0 or c_fa <= 0:
        raise MetricsError(f"c_miss and c_fa must be > 0, got {c_miss!r} and {c_fa!r}")


def bayes_threshold(p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    r"""The LLR above which accepting costs less: :math:`\log\frac{c_{fa}(1-p)}{c_{miss}\,p}`.

    >>> round(bayes_threshold(0.01), 4)
    4.5951
    """
    _check_costs(p_target, c_miss, c_fa)
    return float(np.log(c_fa * (1.0 - p_target)) - np.log(c_miss * p_target))


def actual_dcf(llrs, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    r"""Normalised detection cost of accepting every trial with ``llr >= bayes_threshold(...)``.

    Normalised as :func:`min_dcf` is, so ``actual_dcf >= min_dcf`` and the gap is
    what miscalibration costs at that operating point.

    >>> actual_dcf([5.0, 3.0, -6.0, -5.0], [1, 1, 0, 0], p_target=0.01)  # the target at 3 is missed
    0.5
    """
    _check_costs(p_target, c_miss, c_fa)
    llrs, labels = _check_scores_labels(llrs, labels)
    _check_both_classes(labels, "actDCF")
    accept = llrs >= bayes_threshold(p_target, c_miss, c_fa)
    p_miss = float(np.mean(~accept[labels]))
    p_fa = float(np.mean(accept[~labels]))
    cost = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return cost / min(c_miss * p_target, c_fa * (1.0 - p_target))


def bayes_error_curve(llrs, labels, prior_log_odds=None) -> Dict[str, np.ndarray]:
    r"""Actual and minimum normalised DCF (unit costs) over effective priors: the APE curve's data.

    ``prior_log_odds`` defaults to 61 points in [-7, 7] (priors 0.001 to 0.999).
    Returns ``{"prior_log_odds", "actual", "minimum"}``; the minimum is that
    of the scores' ranking, whatever their calibration.
    """
    llrs, labels = _check_scores_labels(llrs, labels)
    _check_both_classes(labels, "the Bayes error-rate curve")
    grid = np.linspace(-7.0, 7.0, 61) if prior_log_odds is None else np.asarray(prior_log_odds, dtype=np.float64)
    priors = 1.0 / (1.0 + np.exp(-grid))
    roc = roc_curve(llrs, labels)
    actual, minimum = np.empty(grid.size), np.empty(grid.size)
    for i, (log_odds, prior) in enumerate(zip(grid, priors)):
        # Accepting llr >= -log_odds has the error rates of the first ROC threshold at or above it
        # (no score lies between): one search in the curve the minimum reads too.
        at = int(np.searchsorted(roc.thresholds, -log_odds, side="left"))
        norm = min(prior, 1.0 - prior)
        actual[i] = (prior * roc.p_miss[at] + (1.0 - prior) * roc.p_fa[at]) / norm
        minimum[i] = np.min(prior * roc.p_miss + (1.0 - prior) * roc.p_fa) / norm
    return {"prior_log_odds": grid, "actual": actual, "minimum": minimum}


def plot_bayes_error(curves: Dict[str, Dict[str, np.ndarray]], path, title: str = "Normalised Bayes error rate",
                     mark: Optional[float] = None) -> None:
    """Draw :func:`bayes_error_curve` results (actual solid, minimum dashed) into ``path`` (needs matplotlib).

    ``mark`` draws a vertical line at a prior log-odds (the calibration's operating point).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("calibration plots need matplotlib: pip install 'spkver[plot]'") from None
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for index, (name, curve) in enumerate(curves.items()):
        colour = f"C{index}"
        axes.plot(curve["prior_log_odds"], curve["actual"], color=colour, label=f"{name}: actual DCF")
        axes.plot(curve["prior_log_odds"], curve["minimum"], color=colour, linestyle="--", label=f"{name}: minimum DCF")
    if mark is not None:
        axes.axvline(mark, color="grey", linewidth=0.8, linestyle=":")
    axes.axhline(1.0, color="black", linewidth=0.6)
    axes.set_xlabel("prior log-odds  logit(P_target)")
    axes.set_ylabel("normalised DCF")
    axes.set_ylim(0.0, 1.2)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
