"""End-to-end `spkver score` on a VoxCeleb1-H-sized job, and metrics against SpeechBrain's.

1. Builds a synthetic job the size of VoxCeleb1-H: 550,894 trials over 150,000
   utterances with 192-d embeddings (1,251 speakers), plus a 6,000-utterance cohort.
2. Runs the CLI end to end (parse + score + EER + two minDCFs + TAR@FAR) in a
   fresh process, reporting wall time and peak memory; then with AS-norm (top-300).
3. Times `spkver.metrics` against SpeechBrain's `EER` and `minDCF` on 8,000
   scores (their O(n^2) algorithms cannot take the full list) and checks the values.

    python benchmarks/bench_scoring.py [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
        out.writelines(f"{l} {ids[e]} {ids[t]}\n" for l, e, t in zip(labels, enroll, test))


def run_measured(args):
    """Run a command in a fresh process; return (wall seconds, peak RSS in MiB, stdout)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(p.stdout + p.stderr); "
             "print(f'@@ {time.perf_counter() - t} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
             "sys.exit(p.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
    *text, last = out.rstrip("\n").split("\n")
    _, wall, rss_kib = last.split()
    return float(wall), int(rss_kib) / 1024, "\n".join(text)


def compare_with_speechbrain(n: int = 8000, seed: int = 1) -> None:
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
    print(f"\n## metrics on {n:,} scores (SpeechBrain's are O(n^2))")
    print("| metric | SpeechBrain | spkver | speed-up | SpeechBrain value | spkver value |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| EER | {timings['speechbrain EER']:.3f} s | {1e3 * timings['spkver eer']:.1f} ms | "
          f"{timings['speechbrain EER'] / timings['spkver eer']:.0f}x | {float(sb_eer):.5f} | {our_eer:.5f} |")
    # SpeechBrain's minDCF uses c_miss = c_fa = 1 without the NIST normalisation.
    normalised = float(sb_dcf) / 0.01
    print(f"| minDCF(0.01) | {timings['speechbrain minDCF']:.3f} s | {1e3 * timings['spkver min_dcf']:.1f} ms | "
          f"{timings['speechbrain minDCF'] / timings['spkver min_dcf']:.0f}x | {normalised:.5f} (normalised) | "
          f"{our_dcf:.5f} |")


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
    with prepared_job(args.workdir) as folder:
        cli = [sys.executable, "-m", "spkver.cli", "score", "--trials", str(folder / "veri_test_H.txt"),
               "--embeddings", str(folder / "emb.npz")]
        print(f"# spkver score on a VoxCeleb1-H-sized job: {TRIALS:,} trials, {UTTERANCES:,} utterances, {DIM}-d")
        print("| job | wall time | peak memory | target |")
        print("|---|---:|---:|---|")
        wall, rss, table = run_measured(cli)
        print(f"| cosine scoring + EER + 2 minDCF + TAR@FAR | {wall:.2f} s | {rss:.0f} MiB | < 5 s, < 1 GB |")
        wall_norm, rss_norm, table_norm = run_measured(cli + ["--cohort", str(folder / "cohort.npz"),
                                                              "--asnorm-topk", "300"])
        print(f"| same with AS-norm, {COHORT:,}-utterance cohort, top-300 | {wall_norm:.2f} s | {rss_norm:.0f} MiB "
              f"| < 30 s |")
        print("\n```\n" + table + "\n" + table_norm + "\n```")
    compare_with_speechbrain()


if __name__ == "__main__":
    main()
