r"""Calibration of verification scores to log-likelihood ratios, with quality measures (QMF).

A :class:`Calibration` is an affine map from a trial's score and optional
quality measures :math:`x` to a natural-log likelihood ratio,
:math:`\ell = a^\top x + b`, trained by logistic regression with the
prior-weighted cross-entropy at a target prior :math:`\pi` (Brümmer's
:math:`C_{llr}` objective, as BOSARIS and WeSpeaker's QMF train it):

.. math::
    \min_{a, b}\; \frac{\pi}{N_{tar}}\sum_{tar}\log(1 + e^{-(\ell + \mathrm{logit}\,\pi)})
    + \frac{1-\pi}{N_{non}}\sum_{non}\log(1 + e^{\ell + \mathrm{logit}\,\pi}).

The optimiser is scikit-learn's ``LogisticRegression`` (L-BFGS) on
standardised features with a negligible L2 penalty, which keeps a separable
development list finite.  Quality measures follow WeSpeaker's QMF: for each
measure, the smaller and the larger of the two sides' values, so the map is
symmetric in enrolment and test:

* ``duration``: log seconds of speech (the store must carry durations, as
  ``spkver embed`` and the recipe write them);
* ``norm``: the raw embedding's L2 norm;
* ``cohort_mean``: the mean of the utterance's top-k cosine scores against a
  cohort (AS-norm's statistic).

A calibration stores the fingerprint of the extractor whose embeddings it was
trained on; applying it to another extractor's scores is refused.

**What a calibration is never fitted on.** Pairs that separate perfectly (every
target above every non-target: the logistic regression's slope then grows
without bound, a map that is certain of everything and wrong on the first new
speaker) and fewer than :data:`MIN_NONTARGETS` non-target pairs (too few to see
the low false-accept rates its decisions are made at) are refused with the
reason. The score range and the quality measures' ranges it was fitted on are
recorded (``trained_on["ranges"]``); :meth:`Calibration.range_warning` says in
one line when an input falls outside them, where its LLRs are extrapolated.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> labels = np.r_[np.ones(200), np.zeros(2000)].astype(bool)
>>> scores = np.where(labels, 0.6, 0.1) + 0.1 * rng.standard_normal(labels.size)
>>> calibration = fit_calibration(scores, labels, prior=0.05)
>>> bool(calibration.llr(np.array([0.6]))[0] > 0 > calibration.llr(np.array([0.1]))[0])
True
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from spkver.errors import UserError

__all__ = ["QUALITY_MEASURES", "CalibrationError", "Calibration", "fit_calibration", "quality_features",
           "load_calibration", "check_development_pairs", "MIN_NONTARGETS", "RECALIBRATE"]

#: The quality measures a calibration can use, each giving a ``_min`` and a ``_max`` feature.
QUALITY_MEASURES = ("duration", "norm", "cohort_mean")
#: Fewest non-target pairs a calibration (or a threshold) is fitted on.
MIN_NONTARGETS = 300
#: The advice every out-of-range warning ends with.
RECALIBRATE = "calibrate on your own data with `spkver calibrate`"
#: L2 penalty on the standardised weights: negligible, but a separable development list stays finite.
_INVERSE_PENALTY = 1e6
_FORMAT = "spkver-calibration-1"


class CalibrationError(UserError, ValueError):
    """Bad input to calibration: the message names the file, measure or trial."""


@dataclass
class Calibration:
    """An affine map from ``features`` (``"score"`` first) to natural-log LLRs.

    Attributes
    ----------
    features : list of str
        ``["score"]`` then the quality features, e.g. ``"duration_min"``.
    weights : list of float
        One per feature, in the features' own units.
    bias : float
    prior : float
        The target prior the map was trained at; the default operating point.
    fingerprint : str or None
        The extractor's fingerprint (``spkver.inference.extractor_fingerprint``).
    trained_on : dict
        What it was trained on (trial counts, source, score kind, cohort top-k).
    """

    features: List[str]
    weights: List[float]
    bias: float
    prior: float
    fingerprint: Optional[str] = None
    trained_on: Dict = field(default_factory=dict)

    @property
    def measures(self) -> List[str]:
        """The quality measures the features need (``duration``, ``norm``, ``cohort_mean``)."""
        return sorted({name.rsplit("_", 1)[0] for name in self.features[1:]})

    def llr(self, scores: np.ndarray, quality: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
        """The LLRs of ``scores`` (N,) with the quality features (name -> (N,)) that ``features`` lists."""
        columns = _design_matrix(np.asarray(scores, dtype=np.float64), quality, self.features)
        return columns @ np.asarray(self.weights) + self.bias

    def scored_llrs(self, store, scored, cohort=None, mean=None, top_k: Optional[int] = None,
                    progress: bool = False) -> np.ndarray:
        """The LLRs of a :class:`spkver.scoring.ScoredTrials` of ``store``, its quality features computed here.

        ``top_k`` (for ``cohort_mean``) defaults to the AS-norm top-k the calibration was trained with.
        """
        top_k = self.trained_on.get("asnorm_topk", 300) if top_k is None else top_k
        quality = quality_features(store, scored.enroll_rows, scored.test_rows, self.measures, cohort=cohort,
                                   top_k=top_k, mean=mean, progress=progress)
        return self.llr(scored.scores, quality)

    def range_warning(self, scores: np.ndarray, seconds: Optional[np.ndarray] = None,
                      tolerance: float = 0.0) -> Optional[str]:
        """One line when more than ``tolerance`` of the trials fall outside what the calibration was fitted on.

        ``scores`` (N,) in the calibration's kind of score; ``seconds`` (N, 2): each trial's two sides'
        durations. ``None`` when every input lies inside the recorded ranges (or none are recorded).
        """
        ranges = self.trained_on.get("ranges", {})
        outside, described = np.zeros(np.size(scores), dtype=bool), []
        if "score" in ranges:
            low, high = ranges["score"]
            beyond = (np.asarray(scores) < low) | (np.asarray(scores) > high)
            if beyond.any():
                outside |= beyond
                described.append(f"scores {low:.2f} to {high:.2f}")
        if "seconds" in ranges and seconds is not None:
            low, high = ranges["seconds"]
            sides = np.asarray(seconds, dtype=np.float64).reshape(len(outside), -1)
            beyond = ((sides < low * 0.99) | (sides > high * 1.01)).any(axis=1)
            if beyond.any():
                outside |= beyond
                described.append(f"audio of {low:.1f} to {high:.1f} s")
        if not outside.any() or outside.mean() <= tolerance:
            return None
        share = "the input" if outside.size == 1 else f"{int(outside.sum())} of {outside.size} trials"
        return (f"{share} fall{'s' if outside.size == 1 else ''} outside what the calibration was fitted on "
                f"({', '.join(described)}): its LLRs are extrapolated there and may be over-confident; "
                f"{RECALIBRATE}")

    def check_fingerprint(self, fingerprint: Optional[str], what: str) -> None:
        """Refuse scores from another extractor than the one this calibration was trained on."""
        if self.fingerprint and fingerprint and fingerprint != self.fingerprint:
            raise CalibrationError(
                f"{what} comes from another extractor (fingerprint {fingerprint[:12]}) than the calibration "
                f"was trained on ({self.fingerprint[:12]}): calibrate again on this extractor's scores")

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": _FORMAT, **asdict(self)}, indent=2) + "\n")


def load_calibration(path) -> Calibration:
    """Read a ``calibration.json`` written by :meth:`Calibration.save`, checking every field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise CalibrationError(f"{path}: cannot read the calibration ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise CalibrationError(f"{path}: not a JSON calibration file (line {error.lineno}: {error.msg})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CalibrationError(f"{path}: not a spkver calibration (expected \"format\": \"{_FORMAT}\")")
    try:
        calibration = Calibration(features=list(data["features"]), weights=[float(w) for w in data["weights"]],
                                  bias=float(data["bias"]), prior=float(data["prior"]),
                                  fingerprint=data.get("fingerprint"), trained_on=dict(data.get("trained_on", {})))
    except (KeyError, TypeError, ValueError) as error:
        raise CalibrationError(f"{path}: malformed calibration ({error!r})") from None
    if not calibration.features or calibration.features[0] != "score" or \
            len(calibration.weights) != len(calibration.features):
        raise CalibrationError(f"{path}: features must start with 'score' and match the weights one to one")
    if not all(math.isfinite(w) for w in calibration.weights + [calibration.bias]):
        raise CalibrationError(f"{path}: weights and bias must be finite")
    return calibration


def _design_matrix(scores: np.ndarray, quality: Optional[Dict[str, np.ndarray]], features: Sequence[str]):
    if scores.ndim != 1:
        raise CalibrationError(f"scores must be 1-D, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise CalibrationError(f"scores must be finite; trial {bad} has {scores[bad]}")
    columns = [scores]
    quality = quality or {}
    for name in features[1:]:
        if name not in quality:
            raise CalibrationError(f"the quality feature {name!r} is missing (given: {sorted(quality) or 'none'})")
        values = np.asarray(quality[name], dtype=np.float64)
        if values.shape != scores.shape:
            raise CalibrationError(f"quality feature {name!r} has {values.shape} values for {scores.size} trials")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise CalibrationError(f"quality feature {name!r} is missing or not finite for trial {bad} "
                                   f"({values[bad]})")
        columns.append(values)
    return np.column_stack(columns)


def check_development_pairs(scores: np.ndarray, labels: np.ndarray, min_nontargets: int = MIN_NONTARGETS,
                            what: str = "a calibration") -> None:
    """Refuse pairs that cannot set a calibration or a threshold: too few non-targets, or perfect separation."""
    labels = np.asarray(labels).astype(bool)
    nontargets = int((~labels).sum())
    if nontargets < min_nontargets:
        raise CalibrationError(f"{nontargets} non-target pairs are too few for {what} (at least {min_nontargets}: it "
                               "decides at false-accept rates those pairs cannot show); add development speakers")
    if labels.any() and float(np.min(scores[labels])) > float(np.max(scores[~labels])):
        raise CalibrationError(f"the development pairs separate perfectly (every target above every non-target): "
                               f"{what} fitted on them is certain of everything and over-confident on new speakers; "
                               "calibrate on harder pairs: speakers held out of training "
                               "(calibration_speakers), or your own data")


def fit_calibration(scores, labels, quality: Optional[Dict[str, np.ndarray]] = None, prior: float = 0.01,
                    fingerprint: Optional[str] = None, trained_on: Optional[dict] = None,
                    min_nontargets: int = MIN_NONTARGETS) -> Calibration:
    """Train the score (+ quality) -> LLR map at target ``prior`` (see the module docstring).

    Pairs that separate perfectly, or fewer than ``min_nontargets`` non-targets, are refused
    (:func:`check_development_pairs`). The ranges of the scores and quality features are recorded in
    ``trained_on["ranges"]`` (a ``"seconds"`` range given in ``trained_on`` is kept).
    """
    from sklearn.linear_model import LogisticRegression

    if not 0.0 < prior < 1.0:
        raise CalibrationError(f"prior must lie in (0, 1), got {prior!r}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise CalibrationError(f"scores and labels must have the same length, got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise CalibrationError("labels must be 0 (non-target) or 1 (target)")
    labels = labels.astype(bool)
    targets = int(labels.sum())
    if targets == 0 or targets == labels.size:
        raise CalibrationError(f"a calibration list needs both targets and non-targets; it has {targets} targets "
                               f"and {labels.size - targets} non-targets")
    check_development_pairs(scores, labels, min_nontargets)
    names = ["score"] + sorted(quality or {})
    design = _design_matrix(scores, quality, names)
    ranges = {name: [float(design[:, i].min()), float(design[:, i].max())] for i, name in enumerate(names)}
    centre, spread = design.mean(axis=0), design.std(axis=0)
    constant = spread == 0
    if constant[0]:
        raise CalibrationError("every score is the same: nothing to calibrate")
    if constant.any():  # a measure equal on every trial carries no information: dropped
        keep = ~constant
        names = [n for n, k in zip(names, keep) if k]
        design, centre, spread = design[:, keep], centre[keep], spread[keep]
    weight = np.where(labels, prior / targets, (1.0 - prior) / (labels.size - targets)) * labels.size
    model = LogisticRegression(C=_INVERSE_PENALTY, max_iter=1000, tol=1e-8)
    model.fit((design - centre) / spread, labels, sample_weight=weight)
    slopes = model.coef_[0] / spread
    bias = float(model.intercept_[0] - slopes @ centre) - math.log(prior / (1.0 - prior))
    summary = {"trials": int(labels.size), "targets": targets, **(trained_on or {})}
    summary["ranges"] = {**ranges, **summary.get("ranges", {})}
    return Calibration(features=names, weights=[float(w) for w in slopes], bias=bias, prior=prior,
                       fingerprint=fingerprint, trained_on=summary)


def quality_features(store, enroll_rows: np.ndarray, test_rows: np.ndarray, measures: Sequence[str],
                     cohort=None, top_k: int = 300, mean=None, progress: bool = False) -> Dict[str, np.ndarray]:
    """The ``{measure}_min`` / ``{measure}_max`` features of trials given as rows of ``store``.

    ``store`` is a :class:`spkver.scoring.EmbeddingStore`; ``cohort`` is needed
    for ``cohort_mean``, durations in the store for ``duration``.
    """
    from spkver.scoring import adaptive_normalisation_stats

    unknown = sorted(set(measures) - set(QUALITY_MEASURES))
    if unknown:
        raise CalibrationError(f"unknown quality measure(s) {unknown}; choose from {list(QUALITY_MEASURES)}")
    used = np.unique(np.concatenate([enroll_rows, test_rows]))
    features = {}
    for measure in measures:
        if measure == "duration":
            if store.durations is None:
                raise CalibrationError(f"{store.source}: the 'duration' measure needs durations in the store "
                                       "(spkver embed writes them)")
            per_utterance = np.log(np.maximum(store.durations.astype(np.float64), 1e-3))
        elif measure == "norm":
            per_utterance = np.linalg.norm(store.embeddings.astype(np.float64), axis=1)
        else:
            if cohort is None:
                raise CalibrationError("the 'cohort_mean' measure needs a cohort (--cohort)")
            per_utterance = adaptive_normalisation_stats(store, cohort, top_k, rows=used, mean=mean,
                                                         progress=progress)[0].astype(np.float64)
        first, second = per_utterance[enroll_rows], per_utterance[test_rows]
        features[f"{measure}_min"] = np.minimum(first, second)
        features[f"{measure}_max"] = np.maximum(first, second)
    return features
