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

__all__ = ["resolve_wav", "training_mean_embedding", "evaluate_trial_lists", "write_results"]


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
