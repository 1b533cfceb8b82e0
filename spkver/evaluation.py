"""Evaluating an embedding extractor on trial lists: embed, centre, score, report.

Trial utterances are embedded whole (batched by length, see
:mod:`spkver.inference`), the mean embedding of a sample of training
utterances is subtracted, and each list is cosine-scored with the library code
of ``spkver score``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Sequence

import numpy as np

from spkver.data.datasets import manifest_roots
from spkver.inference import embed_files
from spkver.report import DEFAULT_FARS, markdown_table, verification_report
from spkver.scoring import EmbeddingStore, cosine_scores, read_trials

__all__ = ["resolve_wav", "training_mean_embedding", "evaluate_trial_lists", "write_results", "calibrate_threshold",
           "write_model_card"]


def resolve_wav(wav: str, roots: dict) -> str:
    """``$vox1_root/wav/...`` to a real path."""
    for key, value in roots.items():
        wav = wav.replace(f"${key}", value)
    return wav


def training_mean_embedding(extractor, manifest_folder, utterances: int = 2000, seed: int = 0, device="cpu",
                            progress: bool = True) -> np.ndarray:
    """Mean embedding of up to ``utterances`` whole training files (a fixed random sample)."""
    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "train.csv") as rows:
        files = sorted({resolve_wav(row["wav"], roots) for row in csv.DictReader(rows)})
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(utterances, len(files)), replace=False))]
    return embed_files(extractor, chosen, device=device, progress=progress).mean(axis=0)


def evaluate_trial_lists(extractor, manifest_folder, trial_lists: Sequence, mean=None, batch_size: int = 16,
                         device="cpu", fars=DEFAULT_FARS, progress: bool = True) -> List[dict]:
    """One report row per trial list (see :func:`spkver.report.verification_report`)."""
    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "trial_utterances.csv") as rows:
        records = list(csv.DictReader(rows))
    ids = [row["ID"] for row in records]
    paths = [resolve_wav(row["wav"], roots) for row in records]
    embeddings = embed_files(extractor, paths, batch_size=batch_size, device=device, progress=progress)
    store = EmbeddingStore(ids, embeddings, source="trial utterances")
    report = []
    for trials_path in trial_lists:
        scored = cosine_scores(store, read_trials(trials_path), mean=mean, allow_missing=True)
        row = {"name": Path(trials_path).name, **verification_report(scored.scores, scored.trials.labels, fars)}
        if scored.num_skipped:
            row["skipped_missing"] = scored.num_skipped
        report.append(row)
    return report


def write_results(folder, results: dict, fars=DEFAULT_FARS) -> str:
    """Write ``results.json`` and ``results.md`` (one table per stage, e.g. before/after); return the Markdown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = "\n\n".join(f"### {stage}\n\n{markdown_table(rows, fars)}" for stage, rows in results.items())
    (folder / "results.md").write_text(markdown + "\n")
    return markdown


def calibrate_threshold(extractor, manifest_folder, mean=None, far=None, max_utterances: int = 400, seed: int = 0,
                        device="cpu", progress: bool = True):
    """Verification threshold from all pairs of validation utterances (training speakers, unseen files).

    At the EER by default, or at the lowest threshold whose FAR is at most ``far``.
    Returns ``(threshold or None, description)``.
    """
    from spkver import metrics

    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "valid.csv") as rows:
        speaker_of = {resolve_wav(row["wav"], roots): row["spk_id"] for row in csv.DictReader(rows)}
    by_speaker: dict = {}
    for file in sorted(speaker_of):
        by_speaker.setdefault(speaker_of[file], []).append(file)
    # Up to 4 files from each speaker, so that a capped sample still holds target pairs.
    rng = np.random.default_rng(seed)
    files = [f for group in by_speaker.values() for f in
             (group if len(group) <= 4 else [group[i] for i in sorted(rng.choice(len(group), 4, replace=False))])]
    if len(files) > max_utterances:
        files = [files[i] for i in sorted(rng.choice(len(files), max_utterances, replace=False))]
    if len({speaker_of[f] for f in files}) < 2:
        return None, "not calibrated: the validation set has fewer than two speakers"
    embeddings = embed_files(extractor, files, device=device, progress=progress)
    if mean is not None:
        embeddings = embeddings - mean
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    first, second = np.triu_indices(len(files), k=1)
    scores = np.einsum("ij,ij->i", unit[first], unit[second])
    speakers = np.array([speaker_of[f] for f in files])
    labels = speakers[first] == speakers[second]
    if not labels.any():
        return None, "not calibrated: no two validation utterances share a speaker"
    if far is None:
        rate, threshold = metrics.eer(scores, labels)
        return threshold, (f"EER threshold ({100 * rate:.2f} % EER) on {labels.size} pairs of {len(files)} "
                           "validation utterances of the training speakers")
    (point,) = metrics.tar_at_far(scores, labels, fars=(far,))
    if point.threshold is None:
        return None, f"not calibrated: {point.num_nontargets} non-target pairs cannot measure FAR={far}"
    return point.threshold, f"FAR={far} threshold (TAR {100 * point.tar:.2f} %) on {labels.size} validation pairs"


def write_model_card(folder, extractor, mean=None, threshold=None, calibration: str = "") -> None:
    """``spkver.json`` (architecture, threshold) and ``mean_embedding.npy``: what ``SpeakerEmbedder`` loads."""
    folder = Path(folder)
    card = {"extractor": extractor.spec, "threshold": threshold, "calibration": calibration,
            "score": "cosine in [-1, 1] of embeddings minus mean_embedding.npy; accept when >= threshold"}
    (folder / "spkver.json").write_text(json.dumps(card, indent=2) + "\n")
    if mean is not None:
        np.save(folder / "mean_embedding.npy", np.asarray(mean, dtype=np.float32))
