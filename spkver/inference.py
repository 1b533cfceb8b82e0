"""Embedding extraction from whole utterances, batched by length.

Backbones such as ECAPA-TDNN pad their convolutions by reflection, so a short
utterance zero-padded inside a batch does not see what it sees alone.  To make
batched and one-by-one embeddings agree, every utterance is trimmed to a
multiple of ``quantum_seconds`` (0.1 s by default: at most 99 ms of trailing
audio are dropped, the same way in both paths) and batches only hold
utterances of exactly equal trimmed length, so no batch is padded.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

__all__ = ["AudioError", "read_audio", "trimmed_length", "length_batches", "embed_files", "embed_waveform"]

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """An audio file cannot be embedded: the message names it."""


def read_audio(path) -> np.ndarray:
    """Mono float32 samples of a 16 kHz file."""
    import soundfile

    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:
        raise AudioError(f"{path}: cannot read audio ({str(error).splitlines()[0]})") from None
    if rate != SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE}")
    audio = audio.mean(axis=1)
    if audio.size == 0:
        raise AudioError(f"{path}: empty audio")
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    return audio


def trimmed_length(samples: int, quantum: int) -> int:
    """Length used for embedding: a multiple of ``quantum`` (whole file if shorter than one)."""
    if quantum <= 0 or samples < quantum:
        return samples
    return samples // quantum * quantum


def length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped into batches of equal length, longest first."""
    groups: Dict[int, List[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        groups[length].append(index)
    batches = []
    for length in sorted(groups, reverse=True):
        members = groups[length]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


@torch.no_grad()
def embed_waveform(extractor, audio: np.ndarray, quantum_seconds: float = 0.1, device="cpu") -> np.ndarray:
    """Embedding of one utterance (the one-by-one path)."""
    samples = trimmed_length(audio.size, int(quantum_seconds * SAMPLE_RATE))
    waveform = torch.from_numpy(np.ascontiguousarray(audio[:samples]))[None].to(device)
    return extractor(waveform, torch.ones(1, device=device)).cpu().numpy()[0]


@torch.no_grad()
def embed_files(extractor, paths: Sequence, batch_size: int = 16, quantum_seconds: float = 0.1, device="cpu",
                progress: bool = True) -> np.ndarray:
    """Embeddings ``(N, D)`` of whole files, batched by trimmed length, in the order of ``paths``."""
    from tqdm import tqdm

    quantum = int(quantum_seconds * SAMPLE_RATE)
    lengths = []
    import soundfile

    for path in paths:
        try:
            info = soundfile.info(str(path))
        except Exception as error:
            raise AudioError(f"{path}: cannot read audio ({str(error).splitlines()[0]})") from None
        lengths.append(trimmed_length(info.frames, quantum))
    extractor.eval()
    output = None
    batches = length_batches(lengths, batch_size)
    for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress):
        waveforms = torch.from_numpy(np.stack([read_audio(paths[i])[:lengths[i]] for i in batch])).to(device)
        embeddings = extractor(waveforms, torch.ones(len(batch), device=device)).cpu().numpy()
        if output is None:
            output = np.empty((len(paths), embeddings.shape[1]), dtype=np.float32)
        output[batch] = embeddings
    return output
