"""The synthetic-data sanity experiment: every objective, one recipe, one corpus.

Trains the demo's small ECAPA (hparams/demo_<objective>.yaml: identical recipe, data and seed)
with each objective on the built-in synthetic corpus, then prints EER, minDCF(0.01) and
TAR@FAR=1e-3 before and after training as a Markdown table. This is a sanity check of the
toolkit on synthetic voices, not a VoxCeleb result. About 5 minutes per objective on 2 cores.

    python benchmarks/synthetic_objectives.py [--objectives qmargin a3m ...] [--seed 1986]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ["softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--seed", type=int, default=1986)
    args = parser.parse_args()
    rows = []
    for objective in args.objectives:
        output = ROOT / "results" / "demo" / f"ecapa_small_{objective}" / str(args.seed)
        start = time.time()
        if not (output / "results.json").exists():
            subprocess.run([sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                            str(ROOT / "hparams" / f"demo_{objective}.yaml"), f"--seed={args.seed}"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        results = json.loads((output / "results.json").read_text())
        before, after = results["before training"][0], results["after training"][0]
        fired = (output / "train_log.txt").read_text().count("a3m_i_fired")
        rows.append((objective, before, after, fired, time.time() - start))
        print(f"{objective}: EER {100 * after['eer']:.2f} % ({time.time() - start:.0f} s)", file=sys.stderr)
    print("| objective | EER % before | EER % after | minDCF(0.01) | TAR@FAR=1e-3 % | A3M-I firings |")
    print("|---|---:|---:|---:|---:|---:|")
    for objective, before, after, fired, _ in rows:
        tar = after["tar_at_far"].get("0.001")
        print(f"| {objective} | {100 * before['eer']:.2f} | {100 * after['eer']:.2f} | {after['min_dcf_0_01']:.4f} | "
              f"{'n/a' if tar is None else f'{100 * tar:.2f}'} | {fired if objective == 'a3m_i' else '-'} |")


if __name__ == "__main__":
    main()
