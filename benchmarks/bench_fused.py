"""GPU: the fused alpha-divergence kernel against torch's fused cross-entropy and a plain copy.

At B=512 and C in {5994, 100000}: the kernel alone (loss and p - e_y in one launch), the full
QMargin objective forward+backward (validation, kernel, statistics), cross_entropy forward+backward
on the same logits, and a device-to-device copy of the logits. Medians of triton.testing.do_bench.

    python benchmarks/bench_fused.py
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from spkver.losses import QMargin
from spkver.losses.fused import fused_loss_rows


def main():
    device = torch.cuda.get_device_name()
    print(f"# fused alpha-divergence kernel, {device}, torch {torch.__version__}")
    print("| B x C | kernel (ms) | QMargin fwd+bwd (ms) | cross_entropy fwd+bwd (ms) | copy (ms) | "
          "kernel / CE | kernel / copy | QMargin / CE |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch, classes in ((512, 5994), (512, 100_000)):
        torch.manual_seed(0)
        embeddings = F.normalize(torch.randn(batch, 256, device="cuda"), dim=1)
        prototypes = F.normalize(torch.randn(classes, 256, device="cuda"), dim=1)
        targets = torch.randint(0, classes, (batch,), device="cuda")
        prototypes[targets] = F.normalize(embeddings + 0.5 * torch.randn_like(embeddings) / 16, dim=1)
        cosine = embeddings @ prototypes.T
        logits = 30.0 * cosine
        log_q = torch.full((batch,), -2.7726, device="cuda")
        objective = QMargin(30.0, 0.2, 1.5)

        def objective_step():
            x = cosine.detach().requires_grad_(True)
            objective(x, targets).backward()

        def cross_entropy_step():
            x = logits.detach().requires_grad_(True)
            F.cross_entropy(x, targets).backward()

        kernel = do_bench(lambda: fused_loss_rows(logits, targets, 1.5, log_q))
        full = do_bench(objective_step)
        cross_entropy = do_bench(cross_entropy_step)
        copy = do_bench(lambda: logits.clone())
        print(f"| {batch} x {classes} | {kernel:.3f} | {full:.3f} | {cross_entropy:.3f} | {copy:.3f} | "
              f"{kernel / cross_entropy:.2f}x | {kernel / copy:.2f}x | {full / cross_entropy:.2f}x |")


if __name__ == "__main__":
    main()
