"""End-to-end `spkver score` and `spkver calibrate` on a VoxCeleb1-H-sized job, and metrics against SpeechBrain's.

1. Builds a synthetic job the size of VoxCeleb1-H: 550,894 trials over 150,000
   utterances with 192-d embeddings (1,251 speakers) and durations, plus a 6,000-utterance cohort.
2. Runs the CLI end to end (parse + score + EER + two minDCFs + TAR@FAR) in a
   fresh process, reporting wall time and peak memory; then with AS-norm (top-300).
3. Calibration against plain scoring of the same list (the peer, which every calibrated run
   includes): `spkver calibrate --quality duration norm` (scores, four quality features, the
   prior-weighted logistic regression) and `spkver score --calibration` (plus LLRs, Cllr, minCllr,
   actual DCF). Target: calibration of the list in < 10 s and < 1 GB on 2 cores.
4. Times `spkver.metrics` against SpeechBrain's `EER` and `minDCF` on 8,000
   scores (their O(n^2) algorithms cannot take the full list) and checks the values.

    python benchmarks/bench_scoring.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import Results, run_measured

TRIALS, UTTERANCES, SPEAKERS, DIM, COHORT = 550_894, 150_000, 1_251, 192, 6_000


def build_job(folder: Path, seed: int = 0) -> None:
    from spkver.scoring import save_embeddings

    rng = np.random.default_rng(seed)
    speakers = rng.integers(0, SPEAKERS, UTTERANCES)
    ids = [f"id{10000 + s:05d}/{rng.bytes(6).hex()[:11]}/{u % 100000:05d}.wav" for u, s in enumerate(speakers)]
    centres = rng.normal(size=(SPEAKERS, DIM)).astype(np.float32)
    embeddings = centres[speakers] + 1.7 * rng.normal(size=(UTTERANCES, DIM)).astype(np.float32)
    # Durations as VoxCeleb1's (4-20 s, most under 8 s): calibration's quality measure reads them.
    save_embeddings(folder / "emb.npz", ids, embeddings, durations=4.0 + rng.gamma(2.0, 2.0, UTTERANCES).clip(0, 16),
                    fingerprint="synthetic-job")
    cohort_speakers = rng.integers(0, 500, COHORT)
    cohort = rng.normal(size=(500, DIM)).astype(np.float32)[cohort_speakers] + rng.normal(size=(COHORT, DIM))
    save_embeddings(folder / "cohort.npz", [f"id9{s:04d}/c/{i:05d}.wav" for i, s in enumerate(cohort_speakers)],
                    cohort)
    # Half targets (same speaker), half non-targets, as in the VoxCeleb lists.
    by_speaker = np.argsort(speakers, kind="stable")
    starts = np.searchsorted(speakers[by_speaker], np.arange(SPEAKERS))
    counts = np.bincount(speakers, minlength=SPEAKERS)
    enroll = rng.integers(0, UTTERANCES, TRIALS)
    is_target = rng.random(TRIALS) < 0.5
    same = by_speaker[starts[speakers[enroll]] + (rng.random(TRIALS) * counts[speakers[enroll]]).astype(int)]
    test = np.where(is_target, same, rng.integers(0, UTTERANCES, TRIALS))
    labels = (speakers[enroll] == speakers[test]).astype(int)
    with open(folder / "veri_test_H.txt", "w") as out:
        out.writelines(f"{label} {ids[e]} {ids[t]}\n" for label, e, t in zip(labels, enroll, test))


def compare_with_speechbrain(results: Results, n: int = 8000, seed: int = 1) -> None:
    import torch
    from speechbrain.utils.metric_stats import EER, minDCF

    from spkver import metrics

    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 1.5 * labels
    positive, negative = torch.tensor(scores[labels]), torch.tensor(scores[~labels])
    timings = {}
    start = time.perf_counter()
    sb_eer, _ = EER(positive, negative)
    timings["speechbrain EER"] = time.perf_counter() - start
    start = time.perf_counter()
    sb_dcf, _ = minDCF(positive, negative, p_target=0.01)
    timings["speechbrain minDCF"] = time.perf_counter() - start
    start = time.perf_counter()
    our_eer, _ = metrics.eer(scores, labels)
    timings["spkver eer"] = time.perf_counter() - start
    start = time.perf_counter()
    our_dcf, _ = metrics.min_dcf(scores, labels, p_target=0.01)
    timings["spkver min_dcf"] = time.perf_counter() - start
    # SpeechBrain's minDCF uses c_miss = c_fa = 1 without the NIST normalisation.
    normalised = float(sb_dcf) / 0.01
    results.table("metrics", f"metrics on {n:,} scores against SpeechBrain's (O(n^2))",
                  ["metric", "SpeechBrain", "spkver", "speed-up", "SpeechBrain value", "spkver value"], [
                      ["EER", f"{timings['speechbrain EER']:.3f} s", f"{1e3 * timings['spkver eer']:.1f} ms",
                       f"{timings['speechbrain EER'] / timings['spkver eer']:.0f}x", f"{float(sb_eer):.5f}",
                       f"{our_eer:.5f}"],
                      ["minDCF(0.01)", f"{timings['speechbrain minDCF']:.3f} s",
                       f"{1e3 * timings['spkver min_dcf']:.1f} ms",
                       f"{timings['speechbrain minDCF'] / timings['spkver min_dcf']:.0f}x",
                       f"{normalised:.5f} (normalised)", f"{our_dcf:.5f}"]])


@contextlib.contextmanager
def prepared_job(workdir=None):
    """The job's folder: ``workdir`` (built there once, then reused) or a temporary one."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "veri_test_H.txt").exists():
            start = time.perf_counter()
            build_job(folder)
            print(f"(built the job in {time.perf_counter() - start:.0f} s)")
        yield folder


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to build the job (default: a temporary folder)")
    args = parser.parse_args()
    results = Results("bench_scoring")
    with prepared_job(args.workdir) as folder:
        trials, store = str(folder / "veri_test_H.txt"), str(folder / "emb.npz")
        cli = [sys.executable, "-m", "spkver.cli"]
        score = cli + ["score", "--trials", trials, "--embeddings", store]
        wall, rss, _ = run_measured(score)
        wall_norm, rss_norm, _ = run_measured(score + ["--cohort", str(folder / "cohort.npz"), "--asnorm-topk", "300"])
        results.table("scoring", f"spkver score on a VoxCeleb1-H-sized job: {TRIALS:,} trials, {UTTERANCES:,} "
                                 f"utterances, {DIM}-d", ["job", "wall time", "peak memory", "target"], [
                          ["cosine scoring + EER + 2 minDCF + TAR@FAR", f"{wall:.2f} s", f"{rss:.0f} MiB",
                           "< 5 s, < 1 GB"],
                          [f"the same with AS-norm, {COHORT:,}-utterance cohort, top-300", f"{wall_norm:.2f} s",
                           f"{rss_norm:.0f} MiB", "< 30 s"]], align=["---", "---:", "---:", "---"])
        calibration = str(folder / "calibration.json")
        jobs = [
            ("spkver score (the peer)", score, ""),
            ("spkver calibrate --quality duration norm", cli + [
                "calibrate", "--trials", trials, "--embeddings", store, "--quality", "duration", "norm",
                "--out", calibration], "< 10 s, < 1 GB"),
            ("spkver score --calibration (+ LLR, Cllr, minCllr, actDCF)", score + ["--calibration", calibration], ""),
        ]
        rows, peer = [], None
        for name, command, target in jobs:
            wall, rss, text = run_measured(command)
            peer = peer or wall
            rows.append([name, f"{wall:.2f} s", f"{wall / peer:.2f}x", f"{rss:.0f} MiB", target])
        print(text)
        results.table("calibration", f"calibration of the same list ({TRIALS:,} trials)",
                      ["job", "wall time", "vs the peer", "peak memory", "target"], rows,
                      align=["---", "---:", "---:", "---:", "---"])
    compare_with_speechbrain(results)
    results.save()


if __name__ == "__main__":
    main()
