"""SpeechBrain datasets over the manifests of :mod:`spkver.data.voxceleb`.

Training items are random crops of ``crop_seconds`` from the prepared chunks
(the whole chunk when shorter), with the speaker's class index from
``speakers.json``; validation items are the chunks themselves, cropped at
their start for a stable measure.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Tuple

import torch

__all__ = ["speaker_datasets", "manifest_roots"]


def manifest_roots(manifest_folder) -> dict:
    """The ``$vox1_root``/``$vox2_root`` replacements written by preparation."""
    return json.loads((Path(manifest_folder) / "roots.json").read_text())


def speaker_datasets(manifest_folder, crop_seconds: float = 2.0, sample_rate: int = 16000) -> Tuple:
    """``(train, valid, num_speakers)`` DynamicItemDatasets with ``sig`` and ``speaker_index``."""
    import speechbrain as sb

    folder = Path(manifest_folder)
    replacements = manifest_roots(folder)
    speakers = json.loads((folder / "speakers.json").read_text())
    crop = int(crop_seconds * sample_rate)

    def reader(random_crop: bool):
        @sb.utils.data_pipeline.takes("wav", "start", "stop")
        @sb.utils.data_pipeline.provides("sig")
        def read(wav, start, stop):
            start, stop = int(start), int(stop)
            if stop - start > crop:
                offset = random.randint(0, stop - start - crop) if random_crop else 0
                start, stop = start + offset, start + offset + crop
            return sb.dataio.dataio.read_audio({"file": wav, "start": start, "stop": stop})
        return read

    @sb.utils.data_pipeline.takes("spk_id")
    @sb.utils.data_pipeline.provides("speaker_index")
    def label(spk_id):
        return torch.tensor([speakers[spk_id]], dtype=torch.long)  # 1-d: SpeechBrain pads tensors

    datasets = []
    for name, random_crop in (("train", True), ("valid", False)):
        dataset = sb.dataio.dataset.DynamicItemDataset.from_csv(str(folder / f"{name}.csv"),
                                                                replacements=replacements)
        dataset.add_dynamic_item(reader(random_crop))
        dataset.add_dynamic_item(label)
        dataset.set_output_keys(["id", "sig", "speaker_index"])
        datasets.append(dataset)
    return datasets[0], datasets[1], len(speakers)
