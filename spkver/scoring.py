r"""Embedding stores, trial lists, cosine scoring and AS-norm.

Embedding store format: a ``.npz`` file with two arrays, ``ids`` (N,) of
strings and ``embeddings`` (N, D) float32 (and optionally ``durations`` (N,)
in seconds and the extractor's ``fingerprint``, which calibration uses); numpy, SciPy, WeSpeaker-style
scripts and anything that reads NumPy archives can open it.  A folder of
``.npy`` files (one vector each, the ID being the path relative to the folder)
is read too.  IDs are utterance paths as in VoxCeleb trial lists
(``id10270/5r0dWxy17C8/00001.wav``); an audio or ``.npy`` extension is ignored
when IDs are matched, so ``id10270/5r0dWxy17C8/00001`` matches as well.

Scoring is vectorised over trials: IDs are mapped to rows once, embeddings are
centred (optionally) and L2-normalised once, and trials are scored in chunks of
row-wise dot products so memory stays bounded.

AS-norm (adaptive symmetric score normalisation, Matějka et al. 2017): for
each utterance :math:`u` the mean :math:`\mu_u` and standard deviation
:math:`\sigma_u` of its top-:math:`k` cosine scores against a cohort, then

.. math::
    \tilde s(e, t) = \tfrac12\left(\frac{s - \mu_e}{\sigma_e} + \frac{s - \mu_t}{\sigma_t}\right).
"""
from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from spkver.errors import UserError

__all__ = [
    "ScoringError",
    "Stage",
    "score_stages",
    "read_enrolment_map",
    "with_enrolment",
    "mapped_stage",
    "EmbeddingStore",
    "Trials",
    "utterance_key",
    "save_embeddings",
    "load_embeddings",
    "read_trials",
    "cosine_scores",
    "speaker_mean_cohort",
    "adaptive_normalisation_stats",
    "as_norm",
]

_IGNORED_EXTENSIONS = (".wav", ".flac", ".m4a", ".mp3", ".ogg", ".npy")
#: Trials scored per chunk: bounds the gathered (chunk, D) matrices.
_TRIAL_CHUNK = 65536
#: Utterances per chunk of the (chunk, cohort) score matrix in AS-norm.
_COHORT_CHUNK = 4096


class ScoringError(UserError, ValueError):
    """Bad input to scoring: the message names the file, line or IDs."""


def utterance_key(utterance_id: str) -> str:
    """The ID used for matching: POSIX separators, no leading ``./``, no audio/.npy extension.

    >>> utterance_key("./id10270/5r0dWxy17C8/00001.wav")
    'id10270/5r0dWxy17C8/00001'
    """
    key = utterance_id.replace(os.sep, "/")
    while key.startswith("./"):
        key = key[2:]
    for extension in _IGNORED_EXTENSIONS:
        if key.endswith(extension):
            return key[: -len(extension)]
    return key


@dataclass
class EmbeddingStore:
    """Embeddings keyed by utterance ID.

    Attributes
    ----------
    ids : list of str
    embeddings : ndarray (N, D) float32
    source : str
        Where the store came from, for error messages.
    durations : ndarray (N,) float32, optional
        Seconds of audio behind each embedding (a calibration quality measure).
    fingerprint : str, optional
        The extractor that made the embeddings (``spkver.inference.extractor_fingerprint``).
    mean : ndarray (D,) float32, optional
        The extractor's mean embedding (its folder's ``mean_embedding.npy``), recorded by
        ``spkver embed``: ``spkver score`` subtracts it, as the recipe's evaluation does.
    """

    ids: List[str]
    embeddings: np.ndarray
    source: str = "<memory>"
    durations: Optional[np.ndarray] = None
    fingerprint: Optional[str] = None
    mean: Optional[np.ndarray] = None

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.ids):
            raise ScoringError(
                f"{self.source}: embeddings must be (N, D) with one row per ID; "
                f"got {self.embeddings.shape} for {len(self.ids)} IDs"
            )
        if self.durations is not None:
            self.durations = np.asarray(self.durations, dtype=np.float32)
            if self.durations.shape != (len(self.ids),):
                raise ScoringError(f"{self.source}: durations must be one per ID; got {self.durations.shape} "
                                   f"for {len(self.ids)} IDs")
        if self.mean is not None:
            self.mean = np.asarray(self.mean, dtype=np.float32)
            if self.mean.shape != (self.embeddings.shape[1],):
                raise ScoringError(f"{self.source}: the mean embedding has shape {self.mean.shape}, the embeddings "
                                   f"{self.embeddings.shape[1]} dimensions")
        self._index: Optional[Dict[str, int]] = None

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def index(self) -> Dict[str, int]:
        if self._index is None:
            self._index = {}
            for row, utterance_id in enumerate(self.ids):
                key = utterance_key(utterance_id)
                if key in self._index:
                    raise ScoringError(f"{self.source}: utterance ID {utterance_id!r} appears twice")
                self._index[key] = row
        return self._index

    def rows(self, utterance_ids: Sequence[str]) -> Tuple[np.ndarray, List[str]]:
        """Row of each ID (-1 where missing) and the list of distinct missing IDs."""
        # Trial lists name each utterance many times: look up every distinct ID once.
        codes: Dict[str, int] = {}
        code_of = np.fromiter((codes.setdefault(u, len(codes)) for u in utterance_ids),
                              dtype=np.int64, count=len(utterance_ids))
        index = self.index
        distinct = list(codes)
        distinct_rows = np.fromiter((index.get(utterance_key(u), -1) for u in distinct),
                                    dtype=np.int64, count=len(distinct))
        missing = [distinct[i] for i in np.flatnonzero(distinct_rows < 0)]
        return distinct_rows[code_of], missing

    def check_finite_and_nonzero(self, rows: Optional[np.ndarray] = None) -> None:
        """Raise naming the first IDs whose embeddings are NaN/inf or of zero norm."""
        subset = self.embeddings if rows is None else self.embeddings[rows]
        ids = self.ids if rows is None else [self.ids[r] for r in rows]
        finite = np.isfinite(subset).all(axis=1)
        if not finite.all():
            bad = [ids[i] for i in np.flatnonzero(~finite)[:5]]
            raise ScoringError(f"{self.source}: {int((~finite).sum())} embeddings contain NaN or inf "
                               f"(first: {', '.join(bad)})")
        zero = ~np.any(subset != 0, axis=1)
        if zero.any():
            bad = [ids[i] for i in np.flatnonzero(zero)[:5]]
            raise ScoringError(f"{self.source}: {int(zero.sum())} embeddings have zero norm "
                               f"(first: {', '.join(bad)}); cosine scoring needs a direction")


def save_embeddings(path, ids: Sequence[str], embeddings, durations=None, fingerprint: Optional[str] = None,
                    mean=None) -> None:
    """Write an embedding store (``.npz`` with ``ids`` and ``embeddings``; ``durations``, ``fingerprint`` and the
    extractor's ``mean`` embedding if given)."""
    store = EmbeddingStore(list(ids), embeddings, str(path), durations, fingerprint, mean)  # checks the shapes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    extra = {} if durations is None else {"durations": store.durations}
    if fingerprint is not None:
        extra["fingerprint"] = np.asarray(fingerprint)
    if mean is not None:
        extra["mean"] = store.mean
    np.savez(tmp, ids=np.asarray(store.ids, dtype=str), embeddings=store.embeddings, **extra)
    os.replace(tmp, path)


def load_embeddings(path) -> EmbeddingStore:
    """Read an embedding store: a ``.npz`` file (``ids``, ``embeddings``) or a folder of ``.npy`` files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.npy"))
        if not files:
            raise ScoringError(f"{path}: no .npy files in this folder")
        vectors = []
        for file in files:
            vector = np.load(file)
            if vector.ndim == 2 and vector.shape[0] == 1:
                vector = vector[0]
            if vector.ndim != 1:
                raise ScoringError(f"{file}: expected one embedding vector, got shape {vector.shape}")
            vectors.append(vector)
        dims = {v.shape[0] for v in vectors}
        if len(dims) > 1:
            raise ScoringError(f"{path}: embeddings of different dimensions {sorted(dims)}")
        ids = [file.relative_to(path).as_posix()[: -len(".npy")] for file in files]
        return EmbeddingStore(ids, np.stack(vectors), source=str(path))
    if not path.exists():
        raise ScoringError(f"{path}: no such embedding store")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "ids" not in archive or "embeddings" not in archive:
                raise ScoringError(f"{path}: an embedding store needs arrays 'ids' and 'embeddings', "
                                   f"found {sorted(archive.files)}")
            ids = archive["ids"].astype(str).tolist()
            embeddings = archive["embeddings"]
            durations = archive["durations"] if "durations" in archive else None
            fingerprint = str(archive["fingerprint"]) if "fingerprint" in archive else None
            mean = archive["mean"] if "mean" in archive else None
    except (OSError, ValueError) as error:
        if isinstance(error, ScoringError):
            raise
        raise ScoringError(f"{path}: not a readable .npz embedding store ({error})") from None
    return EmbeddingStore(ids, embeddings, source=str(path), durations=durations, fingerprint=fingerprint, mean=mean)


def _text_of(path: Path, what: str) -> str:
    """The text of a list file, or a :class:`ScoringError` naming it and why it cannot be read."""
    try:
        return path.read_text()
    except OSError as error:
        raise ScoringError(f"{path}: cannot read {what} ({error.strerror})") from None


def read_enrolment_map(path) -> Dict[str, List[str]]:
    """An enrolment map: ``speaker file file ...`` lines (CN-Celeb's ``enroll.map``), speaker -> utterance IDs.

    Errors name the file and line; a speaker listed twice is an error, not a silent merge.
    """
    path = Path(path)
    text = _text_of(path, "the enrolment map")
    enrolment: Dict[str, List[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ScoringError(f"{path}:{number}: expected 'speaker file [file ...]', got {line!r}")
        if fields[0] in enrolment:
            raise ScoringError(f"{path}:{number}: speaker {fields[0]!r} is listed twice")
        enrolment[fields[0]] = fields[1:]
    if not enrolment:
        raise ScoringError(f"{path}: the enrolment map is empty")
    return enrolment


def with_enrolment(store: EmbeddingStore, enrolment: Dict[str, List[str]], mean=None,
                   source: str = "the enrolment map") -> EmbeddingStore:
    r"""The store with one entry per enrolled speaker: the mean of its files' normalised embeddings.

    .. math:: e_s = \frac{1}{|F_s|} \sum_{f \in F_s} \frac{x_f - \mu}{\lVert x_f - \mu \rVert}

    stored as :math:`e_s + \mu`, so that every scoring stage, which subtracts :math:`\mu`, scores
    :math:`e_s` (cosine, AS-norm and calibration alike); its duration, for calibration's quality
    measure, is the sum of its files'. A speaker name that is also an utterance ID, or a file
    without an embedding, is an error naming both.
    """
    mean = _check_mean(mean, store.dim)
    names = list(enrolment)
    clashes = [name for name in names if utterance_key(name) in store.index]
    if clashes:
        raise ScoringError(f"{source}: speaker {clashes[0]!r} is also an utterance ID of {store.source}")
    vectors, durations = [], []
    for name in names:
        rows, missing = store.rows(enrolment[name])
        if missing:
            raise ScoringError(f"{source}: speaker {name!r}: {len(missing)} files have no embedding in "
                               f"{store.source} (first: {', '.join(missing[:3])})")
        enrolled = _normalised(store.embeddings[rows], mean, store, rows).mean(axis=0)
        vectors.append(enrolled if mean is None else enrolled + mean)
        durations.append(float(store.durations[rows].sum()) if store.durations is not None else 0.0)
    return EmbeddingStore(store.ids + names, np.concatenate([store.embeddings, np.stack(vectors)]), store.source,
                          None if store.durations is None else np.concatenate([store.durations, durations]),
                          store.fingerprint, store.mean)


@dataclass
class Trials:
    """A trial list: enrolment and test IDs, with labels (1 target, 0 non-target) when given."""

    enroll: List[str]
    test: List[str]
    labels: Optional[np.ndarray]
    source: str = "<memory>"

    def __len__(self):
        return len(self.enroll)

    def subset(self, keep: np.ndarray) -> "Trials":
        index = np.flatnonzero(keep)
        return Trials([self.enroll[i] for i in index], [self.test[i] for i in index],
                      None if self.labels is None else self.labels[index], self.source)


def read_trials(path) -> Trials:
    """Read a VoxCeleb trial list: ``label enroll test`` lines, or ``enroll test`` lines (no labels).

    Every line must have the same number of columns; blank lines are skipped.
    Errors name the file and line.
    """
    path = Path(path)
    text = _text_of(path, "trial list")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ScoringError(f"{path}: the trial list is empty")
    columns = len(lines[0].split())
    tokens = text.split()
    if columns in (2, 3) and len(tokens) == columns * len(lines) and \
            (columns == 2 or set(tokens[0::3]) <= {"0", "1"}) and \
            all(line.count(" ") + line.count("\t") == columns - 1 for line in lines):
        # Well-formed (the common case): slice the tokens instead of parsing line by line.
        labels = None if columns == 2 else np.asarray(tokens[0::3]) == "1"
        return Trials(tokens[columns - 2::columns], tokens[columns - 1::columns], labels, str(path))
    return _read_trials_line_by_line(path, text)


def _read_trials_line_by_line(path: Path, text: str) -> Trials:
    """The careful parser: finds and names the first malformed line."""
    enroll, test, labels = [], [], []
    columns = None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if columns is None:
            columns = len(fields)
            if columns not in (2, 3):
                raise ScoringError(f"{path}:{number}: expected 'label enroll test' or 'enroll test', got {line!r}")
        if len(fields) != columns:
            raise ScoringError(f"{path}:{number}: expected {columns} columns like the first line, got {line!r}")
        if columns == 3:
            label = fields[0]
            if label not in ("0", "1"):
                raise ScoringError(f"{path}:{number}: label must be 0 or 1, got {label!r}")
            labels.append(label == "1")
        enroll.append(fields[-2])
        test.append(fields[-1])
    return Trials(enroll, test, np.asarray(labels, dtype=bool) if columns == 3 else None, str(path))


def _normalised(embeddings: np.ndarray, mean: Optional[np.ndarray], store: Optional[EmbeddingStore] = None,
                rows: Optional[np.ndarray] = None) -> np.ndarray:
    """L2-normalised (centred) rows; NaN/inf or zero rows raise, naming their IDs when ``store`` is given."""
    centred = embeddings if mean is None else embeddings - mean
    norms = np.sqrt(np.einsum("ij,ij->i", centred, centred, dtype=np.float64))[:, None]
    if not (np.isfinite(norms) & (norms > 0)).all():  # NaN and inf reach the norm: one cheap test
        if store is not None:
            store.check_finite_and_nonzero(rows)
        raise ScoringError("an embedding equals the subtracted mean: its direction is undefined")
    return (centred / norms).astype(np.float32)


def _check_mean(mean, dim: int) -> Optional[np.ndarray]:
    if mean is None:
        return None
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    if mean.shape != (dim,):
        raise ScoringError(f"the mean embedding has dimension {mean.shape[0]}, the embeddings {dim}")
    if not np.isfinite(mean).all():
        raise ScoringError("the mean embedding contains NaN or inf")
    return mean


@dataclass
class ScoredTrials:
    """Scores of the trials that could be scored, with what was skipped."""

    trials: Trials
    scores: np.ndarray
    num_skipped: int
    #: Each scored trial's rows in the store (for per-utterance measures such as calibration's quality).
    enroll_rows: Optional[np.ndarray] = None
    test_rows: Optional[np.ndarray] = None


def _trial_rows(store: EmbeddingStore, trials: Trials, allow_missing: bool):
    enroll_rows, missing_enroll = store.rows(trials.enroll)
    test_rows, missing_test = store.rows(trials.test)
    keep = (enroll_rows >= 0) & (test_rows >= 0)
    if not keep.all():
        missing = sorted(set(missing_enroll) | set(missing_test))
        if not allow_missing:
            raise ScoringError(
                f"{trials.source}: {len(missing)} utterances have no embedding in {store.source} "
                f"(first: {', '.join(missing[:5])}); pass --allow-missing to skip their trials"
            )
        trials = trials.subset(keep)
        enroll_rows, test_rows = enroll_rows[keep], test_rows[keep]
        if not len(trials):
            raise ScoringError(f"{trials.source}: no trial has both embeddings in {store.source}")
    return trials, enroll_rows, test_rows, int((~keep).sum())


def cosine_scores(store: EmbeddingStore, trials: Trials, mean=None, allow_missing: bool = False,
                  normalisation=None) -> ScoredTrials:
    """Cosine score of every trial, vectorised and chunked.

    Parameters
    ----------
    mean : array (D,), optional
        Subtracted from every embedding before L2 normalisation (e.g. the
        training-set mean).
    allow_missing : bool
        Skip trials whose utterances have no embedding instead of raising.
    normalisation : tuple of (mean, std) arrays, optional
        Per-row AS-norm statistics from :func:`adaptive_normalisation_stats`,
        indexed like ``store``.

    Examples
    --------
    >>> store = EmbeddingStore(["a.wav", "b.wav", "c.wav"], [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    >>> cosine_scores(store, Trials(["a.wav", "a.wav"], ["b.wav", "c.wav"], None)).scores.round(4)
    array([0.7071, 0.    ], dtype=float32)
    """
    trials, enroll_rows, test_rows, skipped = _trial_rows(store, trials, allow_missing)
    used = np.unique(np.concatenate([enroll_rows, test_rows]))
    mean = _check_mean(mean, store.dim)
    # Normalise only the utterances the trials use, once each.
    compact = np.full(len(store.ids), -1, dtype=np.int64)
    compact[used] = np.arange(used.size)
    unit = _normalised(store.embeddings[used], mean, store, used)
    enroll_compact, test_compact = compact[enroll_rows], compact[test_rows]
    scores = np.empty(len(trials), dtype=np.float32)
    for start in range(0, len(trials), _TRIAL_CHUNK):
        stop = start + _TRIAL_CHUNK
        scores[start:stop] = np.einsum("ij,ij->i", unit[enroll_compact[start:stop]], unit[test_compact[start:stop]])
    if normalisation is not None:
        cohort_mean, cohort_std = normalisation
        scores = 0.5 * ((scores - cohort_mean[enroll_rows]) / cohort_std[enroll_rows]
                        + (scores - cohort_mean[test_rows]) / cohort_std[test_rows])
        scores = scores.astype(np.float32)
    return ScoredTrials(trials, scores, skipped, enroll_rows, test_rows)


def speaker_mean_cohort(cohort: EmbeddingStore) -> EmbeddingStore:
    """One cohort embedding per speaker: the mean of its normalised embeddings.

    The speaker is the first path component of the ID (``id10270/...``).
    """
    speakers = [utterance_key(utterance_id).split("/")[0] for utterance_id in cohort.ids]
    names, inverse = np.unique(np.asarray(speakers), return_inverse=True)
    unit = _normalised(cohort.embeddings, None, cohort)
    sums = np.zeros((names.size, cohort.dim), dtype=np.float64)
    np.add.at(sums, inverse, unit)
    return EmbeddingStore(names.tolist(), sums.astype(np.float32), source=f"{cohort.source} (speaker means)")


def adaptive_normalisation_stats(store: EmbeddingStore, cohort: EmbeddingStore, top_k: int = 300,
                                 rows: Optional[np.ndarray] = None, mean=None, progress: bool = False):
    """Mean and standard deviation of each utterance's top-``k`` cohort scores.

    Computed by chunked matrix products for the rows of ``store`` listed in
    ``rows`` (all by default); other rows are left NaN.  Returns two (N,) arrays.
    """
    if cohort.dim != store.dim:
        raise ScoringError(f"dimension mismatch: {store.source} has {store.dim}-d embeddings, "
                           f"the cohort {cohort.source} has {cohort.dim}-d")
    if not 1 <= top_k:
        raise ScoringError(f"--asnorm-topk must be >= 1, got {top_k}")
    mean = _check_mean(mean, store.dim)
    top_k = min(top_k, len(cohort.ids))
    cohort_unit = _normalised(cohort.embeddings, mean, cohort)
    rows = np.arange(len(store.ids)) if rows is None else rows
    stats_mean = np.full(len(store.ids), np.nan, dtype=np.float32)
    stats_std = np.full(len(store.ids), np.nan, dtype=np.float32)
    chunks = range(0, rows.size, _COHORT_CHUNK)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="AS-norm cohort scores", unit="chunk", leave=False)
    for start in chunks:
        chunk = rows[start:start + _COHORT_CHUNK]
        scores = _normalised(store.embeddings[chunk], mean, store, chunk) @ cohort_unit.T
        top = np.partition(scores, scores.shape[1] - top_k, axis=1)[:, -top_k:]
        stats_mean[chunk] = top.mean(axis=1)
        stats_std[chunk] = np.maximum(top.std(axis=1), 1e-6)
    return stats_mean, stats_std


def as_norm(store: EmbeddingStore, trials: Trials, cohort: EmbeddingStore, top_k: int = 300, mean=None,
            allow_missing: bool = False, progress: bool = False) -> ScoredTrials:
    """AS-norm scores of a trial list (see the module docstring)."""
    _, enroll_rows, test_rows, _ = _trial_rows(store, trials, allow_missing)
    used = np.unique(np.concatenate([enroll_rows, test_rows]))
    stats = adaptive_normalisation_stats(store, cohort, top_k, rows=used, mean=mean, progress=progress)
    return cosine_scores(store, trials, mean=mean, allow_missing=allow_missing, normalisation=stats)


class Stage(enum.Enum):
    """A kind of score reported for each trial list."""

    COSINE = "cosine"          #: cosine of the centred embeddings
    ASNORM = "asnorm"          #: adaptive symmetric normalisation against the cohort's top-k
    CALIBRATED = "calibrated"  #: the scores mapped to log-likelihood ratios (Cllr, actual DCF)

    def title(self, calibrated_scores: str = "as-norm") -> str:
        """The heading of the stage's table (``calibrated_scores``: the kind of scores the calibration maps)."""
        if self is Stage.CALIBRATED:
            return f"{'AS-norm' if calibrated_scores == 'as-norm' else 'cosine'} + calibration"
        return "AS-norm" if self is Stage.ASNORM else "cosine"


def score_stages(store: EmbeddingStore, trials: Trials, stages: Sequence[Stage], mean=None,
                 cohort: Optional[EmbeddingStore] = None, top_k: int = 300,
                 calibration=None, allow_missing: bool = False, progress: bool = False
                 ) -> Dict[Stage, ScoredTrials]:
    """One trial list scored in each of ``stages`` (and in the stage the calibration maps, which it needs).

    AS-norm needs ``cohort``; the calibrated stage needs ``calibration`` (and
    ``cohort`` when it maps AS-norm scores), and its ``scores`` are LLRs: the one
    implementation behind ``spkver score``, ``spkver evaluate`` and the recipe.  ``calibration`` is a
    :class:`spkver.calibration.Calibration`.
    """
    mapped = mapped_stage(calibration) if Stage.CALIBRATED in stages else None
    scored: Dict[Stage, ScoredTrials] = {}
    if Stage.COSINE in stages or mapped is Stage.COSINE:
        scored[Stage.COSINE] = cosine_scores(store, trials, mean=mean, allow_missing=allow_missing)
    if Stage.ASNORM in stages or mapped is Stage.ASNORM:
        if cohort is None:
            raise ScoringError("AS-norm scores need a cohort" + (" (the calibration maps them)" if mapped else ""))
        scored[Stage.ASNORM] = as_norm(store, trials, cohort, top_k, mean=mean, allow_missing=allow_missing,
                                       progress=progress)
    if mapped is not None:
        llrs = calibration.scored_llrs(store, scored[mapped], cohort, mean, top_k=top_k, progress=progress)
        scored[Stage.CALIBRATED] = dataclasses.replace(scored[mapped], scores=llrs)
    return scored


def mapped_stage(calibration) -> Stage:
    """The stage whose scores ``calibration`` maps to LLRs."""
    if calibration is None:
        raise ScoringError("the calibrated stage needs a calibration")
    return Stage.ASNORM if calibration.trained_on.get("scores", "cosine") == "as-norm" else Stage.COSINE
