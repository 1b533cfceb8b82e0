"""Evaluation as its own stage: embed, centre, score, normalise, calibrate, report, write the model card.

One implementation serves both roads: the recipe calls :func:`evaluate_model`
after training, and ``spkver evaluate --model FOLDER`` runs it again on any
model folder :meth:`~spkver.inference.SpeakerEmbedder.from_pretrained` reads
(after changing a trial list or a setting), with the settings the recipe
recorded in ``evaluation.json``.  The steps:

1. **averaging**: an experiment folder's extractor is the mean of its last
   ``average_last`` checkpoints (WeSpeaker's 10), written beside them;
2. **centring**: the mean embedding of a sample of training utterances is
   subtracted (the folder's ``mean_embedding.npy`` when there is no training
   manifest); the sample's speaker means are the AS-norm cohort;
3. **development pairs**: the calibration speakers' whole files (held out of
   training), else the training speakers' validation files, embedded once:
   their pairs train the score-to-LLR calibration and set the model card's
   threshold;
4. **trial lists** scored in :class:`~spkver.scoring.Stage` s, as WeSpeaker's results are:
   cosine, AS-norm, and calibrated LLRs;
5. **writing** ``results.json`` (:data:`RESULTS_VERSION`, see
   :func:`results_document`), ``results.md``, ``cohort.npz``,
   ``calibration.json``, and the model card ``spkver.json`` with
   ``mean_embedding.npy``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from spkver import metrics
from spkver.calibration import (
    MIN_NONTARGETS,
    Calibration,
    CalibrationError,
    check_development_pairs,
    fit_calibration,
    quality_features,
)
from spkver.checkpoints import AVERAGED_MODEL, write_average
from spkver.data.datasets import manifest_roots
from spkver.errors import UserError
from spkver.inference import audio_seconds, embed_files, extractor_fingerprint
from spkver.report import DEFAULT_FARS, markdown_table, stage_rows, text_table
from spkver.scoring import (
    EmbeddingStore,
    Stage,
    Trials,
    as_norm,
    cosine_scores,
    load_embeddings,
    read_enrolment_map,
    read_trials,
    save_embeddings,
    score_stages,
    speaker_mean_cohort,
    with_enrolment,
)

logger = logging.getLogger(__name__)

__all__ = ["EvaluationError", "EvaluationSettings", "Threshold", "DevelopmentFiles", "RESULTS_VERSION",
           "resolve_wav", "training_sample", "development_files", "calibrate_on_development", "calibrate_threshold",
           "results_document", "read_results", "write_results", "write_model_card",
           "average_experiment", "score_before_training", "evaluate_model"]

#: The version of ``results.json``'s schema (:func:`results_document`).
RESULTS_VERSION = 1
#: When a model was evaluated: the keys of each stage in ``results.json``.
MOMENTS = ("before_training", "after_training")


class EvaluationError(UserError, ValueError):
    """An evaluation the folder, the manifests or the settings cannot support: names what is missing."""


@dataclass
class EvaluationSettings:
    """What the evaluation reads and how (the recipe's hparams of the same names; ``evaluation.json``)."""

    manifest_folder: str
    trial_lists: List[str]
    stages: List[str] = dataclasses.field(default_factory=lambda: [stage.value for stage in Stage])
    average_last: int = 1
    mean_utterances: int = 2000
    embedding_batch_size: int = 16
    asnorm_topk: int = 300
    calibration_prior: float = 0.01
    calibration_short_seconds: float = 2.0
    calibration_utterances: int = 800
    calibration_far: Optional[float] = None
    calibration_min_nontargets: int = MIN_NONTARGETS

    FILE = "evaluation.json"

    @classmethod
    def from_hparams(cls, hparams) -> "EvaluationSettings":
        """The settings of a recipe's hparams (every field is a key of ``hparams/recipe.yaml``)."""
        values = {field.name: hparams[field.name] for field in dataclasses.fields(cls)
                  if field.name in hparams and field.name != "stages"}
        return cls(**{**values, "manifest_folder": str(values["manifest_folder"]),
                      "trial_lists": [str(path) for path in values["trial_lists"]]})

    @classmethod
    def read(cls, folder) -> "EvaluationSettings":
        path = Path(folder) / cls.FILE
        try:
            values = json.loads(path.read_text())
            return cls(**values)
        except FileNotFoundError:
            raise EvaluationError(f"{folder}: no {cls.FILE} (the recipe writes it): give --manifests and "
                                  "--trials") from None
        except (ValueError, TypeError) as error:
            raise EvaluationError(f"{path}: not an evaluation settings file ({error})") from None

    def write(self, folder) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    def chosen_stages(self) -> List[Stage]:
        """The stages in their order, checked: names that are not stages are an :class:`EvaluationError`."""
        try:
            chosen = {Stage(name) for name in self.stages}
        except ValueError:
            raise EvaluationError(f"stages must be among {', '.join(s.value for s in Stage)}; "
                                  f"got {', '.join(self.stages)}") from None
        return [stage for stage in Stage if stage in chosen]


def resolve_wav(wav: str, roots: dict) -> str:
    """``$vox1_root/wav/...`` to a real path."""
    for key, value in roots.items():
        wav = wav.replace(f"${key}", value)
    return wav


def training_sample(extractor, manifest_folder, utterances: int = 2000, seed: int = 0, device="cpu",
                    progress: bool = True) -> EmbeddingStore:
    """Embeddings of up to ``utterances`` whole training files (a fixed random sample), IDs ``speaker/file``.

    Its mean is the embedding subtracted before scoring; its speaker means are the AS-norm cohort.
    """
    roots = manifest_roots(manifest_folder)
    with open(Path(manifest_folder) / "train.csv") as rows:
        speaker_of = {resolve_wav(row["wav"], roots): row["spk_id"] for row in csv.DictReader(rows)}
    files = sorted(speaker_of)
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(utterances, len(files)), replace=False))]
    embeddings = embed_files(extractor, chosen, device=device, progress=progress)
    return EmbeddingStore([f"{speaker_of[f]}/{Path(f).as_posix()}" for f in chosen], embeddings,
                          source="training sample")


@dataclass
class DevelopmentFiles:
    """The whole files whose pairs train the calibration and set the threshold, embedded once.

    ``store`` holds their embeddings (IDs ``speaker/index``, durations, the
    extractor's fingerprint); ``kind`` says whose files they are.
    """

    files: List[str]
    speakers: List[str]
    kind: str
    store: EmbeddingStore


def development_files(extractor, manifest_folder, max_utterances: int = 800, seed: int = 0, device="cpu",
                      progress: bool = True) -> DevelopmentFiles:
    """The development files, embedded whole (see :class:`DevelopmentFiles`).

    The calibration speakers' whole files (``calibration.csv``: speakers never
    trained on, as a trial list's are) when the preparation held some out, up
    to ``max_utterances`` spread evenly over the speakers; else the training
    speakers' validation files, up to 4 per speaker so that a capped sample
    still holds target pairs.  Fewer than two speakers is an :class:`EvaluationError`.
    """
    roots = manifest_roots(manifest_folder)
    held_out = Path(manifest_folder) / "calibration.csv"
    new_speakers = held_out.exists()
    with open(held_out if new_speakers else Path(manifest_folder) / "valid.csv") as rows:
        speaker_of = {resolve_wav(row["wav"], roots): row["spk_id"] for row in csv.DictReader(rows)}
    by_speaker: dict = {}
    for file in sorted(speaker_of):
        by_speaker.setdefault(speaker_of[file], []).append(file)
    per_speaker = max(2, -(-max_utterances // max(len(by_speaker), 1))) if new_speakers else 4
    rng = np.random.default_rng(seed)
    files = [f for group in by_speaker.values() for f in (group if len(group) <= per_speaker else
             [group[i] for i in sorted(rng.choice(len(group), per_speaker, replace=False))])]
    if len(files) > max_utterances:
        files = [files[i] for i in sorted(rng.choice(len(files), max_utterances, replace=False))]
    kind = "calibration speakers (never trained on)" if new_speakers else "training speakers (held-out files)"
    speakers = [speaker_of[f] for f in files]
    if len(set(speakers)) < 2:  # nothing to pair: nothing to embed
        raise EvaluationError(f"{manifest_folder}: the {kind} are fewer than two")
    store = EmbeddingStore([f"{speaker}/{i}" for i, speaker in enumerate(speakers)],
                           embed_files(extractor, files, device=device, progress=progress),
                           source=f"files of the {kind}", durations=audio_seconds(files),
                           fingerprint=extractor_fingerprint(extractor))
    return DevelopmentFiles(files, speakers, kind, store)


#: Target pairs below which the calibration maps the score alone (no quality measure).
_MIN_TARGETS_FOR_QUALITY = 100


def calibrate_on_development(extractor, development: DevelopmentFiles, mean=None,
                             cohort: Optional[EmbeddingStore] = None, top_k: int = 300, prior: float = 0.01,
                             short_seconds: float = 2.0, device="cpu", progress: bool = True,
                             min_nontargets: int = MIN_NONTARGETS) -> Calibration:
    """A score-to-LLR map (:mod:`spkver.calibration`) trained on development pairs.

    The pairs: every two whole files, and every short crop (the first
    ``short_seconds``) against every other whole file, as WeSpeaker pairs short
    and long segments; scores are AS-norm against ``cohort`` when it is given,
    else cosine; the quality measure is the duration, when there are crops and
    at least 100 target pairs (with fewer its weights would fit the noise).
    ``trained_on["source"]`` describes the pairs.  Pairs of one class only are
    a :class:`~spkver.calibration.CalibrationError`.
    """
    files, whole = development.files, development.store
    durations = whole.durations
    cropped = [i for i, seconds in enumerate(durations) if seconds >= short_seconds + 0.5]
    short = embed_files(extractor, [files[i] for i in cropped], device=device, progress=progress,
                        max_seconds=short_seconds) if cropped else None
    ids = list(whole.ids) + [f"{development.speakers[i]}/{i}-short" for i in cropped]
    store = EmbeddingStore(ids, np.concatenate([whole.embeddings] + ([short] if cropped else [])),
                           source=whole.source, durations=np.r_[durations, np.full(len(cropped), short_seconds)],
                           fingerprint=whole.fingerprint)
    first, second = np.triu_indices(len(files), k=1)
    crop_rows = len(files) + np.repeat(np.arange(len(cropped)), len(files))
    whole_rows = np.tile(np.arange(len(files)), len(cropped))
    keep = np.repeat(np.asarray(cropped, dtype=np.int64), len(files)) != whole_rows  # not a crop of itself
    enroll = np.r_[first, crop_rows[keep]]
    test = np.r_[second, whole_rows[keep]]
    speakers = np.array([utterance_id.split("/")[0] for utterance_id in ids])
    labels = speakers[enroll] == speakers[test]
    if labels.all() or not labels.any():
        raise CalibrationError("the development pairs need both same- and different-speaker pairs")
    trials = Trials([ids[i] for i in enroll], [ids[i] for i in test], labels.astype(np.int8),
                    source="development pairs")
    scored = cosine_scores(store, trials, mean=mean) if cohort is None else as_norm(store, trials, cohort, top_k,
                                                                                    mean=mean)
    # The duration term needs crops to learn from and pairs enough to be estimated; else the score alone.
    measures = ["duration"] if cropped and int(labels.sum()) >= _MIN_TARGETS_FOR_QUALITY else []
    quality = quality_features(store, scored.enroll_rows, scored.test_rows, measures)
    kind = "cosine" if cohort is None else "as-norm"
    description = (f"{labels.size} pairs of {len(files)} files and {len(cropped)} {short_seconds:g} s crops of "
                   f"{len(set(development.speakers))} {development.kind}")
    summary = {"source": description, "scores": kind, **({"asnorm_topk": top_k} if cohort is not None else {}),
               "ranges": {"seconds": [float(store.durations.min()), float(store.durations.max())]}}
    return fit_calibration(scored.scores, labels, quality, prior=prior, fingerprint=store.fingerprint,
                           trained_on=summary, min_nontargets=min_nontargets)


@dataclass
class Threshold:
    """The model card's cosine threshold and how it was set."""

    value: float
    description: str


def calibrate_threshold(development: DevelopmentFiles, mean=None, far=None,
                        min_nontargets: int = MIN_NONTARGETS) -> Threshold:
    """Verification threshold from all pairs of the development files' cosine scores.

    At the EER by default, or at the lowest threshold whose FAR is at most ``far``.
    A folder with a calibration decides on the LLR instead (:func:`calibrate_on_development`).
    Pairs that cannot set it (one class only, fewer than ``min_nontargets`` non-targets, a perfect
    separation, whose "EER threshold" is any value in a gap) are an :class:`EvaluationError`.
    """
    ids = development.store.ids
    first, second = np.triu_indices(len(ids), k=1)
    speakers = np.asarray(development.speakers)
    labels = speakers[first] == speakers[second]
    if not labels.any():
        raise EvaluationError(f"no two files of the {development.kind} share a speaker")
    trials = Trials([ids[i] for i in first], [ids[i] for i in second], labels.astype(np.int8),
                    source="development pairs")
    scores = cosine_scores(development.store, trials, mean=mean).scores
    try:
        check_development_pairs(scores, labels, min_nontargets, what="a threshold")
    except CalibrationError as error:
        raise EvaluationError(str(error)) from None
    pairs = f"{labels.size} pairs of {len(ids)} files of the {development.kind}"
    if far is None:
        rate, threshold = metrics.eer(scores, labels)
        return Threshold(threshold, f"EER threshold ({100 * rate:.2f} % EER) on {pairs}")
    (point,) = metrics.tar_at_far(scores, labels, fars=(far,))
    if point.threshold is None:
        raise EvaluationError(f"{point.num_nontargets} non-target pairs cannot measure FAR={far}")
    return Threshold(point.threshold, f"FAR={far} threshold (TAR {100 * point.tar:.2f} %) on {pairs}")


def results_document(after: Dict[Stage, List[dict]], before: Optional[Dict[Stage, List[dict]]] = None,
                     calibrated_scores: Optional[str] = None) -> dict:
    """``results.json``: ``{"version": 1, "stages": {stage: {"after_training": rows, "before_training": rows}}}``.

    Each stage (:class:`Stage` value) holds the rows of its trial lists after
    training and, when the recipe evaluated the initial model too, before; a
    row is :func:`~spkver.report.verification_report` with ``name`` (and for
    ``calibrated``, :func:`~spkver.report.calibration_report`); the calibrated
    stage also says which scores it maps (``"scores"``: ``cosine``/``as-norm``).

    >>> document = results_document({Stage.COSINE: [{"name": "trials.txt", "eer": 0.05}]})
    >>> document["version"], list(document["stages"]), list(document["stages"]["cosine"])
    (1, ['cosine'], ['after_training'])
    """
    stages: Dict[str, dict] = {}
    for moment, table in (("before_training", before or {}), ("after_training", after)):
        for stage, rows in table.items():
            stages.setdefault(stage.value, {})[moment] = rows
    if calibrated_scores is not None and Stage.CALIBRATED.value in stages:
        stages[Stage.CALIBRATED.value]["scores"] = calibrated_scores
    ordered = {stage.value: stages[stage.value] for stage in Stage if stage.value in stages}
    return {"version": RESULTS_VERSION, "stages": ordered}


def read_results(path) -> dict:
    """A ``results.json`` of this schema (an :class:`EvaluationError` for another version)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}: not a readable results.json ({error})") from None
    version = document.get("version") if isinstance(document, dict) else None
    if version != RESULTS_VERSION:
        raise EvaluationError(f"{path}: results.json version {version}, this spkver reads version {RESULTS_VERSION}")
    return document


def write_results(folder, document: dict, fars=DEFAULT_FARS) -> str:
    """Write ``results.json`` and ``results.md`` (one table per stage and moment); return the Markdown."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    sections = []
    for moment in MOMENTS:
        for name, stage in document["stages"].items():
            if moment in stage:
                title = Stage(name).title(stage.get("scores", "as-norm"))
                sections.append(f"### {moment.replace('_', ' ')}: {title}\n\n{markdown_table(stage[moment], fars)}")
    markdown = "\n\n".join(sections)
    (folder / "results.md").write_text(markdown + "\n")
    return markdown


def write_model_card(folder, extractor, mean=None, threshold: Optional[Threshold] = None,
                     why_no_threshold: str = "") -> None:
    """``spkver.json`` (architecture, threshold) and ``mean_embedding.npy``: what ``SpeakerEmbedder`` loads."""
    folder = Path(folder)
    card = {"extractor": extractor.spec, "threshold": None if threshold is None else threshold.value,
            "calibration": threshold.description if threshold is not None else f"not calibrated: {why_no_threshold}",
            "score": "cosine in [-1, 1] of embeddings minus mean_embedding.npy; accept when >= threshold"}
    (folder / "spkver.json").write_text(json.dumps(card, indent=2) + "\n")
    if mean is not None:
        np.save(folder / "mean_embedding.npy", np.asarray(mean, dtype=np.float32))


def average_experiment(folder, extractor, average_last: int) -> None:
    """Load into ``extractor`` (and write as ``embedding_model.averaged.ckpt``) the mean of the experiment's
    last ``average_last`` checkpoints; with 1, remove a stale average. A folder without ``save/`` is left alone."""
    folder = Path(folder)
    averaged = folder / AVERAGED_MODEL
    if not (folder / "save").is_dir():
        return
    if average_last <= 1:
        averaged.unlink(missing_ok=True)  # not a stale average of an earlier run
        return
    state, used = write_average(folder, average_last)
    extractor.load_state_dict(state)
    logger.info(f"averaged the extractor over the last {len(used)} checkpoints ({used[0].name} to "
                f"{used[-1].name}) into {averaged}")


def _trial_utterances(extractor, settings: EvaluationSettings, device, progress) -> EmbeddingStore:
    manifests = Path(settings.manifest_folder)
    path = manifests / "trial_utterances.csv"
    if not path.exists():
        raise EvaluationError(f"{manifests}: no trial_utterances.csv (spkver prepare writes it)")
    roots = manifest_roots(manifests)
    with open(path) as rows:
        records = list(csv.DictReader(rows))
    paths = [resolve_wav(row["wav"], roots) for row in records]
    embeddings = embed_files(extractor, paths, batch_size=settings.embedding_batch_size, device=device,
                             progress=progress)
    return EmbeddingStore([row["ID"] for row in records], embeddings, source="trial utterances",
                          durations=audio_seconds(paths), fingerprint=extractor_fingerprint(extractor))


def _score_lists(store, settings: EvaluationSettings, stages, mean, cohort, calibration,
                 progress) -> Dict[Stage, List[dict]]:
    enrolment_map = Path(settings.manifest_folder) / "enroll.map"
    if enrolment_map.exists():  # trial lists whose enrolment side names speakers (spkver prepare cnceleb)
        store = with_enrolment(store, read_enrolment_map(enrolment_map), mean, source=str(enrolment_map))
    table: Dict[Stage, List[dict]] = {stage: [] for stage in stages}
    for trials_path in settings.trial_lists:
        trials = read_trials(trials_path)
        scored = score_stages(store, trials, stages, mean, cohort, settings.asnorm_topk, calibration,
                              allow_missing=True, progress=progress)
        for stage, row in stage_rows(Path(trials_path).name, scored, stages, calibration).items():
            table[stage].append(row)
    return table


def _print_tables(table: Dict[Stage, List[dict]], moment: str, calibrated_scores: str) -> None:
    for stage, rows in table.items():
        print(f"\n{moment}: {stage.title(calibrated_scores)}\n{text_table(rows)}")


def score_before_training(extractor, settings: EvaluationSettings, device="cpu",
                          progress: bool = True) -> Dict[Stage, List[dict]]:
    """The initial model's cosine rows (nothing written): the recipe's "before training" table."""
    extractor.eval()
    sample = training_sample(extractor, settings.manifest_folder, settings.mean_utterances, device=device,
                             progress=progress)
    store = _trial_utterances(extractor, settings, device, progress)
    table = _score_lists(store, settings, [Stage.COSINE], sample.embeddings.mean(axis=0), None, None, progress)
    _print_tables(table, "before training", "cosine")
    return table


def evaluate_model(folder, extractor, settings: EvaluationSettings, device="cpu", progress: bool = True,
                   before_training: Optional[Dict[Stage, List[dict]]] = None) -> dict:
    """Evaluate ``extractor`` in ``folder`` (see the module docstring); return the ``results.json`` document.

    ``before_training``: the initial model's rows (:func:`score_before_training`); by default those
    of the folder's previous ``results.json`` are kept (a re-run cannot evaluate the initial model).
    """
    folder = Path(folder)
    stages = settings.chosen_stages()
    manifests = Path(settings.manifest_folder)
    if not manifests.is_dir():
        raise EvaluationError(f"{manifests}: no manifest folder (spkver prepare writes one)")
    average_experiment(folder, extractor, settings.average_last)
    extractor.eval()
    if before_training is None and (folder / "results.json").exists():
        previous = read_results(folder / "results.json")
        before_training = {Stage(name): stage["before_training"] for name, stage in previous["stages"].items()
                           if "before_training" in stage}
    if (manifests / "train.csv").exists():
        sample = training_sample(extractor, manifests, settings.mean_utterances, device=device, progress=progress)
        mean = sample.embeddings.mean(axis=0)
        cohort = speaker_mean_cohort(sample)
        save_embeddings(folder / "cohort.npz", cohort.ids, cohort.embeddings)
    else:  # a model folder evaluated on lists prepared without training files: its own mean and cohort
        mean = np.load(folder / "mean_embedding.npy") if (folder / "mean_embedding.npy").exists() else None
        cohort = load_embeddings(folder / "cohort.npz") if (folder / "cohort.npz").exists() else None
    calibration = threshold = None
    why_no_threshold = ""
    try:  # embedded once: their pairs train the LLR calibration and set the model card's threshold
        development = development_files(extractor, manifests, settings.calibration_utterances, device=device,
                                        progress=progress)
    except EvaluationError as error:
        development, why_no_threshold = None, str(error)
        logger.warning(f"not calibrated: {error}")
    if development is not None:
        try:
            threshold = calibrate_threshold(development, mean, far=settings.calibration_far,
                                            min_nontargets=settings.calibration_min_nontargets)
        except EvaluationError as error:
            why_no_threshold = str(error)
            logger.warning(f"no threshold: {error}")
        if Stage.CALIBRATED in stages:
            try:
                calibration = calibrate_on_development(
                    extractor, development, mean, cohort if Stage.ASNORM in stages else None, settings.asnorm_topk,
                    prior=settings.calibration_prior, short_seconds=settings.calibration_short_seconds,
                    device=device, progress=progress, min_nontargets=settings.calibration_min_nontargets)
            except CalibrationError as error:
                logger.warning(f"not calibrated: {error}")
    if calibration is not None:
        calibration.save(folder / "calibration.json")
        logger.info(f"calibration: {calibration.trained_on['scores']} scores to LLRs at prior "
                    f"{calibration.prior:g}, trained on {calibration.trained_on['source']}")
    else:
        stages = [stage for stage in stages if stage is not Stage.CALIBRATED]
        (folder / "calibration.json").unlink(missing_ok=True)  # never a map of another extractor
    store = _trial_utterances(extractor, settings, device, progress)
    table = _score_lists(store, settings, stages, mean, cohort, calibration, progress)
    calibrated_scores = None if calibration is None else calibration.trained_on.get("scores", "cosine")
    _print_tables(table, "after training", calibrated_scores or "cosine")
    document = results_document(table, before_training, calibrated_scores)
    write_results(folder, document)
    write_model_card(folder, extractor, mean, threshold, why_no_threshold)
    settings.write(folder)
    return document
