"""The synthetic-data sanity experiment: every objective, one recipe, one corpus, several seeds.

Trains the demo's small ECAPA (hparams/demo_<objective>.yaml: identical recipe, data and model;
the objectives at their hparams' settings, the papers' (s, alpha) = (10, 1.5) for the alpha family
and s = 32 for the baselines) with each objective and training seed on the built-in synthetic
corpus, and prints, per objective, the held-out list's EER, minDCF(0.01), TAR at FAR 1e-3 and the
miss rate at FAR 0.1 % as mean +- spread (half the range over seeds), with the untrained EER. This
is a sanity check of the toolkit on synthetic voices, not a VoxCeleb result. About 5 minutes a
run on 2 cores (``--jobs 2`` runs two at a time on one core each); runs whose results exist are
read, not repeated.

    python benchmarks/experiment_objectives.py [--objectives qmargin a3m ...] [--seeds 1986 7 42] [--jobs 2]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from measure import Results

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ["softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"]


def run(objective: str, seed: int, threads: int) -> dict:
    output = ROOT / "results" / "demo" / f"ecapa_small_{objective}" / str(seed)
    if not (output / "results.json").exists():
        started = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                        str(ROOT / "hparams" / f"demo_{objective}.yaml"), f"--seed={seed}"],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{objective}, seed {seed}: {time.time() - started:.0f} s", file=sys.stderr)
    cosine = json.loads((output / "results.json").read_text())["stages"]["cosine"]
    after = cosine["after_training"][0]
    tar = after["tar_at_far"].get("0.001")
    return {"objective": objective, "seed": seed, "untrained_eer": cosine["before_training"][0]["eer"],
            "eer": after["eer"], "min_dcf_0_01": after["min_dcf_0_01"], "tar_1e-3": tar,
            "miss_at_far_1e-3": None if tar is None else 1.0 - tar,
            "a3m_i_firings": (output / "train_log.txt").read_text().count("a3m_i_fired")}


def mean_spread(values, scale=1.0, digits=2) -> str:
    """``mean ± half-range`` of the defined values."""
    values = [scale * v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1986, 7, 42])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on cores/jobs threads)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    cells = [(objective, seed) for objective in args.objectives for seed in args.seeds]
    # The first run synthesises the corpus; the others would race to write it.
    runs = [run(*cells[0], threads * args.jobs)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs += list(pool.map(lambda cell: run(*cell, threads), cells[1:]))
    table = []
    for objective in args.objectives:
        rows = [r for r in runs if r["objective"] == objective]
        firings = " / ".join(str(r["a3m_i_firings"]) for r in rows) if objective == "a3m_i" else "-"
        table.append([objective, mean_spread([r["eer"] for r in rows], 100),
                      mean_spread([r["min_dcf_0_01"] for r in rows], digits=4),
                      mean_spread([r["tar_1e-3"] for r in rows], 100),
                      mean_spread([r["miss_at_far_1e-3"] for r in rows], 100),
                      mean_spread([r["untrained_eer"] for r in rows], 100), firings])
        halved = all(r["eer"] <= 0.5 * r["untrained_eer"] for r in rows)
        print(f"{objective}: every seed {'halves' if halved else 'does NOT halve'} the untrained EER",
              file=sys.stderr)
    results = Results("experiment_objectives")
    results.table("objectives", f"every objective on the demo's recipe, seeds {', '.join(map(str, args.seeds))}: "
                                "mean ± half the range over seeds",
                  ["objective", "EER %", "minDCF(0.01)", "TAR@FAR=1e-3 %", "miss % at FAR 0.1 %", "untrained EER %",
                   "A3M-I firings"], table)
    results.save()


if __name__ == "__main__":
    main()
