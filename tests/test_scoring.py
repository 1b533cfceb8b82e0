"""Specification of embedding stores, trial lists, cosine scoring and AS-norm."""
import numpy as np
import pytest

from spkver.scoring import (
    EmbeddingStore,
    ScoringError,
    Trials,
    adaptive_normalisation_stats,
    as_norm,
    cosine_scores,
    load_embeddings,
    read_trials,
    save_embeddings,
    speaker_mean_cohort,
)


def _store(n=50, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"id{i // 5:05d}/video{i % 2}/{i:05d}.wav" for i in range(n)]
    return EmbeddingStore(ids, rng.normal(size=(n, dim)).astype(np.float32))


def test_npz_store_round_trips(tmp_path):
    store = _store()
    save_embeddings(tmp_path / "emb.npz", store.ids, store.embeddings)
    loaded = load_embeddings(tmp_path / "emb.npz")
    assert loaded.ids == store.ids
    np.testing.assert_array_equal(loaded.embeddings, store.embeddings)


def test_folder_of_npy_files_is_read_with_relative_paths_as_ids(tmp_path):
    (tmp_path / "id00001" / "v").mkdir(parents=True)
    np.save(tmp_path / "id00001" / "v" / "00001.wav.npy", np.ones(4, dtype=np.float32))
    np.save(tmp_path / "id00001" / "v" / "00002.npy", np.ones((1, 4), dtype=np.float32))
    store = load_embeddings(tmp_path)
    rows, missing = store.rows(["id00001/v/00001.wav", "id00001/v/00002.wav"])
    assert missing == [] and sorted(rows.tolist()) == [0, 1]


def test_cosine_scores_equal_a_per_trial_loop():
    store = _store()
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, 50, (300, 2))
    trials = Trials([store.ids[a] for a, _ in pairs], [store.ids[b] for _, b in pairs], None)
    mean = store.embeddings.mean(0)
    expected = []
    for a, b in pairs:
        x, y = store.embeddings[a] - mean, store.embeddings[b] - mean
        expected.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    np.testing.assert_allclose(cosine_scores(store, trials, mean=mean).scores, expected, atol=1e-6)


def test_as_norm_equals_its_definition():
    store, cohort = _store(), _store(n=40, seed=2)
    trials = Trials([store.ids[0], store.ids[3]], [store.ids[7], store.ids[9]], np.array([True, False]))
    unit = store.embeddings / np.linalg.norm(store.embeddings, axis=1, keepdims=True)
    cohort_unit = cohort.embeddings / np.linalg.norm(cohort.embeddings, axis=1, keepdims=True)

    def stats(i):
        top = np.sort(unit[i] @ cohort_unit.T)[-10:]
        return top.mean(), top.std()

    expected = []
    for e, t in ((0, 7), (3, 9)):
        s = unit[e] @ unit[t]
        (me, se), (mt, st) = stats(e), stats(t)
        expected.append(0.5 * ((s - me) / se + (s - mt) / st))
    np.testing.assert_allclose(as_norm(store, trials, cohort, top_k=10).scores, expected, atol=1e-5)


def test_speaker_mean_cohort_has_one_unit_mean_per_speaker():
    cohort = speaker_mean_cohort(_store())
    assert len(cohort.ids) == 10 and cohort.ids[0] == "id00000"


def test_trial_list_with_and_without_labels(tmp_path):
    (tmp_path / "a.txt").write_text("1 x/1.wav y/2.wav\n0 x/1.wav z/3.wav\n\n")
    (tmp_path / "b.txt").write_text("x/1.wav y/2.wav\n")
    labelled, plain = read_trials(tmp_path / "a.txt"), read_trials(tmp_path / "b.txt")
    assert labelled.labels.tolist() == [True, False] and labelled.test == ["y/2.wav", "z/3.wav"]
    assert plain.labels is None and len(plain) == 1


@pytest.mark.parametrize("text, message", [
    ("1 a b\n0 c\n", r"t.txt:2: expected 3 columns"),
    ("1 a b\n2 c d\n", r"t.txt:2: label must be 0 or 1, got '2'"),
    ("1 a b c\n", r"t.txt:1: expected 'label enroll test'"),
    ("\n\n", "empty"),
])
def test_malformed_trial_lists_name_file_and_line(tmp_path, text, message):
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ScoringError, match=message):
        read_trials(tmp_path / "t.txt")


def test_missing_embeddings_are_counted_and_listed_or_skipped_on_request():
    store = _store()
    trials = Trials([store.ids[0], "idX/v/1.wav", store.ids[1]], [store.ids[2], store.ids[3], "idY/v/2.wav"],
                    np.array([True, False, True]))
    with pytest.raises(ScoringError, match="2 utterances have no embedding.*idX/v/1.wav, idY/v/2.wav"):
        cosine_scores(store, trials)
    scored = cosine_scores(store, trials, allow_missing=True)
    assert scored.num_skipped == 2 and len(scored.scores) == 1


def test_nan_and_zero_norm_embeddings_are_rejected_by_id():
    store = _store()
    store.embeddings[4] = np.nan
    trials = Trials([store.ids[4]], [store.ids[5]], None)
    with pytest.raises(ScoringError, match=f"NaN or inf.*{store.ids[4]}"):
        cosine_scores(store, trials)
    store.embeddings[4] = 0
    with pytest.raises(ScoringError, match=f"zero norm.*{store.ids[4]}"):
        cosine_scores(store, trials)


def test_dimension_mismatches_are_reported():
    with pytest.raises(ScoringError, match="8-d.*4-d"):
        adaptive_normalisation_stats(_store(), _store(dim=4))
    with pytest.raises(ScoringError, match="dimension 3"):
        cosine_scores(_store(), Trials([_store().ids[0]], [_store().ids[1]], None), mean=np.zeros(3))


def test_duplicate_ids_in_a_store_are_an_error():
    store = EmbeddingStore(["a.wav", "a"], np.ones((2, 2)), source="s.npz")
    with pytest.raises(ScoringError, match="s.npz: utterance ID 'a' appears twice"):
        store.rows(["a"])


def test_lines_with_compensating_column_counts_are_not_misread(tmp_path):
    (tmp_path / "t.txt").write_text("1 a b c\n1 d\n")  # 6 tokens, like two good lines
    with pytest.raises(ScoringError, match="t.txt:1"):
        read_trials(tmp_path / "t.txt")


def test_tab_separated_and_padded_lines_are_read(tmp_path):
    (tmp_path / "t.txt").write_text("1\ta.wav\tb.wav\n0  c.wav   d.wav  \n")
    trials = read_trials(tmp_path / "t.txt")
    assert trials.enroll == ["a.wav", "c.wav"] and trials.labels.tolist() == [True, False]
