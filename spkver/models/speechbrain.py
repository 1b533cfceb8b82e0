"""SpeechBrain hub folders (``spkrec-ecapa-voxceleb``, ``spkrec-resnet-voxceleb``), read offline.

A hub folder as ``huggingface-cli download`` leaves it: ``hyperparams.yaml``, ``embedding_model.ckpt``
and, when present, ``mean_var_norm_emb.ckpt`` (the global embedding mean), ``classifier.ckpt`` (the
prototypes) and ``label_encoder.txt`` (their speakers). SpeechBrain's own loader instantiates every
``!new:`` in ``hyperparams.yaml`` and fetches the pretrainer's ``paths`` (``pretrained_path:
speechbrain/...`` points at the hub); spkver does neither: it reads the YAML as data, builds only the
classes it knows (``Fbank``, sentence ``InputNormalization``, the backbones of
:data:`spkver.models.extractors.SPEECHBRAIN_BACKBONES`), takes every file from the folder itself and
reads each checkpoint with torch's weights-only unpickler. The extractor computes what
``EncoderClassifier.encode_batch`` computes (filterbanks, sentence mean normalisation, the backbone;
``tests/test_public_models.py`` loads one folder with both); the global embedding mean the
pretrainer loads (``mean_var_norm_emb``, what ``encode_batch(normalize=True)`` subtracts) is the
mean spkver subtracts before scoring.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, List, NamedTuple

import yaml

from spkver.models.extractors import ModelError, speechbrain
from spkver.models.folders import ModelFolderError, StartingModel, load_strictly

__all__ = ["read_hub_folder", "read_label_encoder"]

FBANK = "speechbrain.lobes.features.Fbank"
INPUT_NORMALIZATION = "speechbrain.processing.features.InputNormalization"


class _Tagged(NamedTuple):
    """A ``!new:``/``!name:``/``!apply:`` node, kept as data: the tag's target and its arguments."""

    target: str
    arguments: Any


class _DataLoader(yaml.SafeLoader):
    """Reads HyperPyYAML's tags as :class:`_Tagged` records; never imports or calls what they name."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        arguments = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        arguments = loader.construct_sequence(node, deep=True)
    else:
        arguments = loader.construct_scalar(node)
    return _Tagged(suffix.split(":", 1)[-1], arguments)


_DataLoader.add_multi_constructor("!", _tagged)


def _read_hyperparams(path: Path) -> dict:
    import hyperpyyaml

    try:
        with open(path) as stream:  # references resolved; pretrained_path pointed here, never at the hub
            resolved = hyperpyyaml.resolve_references(stream, overrides={"pretrained_path": str(path.parent)})
        hparams = yaml.load(io.StringIO(resolved.getvalue()), Loader=_DataLoader)
    except Exception as error:  # HyperPyYAML raises bare ValueError/KeyError on malformed references
        raise ModelFolderError(f"{path}: not a readable hyperparams file ({str(error).splitlines()[0]})") from None
    if not isinstance(hparams, dict):
        raise ModelFolderError(f"{path}: not a mapping of hyperparameters")
    return hparams


def _node(hparams: dict, name: str, path: Path, required: bool = True):
    node = hparams.get(name)
    if node is None and not required:
        return None
    if not isinstance(node, _Tagged) or not isinstance(node.arguments, (dict, type(None))):
        raise ModelFolderError(f"{path}: {name} is not a '!new:' object with arguments")
    return node


def read_label_encoder(path: Path) -> List[str]:
    """The labels of a SpeechBrain ``CategoricalEncoder`` file (``'label' => index`` lines), by index."""
    import ast

    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("=") or " => " not in line:
            break  # the separator before the encoder's own settings
        label, index = line.rsplit(" => ", 1)
        try:
            labels[int(index)] = str(ast.literal_eval(label))
        except (ValueError, SyntaxError):
            raise ModelFolderError(f"{path}:{number}: not a 'label' => index line: {line!r}") from None
    return [labels[index] for index in sorted(labels)]


def read_hub_folder(folder) -> StartingModel:
    """The extractor (and prototypes, speakers) of a SpeechBrain hub folder; nothing is downloaded."""
    from spkver.checkpoints import load_weights

    folder = Path(folder)
    path = folder / "hyperparams.yaml"
    hparams = _read_hyperparams(path)
    features = _node(hparams, "compute_features", path)
    if features.target != FBANK:
        raise ModelFolderError(f"{path}: compute_features is {features.target}; spkver reads {FBANK}")
    normalisation = _node(hparams, "mean_var_norm", path, required=False)
    if normalisation is not None:
        settings = normalisation.arguments or {}
        if (normalisation.target != INPUT_NORMALIZATION or settings.get("norm_type", "global") != "sentence"
                or settings.get("std_norm", True)):
            raise ModelFolderError(f"{path}: mean_var_norm is {normalisation.target} {settings}; spkver reads "
                                   "sentence mean normalisation (norm_type: sentence, std_norm: False)")
    backbone = _node(hparams, "embedding_model", path)
    try:
        extractor = speechbrain(backbone.target, backbone.arguments or {}, fbank=features.arguments or {})
    except ModelError as error:
        raise ModelFolderError(f"{path}: {error}") from None
    weights_path = folder / "embedding_model.ckpt"
    load_strictly(extractor.backbone, load_weights(weights_path), weights_path)
    mean = None
    pretrainer = hparams.get("pretrainer")
    loadables = (pretrainer.arguments or {}).get("loadables", {}) if isinstance(pretrainer, _Tagged) else {}
    if "mean_var_norm_emb" in loadables:  # as SpeechBrain: a mean the pretrainer does not load is not used
        mean_path = folder / "mean_var_norm_emb.ckpt"
        statistics = load_weights(mean_path)
        mean = statistics.get("glob_mean") if isinstance(statistics, dict) else None
        if mean is None or mean.numel() != extractor.embedding_dim:
            raise ModelFolderError(f"{mean_path}: no glob_mean of {extractor.embedding_dim} values")
        mean = mean.reshape(-1).numpy().astype("float32")
    prototypes = classes = None
    if (folder / "classifier.ckpt").exists():
        prototypes = load_weights(folder / "classifier.ckpt").get("weight")
    if (folder / "label_encoder.txt").exists():
        classes = read_label_encoder(folder / "label_encoder.txt")
    return StartingModel(extractor, "SpeechBrain hub folder", folder, prototypes, classes, mean)
