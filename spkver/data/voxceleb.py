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
  speakers; ``skipped.tsv`` — the files left out and why.

(:func:`spkver.data.manifests.write_manifests` writes them, as for every
corpus layout.) Durations come from file headers (``soundfile.info``;
``ffprobe`` for m4a), read in parallel with a progress bar.  Unreadable,
empty or too short files are listed and skipped; trial utterances that do not
exist are counted and listed; differences from the official counts are
warnings.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence

from spkver.data.manifests import PreparationError, Utterance, cache_audio, read_headers, write_manifests
from spkver.scoring import read_trials, utterance_key

logger = logging.getLogger(__name__)

__all__ = ["PreparationError", "Utterance", "scan_corpus", "prepare_voxceleb", "OFFICIAL_COUNTS"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a")
OFFICIAL_COUNTS = {
    "vox2_dev_speakers": 5994,
    "vox2_dev_utterances": 1092009,
    "trials": {"veri_test2.txt": 37611, "veri_test.txt": 37720, "list_test_all2.txt": 579818,
               "list_test_all.txt": 581480, "list_test_hard2.txt": 550894, "list_test_hard.txt": 552536},
}


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


def prepare_voxceleb(out, vox1=None, vox2=None, trials: Sequence = (), train_on: Sequence[str] = ("vox1", "vox2"),
                     chunk_seconds: float = 3.0, min_seconds: float = 1.0, valid_fraction: float = 0.01,
                     calibration_speakers="auto", seed: int = 0, workers: int = 8,
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
    failures = read_headers(all_utterances, workers=workers, progress=progress)
    failed = {id(u) for u, _ in failures}
    cache_failures, cached = cache_audio([u for u in all_utterances if id(u) not in failed], out, progress=progress)
    failures += cache_failures
    failed |= {id(u) for u, _ in cache_failures}
    if cached["converted"]:
        roots["cache"] = out / "cache"
    summary: Dict = {"warnings": [], "cache": cached}
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
    summary.update({"scanned": {name: len(utterances) for name, utterances in corpus.items()},
                    "unreadable": len(failures), "excluded_speakers": len(excluded_speakers)})
    return write_manifests(out, roots, training, list(trial_utterances.values()), summary, failures,
                           chunk_seconds=chunk_seconds, min_seconds=min_seconds, valid_fraction=valid_fraction,
                           calibration_speakers=calibration_speakers, seed=seed)
