"""SpeechBrain datasets over the manifests of :mod:`spkver.data.voxceleb`.

Training items are random crops of ``crop_seconds`` from the prepared chunks
(the whole chunk when shorter), with the speaker's class index from
``speakers.json``; validation items are the chunks themselves, cropped at
their start for a stable measure.

Speed perturbation (WeSpeaker's): each training item is played at one of
``factors`` (0.9, 1.0, 1.1 by default) drawn with ``probabilities``, by
resampling a crop of ``factor * crop_seconds`` to ``crop_seconds`` (tempo and
pitch change together, as sox's ``speed``), and each non-unit speed is a class
of its own: speaker ``i`` at the ``k``-th factor is class ``i + k * S`` for
``S`` speakers, so there are ``S * len(factors)`` classes, the unit factor
keeping the speakers' own indices.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence, Tuple

import soundfile
import torch

from spkver.hparams import HparamsError

__all__ = ["speaker_datasets", "manifest_roots", "SpeedPerturbation"]


class SpeedPerturbation:
    """Playback speeds and their probabilities; the unit speed (which must be there) comes first.

    >>> SpeedPerturbation([0.9, 1.0, 1.1]).factors
    [1.0, 0.9, 1.1]
    """

    def __init__(self, factors: Sequence[float] = (0.9, 1.0, 1.1), probabilities: Optional[Sequence[float]] = None):
        factors = [float(f) for f in factors]
        if not factors or any(not 0.5 <= f <= 2.0 for f in factors) or len(set(factors)) != len(factors):
            raise HparamsError(f"speed_perturb factors must be distinct speeds in [0.5, 2], got {factors}")
        if 1.0 not in factors:
            raise HparamsError(f"speed_perturb factors must include 1.0 (the speakers' own classes), got {factors}")
        probabilities = [1.0 / len(factors)] * len(factors) if probabilities is None else \
            [float(p) for p in probabilities]
        if len(probabilities) != len(factors) or any(p < 0 for p in probabilities) or \
                abs(sum(probabilities) - 1.0) > 1e-6:
            raise HparamsError(f"speed_perturb probabilities must be one per factor, >= 0, summing to 1; "
                             f"got {probabilities} for {factors}")
        order = [factors.index(1.0)] + [i for i, f in enumerate(factors) if f != 1.0]
        self.factors = [factors[i] for i in order]
        self.probabilities = [probabilities[i] for i in order]

    def choose(self) -> int:
        """The index of a factor, drawn with the probabilities."""
        return random.choices(range(len(self.factors)), weights=self.probabilities)[0]

    #: One resampler per speed: its windowed-sinc kernel is built once, not for every item (that
    #: doubled the cost of a perturbed item; benchmarks/bench_input.py).
    _resamplers: dict = {}

    @classmethod
    def play(cls, waveform: torch.Tensor, factor: float) -> torch.Tensor:
        """``waveform`` played ``factor`` times faster: ``len / factor`` samples."""
        if factor == 1.0:
            return waveform
        resampler = cls._resamplers.get(factor)
        if resampler is None:
            import torchaudio

            resampler = cls._resamplers[factor] = torchaudio.transforms.Resample(orig_freq=round(100 * factor),
                                                                                 new_freq=100)
        with torch.no_grad():
            return resampler(waveform)


def manifest_roots(manifest_folder) -> dict:
    """The ``$vox1_root``/``$vox2_root`` replacements written by preparation."""
    return json.loads((Path(manifest_folder) / "roots.json").read_text())


def speaker_datasets(manifest_folder, crop_seconds: float = 2.0, sample_rate: int = 16000,
                     speed_perturb: Optional[SpeedPerturbation] = None) -> Tuple:
    """``(train, valid, num_classes)`` DynamicItemDatasets with ``sig`` and ``speaker_index``.

    ``num_classes`` is the number of speakers, times the number of speeds with ``speed_perturb``
    (training items only are perturbed; validation items keep the speakers' own classes).
    """
    import speechbrain as sb

    from spkver.data.voxceleb import PreparationError

    folder = Path(manifest_folder)
    replacements = manifest_roots(folder)
    speakers = json.loads((folder / "speakers.json").read_text())
    crop = int(crop_seconds * sample_rate)
    factors = [1.0] if speed_perturb is None else speed_perturb.factors

    def read(wav, start, stop, random_crop: bool, factor: float):
        """A crop of ``factor * crop`` samples (the whole chunk when shorter), played at ``factor``."""
        start, stop = int(start), int(stop)
        wanted = int(round(crop * factor))
        if stop - start > wanted:
            offset = random.randint(0, stop - start - wanted) if random_crop else 0
            start, stop = start + offset, start + offset + wanted
        # soundfile directly: it seeks, and SpeechBrain's read_audio adds a quarter to each item's cost.
        audio, _ = soundfile.read(wav, start=start, stop=stop, dtype="float32", always_2d=True)
        mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
        return SpeedPerturbation.play(torch.from_numpy(mono), factor)

    @sb.utils.data_pipeline.takes("wav", "start", "stop", "spk_id")
    @sb.utils.data_pipeline.provides("sig", "speaker_index")
    def training_item(wav, start, stop, spk_id):
        k = 0 if speed_perturb is None else speed_perturb.choose()
        yield read(wav, start, stop, True, factors[k])
        yield torch.tensor([speakers[spk_id] + k * len(speakers)], dtype=torch.long)  # 1-d: SpeechBrain pads

    @sb.utils.data_pipeline.takes("wav", "start", "stop", "spk_id")
    @sb.utils.data_pipeline.provides("sig", "speaker_index")
    def validation_item(wav, start, stop, spk_id):
        yield read(wav, start, stop, False, 1.0)
        yield torch.tensor([speakers[spk_id]], dtype=torch.long)

    datasets = []
    for name, item in (("train", training_item), ("valid", validation_item)):
        manifest = folder / f"{name}.csv"
        with open(manifest) as rows:
            rows.readline()  # the header; SpeechBrain fails on a list without rows with an IndexError
            if not rows.readline():
                raise PreparationError(f"{manifest} lists no utterances" + (
                    " (raise valid_fraction: validation ends every epoch, with its checkpoint)"
                    if name == "valid" else ""))
        dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(str(manifest), replacements=replacements)
        dataset.add_dynamic_item(item)
        dataset.set_output_keys(["id", "sig", "speaker_index"])
        datasets.append(dataset)
    return datasets[0], datasets[1], len(speakers) * len(factors)
