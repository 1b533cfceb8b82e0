"""GPU: the fused alpha-divergence kernel against torch's fused cross-entropy and a plain copy.

At B=512 and C in {5994, 100000}: the kernel alone (loss and p - e_y in one launch), the full
QMargin objective forward+backward (validation, kernel, statistics), cross_entropy forward+backward
on the same logits, and a device-to-device copy of the logits. Medians of triton.testing.do_bench.

    python benchmarks/bench_fused.py
"""
import torch
import torch.nn.functional as F
from measure import Results
from triton.testing import do_bench

from spkver.losses import QMargin
from spkver.losses.engines.triton_kernel import fused_loss_rows


def main():
    rows = []
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
        rows.append([f"{batch} x {classes}", f"{kernel:.3f}", f"{full:.3f}", f"{cross_entropy:.3f}", f"{copy:.3f}",
                     f"{kernel / cross_entropy:.2f}x", f"{kernel / copy:.2f}x", f"{full / cross_entropy:.2f}x"])
    results = Results("bench_fused", "cuda")
    results.table("kernel", "the fused alpha-divergence kernel, medians of triton.testing.do_bench",
                  ["B x C", "kernel (ms)", "QMargin fwd+bwd (ms)", "cross_entropy fwd+bwd (ms)", "copy (ms)",
                   "kernel / CE", "kernel / copy", "QMargin / CE"], rows)
    results.save()


if __name__ == "__main__":
    main()
