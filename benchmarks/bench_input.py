"""The training input pipeline alone: utterances per second per data-loading worker, WAV and FLAC.

Writes a corpus in the VoxCeleb layout (``--files`` files of ``--seconds`` s of 16 kHz speech-like
noise, as 16-bit WAV and as FLAC), prepares it with the recipe's ``prepare_voxceleb`` (3 s chunks)
and times the recipe's training loader (``speaker_datasets`` + SpeechBrain's DataLoader, batches of
``--batch-size``: a random 2 s crop read by seeking, the label, padding), with and without speed
perturbation, for 1, 2 and 4 workers. Peers, in the same run and process:

- **seek-read**: ``soundfile`` reading the same 2 s crops alone, in a loop (the decoding floor:
  what the pipeline adds on top of it is per-item Python);
- **whole-file read**: decoding each whole file and cropping it (what a loader that does not seek
  pays).

The estimate of workers per GPU divides the step rate of ``bench_training.py`` (ECAPA-TDNN,
C = 1024, batch 128 on an H100: 1,714 utterances/s fp32, 2,014 bf16; docs/benchmarks.md) by one
worker's rate.  Target (issue 15): >= 250 utterances/s per worker for WAV.

    python benchmarks/bench_input.py [--files 400] [--seconds 8] [--batches 12]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
from measure import Results

#: bench_training.py on an H100, ECAPA-TDNN C = 1024, batch 128 (docs/benchmarks.md, 2026-11-27).
GPU_STEP_RATES = {"H100 fp32": 1714.0, "H100 bf16": 2014.0}
SAMPLE_RATE = 16000


def write_corpus(root: Path, files: int, seconds: float, audio_format: str) -> None:
    """``files`` utterances of 8 speakers as ``wav/idXXXXX/video/NNNNN.{wav,flac}``."""
    rng = np.random.default_rng(0)
    for index in range(files):
        # Speech-like: noise through a slowly varying envelope (FLAC compresses it as it does speech).
        samples = int(seconds * SAMPLE_RATE)
        envelope = 0.1 + np.abs(np.sin(np.linspace(0, 40 * seconds, samples)))
        audio = (0.2 * envelope * rng.standard_normal(samples)).clip(-1, 1).astype(np.float32)
        path = root / "wav" / f"id{10001 + index % 8}" / f"vid{index // 8:08d}" / f"{index:05d}.{audio_format}"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16", format=audio_format.upper())


def loader_rate(manifests: Path, workers: int, batch_size: int, batches: int, speed_perturb) -> float:
    """Utterances per second of the recipe's training loader, after one warm-up batch per worker."""
    import speechbrain as sb

    from spkver.data.datasets import speaker_datasets

    train, _, _ = speaker_datasets(manifests, crop_seconds=2.0, speed_perturb=speed_perturb)
    loader = sb.dataio.dataloader.make_dataloader(train, batch_size=batch_size, shuffle=True,
                                                  num_workers=workers, drop_last=True)

    def endless():
        while True:
            yield from loader

    stream = endless()
    for _ in range(max(workers, 1)):  # each worker's first batch carries its start-up
        next(stream)
    started, items = time.perf_counter(), 0
    for _ in range(batches):
        items += next(stream).sig[0].shape[0]
    return items / (time.perf_counter() - started)


def crops(manifests: Path, count: int):
    import csv
    import json

    roots = json.loads((manifests / "roots.json").read_text())
    rows = list(csv.DictReader(open(manifests / "train.csv")))
    rng = random.Random(0)
    chosen = [rows[rng.randrange(len(rows))] for _ in range(count)]
    crop = 2 * SAMPLE_RATE
    for row in chosen:
        path = row["wav"].replace("$vox1_root", roots["vox1_root"])
        start, stop = int(row["start"]), int(row["stop"])
        offset = start + rng.randint(0, max(stop - start - crop, 0))
        yield path, offset, crop


def seek_read_rate(manifests: Path, count: int) -> float:
    started = time.perf_counter()
    for path, offset, frames in crops(manifests, count):
        soundfile.read(path, start=offset, frames=frames, dtype="float32")
    return count / (time.perf_counter() - started)


def whole_file_rate(manifests: Path, count: int) -> float:
    started = time.perf_counter()
    for path, offset, frames in crops(manifests, count):
        audio, _ = soundfile.read(path, dtype="float32")
        audio[offset:offset + frames].copy()
    return count / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=8.0, help="per file (VoxCeleb2's mean is 7.8 s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    from spkver.data.datasets import SpeedPerturbation
    from spkver.data.voxceleb import prepare_voxceleb

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    single_worker, rows = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for audio_format in ("wav", "flac"):
            corpus, manifests = Path(folder) / audio_format, Path(folder) / f"{audio_format}-manifests"
            write_corpus(corpus, args.files, args.seconds, audio_format)
            prepare_voxceleb(manifests, vox1=corpus, valid_fraction=0.02, progress=False)
            count = args.batches * args.batch_size
            seek, whole = seek_read_rate(manifests, count), whole_file_rate(manifests, count)
            rows.append([audio_format, "seek-read (soundfile, peer)", "0", f"{seek:,.0f}", "", "1.00x",
                         f"{seek / whole:.2f}x"])
            rows.append([audio_format, "whole-file read (peer)", "0", f"{whole:,.0f}", "", f"{whole / seek:.2f}x",
                         "1.00x"])
            for label, perturb in (("recipe", None), ("recipe + speed perturbation", SpeedPerturbation())):
                for workers in args.workers:
                    rate = loader_rate(manifests, workers, args.batch_size, args.batches, perturb)
                    per_worker = rate / max(workers, 1)
                    if workers == 1:
                        single_worker[(audio_format, label)] = rate
                    rows.append([audio_format, label, str(workers), f"{rate:,.0f}", f"{per_worker:,.0f}",
                                 f"{rate / seek:.2f}x", f"{rate / whole:.2f}x"])
                    print(" | ".join(rows[-1]), flush=True)
    results = Results("bench_input")
    results.table("loader", f"training input pipeline: {args.files} files x {args.seconds:g} s, 2 s crops, batch "
                            f"{args.batch_size}; {cores} CPU cores (workers beyond them share cores)",
                  ["format", "loader", "workers", "utterances/s", "per worker", "vs seek-read", "vs whole-file read"],
                  rows, align=["---", "---", "---:", "---:", "---:", "---:", "---:"])
    needs = [[audio_format, label, f"{rate:,.0f}", "meets" if rate >= 250 else "misses",
              *(str(math.ceil(step / rate)) for step in GPU_STEP_RATES.values())]
             for (audio_format, label), rate in single_worker.items()]
    results.table("workers", "workers one GPU needs (its step rate / one worker's rate, 1 worker per core)",
                  ["format", "loader", "utterances/s per worker", "the 250 target", *GPU_STEP_RATES], needs,
                  align=["---", "---", "---:", "---", "---:", "---:"])
    results.save()


if __name__ == "__main__":
    main()
