"""Evaluating an embedding extractor on trial lists: embed, centre, score, normalise, calibrate, report.

Trial utterances are embedded whole (batched by length, see
:mod:`spkver.inference`), the mean embedding of a sample of training
utterances is subtracted, and each list is scored with the library code of
``spkver score`` in stages, as WeSpeaker's results are: cosine; AS-norm
against the training speakers' mean embeddings (the same sample); AS-norm
scores calibrated to log-likelihood ratios by a map trained on development
pairs (the calibration speakers', held out of training, or else the training
speakers' validation files: whole files against whole files and against
short crops, so that the duration quality measure has a spread to learn
from).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from spkver.calibration import CalibrationError
from spkver.data.datasets import manifest_roots
from spkver.inference import audio_seconds, embed_files, extractor_fingerprint
from spkver.report import DEFAULT_FARS, calibration_report, markdown_table, verification_report
from spkver.scoring import EmbeddingStore, Trials, as_norm, cosine_scores, read_trials

__all__ = ["resolve_wav", "training_sample", "evaluate_trial_lists", "write_results", "DevelopmentFiles",
           "development_files", "calibrate_threshold", "calibrate_on_development", "write_model_card"]


def resolve_wav(wav: str, roots: dict) -> str:
    """``$vox1_root/wav/...`` to a real path."""
    for key, value in roots.items():
        wav = wav.replace(f"${key}", value)
    return wav


def training_sample(extractor, manifest_folder, utterances: int = 2000, seed: int = 0, device="cpu",
                    progress: bool = True) -> EmbeddingStore:
    """Embeddings of up to ``utterances`` whole training files (a fixed random sample), IDs ``speaker/file``.

    Its mean is the embedding subtracted before scoring; its speaker means are the AS-norm cohort.
    """
    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "train.csv") as rows:
        speaker_of = {resolve_wav(row["wav"], roots): row["spk_id"] for row in csv.DictReader(rows)}
    files = sorted(speaker_of)
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(utterances, len(files)), replace=False))]
    embeddings = embed_files(extractor, chosen, device=device, progress=progress)
    return EmbeddingStore([f"{speaker_of[f]}/{Path(f).as_posix()}" for f in chosen], embeddings,
                          source="training sample")


def evaluate_trial_lists(extractor, manifest_folder, trial_lists: Sequence, mean=None, batch_size: int = 16,
                         device="cpu", fars=DEFAULT_FARS, progress: bool = True,
                         cohort: Optional[EmbeddingStore] = None, top_k: int = 300,
                         calibration=None) -> Dict[str, List[dict]]:
    """Report rows per stage and trial list (see :func:`spkver.report.verification_report`).

    Stages: ``"cosine"``; with a ``cohort``, ``"AS-norm"``; with a ``calibration``
    (trained on the kind of scores it maps), ``"<kind> + calibration"``: the same
    rows with Cllr, minCllr and actual DCF at the calibration's prior.
    """
    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "trial_utterances.csv") as rows:
        records = list(csv.DictReader(rows))
    ids = [row["ID"] for row in records]
    paths = [resolve_wav(row["wav"], roots) for row in records]
    embeddings = embed_files(extractor, paths, batch_size=batch_size, device=device, progress=progress)
    store = EmbeddingStore(ids, embeddings, source="trial utterances", durations=audio_seconds(paths))
    stages: Dict[str, List[dict]] = {"cosine": []}
    if cohort is not None:
        stages["AS-norm"] = []
    calibrated = None
    if calibration is not None:
        kind = calibration.trained_on.get("scores", "cosine")
        if kind == "as-norm" and cohort is None:
            raise CalibrationError("the calibration maps AS-norm scores: evaluate_trial_lists needs the cohort")
        calibrated = f"{'AS-norm' if kind == 'as-norm' else 'cosine'} + calibration"
        stages[calibrated] = []
    for trials_path in trial_lists:
        trials = read_trials(trials_path)
        name = Path(trials_path).name
        scored = {"cosine": cosine_scores(store, trials, mean=mean, allow_missing=True)}
        if cohort is not None:
            scored["AS-norm"] = as_norm(store, trials, cohort, top_k, mean=mean, allow_missing=True)
        for stage, result in scored.items():
            row = {"name": name, **verification_report(result.scores, result.trials.labels, fars)}
            if result.num_skipped:
                row["skipped_missing"] = result.num_skipped
            stages[stage].append(row)
        if calibrated is not None:
            result = scored["AS-norm" if calibrated.startswith("AS-norm") else "cosine"]
            llrs = calibration.scored_llrs(store, result, cohort, mean, top_k=top_k)
            row = dict(stages[calibrated.split(" + ")[0]][-1])
            row.update(calibration_report(llrs, result.trials.labels, calibration.prior))
            stages[calibrated].append(row)
    return stages


def write_results(folder, results: dict, fars=DEFAULT_FARS) -> str:
    """Write ``results.json`` and ``results.md`` (one table per stage, e.g. before/after); return the Markdown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = "\n\n".join(f"### {stage}\n\n{markdown_table(rows, fars)}" for stage, rows in results.items())
    (folder / "results.md").write_text(markdown + "\n")
    return markdown


@dataclass
class DevelopmentFiles:
    """The whole files whose pairs train the calibration and set the threshold, embedded once.

    ``store`` holds their embeddings (IDs ``speaker/index``, durations, the
    extractor's fingerprint; ``None`` when :meth:`problem` says they cannot be
    paired); ``kind`` says whose files they are.
    """

    files: List[str]
    speakers: List[str]
    kind: str
    store: Optional[EmbeddingStore]

    def problem(self) -> Optional[str]:
        """Why no pair of these files can calibrate, or ``None``."""
        return None if len(set(self.speakers)) >= 2 else f"not calibrated: the {self.kind} are fewer than two"


def development_files(extractor, manifest_folder, max_utterances: int = 800, seed: int = 0, device="cpu",
                      progress: bool = True) -> DevelopmentFiles:
    """The development files, embedded whole (see :class:`DevelopmentFiles`).

    The calibration speakers' whole files (``calibration.csv``: speakers never
    trained on, as a trial list's are) when the preparation held some out, up
    to ``max_utterances`` spread evenly over the speakers; else the training
    speakers' validation files, up to 4 per speaker so that a capped sample
    still holds target pairs.
    """
    roots = manifest_roots(manifest_folder)
    held_out = Path(manifest_folder) / "calibration.csv"
    new_speakers = held_out.exists()
    with open(held_out if new_speakers else Path(manifest_folder) / "valid.csv") as rows:
        speaker_of = {resolve_wav(row["wav"], roots): row["spk_id"] for row in csv.DictReader(rows)}
    by_speaker: dict = {}
    for file in sorted(speaker_of):
        by_speaker.setdefault(speaker_of[file], []).append(file)
    per_speaker = max(2, -(-max_utterances // max(len(by_speaker), 1))) if new_speakers else 4
    rng = np.random.default_rng(seed)
    files = [f for group in by_speaker.values() for f in (group if len(group) <= per_speaker else
             [group[i] for i in sorted(rng.choice(len(group), per_speaker, replace=False))])]
    if len(files) > max_utterances:
        files = [files[i] for i in sorted(rng.choice(len(files), max_utterances, replace=False))]
    kind = "calibration speakers (never trained on)" if new_speakers else "training speakers (held-out files)"
    speakers = [speaker_of[f] for f in files]
    development = DevelopmentFiles(files, speakers, kind, store=None)
    if development.problem():  # nothing to pair: nothing to embed
        return development
    development.store = EmbeddingStore([f"{speaker}/{i}" for i, speaker in enumerate(speakers)],
                                       embed_files(extractor, files, device=device, progress=progress),
                                       source=f"files of the {kind}", durations=audio_seconds(files),
                                       fingerprint=extractor_fingerprint(extractor))
    return development


#: Target pairs below which the calibration maps the score alone (no quality measure).
_MIN_TARGETS_FOR_QUALITY = 100


def calibrate_on_development(extractor, development: DevelopmentFiles, mean=None,
                             cohort: Optional[EmbeddingStore] = None, top_k: int = 300, prior: float = 0.01,
                             short_seconds: float = 2.0, device="cpu", progress: bool = True):
    """A score-to-LLR map (:mod:`spkver.calibration`) trained on development pairs; ``(calibration or None, text)``.

    The files: :func:`development_files` (the calibration speakers', never
    trained on, when the preparation held some out; else the training
    speakers' validation files).  The pairs: every two whole files, and every
    short crop (the first ``short_seconds``) against every other whole file, as
    WeSpeaker pairs short and long segments; scores are AS-norm against ``cohort`` when it is given,
    else cosine; the quality measure is the duration, when there are crops and
    at least 100 target pairs (with fewer its weights would fit the noise).
    """
    from spkver.calibration import fit_calibration, quality_features

    if development.problem():
        return None, development.problem()
    files, whole = development.files, development.store
    durations = whole.durations
    cropped = [i for i, seconds in enumerate(durations) if seconds >= short_seconds + 0.5]
    short = embed_files(extractor, [files[i] for i in cropped], device=device, progress=progress,
                        max_seconds=short_seconds) if cropped else None
    ids = list(whole.ids) + [f"{development.speakers[i]}/{i}-short" for i in cropped]
    store = EmbeddingStore(ids, np.concatenate([whole.embeddings] + ([short] if cropped else [])),
                           source=whole.source, durations=np.r_[durations, np.full(len(cropped), short_seconds)],
                           fingerprint=whole.fingerprint)
    first, second = np.triu_indices(len(files), k=1)
    crop_rows = len(files) + np.repeat(np.arange(len(cropped)), len(files))
    whole_rows = np.tile(np.arange(len(files)), len(cropped))
    keep = np.repeat(np.asarray(cropped, dtype=np.int64), len(files)) != whole_rows  # not a crop of itself
    enroll = np.r_[first, crop_rows[keep]]
    test = np.r_[second, whole_rows[keep]]
    speakers = np.array([utterance_id.split("/")[0] for utterance_id in ids])
    labels = speakers[enroll] == speakers[test]
    if labels.all() or not labels.any():
        return None, "not calibrated: the development pairs need both same- and different-speaker pairs"
    trials = Trials([ids[i] for i in enroll], [ids[i] for i in test], labels.astype(np.int8),
                    source="development pairs")
    scored = cosine_scores(store, trials, mean=mean) if cohort is None else as_norm(store, trials, cohort, top_k,
                                                                                    mean=mean)
    # The duration term needs crops to learn from and pairs enough to be estimated; else the score alone.
    measures = ["duration"] if cropped and int(labels.sum()) >= _MIN_TARGETS_FOR_QUALITY else []
    quality = quality_features(store, scored.enroll_rows, scored.test_rows, measures)
    kind = "cosine" if cohort is None else "as-norm"
    description = (f"{labels.size} pairs of {len(files)} files and {len(cropped)} {short_seconds:g} s crops of "
                   f"{len(set(development.speakers))} {development.kind}")
    summary = {"source": description, "scores": kind, **({"asnorm_topk": top_k} if cohort is not None else {})}
    calibration = fit_calibration(scored.scores, labels, quality, prior=prior, fingerprint=store.fingerprint,
                                  trained_on=summary)
    return calibration, f"{kind} scores to LLRs at prior {prior:g}, trained on {description}"


def calibrate_threshold(development: DevelopmentFiles, mean=None, far=None):
    """Verification threshold from all pairs of the development files' cosine scores.

    At the EER by default, or at the lowest threshold whose FAR is at most ``far``.
    Returns ``(threshold or None, description)``.  A folder with a calibration
    decides on the LLR instead (:func:`calibrate_on_development`).
    """
    from spkver import metrics

    if development.problem():
        return None, development.problem()
    ids = development.store.ids
    first, second = np.triu_indices(len(ids), k=1)
    speakers = np.asarray(development.speakers)
    labels = speakers[first] == speakers[second]
    if not labels.any():
        return None, f"not calibrated: no two files of the {development.kind} share a speaker"
    trials = Trials([ids[i] for i in first], [ids[i] for i in second], labels.astype(np.int8),
                    source="development pairs")
    scores = cosine_scores(development.store, trials, mean=mean).scores
    pairs = f"{labels.size} pairs of {len(ids)} files of the {development.kind}"
    if far is None:
        rate, threshold = metrics.eer(scores, labels)
        return threshold, f"EER threshold ({100 * rate:.2f} % EER) on {pairs}"
    (point,) = metrics.tar_at_far(scores, labels, fars=(far,))
    if point.threshold is None:
        return None, f"not calibrated: {point.num_nontargets} non-target pairs cannot measure FAR={far}"
    return point.threshold, f"FAR={far} threshold (TAR {100 * point.tar:.2f} %) on {pairs}"


def write_model_card(folder, extractor, mean=None, threshold=None, calibration: str = "") -> None:
    """``spkver.json`` (architecture, threshold) and ``mean_embedding.npy``: what ``SpeakerEmbedder`` loads."""
    folder = Path(folder)
    card = {"extractor": extractor.spec, "threshold": threshold, "calibration": calibration,
            "score": "cosine in [-1, 1] of embeddings minus mean_embedding.npy; accept when >= threshold"}
    (folder / "spkver.json").write_text(json.dumps(card, indent=2) + "\n")
    if mean is not None:
        np.save(folder / "mean_embedding.npy", np.asarray(mean, dtype=np.float32))
