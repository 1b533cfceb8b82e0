"""``spkver prepare``, ``trials``, ``synth`` and ``convert-m4a``: corpora into manifests and trial lists."""
from __future__ import annotations

import sys
from pathlib import Path

from spkver.cli.common import CommandError, count_or_all, count_or_auto


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


def add_commands(commands) -> None:
    """The parsers of ``prepare voxceleb|folder|kaldi|cnceleb``, ``trials``, ``convert-m4a`` and ``synth``."""
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
    vox.add_argument("--calibration-speakers", type=count_or_auto, default="auto", metavar="N",
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
            parser.add_argument("--trials-per-utterance", type=count_or_all, default=8, metavar="K",
                                help="trials each test file enrols, half cross-session targets ('all': every "
                                     "pair; default 8)")
        parser.add_argument("--calibration-speakers", type=count_or_auto, default="auto", metavar="N",
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
    trials.add_argument("--per-utterance", type=count_or_all, default=None, metavar="K",
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
    synth.add_argument("--trials-per-utterance", type=count_or_all, default=8,
                       help="trials with each held-out utterance as enrolment, half targets (default 8); "
                            "'all': every cross-session pair of the held-out utterances")
    synth.add_argument("--espeak-fraction", type=float, default=0.0,
                       help="fraction of speakers voiced by espeak-ng, when installed (default 0)")
    synth.add_argument("--workers", type=int, default=None)
    synth.set_defaults(handler=command_synth)
