"""The model folder layouts spkver reads, and the one place that recognises which a folder is in.

:func:`load_model` takes any of :data:`LAYOUTS` -- spkver's experiment and exported folders, SpeechBrain
hub folders, WeSpeaker model folders -- wherever spkver accepts a model folder
(``SpeakerEmbedder.from_pretrained``, every ``--model``, the recipe's ``init_from``).
"""
import json
from pathlib import Path

import numpy as np

from spkver.models.extractors import EmbeddingExtractor, ModelError, ecapa_tdnn, resnet34, speechbrain
from spkver.models.folders import ModelFolderError, StartingModel, load_strictly
from spkver.models.speechbrain import read_hub_folder
from spkver.models.ssl import ssl_extractor
from spkver.models.wespeaker import WESPEAKER_WEIGHTS, read_wespeaker_folder, wespeaker_extractor

__all__ = ["ARCHITECTURES", "WHOLE_EXTRACTOR_ARCHITECTURES", "build_extractor", "read_spkver_folder", "LAYOUTS",
           "layout_of", "load_model", "load_extractor"]

#: Architectures whose exported ``embedding_model.ckpt`` holds the whole extractor (no SpeechBrain class builds
#: them); the others' holds the backbone alone, as SpeechBrain's layout does.
WHOLE_EXTRACTOR_ARCHITECTURES = ("ssl",)

#: Architecture names (an extractor's ``spec["architecture"]``) -> the function that builds it.
ARCHITECTURES = {"ecapa_tdnn": ecapa_tdnn, "resnet34": resnet34, "speechbrain": speechbrain,
                 "wespeaker": wespeaker_extractor, "ssl": ssl_extractor}


def build_extractor(architecture: str, **arguments) -> EmbeddingExtractor:
    """Rebuild an extractor from its ``spec`` (see :attr:`~spkver.models.extractors.EmbeddingExtractor.spec`)."""
    if architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**arguments)


def read_spkver_folder(folder: Path) -> StartingModel:
    """An experiment folder (the recipe's ``output_folder``) or one written by ``spkver export``.

    The extractor: the averaged one (``embedding_model.averaged.ckpt``) when there is one, else in an
    exported folder ``embedding_model.ckpt`` (the backbone's weights), else the latest complete
    checkpoint under ``save/``.
    """
    from spkver.checkpoints import AVERAGED_MODEL, AtomicCheckpointer, load_weights

    card = json.loads((folder / "spkver.json").read_text())
    try:
        extractor = build_extractor(**card["extractor"])
    except (KeyError, TypeError) as error:
        raise ModelError(f"{folder / 'spkver.json'}: no usable extractor description ({error})") from None
    checkpoint = None
    if (folder / "save").is_dir():
        checkpoint = AtomicCheckpointer(folder / "save").find_checkpoint(
            ckpt_predicate=lambda candidate: "embedding_model" in candidate.paramfiles)
    exported = folder / "embedding_model.ckpt"
    if (folder / AVERAGED_MODEL).exists():
        load_strictly(extractor, load_weights(folder / AVERAGED_MODEL), folder / AVERAGED_MODEL)
        layout = "spkver experiment"
    elif exported.exists():
        weights = load_weights(exported)
        whole = card["extractor"]["architecture"] in WHOLE_EXTRACTOR_ARCHITECTURES
        load_strictly(extractor if whole else extractor.backbone, weights, exported)
        layout = "spkver export"
    elif checkpoint is not None:
        path = checkpoint.paramfiles["embedding_model"]
        load_strictly(extractor, load_weights(path), path)
        layout = "spkver experiment"
    else:
        raise ModelFolderError(f"{folder}: no embedding_model.ckpt and no checkpoint under save/")
    prototypes = classes = None
    if checkpoint is not None and "classifier" in checkpoint.paramfiles:
        prototypes = load_weights(checkpoint.paramfiles["classifier"]).get("weight")
    speakers = folder / "manifests" / "speakers.json"
    if speakers.exists():
        index = json.loads(speakers.read_text())
        classes = sorted(index, key=index.get)
    mean = np.load(folder / "mean_embedding.npy") if (folder / "mean_embedding.npy").exists() else None
    return StartingModel(extractor, layout, folder, prototypes, classes, mean, card)



#: The folder layouts spkver reads: name -> (the files that identify it, its reader).
LAYOUTS = {
    "spkver": (("spkver.json",), read_spkver_folder),
    "SpeechBrain hub": (("hyperparams.yaml", "embedding_model.ckpt"), read_hub_folder),
    "WeSpeaker": (("config.yaml", "|".join(WESPEAKER_WEIGHTS)), read_wespeaker_folder),
}


def _holds(folder: Path, names) -> bool:
    return all(any((folder / option).exists() for option in name.split("|")) for name in names)


def layout_of(folder) -> str:
    """The name of the layout ``folder`` is in (the first of :data:`LAYOUTS` whose files it holds)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such folder")
    for name, (files, _) in LAYOUTS.items():
        if _holds(folder, files):
            return name
    found = sorted(path.name for path in folder.iterdir())
    listing = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "") if found else "nothing"
    accepted = "; ".join(f"{name} ({' + '.join(files).replace('|', ' or ')})" for name, (files, _) in LAYOUTS.items())
    raise ModelFolderError(f"{folder}: not a model folder: it holds {listing}; accepted layouts: {accepted}")


def load_model(folder) -> StartingModel:
    """Read a model folder in any accepted layout: its extractor (evaluation mode), prototypes and classes.

    >>> load_model("results/demo/ecapa_small_qmargin/1986").layout  # doctest: +SKIP
    'spkver experiment'
    """
    model = LAYOUTS[layout_of(folder)][1](Path(folder))
    model.extractor.eval()
    return model


def load_extractor(folder) -> EmbeddingExtractor:
    """The extractor of a model folder in any accepted layout (for hparams: ``!apply:spkver.models.load_extractor``)."""
    return load_model(folder).extractor
