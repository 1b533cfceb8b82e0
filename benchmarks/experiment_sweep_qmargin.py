"""Q-Margin over a grid of (s, alpha, m) and seeds on the built-in corpus, with heatmaps.

Trains the demo's model and recipe (hparams/demo_qmargin.yaml: the same corpus, schedule and
model for every cell) at each setting, then writes ``sweep.json`` (every run's held-out figures)
and ``heatmaps.png``: the EER and the miss rate at FAR = 0.1 % over margin x alpha, one panel per
scale, as the papers' Figures 1-2 do. At alpha = 1 Q-Margin is CosFace. Runs whose results exist
are read, not repeated, so an interrupted sweep resumes.

    python benchmarks/experiment_sweep_qmargin.py                                  # the papers' pairs, m in {0.1, 0.2}
    python benchmarks/experiment_sweep_qmargin.py --pairs 10:1.5 5:2 --margins 0.1 0.2 0.3 --seeds 1986 7
    python benchmarks/experiment_sweep_qmargin.py --scales 5 10 20 --alphas 1.25 1.5 2 --margins 0.1 0.2   # a grid

About 5 minutes a run on 2 cores (``--jobs 2`` runs two at a time on one core each); a larger grid
is for a GPU (``--device cuda``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from measure import Results

ROOT = Path(__file__).resolve().parent.parent
#: The papers' (s, alpha) pairs, CosFace's first, and the mismatched pair spkver used before them.
PAPERS_PAIRS = [(32.0, 1.0), (20.0, 1.25), (10.0, 1.5), (5.0, 2.0)]
MISMATCHED = (30.0, 1.5)
FAR = "0.001"


def _pair(text: str):
    try:
        scale, alpha = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SCALE:ALPHA such as 10:1.5, got {text!r}") from None
    return scale, alpha


def settings(args):
    """Every (scale, alpha, margin) of the sweep."""
    if args.scales or args.alphas:
        if not (args.scales and args.alphas):
            raise SystemExit("sweep_objectives.py: error: --scales and --alphas go together")
        pairs = list(itertools.product(args.scales, args.alphas))
    else:
        pairs = args.pairs
    cells = [(s, a, m) for s, a in pairs for m in args.margins]
    if args.mismatched and not args.scales and args.pairs == PAPERS_PAIRS:
        cells.append((*MISMATCHED, 0.2))
    return cells


def run(scale, alpha, margin, seed, out: Path, device: str, threads: int) -> dict:
    folder = out / f"s{scale:g}_a{alpha:g}_m{margin:g}" / str(seed)
    if not (folder / "results.json").exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        command = [sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                   str(ROOT / "hparams" / "demo_qmargin.yaml"), f"--scale={scale}", f"--alpha={alpha}",
                   f"--margin={margin}", f"--seed={seed}", f"--output_folder={folder}", f"--device={device}",
                   "--evaluate_before_training=False"]
        started = time.time()
        completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        if completed.returncode != 0:
            raise SystemExit(f"run s={scale:g} alpha={alpha:g} m={margin:g} seed={seed} failed:\n"
                             f"{completed.stderr[-2000:]}")
        print(f"s={scale:g} alpha={alpha:g} m={margin:g} seed={seed}: {time.time() - started:.0f} s", file=sys.stderr)
    after = json.loads((folder / "results.json").read_text())["stages"]["cosine"]["after_training"][0]
    tar = after["tar_at_far"].get(FAR)
    return {"scale": scale, "alpha": alpha, "margin": margin, "seed": seed, "eer": after["eer"],
            "min_dcf_0_01": after["min_dcf_0_01"], "miss_at_far_1e-3": None if tar is None else 1.0 - tar}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(runs):
    """One row per (scale, alpha, margin): means over seeds."""
    keys = sorted({(r["scale"], r["alpha"], r["margin"]) for r in runs})
    rows = []
    for scale, alpha, margin in keys:
        cell = [r for r in runs if (r["scale"], r["alpha"], r["margin"]) == (scale, alpha, margin)]
        rows.append({"scale": scale, "alpha": alpha, "margin": margin, "seeds": len(cell),
                     "eer": mean([r["eer"] for r in cell]), "min_dcf_0_01": mean([r["min_dcf_0_01"] for r in cell]),
                     "miss_at_far_1e-3": mean([r["miss_at_far_1e-3"] for r in cell])})
    return rows


def plot_heatmaps(rows, path: Path) -> None:
    """EER and miss rate at FAR 0.1 % over margin (rows) x alpha (columns), one panel per scale;
    one colour scale per metric, so that panels compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scales = sorted({r["scale"] for r in rows})
    metrics = (("eer", "EER %"), ("miss_at_far_1e-3", "miss % at FAR 0.1 %"))
    figure, axes = plt.subplots(2, len(scales), figsize=(2.4 * len(scales) + 1.5, 5.4), squeeze=False)
    for line, (key, title) in enumerate(metrics):
        values = [100 * r[key] for r in rows if r[key] is not None]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        for column, scale in enumerate(scales):
            cells = [r for r in rows if r["scale"] == scale]
            alphas = sorted({r["alpha"] for r in cells})
            margins = sorted({r["margin"] for r in cells})
            grid = np.full((len(margins), len(alphas)), np.nan)
            for r in cells:
                if r[key] is not None:
                    grid[margins.index(r["margin"]), alphas.index(r["alpha"])] = 100 * r[key]
            ax = axes[line][column]
            image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower", vmin=low, vmax=high)
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    dark = (value - low) > 0.5 * (high - low)  # viridis_r is dark at the high end
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=10,
                            color="white" if dark else "black")
            ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
            ax.set_yticks(range(len(margins)), [f"{m:g}" for m in margins])
            if line == len(metrics) - 1:
                ax.set_xlabel("alpha")
            else:
                ax.set_title(f"s = {scale:g}", fontsize=10)
            if column == 0:
                ax.set_ylabel(f"{title}\nmargin m")
        figure.colorbar(image, ax=list(axes[line]), fraction=0.02, pad=0.02, label=title)
    figure.suptitle("Q-Margin on the synthetic corpus: held-out trials, means over seeds (lower is better)",
                    fontsize=11)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=_pair, nargs="+", default=PAPERS_PAIRS, metavar="S:ALPHA",
                        help="(s, alpha) pairs (default: the papers' 32:1 20:1.25 10:1.5 5:2)")
    parser.add_argument("--scales", type=float, nargs="+", help="a full grid: every scale with every --alphas")
    parser.add_argument("--alphas", type=float, nargs="+")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--no-mismatched", dest="mismatched", action="store_false",
                        help="leave out the mismatched (30, 1.5) at m = 0.2 that the default sweep adds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1986])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on cores/jobs threads)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    cells = settings(args)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # The corpus is synthesised by the first run; the others would race to write it.
    first, *rest = [(s, a, m, seed) for s, a, m in cells for seed in args.seeds]
    runs = [run(*first, args.out, args.device, threads * args.jobs)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs += list(pool.map(lambda cell: run(*cell, args.out, args.device, threads), rest))
    rows = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"runs": runs, "cells": rows}, indent=2) + "\n")
    plot_heatmaps(rows, args.out / "heatmaps.png")
    results = Results("experiment_sweep_qmargin", args.device)
    results.table("cells", "Q-Margin on the demo's recipe over (s, alpha, m), means over the seeds",
                  ["s", "alpha", "m", "seeds", "EER %", "minDCF(0.01)", "miss % at FAR 0.1 %"],
                  [[f"{r['scale']:g}", f"{r['alpha']:g}", f"{r['margin']:g}", str(r["seeds"]), f"{100 * r['eer']:.2f}",
                    f"{r['min_dcf_0_01']:.4f}",
                    "n/a" if r["miss_at_far_1e-3"] is None else f"{100 * r['miss_at_far_1e-3']:.2f}"] for r in rows],
                  align=["---:"] * 7)
    results.save()
    print(f"\n{args.out / 'sweep.json'}, {args.out / 'heatmaps.png'}")


if __name__ == "__main__":
    main()
