"""A Kaldi data directory: ``wav.scp`` and ``utt2spk``, with ``segments`` when present.

``spkver prepare kaldi DIR --out OUT [--test-speakers N] [--calibration-speakers N]``

* ``wav.scp``: ``<recording> <path>``, or ``<recording> <command> |`` (the command's output is the
  audio, e.g. ``sox in.sph -t wav - |``);
* ``segments`` (optional): ``<utterance> <recording> <start> <end>`` in seconds; without it each
  recording is an utterance;
* ``utt2spk``: ``<utterance> <speaker>``.

Utterances are named ``<speaker>/<recording>/<utterance>`` (with segments: the recording is the
session) or ``<speaker>/<utterance>``. Pipes and segments are decoded once into ``OUT/cache``, as
are files that are not 16 kHz mono. Lines that do not parse are errors naming the file and line;
utterances whose recording or speaker is missing are listed in ``skipped.tsv``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

from spkver.data.manifests import PreparationError, Utterance, prepare_utterances

__all__ = ["read_kaldi_table", "scan_kaldi", "prepare_kaldi"]


def read_kaldi_table(path: Path, columns: int, rest: bool = False) -> Dict[str, List[str]]:
    """``key value ...`` lines: ``columns`` fields each (the last one takes the rest of the line with ``rest``)."""
    if not path.exists():
        raise PreparationError(f"{path}: no such file")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(None, columns - 1) if rest else line.split()
        if len(fields) != columns:
            raise PreparationError(f"{path}:{number}: expected {columns} fields, got {line!r}")
        if fields[0] in table:
            raise PreparationError(f"{path}:{number}: {fields[0]!r} is listed twice")
        table[fields[0]] = fields[1:]
    return table


def scan_kaldi(directory) -> Tuple[List[Utterance], List[Tuple[str, str]], Path]:
    """The utterances of a data directory, the (utterance, reason) pairs left out, and the audio files' root."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PreparationError(f"{directory}: no such folder")
    recordings = {key: value[0].strip()
                  for key, value in read_kaldi_table(directory / "wav.scp", 2, rest=True).items()}
    speakers = {key: value[0] for key, value in read_kaldi_table(directory / "utt2spk", 2).items()}
    segments = {}
    if (directory / "segments").exists():
        for key, (recording, start, end) in read_kaldi_table(directory / "segments", 4).items():
            try:
                segments[key] = (recording, float(start), float(end))
            except ValueError:
                raise PreparationError(f"{directory / 'segments'}: {key}: start and end must be seconds, got "
                                       f"{start!r} {end!r}") from None
    files = [Path(value) for value in recordings.values() if not value.endswith("|")]
    root = Path(os.path.commonpath([str(path.resolve().parent) for path in files])) if files else directory
    utterances, left_out = [], []
    for utterance, speaker in speakers.items():
        if segments and utterance not in segments:
            left_out.append((utterance, "in utt2spk but not in segments"))
            continue
        recording, segment = (segments[utterance][0], segments[utterance][1:]) if segments else (utterance, None)
        if recording not in recordings:
            left_out.append((utterance, f"recording {recording!r} is not in wav.scp"))
            continue
        name = f"{speaker}/{recording}/{utterance}" if segments else f"{speaker}/{utterance}"
        entry = recordings[recording]
        if entry.endswith("|") and segment is not None:
            left_out.append((utterance, "a segment of a piped recording (decode the pipe to a file first)"))
        elif entry.endswith("|"):
            utterances.append(Utterance(name, None, "kaldi", "", source=entry[:-1].strip()))
        else:
            path = Path(entry).resolve()
            utterances.append(Utterance(name, path, "kaldi", path.relative_to(root).as_posix(), segment=segment))
    return utterances, left_out, root


def prepare_kaldi(directory, out, **settings) -> dict:
    """Manifests for a Kaldi data directory (``settings``: those of
    :func:`~spkver.data.manifests.prepare_utterances`)."""
    utterances, left_out, root = scan_kaldi(directory)
    return prepare_utterances(out, {"kaldi": root}, utterances, left_out=left_out, **settings)
