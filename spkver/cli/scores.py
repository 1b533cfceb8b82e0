"""``spkver score``, ``calibrate`` and ``evaluate``: trial lists scored, calibrated, a model folder evaluated."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from spkver import metrics
from spkver.cli.common import CommandError, rate
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


def add_commands(commands) -> None:
    """The parsers of ``score``, ``calibrate`` and ``evaluate``."""
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
    score.add_argument("--far", type=rate, nargs="+", default=list(DEFAULT_FARS), metavar="FAR",
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
    calibrate.add_argument("--prior", type=rate, default=0.01, help="target prior of the objective (default 0.01)")
    calibrate.add_argument("--out", required=True, metavar="JSON")
    calibrate.add_argument("--min-nontargets", type=int, default=300, metavar="N",
                           help="refuse a list with fewer non-target trials (default 300: fewer cannot show the "
                                "false-accept rates the LLRs decide at)")
    calibrate.add_argument("--allow-missing", action="store_true",
                           help="skip trials whose utterances have no embedding")
    calibrate.set_defaults(handler=command_calibrate)

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
