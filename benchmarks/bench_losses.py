"""Forward+backward time and peak memory of every objective against its peers, in one run.

Peers: (a) plain ``cross_entropy(s*cos)``, (b) SpeechBrain's
``LogSoftmaxWrapper(AdditiveAngularMargin(0.2, 30))``, (c)
``entmax.EntmaxBisectLoss(alpha=1.5)`` on ``s*cos``.  Times are medians over
repeats, printed as ratios to (a).  Peak memory is the extra memory of one
forward+backward over the inputs: CUDA's allocator peak on a GPU, the peak
resident-set growth on the CPU (Linux; measured in a child process where
every large allocation is an mmap, so that it is seen).

    python benchmarks/bench_losses.py [--device cuda] [--repeats N]

On a GPU a call takes a few tenths of a millisecond and is bound by the host,
so its time varies from call to call: the default there is 200 repeats (20 on
the CPU), to give the medians' ratios the precision the 1.5x target needs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from measure import device_name, peak_bytes, sync

SCALE, MARGIN, ALPHA = 30.0, 0.2, 1.5
CONFIGS = [(256, 5994), (128, 100_000)]


def make_methods():
    import entmax
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    from spkver.losses import A3M, AlphaDiv, ArcFace, CosFace, QMargin, Softmax

    speechbrain_aam = LogSoftmaxWrapper(AdditiveAngularMargin(MARGIN, SCALE))
    entmax_loss = entmax.EntmaxBisectLoss(alpha=ALPHA)
    ours = {
        "Softmax": Softmax(SCALE), "CosFace": CosFace(SCALE, MARGIN), "ArcFace": ArcFace(SCALE, MARGIN),
        "AlphaDiv(1.5)": AlphaDiv(SCALE, ALPHA), "QMargin(1.5)": QMargin(SCALE, MARGIN, ALPHA),
        "A3M(1.5)": A3M(SCALE, MARGIN, ALPHA),
    }
    methods = {
        "(a) cross_entropy": lambda c, y: F.cross_entropy(SCALE * c, y),
        "(b) speechbrain AAM": lambda c, y: speechbrain_aam(c[:, None], y[:, None]),
        "(c) entmax bisect 1.5": lambda c, y: entmax_loss(SCALE * c, y).mean(),
    }
    methods.update({name: objective for name, objective in ours.items()})
    return methods


def make_inputs(batch, classes, device, seed=0):
    """Cosines of trained-looking embeddings: the target leads, the rest are spread."""
    generator = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(batch, 192, generator=generator), dim=1)
    protos = F.normalize(torch.randn(classes, 192, generator=generator), dim=1)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    protos[targets] = F.normalize(emb + 0.8 * torch.randn(batch, 192, generator=generator) / 192 ** 0.5, dim=1)
    cosine = (emb @ protos.T).to(device)
    return cosine, targets.to(device)


def time_methods(methods, cosine, targets, repeats, device):
    """Median forward+backward time of each method.

    Methods take turns, so that interference from the rest of the machine spreads
    evenly over them; each turn runs the method once untimed first, so that the
    allocator is in the steady state of a training loop repeating that step."""
    samples = {name: [] for name in methods}
    for i in range(repeats + 1):
        for name, fn in methods.items():
            for timed in (False, True):
                x = cosine.detach().requires_grad_(True)
                sync(device)
                start = time.perf_counter()
                fn(x, targets).backward()
                sync(device)
                if timed and i >= 1:
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory(fn, cosine, targets, device="cpu"):
    x = cosine.detach().requires_grad_(True)
    return peak_bytes(lambda: fn(x, targets).backward(), device)


def cpu_peak_memories():
    """Peak memory of every method and config, measured in a child process in which every
    allocation above 64 KiB is an mmap, so that freed tensors leave the resident set."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--cpu-memory-child"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (default: 20 CPU, 200 GPU)")
    parser.add_argument("--cpu-memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = make_methods()
    on_gpu = args.device.startswith("cuda")
    repeats = args.repeats if args.repeats is not None else (200 if on_gpu else 20)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.cpu_memory_child:
        peaks = {}
        for batch, classes in CONFIGS:
            cosine, targets = make_inputs(batch, classes, "cpu")
            peaks[f"{batch}x{classes}"] = {name: peak_memory(fn, cosine, targets) for name, fn in methods.items()}
        print(json.dumps(peaks))
        return
    cpu_peaks = None if on_gpu else cpu_peak_memories()
    print(f"# objective forward+backward on {device_name(args.device)}, torch {torch.__version__}, "
          f"s={SCALE} m={MARGIN}")
    for batch, classes in CONFIGS:
        cosine, targets = make_inputs(batch, classes, args.device)
        print(f"\n## B={batch}, C={classes}")
        print("| method | time (ms) | vs (a) | vs (c) | peak extra memory (MiB) |")
        print("|---|---:|---:|---:|---:|")
        times = time_methods(methods, cosine, targets, repeats, args.device)
        for name, fn in methods.items():
            peak = peak_memory(fn, cosine, targets, args.device) if on_gpu else cpu_peaks[f"{batch}x{classes}"][name]
            print(f"| {name} | {1e3 * times[name]:.2f} | {times[name] / times['(a) cross_entropy']:.2f}x | "
                  f"{times[name] / times['(c) entmax bisect 1.5']:.3f}x | {peak / 2 ** 20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
