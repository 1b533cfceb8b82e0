"""Exporting a trained extractor as a SpeechBrain pretrained folder (and ONNX).

``spkver export --model EXP_FOLDER --out PRETRAINED_FOLDER [--onnx]`` writes
SpeechBrain's pretrained-model layout, loadable with SpeechBrain alone:

* ``hyperparams.yaml`` — ``compute_features`` (80-dim ``Fbank``), ``mean_var_norm``
  (sentence mean normalisation), ``embedding_model`` (SpeechBrain's ECAPA-TDNN or
  ResNet), ``label_encoder`` and a ``pretrainer``, so that
  ``EncoderClassifier.from_hparams(source=folder)`` and
  ``SpeakerRecognition.verify_files`` work on it;
* ``embedding_model.ckpt`` (the backbone's weights), ``label_encoder.txt``
  (the training speakers), ``spkver.json``, ``mean_embedding.npy``, and when the
  experiment has them ``calibration.json`` and ``cohort.npz`` (the threshold,
  mean, LLR map and AS-norm cohort :class:`~spkver.inference.SpeakerEmbedder` uses);
* with ``--onnx``, ``embedding_model.onnx``: the backbone with a dynamic time
  axis.  The filterbank frontend is **not** in the ONNX graph: its input is
  mean-normalised 80-dim log-Mel features ``(batch, frames, 80)``, as
  ``compute_features`` + ``mean_var_norm`` produce them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from spkver.inference import SpeakerEmbedder

__all__ = ["export_pretrained", "export_onnx"]

_BACKBONES = {
    "ecapa_tdnn": """embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: {n_mels}
    channels: [{c}, {c}, {c}, {c}, {c3}]
    lin_neurons: {embedding_dim}""",
    "resnet34": """embedding_model: !new:speechbrain.lobes.models.ResNet.ResNet
    input_size: {n_mels}
    channels: [{b}, {b2}, {b4}, {b8}]
    block_sizes: [3, 4, 6, 3]
    strides: [1, 2, 2, 2]
    lin_neurons: {embedding_dim}""",
}

_HYPERPARAMS = """# Exported by spkver: a speaker-embedding extractor in SpeechBrain's pretrained layout.
# EncoderClassifier.from_hparams(source=<this folder>) loads it; see spkver.json for the
# verification threshold and score scale used by spkver.
pretrained_path: {folder}
sample_rate: 16000
n_mels: {n_mels}

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

{backbone}

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


def _backbone_yaml(spec: dict) -> str:
    if spec["architecture"] == "ecapa_tdnn":
        c = spec["channels"]
        return _BACKBONES["ecapa_tdnn"].format(n_mels=spec["n_mels"], c=c, c3=3 * c,
                                               embedding_dim=spec["embedding_dim"])
    b = spec["base_channels"]
    return _BACKBONES["resnet34"].format(n_mels=spec["n_mels"], b=b, b2=2 * b, b4=4 * b, b8=8 * b,
                                         embedding_dim=spec["embedding_dim"])


def _write_label_encoder(path: Path, speakers) -> None:
    lines = [f"'{speaker}' => {index}" for speaker, index in sorted(speakers.items(), key=lambda item: item[1])]
    path.write_text("\n".join(lines) + "\n================\n'starting_index' => 0\n")


def export_pretrained(experiment, out, onnx: bool = False) -> Path:
    """Write the pretrained folder for an experiment folder; return its path."""
    experiment, out = Path(experiment), Path(out).resolve()
    embedder = SpeakerEmbedder.from_pretrained(experiment)
    spec = embedder.extractor.spec
    out.mkdir(parents=True, exist_ok=True)
    torch.save(embedder.extractor.backbone.state_dict(), out / "embedding_model.ckpt")
    speakers_path = experiment / "manifests" / "speakers.json"
    speakers = json.loads(speakers_path.read_text()) if speakers_path.exists() else {}
    _write_label_encoder(out / "label_encoder.txt", speakers)
    (out / "hyperparams.yaml").write_text(
        _HYPERPARAMS.format(folder=out, n_mels=spec["n_mels"], backbone=_backbone_yaml(spec)))
    shutil.copy(experiment / "spkver.json", out / "spkver.json")
    for name in ("mean_embedding.npy", "calibration.json", "cohort.npz"):  # what verify and score reuse
        if (experiment / name).exists():
            shutil.copy(experiment / name, out / name)
    if onnx:
        export_onnx(embedder.extractor, out / "embedding_model.onnx")
    return out


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

    model = Backbone(extractor.backbone).eval().cpu()
    example = torch.randn(1, 200, extractor.spec["n_mels"])
    torch.onnx.export(model, (example,), str(path), input_names=["features"], output_names=["embeddings"],
                      dynamic_axes={"features": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return Path(path)
