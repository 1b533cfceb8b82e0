"""Which pairs should train a score calibration: the training speakers' held-out files, or new speakers'?

For a trained experiment folder, fits the recipe's calibration (``calibrate_on_development``: AS-norm
scores, the duration measure, prior 0.01) on

1. **training speakers**: pairs of the validation files (``valid.csv``: speakers the extractor
   was trained on, files it was not);
2. **calibration speakers**: pairs of the speakers held out of training (``calibration.csv``,
   when the preparation held some out: ``calibration_speakers``);
3. **the evaluation list itself** (the peer: the best an affine map can do on it, in hindsight),

and reports, on the experiment's trial list and on random subsets of 3,200 trials of it (the
demo's former list size), actual DCF at 0.01 against the minimum DCF of the same LLRs, and Cllr.

    python benchmarks/experiment_calibration_pairs.py --model results/demo/ecapa_small_qmargin/1986
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

import numpy as np
from measure import Results

from spkver import metrics
from spkver.calibration import CalibrationError, fit_calibration, quality_features
from spkver.data.datasets import manifest_roots
from spkver.evaluation import calibrate_on_development, development_files, resolve_wav, training_sample
from spkver.inference import SpeakerEmbedder, audio_seconds, embed_files
from spkver.scoring import EmbeddingStore, as_norm, read_trials, speaker_mean_cohort


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an experiment folder (manifests/, save/)")
    parser.add_argument("--trials", help="the trial list (default: trials.txt of the corpus, as the demo's)")
    parser.add_argument("--subsets", type=int, default=20, help="random 3,200-trial subsets to report")
    args = parser.parse_args()
    folder = Path(args.model)
    manifests = folder / "manifests"
    extractor = SpeakerEmbedder.from_pretrained(folder).extractor.eval()
    sample = training_sample(extractor, manifests, 300, progress=False)
    mean, cohort = sample.embeddings.mean(axis=0), speaker_mean_cohort(sample)
    roots = manifest_roots(manifests)
    rows = list(csv.DictReader(open(manifests / "trial_utterances.csv")))
    paths = [resolve_wav(row["wav"], roots) for row in rows]
    store = EmbeddingStore([row["ID"] for row in rows], embed_files(extractor, paths, progress=False),
                           durations=audio_seconds(paths))
    trial_list = read_trials(args.trials or Path(roots["vox1_root"]) / "trials.txt")
    scored = as_norm(store, trial_list, cohort, 300, mean=mean, allow_missing=True)
    labels = scored.trials.labels.astype(bool)
    quality = quality_features(store, scored.enroll_rows, scored.test_rows, ["duration"])

    calibrations = {}
    with tempfile.TemporaryDirectory() as scratch:
        # The recipe's choice of files reads calibration.csv when it exists: a copy without it.
        validation_only = Path(scratch) / "manifests"
        shutil.copytree(manifests, validation_only)
        (validation_only / "calibration.csv").unlink(missing_ok=True)
        for name, source in (("training speakers (valid.csv)", validation_only),
                             ("calibration speakers (calibration.csv)", manifests)):
            if name.startswith("calibration") and not (manifests / "calibration.csv").exists():
                continue
            development = development_files(extractor, source, max_utterances=400, progress=False)
            try:
                calibrations[name] = calibrate_on_development(extractor, development, mean, cohort, 300,
                                                              progress=False)
            except CalibrationError as error:
                print(f"{name}: not calibrated ({error})")
    calibrations["the evaluation list itself (peer)"] = fit_calibration(scored.scores, labels, quality, prior=0.01)

    rng = np.random.default_rng(0)
    subsets = [rng.choice(labels.size, 3200, replace=False) for _ in range(args.subsets)]
    rows = []
    for name, calibration in calibrations.items():
        llrs = calibration.llr(scored.scores, {k: v for k, v in quality.items() if k in calibration.features})
        act, minimum = metrics.actual_dcf(llrs, labels, 0.01), metrics.min_dcf(llrs, labels, 0.01)[0]
        ratios = [metrics.actual_dcf(llrs[s], labels[s], 0.01) / metrics.min_dcf(llrs[s], labels[s], 0.01)[0]
                  for s in subsets]
        trained = calibration.trained_on
        pairs = f"{trained['trials']:,} ({trained['targets']:,} targets)"
        rows.append([name, pairs, f"{metrics.cllr(llrs, labels):.3f}", f"{act:.4f}", f"{minimum:.4f}",
                     f"{act / minimum:.2f}", f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"])
    results = Results("experiment_calibration_pairs")
    results.table("sources", f"{folder}: {labels.size:,} trials ({int(labels.sum()):,} targets), AS-norm, prior 0.01",
                  ["calibrated on", "pairs", "Cllr", "actDCF(0.01)", "minDCF(0.01)", "act/min",
                   f"act/min on 3,200-trial subsets (median, range of {args.subsets})"], rows,
                  align=["---", "---", "---:", "---:", "---:", "---:", "---:"])
    results.save()


if __name__ == "__main__":
    main()
