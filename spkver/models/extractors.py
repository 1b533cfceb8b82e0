"""Embedding extractors and the cosine classifier head.

The backbone returns an embedding; the head holds the class prototypes; the
loss lives in :mod:`spkver.losses`.  Every extractor maps waveforms
``(B, T)`` with relative lengths ``(B,)`` to embeddings ``(B, D)``:
log-Mel filterbanks (SpeechBrain's ``Fbank``, or Kaldi's as WeSpeaker computes
them), sentence-level mean normalisation, then the backbone (SpeechBrain's
ECAPA-TDNN or ResNet, whose ``(B, 1, D)`` or ``(B, D)`` outputs are converted
to ``(B, D)`` here, at the boundary, or one of WeSpeaker's).

An extractor carries its ``spec``: ``spkver.models.build_extractor(**spec)``
rebuilds it (empty weights), which is how spkver.json describes every model folder.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spkver.errors import UserError

__all__ = ["ModelError", "FilterbankFrontend", "KaldiFilterbank", "EmbeddingExtractor", "CosineClassifier",
           "ecapa_tdnn", "resnet34", "speechbrain", "FRONTENDS"]


class ModelError(UserError, ValueError):
    """A model description (``spkver.json``, hparams) that names no known architecture."""


#: Filterbank kinds: SpeechBrain's ``Fbank`` (spkver's and SpeechBrain's models) and Kaldi's (WeSpeaker's).
FRONTENDS = ("speechbrain", "kaldi")


class KaldiFilterbank(nn.Module):
    """Kaldi log-Mel filterbanks of int16-scaled 16 kHz audio ``(B, T)`` -> ``(B, frames, n_mels)``.

    ``torchaudio.compliance.kaldi.fbank`` (what WeSpeaker calls) one utterance at a time; a padded
    batch's padding frames are masked by the mean normalisation that follows, as for ``Fbank``.
    """

    def __init__(self, n_mels: int = 80, frame_length: float = 25.0, frame_shift: float = 10.0,
                 window_type: str = "hamming", sample_rate: int = 16000):
        super().__init__()
        self.n_mels, self.frame_length, self.frame_shift = n_mels, frame_length, frame_shift
        self.window_type, self.sample_rate = window_type, sample_rate

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        from torchaudio.compliance.kaldi import fbank

        return torch.stack([fbank(waveform[None] * 32768.0, num_mel_bins=self.n_mels, frame_length=self.frame_length,
                                  frame_shift=self.frame_shift, dither=0.0, sample_frequency=self.sample_rate,
                                  window_type=self.window_type) for waveform in waveforms])


class FilterbankFrontend(nn.Module):
    """Waveform to mean-normalised log-Mel filterbanks ``(B, frames, n_mels)``.

    ``kind``: ``"speechbrain"`` (``speechbrain.lobes.features.Fbank``; ``fbank`` its other arguments, as a
    SpeechBrain ``hyperparams.yaml`` gives them) or ``"kaldi"`` (WeSpeaker's front-end,
:class:`KaldiFilterbank`).
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, kind: str = "speechbrain",
                 fbank: Optional[dict] = None):
        super().__init__()
        if kind == "speechbrain":
            from speechbrain.lobes.features import Fbank

            self.fbank = Fbank(n_mels=n_mels, sample_rate=sample_rate, **(fbank or {}))
        elif kind == "kaldi":
            self.fbank = KaldiFilterbank(n_mels=n_mels, sample_rate=sample_rate, **(fbank or {}))
        else:
            raise ModelError(f"unknown front-end {kind!r}; known: {', '.join(FRONTENDS)}")
        self.n_mels = n_mels
        self.kind = kind

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = self.fbank(waveforms)
        # Sentence-level mean normalisation over each utterance's own frames only.
        frames = features.shape[1]
        mask = (torch.arange(frames, device=features.device)[None, :]
                < (lengths * frames).round().clamp_min(1)[:, None]).to(features.dtype)[:, :, None]
        mean = (features * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return (features - mean) * mask


class EmbeddingExtractor(nn.Module):
    """Frontend + backbone: waveforms ``(B, T)`` and relative lengths ``(B,)`` to embeddings ``(B, D)``.

    ``frontend``: a :class:`FilterbankFrontend` (by default SpeechBrain's 80-bin ``Fbank``).
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, n_mels: int = 80, spec: Optional[dict] = None,
                 frontend: Optional[FilterbankFrontend] = None):
        super().__init__()
        self.frontend = frontend if frontend is not None else FilterbankFrontend(n_mels)
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        #: How to rebuild this extractor (``build_extractor(**spec)``): saved with exported models.
        self.spec = spec or {}

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone(self.frontend(waveforms, lengths), lengths)
        return embeddings.reshape(embeddings.shape[0], -1)

    def parameter_groups(self) -> dict:
        """Named parameter groups for per-group learning rates (``lr_multipliers``): one, ``extractor``."""
        return {"extractor": list(self.parameters())}


def ecapa_tdnn(channels: int = 512, embedding_dim: int = 192, n_mels: int = 80) -> EmbeddingExtractor:
    """SpeechBrain's ECAPA-TDNN (channels C for the four frame layers, 3C for the last)."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    backbone = ECAPA_TDNN(n_mels, channels=[channels] * 4 + [3 * channels], lin_neurons=embedding_dim)
    spec = {"architecture": "ecapa_tdnn", "channels": channels, "embedding_dim": embedding_dim, "n_mels": n_mels}
    return EmbeddingExtractor(backbone, embedding_dim, n_mels, spec)


def resnet34(embedding_dim: int = 256, base_channels: int = 32, n_mels: int = 80) -> EmbeddingExtractor:
    """ResNet34 (basic blocks 3-4-6-3, widths 32-64-128-256 as in WeSpeaker) from SpeechBrain's ResNet."""
    from speechbrain.lobes.models.ResNet import ResNet

    widths = [base_channels * 2 ** i for i in range(4)]
    backbone = ResNet(input_size=n_mels, channels=widths, block_sizes=[3, 4, 6, 3], strides=[1, 2, 2, 2],
                      lin_neurons=embedding_dim)
    spec = {"architecture": "resnet34", "embedding_dim": embedding_dim, "base_channels": base_channels,
            "n_mels": n_mels}
    return EmbeddingExtractor(backbone, embedding_dim, n_mels, spec)


#: SpeechBrain backbones a hub folder's ``embedding_model`` may name (``!new:`` class paths).
SPEECHBRAIN_BACKBONES = {
    "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN": ("speechbrain.lobes.models.ECAPA_TDNN", "ECAPA_TDNN"),
    "speechbrain.lobes.models.ResNet.ResNet": ("speechbrain.lobes.models.ResNet", "ResNet"),
}


def speechbrain(backbone: str, arguments: dict, fbank: Optional[dict] = None) -> EmbeddingExtractor:
    """A SpeechBrain backbone (its class path and constructor arguments, as in a hub ``hyperparams.yaml``).

    ``fbank``: the ``Fbank`` arguments (``n_mels`` among them).

    >>> speechbrain("speechbrain.lobes.models.ResNet.ResNet", {"input_size": 80}, {"n_mels": 80}).embedding_dim
    256
    """
    import importlib

    if backbone not in SPEECHBRAIN_BACKBONES:
        raise ModelError(f"SpeechBrain backbone {backbone!r} is not supported; supported: "
                         f"{', '.join(SPEECHBRAIN_BACKBONES)}")
    module, name = SPEECHBRAIN_BACKBONES[backbone]
    fbank = dict(fbank or {})
    n_mels = int(fbank.pop("n_mels", 40))  # Fbank's own default, as SpeechBrain would build it
    network_class = getattr(importlib.import_module(module), name)
    try:
        network = network_class(**arguments)
    except TypeError as error:
        raise ModelError(f"{backbone}: arguments {arguments} do not fit ({error})") from None
    # Both classes name the embedding width lin_neurons; an absent argument takes the class's own default.
    default_width = inspect.signature(network_class).parameters["lin_neurons"].default
    embedding_dim = int(arguments.get("lin_neurons", default_width))
    spec = {"architecture": "speechbrain", "backbone": backbone, "arguments": dict(arguments),
            "fbank": {"n_mels": n_mels, **fbank}}
    return EmbeddingExtractor(network, embedding_dim, n_mels, spec, frontend=FilterbankFrontend(n_mels, fbank=fbank))


class CosineClassifier(nn.Module):
    r"""Class prototypes :math:`w_j` and the cosines :math:`\cos(x, w_j)` ``(B, C)``.

    The prototypes are a ``(C, D)`` parameter, ``weight``; A3M-I re-initialises it.

    >>> head = CosineClassifier(embedding_dim=4, num_classes=3)
    >>> head(torch.randn(2, 4)).shape
    torch.Size([2, 3])
    """

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
