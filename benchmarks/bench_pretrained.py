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
   (the same computation: tests/test_public_models.py holds it to WeSpeaker's). spkver runs in float32
   and, on a CPU that multiplies bfloat16 natively (AMX), in ``bf16`` as well.
3. What bounds float32: ResNet34's floating-point operations per 6 s file (torch's FLOP counter) over
   this CPU's float32 matrix-multiply peak (a 2048 x 2048 product), the least time any exact
   float32 loop can take, against both loops' model time.
4. ``bf16`` on a trained extractor (``--trained``, default the README demo's, when it is there): its
   trial list scored from float32 and from bfloat16 embeddings: EER, minDCF, the largest score
   difference and the decisions that change at the stored threshold.

    python benchmarks/bench_pretrained.py [--files 32] [--wespeaker-source /path/to/wespeaker]
        [--trained results/demo/ecapa_small_qmargin/1986 --trials results/demo/corpus/trials.txt
         --audio results/demo/corpus/wav]
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
from measure import Results, median_seconds

from spkver.inference import Bfloat16Backbone, SpeakerEmbedder, native_bfloat16
from spkver.metrics import eer, min_dcf
from spkver.models import ecapa_tdnn, load_model
from spkver.scoring import EmbeddingStore, cosine_scores, read_trials


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


def _timed_embeddings(embedder: SpeakerEmbedder, paths):
    """(embeddings, seconds) of ``embed_files`` at batch 16, after a warm-up that also prepares the backbone."""
    embedder.embed_files(paths[:2], batch_size=2, progress=False)
    start = time.perf_counter()
    embeddings = embedder.embed_files(paths, batch_size=16, progress=False)
    return embeddings, time.perf_counter() - start


def _max_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The largest 1 - cosine between the rows of two embedding matrices."""
    return float(np.max(1 - np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def _float32_peak(size: int = 2048, repeats: int = 30) -> float:
    """This CPU's float32 matrix-multiply throughput in FLOP/s (torch's threads; the median product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / median_seconds(lambda: a @ b, repeats, warmup=2)


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


def _architectures(results, args, scratch, paths, layouts, bf16):
    own = SpeakerEmbedder(ecapa_tdnn(channels=512, embedding_dim=192))
    reference = len(paths) / _timed_embeddings(own, paths)[1]
    rows = [["spkver ECAPA-TDNN C=512 (reference)", "SpeechBrain Fbank",
             f"{sum(p.numel() for p in own.extractor.parameters()) / 1e6:.1f} M", f"{reference:.2f}", "1.00"]
            + (["", "", ""] if bf16 else [])]
    folders = [(f"WeSpeaker {name}", lambda folder, n=name, a=arguments: layouts.write_wespeaker_folder(
        folder, n, a, classes=5994)) for name, arguments in WESPEAKER]
    folders += [(f"SpeechBrain spkrec-{kind}-voxceleb", lambda folder, k=kind: layouts.write_speechbrain_hub_folder(
        folder, k)) for kind in ("ecapa", "resnet")]
    for index, (name, write) in enumerate(folders):
        folder = write(scratch / f"model{index}")
        model = load_model(folder)
        exact, seconds = _timed_embeddings(SpeakerEmbedder.from_model(model), paths)
        rate = len(paths) / seconds
        frontend = "Kaldi fbank (int16 scale)" if model.extractor.frontend.kind == "kaldi" else "SpeechBrain Fbank"
        parameters = sum(p.numel() for p in model.extractor.parameters())
        rows.append([name, frontend, f"{parameters / 1e6:.1f} M", f"{rate:.2f}", f"{rate / reference:.2f}"])
        if bf16:
            fast, fast_seconds = _timed_embeddings(SpeakerEmbedder.from_model(model, precision="bf16"), paths)
            rows[-1] += [f"{len(paths) / fast_seconds:.2f}", f"{seconds / fast_seconds:.2f}",
                         f"{_max_distance(exact, fast):.1e}"]
        print(rows[-1], flush=True)
    columns = ["model", "front-end", "parameters", "utterances / s", "vs spkver ECAPA C=512"]
    columns += ["bf16 utterances / s", "bf16 vs fp32", "bf16 max 1 - cosine"] if bf16 else []
    results.table("architectures", f"Embedding speed by architecture ({args.files} files of 6 s, batch 16)"
                  + ("; fp32, and bf16 on AMX" if bf16 else "; fp32 (this CPU has no native bfloat16)"),
                  columns, rows, align=["---", "---", "---:"] + ["---:"] * (len(columns) - 3))


def _wespeaker_comparison(results, args, scratch, paths, layouts, bf16):
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
    rows = [[f"WeSpeaker's CLI loop, one file at a time ({code})", f"{len(paths) / their_seconds:.2f}", "1.00", ""]]
    embedders = {"fp32": SpeakerEmbedder.from_pretrained(folder)}
    if bf16:
        embedders["bf16"] = SpeakerEmbedder.from_pretrained(folder, precision="bf16")
    for precision, embedder in embedders.items():
        ours, seconds = _timed_embeddings(embedder, paths)
        rows.append([f"spkver embed_files (batch 16, {precision})", f"{len(paths) / seconds:.2f}",
                     f"{their_seconds / seconds:.2f}", f"{_max_distance(theirs, ours):.1e}"])
    results.table("wespeaker_loop", f"WeSpeaker ResNet34: spkver against WeSpeaker's extraction loop "
                                    f"({args.files} files of 6 s, same weights)",
                  ["extraction", "utterances / s", "speed-up", "max 1 - cosine"], rows)

    # What bounds float32: the FLOPs of one 6 s file over this CPU's float32 matrix peak.
    from torch.utils.flop_counter import FlopCounterMode

    embedder = embedders["fp32"]
    features = embedder.extractor.frontend(torch.from_numpy(soundfile.read(paths[0], dtype="float32")[0])[None],
                                           torch.ones(1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        embedder.extractor.backbone(features, torch.ones(1))
    flops, peak = counter.get_total_flops(), _float32_peak()
    backbones = [("WeSpeaker's model code, eager float32", lambda: peer(features)),
                 ("spkver, frozen TorchScript float32",
                  lambda: embedder._fast_extractor().backbone(features, torch.ones(1)))]
    if bf16:
        fast = embedders["bf16"]._fast_extractor().backbone
        backbones.append(("spkver, bfloat16 on AMX", lambda: fast(features, torch.ones(1))))
    with torch.no_grad():
        timed = [("the float32 floor: FLOPs / peak", flops / peak)]
        timed += [(name, median_seconds(run, repeats=5, warmup=2)) for name, run in backbones]
    rows = [[name, f"{seconds:.3f}", f"{flops / peak / seconds:.0%}"] for name, seconds in timed]
    results.table("float32_floor", f"ResNet34's model time per 6 s file against this CPU's float32 peak "
                                   f"({flops / 1e9:.1f} GFLOP a file; float32 matrix peak {peak / 1e9:.0f} GFLOP/s, "
                                   f"{torch.get_num_threads()} threads)",
                  ["model", "seconds per file", "FLOP rate against the float32 peak"], rows)


def _trained_decisions(results, args):
    """A trained extractor's trial list scored from float32 and from bfloat16 embeddings."""
    trials = read_trials(args.trials)
    files = sorted(set(trials.enroll) | set(trials.test))
    paths = [args.audio / name for name in files]
    rows, embeddings, scores = [], {}, {}
    for precision in ("fp32", "bf16"):
        embedder = SpeakerEmbedder.from_pretrained(args.trained, precision=precision)
        embeddings[precision], seconds = _timed_embeddings(embedder, paths)
        if precision == "bf16" and not isinstance(embedder._fast_extractor().backbone, Bfloat16Backbone):
            raise SystemExit(f"{args.trained}: the extractor fell back to fp32 (see the log); no bf16 figures")
        scores[precision] = cosine_scores(EmbeddingStore(files, embeddings[precision]), trials,
                                          mean=embedder.mean).scores
        rows.append([precision, f"{len(paths) / seconds:.1f}", f"{100 * eer(scores[precision], trials.labels)[0]:.3f}",
                     f"{min_dcf(scores[precision], trials.labels, 0.01)[0]:.4f}", "", "", ""])
    threshold = embedder.threshold
    flipped = int(np.sum((scores["bf16"] >= threshold) != (scores["fp32"] >= threshold)))
    rows[1][4:] = [f"{_max_distance(embeddings['fp32'], embeddings['bf16']):.1e}",
                   f"{np.abs(scores['bf16'] - scores['fp32']).max():.1e}", f"{flipped} of {len(trials)}"]
    results.table("bf16_trained", f"bf16 against fp32 on a trained extractor ({args.trained}, {len(files)} files, "
                                  f"{len(trials)} trials)",
                  ["precision", "utterances / s", "EER %", "minDCF(0.01)", "max 1 - cosine of embeddings",
                   "largest score difference", "decisions changed at the stored threshold"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=32, help="6 s files embedded per architecture (default 32)")
    parser.add_argument("--wespeaker-source", type=Path, help="a wenet-e2e/wespeaker checkout (its model code)")
    parser.add_argument("--trained", type=Path, default=Path("results/demo/ecapa_small_qmargin/1986"),
                        help="a trained model folder for the bf16 decisions table (default: the README demo's)")
    parser.add_argument("--trials", type=Path, default=Path("results/demo/corpus/trials.txt"))
    parser.add_argument("--audio", type=Path, default=Path("results/demo/corpus/wav"),
                        help="the folder the trial list's paths are relative to")
    args = parser.parse_args()
    bf16 = native_bfloat16()
    results = Results("bench_pretrained", "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "audio").mkdir()
        paths = _files(scratch / "audio", args.files)
        layouts = _layouts()
        _architectures(results, args, scratch, paths, layouts, bf16)
        results.save()  # each table survives a failure of the next
        _wespeaker_comparison(results, args, scratch, paths, layouts, bf16)
        results.save()
    if bf16 and (args.trained / "spkver.json").exists() and args.trials.exists():
        _trained_decisions(results, args)
        results.save()
    elif bf16:
        print(f"no trained extractor at {args.trained} (run the README demo): the bf16 decisions table is left out")


if __name__ == "__main__":
    main()
