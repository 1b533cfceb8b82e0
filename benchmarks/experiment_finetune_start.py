"""Fine-tuning a WeSpeaker-layout ResNet34 on a prepared folder: class-mean prototypes against random ones.

The pipeline a user with a public model and a folder of speakers runs, end to end on this machine:
the built-in synthetic corpus laid out as ``ROOT/<speaker>/<session>/<file>``, prepared with
``spkver prepare folder`` (10 speakers held out for the trial list), a WeSpeaker ResNet34 folder
(``config.yaml`` + ``avg_model.pt``, real size, random weights: this measures the pipeline, not
accuracy), then one epoch of ``hparams/finetune/wespeaker_resnet34.yaml`` with the prototypes started
at the training speakers' class means under the starting model, and at random. Reported: the first
epoch's training and validation loss and accuracy, and the EER of the held-out speakers' trials.

    python benchmarks/experiment_finetune_start.py [--speakers 40] [--utterances 10]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import Results

from spkver.cli import main as spkver
from spkver.data.synth import synthesize_corpus

REPOSITORY = Path(__file__).resolve().parent.parent


def _layouts():
    """The test suite's writers of folders in the published layouts (tests/layouts.py), loaded from its file."""
    spec = importlib.util.spec_from_file_location("layouts", REPOSITORY / "tests" / "layouts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _epoch_statistics(log: str) -> dict:
    line = next(line for line in log.splitlines() if line.startswith("epoch: 1"))
    return {key: float(value) for key, value in re.findall(r"(train loss|train accuracy|valid loss|valid accuracy): "
                                                            r"([0-9.e+-]+)", line)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=40)
    parser.add_argument("--utterances", type=int, default=10)
    args = parser.parse_args()
    results = Results("experiment_finetune_start", "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        synthesize_corpus(scratch / "corpus", speakers=args.speakers, utterances=args.utterances, seed=3,
                          min_seconds=2.0, max_seconds=4.0, test_speakers=2, progress=False)
        for path in sorted((scratch / "corpus" / "wav").glob("*/*/*.wav")):
            target = scratch / "speakers" / path.relative_to(scratch / "corpus" / "wav")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
        started = time.perf_counter()
        assert spkver(["prepare", "folder", str(scratch / "speakers"), "--out", str(scratch / "data"),
                       "--test-speakers", "10", "--valid-fraction", "0.2"]) == 0
        prepared = time.perf_counter() - started
        start = _layouts().write_wespeaker_folder(scratch / "voxceleb_resnet34", "ResNet34", {
            "feat_dim": 80, "embed_dim": 256, "pooling_func": "TSTP", "two_emb_layer": False}, classes=5994)
        for init in ("class_means", "random"):
            output = scratch / init
            started = time.perf_counter()
            subprocess.run([sys.executable, str(REPOSITORY / "recipes/voxceleb/train.py"),
                            str(REPOSITORY / "hparams/finetune/wespeaker_resnet34.yaml"), f"--init_from={start}",
                            f"--data_folder={scratch / 'data'}", f"--output_folder={output}", "--number_of_epochs=1",
                            f"--init_prototypes={init}", "--batch_size=16", "--num_workers=0", "--mean_utterances=200"],
                           check=True, capture_output=True)
            seconds = time.perf_counter() - started
            epoch = _epoch_statistics((output / "train_log.txt").read_text())
            stages = json.loads((output / "results.json").read_text())["stages"]
            eer = stages["cosine"]["after_training"][0]["eer"]
            rows.append([init.replace("_", " "), f"{epoch['train loss']:.3f}", f"{100 * epoch['train accuracy']:.1f}",
                         f"{epoch['valid loss']:.3f}", f"{100 * epoch['valid accuracy']:.1f}", f"{100 * eer:.2f}",
                         f"{seconds / 60:.1f} min"])
    results.table("prototype_start", "One fine-tuning epoch of a random-weight WeSpeaker ResNet34 on a prepared "
                                     f"folder ({args.speakers} synthetic speakers x {args.utterances}, 10 held out; "
                                     f"preparation {prepared:.0f} s)",
                  ["prototypes start at", "train loss", "train accuracy %", "valid loss", "valid accuracy %",
                   "trial EER % (held-out speakers)", "run"], rows)
    results.save()


if __name__ == "__main__":
    main()
