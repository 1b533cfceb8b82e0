"""Forward+backward time and peak memory of every objective against its peers, in one run.

Peers: (a) plain ``cross_entropy(32*cos)``, (b) SpeechBrain's
``LogSoftmaxWrapper(AdditiveAngularMargin(0.2, 32))``, (c)
``entmax.EntmaxBisectLoss(alpha=1.5)`` on ``10*cos``.  Times are medians over
repeats, printed as ratios to (a). A second table per size times Q-Margin and
A3M at each of the papers' (s, alpha) pairs (and the mismatched (30, 1.5)) on
cosines from four stages: random initialisation, mid-training, trained-like,
and uniform in [-1, 1]; on the CPU, Q-Margin also on the pure-torch solver
(``engine="torch"``), the peer of the compiled kernel that the
objectives use there.  Peak memory is the extra memory of one
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
from measure import Results, peak_bytes, sync

#: The papers' settings: the baselines at WeSpeaker's s = 32, m = 0.2; the alpha objectives at (s, alpha) = (10, 1.5).
BASELINE_SCALE, MARGIN, SCALE, ALPHA = 32.0, 0.2, 10.0, 1.5
CONFIGS = [(256, 5994), (128, 100_000)]
#: The papers' (s, alpha) pairs, and the mismatched pair spkver used before them.
PAIRS = [(20.0, 1.25), (10.0, 1.5), (5.0, 2.0), (30.0, 1.5)]
#: Cosines at three stages of training, and an adversarial spread: the solver's cost follows the support.
FAMILIES = ["random-init", "mid-training", "trained-like", "uniform"]


def make_methods():
    import entmax
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    from spkver.losses import A3M, AlphaDiv, ArcFace, CosFace, QMargin, Softmax

    speechbrain_aam = LogSoftmaxWrapper(AdditiveAngularMargin(MARGIN, BASELINE_SCALE))
    entmax_loss = entmax.EntmaxBisectLoss(alpha=ALPHA)
    ours = {
        "Softmax": Softmax(BASELINE_SCALE), "CosFace": CosFace(BASELINE_SCALE, MARGIN),
        "ArcFace": ArcFace(BASELINE_SCALE, MARGIN), "AlphaDiv(10, 1.5)": AlphaDiv(SCALE, ALPHA),
        "QMargin(10, 1.5)": QMargin(SCALE, MARGIN, ALPHA), "A3M(10, 1.5)": A3M(SCALE, MARGIN, ALPHA),
    }
    methods = {
        "(a) cross_entropy": cross_entropy,
        "(b) speechbrain AAM": lambda c, y: speechbrain_aam(c[:, None], y[:, None]),
        "(c) entmax bisect 1.5": lambda c, y: entmax_loss(SCALE * c, y).mean(),
    }
    methods.update({name: objective for name, objective in ours.items()})
    return methods


def cross_entropy(cosine, targets):
    return F.cross_entropy(BASELINE_SCALE * cosine, targets)


def make_pair_methods(device="cpu"):
    import warnings

    from spkver.losses import A3M, QMargin

    methods = {"(a) cross_entropy": cross_entropy}
    with warnings.catch_warnings():  # (30, 1.5) is the mismatched pair, measured on purpose
        warnings.simplefilter("ignore")
        for scale, alpha in PAIRS:
            methods[f"QMargin({scale:g}, {alpha:g})"] = QMargin(scale, MARGIN, alpha)
            methods[f"A3M({scale:g}, {alpha:g})"] = A3M(scale, MARGIN, alpha)
            if device == "cpu":  # what the compiled kernel replaces, measured in the same run
                methods[f"QMargin({scale:g}, {alpha:g}), torch solver"] = QMargin(scale, MARGIN, alpha,
                                                                                  engine="torch")
    return methods


def make_inputs(batch, classes, device, family="trained-like", seed=0):
    """Cosines of a batch: random unit embeddings and prototypes (the start of training), the
    target's prototype pulled towards its embedding (mid-training: cos_y about 0.5; trained-like:
    about 0.9), or cosines uniform in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    dim = 192
    emb = F.normalize(torch.randn(batch, dim, generator=generator), dim=1)
    protos = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    noise = {"mid-training": 1.7, "trained-like": 0.5}.get(family)
    if noise is not None:
        protos[targets] = F.normalize(emb + noise * torch.randn(batch, dim, generator=generator) / dim ** 0.5, dim=1)
    cosine = emb @ protos.T
    if family == "uniform":
        cosine = 2 * torch.rand(batch, classes, generator=generator) - 1
    elif family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return cosine.to(device), targets.to(device)


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


#: Timing runs with glibc's heap serving every allocation up to its 32 MiB maximum and never trimmed,
#: as in the steady state of a training loop; otherwise whether a (B, C) temporary is a fresh mmap
#: (page faults) or a reused heap block depends on the allocator's history, and the same call
#: measured 2.5 ms or 8.7 ms from one run to the next.
STEADY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}


def main():
    if not any(k in os.environ for k in STEADY_ALLOCATOR) and "--cpu-memory-child" not in sys.argv:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_ALLOCATOR})
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
    results = Results("bench_losses", args.device)
    for batch, classes in CONFIGS:
        cosine, targets = make_inputs(batch, classes, args.device)
        times = time_methods(methods, cosine, targets, repeats, args.device)
        rows = []
        for name, fn in methods.items():
            peak = peak_memory(fn, cosine, targets, args.device) if on_gpu else cpu_peaks[f"{batch}x{classes}"][name]
            rows.append([name, f"{1e3 * times[name]:.2f}", f"{times[name] / times['(a) cross_entropy']:.2f}x",
                         f"{times[name] / times['(c) entmax bisect 1.5']:.3f}x", f"{peak / 2 ** 20:.1f}"])
        results.table(f"methods_{batch}x{classes}", f"B = {batch}, C = {classes:,}, trained-like cosines, medians "
                                                    f"of {repeats}",
                      ["method", "time (ms)", "vs (a)", "vs (c)", "peak extra memory (MiB)"], rows)
    pair_methods = make_pair_methods(args.device)
    for batch, classes in CONFIGS:
        ratios = {name: [] for name in pair_methods if name != "(a) cross_entropy"}
        supports = {name: [] for name in ratios}
        baseline = []
        for family in FAMILIES:
            cosine, targets = make_inputs(batch, classes, args.device, family)
            times = time_methods(pair_methods, cosine, targets, repeats, args.device)
            baseline.append(times["(a) cross_entropy"])
            for name in ratios:
                ratios[name].append(times[name] / times["(a) cross_entropy"])
                supports[name].append(pair_methods[name].last_statistics.support_size)
        rows = [["(a) cross_entropy", *(f"{1e3 * t:.2f} ms" for t in baseline)]]
        rows += [[name, *(f"{r:.2f}x (support {k:.0f})" for r, k in zip(ratios[name], supports[name]))]
                 for name in ratios]
        results.table(f"pairs_{batch}x{classes}", f"B = {batch}, C = {classes:,}: the papers' pairs at every stage "
                                                  "of training, as a ratio to (a)", ["method", *FAMILIES], rows)
    results.save()


if __name__ == "__main__":
    main()
