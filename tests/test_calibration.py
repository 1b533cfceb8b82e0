"""Calibration: Cllr, minCllr, actual DCF against independent computations; the LLR map and its CLI."""
import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.metrics import confusion_matrix, log_loss

from spkver import metrics
from spkver.calibration import CalibrationError, fit_calibration, load_calibration, quality_features
from spkver.cli import main
from spkver.scoring import EmbeddingStore, save_embeddings


def _gaussian_scores(seed=0, targets=400, nontargets=4000, gap=2.0):
    """Scores N(gap, 1) for targets and N(0, 1) for non-targets: the true LLR is gap * s - gap^2 / 2."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(targets), np.zeros(nontargets)].astype(bool)
    scores = rng.standard_normal(labels.size) + gap * labels
    return scores, labels


def _pav(scores, labels):
    """Pool-adjacent-violators by hand (ties pooled first): the posterior of each trial."""
    order = np.argsort(scores, kind="stable")
    values, inverse = np.unique(scores[order], return_inverse=True)
    blocks = [[labels[order][inverse == i].sum(), (inverse == i).sum()] for i in range(values.size)]
    merged = []  # [sum of labels, count, number of distinct values]
    for total, count in blocks:
        merged.append([total, count, 1])
        while len(merged) > 1 and merged[-2][0] / merged[-2][1] >= merged[-1][0] / merged[-1][1]:
            total, count, width = merged.pop()
            merged[-1] = [merged[-1][0] + total, merged[-1][1] + count, merged[-1][2] + width]
    per_value = np.concatenate([[t / c] * w for t, c, w in merged])
    posterior = np.empty(scores.size)
    posterior[order] = per_value[inverse]
    return posterior


def test_cllr_is_the_prior_balanced_log_loss_in_bits():
    scores, labels = _gaussian_scores()
    llrs = 2.0 * scores - 2.0
    weights = np.where(labels, 0.5 / labels.sum(), 0.5 / (~labels).sum())
    expected = log_loss(labels, 1 / (1 + np.exp(-llrs)), sample_weight=weights) / math.log(2)
    assert metrics.cllr(llrs, labels) == pytest.approx(expected, rel=1e-9)
    assert metrics.cllr(np.zeros(10), np.r_[np.ones(5), np.zeros(5)]) == pytest.approx(1.0)


def test_min_cllr_is_cllr_after_pav_and_bounds_every_monotone_calibration():
    scores, labels = _gaussian_scores(seed=1)
    scores = np.round(scores, 1)  # ties, pooled as groups
    posterior = np.clip(_pav(scores, labels), 1e-300, 1 - 1e-16)
    prior = labels.mean()
    llrs = np.log(posterior / (1 - posterior)) - math.log(prior / (1 - prior))
    expected = 0.5 * (np.mean(np.log2(1 + np.exp(-llrs[labels]))) + np.mean(np.log2(1 + np.exp(llrs[~labels]))))
    assert metrics.min_cllr(scores, labels) == pytest.approx(expected, rel=1e-6)
    for a, b in [(2.0, -2.0), (1.0, 0.0), (3.0, -5.0)]:
        assert metrics.min_cllr(scores, labels) <= metrics.cllr(a * scores + b, labels) + 1e-12
    assert metrics.min_cllr(np.exp(scores), labels) == pytest.approx(metrics.min_cllr(scores, labels))
    assert metrics.min_cllr(np.ones(20), np.r_[np.ones(5), np.zeros(15)]) == pytest.approx(1.0)


def test_actual_dcf_is_the_cost_of_the_bayes_decisions():
    scores, labels = _gaussian_scores(seed=2)
    llrs = 2.0 * scores - 2.0
    for prior in (0.01, 0.05, 0.5):
        accept = llrs >= math.log((1 - prior) / prior)
        (true_negative, false_alarm), (miss, hit) = confusion_matrix(labels, accept)
        cost = prior * miss / (miss + hit) + (1 - prior) * false_alarm / (false_alarm + true_negative)
        assert metrics.actual_dcf(llrs, labels, prior) == pytest.approx(cost / min(prior, 1 - prior))
        assert metrics.actual_dcf(llrs, labels, prior) >= metrics.min_dcf(llrs, labels, prior)[0] - 1e-12


def test_the_bayes_error_curve_is_actual_and_minimum_dcf_at_each_prior():
    scores, labels = _gaussian_scores(seed=3)
    llrs = 1.5 * scores - 1.0
    curve = metrics.bayes_error_curve(llrs, labels, prior_log_odds=[-4.0, -2.0, 0.0, 3.0])
    for log_odds, actual, minimum in zip(curve["prior_log_odds"], curve["actual"], curve["minimum"]):
        prior = 1 / (1 + math.exp(-log_odds))
        assert actual == pytest.approx(metrics.actual_dcf(llrs, labels, prior))
        assert minimum == pytest.approx(metrics.min_dcf(llrs, labels, prior)[0])


@pytest.mark.parametrize("prior", [0.01, 0.1, 0.5])
def test_the_fitted_map_minimises_the_prior_weighted_cross_entropy(prior):
    """Against SciPy minimising the same objective directly; and near the true LLR of Gaussian scores."""
    scores, labels = _gaussian_scores(seed=4, targets=2000, nontargets=20000)
    calibration = fit_calibration(scores, labels, prior=prior)
    offset = math.log(prior / (1 - prior))

    def objective(parameters):
        log_odds = parameters[0] * scores + parameters[1] + offset
        return (prior * np.mean(np.logaddexp(0, -log_odds[labels]))
                + (1 - prior) * np.mean(np.logaddexp(0, log_odds[~labels])))

    best = minimize(objective, x0=[1.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12}).x
    assert calibration.weights[0] == pytest.approx(best[0], abs=2e-3)
    assert calibration.bias == pytest.approx(best[1], abs=2e-3)
    assert calibration.weights[0] == pytest.approx(2.0, abs=0.15) and calibration.bias == pytest.approx(-2.0, abs=0.2)
    llrs = calibration.llr(scores)
    assert metrics.cllr(llrs, labels) < 1.0
    assert metrics.cllr(llrs, labels) - metrics.min_cllr(scores, labels) < 0.02


def test_quality_measures_enter_the_map_and_explain_a_quality_dependent_shift():
    """Scores whose non-target mean rises with duration: the duration term removes the shift."""
    rng = np.random.default_rng(5)
    count = 400
    ids = [f"spk{i % 40}/u{i}.wav" for i in range(count)]
    durations = rng.uniform(1.0, 10.0, count).astype(np.float32)
    store = EmbeddingStore(ids, rng.standard_normal((count, 8)), durations=durations)
    enroll, test = rng.integers(0, count, 20000), rng.integers(0, count, 20000)
    labels = rng.random(20000) < 0.1
    quality = quality_features(store, enroll, test, ["duration", "norm"])
    assert set(quality) == {"duration_min", "duration_max", "norm_min", "norm_max"}
    assert np.all(quality["duration_min"] <= quality["duration_max"])
    swapped = quality_features(store, test, enroll, ["duration"])  # symmetric in the two sides
    assert np.array_equal(swapped["duration_min"], quality["duration_min"])
    scores = rng.standard_normal(20000) + 2.0 * labels + 0.8 * quality["duration_min"]
    plain = fit_calibration(scores, labels, prior=0.05)
    with_quality = fit_calibration(scores, labels, {k: quality[k] for k in ("duration_min", "duration_max")},
                                   prior=0.05)
    assert with_quality.features == ["score", "duration_max", "duration_min"]
    assert with_quality.measures == ["duration"]
    plain_cllr = metrics.cllr(plain.llr(scores), labels)
    quality_cllr = metrics.cllr(with_quality.llr(scores, quality), labels)
    assert quality_cllr < plain_cllr - 0.05


def test_bad_calibration_input_is_named():
    scores, labels = _gaussian_scores(seed=6, targets=50, nontargets=500)
    with pytest.raises(CalibrationError, match="both targets and non-targets"):
        fit_calibration(scores, np.zeros_like(labels))
    bad = scores.copy()
    bad[7] = np.nan
    with pytest.raises(CalibrationError, match="trial 7"):
        fit_calibration(bad, labels)
    gaps = np.ones_like(scores)
    gaps[11] = np.nan
    with pytest.raises(CalibrationError, match="duration_min.*trial 11"):
        fit_calibration(scores, labels, {"duration_min": gaps})
    store = EmbeddingStore(["a", "b"], np.ones((2, 3)))
    with pytest.raises(CalibrationError, match="needs durations"):
        quality_features(store, np.array([0]), np.array([1]), ["duration"])
    with pytest.raises(CalibrationError, match="needs a cohort"):
        quality_features(store, np.array([0]), np.array([1]), ["cohort_mean"])
    with pytest.raises(CalibrationError, match="unknown quality"):
        quality_features(store, np.array([0]), np.array([1]), ["snr"])
    calibration = fit_calibration(scores, labels, {"duration_min": np.ones_like(scores) + scores ** 2},
                                  fingerprint="a" * 64)
    with pytest.raises(CalibrationError, match="duration_min.*missing"):
        calibration.llr(scores)
    with pytest.raises(CalibrationError, match="another extractor"):
        calibration.check_fingerprint("b" * 64, "store.npz")
    calibration.check_fingerprint("a" * 64, "store.npz")


def test_calibration_files_round_trip_and_malformed_ones_are_named(tmp_path):
    scores, labels = _gaussian_scores(seed=7)
    calibration = fit_calibration(scores, labels, prior=0.02, fingerprint="f" * 64, trained_on={"scores": "cosine"})
    calibration.save(tmp_path / "calibration.json")
    loaded = load_calibration(tmp_path / "calibration.json")
    assert loaded == calibration
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CalibrationError, match="broken.json: not a JSON"):
        load_calibration(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"weights": [1]}))
    with pytest.raises(CalibrationError, match="other.json: not a spkver calibration"):
        load_calibration(tmp_path / "other.json")
    data = json.loads((tmp_path / "calibration.json").read_text())
    data["weights"] = [1.0, 2.0]
    (tmp_path / "mismatch.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="match the weights"):
        load_calibration(tmp_path / "mismatch.json")


def _store_and_lists(tmp_path, fingerprint="c" * 64):
    """Embeddings of 30 speakers x 6 utterances (a speaker direction plus noise), a dev and a test list."""
    rng = np.random.default_rng(8)
    speakers = rng.standard_normal((30, 16))
    ids, vectors = [], []
    for s in range(30):
        for u in range(6):
            ids.append(f"id{s:03d}/v/{u:05d}.wav")
            vectors.append(speakers[s] + 0.9 * rng.standard_normal(16))
    save_embeddings(tmp_path / "emb.npz", ids, np.array(vectors), durations=rng.uniform(2, 8, len(ids)),
                    fingerprint=fingerprint)
    for name, speaker_range in (("dev.txt", range(0, 15)), ("test.txt", range(15, 30))):
        utterances = [i for i in ids if int(i[2:5]) in speaker_range]
        lines = [f"{int(a[:5] == b[:5])} {a} {b}" for k, a in enumerate(utterances) for b in utterances[k + 1:]]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    return tmp_path / "emb.npz"


def test_calibrate_then_score_reports_cllr_and_writes_llrs_and_the_plot(tmp_path, capsys):
    store = _store_and_lists(tmp_path)
    out = tmp_path / "calibration.json"
    assert main(["calibrate", "--trials", str(tmp_path / "dev.txt"), "--embeddings", str(store),
                 "--quality", "duration", "--prior", "0.05", "--out", str(out)]) == 0
    assert "Cllr" in capsys.readouterr().out
    assert load_calibration(out).fingerprint == "c" * 64
    assert main(["score", "--trials", str(tmp_path / "test.txt"), "--embeddings", str(store), "--calibration", str(out),
                 "--scores-out", str(tmp_path / "scores.txt"), "--json", str(tmp_path / "r.json"),
                 "--plot-calibration", str(tmp_path / "ape.png")]) == 0
    printed = capsys.readouterr().out
    assert "Cllr" in printed and "actDCF(0.05)" in printed
    row = json.loads((tmp_path / "r.json").read_text())["lists"][0]
    assert 0 < row["cllr"] < 1 and row["min_cllr"] <= row["cllr"] and row["act_dcf"] >= row["min_dcf_at_prior"]
    first = (tmp_path / "scores.txt").read_text().splitlines()[0].split()
    assert len(first) == 5 and float(first[3]) != float(first[2])  # enroll test score llr label
    assert (tmp_path / "ape.png").stat().st_size > 1000


def test_score_refuses_a_calibration_of_another_extractor_or_score_kind(tmp_path, capsys):
    store = _store_and_lists(tmp_path)
    out = tmp_path / "calibration.json"
    main(["calibrate", "--trials", str(tmp_path / "dev.txt"), "--embeddings", str(store), "--out", str(out)])
    other = _store_and_lists(tmp_path / "other" if (tmp_path / "other").mkdir() is None else None, "d" * 64)
    capsys.readouterr()
    assert main(["score", "--trials", str(tmp_path / "test.txt"), "--embeddings", str(other),
                 "--calibration", str(out)]) == 2
    assert "another extractor" in capsys.readouterr().err
    assert main(["score", "--trials", str(tmp_path / "test.txt"), "--embeddings", str(store), "--cohort", str(store),
                 "--calibration", str(out)]) == 2
    assert "cosine scores, and these are as-norm" in capsys.readouterr().err
    one_class = tmp_path / "targets.txt"
    one_class.write_text("1 id000/v/00000.wav id000/v/00001.wav\n")
    assert main(["calibrate", "--trials", str(one_class), "--embeddings", str(store), "--out", str(out)]) == 2
    assert "targets.txt" in capsys.readouterr().err
