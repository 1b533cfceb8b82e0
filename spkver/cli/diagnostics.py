"""``spkver sparsity`` and ``environment``: what a model has left to learn, and whether the stack loads."""
from __future__ import annotations

import json
from pathlib import Path

from spkver.cli.common import CommandError

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


def add_commands(commands) -> None:
    """The parsers of ``sparsity`` and ``environment``."""
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
