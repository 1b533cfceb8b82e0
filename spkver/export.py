"""Exporting any model folder spkver reads as a SpeechBrain pretrained folder (and ONNX).

``spkver export --model FOLDER --out PRETRAINED_FOLDER [--onnx]`` takes any layout of
:data:`spkver.models.LAYOUTS` (a spkver experiment, a SpeechBrain hub folder, a WeSpeaker folder) and
writes SpeechBrain's pretrained-model layout, which both toolkits load:

* ``hyperparams.yaml`` -- ``compute_features``, ``mean_var_norm`` (sentence mean normalisation),
  ``embedding_model``, ``label_encoder`` and a ``pretrainer``, so that
  ``EncoderClassifier.from_hparams(source=folder)`` and ``SpeakerRecognition.verify_files`` work on
  it. spkver's and SpeechBrain's extractors are SpeechBrain classes (``Fbank``, ``ECAPA_TDNN``,
  ``ResNet``): SpeechBrain alone loads them. WeSpeaker's name spkver's classes (the Kaldi
  front-end and the backbone), so loading them with SpeechBrain needs spkver installed;
* ``embedding_model.ckpt`` (the backbone's weights), the embedding mean subtracted before scoring
  (``mean_embedding.npy`` for spkver, ``mean_var_norm_emb.ckpt`` for SpeechBrain's
  ``encode_batch(normalize=True)``) when the source has one, ``label_encoder.txt`` (the
  prototypes' classes, when known), ``spkver.json`` (the extractor's spec, and the threshold), and
  when the source has them ``calibration.json`` and ``cohort.npz`` (what
  :class:`~spkver.inference.SpeakerEmbedder` reuses);
* with ``--onnx``, ``embedding_model.onnx``: the backbone with a dynamic
  time axis.  The front-end is **not** in the ONNX graph: its input is the mean-normalised
  filterbanks ``(batch, frames, n_mels)`` that ``compute_features`` + ``mean_var_norm`` produce.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from spkver.errors import UserError
from spkver.inference import SpeakerEmbedder

__all__ = ["export_pretrained", "export_onnx", "speechbrain_objects", "ExportError"]

_HEADER = """# Exported by spkver: a speaker-embedding extractor in SpeechBrain's pretrained layout.
# EncoderClassifier.from_hparams(source=<this folder>) loads it; see spkver.json for the
# verification threshold and score scale used by spkver.
"""

_PRETRAINED = """
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>{embedding_norm_module}

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        label_encoder: !ref <label_encoder>{embedding_norm_loadable}
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt{embedding_norm_path}
"""


def _tagged(tag: str, arguments: dict) -> str:
    body = yaml.safe_dump(arguments, default_flow_style=None, sort_keys=False).rstrip("\n")
    return f"{tag}\n" + "\n".join("    " + line for line in body.splitlines())


def speechbrain_objects(spec: dict) -> dict:
    """``compute_features`` and ``embedding_model`` of an extractor spec, as HyperPyYAML tagged objects."""
    architecture = spec["architecture"]
    if architecture == "ecapa_tdnn":
        c = spec["channels"]
        return {"compute_features": _tagged("!new:speechbrain.lobes.features.Fbank", {"n_mels": spec["n_mels"]}),
                "embedding_model": _tagged("!new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN", {
                    "input_size": spec["n_mels"], "channels": [c] * 4 + [3 * c],
                    "lin_neurons": spec["embedding_dim"]})}
    if architecture == "resnet34":
        b = spec["base_channels"]
        return {"compute_features": _tagged("!new:speechbrain.lobes.features.Fbank", {"n_mels": spec["n_mels"]}),
                "embedding_model": _tagged("!new:speechbrain.lobes.models.ResNet.ResNet", {
                    "input_size": spec["n_mels"], "channels": [b, 2 * b, 4 * b, 8 * b], "block_sizes": [3, 4, 6, 3],
                    "strides": [1, 2, 2, 2], "lin_neurons": spec["embedding_dim"]})}
    if architecture == "speechbrain":
        return {"compute_features": _tagged("!new:speechbrain.lobes.features.Fbank", spec["fbank"]),
                "embedding_model": _tagged(f"!new:{spec['backbone']}", spec["arguments"])}
    if architecture == "wespeaker":
        n_mels = int(spec["model_args"].get("feat_dim", 80))
        return {"compute_features": _tagged("!new:spkver.models.extractors.KaldiFilterbank", {"n_mels": n_mels}),
                "embedding_model": _tagged("!apply:spkver.models.wespeaker.wespeaker_backbone",
                                           {"model": spec["model"], "model_args": spec["model_args"]})}
    raise ValueError(f"no SpeechBrain layout for architecture {architecture!r}")


def _write_label_encoder(path: Path, classes) -> None:
    lines = [f"'{name}' => {index}" for index, name in enumerate(classes)]
    path.write_text("\n".join(lines + ["================", "'starting_index' => 0"]) + "\n")


def export_pretrained(model_folder, out, onnx: bool = False) -> Path:
    """Write the pretrained folder for any model folder spkver reads; return its path.

    An SSL extractor (no SpeechBrain class builds it) is written as a self-contained spkver folder: the
    encoder's config in spkver.json, the whole extractor's weights (LoRA merged) in
    embedding_model.ckpt, no SpeechBrain hyperparams.
    """
    from spkver.models import WHOLE_EXTRACTOR_ARCHITECTURES, load_model

    model_folder, out = Path(model_folder), Path(out).resolve()
    model = load_model(model_folder)
    embedder = SpeakerEmbedder.from_model(model)
    out.mkdir(parents=True, exist_ok=True)
    whole = model.extractor.spec["architecture"] in WHOLE_EXTRACTOR_ARCHITECTURES
    extractor = embedder.extractor.merged() if whole else embedder.extractor
    torch.save((extractor if whole else extractor.backbone).state_dict(), out / "embedding_model.ckpt")
    _write_label_encoder(out / "label_encoder.txt", model.classes or [])
    if embedder.mean is not None:
        np.save(out / "mean_embedding.npy", embedder.mean)
    if not whole:
        _write_speechbrain_hyperparams(out, extractor.spec, embedder.mean)
    card = {**model.card, "extractor": extractor.spec}
    card.setdefault("threshold", None)
    card.setdefault("calibration", f"none: exported from a {model.layout} ({model_folder})")
    (out / "spkver.json").write_text(json.dumps(card, indent=2) + "\n")
    for name in ("calibration.json", "cohort.npz"):  # what verify and score reuse
        if (model_folder / name).exists():
            shutil.copy(model_folder / name, out / name)
    if onnx:
        export_onnx(extractor, out / "embedding_model.onnx")
    return out


def _write_speechbrain_hyperparams(out: Path, spec: dict, mean) -> None:
    """hyperparams.yaml (and, with an embedding mean, mean_var_norm_emb.ckpt) in SpeechBrain's layout."""
    objects = speechbrain_objects(spec)
    embedding_norm = {"embedding_norm_module": "", "embedding_norm_loadable": "", "embedding_norm_path": ""}
    text = (_HEADER + f"pretrained_path: {out}\nsample_rate: 16000\n\n"
            f"compute_features: {objects['compute_features']}\n\n"
            "mean_var_norm: !new:speechbrain.processing.features.InputNormalization\n"
            "    norm_type: sentence\n    std_norm: False\n\n"
            f"embedding_model: {objects['embedding_model']}\n")
    if mean is not None:  # SpeechBrain's global embedding normalisation (encode_batch(normalize=True))
        mean = torch.from_numpy(mean).reshape(-1)
        torch.save({"count": 1, "glob_mean": mean, "glob_std": torch.ones_like(mean)}, out / "mean_var_norm_emb.ckpt")
        text += ("\nmean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization\n"
                 "    norm_type: global\n    std_norm: False\n")
        embedding_norm = {"embedding_norm_module": "\n    mean_var_norm_emb: !ref <mean_var_norm_emb>",
                          "embedding_norm_loadable": "\n        mean_var_norm_emb: !ref <mean_var_norm_emb>",
                          "embedding_norm_path":
                              "\n        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt"}
    (out / "hyperparams.yaml").write_text(text + _PRETRAINED.format(**embedding_norm))


def export_onnx(extractor, path) -> Path:
    """The backbone as ONNX: input ``features`` (batch, frames, n_mels), output ``embeddings`` (batch, D)."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it to write the file)
    except ImportError:
        raise ImportError("ONNX export needs onnx (and onnxruntime to run it): pip install 'spkver[onnx]'") from None

    class Backbone(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, features):
            embeddings = self.backbone(features)
            return embeddings.reshape(embeddings.shape[0], -1)

    if extractor.spec["architecture"] == "ssl":
        return _export_ssl_onnx(extractor, path)
    model = Backbone(extractor.backbone).eval().cpu()
    example = torch.randn(1, 200, extractor.frontend.n_mels)
    torch.onnx.export(model, (example,), str(path), input_names=["features"], output_names=["embeddings"],
                      dynamic_axes={"features": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return Path(path)


class ExportError(UserError, RuntimeError):
    """A model the ONNX exporter cannot write: names the model and the exporter's reason."""


def _export_ssl_onnx(extractor, path) -> Path:
    """The whole SSL extractor as ONNX (input ``waveforms`` (batch, samples)), where torch's exporter can trace it.

    w2v-BERT's feature extractor (SeamlessM4T's) computes its filterbanks in NumPy, which a trace would
    freeze into constants: refused. The written graph is checked against the extractor on an input of
    another length (with onnxruntime, when installed) and removed if it differs.
    """
    extractor = extractor.eval().cpu()
    if extractor.spec["encoder"] == "w2v-bert":
        raise ExportError("ONNX export of w2v-BERT: its feature extractor (SeamlessM4T's filterbanks) runs in "
                          "NumPy, which torch.onnx would freeze into constants; the spkver folder beside it is "
                          "complete")
    try:
        torch.onnx.export(extractor, (torch.randn(1, 32000),), str(path), input_names=["waveforms"],
                          output_names=["embeddings"], dynamic_axes={"waveforms": {0: "batch", 1: "samples"},
                                                                     "embeddings": {0: "batch"}},
                          opset_version=17, dynamo=False)
    except Exception as error:  # the exporter's own failure: named, and the spkver folder is already written
        Path(path).unlink(missing_ok=True)
        raise ExportError(f"ONNX export of the {extractor.spec['encoder']} encoder failed in torch.onnx "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); the spkver folder "
                          "beside it is complete") from None
    try:
        import onnxruntime
    except ImportError:
        return Path(path)
    check = torch.randn(2, 24000, generator=torch.Generator().manual_seed(0)) * 0.1
    (got,) = onnxruntime.InferenceSession(str(path)).run(None, {"waveforms": check.numpy()})
    with torch.no_grad():
        expected = extractor(check).numpy()
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max())):
        Path(path).unlink()
        raise ExportError(f"ONNX export of the {extractor.spec['encoder']} encoder: the graph torch.onnx wrote "
                          "differs from the model on another input length; not written")
    return Path(path)
