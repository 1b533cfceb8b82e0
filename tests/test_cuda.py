"""The objectives on an NVIDIA GPU agree with the CPU (skipped where there is none)."""
import pytest
import torch

from spkver.losses import A3M, AlphaDiv, ArcFace, CosFace, QMargin, Softmax, alpha_softargmax

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OBJECTIVES = [lambda: Softmax(30.0), lambda: CosFace(30.0, 0.2), lambda: ArcFace(30.0, 0.2),
              lambda: AlphaDiv(30.0, 1.5), lambda: QMargin(30.0, 0.2, 1.5), lambda: A3M(30.0, 0.2, 1.5),
              lambda: QMargin(30.0, 0.2, 1.25), lambda: A3M(30.0, 0.3, 2.5)]


def _cosine(batch=64, classes=3000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, 64, generator=generator), dim=1)
    w = torch.nn.functional.normalize(torch.randn(classes, 64, generator=generator), dim=1)
    return x @ w.T, torch.randint(0, classes, (batch,), generator=generator)


@pytest.mark.parametrize("make", OBJECTIVES)
def test_objective_loss_and_gradient_on_cuda_match_the_cpu(make):
    cosine, targets = _cosine()
    results = []
    for device in ("cpu", "cuda"):
        x = cosine.detach().to(device).requires_grad_(True)
        loss = make()(x, targets.to(device))
        loss.backward()
        results.append((loss.detach().cpu(), x.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
def test_softargmax_on_cuda_in_bfloat16_sums_to_one_and_matches_the_cpu(alpha):
    cosine, _ = _cosine(seed=1)
    logits = (30 * cosine).cuda().bfloat16()
    p = alpha_softargmax(logits, alpha)
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.float().sum(1).cpu(), torch.ones(64), atol=2e-2, rtol=0)
    torch.testing.assert_close(alpha_softargmax(logits.float(), alpha).cpu(),
                               alpha_softargmax(logits.float().cpu(), alpha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: Softmax(30.0), lambda: QMargin(30.0, 0.2, 1.5), lambda: A3M(30.0, 0.2, 1.5)])
def test_bad_inputs_raise_on_cuda_where_the_checks_are_deferred(make):
    cosine, targets = _cosine()
    bad_targets = targets.clone()
    bad_targets[3] = 3000
    with pytest.raises(ValueError, match="targets must lie in"):
        make()(cosine.cuda(), bad_targets.cuda())
    nan = cosine.clone()
    nan[5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make()(nan.cuda(), targets.cuda())
    torch.cuda.synchronize()  # no device-side assertion was left behind


@pytest.mark.parametrize("chunk_size", [None, 700])  # one block; several chunks and a merge
def test_sparse_head_on_cuda_matches_the_cpu(chunk_size):
    from spkver.losses import StreamingSparseHead

    torch.manual_seed(0)
    results = []
    for device in ("cpu", "cuda"):
        head = StreamingSparseHead(20_000, 32, QMargin(30.0, 0.2, 1.5), chunk_size=chunk_size, candidates=2)
        if not results:
            weight = head.weight.detach().clone()
            targets = torch.randint(0, 20_000, (64,))
            spread = 0.3 * weight[targets].norm(dim=1, keepdim=True) / 32 ** 0.5
            embeddings = weight[targets] + spread * torch.randn(64, 32)
        head = head.to(device)
        with torch.no_grad():
            head.weight.copy_(weight)
        x = embeddings.detach().to(device).requires_grad_(True)
        loss = head(x, targets.to(device))
        loss.backward()
        results.append((loss.detach().cpu(), x.grad.cpu(), head.weight.grad.to_dense().cpu()))
    for on_cuda, on_cpu in zip(results[1], results[0]):
        torch.testing.assert_close(on_cuda, on_cpu, atol=1e-5, rtol=1e-4)
