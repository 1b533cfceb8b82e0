"""A folder of speakers: ``ROOT/<speaker>/**/<file>``, in any audio format soundfile reads.

``spkver prepare folder ROOT --out DIR [--test-speakers N] [--calibration-speakers N]``

Each top-level folder is a speaker; a sub-folder, when there is one, is the recording session
(``ROOT/alice/2024-03-01/take1.flac``: speaker ``alice``, session ``2024-03-01``), which the trial
list uses to pair targets across sessions. Files that are not 16 kHz mono are converted once into
``DIR/cache``; unreadable, empty and too-short files are listed in ``DIR/skipped.tsv``. The
manifests are those of every corpus (:mod:`spkver.data.manifests`).

>>> import tempfile, numpy, soundfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / "alice" / "s1").mkdir(parents=True)
>>> soundfile.write(root / "alice" / "s1" / "a.wav", numpy.zeros(800), 16000)
>>> [u.id for u in scan_folder(root)]
['alice/s1/a.wav']
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import List

from spkver.data.manifests import AUDIO_EXTENSIONS, PreparationError, Utterance, prepare_utterances

logger = logging.getLogger(__name__)

__all__ = ["scan_folder", "prepare_folder"]


def _audio_extensions() -> set:
    import soundfile

    return {f".{name.lower()}" for name in soundfile.available_formats()} | set(AUDIO_EXTENSIONS) - {".m4a"}


def scan_folder(root) -> List[Utterance]:
    """Every audio file ``ROOT/<speaker>/**/<file>``; files at the top level or with other extensions are ignored
    (and counted in the log)."""
    root = Path(root)
    if not root.is_dir():
        raise PreparationError(f"{root}: no such folder")
    extensions = _audio_extensions()
    utterances, ignored = [], Counter()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root)
        if len(relative.parts) < 2 or path.suffix.lower() not in extensions:
            ignored[path.suffix.lower() or "(none)"] += 1
            continue
        utterances.append(Utterance(relative.as_posix(), path, "folder", relative.as_posix()))
    if ignored:
        logger.info(f"{root}: {sum(ignored.values())} files ignored (not ROOT/<speaker>/.../<audio file>): "
                    f"{dict(ignored)}")
    if not utterances:
        raise PreparationError(f"{root}: no audio files in speaker folders (ROOT/<speaker>/**/<file>)")
    return utterances


def prepare_folder(root, out, **settings) -> dict:
    """Manifests for a folder of speakers (``settings``: those of :func:`~spkver.data.manifests.prepare_utterances`)."""
    root = Path(root)
    return prepare_utterances(out, {"folder": root}, scan_folder(root), **settings)
