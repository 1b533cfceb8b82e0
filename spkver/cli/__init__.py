"""The ``spkver`` command line.

* ``spkver score`` scores trial lists from an embedding store and prints EER,
  minDCF and TAR@FAR (and, with a calibration, Cllr, minCllr and actual DCF);
* ``spkver calibrate`` trains a score-to-LLR map on a development list (:mod:`spkver.calibration`);
* ``spkver evaluate`` evaluates a model folder in stages and writes its results and model card
  (:mod:`spkver.evaluation`: the recipe's last stage, re-runnable);
* ``spkver prepare voxceleb|folder|kaldi|cnceleb`` writes training manifests (:mod:`spkver.data.voxceleb`,
  :mod:`~spkver.data.folder`, :mod:`~spkver.data.kaldi`, :mod:`~spkver.data.cnceleb`); ``spkver trials``
  pairs a manifest's utterances into a trial list (:mod:`spkver.data.manifests`);
* ``spkver convert-m4a`` decodes VoxCeleb2's m4a files (:mod:`spkver.data.convert`);
* ``spkver synth`` generates the synthetic speaker corpus (:mod:`spkver.data.synth`);
* ``spkver embed`` / ``verify`` / ``export`` reuse a trained extractor (:mod:`spkver.inference`,
  :mod:`spkver.export`); ``spkver average`` averages its last checkpoints (:mod:`spkver.checkpoints`);
* ``spkver sparsity`` measures how many training examples of an experiment are already one-hot
  under an alpha objective, before fine-tuning with it (:mod:`spkver.finetune`);
* ``spkver environment`` checks that torch, torchaudio and SpeechBrain load together
  (:mod:`spkver.environment`).

Bad input (a :class:`spkver.errors.UserError`) ends with one clear message and exit
status 2; any other error is a bug and propagates with its traceback (exit status 1).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from spkver.cli import corpora, diagnostics, extractors, scores
from spkver.cli.common import CommandError
from spkver.errors import UserError, format_user_error

__all__ = ["CommandError", "build_parser", "main"]

#: The command groups, in the order ``spkver --help`` lists their commands.
GROUPS = (scores, corpora, extractors, diagnostics)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkver", description="Speaker verification with alpha-divergence losses.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:  # the user's input, named: one line; anything else is a bug and keeps its traceback
        print(format_user_error(f"spkver {args.command}", error), file=sys.stderr)
        return 2

