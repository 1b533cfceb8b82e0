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
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from spkver import metrics
from spkver.errors import UserError, format_user_error
from spkver.report import DEFAULT_FARS, calibration_report, stage_rows, text_table
from spkver.scoring import (
    Stage,
    load_embeddings,
    read_enrolment_map,
    read_trials,
    score_stages,
    speaker_mean_cohort,
    with_enrolment,
)


class CommandError(UserError):
    """A command-line argument that cannot be used: printed without a traceback, exit status 2."""


def _load_mean(path: Optional[str]):
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"{path}: cannot read the mean embedding ({error})") from None


def _scores_path(out: str, trials_path: str, several: bool) -> Path:
    if not several:
        return Path(out)
    return Path(out) / (Path(trials_path).stem + ".scores.txt")


def _load_cohort(args):
    if not args.cohort:
        return None
    cohort = load_embeddings(args.cohort)
    return speaker_mean_cohort(cohort) if args.cohort_speaker_means else cohort


def _score(store, trials, cohort, args, mean):
    """Cosine scores, or AS-norm scores with a cohort."""
    stage = Stage.COSINE if cohort is None else Stage.ASNORM
    return score_stages(store, trials, [stage], mean, cohort, args.asnorm_topk, allow_missing=args.allow_missing,
                        progress=sys.stderr.isatty())[stage]


def _score_kind(cohort) -> str:
    return "cosine" if cohort is None else "as-norm"


def _mean_of(args, store):
    """``--mean``, else the model's mean recorded in the store by ``spkver embed`` (unless ``--no-mean``)."""
    if args.mean is not None and args.no_mean:
        raise CommandError("--mean and --no-mean exclude each other")
    if args.mean is not None:
        return _load_mean(args.mean)
    return None if args.no_mean else store.mean


def command_score(args) -> int:
    store = load_embeddings(args.embeddings)
    mean = _mean_of(args, store)
    if args.enroll:
        store = with_enrolment(store, read_enrolment_map(args.enroll), mean, source=args.enroll)
    cohort = _load_cohort(args)
    calibration = None
    if args.calibration:
        from spkver.calibration import load_calibration

        calibration = load_calibration(args.calibration)
        calibration.check_fingerprint(store.fingerprint, args.embeddings)
        trained_kind = calibration.trained_on.get("scores", "cosine")
        if trained_kind != _score_kind(cohort):
            raise CommandError(f"{args.calibration} maps {trained_kind} scores, and these are {_score_kind(cohort)} "
                               f"scores: {'add' if trained_kind == 'as-norm' else 'drop'} --cohort, or calibrate "
                               "on the same kind")
    elif args.plot_calibration:
        raise CommandError("--plot-calibration needs --calibration")
    several = len(args.trials) > 1
    rows, curves, bayes_curves = [], {}, {}
    kind = Stage.COSINE if cohort is None else Stage.ASNORM
    stages = [kind] + ([Stage.CALIBRATED] if calibration is not None else [])
    for trials_path in args.trials:
        trials = read_trials(trials_path)
        scored_stages = score_stages(store, trials, stages, mean, cohort, args.asnorm_topk, calibration,
                                     allow_missing=args.allow_missing, progress=sys.stderr.isatty())
        name = Path(trials_path).name
        row = stage_rows(name, scored_stages, stages, calibration, args.far)[stages[-1]]
        scored = scored_stages[kind]
        labels = scored.trials.labels
        llrs = None
        if calibration is not None:
            llrs = scored_stages[Stage.CALIBRATED].scores
            seconds = None if store.durations is None else \
                np.stack([store.durations[scored.enroll_rows], store.durations[scored.test_rows]], axis=1)
            # A trial list always has a few trials beyond any development set's extremes: warn above 1 %.
            warning = calibration.range_warning(scored.scores, seconds, tolerance=0.01)
            if warning:
                print(f"warning: {name}: {warning}", file=sys.stderr)
            if args.plot_calibration and row["cllr"] is not None:
                bayes_curves[name] = metrics.bayes_error_curve(llrs, labels)
        if scored.num_skipped:
            print(f"{name}: skipped {scored.num_skipped} trials with missing embeddings", file=sys.stderr)
        rows.append(row)
        if args.scores_out:
            path = _scores_path(args.scores_out, trials_path, several)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_scores(path, scored, llrs)
        if args.det and row["eer"] is not None:
            p_fa, p_miss, _ = metrics.det_curve(scored.scores, labels)
            curves[f"{name} (EER {100 * row['eer']:.2f} %)"] = (p_fa, p_miss)
    print(text_table(rows, args.far))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"lists": rows}, indent=2) + "\n")
    if args.det:
        if not curves:
            raise CommandError("--det: no trial list has both targets and non-targets to plot")
        metrics.plot_det(curves, args.det, title=f"DET: {Path(args.embeddings).name}")
    if args.plot_calibration:
        if not bayes_curves:
            raise CommandError("--plot-calibration: no trial list has both targets and non-targets to plot")
        prior = calibration.prior
        metrics.plot_bayes_error(bayes_curves, args.plot_calibration, mark=float(np.log(prior / (1 - prior))),
                                 title=f"Normalised Bayes error rate: {Path(args.embeddings).name}")
    return 0


def _write_scores(path: Path, scored, llrs=None) -> None:
    """``enroll test score [llr] [label]`` per trial (the LLR column with a calibration)."""
    trials = scored.trials
    columns = [trials.enroll, trials.test, [f"{s:.6f}" for s in scored.scores]]
    if llrs is not None:
        columns.append([f"{v:.6f}" for v in llrs])
    if trials.labels is not None:
        columns.append([str(int(label)) for label in trials.labels])
    with open(path, "w") as out:
        out.writelines(" ".join(fields) + "\n" for fields in zip(*columns))


def command_calibrate(args) -> int:
    from spkver.calibration import fit_calibration, quality_features

    store = load_embeddings(args.embeddings)
    mean = _mean_of(args, store)
    cohort = _load_cohort(args)
    trials = read_trials(args.trials)
    if trials.labels is None:
        raise CommandError(f"{args.trials}: a calibration list needs labels ('label enroll test' lines)")
    scored = _score(store, trials, cohort, args, mean)
    quality = quality_features(store, scored.enroll_rows, scored.test_rows, args.quality, cohort=cohort,
                               top_k=args.asnorm_topk, mean=mean, progress=sys.stderr.isatty())
    summary = {"source": str(args.trials), "scores": _score_kind(cohort)}
    if cohort is not None:
        summary["asnorm_topk"] = args.asnorm_topk
    if store.durations is not None:
        used = np.r_[scored.enroll_rows, scored.test_rows]
        summary["ranges"] = {"seconds": [float(store.durations[used].min()), float(store.durations[used].max())]}
    try:
        calibration = fit_calibration(scored.scores, scored.trials.labels, quality, prior=args.prior,
                                      fingerprint=store.fingerprint, trained_on=summary,
                                      min_nontargets=args.min_nontargets)
    except ValueError as error:
        raise CommandError(f"{args.trials}: {error}") from None
    calibration.save(args.out)
    labels = scored.trials.labels
    report = calibration_report(calibration.llr(scored.scores, quality), labels, args.prior)
    terms = " ".join(f"{w:+.4g}*{name}" for w, name in zip(calibration.weights, calibration.features))
    print(f"LLR = {terms} {calibration.bias:+.4g}  (prior {args.prior:g}, {labels.size} trials, "
          f"{int(labels.sum())} targets)")
    print(f"on this list: Cllr {report['cllr']:.4f}, minCllr {report['min_cllr']:.4f}, "
          f"actDCF({args.prior:g}) {report['act_dcf']:.4f}, minDCF({args.prior:g}) {report['min_dcf_at_prior']:.4f}")
    if store.fingerprint is None:
        print(f"note: {args.embeddings} carries no extractor fingerprint, so the calibration cannot refuse "
              "another extractor's scores", file=sys.stderr)
    print(f"written to {args.out}")
    return 0


def _count_or_word(word: str, meaning, minimum: int):
    """An argument parser for a count >= ``minimum``, or ``word`` (returned as ``meaning``)."""
    def parse(text: str):
        if text == word:
            return meaning
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or '{word}', got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a count >= {minimum} or '{word}', got {value}")
        return value
    return parse


#: A positive count, or 'all' (``None``); a count >= 0, or 'auto'.
_count_or_all = _count_or_word("all", None, 1)
_count_or_auto = _count_or_word("auto", "auto", 0)


def command_prepare_voxceleb(args) -> int:
    from spkver.data.voxceleb import prepare_voxceleb

    summary = prepare_voxceleb(args.out, vox1=args.vox1, vox2=args.vox2, trials=args.trials,
                               train_on=args.train_on, chunk_seconds=args.chunk_seconds,
                               min_seconds=args.min_seconds, valid_fraction=args.valid_fraction,
                               calibration_speakers=args.calibration_speakers, workers=args.workers,
                               progress=sys.stderr.isatty())
    return _print_preparation(summary, args.out)


def _print_preparation(summary: dict, out) -> int:
    train = summary["train"]
    excluded = f"; excluded speakers: {summary['excluded_speakers']}" if "excluded_speakers" in summary else ""
    print(f"train: {train['speakers']} speakers, {train['utterances']} utterances, {train['rows']} chunks "
          f"({train['hours']} h); valid: {summary['valid']['rows']} chunks; "
          f"trial utterances: {summary['trial_utterances']}{excluded}; skipped files: {summary['skipped']}")
    if summary.get("cache", {}).get("converted"):
        print(f"resampled / down-mixed to 16 kHz mono once: {summary['cache']['converted']} files, into {out}/cache")
    for name, counts in summary.get("trials", {}).items():
        if "targets" in counts:
            print(f"{name}: {counts['trials']} trials ({counts['targets']} targets) over {counts['utterances']} "
                  f"utterances of {counts['speakers']} held-out speakers")
    if summary["calibration"]["speakers"]:
        print(f"calibration: {summary['calibration']['speakers']} speakers held out of training, "
              f"{summary['calibration']['utterances']} utterances")
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"manifests in {out}")
    return 0


def _corpus_settings(args) -> dict:
    return {"chunk_seconds": args.chunk_seconds, "min_seconds": args.min_seconds,
            "valid_fraction": args.valid_fraction, "calibration_speakers": args.calibration_speakers,
            "seed": args.seed, "workers": args.workers, "progress": sys.stderr.isatty()}


def command_prepare_folder(args) -> int:
    from spkver.data.folder import prepare_folder

    summary = prepare_folder(args.root, args.out, test_speakers=args.test_speakers,
                             trials_per_utterance=args.trials_per_utterance, **_corpus_settings(args))
    return _print_preparation(summary, args.out)


def command_prepare_kaldi(args) -> int:
    from spkver.data.kaldi import prepare_kaldi

    summary = prepare_kaldi(args.directory, args.out, test_speakers=args.test_speakers,
                            trials_per_utterance=args.trials_per_utterance, **_corpus_settings(args))
    return _print_preparation(summary, args.out)


def command_prepare_cnceleb(args) -> int:
    from spkver.data.cnceleb import prepare_cnceleb

    summary = prepare_cnceleb(args.roots, args.out, **_corpus_settings(args))
    return _print_preparation(summary, args.out)


def command_trials(args) -> int:
    from spkver.data.manifests import cross_session_trials, manifest_records, write_trials

    records = manifest_records(Path(args.manifest))
    trials = cross_session_trials(records, args.per_utterance, args.seed)
    if not trials:
        raise CommandError(f"{args.manifest}: no pairs: it lists fewer than two speakers")
    write_trials(Path(args.out), trials)
    print(f"{args.out}: {len(trials)} trials ({sum(t[0] for t in trials)} targets, cross-session) over "
          f"{len(records)} utterances of {len({r[1] for r in records})} speakers")
    return 0


def command_convert_m4a(args) -> int:
    from spkver.data.convert import convert_m4a

    result = convert_m4a(args.source, args.target, audio_format=args.format, workers=args.workers,
                         progress=sys.stderr.isatty())
    print(f"{result['converted_or_present']} of {result['files']} files converted or already present")
    for failure in result["failures"][:20]:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if result["failures"] else 0


def command_synth(args) -> int:
    from spkver.data.synth import synthesize_corpus

    summary = synthesize_corpus(args.out, speakers=args.speakers, utterances=args.utterances, seed=args.seed,
                                difficulty=args.difficulty, min_seconds=args.min_seconds,
                                max_seconds=args.max_seconds, test_speakers=args.test_speakers,
                                trials_per_utterance=args.trials_per_utterance, workers=args.workers,
                                progress=sys.stderr.isatty(), espeak_fraction=args.espeak_fraction)
    print(f"{summary['utterances']} utterances of {summary['speakers']} speakers in {summary['out']}/wav; "
          f"{summary['trials']} trials ({summary['targets']} targets) over {summary['test_speakers']} "
          f"held-out speakers in {summary['out']}/trials.txt")
    return 0


#: Files per resumable part of ``spkver embed``.
EMBED_PART = 2000


def _embedding_inputs(args):
    """(IDs, paths) from --dir (IDs relative to it) or --list (one path per line; the ID is the line)."""
    if args.dir:
        root = Path(args.dir)
        if not root.is_dir():
            raise CommandError(f"{root}: --dir folder does not exist")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
        if not paths:
            raise CommandError(f"{root}: no .wav or .flac files under it")
        return [p.relative_to(root).as_posix() for p in paths], paths
    listing = Path(args.list)
    try:
        lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise CommandError(f"{listing}: cannot read the list ({error.strerror})") from None
    if not lines:
        raise CommandError(f"{listing}: the list is empty")
    root = Path(args.root) if args.root else Path.cwd()
    return lines, [Path(line) if Path(line).is_absolute() else root / line for line in lines]


def _precision_argument(parser) -> None:
    parser.add_argument("--precision", default="fp32", metavar="fp32|bf16",  # checked by check_precision
                        help="arithmetic of CPU embedding: fp32 (default), or bf16 where the CPU multiplies bfloat16 "
                             "natively (AMX: 2-3x faster on ResNets; embeddings at cosine >= 0.9999 of fp32's)")


def command_embed(args) -> int:
    from spkver.inference import SpeakerEmbedder, audio_seconds, check_headers, extractor_fingerprint, unembeddable
    from spkver.scoring import save_embeddings

    embedder = SpeakerEmbedder.from_pretrained(args.model, device=args.device, precision=args.precision)
    fingerprint = extractor_fingerprint(embedder.extractor)
    ids, paths = _embedding_inputs(args)
    problems = check_headers(paths, embedder.min_seconds)  # every header, before the first batch
    if problems and not args.skip_unreadable:
        raise CommandError(unembeddable(problems, len(paths)))
    out = Path(args.out)
    parts = out.with_name(out.name + ".parts")  # finished parts survive an interruption
    parts.mkdir(parents=True, exist_ok=True)
    stores, skipped = [], []
    for start in range(0, len(ids), EMBED_PART):
        part = parts / f"part-{start // EMBED_PART:05d}.npz"
        chunk = paths[start:start + EMBED_PART]
        left_out: list = []
        if not part.exists():
            vectors = embedder.embed_files(chunk, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                                           skipped=left_out if args.skip_unreadable else None)
            bad = {index for index, _ in left_out}
            kept = [i for i in range(len(chunk)) if i not in bad]
            save_embeddings(part, [ids[start + i] for i in kept], vectors,
                            durations=audio_seconds([chunk[i] for i in kept]), fingerprint=fingerprint,
                            mean=embedder.mean)
            (parts / f"{part.stem}.skipped.tsv").write_text("".join(
                f"{chunk[index]}\t{reason}\n" for index, reason in left_out))
        skipped_part = parts / f"{part.stem}.skipped.tsv"
        if skipped_part.exists():
            skipped += [line for line in skipped_part.read_text().splitlines() if line]
        stores.append(load_embeddings(part))
    if any(store.fingerprint != fingerprint for store in stores):
        raise CommandError(f"{parts}: parts left by an interrupted run of another model (its fingerprint differs); "
                           "delete the folder")
    save_embeddings(out, [i for store in stores for i in store.ids], np.concatenate([s.embeddings for s in stores]),
                    durations=np.concatenate([s.durations for s in stores]), fingerprint=fingerprint,
                    mean=embedder.mean)
    report = out.with_name(out.stem + ".skipped.tsv")
    if skipped:
        report.write_text("".join(line + "\n" for line in skipped))
    else:
        report.unlink(missing_ok=True)
    for leftover in list(parts.glob("part-*")):
        leftover.unlink()
    parts.rmdir()
    recorded = "; with the model's mean embedding, which spkver score subtracts" if embedder.mean is not None else ""
    print(f"{sum(len(store.ids) for store in stores)} embeddings ({stores[0].dim}-d) written to {out}{recorded}")
    if skipped:
        print(f"{len(skipped)} files skipped, listed with the reason in {report}", file=sys.stderr)
    return 0


def command_verify(args) -> int:
    from spkver.inference import SpeakerEmbedder

    embedder = SpeakerEmbedder.from_pretrained(args.model, device=args.device, precision=args.precision)
    if args.prior is not None and embedder.llr_calibration is None:
        raise CommandError(f"{args.model}: --prior needs a calibration (calibration.json), and the folder has none")
    result = embedder.verify(args.first, args.second, prior=args.prior)
    decision = "no threshold stored" if result.same is None else \
        ("same speaker" if result.same else "different speakers")
    if result.llr is None:
        threshold = "" if result.same is None else f" (threshold {result.threshold:.4f})"
        print(f"score {result.score:.4f}: {decision}{threshold}")
    else:
        prior = embedder.llr_calibration.prior if args.prior is None else args.prior
        print(f"score {result.score:.4f}, LLR {result.llr:+.3f}: {decision} "
              f"(Bayes threshold {result.threshold:+.3f} at target prior {prior:g})")
    return 0


def command_average(args) -> int:
    from spkver.checkpoints import AVERAGED_MODEL, write_average

    folder = Path(args.model)
    _, used = write_average(folder, args.last)
    print(f"averaged the extractor of {len(used)} checkpoints ({', '.join(p.name for p in used)}) into "
          f"{folder / AVERAGED_MODEL}")
    if len(used) < args.last:
        print(f"note: only {len(used)} checkpoints are kept in {folder / 'save'} (the recipe keeps average_last)",
              file=sys.stderr)
    if (folder / "calibration.json").exists():
        print(f"note: {folder / 'calibration.json'} belongs to the previous extractor and is now refused; "
              "calibrate again (spkver calibrate) on this one's scores", file=sys.stderr)
    return 0


def command_evaluate(args) -> int:
    from spkver.evaluation import EvaluationSettings, evaluate_model
    from spkver.inference import SpeakerEmbedder
    from spkver.models import layout_of

    folder = Path(args.model)
    if layout_of(folder) != "spkver":  # a public folder is never written to: its export is evaluated
        if args.out is None:
            raise CommandError(f"{folder} is a {layout_of(folder)} folder: give --out DIR, where spkver exports it "
                               "and writes its evaluation (the folder itself is left as it is)")
        from spkver.export import export_pretrained

        folder = export_pretrained(folder, args.out)
    elif args.out is not None:
        raise CommandError("--out is for public model folders; a spkver folder is evaluated in place")
    if (folder / EvaluationSettings.FILE).exists():
        settings = EvaluationSettings.read(folder)
    elif args.manifests is None or args.trials is None:
        raise CommandError(f"{folder}: no {EvaluationSettings.FILE} (the recipe writes it): give --manifests "
                           "(spkver prepare's folder) and --trials")
    else:
        settings = EvaluationSettings(manifest_folder=args.manifests, trial_lists=args.trials)
    changes = {"manifest_folder": args.manifests, "trial_lists": args.trials, "stages": args.stages}
    settings = dataclasses.replace(settings, **{key: value for key, value in changes.items() if value is not None})
    embedder = SpeakerEmbedder.from_pretrained(folder, device=args.device)
    evaluate_model(folder, embedder.extractor, settings, device=args.device, progress=sys.stderr.isatty())
    print(f"\nresults written to {folder / 'results.md'} and results.json")
    return 0


def command_export(args) -> int:
    from spkver.export import export_pretrained

    out = export_pretrained(args.model, args.out, onnx=args.onnx)
    print(f"pretrained folder written to {out}")
    return 0


#: The objectives ``spkver sparsity`` can measure, by name.
SPARSITY_OBJECTIVES = ("qmargin", "a3m", "alphadiv")


def command_sparsity(args) -> int:
    import speechbrain as sb
    import torch

    from spkver.data.datasets import speaker_datasets
    from spkver.finetune import one_hot_fraction, start_prototypes
    from spkver.losses import A3M, AlphaDiv, QMargin
    from spkver.models import CosineClassifier, load_model

    folder = Path(args.model)
    manifests = Path(args.manifests) if args.manifests else folder / "manifests"
    if not (manifests / "train.csv").exists():
        raise CommandError(f"{manifests}: no prepared training manifests (train.csv): give --manifests, a folder "
                           "written by spkver prepare")
    if args.alpha <= 1.0:
        raise CommandError(f"--alpha must be > 1 (softmax posteriors are never one-hot), got {args.alpha}")
    objective = {"qmargin": lambda: QMargin(args.scale, args.margin, args.alpha),
                 "a3m": lambda: A3M(args.scale, args.margin, args.alpha),
                 "alphadiv": lambda: AlphaDiv(args.scale, args.alpha)}[args.objective]()
    start = load_model(folder)
    extractor = start.extractor.to(args.device)
    train, _, classes = speaker_datasets(manifests, args.crop_seconds)
    speakers = json.loads((manifests / "speakers.json").read_text())
    torch.manual_seed(0)  # the same examples on every call
    loader = sb.dataio.dataloader.make_dataloader(train, batch_size=args.batch_size, shuffle=True)
    classifier = CosineClassifier(extractor.embedding_dim, classes)
    how = start_prototypes(start, extractor, classifier, speakers, args.prototypes, loader, args.device,
                           args.examples)
    examples = min(args.examples, len(train))
    fraction = one_hot_fraction(extractor, classifier.weight.detach(), objective, loader, args.device, examples)
    print(f"{100 * fraction:.1f} % of {examples} training examples are one-hot (zero loss, zero gradient) "
          f"under {objective!r} ({start.layout}; {how})")
    return 0


def command_environment(args) -> int:
    from spkver import __version__
    from spkver.environment import check_environment

    versions = check_environment(load=True)
    print(f"spkver {__version__}: " + ", ".join(f"{name} {version}" for name, version in versions.items())
          + ": they load together")
    return 0


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _add_scoring_inputs(parser: argparse.ArgumentParser, cohort_help: str) -> None:
    """The store, cohort and mean options that `score` and `calibrate` share."""
    parser.add_argument("--embeddings", required=True, metavar="STORE", help=".npz store or folder of .npy files")
    parser.add_argument("--cohort", metavar="STORE", help=cohort_help)
    parser.add_argument("--cohort-speaker-means", action="store_true",
                        help="average the cohort per speaker (first path component of the ID) first")
    parser.add_argument("--asnorm-topk", type=int, default=300, metavar="K", help="AS-norm top-K (default 300)")
    parser.add_argument("--mean", metavar="NPY", help="mean embedding (.npy) subtracted before normalisation "
                                                      "(default: the model's, recorded in the store by spkver embed)")
    parser.add_argument("--no-mean", action="store_true", help="subtract no mean embedding, not even the store's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkver", description="Speaker verification with alpha-divergence losses.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score", help="score trial lists with cosine (and AS-norm) and report EER, minDCF, TAR@FAR",
        description="Score VoxCeleb-format trial lists ('label enroll test', or 'enroll test' to score without "
                    "metrics) from an embedding store (.npz with 'ids' and 'embeddings', or a folder of .npy).")
    score.add_argument("--trials", nargs="+", required=True, metavar="FILE", help="one or more trial lists")
    _add_scoring_inputs(score, "cohort embeddings: enables AS-norm")
    score.add_argument("--scores-out", metavar="PATH",
                       help="write 'enroll test score [llr] [label]' lines; a folder when several lists are given")
    score.add_argument("--calibration", metavar="JSON",
                       help="calibration.json (spkver calibrate, or the recipe's): report Cllr, minCllr and "
                            "actual DCF at its prior, and write LLRs with --scores-out")
    score.add_argument("--plot-calibration", metavar="PNG",
                       help="with --calibration: a normalised Bayes error-rate (APE) plot, actual and minimum DCF "
                            "across prior log-odds")
    score.add_argument("--det", metavar="PNG", help="write a DET plot (needs matplotlib)")
    score.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    score.add_argument("--far", type=_rate, nargs="+", default=list(DEFAULT_FARS), metavar="FAR",
                       help="false-acceptance rates for TAR@FAR (default 1e-2 1e-3 1e-4 1e-5)")
    score.add_argument("--allow-missing", action="store_true",
                       help="skip trials whose utterances have no embedding (and report how many)")
    score.add_argument("--enroll", metavar="MAP",
                       help="an enrolment map ('speaker file file ...' lines, CN-Celeb's enroll.map): a trial's "
                            "enrolment side may name a speaker, scored by the mean of its files' normalised "
                            "embeddings")
    score.set_defaults(handler=command_score)

    calibrate = commands.add_parser(
        "calibrate", help="train a score-to-LLR calibration (logistic regression, optional quality measures)",
        description="Fit LLR = a*score (+ quality measures) + b on a labelled development trial list, by the "
                    "prior-weighted cross-entropy (Cllr) at --prior, and write calibration.json.")
    calibrate.add_argument("--trials", required=True, metavar="FILE", help="labelled development trial list")
    _add_scoring_inputs(calibrate, "calibrate AS-norm scores against this cohort")
    calibrate.add_argument("--quality", nargs="*", default=[], choices=["duration", "norm", "cohort_mean"],
                           help="quality measures (WeSpeaker's QMF): each adds the smaller and larger of the "
                                "two sides' values")
    calibrate.add_argument("--prior", type=_rate, default=0.01, help="target prior of the objective (default 0.01)")
    calibrate.add_argument("--out", required=True, metavar="JSON")
    calibrate.add_argument("--min-nontargets", type=int, default=300, metavar="N",
                           help="refuse a list with fewer non-target trials (default 300: fewer cannot show the "
                                "false-accept rates the LLRs decide at)")
    calibrate.add_argument("--allow-missing", action="store_true",
                           help="skip trials whose utterances have no embedding")
    calibrate.set_defaults(handler=command_calibrate)

    prepare = commands.add_parser("prepare", help="prepare a corpus for training")
    corpora = prepare.add_subparsers(dest="corpus", required=True)
    vox = corpora.add_parser(
        "voxceleb", help="VoxCeleb1/2 manifests (SpeechBrain CSV), speaker map, counts",
        description="Scan VoxCeleb1 (wav/) and/or VoxCeleb2 dev (aac/ m4a, or converted wav/flac), read durations "
                    "from headers, exclude the speakers of the trial lists from training, write train.csv, "
                    "valid.csv, trial_utterances.csv, speakers.json and counts.json (and calibration.csv with "
                    "--calibration-speakers).")
    vox.add_argument("--vox1", metavar="DIR", help="VoxCeleb1 root (holds wav/)")
    vox.add_argument("--vox2", metavar="DIR", help="VoxCeleb2 dev root (holds aac/ or wav/)")
    vox.add_argument("--trials", nargs="*", default=[], metavar="FILE", help="trial lists to hold out")
    vox.add_argument("--out", required=True, metavar="DIR")
    vox.add_argument("--train-on", nargs="+", default=["vox1", "vox2"], choices=["vox1", "vox2"],
                     help="corpora to train on (default both given; 'vox2' alone is the usual VoxCeleb2-dev recipe)")
    vox.add_argument("--chunk-seconds", type=float, default=3.0, help="training chunk length (default 3 s)")
    vox.add_argument("--min-seconds", type=float, default=1.0, help="shortest chunk kept (default 1 s)")
    vox.add_argument("--valid-fraction", type=float, default=0.01, help="utterances held for validation")
    vox.add_argument("--calibration-speakers", type=_count_or_auto, default="auto", metavar="N",
                     help="hold N training speakers out of training for score calibration (calibration.csv; "
                          "default auto: a tenth, at most 200; 0 calibrates on the training speakers' files)")
    vox.add_argument("--workers", type=int, default=8, help="parallel header readers")
    vox.set_defaults(handler=command_prepare_voxceleb)

    def corpus_options(parser, held_out_test: bool = True):
        parser.add_argument("--out", required=True, metavar="DIR", help="manifest folder (the recipe's data_folder)")
        if held_out_test:
            parser.add_argument("--test-speakers", type=int, default=0, metavar="N",
                                help="hold N speakers out of training as a test set: their files, paired "
                                     "across sessions, make DIR/trials.txt (default 0)")
            parser.add_argument("--trials-per-utterance", type=_count_or_all, default=8, metavar="K",
                                help="trials each test file enrols, half cross-session targets ('all': every "
                                     "pair; default 8)")
        parser.add_argument("--calibration-speakers", type=_count_or_auto, default="auto", metavar="N",
                            help="hold N speakers out of training for score calibration (calibration.csv; "
                                 "default auto: a tenth, at most 200, none of fewer than 20)")
        parser.add_argument("--chunk-seconds", type=float, default=3.0, help="training chunk length (default 3 s)")
        parser.add_argument("--min-seconds", type=float, default=1.0,
                            help="shorter files are skipped and listed (default 1 s)")
        parser.add_argument("--valid-fraction", type=float, default=0.01, help="utterances held for validation")
        parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choices")
        parser.add_argument("--workers", type=int, default=8, help="parallel header readers")

    for name, positional, handler, summary, description in (
            ("folder", ("root", "ROOT", None), command_prepare_folder,
             "a folder of speakers: ROOT/<speaker>/**/<audio file>",
             "Each top-level folder of ROOT is a speaker, a sub-folder the session; any format soundfile reads. "
             "Files that are not 16 kHz mono are converted once into DIR/cache; unreadable, empty and too-short "
             "files are listed in DIR/skipped.tsv."),
            ("kaldi", ("directory", "KALDI_DIR", None), command_prepare_kaldi,
             "a Kaldi data directory: wav.scp + utt2spk (+ segments)",
             "wav.scp entries may be files or pipes ('... |'); segments cut recordings into utterances. Pipes, "
             "segments and audio that is not 16 kHz mono are decoded once into DIR/cache."),
            ("cnceleb", ("roots", "ROOT", "+"), command_prepare_cnceleb,
             "CN-Celeb1/2: ROOT/data/<speaker>/, ROOT/eval/{enroll,test,lists}",
             "Every root's data/ trains (but the evaluation speakers); CN-Celeb1's eval/lists give DIR/trials.txt "
             "with DIR/enroll.map (score with --enroll) and DIR/trials_concat.txt.")):
        layout = corpora.add_parser(name, help=summary, description=description)
        layout.add_argument(positional[0], metavar=positional[1], nargs=positional[2])
        corpus_options(layout, held_out_test=name != "cnceleb")
        layout.set_defaults(handler=handler)

    trials = commands.add_parser(
        "trials", help="a trial list from a manifest: cross-session pairs",
        description="Pairs the utterances of a whole-file manifest (a prepared folder's trial_utterances.csv or "
                    "calibration.csv): every cross-session pair, or K per utterance drawn with a seed.")
    trials.add_argument("--manifest", required=True, metavar="CSV")
    trials.add_argument("--out", required=True, metavar="FILE")
    trials.add_argument("--per-utterance", type=_count_or_all, default=None, metavar="K",
                        help="trials per enrolling utterance (default: every pair)")
    trials.add_argument("--seed", type=int, default=0)
    trials.set_defaults(handler=command_trials)

    convert = commands.add_parser("convert-m4a", help="decode VoxCeleb2 m4a to 16 kHz mono wav/flac (resumable)")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("target", metavar="DST")
    convert.add_argument("--format", default="wav", choices=["wav", "flac"])
    convert.add_argument("--workers", type=int, default=None)
    convert.set_defaults(handler=command_convert_m4a)

    synth = commands.add_parser("synth", help="generate a synthetic speaker corpus in the VoxCeleb1 layout",
                                description="Source-filter voices through per-session channels; writes "
                                            "OUT/wav/idXXXXX/<video>/<nnnnn>.wav and OUT/trials.txt.")
    synth.add_argument("--out", required=True, metavar="DIR")
    synth.add_argument("--speakers", type=int, default=100)
    synth.add_argument("--utterances", type=int, default=20, help="utterances per speaker")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--difficulty", type=float, default=1.0,
                       help="channel severity and within-speaker variation (default 1.0)")
    synth.add_argument("--min-seconds", type=float, default=3.0)
    synth.add_argument("--max-seconds", type=float, default=6.0)
    synth.add_argument("--test-speakers", type=int, default=None,
                       help="speakers reserved for trials.txt (default a fifth)")
    synth.add_argument("--trials-per-utterance", type=_count_or_all, default=8,
                       help="trials with each held-out utterance as enrolment, half targets (default 8); "
                            "'all': every cross-session pair of the held-out utterances")
    synth.add_argument("--espeak-fraction", type=float, default=0.0,
                       help="fraction of speakers voiced by espeak-ng, when installed (default 0)")
    synth.add_argument("--workers", type=int, default=None)
    synth.set_defaults(handler=command_synth)

    embed = commands.add_parser("embed", help="embed audio files into a store that `spkver score` reads")
    embed.add_argument("--model", required=True, metavar="FOLDER",
                       help="a model folder: experiment, export, SpeechBrain hub or WeSpeaker folder")
    source = embed.add_mutually_exclusive_group(required=True)
    source.add_argument("--list", metavar="FILE", help="one audio path per line (the line is the ID)")
    source.add_argument("--dir", metavar="DIR", help="every wav/flac under DIR (IDs relative to it)")
    embed.add_argument("--root", metavar="DIR", help="folder the --list paths are relative to (default: here)")
    embed.add_argument("--out", required=True, metavar="NPZ")
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--device", default="cpu")
    _precision_argument(embed)
    embed.add_argument("--skip-unreadable", action="store_true",
                       help="skip files that are missing, unreadable, empty, too short, silent or without speech "
                            "energy, listing them with the reason in NPZ's .skipped.tsv (default: refuse them all "
                            "at once, before the first batch)")
    embed.set_defaults(handler=command_embed)

    verify = commands.add_parser("verify", help="score a pair of files and decide same/different speaker")
    verify.add_argument("--model", required=True, metavar="FOLDER")
    verify.add_argument("first", metavar="A.wav")
    verify.add_argument("second", metavar="B.wav")
    verify.add_argument("--device", default="cpu")
    _precision_argument(verify)
    verify.add_argument("--prior", type=_rate, default=None,
                        help="target prior of the decision (default: the calibration's)")
    verify.set_defaults(handler=command_verify)

    average = commands.add_parser(
        "average", help="average the extractor over an experiment's last checkpoints (weights and BatchNorm "
                        "statistics), into the model that embed/verify/export use")
    average.add_argument("--model", required=True, metavar="EXP_FOLDER")
    average.add_argument("--last", type=int, default=10, metavar="N", help="checkpoints to average (default 10)")
    average.set_defaults(handler=command_average)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a model folder on trial lists: cosine, AS-norm and calibrated LLRs, "
                         "results.md/json and the model card (the recipe's last stage, re-runnable)",
        description="Average the experiment's last checkpoints, subtract the training mean, score the trial lists "
                    "in stages, calibrate on the development pairs, and write results.md/json, cohort.npz, "
                    "calibration.json and spkver.json, with the settings of the folder's evaluation.json.")
    evaluate.add_argument("--model", required=True, metavar="FOLDER", help="an experiment or model folder")
    evaluate.add_argument("--trials", nargs="+", metavar="FILE", help="trial lists (default: the recipe's)")
    evaluate.add_argument("--stages", nargs="+", choices=[stage.value for stage in Stage],
                          help="stages to report (default: all)")
    evaluate.add_argument("--manifests", metavar="DIR", help="prepared manifests (default: the recipe's)")
    evaluate.add_argument("--out", metavar="DIR", help="for a SpeechBrain hub or WeSpeaker folder: where its export "
                                                       "and evaluation are written")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(handler=command_evaluate)

    export = commands.add_parser("export", help="write a SpeechBrain-compatible pretrained folder")
    export.add_argument("--model", required=True, metavar="EXP_FOLDER")
    export.add_argument("--out", required=True, metavar="PRETRAINED_FOLDER")
    export.add_argument("--onnx", action="store_true", help="also write embedding_model.onnx (features in)")
    export.set_defaults(handler=command_export)

    sparsity = commands.add_parser(
        "sparsity", help="fraction of training examples already one-hot under an alpha objective, at a starting model",
        description="Before fine-tuning with an alpha objective: embeds training crops with a model folder (any "
                    "layout spkver reads) and counts those whose posterior is exactly one-hot (zero loss and "
                    "gradient), with the prototypes a fine-tuning run would start from (--prototypes). Above "
                    "about 80 %, fine-tuning has little gradient to learn from.")
    sparsity.add_argument("--model", required=True, metavar="FOLDER",
                          help="an experiment folder, an export, a SpeechBrain hub or WeSpeaker folder")
    sparsity.add_argument("--manifests", metavar="DIR",
                          help="the prepared training data (default: the experiment folder's manifests/)")
    sparsity.add_argument("--prototypes", default="auto", choices=["auto", "starting_model", "class_means"],
                          help="where the prototypes start, as init_prototypes in fine-tuning (default auto)")
    sparsity.add_argument("--objective", default="qmargin", choices=SPARSITY_OBJECTIVES)
    sparsity.add_argument("--alpha", type=float, required=True)
    sparsity.add_argument("--scale", type=float, required=True)
    sparsity.add_argument("--margin", type=float, default=0.0)
    sparsity.add_argument("--examples", type=int, default=2000, help="training examples measured (default 2000)")
    sparsity.add_argument("--crop-seconds", type=float, default=2.0, help="training crop length (default 2 s)")
    sparsity.add_argument("--batch-size", type=int, default=32)
    sparsity.add_argument("--device", default="cpu")
    sparsity.set_defaults(handler=command_sparsity)

    environment = commands.add_parser("environment", help="check that torch, torchaudio and SpeechBrain load "
                                                          "together, and print their versions")
    environment.set_defaults(handler=command_environment)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:  # the user's input, named: one line; anything else is a bug and keeps its traceback
        print(format_user_error(f"spkver {args.command}", error), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
