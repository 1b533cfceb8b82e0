"""``spkver embed``, ``verify``, ``average`` and ``export``: a trained or public extractor reused."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from spkver.cli.common import CommandError, rate
from spkver.scoring import load_embeddings

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
    precision = parts / "precision"  # parts of one store share one arithmetic
    started_in = precision.read_text() if precision.exists() else embedder.precision
    if any(parts.glob("part-*.npz")) and started_in != embedder.precision:
        raise CommandError(f"{parts}: parts left by an interrupted run in {started_in}: resume it with "
                           f"--precision {started_in}, or delete the folder")
    precision.write_text(embedder.precision)
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
    for leftover in [*parts.glob("part-*"), precision]:
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


def command_export(args) -> int:
    from spkver.export import export_pretrained

    out = export_pretrained(args.model, args.out, onnx=args.onnx)
    print(f"pretrained folder written to {out}")
    return 0


def add_commands(commands) -> None:
    """The parsers of ``embed``, ``verify``, ``average`` and ``export``."""
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
    verify.add_argument("--prior", type=rate, default=None,
                        help="target prior of the decision (default: the calibration's)")
    verify.set_defaults(handler=command_verify)

    average = commands.add_parser(
        "average", help="average the extractor over an experiment's last checkpoints (weights and BatchNorm "
                        "statistics), into the model that embed/verify/export use")
    average.add_argument("--model", required=True, metavar="EXP_FOLDER")
    average.add_argument("--last", type=int, default=10, metavar="N", help="checkpoints to average (default 10)")
    average.set_defaults(handler=command_average)

    export = commands.add_parser("export", help="write a SpeechBrain-compatible pretrained folder")
    export.add_argument("--model", required=True, metavar="EXP_FOLDER")
    export.add_argument("--out", required=True, metavar="PRETRAINED_FOLDER")
    export.add_argument("--onnx", action="store_true", help="also write embedding_model.onnx (features in)")
    export.set_defaults(handler=command_export)
