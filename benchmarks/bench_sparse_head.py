"""Peak memory and step time of the exact streaming sparse head against the dense head.

B=512 embeddings of D=256, trained-like (each near its class prototype) or random (the start of
training, ``--embeddings random-init``), QMargin at the papers' (s, m, alpha) = (10, 0.2, 1.5) by
default; C in {1e4, 1e5, 1e6}. Dense: cosines (B, C) -> objective -> dense gradients.
Sparse: spkver.losses.StreamingSparseHead (chunked top-k, certified, sparse prototype gradient).
Peak memory is the growth over the prototype matrix already in memory, also shown as a
multiple of the prototype matrix itself.

    python benchmarks/bench_sparse_head.py [--classes 10000 100000 1000000] [--device cuda] [--repeats 5]
        [--profile 100000] [--chunk-size 32768] [--embeddings random-init] [--scale 10 --alpha 1.5 --margin 0.2]

Step time is the median of ``--repeats`` steps after a warm-up; ``--profile C`` prints where one
sparse step at C classes spends its time (torch.profiler, the 15 costliest operations).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from measure import Results, median_seconds, peak_bytes, sync

from spkver.losses import QMargin, StreamingSparseHead


def main():
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Every allocation above 64 KiB as an mmap, so that freed tensors leave the resident set
        # and the peak-memory reading sees each one.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-dense-above", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=None, metavar="C")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="the sparse head's chunk_size (default: its own)")
    parser.add_argument("--embeddings", default="trained-like", choices=["trained-like", "random-init"],
                        help="near their class prototypes, or random (the start of training)")
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--margin", type=float, default=0.2)
    args = parser.parse_args()
    chunk = "" if args.chunk_size is None else f", chunk_size={args.chunk_size}"
    setting = f"QMargin({args.scale:g}, {args.margin:g}, {args.alpha:g})"
    results = Results("bench_sparse_head", args.device, variant=args.embeddings)
    table = []
    for classes in args.classes:
        torch.manual_seed(0)
        options = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
        head = StreamingSparseHead(classes, args.dim, QMargin(args.scale, args.margin, args.alpha),
                                   **options).to(args.device)
        targets = torch.randint(0, classes, (args.batch,), device=args.device)
        with torch.no_grad():
            if args.embeddings == "random-init":
                embeddings = torch.randn(args.batch, args.dim, device=args.device)
            else:
                embeddings = head.weight[targets] + 0.3 * torch.randn(args.batch, args.dim, device=args.device) * \
                    head.weight[targets].norm(dim=1, keepdim=True) / args.dim ** 0.5
        matrix = head.weight.numel() * 4

        def sparse_step():
            head.weight.grad = None
            head(embeddings.clone().requires_grad_(True), targets).backward()

        dense_objective = QMargin(args.scale, args.margin, args.alpha)

        def dense_step():
            head.weight.grad = None
            x = embeddings.clone().requires_grad_(True)
            dense_objective(F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T, targets).backward()

        rows = {}
        for name, step in (("sparse", sparse_step), ("dense", dense_step)):
            if name == "dense" and classes > args.skip_dense_above:
                continue
            step()  # warm-up (and the sparse head's candidate size)
            peak = peak_bytes(step, args.device)
            rows[name] = (median_seconds(step, args.repeats, args.device), peak)
        for name, (seconds, peak) in rows.items():
            ratio = f"{seconds / rows['dense'][0]:.2f}x" if "dense" in rows else "n/a"
            table.append([f"{classes:,}", name, f"{1e3 * seconds:.2f}", f"{peak / 2 ** 20:.0f}",
                          f"{(matrix + peak) / matrix:.2f}", ratio])
            print(" | ".join(table[-1]), flush=True)
        if classes == args.profile:
            profile(sparse_step, args.device)
    results.table("heads", f"exact sparse head vs dense head, B={args.batch}, D={args.dim}, {setting}, "
                           f"{args.embeddings} embeddings{chunk}, median of {args.repeats} steps",
                  ["classes", "head", "step (ms)", "peak extra memory (MiB)", "x prototype matrix", "time vs dense"],
                  table, align=["---:", "---", "---:", "---:", "---:", "---:"])
    results.save()


def profile(step, device: str) -> None:
    """Print the operations one step spends most time in (device time on CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as profiler:
        step()
        sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(profiler.key_averages().table(sort_by=key, row_limit=15), flush=True)


if __name__ == "__main__":
    main()
