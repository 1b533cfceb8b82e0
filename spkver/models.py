"""Embedding extractors and the cosine classifier head.

The backbone returns an embedding; the head holds the class prototypes; the
loss lives in :mod:`spkver.losses`.  Every extractor maps waveforms
``(B, T)`` with relative lengths ``(B,)`` to embeddings ``(B, D)``:
80-dimensional log-Mel filterbanks, sentence-level mean normalisation, then
the backbone (SpeechBrain's ECAPA-TDNN or ResNet, whose ``(B, 1, D)`` or
``(B, D)`` outputs are converted to ``(B, D)`` here, at the boundary).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spkver.errors import UserError

__all__ = ["ModelError", "FilterbankFrontend", "EmbeddingExtractor", "CosineClassifier", "ecapa_tdnn", "resnet34",
           "build_extractor"]


class ModelError(UserError, ValueError):
    """A model description (``spkver.json``, hparams) that names no known architecture."""


class FilterbankFrontend(nn.Module):
    """Waveform to mean-normalised log-Mel filterbanks ``(B, frames, n_mels)``."""

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000):
        super().__init__()
        from speechbrain.lobes.features import Fbank

        self.fbank = Fbank(n_mels=n_mels, sample_rate=sample_rate)
        self.n_mels = n_mels

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = self.fbank(waveforms)
        # Sentence-level mean normalisation over each utterance's own frames only.
        frames = features.shape[1]
        mask = (torch.arange(frames, device=features.device)[None, :]
                < (lengths * frames).round().clamp_min(1)[:, None]).to(features.dtype)[:, :, None]
        mean = (features * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return (features - mean) * mask


class EmbeddingExtractor(nn.Module):
    """Frontend + backbone: waveforms ``(B, T)`` and relative lengths ``(B,)`` to embeddings ``(B, D)``."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, n_mels: int = 80, spec: Optional[dict] = None):
        super().__init__()
        self.frontend = FilterbankFrontend(n_mels)
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        #: How to rebuild this extractor (``build_extractor(**spec)``): saved with exported models.
        self.spec = spec or {}

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone(self.frontend(waveforms, lengths), lengths)
        return embeddings.reshape(embeddings.shape[0], -1)


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


ARCHITECTURES = {"ecapa_tdnn": ecapa_tdnn, "resnet34": resnet34}


def build_extractor(architecture: str, **arguments) -> EmbeddingExtractor:
    """Rebuild an extractor from its ``spec`` (see :attr:`EmbeddingExtractor.spec`)."""
    if architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**arguments)


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
