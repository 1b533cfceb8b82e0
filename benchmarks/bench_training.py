"""Training throughput of ECAPA-TDNN (C=1024) with each objective, as a ratio to ArcFace.

One training step = augmentation-free forward of synthetic 2 s waveforms, cosine head
over 5,994 speakers, objective, backward and an SGD step. Throughput in utterances per
second; the objective should add at most 10 % (CPU) / 5 % (GPU) to ArcFace's step.

    python benchmarks/bench_training.py [--device cuda] [--batch-size 128] [--steps 10] [--precision bf16]
"""
import argparse
import statistics
import time

import torch
from measure import Results, sync

from spkver.losses import A3M, AlphaDiv, ArcFace, CosFace, QMargin, Softmax
from spkver.models import CosineClassifier, ecapa_tdnn

OBJECTIVES = {
    "ArcFace": lambda: ArcFace(30.0, 0.2), "Softmax": lambda: Softmax(30.0), "CosFace": lambda: CosFace(30.0, 0.2),
    "AlphaDiv(1.5)": lambda: AlphaDiv(30.0, 1.5), "QMargin(1.5)": lambda: QMargin(30.0, 0.2, 1.5),
    "A3M(1.5)": lambda: A3M(30.0, 0.2, 1.5),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 128 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per objective (default 3 CPU, 20 GPU)")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--speakers", type=int, default=5994)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    batch = args.batch_size or (128 if on_gpu else 16)
    steps = args.steps or (20 if on_gpu else 3)
    torch.manual_seed(0)
    model = ecapa_tdnn(channels=args.channels, embedding_dim=192).to(args.device)
    head = CosineClassifier(192, args.speakers).to(args.device)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=1e-3, momentum=0.9)
    waveforms = 0.1 * torch.randn(batch, 32000, device=args.device)
    lengths = torch.ones(batch, device=args.device)
    targets = torch.randint(0, args.speakers, (batch,), device=args.device)
    autocast = torch.autocast(device_type="cuda" if on_gpu else "cpu", dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    def step(objective):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            cosine = head(model(waveforms, lengths))
        objective(cosine.float(), targets).backward()
        optimizer.step()

    objectives = {name: make() for name, make in OBJECTIVES.items()}
    for objective in objectives.values():  # warm-up (kernels, allocator, candidate hints)
        step(objective)
    samples = {name: [] for name in objectives}
    for _ in range(steps):  # objectives take turns against drifting machine load
        for name, objective in objectives.items():
            sync(args.device)
            start = time.perf_counter()
            step(objective)
            sync(args.device)
            samples[name].append(time.perf_counter() - start)
    reference = statistics.median(samples["ArcFace"])
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append([name, f"{1e3 * median:.1f}", f"{batch / median:.1f}", f"{100 * (median / reference - 1):+.1f} %"])
    results = Results("bench_training", args.device, variant=args.precision)
    results.table(f"step_{args.precision}", f"one training step: ECAPA-TDNN C={args.channels}, {args.speakers} "
                                             f"speakers, batch {batch} x 2 s, {args.precision}",
                  ["objective", "step (ms)", "utterances/s", "step vs ArcFace"], rows)
    results.save()


if __name__ == "__main__":
    main()
