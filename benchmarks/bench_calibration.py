"""`spkver calibrate` and `spkver score --calibration` on a VoxCeleb1-H-sized list, against plain scoring.

Builds (or reuses, with --workdir) bench_scoring.py's job: 550,894 trials over 150,000 192-d
embeddings with durations. Each command runs in a fresh process, timed with its peak memory;
the ratio is to `spkver score` of the same list, which every calibrated run includes:

1. `spkver score` (cosine scores, EER, minDCF, TAR@FAR): the peer;
2. `spkver calibrate --quality duration norm`: scores, the four quality features and the
   prior-weighted logistic regression (scikit-learn, L-BFGS) on every trial;
3. `spkver score --calibration`: the same figures plus LLRs, Cllr, minCllr (PAV) and actual DCF.

    python benchmarks/bench_calibration.py [--workdir DIR]

Target (issue 14): calibration of the list in < 10 s and < 1 GB on 2 cores.
"""
from __future__ import annotations

import argparse
import sys

from bench_scoring import TRIALS, UTTERANCES, prepared_job, run_measured


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to build the job (default: a temporary folder)")
    args = parser.parse_args()
    with prepared_job(args.workdir) as folder:
        trials, store = str(folder / "veri_test_H.txt"), str(folder / "emb.npz")
        calibration = str(folder / "calibration.json")
        cli = [sys.executable, "-m", "spkver.cli"]
        jobs = [
            ("spkver score (the peer)", cli + ["score", "--trials", trials, "--embeddings", store], ""),
            ("spkver calibrate --quality duration norm", cli + [
                "calibrate", "--trials", trials, "--embeddings", store, "--quality", "duration", "norm",
                "--out", calibration], "< 10 s, < 1 GB"),
            ("spkver score --calibration (+ LLR, Cllr, minCllr, actDCF)", cli + [
                "score", "--trials", trials, "--embeddings", store, "--calibration", calibration], ""),
        ]
        print(f"# calibration on a VoxCeleb1-H-sized list: {TRIALS:,} trials, {UTTERANCES:,} utterances")
        print("| job | wall time | vs the peer | peak memory | target |")
        print("|---|---:|---:|---:|---|")
        outputs, peer = [], None
        for name, command, target in jobs:
            wall, rss, text = run_measured(command)
            peer = peer or wall
            outputs.append(text)
            print(f"| {name} | {wall:.2f} s | {wall / peer:.2f}x | {rss:.0f} MiB | {target} |", flush=True)
        print("\n```\n" + "\n".join(outputs) + "\n```")


if __name__ == "__main__":
    main()
