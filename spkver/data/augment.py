r"""Waveform augmentation: SpeechBrain's modules on real corpora, self-contained fallbacks otherwise.

With MUSAN (noise, music, speech) and RIR folders, :func:`build_augmenter`
writes their CSVs and uses SpeechBrain's ``AddNoise``/``AddReverb``; without
them it uses the generated fallbacks below, so that training recipes run the
same way everywhere.  All modules take ``(waveforms (B, T), lengths (B,))``
with relative lengths, as SpeechBrain's do.

* :class:`ColouredNoise` — noise with a :math:`1/f^{\beta}` power spectrum at
  a random SNR (white :math:`\beta=0`, pink 1, brown 2);
* :class:`BatchBabble` — babble: the sum of other utterances of the batch;
* :class:`SimulatedReverb` — an exponentially decaying noise impulse response
  with a random RT60 and direct-to-reverberant ratio.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from spkver.hparams import HparamsError

__all__ = ["ColouredNoise", "BatchBabble", "SimulatedReverb", "folder_to_csv", "build_augmenter"]

SAMPLE_RATE = 16000


def _mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, lengths: torch.Tensor, snr_db: torch.Tensor):
    """``clean + g * noise`` with ``g`` setting the SNR over each row's valid samples."""
    mask = (torch.arange(clean.shape[1], device=clean.device)[None, :]
            < (lengths * clean.shape[1]).round()[:, None]).to(clean.dtype)
    valid = mask.sum(1).clamp_min(1)
    clean_power = (clean.pow(2) * mask).sum(1) / valid
    noise_power = (noise.pow(2) * mask).sum(1) / valid
    gain = torch.sqrt(clean_power / noise_power.clamp_min(1e-12) / 10 ** (snr_db / 10))
    return clean + gain[:, None] * noise * mask


class ColouredNoise(nn.Module):
    r"""Additive :math:`1/f^\beta` noise, :math:`\beta \sim U(\beta_{lo}, \beta_{hi})`, SNR :math:`\sim U(lo, hi)` dB.

    >>> noisy = ColouredNoise(snr_low=5, snr_high=5)(torch.randn(2, 16000), torch.ones(2))
    >>> noisy.shape
    torch.Size([2, 16000])
    """

    def __init__(self, snr_low: float = 0.0, snr_high: float = 15.0, exponent_low: float = 0.0,
                 exponent_high: float = 2.0):
        super().__init__()
        if snr_low > snr_high or exponent_low > exponent_high:
            raise HparamsError("need snr_low <= snr_high and exponent_low <= exponent_high")
        self.snr = (snr_low, snr_high)
        self.exponent = (exponent_low, exponent_high)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, samples = waveforms.shape
        spectrum = torch.fft.rfft(torch.randn_like(waveforms), dim=1)
        frequencies = torch.fft.rfftfreq(samples, device=waveforms.device).clamp_min(1.0 / samples)
        exponent = torch.empty(batch, 1, device=waveforms.device).uniform_(*self.exponent)
        noise = torch.fft.irfft(spectrum / frequencies[None, :] ** (exponent / 2), n=samples, dim=1)
        snr = torch.empty(batch, device=waveforms.device).uniform_(*self.snr)
        return _mix_at_snr(waveforms, noise, lengths, snr)


class BatchBabble(nn.Module):
    """Babble noise made of ``speakers`` other utterances of the same batch, at a random SNR."""

    def __init__(self, speakers: int = 3, snr_low: float = 5.0, snr_high: float = 20.0):
        super().__init__()
        if speakers < 1:
            raise HparamsError(f"speakers must be >= 1, got {speakers}")
        self.speakers = speakers
        self.snr = (snr_low, snr_high)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if waveforms.shape[0] < 2:
            return waveforms  # no other utterance to babble with
        babble = sum(torch.roll(waveforms, shifts=k + 1, dims=0)
                     for k in range(min(self.speakers, waveforms.shape[0] - 1)))
        snr = torch.empty(waveforms.shape[0], device=waveforms.device).uniform_(*self.snr)
        return _mix_at_snr(waveforms, babble, lengths, snr)


class SimulatedReverb(nn.Module):
    """Convolution with a simulated room: exponentially decaying noise with RT60 ~ U(lo, hi) seconds."""

    def __init__(self, rt60_low: float = 0.2, rt60_high: float = 0.8, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        if not 0 < rt60_low <= rt60_high:
            raise HparamsError(f"need 0 < rt60_low <= rt60_high, got {rt60_low} and {rt60_high}")
        self.rt60 = (rt60_low, rt60_high)
        self.sample_rate = sample_rate

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, samples = waveforms.shape
        rt60 = torch.empty(batch, 1, device=waveforms.device).uniform_(*self.rt60)
        length = int(self.rt60[1] * self.sample_rate)
        t = torch.arange(length, device=waveforms.device)[None, :] / self.sample_rate
        rir = torch.randn(batch, length, device=waveforms.device) * torch.exp(-6.9 * t / rt60)
        rir[:, 0] = 1.0 / torch.empty(batch, device=waveforms.device).uniform_(0.2, 1.0)
        rir = rir / rir.norm(dim=1, keepdim=True)
        size = samples + length - 1
        wet = torch.fft.irfft(torch.fft.rfft(waveforms, n=size) * torch.fft.rfft(rir, n=size), n=size)[:, :samples]
        # Keep the level of the dry signal (as SpeechBrain's AddReverb does).
        scale = waveforms.abs().amax(1, keepdim=True) / wet.abs().amax(1, keepdim=True).clamp_min(1e-8)
        return wet * scale


def folder_to_csv(folder, csv_file, max_length: Optional[float] = None) -> Path:
    """Write SpeechBrain's noise/RIR CSV (ID, duration, wav, ...) for every wav/flac under ``folder``."""
    from speechbrain.augment.preparation import write_csv

    folder = Path(folder)
    if not folder.is_dir():
        raise HparamsError(f"{folder}: augmentation folder does not exist")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    if not files:
        raise HparamsError(f"{folder}: no wav or flac files for augmentation")
    csv_file = Path(csv_file)
    csv_file.parent.mkdir(parents=True, exist_ok=True)
    write_csv(files, str(csv_file), max_length)
    return csv_file


def build_augmenter(csv_folder, noise_folders: Sequence = (), rir_folder=None, snr_low: float = 0.0,
                    snr_high: float = 15.0, babble_speakers: int = 3, rt60_low: float = 0.2,
                    rt60_high: float = 0.8, concat_original: bool = True, min_augmentations: int = 1,
                    max_augmentations: int = 1, augment_prob: float = 1.0):
    """A SpeechBrain ``Augmenter`` over noise, babble and reverberation.

    ``noise_folders`` (e.g. MUSAN's noise/ music/ speech/) and ``rir_folder``
    use real recordings through ``AddNoise``/``AddReverb``; when none is given,
    :class:`ColouredNoise`, :class:`BatchBabble` and :class:`SimulatedReverb`
    stand in.  With ``concat_original`` the clean batch is kept next to the
    augmented one (SpeechBrain's convention: labels must be repeated).
    """
    from speechbrain.augment.augmenter import Augmenter
    from speechbrain.augment.time_domain import AddNoise, AddReverb

    csv_folder = Path(csv_folder)
    augmentations = []
    for folder in noise_folders:
        csv_file = folder_to_csv(folder, csv_folder / f"noise_{Path(folder).name}.csv", max_length=5.0)
        augmentations.append(AddNoise(csv_file=str(csv_file), snr_low=snr_low, snr_high=snr_high,
                                      pad_noise=True, normalize=True))
    if not noise_folders:
        augmentations += [ColouredNoise(snr_low, snr_high), BatchBabble(babble_speakers, max(snr_low, 5.0),
                                                                        max(snr_high, 20.0))]
    if rir_folder is not None:
        csv_file = folder_to_csv(rir_folder, csv_folder / "rir.csv")
        augmentations.append(AddReverb(csv_file=str(csv_file)))
    else:
        augmentations.append(SimulatedReverb(rt60_low, rt60_high))
    return Augmenter(parallel_augment=False, concat_original=concat_original,
                     min_augmentations=min_augmentations, max_augmentations=max_augmentations,
                     shuffle_augmentations=True, augment_prob=augment_prob, augmentations=augmentations)
