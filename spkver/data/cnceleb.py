"""CN-Celeb1 and CN-Celeb2 (OpenSLR 82) as distributed, flac or converted wav.

``spkver prepare cnceleb ROOT [ROOT ...] --out DIR``

* ``ROOT/data/<speaker>/<genre>-<session>-<index>.flac``: the utterances (every root's are training
  data, except the evaluation speakers');
* ``ROOT/eval/lists/enroll.map``: ``<enrolment id> <utterance> <utterance> ...`` (utterances relative
  to ``data/``), ``ROOT/eval/lists/trials.lst``: ``<enrolment id> test/<file> <0|1>``,
  ``ROOT/eval/test/`` and ``ROOT/eval/enroll/<speaker>-enroll.flac`` (the enrolment utterances joined
  into one file): in CN-Celeb1's root.

Written beside the manifests: ``trials.txt`` (VoxCeleb format; the enrolment side names a speaker of
``enroll.map``: score with ``spkver score --enroll DIR/enroll.map``; the recipe's evaluation and
``spkver evaluate`` read the manifest folder's ``enroll.map`` themselves), ``enroll.map`` (spkver's IDs),
and ``trials_concat.txt`` (the enrolment side is the joined file, CN-Celeb's other protocol). The
evaluation speakers (those of ``enroll.map``) are held out of training.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from spkver.data.manifests import AUDIO_EXTENSIONS, PreparationError, Utterance, prepare_utterances, write_trials
from spkver.scoring import read_enrolment_map, utterance_key

__all__ = ["prepare_cnceleb", "EVALUATION_LISTS"]

EVALUATION_LISTS = ("enroll.map", "trials.lst")


def _audio(folder: Path, root_name: str, root: Path, prefix: str = "") -> List[Utterance]:
    return [Utterance(prefix + path.relative_to(folder).as_posix(), path, root_name, path.relative_to(root).as_posix())
            for path in sorted(folder.rglob("*")) if path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS]


def prepare_cnceleb(roots: Sequence, out, **settings) -> dict:
    """Manifests, trial lists and the enrolment map for CN-Celeb roots (the first with ``eval/`` evaluates).

    ``settings``: those of :func:`~spkver.data.manifests.prepare_utterances` but ``test_speakers``.
    """
    roots = [Path(root) for root in roots]
    for root in roots:
        if not (root / "data").is_dir():
            raise PreparationError(f"{root}: no data/ folder (CN-Celeb's data/<speaker>/<file>.flac)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {root: f"cnceleb{index + 1}" for index, root in enumerate(roots)}
    utterances = [u for root in roots for u in _audio(root / "data", names[root], root)]
    evaluation = next((root for root in roots if (root / "eval" / "lists").is_dir()), None)
    enrolment, trials = {}, []
    if evaluation is not None:
        lists = evaluation / "eval" / "lists"
        missing = [name for name in EVALUATION_LISTS if not (lists / name).exists()]
        if missing:
            raise PreparationError(f"{lists}: no {' or '.join(missing)}")
        enrolment = {name: [utterance_key(path) for path in files]
                     for name, files in read_enrolment_map(lists / "enroll.map").items()}
        for number, line in enumerate((lists / "trials.lst").read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[2] not in ("0", "1"):
                raise PreparationError(f"{lists / 'trials.lst'}:{number}: expected '<enrolment id> <test file> "
                                       f"<0|1>', got {line!r}")
            trials.append((int(fields[2]), fields[0], utterance_key(fields[1])))
        for folder in ("test", "enroll"):
            if (evaluation / "eval" / folder).is_dir():
                utterances += _audio(evaluation / "eval" / folder, names[evaluation], evaluation, f"{folder}/")
    evaluation_speakers = {utterance.split("/")[0] for files in enrolment.values() for utterance in files}
    evaluation_files = {key for files in enrolment.values() for key in files} | {t[2] for t in trials}
    evaluation_files |= {f"enroll/{name}" for name in enrolment}
    is_test = [utterance_key(u.id) in evaluation_files for u in utterances]
    excluded = [u for u, test in zip(utterances, is_test) if not test and u.speaker in evaluation_speakers]
    kept = [u for u in utterances if u not in excluded]
    summary = {"evaluation_speakers": len(evaluation_speakers), "excluded_utterances": len(excluded)}
    settings = dict(settings, test_speakers=0)
    summary = prepare_utterances(out, {name: root for root, name in names.items()}, kept, summary=summary,
                                 evaluation_ids=evaluation_files, **settings)
    if trials:
        write_trials(out / "trials.txt", trials)
        (out / "enroll.map").write_text("".join(f"{name} {' '.join(files)}\n" for name, files in enrolment.items()))
        if (evaluation / "eval" / "enroll").is_dir():
            write_trials(out / "trials_concat.txt", [(label, f"enroll/{name}", test) for label, name, test in trials])
    return summary
