"""The README's demo end to end: synthesise, prepare, train, evaluate; its figures and its time.

Runs ``python recipes/voxceleb/train.py hparams/demo_<objective>.yaml`` (140 synthetic speakers:
80 to train ECAPA-TDNN C = 128 for 12 epochs, 40 held out to calibrate, 20 for the trial list of
every cross-session pair of their files) and records the stages of its ``results.json``
(before training, then cosine, AS-norm and calibrated LLRs after training) and the wall time.
With ``--reuse``, an existing experiment folder is read instead of trained again.

    python benchmarks/experiment_demo.py [--objective qmargin] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from measure import Results

from spkver.scoring import Stage

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["stage", "EER %", "minDCF(0.01)", "minDCF(0.05)", "TAR@FAR=1e-2 %", "TAR@FAR=1e-3 %", "TAR@FAR=1e-4 %",
           "miss@FAR=0.1 %", "Cllr", "minCllr", "actDCF(0.01)", "minDCF(0.01) of the LLRs"]


def cell(value, scale=1.0, digits=2) -> str:
    return "" if value is None else f"{scale * value:.{digits}f}"


def row(name: str, figures: dict) -> list:
    tar = figures["tar_at_far"]
    miss = None if tar.get("0.001") is None else 1.0 - tar["0.001"]
    return [name, cell(figures["eer"], 100), cell(figures["min_dcf_0_01"], digits=4),
            cell(figures["min_dcf_0_05"], digits=4), cell(tar.get("0.01"), 100), cell(tar.get("0.001"), 100),
            cell(tar.get("0.0001"), 100), cell(miss, 100), cell(figures.get("cllr"), digits=4),
            cell(figures.get("min_cllr"), digits=4), cell(figures.get("act_dcf"), digits=4),
            cell(figures.get("min_dcf_at_prior"), digits=4)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="qmargin")
    parser.add_argument("--reuse", action="store_true", help="read the experiment folder if it has results.json")
    args = parser.parse_args()
    folder = ROOT / "results" / "demo" / f"ecapa_small_{args.objective}" / "1986"
    seconds = None
    if not (args.reuse and (folder / "results.json").exists()):
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                        str(ROOT / "hparams" / f"demo_{args.objective}.yaml")], cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
    stages = json.loads((folder / "results.json").read_text())["stages"]
    rows = [row(f"{moment.replace('_', ' ')}: {Stage(name).title(stage.get('scores', 'as-norm'))}", stage[moment][0])
            for moment in ("before_training", "after_training") for name, stage in stages.items() if moment in stage]
    trials = stages["cosine"]["after_training"][0]
    results = Results("experiment_demo", variant=args.objective)
    results.table("stages", f"hparams/demo_{args.objective}.yaml: {trials['trials']:,} trials "
                            f"({trials['targets']:,} targets)" + ("" if seconds is None else
                                                                   f", {seconds / 60:.1f} min end to end"),
                  COLUMNS, rows)
    results.save()


if __name__ == "__main__":
    main()
