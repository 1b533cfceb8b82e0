"""Specification of A3M-I: class-mean prototypes, the firing policy, and the collapse it fixes."""
import pytest
import torch
import torch.nn.functional as F

from spkver.losses import (
    A3M,
    ClassMeanAccumulator,
    ReinitializationPolicy,
    SparsityStatistics,
    reinitialize_prototypes,
)


def test_streaming_class_means_equal_batch_means():
    torch.manual_seed(0)
    emb, labels = torch.randn(300, 8), torch.randint(0, 7, (300,))
    acc = ClassMeanAccumulator(7, 8)
    for chunk in range(0, 300, 64):
        acc.update(emb[chunk:chunk + 64], labels[chunk:chunk + 64])
    unit = F.normalize(emb, dim=1)
    expected = torch.stack([F.normalize(unit[labels == c].mean(0), dim=0) for c in range(7)])
    torch.testing.assert_close(acc.prototypes(), expected)


def test_classes_without_embeddings_keep_their_prototype_and_are_reported():
    acc = ClassMeanAccumulator(3, 2)
    acc.update(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="2 classes have no embeddings"):
        acc.prototypes()
    prototypes = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
    assert reinitialize_prototypes(prototypes, acc) == 1
    torch.testing.assert_close(prototypes.data, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))


def test_reinitialisation_clears_the_optimiser_state_of_the_prototypes():
    prototypes = torch.nn.Parameter(torch.randn(2, 2))
    optimizer = torch.optim.SGD([prototypes], lr=0.1, momentum=0.9)
    prototypes.sum().backward()
    optimizer.step()
    assert prototypes in optimizer.state
    acc = ClassMeanAccumulator(2, 2)
    acc.update(torch.eye(2), torch.tensor([0, 1]))
    reinitialize_prototypes(prototypes, acc, optimizer)
    assert prototypes not in optimizer.state


def test_accumulator_rejects_bad_input():
    acc = ClassMeanAccumulator(3, 2)
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="embeddings"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))


def _stats(zero_fraction):
    return SparsityStatistics(support_size=2.0, target_zero_fraction=zero_fraction, target_prob=0.5)


def test_policy_fires_at_configured_epochs():
    policy = ReinitializationPolicy(epochs=[2, 5])
    assert [policy.should_fire(epoch) for epoch in range(1, 7)] == [False, True, False, False, True, False]


def test_policy_fires_when_the_epochs_collapse_fraction_exceeds_the_threshold():
    policy = ReinitializationPolicy(collapse_threshold=0.5, cooldown=2)
    policy.observe(_stats(0.9), rows=10)
    policy.observe(_stats(0.3), rows=30)  # 9 + 9 of 40 rows: 0.45, below
    assert not policy.should_fire(1)
    policy.observe(_stats(0.6), rows=10)
    assert policy.should_fire(2)
    policy.observe(_stats(0.9), rows=10)
    assert not policy.should_fire(3)  # cooldown
    policy.observe(_stats(0.9), rows=10)
    assert policy.should_fire(4)
    assert policy.firings == [2, 4]


def test_policy_respects_max_firings_and_round_trips_its_state():
    policy = ReinitializationPolicy(epochs=[1, 2, 3], max_firings=2, cooldown=0)
    assert [policy.should_fire(e) for e in (1, 2, 3)] == [True, True, False]
    clone = ReinitializationPolicy(epochs=[1, 2, 3], max_firings=2, cooldown=0)
    clone.load_state_dict(policy.state_dict())
    assert clone.firings == [1, 2]


def _train_toy_a3m(reinitialise, epochs=3, seed=0):
    """Linear embeddings of 50 Gaussian classes, random prototypes, A3M(s=30, m=0.3, alpha=1.5).

    Returns the fraction of samples with p_y = 0 in each epoch.
    """
    torch.manual_seed(seed)
    classes, dim, per_class = 50, 32, 20
    centres = F.normalize(torch.randn(classes, dim), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + 0.3 * torch.randn(classes * per_class, dim) / dim ** 0.5
    model = torch.nn.Linear(dim, dim)
    prototypes = torch.nn.Parameter(torch.randn(classes, dim))
    optimizer = torch.optim.SGD(list(model.parameters()) + [prototypes], lr=0.05, momentum=0.9)
    objective = A3M(30.0, 0.3, 1.5)
    policy = ReinitializationPolicy(collapse_threshold=0.5 if reinitialise else None)
    history = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(labels)).split(50):
            cosine = F.normalize(model(features[batch]), dim=1) @ F.normalize(prototypes, dim=1).T
            loss = objective(cosine, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            policy.observe(objective.last_statistics, len(batch))
        history.append(policy.collapse_fraction)
        if policy.should_fire(epoch):
            accumulator = ClassMeanAccumulator(classes, dim)
            with torch.no_grad():
                accumulator.update(model(features), labels)
            reinitialize_prototypes(prototypes, accumulator, optimizer)
    return history


def test_a3m_collapses_to_zero_target_probability_and_reinitialisation_recovers():
    plain = _train_toy_a3m(reinitialise=False)
    fixed = _train_toy_a3m(reinitialise=True)
    assert plain[0] > 0.95 and fixed[0] > 0.95  # A3M starts with p_y = 0 nearly everywhere
    assert plain[1] > 0.9  # without A3M-I the second epoch is still collapsed
    assert fixed[1] < 0.3  # re-initialised after epoch 1, the target is back in the support
    assert fixed[2] < 0.05 < plain[2]
