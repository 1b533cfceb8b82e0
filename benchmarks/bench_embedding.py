"""Embedding extraction speed of ECAPA-TDNN (C=1024): real-time factor, batch 1 vs batched, peak memory.

Real-time factor = compute time / audio duration (lower is faster) over 8 s utterances, one
at a time and in batches of 32; peak memory of embedding one 60 s file (CUDA allocator peak on
a GPU, resident-set growth on the CPU). Random weights: speed does not depend on them.

    python benchmarks/bench_embedding.py [--device cuda]
"""
import argparse
import time

import torch
from measure import Results, peak_bytes, sync

from spkver.models import ecapa_tdnn


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--utterances", type=int, default=None, help="default 32 on CPU, 256 on GPU")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    count = args.utterances or (256 if on_gpu else 32)
    model = ecapa_tdnn(channels=1024, embedding_dim=192).to(args.device).eval()
    seconds = 8.0
    audio = 0.1 * torch.randn(count, int(seconds * 16000), device=args.device)

    def timed(batch):
        model(audio[:batch], torch.ones(min(batch, count), device=args.device))  # warm-up
        sync(args.device)
        start = time.perf_counter()
        for i in range(0, count, batch):
            chunk = audio[i:i + batch]
            model(chunk, torch.ones(chunk.shape[0], device=args.device))
        sync(args.device)
        return (time.perf_counter() - start) / (count * seconds)

    rtf_single, rtf_batched = timed(1), timed(32)
    long = 0.1 * torch.randn(1, 60 * 16000, device=args.device)
    peak = peak_bytes(lambda: model(long, torch.ones(1, device=args.device)), args.device)
    results = Results("bench_embedding", args.device)
    results.table("extraction", "ECAPA-TDNN C=1024 embedding extraction",
                  ["mode", "real-time factor", "audio seconds per second", "peak memory for one 60 s file"], [
                      ["batch 1 (8 s utterances)", f"{rtf_single:.4f}", f"{1 / rtf_single:.0f}",
                       f"{peak / 2 ** 20:.0f} MiB"],
                      ["batch 32 (8 s utterances)", f"{rtf_batched:.4f}", f"{1 / rtf_batched:.0f}", ""]])
    results.save()


if __name__ == "__main__":
    main()
