"""The synthetic-data sanity experiment: every objective, one recipe, one corpus.

Trains the demo's small ECAPA (hparams/demo_<objective>.yaml: identical recipe, data and seed)
with each objective on the built-in synthetic corpus, then prints EER, minDCF(0.01) and
TAR@FAR=1e-3 before and after training as a Markdown table. This is a sanity check of the
toolkit on synthetic voices, not a VoxCeleb result. About 5 minutes per objective and seed on
2 cores; runs whose results exist are read, not repeated.

    python benchmarks/synthetic_objectives.py [--objectives qmargin a3m ...] [--seeds 1986 7]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ["softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"]


def run(objective: str, seed: int) -> Path:
    output = ROOT / "results" / "demo" / f"ecapa_small_{objective}" / str(seed)
    if not (output / "results.json").exists():
        subprocess.run([sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                        str(ROOT / "hparams" / f"demo_{objective}.yaml"), f"--seed={seed}"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1986, 7])
    args = parser.parse_args()
    seeds = " / ".join(str(seed) for seed in args.seeds)
    print(f"| objective | EER % ({seeds}) | mean EER % | minDCF(0.01) ({seeds}) | TAR@FAR=1e-3 % ({seeds}) | "
          f"A3M-I firings ({seeds}) |")
    print("|---|---:|---:|---:|---:|---:|")
    untrained = []
    for objective in args.objectives:
        rows = []
        for seed in args.seeds:
            start = time.time()
            output = run(objective, seed)
            results = json.loads((output / "results.json").read_text())
            after = results["after training"][0]
            untrained.append(results["before training"][0]["eer"])
            fired = (output / "train_log.txt").read_text().count("a3m_i_fired")
            rows.append((after, fired))
            print(f"{objective}, seed {seed}: EER {100 * after['eer']:.2f} % ({time.time() - start:.0f} s)",
                  file=sys.stderr)

        def cells(values, scale=1.0, digits=2):
            return " / ".join("n/a" if v is None else f"{scale * v:.{digits}f}" for v in values)

        eers = [after["eer"] for after, _ in rows]
        firings = " / ".join(str(fired) for _, fired in rows) if objective == "a3m_i" else "-"
        print(f"| {objective} | {cells(eers, 100)} | {100 * sum(eers) / len(eers):.2f} | "
              f"{cells([a['min_dcf_0_01'] for a, _ in rows], digits=4)} | "
              f"{cells([a['tar_at_far'].get('0.001') for a, _ in rows], 100)} | {firings} |")
    print(f"\nBefore training: EER {100 * min(untrained):.2f}-{100 * max(untrained):.2f} % (random initialisations).")


if __name__ == "__main__":
    main()
