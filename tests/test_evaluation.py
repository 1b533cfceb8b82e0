"""The evaluation stage's contracts: the stages, the results.json schema, helpers that return values or raise."""
import json

import numpy as np
import pytest

from spkver.evaluation import (
    RESULTS_VERSION,
    DevelopmentFiles,
    EvaluationError,
    EvaluationSettings,
    calibrate_threshold,
    read_results,
    results_document,
    write_results,
)
from spkver.scoring import EmbeddingStore, ScoringError, Stage, Trials, score_stages

ROW = {"name": "trials.txt", "trials": 4, "targets": 2, "nontargets": 2, "eer": 0.25, "min_dcf_0_01": 0.5,
       "min_dcf_0_05": 0.5, "tar_at_far": {}}


def test_results_json_has_a_version_and_each_stage_holds_its_rows_before_and_after_training(tmp_path):
    calibrated = {**ROW, "calibration_prior": 0.01, "cllr": 0.3, "min_cllr": 0.2, "act_dcf": 0.4,
                  "min_dcf_at_prior": 0.3}
    document = results_document({Stage.COSINE: [ROW], Stage.ASNORM: [ROW], Stage.CALIBRATED: [calibrated]},
                                before={Stage.COSINE: [ROW]}, calibrated_scores="as-norm")
    assert document == {"version": RESULTS_VERSION, "stages": {
        "cosine": {"before_training": [ROW], "after_training": [ROW]},
        "asnorm": {"after_training": [ROW]},
        "calibrated": {"after_training": [calibrated], "scores": "as-norm"}}}
    markdown = write_results(tmp_path, document)
    assert [line for line in markdown.splitlines() if line.startswith("###")] == [
        "### before training: cosine", "### after training: cosine", "### after training: AS-norm",
        "### after training: AS-norm + calibration"]
    assert read_results(tmp_path / "results.json") == document


def test_a_results_json_of_another_version_is_refused_by_name(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"after training: cosine": [ROW]}))
    with pytest.raises(EvaluationError, match=r"results.json version None, this spkver reads version 1"):
        read_results(tmp_path / "results.json")


def test_stages_are_an_enum_with_their_titles_and_unknown_names_are_refused():
    assert [stage.value for stage in Stage] == ["cosine", "asnorm", "calibrated"]
    assert Stage.CALIBRATED.title("cosine") == "cosine + calibration" and Stage.ASNORM.title() == "AS-norm"
    settings = EvaluationSettings("manifests", ["trials.txt"], stages=["calibrated", "cosine"])
    assert settings.chosen_stages() == [Stage.COSINE, Stage.CALIBRATED]
    with pytest.raises(EvaluationError, match="stages must be among cosine, asnorm, calibrated; got zscore"):
        EvaluationSettings("manifests", ["trials.txt"], stages=["zscore"]).chosen_stages()


def test_settings_round_trip_through_the_folder_and_a_missing_file_is_named(tmp_path):
    settings = EvaluationSettings("manifests", ["a.txt", "b.txt"], average_last=4, calibration_far=0.01)
    settings.write(tmp_path)
    assert EvaluationSettings.read(tmp_path) == settings
    with pytest.raises(EvaluationError, match="no evaluation.json"):
        EvaluationSettings.read(tmp_path / "elsewhere")


def _development(speakers, spread=1.0):
    rng = np.random.default_rng(0)
    centres = {speaker: rng.normal(size=8) for speaker in set(speakers)}
    vectors = np.stack([centres[s] + spread * rng.normal(size=8) for s in speakers])
    store = EmbeddingStore([f"{s}/{i}" for i, s in enumerate(speakers)], vectors)
    return DevelopmentFiles([f"{i}.wav" for i in range(len(speakers))], list(speakers), "test speakers", store)


def test_the_threshold_is_a_value_or_an_error_never_a_sentence_in_its_place():
    many = [f"s{i // 3}" for i in range(90)]  # 30 speakers x 3 files: 3,870 non-target pairs
    threshold = calibrate_threshold(_development(many))
    assert isinstance(threshold.value, float) and threshold.description.startswith("EER threshold")
    with pytest.raises(EvaluationError, match="no two files of the test speakers share a speaker"):
        calibrate_threshold(_development(["a", "b", "c"]))
    with pytest.raises(EvaluationError, match="non-target pairs cannot measure FAR=1e-05"):
        calibrate_threshold(_development(many), far=1e-5)
    with pytest.raises(EvaluationError, match="8 non-target pairs are too few for a threshold"):
        calibrate_threshold(_development(["a", "a", "b", "b", "c"]))
    with pytest.raises(EvaluationError, match="separate perfectly"):
        calibrate_threshold(_development(many, spread=0.01))


def test_the_stages_a_list_is_scored_in_need_their_inputs():
    store = EmbeddingStore(["a", "b"], np.eye(2, dtype=np.float32))
    trials = Trials(["a"], ["b"], np.array([0], dtype=np.int8))
    assert set(score_stages(store, trials, [Stage.COSINE])) == {Stage.COSINE}
    with pytest.raises(ScoringError, match="AS-norm scores need a cohort"):
        score_stages(store, trials, [Stage.ASNORM])
    with pytest.raises(ScoringError, match="the calibrated stage needs a calibration"):
        score_stages(store, trials, [Stage.CALIBRATED])
