"""The manifests every corpus layout is prepared into, and the audio cache that makes them 16 kHz mono.

A preparation (``spkver prepare voxceleb|folder|kaldi|cnceleb``) turns a corpus into
:class:`Utterance` records, then :func:`write_manifests` writes the same files for all of them:

* ``train.csv`` / ``valid.csv`` -- chunked training rows ``ID, duration, wav, start, stop, spk_id``
  (``start``/``stop`` in samples; ``wav`` is ``$<root>_root/<relative path>``, SpeechBrain's
  placeholder convention, ``roots.json`` mapping each placeholder to its folder);
* ``trial_utterances.csv`` -- the utterances trials may name, whole; ``calibration.csv`` -- the
  whole files of the speakers held out for calibration (when asked);
* ``speakers.json`` (speaker -> class index), ``counts.json`` (the counts, the warnings, the
  skipped files), ``skipped.tsv`` (every file left out, with the reason: unreadable, empty, shorter
  than the minimum).

Audio that is not 16 kHz mono, or that is not a file of its own (a Kaldi segment, a ``wav.scp``
pipe), is converted once by :func:`cache_audio` into ``<out>/cache/`` (16-bit PCM wave, 16 kHz,
channels averaged), and the manifests point there: training never resamples an item.

>>> records = [("a/s1/1", "a", "s1"), ("a/s2/2", "a", "s2"), ("b/s3/3", "b", "s3")]
>>> cross_session_trials(records, None)
[(1, 'a/s1/1', 'a/s2/2'), (0, 'a/s1/1', 'b/s3/3'), (0, 'a/s2/2', 'b/s3/3')]
"""
from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from spkver.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["PreparationError", "Utterance", "read_headers", "cache_audio", "write_manifests", "cross_session_trials",
           "write_trials", "manifest_records", "prepare_utterances", "auto_calibration_speakers", "AUDIO_EXTENSIONS",
           "SAMPLE_RATE"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au", ".sph")
SAMPLE_RATE = 16000


class PreparationError(UserError, ValueError):
    """Bad input to preparation: names the folder or file."""


@dataclass
class Utterance:
    """One utterance of a corpus.

    ``id`` is ``speaker/session/name`` (or ``speaker/name`` when sessions are unknown); ``path`` the
    audio file, or ``source`` a shell command whose output is the audio (Kaldi's ``wav.scp`` pipes);
    ``segment`` a ``(start, end)`` in seconds of a longer recording (Kaldi's ``segments``).
    """

    id: str
    path: Optional[Path]
    root: str                     # the placeholder's name: "$<root>_root"
    relative: str                 # the path relative to that root
    duration: float = math.nan
    sample_rate: int = 0
    channels: int = 0
    source: Optional[str] = None
    segment: Optional[Tuple[float, float]] = None

    @property
    def speaker(self) -> str:
        return self.id.split("/")[0]

    @property
    def session(self) -> str:
        """The recording session (the middle of ``speaker/session/name``; the utterance itself when unknown)."""
        parts = self.id.split("/")
        return parts[1] if len(parts) >= 3 else self.id

    @property
    def needs_cache(self) -> bool:
        return (self.source is not None or self.segment is not None or self.sample_rate != SAMPLE_RATE
                or self.channels != 1)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.id} ({self.source})"


def _read_header(utterance: Utterance) -> Optional[str]:
    """Fill duration, rate and channels from the header; return the reason it failed instead of raising."""
    if utterance.source is not None:
        return None  # a pipe: read when cached
    if utterance.path.suffix.lower() == ".m4a":
        return _read_m4a_header(utterance)
    import soundfile

    if not utterance.path.exists():
        return "no such file"
    try:
        info = soundfile.info(str(utterance.path))
    except Exception as error:  # soundfile raises several types for corrupt files
        return str(error).splitlines()[0]
    if info.frames <= 0:
        return "empty: no audio frames"
    utterance.duration = info.frames / info.samplerate
    utterance.sample_rate, utterance.channels = info.samplerate, info.channels
    if utterance.segment is not None:
        start, end = utterance.segment
        if not 0 <= start < end <= utterance.duration + 0.01:
            return f"segment {start}-{end} s outside the recording's {utterance.duration:.2f} s"
        utterance.duration = end - start
    return None


def _read_m4a_header(utterance: Utterance) -> Optional[str]:
    import shutil

    if shutil.which("ffprobe") is None:
        return "m4a needs ffprobe (install ffmpeg) or conversion with `spkver convert-m4a`"
    result = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=sample_rate,channels",
                             "-of", "json", str(utterance.path)], capture_output=True, text=True)
    try:
        info = json.loads(result.stdout)
        utterance.duration = float(info["format"]["duration"])
        utterance.sample_rate = int(info["streams"][0]["sample_rate"])
    except (KeyError, IndexError, ValueError):
        return (result.stderr.strip() or "ffprobe could not read it").splitlines()[-1]
    utterance.channels = 1  # VoxCeleb2's m4a: 16 kHz mono, decoded by ffmpeg where it is read
    return None


def read_headers(utterances: Sequence[Utterance], workers: int = 8,
                 progress: bool = True) -> List[Tuple[Utterance, str]]:
    """Read every header in parallel; return the (utterance, reason) pairs that failed."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(tqdm(pool.map(_read_header, utterances, chunksize=64), total=len(utterances),
                           desc="reading headers", unit="file", disable=not progress))
    return [(u, e) for u, e in zip(utterances, errors) if e is not None]


def _decode(utterance: Utterance) -> Tuple[np.ndarray, int]:
    """(samples, channels), rate of the utterance's audio: its file, its segment, or its pipe's output."""
    import io

    import soundfile

    if utterance.source is not None:
        result = subprocess.run(utterance.source, shell=True, capture_output=True)
        if result.returncode != 0:
            raise OSError(f"the command exited with {result.returncode}: "
                          f"{result.stderr.decode(errors='replace').strip()[:200]}")
        audio, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
    elif utterance.segment is not None:
        info = soundfile.info(str(utterance.path))
        start, end = (int(round(t * info.samplerate)) for t in utterance.segment)
        audio, rate = soundfile.read(str(utterance.path), start=start, stop=end, dtype="float32", always_2d=True)
    else:
        audio, rate = soundfile.read(str(utterance.path), dtype="float32", always_2d=True)
    return audio, rate


def _cache_one(job: Tuple[Utterance, Path]) -> Optional[str]:
    import soundfile
    import torch
    import torchaudio

    utterance, target = job
    if target.exists():  # written whole (renamed into place) by an earlier run
        info = soundfile.info(str(target))
        utterance.duration, utterance.sample_rate, utterance.channels = info.duration, info.samplerate, 1
        return None
    try:
        audio, rate = _decode(utterance)
    except Exception as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE and mono.size:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy()
    if mono.size == 0:
        return "empty: no audio frames"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    soundfile.write(str(partial), np.clip(mono, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    partial.replace(target)
    utterance.duration, utterance.sample_rate, utterance.channels = mono.size / SAMPLE_RATE, SAMPLE_RATE, 1
    return None


def cache_audio(utterances: Sequence[Utterance], out: Path, workers: int = 4,
                progress: bool = True) -> Tuple[List[Tuple[Utterance, str]], dict]:
    """Convert the utterances that are not 16 kHz mono files into ``out/cache`` once; repoint them there.

    Returns the failures (utterance, reason) and a summary: how many were converted, from which rates
    and channel counts. A re-run finds the converted files and converts nothing again.
    """
    from tqdm import tqdm

    pending = [u for u in utterances if u.needs_cache]
    summary = {"converted": len(pending), "from_rates": dict(Counter(u.sample_rate for u in pending if u.sample_rate)),
               "from_channels": dict(Counter(u.channels for u in pending if u.channels)),
               "segments_or_pipes": sum(u.source is not None or u.segment is not None for u in pending)}
    if not pending:
        return [], summary
    cache = out / "cache"
    jobs = [(u, cache / (_without_audio_extension(u.id) + ".wav")) for u in pending]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        errors = list(tqdm(pool.map(_cache_one, jobs), total=len(jobs), desc="resampling to 16 kHz mono",
                           unit="file", disable=not progress))
    for (utterance, target), error in zip(jobs, errors):
        if error is None:
            utterance.root, utterance.relative, utterance.path = "cache", target.relative_to(cache).as_posix(), target
            utterance.source = utterance.segment = None
    logger.info(f"audio cache: {len(jobs) - sum(e is not None for e in errors)} of {len(utterances)} files converted "
                f"to 16 kHz mono into {cache} (sample rates {summary['from_rates']}, channels "
                f"{summary['from_channels']}, segments or pipes {summary['segments_or_pipes']})")
    return [(u, e) for (u, _), e in zip(jobs, errors) if e is not None], summary


def _without_audio_extension(name: str) -> str:
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in AUDIO_EXTENSIONS else name


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


def write_csv(path: Path, rows: List[dict]) -> None:
    """A manifest, written whole (renamed into place)."""
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


def whole_file_row(utterance: Utterance) -> dict:
    return _row(utterance, 0, int(round(utterance.duration * (utterance.sample_rate or SAMPLE_RATE))))


def auto_calibration_speakers(speakers: int) -> int:
    """Speakers to hold out for calibration by default: a tenth, at most 200 (VoxCeleb2's 5,994 give 200), none
    of fewer than 20 (the training set could not spare them).

    >>> auto_calibration_speakers(5994), auto_calibration_speakers(42), auto_calibration_speakers(12)
    (200, 4, 0)
    """
    return 0 if speakers < 20 else min(200, max(2, round(speakers / 10)))


def _seeded_speakers(speakers: List[str], count: int, seed: list, argument: str, kind: str, spare: int) -> set:
    """``count`` of ``speakers`` drawn with ``seed``, leaving at least ``spare`` of them (none when ``count`` is 0);
    a count outside [2, len - spare] is a :class:`PreparationError` naming ``argument``."""
    if count and not 2 <= count <= len(speakers) - spare:
        raise PreparationError(f"{argument} must lie in [2, {len(speakers) - spare}] (there are {len(speakers)} "
                               f"{kind} speakers), got {count}")
    chosen = np.random.default_rng(seed).choice(len(speakers), count, replace=False)
    return {speakers[i] for i in chosen}


def _without_short(utterances: List[Utterance], min_seconds: float):
    """(the utterances of at least ``min_seconds``, and the others with the reason, as ``skipped.tsv`` lists them)."""
    return ([u for u in utterances if u.duration >= min_seconds],
            [(u, f"{u.duration:.2f} s, shorter than the {min_seconds} s minimum")
             for u in utterances if u.duration < min_seconds])


def write_manifests(out: Path, roots: Dict[str, Path], training: List[Utterance], trial_utterances: List[Utterance],
                    summary: dict, skipped: List[Tuple[Utterance, str]], chunk_seconds: float = 3.0,
                    min_seconds: float = 1.0, valid_fraction: float = 0.01, calibration_speakers="auto",
                    seed: int = 0) -> dict:
    """Split ``training`` (validation files, calibration speakers) and write every manifest; return the summary.

    ``calibration_speakers`` training speakers (a seeded choice) are held out of training altogether
    and their whole files listed in ``calibration.csv``: pairs of speakers the extractor never saw,
    which a score calibration needs to be right on new speakers (``"auto"``:
    :func:`auto_calibration_speakers`). Training files shorter than
    ``min_seconds`` join ``skipped`` (and ``skipped.tsv``) with the reason.
    """
    training, too_short = _without_short(training, min_seconds)
    skipped = list(skipped) + too_short
    if not training:
        raise PreparationError(f"no training utterances left ({len(skipped)} skipped: see {out / 'skipped.tsv'})"
                               if skipped else "no training utterances")
    if calibration_speakers == "auto":
        calibration_speakers = auto_calibration_speakers(len({u.speaker for u in training}))
    if calibration_speakers:
        held_out = _seeded_speakers(sorted({u.speaker for u in training}), calibration_speakers, [seed, 2],
                                    "calibration_speakers", "training", spare=1)
        calibration = sorted((u for u in training if u.speaker in held_out), key=lambda u: u.id)
        training = [u for u in training if u.speaker not in held_out]
    else:
        calibration = []
    speakers = sorted({u.speaker for u in training})
    speaker_index = {s: i for i, s in enumerate(speakers)}
    valid_mask = np.random.default_rng(seed).random(len(training)) < valid_fraction
    train_rows, valid_rows = [], []
    for utterance, is_valid in zip(training, valid_mask):
        for start, stop in _chunks(utterance, chunk_seconds, min_seconds):
            (valid_rows if is_valid else train_rows).append(_row(utterance, start, stop, f"_{start}_{stop}"))
    write_csv(out / "train.csv", train_rows)
    write_csv(out / "valid.csv", valid_rows)
    write_csv(out / "trial_utterances.csv", [whole_file_row(u) for u in sorted(trial_utterances, key=lambda u: u.id)])
    calibration_csv = out / "calibration.csv"
    if calibration:
        write_csv(calibration_csv, [whole_file_row(u) for u in calibration])
    else:
        calibration_csv.unlink(missing_ok=True)  # not a stale split of an earlier preparation
    (out / "speakers.json").write_text(json.dumps(speaker_index, indent=0) + "\n")
    summary["roots"] = {f"{name}_root": str(Path(folder).resolve()) for name, folder in roots.items()}
    (out / "roots.json").write_text(json.dumps(summary["roots"], indent=2) + "\n")
    (out / "skipped.tsv").write_text("".join(f"{u}\t{reason}\n" for u, reason in skipped))
    if skipped:
        message = (f"{len(skipped)} files skipped (listed in {out / 'skipped.tsv'}; first: "
                   + "; ".join(f"{u}: {reason}" for u, reason in skipped[:3]) + ")")
        logger.warning(message)
        summary.setdefault("warnings", []).append(message)
    summary.update({
        "skipped": len(skipped),
        "train": {"speakers": len(speakers), "utterances": int((~valid_mask).sum()), "rows": len(train_rows),
                  "hours": round(sum(float(r["duration"]) for r in train_rows) / 3600, 3)},
        "valid": {"utterances": int(valid_mask.sum()), "rows": len(valid_rows)},
        "trial_utterances": len(trial_utterances),
        "calibration": {"speakers": calibration_speakers, "utterances": len(calibration)},
    })
    (out / "counts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cross_session_trials(records: Sequence[Tuple[str, object, object]], per_utterance: Optional[int] = None,
                         seed: int = 0) -> List[Tuple[int, str, str]]:
    """``(label, enroll, test)`` trials over ``(utterance, speaker, session)`` records.

    ``per_utterance=None``: every pair once, except same-speaker pairs of one session (they share the
    channel: too easy). Otherwise each utterance enrols ``per_utterance`` trials, alternately a
    cross-session target (when its speaker has another session) and a non-target, drawn with ``seed``.
    """
    records = list(records)
    if per_utterance is None:
        return [(int(a[1] == b[1]), a[0], b[0]) for i, a in enumerate(records) for b in records[i + 1:]
                if a[1] != b[1] or a[2] != b[2]]
    rng = np.random.default_rng([seed, 1])
    trials = []
    for utterance_id, speaker, session in records:
        same = [r[0] for r in records if r[1] == speaker and r[2] != session]
        other = [r[0] for r in records if r[1] != speaker]
        for k in range(per_utterance):
            if k % 2 == 0 and same:
                trials.append((1, utterance_id, same[rng.integers(len(same))]))
            elif other:
                trials.append((0, utterance_id, other[rng.integers(len(other))]))
    return trials


def write_trials(path: Path, trials: Sequence[Tuple[int, str, str]]) -> Path:
    """A VoxCeleb-format trial list (``label enroll test``)."""
    Path(path).write_text("".join(f"{label} {a} {b}\n" for label, a, b in trials))
    return Path(path)


def manifest_records(manifest: Path) -> List[Tuple[str, str, str]]:
    """``(ID, speaker, session)`` of a manifest's rows (whole-file manifests: trial_utterances.csv)."""
    with open(manifest) as rows:
        records = [(row["ID"], row["spk_id"], Utterance(row["ID"], None, "", "").session)
                   for row in csv.DictReader(rows)]
    if not records:
        raise PreparationError(f"{manifest} lists no utterances")
    return records


def prepare_utterances(out, roots: Dict[str, Path], utterances: List[Utterance], test_speakers: int = 0,
                       trials_per_utterance: Optional[int] = 8, chunk_seconds: float = 3.0, min_seconds: float = 1.0,
                       valid_fraction: float = 0.01, calibration_speakers="auto", seed: int = 0, workers: int = 8,
                       progress: bool = True, summary: Optional[dict] = None,
                       left_out: Sequence[Tuple[str, str]] = (), evaluation_ids: Iterable[str] = ()) -> dict:
    """Headers, the audio cache, a held-out test set and its trial list, and the manifests, for a corpus of speakers.

    ``test_speakers`` speakers (a seeded choice) are held out of training altogether; their files are
    the trial utterances and ``trials.txt`` pairs them (:func:`cross_session_trials`, with
    ``trials_per_utterance`` trials per file, or every pair when it is ``None``). ``left_out``: (name,
    reason) pairs the layout's reader already set aside, reported with the skipped files.
    ``evaluation_ids``: utterances (by :func:`~spkver.scoring.utterance_key`) that a corpus's own
    trial lists name: trial utterances, never trained on.
    """
    from spkver.scoring import utterance_key

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not utterances:
        raise PreparationError(f"no audio files found under {', '.join(str(p) for p in roots.values())}")
    skipped = read_headers(utterances, workers=workers, progress=progress)
    failed = {id(u) for u, _ in skipped}
    cache_failures, cached = cache_audio([u for u in utterances if id(u) not in failed], out, progress=progress)
    skipped += cache_failures + list(left_out)
    failed |= {id(u) for u, _ in cache_failures}
    if cached["converted"]:
        roots = {**roots, "cache": out / "cache"}
    readable = [u for u in utterances if id(u) not in failed]
    readable, too_short = _without_short(readable, min_seconds)
    skipped += too_short
    held_out = _seeded_speakers(sorted({u.speaker for u in readable}), test_speakers, [seed, 3], "--test-speakers",
                                "readable", spare=2)
    evaluation_ids = set(evaluation_ids)
    listed = [u for u in readable if utterance_key(u.id) in evaluation_ids]
    readable = [u for u in readable if utterance_key(u.id) not in evaluation_ids]
    test = sorted((u for u in readable if u.speaker in held_out), key=lambda u: u.id)
    summary = dict(summary or {}, scanned=len(utterances), cache=cached, warnings=[])
    if test:
        trials = cross_session_trials([(u.id, u.speaker, u.session) for u in test], trials_per_utterance, seed)
        write_trials(out / "trials.txt", trials)
        summary["trials"] = {"trials.txt": {"trials": len(trials), "targets": sum(t[0] for t in trials),
                                            "speakers": test_speakers, "utterances": len(test)}}
    training = [u for u in readable if u.speaker not in held_out]
    return write_manifests(out, roots, training, test + listed, summary, skipped, chunk_seconds=chunk_seconds,
                           min_seconds=min_seconds, valid_fraction=valid_fraction,
                           calibration_speakers=calibration_speakers, seed=seed)
