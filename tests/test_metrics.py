"""Specification of the verification metrics, checked against scikit-learn's ROC."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_curve as sklearn_roc_curve

from spkver import metrics


def _sklearn_points(scores, labels):
    """(p_fa, p_miss, thresholds) of every operating point, from scikit-learn."""
    fpr, tpr, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    return fpr, 1.0 - tpr, thresholds


def _reference_eer(scores, labels):
    p_fa, p_miss, _ = _sklearn_points(scores, labels)  # thresholds decreasing: p_fa up, p_miss down
    difference = p_fa - p_miss
    for i in range(len(difference) - 1):
        if difference[i] <= 0 <= difference[i + 1]:
            if difference[i + 1] == difference[i]:
                return p_fa[i]
            t = -difference[i] / (difference[i + 1] - difference[i])
            return p_fa[i] + t * (p_fa[i + 1] - p_fa[i])
    raise AssertionError("no crossing")


def _reference_min_dcf(scores, labels, p_target):
    p_fa, p_miss, _ = _sklearn_points(scores, labels)
    cost = p_target * p_miss + (1 - p_target) * p_fa
    return cost.min() / min(p_target, 1 - p_target)


def _reference_tar(scores, labels, far):
    p_fa, p_miss, _ = _sklearn_points(scores, labels)
    return (1 - p_miss[p_fa <= far]).max()


@st.composite
def trial_lists(draw):
    n = draw(st.integers(2, 300))
    # Few distinct values make ties frequent.
    values = draw(st.sampled_from([st.integers(0, 5).map(float), st.floats(-5, 5, allow_nan=False)]))
    scores = np.array(draw(st.lists(values, min_size=n, max_size=n)))
    labels = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    labels[0], labels[1] = 0, 1
    return scores, labels


@given(trial_lists())
@settings(max_examples=150, deadline=None)
def test_eer_equals_the_crossing_of_scikit_learns_roc(data):
    scores, labels = data
    assert metrics.eer(scores, labels)[0] == pytest.approx(_reference_eer(scores, labels), abs=1e-12)


@given(trial_lists(), st.sampled_from([0.01, 0.05, 0.5]))
@settings(max_examples=150, deadline=None)
def test_min_dcf_equals_the_minimum_over_scikit_learns_roc(data, p_target):
    scores, labels = data
    assert metrics.min_dcf(scores, labels, p_target)[0] == pytest.approx(
        _reference_min_dcf(scores, labels, p_target), abs=1e-12)


@given(trial_lists())
@settings(max_examples=100, deadline=None)
def test_tar_at_far_equals_the_best_point_of_scikit_learns_roc_within_the_far(data):
    scores, labels = data
    assume((labels == 0).sum() >= 2)
    far = 1.0 / (labels == 0).sum()  # the smallest FAR the list can measure
    (point,) = metrics.tar_at_far(scores, labels, fars=(far,))
    assert point.tar == pytest.approx(_reference_tar(scores, labels, far), abs=1e-12)


@given(trial_lists())
@settings(max_examples=100, deadline=None)
def test_thresholds_reproduce_the_reported_error_rates(data):
    scores, labels = data
    value, threshold = metrics.min_dcf(scores, labels, 0.05)
    accept = scores >= threshold
    p_miss = (~accept & (labels == 1)).sum() / (labels == 1).sum()
    p_fa = (accept & (labels == 0)).sum() / (labels == 0).sum()
    assert value == pytest.approx((0.05 * p_miss + 0.95 * p_fa) / 0.05)


def test_all_ties_give_an_eer_of_one_half_and_min_dcf_of_one():
    scores, labels = np.zeros(10), np.array([0, 1] * 5)
    assert metrics.eer(scores, labels)[0] == 0.5
    assert metrics.min_dcf(scores, labels, 0.01)[0] == 1.0


def test_perfect_separation_gives_zero_errors_and_full_tar():
    scores = np.r_[np.linspace(-1, 0, 2000), np.linspace(0.5, 1, 10)]
    labels = np.r_[np.zeros(2000), np.ones(10)]
    assert metrics.eer(scores, labels)[0] == 0.0
    assert metrics.min_dcf(scores, labels, 0.01)[0] == 0.0
    assert [p.tar for p in metrics.tar_at_far(scores, labels, fars=(1e-2, 1e-3))] == [1.0, 1.0]


def test_a_single_target_is_enough():
    scores, labels = np.array([0.1, 0.9, 0.3, 0.2]), np.array([0, 1, 0, 0])
    assert metrics.eer(scores, labels)[0] == 0.0


def test_far_below_one_over_the_nontargets_is_reported_undefined():
    scores, labels = np.arange(500.0), np.r_[np.zeros(499), 1]
    points = metrics.tar_at_far(scores, labels, fars=(1e-2, 1e-3))
    assert points[0].defined and points[0].num_nontargets == 499
    assert not points[1].defined and points[1].tar is None


@pytest.mark.parametrize("labels, message", [
    (np.zeros(4), "undefined"), (np.ones(4), "undefined"), (np.array([0, 1, 2, 1]), "labels"),
])
def test_undefined_or_invalid_label_sets_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        metrics.eer(np.arange(4.0), labels)


def test_non_finite_scores_raise_naming_the_trial():
    with pytest.raises(ValueError, match="trial 2"):
        metrics.eer(np.array([0.0, 1.0, np.nan, 2.0]), np.array([0, 1, 0, 1]))


def test_det_plot_is_written(tmp_path):
    rng = np.random.default_rng(0)
    scores, labels = np.r_[rng.normal(0, 1, 1000), rng.normal(2, 1, 100)], np.r_[np.zeros(1000), np.ones(100)]
    p_fa, p_miss, _ = metrics.det_curve(scores, labels)
    metrics.plot_det({"list": (p_fa, p_miss)}, tmp_path / "det.png")
    assert (tmp_path / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_n_log_n_not_quadratic():
    # 2 million trials would need a 2M x 2M threshold matrix in a quadratic implementation.
    rng = np.random.default_rng(1)
    scores = rng.normal(size=2_000_000)
    labels = rng.random(2_000_000) < 0.01
    scores[labels] += 2
    assert 0.1 < metrics.eer(scores, labels)[0] < 0.2
