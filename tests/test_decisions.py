"""Decisions a user can trust: calibrations fitted only on pairs that can set them, ranges recorded and warned
outside, and a calibration on held-out speakers that holds on other new speakers."""
import numpy as np
import pytest
import soundfile
import torch

from spkver import metrics
from spkver.calibration import MIN_NONTARGETS, RECALIBRATE, CalibrationError, fit_calibration
from spkver.cli import main
from spkver.data.manifests import auto_calibration_speakers
from spkver.scoring import save_embeddings


def _overlapping(targets=300, nontargets=3000, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(targets), np.zeros(nontargets)].astype(bool)
    return np.where(labels, 0.5, 0.1) + 0.12 * rng.standard_normal(labels.size), labels


def test_pairs_that_separate_perfectly_or_too_few_non_targets_set_no_calibration():
    scores, labels = _overlapping()
    with pytest.raises(CalibrationError, match="separate perfectly"):
        fit_calibration(np.where(labels, scores + 1.0, scores), labels)
    few = np.r_[np.flatnonzero(labels), np.flatnonzero(~labels)[:MIN_NONTARGETS - 1]]
    with pytest.raises(CalibrationError, match=rf"{MIN_NONTARGETS - 1} non-target pairs are too few"):
        fit_calibration(scores[few], labels[few])
    assert fit_calibration(scores, labels).trained_on["ranges"]["score"] == [scores.min(), scores.max()]


def test_spkver_calibrate_refuses_a_separable_list_with_the_reason(tmp_path, capsys):
    rng = np.random.default_rng(1)
    centres = 5 * rng.standard_normal((20, 8))
    ids = [f"s{s}/u{u}" for s in range(20) for u in range(4)]
    vectors = np.repeat(centres, 4, axis=0) + 0.01 * rng.standard_normal((80, 8))  # every speaker far apart
    save_embeddings(tmp_path / "emb.npz", ids, vectors, durations=np.full(80, 3.0))
    pairs = [(int(a.split("/")[0] == b.split("/")[0]), a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    (tmp_path / "dev.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in pairs))
    assert main(["calibrate", "--trials", str(tmp_path / "dev.txt"), "--embeddings", str(tmp_path / "emb.npz"),
                 "--out", str(tmp_path / "cal.json")]) == 2
    assert "separate perfectly" in capsys.readouterr().err and not (tmp_path / "cal.json").exists()


def test_a_calibration_warns_in_one_line_outside_the_scores_and_durations_it_was_fitted_on():
    scores, labels = _overlapping()
    calibration = fit_calibration(scores, labels, trained_on={"ranges": {"seconds": [2.0, 8.0]}})
    inside = np.array([0.3, 0.4])
    assert calibration.range_warning(inside, [[3.0, 4.0], [2.0, 8.0]]) is None
    warning = calibration.range_warning(np.array([0.3]), [[3.0, 30.0]])
    assert "audio of 2.0 to 8.0 s" in warning and warning.endswith(RECALIBRATE) and "\n" not in warning
    assert "scores" in calibration.range_warning(np.array([scores.max() + 0.5]), [[3.0, 4.0]])
    many = np.r_[np.full(98, 0.3), 5.0, 6.0]  # 2 of 100 trials outside: above a 1 % tolerance, not a 5 % one
    assert calibration.range_warning(many, None, tolerance=0.01).startswith("2 of 100 trials fall outside")
    assert calibration.range_warning(many, None, tolerance=0.05) is None


def test_spkver_score_with_a_calibration_warns_when_the_lists_audio_is_unlike_the_calibrations(tmp_path, capsys):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((30, 16))
    ids = [f"s{s}/u{u}" for s in range(30) for u in range(6)]
    vectors = np.repeat(centres, 6, axis=0) + 1.2 * rng.standard_normal((180, 16))
    pairs = [(int(a.split("/")[0] == b.split("/")[0]), a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    (tmp_path / "list.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in pairs))
    save_embeddings(tmp_path / "dev.npz", ids, vectors, durations=rng.uniform(2, 6, 180))
    assert main(["calibrate", "--trials", str(tmp_path / "list.txt"), "--embeddings", str(tmp_path / "dev.npz"),
                 "--out", str(tmp_path / "cal.json")]) == 0
    for seconds, warned in ((rng.uniform(2.5, 5.5, 180), False), (rng.uniform(20, 40, 180), True)):
        save_embeddings(tmp_path / "test.npz", ids, vectors, durations=seconds)
        capsys.readouterr()
        assert main(["score", "--trials", str(tmp_path / "list.txt"), "--embeddings", str(tmp_path / "test.npz"),
                     "--calibration", str(tmp_path / "cal.json")]) == 0
        error = capsys.readouterr().err
        assert ("audio of 2.0 to 6.0 s" in error and RECALIBRATE in error) is warned, error


def test_by_default_a_tenth_of_the_speakers_at_most_200_is_held_out_for_calibration():
    assert [auto_calibration_speakers(n) for n in (10, 19, 20, 42, 1211, 5994)] == [0, 0, 2, 4, 121, 200]


@pytest.fixture(scope="module")
def mfcc_embeddings(tmp_path_factory):
    """MFCC statistics of a synthetic corpus (no training: a fixed front-end as the extractor) by speaker."""
    import torchaudio

    from spkver.data.synth import synthesize_corpus

    folder = tmp_path_factory.mktemp("voices")
    synthesize_corpus(folder, speakers=48, utterances=6, seed=21, min_seconds=1.5, max_seconds=2.5, test_speakers=2,
                      difficulty=0.5, progress=False)
    speakers, vectors = [], []
    for path in sorted((folder / "wav").glob("*/*/*.wav")):
        audio, _ = soundfile.read(path, dtype="float32")
        mfcc = torchaudio.compliance.kaldi.mfcc(torch.from_numpy(audio)[None] * 32768, num_ceps=20)
        vectors.append(torch.cat([mfcc.mean(0), mfcc.std(0)]).numpy())
        speakers.append(path.relative_to(folder / "wav").parts[0])
    vectors = np.asarray(vectors)
    return np.asarray(speakers), (vectors - vectors.mean(axis=0)) / vectors.std(axis=0)


def _pairs(speakers, vectors):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    first, second = np.triu_indices(len(speakers), k=1)
    return np.einsum("ij,ij->i", unit[first], unit[second]), speakers[first] == speakers[second]


def test_a_calibration_fitted_on_held_out_speakers_keeps_actual_dcf_near_the_minimum_on_other_new_speakers(
        mfcc_embeddings):
    speakers, vectors = mfcc_embeddings
    names = np.unique(speakers)
    one, other = np.isin(speakers, names[::2]), np.isin(speakers, names[1::2])
    calibration = fit_calibration(*_pairs(speakers[one], vectors[one]), prior=0.01)
    scores, labels = _pairs(speakers[other], vectors[other])
    actual = metrics.actual_dcf(calibration.llr(scores), labels, p_target=0.01)
    minimum = metrics.min_dcf(scores, labels, p_target=0.01)[0]
    assert minimum < 0.97  # the features separate speakers: the bound below is not met by rejecting everything
    assert actual <= 1.5 * minimum, (actual, minimum)
