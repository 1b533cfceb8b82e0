"""Enrolment with several utterances: trial lists whose enrolment side is a speaker of an enrolment map."""
import numpy as np
import pytest

from spkver.cli import main
from spkver.scoring import EmbeddingStore, Trials, as_norm, read_trials, save_embeddings


@pytest.fixture
def enrolment(tmp_path):
    """A store with a recorded mean, a map of 3 speakers x 3 files, and trials against 12 test files."""
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(3, 16))
    ids, vectors = [], []
    for speaker in range(3):
        for index in range(7):
            ids.append(f"spk{speaker}/file{index}.wav")
            vectors.append(centres[speaker] + 0.8 * rng.normal(size=16) + 2.0)
    mean = np.full(16, 2.0, dtype=np.float32)
    save_embeddings(tmp_path / "emb.npz", ids, np.array(vectors), durations=rng.uniform(1, 4, len(ids)), mean=mean)
    save_embeddings(tmp_path / "cohort.npz", [f"c{s}/u{u}" for s in range(10) for u in range(3)],
                    rng.normal(size=(30, 16)) + 2.0)
    enrolled = {f"speaker{s}": [f"spk{s}/file{i}.wav" for i in range(3)] for s in range(3)}
    (tmp_path / "enroll.map").write_text("".join(f"{name} {' '.join(files)}\n" for name, files in enrolled.items()))
    trials = [(int(s == t), f"speaker{s}", f"spk{t}/file{i}.wav") for s in range(3) for t in range(3)
              for i in range(3, 7)]
    (tmp_path / "trials.txt").write_text("".join(f"{label} {a} {b}\n" for label, a, b in trials))
    return tmp_path, dict(zip(ids, np.array(vectors, dtype=np.float32))), mean, enrolled


def _scores(path):
    return {(fields[0], fields[1]): float(fields[2]) for fields in map(str.split, path.read_text().splitlines())}


def test_score_with_an_enrolment_map_scores_the_mean_of_normalised_embeddings(enrolment):
    folder, vectors, mean, enrolled = enrolment
    assert main(["score", "--embeddings", str(folder / "emb.npz"), "--trials", str(folder / "trials.txt"),
                 "--enroll", str(folder / "enroll.map"), "--scores-out", str(folder / "scores.txt")]) == 0
    scores = _scores(folder / "scores.txt")
    trials = read_trials(folder / "trials.txt")
    assert len(scores) == len(trials)
    for (speaker, test), score in scores.items():
        unit = [(vectors[f] - mean) / np.linalg.norm(vectors[f] - mean) for f in enrolled[speaker]]
        model = np.mean(unit, axis=0)
        probe = vectors[test] - mean
        assert score == pytest.approx(float(model @ probe / np.linalg.norm(model) / np.linalg.norm(probe)), abs=1e-5)


def test_as_norm_with_an_enrolment_map_normalises_the_enrolled_model(enrolment):
    folder, vectors, mean, enrolled = enrolment
    assert main(["score", "--embeddings", str(folder / "emb.npz"), "--trials", str(folder / "trials.txt"),
                 "--enroll", str(folder / "enroll.map"), "--cohort", str(folder / "cohort.npz"), "--asnorm-topk", "5",
                 "--scores-out", str(folder / "asnorm.txt")]) == 0
    scores = _scores(folder / "asnorm.txt")
    # The same AS-norm on a store holding each enrolled model as one more embedding, built here.
    models = {name: np.mean([(vectors[f] - mean) / np.linalg.norm(vectors[f] - mean) for f in files], axis=0) + mean
              for name, files in enrolled.items()}
    store = EmbeddingStore(list(vectors) + list(models), np.stack(list(vectors.values()) + list(models.values())))
    from spkver.scoring import load_embeddings

    cohort = load_embeddings(folder / "cohort.npz")
    keys = list(scores)
    expected = as_norm(store, Trials([k[0] for k in keys], [k[1] for k in keys], None), cohort, 5, mean=mean)
    np.testing.assert_allclose([scores[k] for k in keys], expected.scores, rtol=1e-5, atol=1e-5)


def test_an_enrolment_map_naming_a_file_without_embedding_or_a_bad_line_is_one_line(enrolment, capsys):
    folder, *_ = enrolment
    (folder / "bad.map").write_text("speaker0 spk0/file0.wav\nspeaker1\n")
    command = ["score", "--embeddings", str(folder / "emb.npz"), "--trials", str(folder / "trials.txt"),
               "--enroll", str(folder / "bad.map")]
    assert main(command) == 2
    assert "bad.map:2: expected 'speaker file [file ...]'" in capsys.readouterr().err
    (folder / "bad.map").write_text("speaker0 spk0/file0.wav spk9/nowhere.wav\n")
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "bad.map: speaker 'speaker0': 1 files have no embedding" in error and "spk9/nowhere.wav" in error
