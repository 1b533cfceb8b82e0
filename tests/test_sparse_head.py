"""The streaming sparse head equals the dense objective, without (B, C) logits or gradients."""
import time

import pytest
import torch
import torch.nn.functional as F

from spkver.losses import A3M, AlphaDiv, QMargin, Softmax, StreamingSparseHead

OBJECTIVES = {
    "alphadiv-1.5": lambda: AlphaDiv(30.0, 1.5), "qmargin-1.5": lambda: QMargin(30.0, 0.2, 1.5),
    "a3m-1.5": lambda: A3M(30.0, 0.2, 1.5), "qmargin-1.2": lambda: QMargin(30.0, 0.2, 1.2),
    "a3m-2.0": lambda: A3M(30.0, 0.3, 2.0), "alphadiv-1.8": lambda: AlphaDiv(20.0, 1.8),
    "qmargin-papers": lambda: QMargin(10.0, 0.2, 1.5),
}


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("spread", [0.3, 3.0])  # trained-like (sparse) and untrained-like (wide support)
def test_loss_and_gradients_equal_the_dense_objective(name, spread):
    torch.manual_seed(0)
    classes, dim, batch = 700, 24, 32
    head = StreamingSparseHead(classes, dim, OBJECTIVES[name](), chunk_size=64, candidates=2)
    targets = torch.randint(0, classes, (batch,))
    with torch.no_grad():
        typical_norm = head.weight.norm(dim=1).mean()
        embeddings = head.weight[targets] + spread * torch.randn(batch, dim) / dim ** 0.5 * typical_norm
    embeddings.requires_grad_(True)
    loss = head(embeddings, targets)
    loss.backward()
    sparse_weight_grad = head.weight.grad.to_dense()
    embedding_grad = embeddings.grad.clone()

    dense_objective = OBJECTIVES[name]()
    weight = head.weight.detach().clone().requires_grad_(True)
    x = embeddings.detach().clone().requires_grad_(True)
    dense = dense_objective(F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T, targets)
    dense.backward()
    torch.testing.assert_close(loss, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embedding_grad, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sparse_weight_grad, weight.grad, atol=1e-5, rtol=1e-4)
    assert head.weight.grad.is_sparse


@pytest.mark.parametrize("chunk_size, k", [(7, 3), (64, 5), (1000, 4), (5, 9), (301, 400)])
def test_the_stream_keeps_exactly_the_top_k_non_target_classes(chunk_size, k):
    """Chunks narrower than k + 1, several merges, one chunk, and a shard with fewer than k classes."""
    torch.manual_seed(4)
    classes = 301
    head = StreamingSparseHead(classes, 12, AlphaDiv(30.0, 1.5), chunk_size=chunk_size)
    unit = F.normalize(torch.randn(10, 12), dim=1)
    targets = torch.randint(0, classes, (10,))
    targets[0] = -1  # a target another rank holds: nothing to leave out
    best, index = head._top_candidates(unit, targets, k)

    cosine = unit @ F.normalize(head.weight.detach(), dim=1).T
    cosine[torch.arange(1, 10), targets[1:]] = -float("inf")
    expected = torch.full((10, k), -float("inf"))  # past the shard's classes: padding
    expected[:, :min(k, classes)] = cosine.topk(min(k, classes), dim=1).values
    assert best.shape == index.shape == (10, k)
    torch.testing.assert_close(best, expected, atol=1e-6, rtol=0)
    scored = expected > -float("inf")
    torch.testing.assert_close(cosine.gather(1, index)[scored], expected[scored], atol=1e-6, rtol=0)
    assert not (index[1:] == targets[1:, None])[scored[1:]].any()


def test_the_default_chunk_bounds_the_streamed_block_whatever_the_batch():
    head = StreamingSparseHead(10, 4, AlphaDiv(30.0, 1.5))
    assert head.classes_per_chunk(512) == 32768 and head.classes_per_chunk(128) == 131072
    assert StreamingSparseHead(10, 4, AlphaDiv(30.0, 1.5), chunk_size=100).classes_per_chunk(512) == 100


def test_each_streamed_chunk_costs_four_launches(launch_counter):
    """On a GPU a small step is bound by its launches: a chunk is a product, a division by the
    prototypes' norms, a top-k and the shift of its class indices; every eighth chunk adds a merge
    of the kept top-k (two concatenations, a top-k, a gather)."""
    from collections import Counter

    unit = F.normalize(torch.randn(8, 16), dim=1)
    launches = {}
    for chunks in (9, 17):
        head = StreamingSparseHead(chunks * 100, 16, QMargin(30.0, 0.2, 1.5), chunk_size=100)
        with launch_counter() as counter:
            head._top_candidates(unit, torch.zeros(8, dtype=torch.long), 4)
        launches[chunks] = Counter(counter.launches)
    eight_more = launches[17] - launches[9]
    assert eight_more == Counter({"mm": 8, "div_": 8, "topk": 8 + 1, "add": 8, "cat": 2, "gather": 1}), eight_more


def test_a_step_launches_at_most_two_and_a_half_times_the_dense_head(launch_counter, replace_fused_kernel_by_a_noop):
    """Where the shard fits one chunk (C = 10^4 at B = 512 on a GPU) the step is bound by its launches:
    the sparse head may not launch much more than the dense head (measured with the fused objective,
    as on CUDA; the kernel itself is replaced by a no-op)."""
    torch.manual_seed(5)
    head = StreamingSparseHead(2000, 16, QMargin(30.0, 0.2, 1.5))
    targets = torch.randint(0, 2000, (64,))
    with torch.no_grad():
        embeddings = head.weight[targets] + 0.1 * torch.randn(64, 16) * head.weight[targets].norm(dim=1, keepdim=True)
    head(embeddings.clone().requires_grad_(True), targets).backward()  # the candidate count settles
    replace_fused_kernel_by_a_noop()
    dense_objective = QMargin(30.0, 0.2, 1.5)
    steps = {"sparse": lambda x: head(x, targets),
             "dense": lambda x: dense_objective(F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T, targets)}
    launches = {}
    for name, step in steps.items():
        with launch_counter() as counter:
            step(embeddings.clone().requires_grad_(True)).backward()
        launches[name] = counter.launches
    assert len(launches["sparse"]) <= 2.5 * len(launches["dense"]), (len(launches["sparse"]), len(launches["dense"]))


def test_a_dense_prototype_gradient_for_any_optimiser_and_the_accuracy_without_scores():
    torch.manual_seed(7)
    classes, dim = 900, 24
    head = StreamingSparseHead(classes, dim, A3M(30.0, 0.2, 1.5), chunk_size=128, sparse_gradient=False)
    targets = torch.randint(0, classes, (40,))
    with torch.no_grad():
        spread = torch.linspace(0.1, 3.0, 40)[:, None] * head.weight[targets].norm(dim=1, keepdim=True) / dim ** 0.5
        embeddings = head.weight[targets] + spread * torch.randn(40, dim)
    x = embeddings.clone().requires_grad_(True)
    head(x, targets).backward()
    assert not head.weight.grad.is_sparse

    weight = head.weight.detach().clone().requires_grad_(True)
    reference = embeddings.clone().requires_grad_(True)
    cosine = F.normalize(reference, dim=1) @ F.normalize(weight, dim=1).T
    A3M(30.0, 0.2, 1.5)(cosine, targets).backward()
    torch.testing.assert_close(head.weight.grad, weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-5, rtol=1e-4)
    correct = cosine.argmax(1) == targets
    assert 0 < int(correct.sum()) < 40  # both kinds of row
    assert torch.equal(head.last_correct, correct)
    torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()  # accepts it


def test_failed_certificates_grow_the_candidate_set_and_stay_exact():
    torch.manual_seed(1)
    head = StreamingSparseHead(300, 8, AlphaDiv(30.0, 1.5), chunk_size=50, candidates=1)
    embeddings, targets = torch.randn(16, 8), torch.randint(0, 300, (16,))
    head(embeddings, targets)
    assert head.restreams > 0 and head.candidates > 1


def test_only_the_rows_whose_certificate_failed_are_streamed_again(monkeypatch):
    torch.manual_seed(6)
    classes, dim = 2000, 64
    # exp_alpha at s = 30: a target that leads by 0.3 in cosine is certified with one candidate.
    head = StreamingSparseHead(classes, dim, QMargin(30.0, 0.2, 1.5, form="exp_alpha"), chunk_size=256, candidates=1)
    targets = torch.randint(0, classes, (24,))
    with torch.no_grad():
        embeddings = head.weight[targets] * 10  # trained-like rows: one candidate certifies them
        embeddings[:3] = torch.randn(3, dim)  # three untrained rows: wide supports, their certificates fail
    streamed = []
    stream = head._top_candidates
    monkeypatch.setattr(head, "_top_candidates", lambda unit, *args: streamed.append(len(unit)) or stream(unit, *args))
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, targets)
    loss.backward()
    assert streamed[0] == 24 and 1 <= max(streamed[1:]) <= 3, streamed

    weight = head.weight.detach().clone().requires_grad_(True)
    reference = embeddings.clone().requires_grad_(True)
    cosine = F.normalize(reference, dim=1) @ F.normalize(weight, dim=1).T
    dense = QMargin(30.0, 0.2, 1.5, form="exp_alpha")(cosine, targets)
    dense.backward()
    torch.testing.assert_close(loss, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad.to_dense(), weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: QMargin(10.0, 0.2, 1.5), lambda: A3M(20.0, 0.2, 1.25),
                                  lambda: AlphaDiv(5.0, 2.0)])
def test_at_the_start_of_training_the_kept_classes_root_certifies_without_streaming_again(make):
    """Random embeddings at the papers' settings: every class within 0.2 in cosine of the best is in reach
    of max(b_y, max theta), so that bound certifies nothing; the root on the kept classes certifies them."""
    torch.manual_seed(9)
    classes, dim = 3000, 64
    head = StreamingSparseHead(classes, dim, make(), chunk_size=512, candidates=200)
    targets = torch.randint(0, classes, (32,))
    embeddings = torch.randn(32, dim)
    x = embeddings.clone().requires_grad_(True)
    loss = head(x, targets)
    loss.backward()
    assert head.restreams == 0 and head.objective.last_statistics.support_size < 200
    weight = head.weight.detach().clone().requires_grad_(True)
    reference = embeddings.clone().requires_grad_(True)
    dense = make()(F.normalize(reference, dim=1) @ F.normalize(weight, dim=1).T, targets)
    dense.backward()
    torch.testing.assert_close(loss, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, reference.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad.to_dense(), weight.grad, atol=1e-5, rtol=1e-4)


def test_prototype_gradient_touches_only_candidates_and_targets():
    torch.manual_seed(2)
    head = StreamingSparseHead(5000, 16, QMargin(30.0, 0.2, 1.5), chunk_size=512, candidates=8)
    targets = torch.arange(8)
    with torch.no_grad():
        embeddings = head.weight[targets] * 10
    head(embeddings, targets).backward()
    touched = head.weight.grad.coalesce().indices()[0].unique()
    assert touched.numel() <= 8 * (head.candidates + 1) < 5000


def test_a_dense_objective_is_refused():
    with pytest.raises(ValueError, match="alpha > 1"):
        StreamingSparseHead(10, 4, Softmax(30.0))


@pytest.mark.parametrize("bad", [-1, 5000])
def test_targets_out_of_range_and_wrong_shapes_are_errors(bad):
    head = StreamingSparseHead(5000, 16, QMargin(30.0, 0.2, 1.5), chunk_size=512)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4999\]"):
        head(torch.randn(3, 16), torch.tensor([0, bad, 2]))
    with pytest.raises(ValueError, match=r"embeddings must have shape \(batch, 16\)"):
        head(torch.randn(3, 8), torch.tensor([0, 1, 2]))


def _sharded_problem(classes, spread, dim=16, batch=24):
    """Prototypes (C, D), targets and embeddings at ``spread`` around their prototypes, seeded; with few
    classes the prototypes crowd around one direction (an untrained head: every class in reach)."""
    torch.manual_seed(0)
    full = torch.nn.init.xavier_uniform_(torch.empty(classes, dim))
    if classes < 10:
        full = full.mean(0, keepdim=True) + 0.05 * full
    targets = torch.randint(0, classes, (batch,))
    embeddings = full[targets] + spread * torch.randn(batch, dim) / dim ** 0.5
    return full, targets, embeddings


def _sharded_worker(rank, world, port, name, candidates, classes, spread, result_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full, targets, embeddings = _sharded_problem(classes, spread)
        dim = full.shape[1]
        embeddings.requires_grad_(True)
        head = StreamingSparseHead(classes, dim, OBJECTIVES[name](), chunk_size=32, candidates=candidates,
                                   process_group=dist.group.WORLD)
        with torch.no_grad():
            head.weight.copy_(full[head.class_offset:head.class_offset + head.weight.shape[0]])
        loss = head(embeddings, targets)
        loss.backward()
        torch.save({"loss": loss.detach(), "embedding_grad": embeddings.grad, "offset": head.class_offset,
                    "weight_grad": head.weight.grad.to_dense()}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


# 301 classes (an odd count: the shards differ in size); candidates=151: more than the second shard's
# 150 classes, so the ranks must agree on one width. 7 crowded classes with 4 candidates: a shard
# keeps all its classes, every one in reach, so nothing certifies the rows whose target the other
# shard holds, but nothing is left out of them either (they restreamed forever before).
@pytest.mark.parametrize("name, candidates, classes, spread", [
    ("qmargin-1.5", 1, 301, 0.5), ("a3m-1.5", 1, 301, 0.5), ("alphadiv-1.8", 1, 301, 0.5),
    ("qmargin-1.5", 151, 301, 0.5), ("qmargin-papers", 4, 7, 0.5)])
def test_sharded_head_over_two_gloo_processes_equals_the_dense_objective(name, candidates, classes, spread,
                                                                         tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.spawn(_sharded_worker, args=(2, port, name, candidates, classes, spread, str(tmp_path / "r")),
                       nprocs=2, join=False)
    deadline = time.time() + 120
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the sharded head did not finish in 120 s (ranks waiting on each other)")
    results = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]

    weight, targets, embeddings = _sharded_problem(classes, spread)
    weight.requires_grad_(True)
    embeddings.requires_grad_(True)
    dense = OBJECTIVES[name]()(F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T, targets)
    dense.backward()
    for result in results:
        torch.testing.assert_close(result["loss"], dense.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["embedding_grad"], embeddings.grad, atol=1e-5, rtol=1e-4)
        shard = slice(result["offset"], result["offset"] + result["weight_grad"].shape[0])
        torch.testing.assert_close(result["weight_grad"], weight.grad[shard], atol=1e-5, rtol=1e-4)


def test_gathered_cosines_have_the_values_and_gradients_of_normalize():
    from spkver.losses.sparse_head import _GatheredCosine

    torch.manual_seed(3)
    rows = torch.randn(4, 5, 6, dtype=torch.float64)
    rows[1, 2] = 0.0  # a zero prototype: F.normalize clamps its norm
    unit = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    grad = torch.randn(4, 5, dtype=torch.float64)
    results = []
    for cosine_of in (lambda r, u: _GatheredCosine.apply(r, u),
                      lambda r, u: (F.normalize(r, dim=2) * u[:, None, :]).sum(2)):
        r, u = rows.clone().requires_grad_(True), unit.clone().requires_grad_(True)
        value = cosine_of(r, u)
        value.backward(grad)
        results.append((value.detach(), r.grad, u.grad))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    away_from_zero = (torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True),
                      torch.randn(3, 5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(_GatheredCosine.apply, away_from_zero)
