"""VoxCeleb preparation: manifests in SpeechBrain's CSV convention, speaker map, counts.

``spkver prepare voxceleb --vox1 DIR --vox2 DIR --trials FILE [FILE ...] --out DIR``

Inputs: VoxCeleb1 (``wav/idXXXXX/<video>/<nnnnn>.wav``) and/or VoxCeleb2 dev
(``aac/...m4a``, or converted ``wav/...`` / ``.flac``; ``dev/aac`` is also
found), plus the trial lists whose speakers must not be trained on.

Outputs in ``--out``:

* ``train.csv`` and ``valid.csv`` — chunked training rows ``ID, duration, wav,
  start, stop, spk_id`` (``start``/``stop`` in samples; ``duration`` is the real
  chunk duration in seconds); ``wav`` is ``$vox1_root/...`` or
  ``$vox2_root/...`` (SpeechBrain's ``$data_root`` convention, one placeholder
  per corpus; ``roots.json`` maps them to the folders given);
* ``trial_utterances.csv`` — every utterance of the trial lists, whole;
* ``speakers.json`` — speaker ID to class index (training speakers only);
* ``counts.json`` — per-split counts, the checks' findings and the excluded
  speakers.

Durations come from file headers (``soundfile.info``; ``ffprobe`` for m4a),
read in parallel with a progress bar.  Unreadable or corrupt files are listed
and skipped; trial utterances that do not exist are counted and listed;
differences from the official counts are warnings.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from spkver.errors import UserError
from spkver.scoring import read_trials, utterance_key

logger = logging.getLogger(__name__)

__all__ = ["PreparationError", "Utterance", "scan_corpus", "prepare_voxceleb", "OFFICIAL_COUNTS"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a")
SAMPLE_RATE = 16000
OFFICIAL_COUNTS = {
    "vox2_dev_speakers": 5994,
    "vox2_dev_utterances": 1092009,
    "trials": {"veri_test2.txt": 37611, "veri_test.txt": 37720, "list_test_all2.txt": 579818,
               "list_test_all.txt": 581480, "list_test_hard2.txt": 550894, "list_test_hard.txt": 552536},
}


class PreparationError(UserError, ValueError):
    """Bad input to preparation: names the folder or file."""


@dataclass
class Utterance:
    id: str            # idXXXXX/<video>/<nnnnn>.<ext>, relative to the audio folder
    path: Path
    root: str          # "vox1" or "vox2"
    relative: str      # path relative to the corpus root (for $root placeholders)
    duration: float = math.nan
    sample_rate: int = 0

    @property
    def speaker(self) -> str:
        return self.id.split("/")[0]


def _audio_folders(root: Path) -> List[Path]:
    candidates = [root / name for name in ("wav", "aac", "dev/aac", "dev/wav", "flac")]
    folders = [folder for folder in candidates if folder.is_dir()]
    if not folders:
        raise PreparationError(f"{root}: no wav/, aac/ or dev/aac/ folder of VoxCeleb audio in it")
    return folders


def scan_corpus(root, name: str) -> List[Utterance]:
    """Every ``idXXXXX/<video>/<nnnnn>.{wav,flac,m4a}`` under the corpus root."""
    root = Path(root)
    if not root.is_dir():
        raise PreparationError(f"{root}: --{name} folder does not exist")
    utterances = []
    for folder in _audio_folders(root):
        for path in sorted(folder.glob("*/*/*")):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                utterance_id = path.relative_to(folder).as_posix()
                utterances.append(Utterance(utterance_id, path, name, path.relative_to(root).as_posix()))
    if not utterances:
        folders = [str(folder) for folder in _audio_folders(root)]
        raise PreparationError(f"{root}: no audio files (wav, flac, m4a) under {folders}")
    return utterances


def _read_header(utterance: Utterance) -> Optional[str]:
    """Fill duration and sample rate from the header; return an error message instead of raising."""
    if utterance.path.suffix.lower() == ".m4a":
        if shutil.which("ffprobe") is None:
            return "m4a needs ffprobe (install ffmpeg) or conversion with `spkver convert-m4a`"
        result = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=sample_rate",
                                 "-of", "json", str(utterance.path)], capture_output=True, text=True)
        try:
            info = json.loads(result.stdout)
            utterance.duration = float(info["format"]["duration"])
            utterance.sample_rate = int(info["streams"][0]["sample_rate"])
        except (KeyError, IndexError, ValueError):
            return (result.stderr.strip() or "ffprobe could not read it").splitlines()[-1]
        return None
    import soundfile

    try:
        info = soundfile.info(str(utterance.path))
    except Exception as error:  # soundfile raises several types for corrupt files
        return str(error).splitlines()[0]
    if info.frames <= 0:
        return "no audio frames"
    utterance.duration = info.frames / info.samplerate
    utterance.sample_rate = info.samplerate
    return None


def read_durations(utterances: Sequence[Utterance], workers: int = 8,
                   progress: bool = True) -> List[Tuple[Utterance, str]]:
    """Read every header in parallel; return the (utterance, reason) pairs that failed."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(tqdm(pool.map(_read_header, utterances, chunksize=64), total=len(utterances),
                           desc="reading headers", unit="file", disable=not progress))
    return [(u, e) for u, e in zip(utterances, errors) if e is not None]


def _chunks(utterance: Utterance, chunk_seconds: float, min_seconds: float) -> Iterable[Tuple[int, int]]:
    """(start, stop) sample ranges: whole chunks, then the remainder if long enough."""
    rate = utterance.sample_rate or SAMPLE_RATE
    total = int(round(utterance.duration * rate))
    size = int(round(chunk_seconds * rate))
    if total < int(min_seconds * rate):
        return
    if total <= size:
        yield 0, total
        return
    start = 0
    while start + size <= total:
        yield start, start + size
        start += size
    if total - start >= int(min_seconds * rate):
        yield start, total


def _write_csv(path: Path, rows: List[dict]) -> None:
    fields = ["ID", "duration", "wav", "start", "stop", "spk_id"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _row(utterance: Utterance, start: int, stop: int, suffix: str = "") -> dict:
    rate = utterance.sample_rate or SAMPLE_RATE
    return {"ID": utterance.id + suffix, "duration": f"{(stop - start) / rate:.3f}",
            "wav": f"${utterance.root}_root/{utterance.relative}", "start": start, "stop": stop,
            "spk_id": utterance.speaker}


def _whole_file_row(utterance: Utterance) -> dict:
    return _row(utterance, 0, int(round(utterance.duration * (utterance.sample_rate or SAMPLE_RATE))))


def prepare_voxceleb(out, vox1=None, vox2=None, trials: Sequence = (), train_on: Sequence[str] = ("vox1", "vox2"),
                     chunk_seconds: float = 3.0, min_seconds: float = 1.0, valid_fraction: float = 0.01,
                     calibration_speakers: int = 0, seed: int = 0, workers: int = 8,
                     progress: bool = True) -> dict:
    """Write the manifests; return the summary also saved as ``counts.json``.

    ``train_on`` lists the corpora to train on (``("vox2",)`` trains on
    VoxCeleb2 dev only); speakers of ``trials`` are excluded from training.
    ``calibration_speakers`` training speakers (a seeded choice) are held out
    of training altogether and their whole files listed in
    ``calibration.csv``: pairs of speakers the extractor never saw, which a
    score calibration needs to be right on new speakers (pairs of training
    speakers' held-out files, ``valid.csv``, are better separated than any
    trial list and make an over-confident map).
    """
    if vox1 is None and vox2 is None:
        raise PreparationError("give --vox1 and/or --vox2")
    unknown = set(train_on) - {"vox1", "vox2"}
    if unknown:
        raise PreparationError(f"--train-on takes vox1 and/or vox2, got {sorted(unknown)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roots = {name: Path(folder).resolve() for name, folder in (("vox1", vox1), ("vox2", vox2)) if folder is not None}
    corpus = {name: scan_corpus(folder, name) for name, folder in roots.items()}
    all_utterances = [u for utterances in corpus.values() for u in utterances]
    failures = read_durations(all_utterances, workers=workers, progress=progress)
    failed = {id(u) for u, _ in failures}
    summary: Dict = {"roots": {f"{k}_root": str(v) for k, v in roots.items()}, "warnings": []}
    if failures:
        listing = "; ".join(f"{u.path}: {reason}" for u, reason in failures[:5])
        message = f"{len(failures)} unreadable audio files skipped (first: {listing})"
        logger.warning(message)
        summary["warnings"].append(message)
        (out / "unreadable.txt").write_text("".join(f"{u.path}\t{reason}\n" for u, reason in failures))
    readable = {name: [u for u in utterances if id(u) not in failed] for name, utterances in corpus.items()}

    # Trial lists: their utterances are looked up in VoxCeleb1 (and VoxCeleb2 when given).
    by_key = {utterance_key(u.id): u for utterances in readable.values() for u in utterances}
    trial_utterances: Dict[str, Utterance] = {}
    excluded_speakers = set()
    summary["trials"] = {}
    for trials_path in trials:
        trial_list = read_trials(trials_path)
        ids = set(trial_list.enroll) | set(trial_list.test)
        missing = sorted(i for i in ids if utterance_key(i) not in by_key)
        name = Path(trials_path).name
        summary["trials"][name] = {"trials": len(trial_list), "utterances": len(ids),
                                   "missing_utterances": len(missing)}
        if missing:
            message = f"{name}: {len(missing)} trial utterances do not exist (first: {', '.join(missing[:5])})"
            logger.warning(message)
            summary["warnings"].append(message)
        official = OFFICIAL_COUNTS["trials"].get(name)
        if official is not None and official != len(trial_list):
            message = f"{name}: {len(trial_list)} trials, the official list has {official}"
            logger.warning(message)
            summary["warnings"].append(message)
        for i in ids:
            excluded_speakers.add(utterance_key(i).split("/")[0])
            if utterance_key(i) in by_key:
                trial_utterances[utterance_key(i)] = by_key[utterance_key(i)]

    if "vox2" in readable:
        speakers = {u.speaker for u in readable["vox2"]}
        utterances = len(readable["vox2"])
        for key, value in (("vox2_dev_speakers", len(speakers)), ("vox2_dev_utterances", utterances)):
            if value != OFFICIAL_COUNTS[key]:
                message = f"VoxCeleb2 dev: {value} {key.split('_')[-1]}, the official count is {OFFICIAL_COUNTS[key]}"
                logger.warning(message)
                summary["warnings"].append(message)

    training = [u for name in train_on if name in readable for u in readable[name]
                if u.speaker not in excluded_speakers]
    if not training:
        raise PreparationError("no training utterances left: every speaker is in a trial list, "
                               f"or --train-on {list(train_on)} names corpora not given")
    if calibration_speakers:
        candidates = sorted({u.speaker for u in training})
        if not 2 <= calibration_speakers < len(candidates):
            raise PreparationError(f"calibration_speakers must lie in [2, {len(candidates) - 1}] (there are "
                                   f"{len(candidates)} training speakers), got {calibration_speakers}")
        chosen = np.random.default_rng([seed, 2]).choice(len(candidates), calibration_speakers, replace=False)
        held_out = {candidates[i] for i in chosen}
        calibration = sorted((u for u in training if u.speaker in held_out), key=lambda u: u.id)
        training = [u for u in training if u.speaker not in held_out]
    else:
        calibration = []
    speakers = sorted({u.speaker for u in training})
    speaker_index = {s: i for i, s in enumerate(speakers)}
    rng = np.random.default_rng(seed)
    valid_mask = rng.random(len(training)) < valid_fraction
    train_rows, valid_rows = [], []
    for utterance, is_valid in zip(training, valid_mask):
        for start, stop in _chunks(utterance, chunk_seconds, min_seconds):
            (valid_rows if is_valid else train_rows).append(_row(utterance, start, stop, f"_{start}_{stop}"))
    _write_csv(out / "train.csv", train_rows)
    _write_csv(out / "valid.csv", valid_rows)
    trial_rows = [_whole_file_row(u) for u in sorted(trial_utterances.values(), key=lambda u: u.id)]
    _write_csv(out / "trial_utterances.csv", trial_rows)
    calibration_csv = out / "calibration.csv"
    if calibration:
        _write_csv(calibration_csv, [_whole_file_row(u) for u in calibration])
    else:
        calibration_csv.unlink(missing_ok=True)  # not a stale split of an earlier preparation
    (out / "speakers.json").write_text(json.dumps(speaker_index, indent=0) + "\n")
    (out / "roots.json").write_text(json.dumps(summary["roots"], indent=2) + "\n")
    summary.update({
        "scanned": {name: len(utterances) for name, utterances in corpus.items()},
        "unreadable": len(failures),
        "excluded_speakers": len(excluded_speakers),
        "train": {"speakers": len(speakers), "utterances": int((~valid_mask).sum()), "rows": len(train_rows),
                  "hours": round(sum(float(r["duration"]) for r in train_rows) / 3600, 3)},
        "valid": {"utterances": int(valid_mask.sum()), "rows": len(valid_rows)},
        "trial_utterances": len(trial_rows),
        "calibration": {"speakers": calibration_speakers, "utterances": len(calibration)},
    })
    (out / "counts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
