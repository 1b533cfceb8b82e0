"""Embedding speed of the public architectures spkver reads, and of ResNet34 against WeSpeaker's own loop.

1. Every accepted layout at its real size (random weights: speed does not depend on them), loaded
   from a folder written in its published layout, embedding 6 s files from disk through
   ``SpeakerEmbedder.embed_files`` (batch 16): utterances per second, against spkver's own ECAPA-TDNN
   C = 512 in the same run.
2. WeSpeaker ResNet34 on the same weights: WeSpeaker's extraction loop as its CLI runs it
   (``Speaker.extract_embedding``: one file at a time, ``torchaudio.load(normalize=False)``, Kaldi
   fbank, mean normalisation, the model) against spkver's ``embed_files``; the largest difference
   between the two embeddings of a file (1 - cosine). With ``--wespeaker-source DIR`` (a checkout of
   wenet-e2e/wespeaker) the loop runs WeSpeaker's own model code; without it, spkver's architecture
   (the same computation: tests/test_public_models.py holds it to WeSpeaker's).

    python benchmarks/bench_pretrained.py [--files 32] [--wespeaker-source /path/to/wespeaker]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import soundfile
import torch
from measure import Results

from spkver.inference import SpeakerEmbedder
from spkver.models import ecapa_tdnn, load_model


def _layouts():
    """The test suite's writers of folders in the published layouts (tests/layouts.py), loaded from its file."""
    spec = importlib.util.spec_from_file_location("layouts", Path(__file__).resolve().parent.parent / "tests" /
                                                  "layouts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESNET = {"feat_dim": 80, "embed_dim": 256, "pooling_func": "TSTP", "two_emb_layer": False}
ECAPA = {"feat_dim": 80, "embed_dim": 192, "pooling_func": "ASTP"}
WESPEAKER = [("ResNet18", RESNET), ("ResNet34", RESNET), ("ResNet50", RESNET), ("ResNet101", RESNET),
             ("ResNet152", RESNET), ("ResNet221", RESNET), ("ResNet293", RESNET), ("ECAPA_TDNN_c512", ECAPA),
             ("ECAPA_TDNN_c1024", ECAPA), ("ECAPA_TDNN_GLOB_c512", ECAPA), ("ECAPA_TDNN_GLOB_c1024", ECAPA)]


def _files(folder: Path, count: int, seconds: float = 6.0):
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        t = np.arange(int(16000 * seconds)) / 16000
        audio = 0.2 * np.sin(2 * np.pi * (120 + 5 * index) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"utterance{index:03d}.wav"
        soundfile.write(path, audio.astype(np.float32), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def _rate(embedder: SpeakerEmbedder, paths) -> float:
    embedder.embed_files(paths[:2], batch_size=2, progress=False)  # warm-up
    start = time.perf_counter()
    embedder.embed_files(paths, batch_size=16, progress=False)
    return len(paths) / (time.perf_counter() - start)


def _wespeaker_model(source: Path, state: dict):
    """WeSpeaker's own ResNet34, its modules loaded from a checkout without running its package __init__."""
    for name, folder in (("wespeaker", source / "wespeaker"), ("wespeaker.models", source / "wespeaker" / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    for module in ("pooling_layers", "resnet"):
        spec = importlib.util.spec_from_file_location(f"wespeaker.models.{module}",
                                                      source / "wespeaker" / "models" / f"{module}.py")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
    model = sys.modules["wespeaker.models.resnet"].ResNet34(**RESNET)
    model.load_state_dict({key: value for key, value in state.items() if not key.startswith("projection")})
    return model.eval()


@torch.no_grad()
def _wespeaker_loop(model, paths):
    """WeSpeaker's CLI, file by file (wespeaker/cli/speaker.py: extract_embedding).

    The CLI reads with ``torchaudio.load(normalize=False)``, which in torchaudio 2.11 needs torchcodec
    (not installed here); soundfile's ``dtype="int16"`` reads the same samples of a 16-bit wave.
    """
    import torchaudio.compliance.kaldi as kaldi

    embeddings = []
    for path in paths:
        samples, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
        pcm = torch.from_numpy(samples.T.astype(np.float32))
        features = kaldi.fbank(pcm, num_mel_bins=80, frame_length=25, frame_shift=10, sample_frequency=rate,
                               window_type="hamming")
        features = (features - features.mean(dim=0))[None]
        output = model(features)
        embeddings.append((output[-1] if isinstance(output, tuple) else output)[0].numpy())
    return np.stack(embeddings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=32, help="6 s files embedded per architecture (default 32)")
    parser.add_argument("--wespeaker-source", type=Path, help="a wenet-e2e/wespeaker checkout (its model code)")
    args = parser.parse_args()
    results = Results("bench_pretrained", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "audio").mkdir()
        paths = _files(scratch / "audio", args.files)
        layouts = _layouts()
        own = SpeakerEmbedder(ecapa_tdnn(channels=512, embedding_dim=192))
        reference = _rate(own, paths)
        rows = [["spkver ECAPA-TDNN C=512 (reference)", "SpeechBrain Fbank",
                 f"{sum(p.numel() for p in own.extractor.parameters()) / 1e6:.1f} M", f"{reference:.2f}", "1.00"]]
        folders = [(f"WeSpeaker {name}", lambda folder, n=name, a=arguments: layouts.write_wespeaker_folder(
            folder, n, a, classes=5994)) for name, arguments in WESPEAKER]
        folders += [(f"SpeechBrain spkrec-{kind}-voxceleb", lambda folder, k=kind: layouts.write_speechbrain_hub_folder(
            folder, k)) for kind in ("ecapa", "resnet")]
        for index, (name, write) in enumerate(folders):
            folder = write(scratch / f"model{index}")
            model = load_model(folder)
            embedder = SpeakerEmbedder.from_pretrained(folder)
            rate = _rate(embedder, paths)
            frontend = "Kaldi fbank (int16 scale)" if model.extractor.frontend.kind == "kaldi" else "SpeechBrain Fbank"
            parameters = sum(p.numel() for p in model.extractor.parameters())
            rows.append([name, frontend, f"{parameters / 1e6:.1f} M", f"{rate:.2f}", f"{rate / reference:.2f}"])
            print(rows[-1], flush=True)
        results.table("architectures", f"Embedding speed by architecture ({args.files} files of 6 s, batch 16)",
                      ["model", "front-end", "parameters", "utterances / s", "vs spkver ECAPA C=512"], rows,
                      align=["---", "---", "---:", "---:", "---:"])
        results.save()  # the first table survives a failure of the second

        folder = layouts.write_wespeaker_folder(scratch / "resnet34", "ResNet34", RESNET, classes=5994)
        state = torch.load(folder / "avg_model.pt")
        if args.wespeaker_source is not None:
            peer, code = _wespeaker_model(args.wespeaker_source, state), "WeSpeaker's model code"
        else:
            peer, code = load_model(folder).extractor.backbone, "spkver's ResNet34 in WeSpeaker's loop"
        _wespeaker_loop(peer, paths[:2])  # warm-up
        start = time.perf_counter()
        theirs = _wespeaker_loop(peer, paths)
        their_seconds = time.perf_counter() - start
        embedder = SpeakerEmbedder.from_pretrained(folder)
        embedder.embed_files(paths[:2], batch_size=2, progress=False)
        start = time.perf_counter()
        ours = embedder.embed_files(paths, batch_size=16, progress=False)
        our_seconds = time.perf_counter() - start
        cosine = np.sum(theirs * ours, axis=1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
        results.table("wespeaker_loop", f"WeSpeaker ResNet34: spkver against WeSpeaker's extraction loop "
                                        f"({args.files} files of 6 s, same weights)",
                      ["extraction", "utterances / s", "speed-up", "max 1 - cosine"],
                      [[f"WeSpeaker's CLI loop, one file at a time ({code})", f"{len(paths) / their_seconds:.2f}",
                        "1.00", ""],
                       ["spkver embed_files (batch 16)", f"{len(paths) / our_seconds:.2f}",
                        f"{their_seconds / our_seconds:.2f}", f"{float(np.max(1 - cosine)):.1e}"]])
    results.save()


if __name__ == "__main__":
    main()
