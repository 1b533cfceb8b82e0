"""Every experiment file composes and loads; composition rules."""
import warnings
from pathlib import Path

import pytest

from spkver.checkpoints import AtomicCheckpointer
from spkver.hparams import HparamsError, compose, load, path_list

HPARAMS = Path(__file__).resolve().parent.parent / "hparams"
# Experiment files are <model>_<objective>.yaml (fine-tuning files: finetune/); recipe.yaml and demo.yaml are pieces.
EXPERIMENTS = sorted(p.name for p in HPARAMS.glob("*_*.yaml"))


def _required(name, tmp_path):
    """The keys an experiment file leaves to the command line."""
    return {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out")}


def test_there_is_one_experiment_file_per_model_and_objective():
    for model in ("ecapa512", "ecapa1024", "resnet34"):
        for objective in ("softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"):
            assert f"{model}_{objective}.yaml" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_loads_with_its_model_and_objective(name, tmp_path):
    hparams, _ = load(HPARAMS / name, _required(name, tmp_path))
    assert hparams["experiment_name"].startswith(hparams["model_name"])
    assert hparams["experiment_name"].endswith(hparams["objective_name"])
    assert hparams["objective"].__class__.__name__.lower().replace("_", "") in name.replace("_", "") or \
        name.startswith("demo") or hparams["objective_name"] == "a3m_i"
    assert hasattr(hparams["embedding_model"], "embedding_dim")
    assert isinstance(hparams["checkpointer"], AtomicCheckpointer)  # a run killed while saving still resumes
    if hparams["objective_name"] == "a3m_i":
        assert hparams["reinit_policy"].collapse_threshold == 0.5


def test_command_line_overrides_reach_shared_keys(tmp_path):
    hparams, _ = load(HPARAMS / "ecapa512_qmargin.yaml",
                      {**_required("ecapa512_qmargin.yaml", tmp_path), "number_of_epochs": 8, "alpha": 1.25,
                       "margin": 0.3})
    assert hparams["epoch_counter"].limit == 8 and hparams["lr_schedule"].epochs == 8
    assert hparams["objective"].alpha == 1.25 and hparams["objective"].base_margin == 0.3


def test_a_key_in_two_pieces_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yaml").write_text("x: 2\n")
    (tmp_path / "e.yaml").write_text("include: [a.yaml, b.yaml]\n")
    with pytest.raises(HparamsError, match="'x' is defined in both a.yaml and b.yaml"):
        compose(tmp_path / "e.yaml")


def test_the_experiment_files_own_keys_replace_the_pieces(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\ny: !ref <x>\nz:\n    - 1\n    - 2\n")
    (tmp_path / "e.yaml").write_text("include: [a.yaml]\nz: [3]\n")
    hparams, _ = load(tmp_path / "e.yaml")
    assert hparams == {"x": 1, "y": 1, "z": [3]}


def test_missing_piece_is_named(tmp_path):
    (tmp_path / "e.yaml").write_text("include: [nope.yaml]\n")
    with pytest.raises(HparamsError, match="nope.yaml does not exist"):
        compose(tmp_path / "e.yaml")


def test_a_misspelt_override_is_named_with_the_closest_key(tmp_path):
    with pytest.raises(HparamsError, match=r"--nubmer_of_epochs: .*ecapa512_qmargin.yaml has no such key "
                                           r"\(did you mean number_of_epochs\?\)"):
        load(HPARAMS / "ecapa512_qmargin.yaml", "data_folder: x\nnubmer_of_epochs: 3")  # SpeechBrain's form


def test_a_key_given_twice_on_the_command_line_is_an_error():
    with pytest.raises(HparamsError, match=r"^--peak_lr is given 2 times on the command line; give it once$"):
        load(HPARAMS / "ecapa512_qmargin.yaml", "data_folder: x\npeak_lr: 0.1\npeak_lr: 0.2")


def test_a_missing_experiment_file_suggests_the_closest_one():
    with pytest.raises(HparamsError, match=r"resnet34_qmargn.yaml: no such hparams file "
                                           r"\(did you mean resnet34_qmargin.yaml\?\)"):
        compose(HPARAMS / "resnet34_qmargn.yaml")


def test_a_value_an_object_refuses_names_the_experiment_file(tmp_path):
    with pytest.raises(HparamsError, match=r"ecapa512_qmargin.yaml: .*epochs=0"):
        load(HPARAMS / "ecapa512_qmargin.yaml", {"data_folder": str(tmp_path), "number_of_epochs": 0})


def test_a_path_list_accepts_one_path_or_a_list_and_refuses_anything_else():
    assert path_list(Path("a.txt"), "trial_lists") == ["a.txt"] and path_list(None, "trial_lists") == []
    with pytest.raises(HparamsError, match=r"trial_lists: expected a path or a list of paths"):
        path_list(3, "trial_lists")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_uses_the_papers_settings_without_a_warning(name, tmp_path):
    """alpha > 1 at s(alpha-1) = 5 (s = 10, alpha = 1.5), m = 0.2 (0.1 for ResNet34 from scratch);
    CosFace and ArcFace at WeSpeaker's s = 32, m = 0.2."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hparams, _ = load(HPARAMS / name, _required(name, tmp_path))
    objective = hparams["objective"]
    if objective.alpha > 1:
        assert (objective.scale, objective.alpha) == (10.0, 1.5)
        if hparams["objective_name"] != "alphadiv":
            assert objective.base_margin == (0.1 if hparams["model_name"] == "resnet34" else 0.2)
    else:
        assert objective.scale == 32.0 and objective.base_margin in (0.0, 0.2)
    if hparams["objective_name"] == "qmargin":
        assert objective.form == "exp"


def test_the_papers_other_pairs_are_one_override_away(tmp_path):
    for scale, alpha in ((20.0, 1.25), (5.0, 2.0)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            hparams, _ = load(HPARAMS / "ecapa512_qmargin.yaml",
                              {**_required("ecapa512_qmargin.yaml", tmp_path), "scale": scale, "alpha": alpha})
        assert (hparams["objective"].scale, hparams["objective"].alpha) == (scale, alpha)


@pytest.fixture(scope="module")
def wespeaker_folder(tmp_path_factory):
    from tests.layouts import write_wespeaker_folder

    return write_wespeaker_folder(tmp_path_factory.mktemp("ws") / "model", "ResNet18",
                                  {"feat_dim": 80, "embed_dim": 256, "pooling_func": "TSTP", "two_emb_layer": False},
                                  classes=4)


@pytest.mark.parametrize("name, margin, crop", [("qmargin.yaml", 0.1, 2.0), ("wespeaker_resnet34.yaml", 0.1, 2.0),
                                                ("speechbrain_ecapa.yaml", 0.2, 2.0), ("large_margin.yaml", 0.5, 6.0)])
def test_finetuning_follows_the_papers_schedule_from_the_starting_models_own_extractor(name, margin, crop, tmp_path,
                                                                                      wespeaker_folder):
    """10 epochs at 1e-4 -> 5e-5, Q-Margin (10, 1.5), the margin fixed from the first step, no speed
    perturbation; the extractor (and its front-end) is the starting model's; the data a prepared corpus."""
    hparams, _ = load(HPARAMS / "finetune" / name, {**_required(name, tmp_path), "init_from": str(wespeaker_folder)})
    schedule = hparams["lr_schedule"]
    assert (schedule.peak, schedule.final, schedule.warmup, schedule.epochs) == (1e-4, 5e-5, 0, 10)
    assert hparams["margin_warmup"].fraction(0.0) == 1.0 and hparams["speed_perturb"] is None
    objective = hparams["objective"]
    assert (objective.scale, objective.alpha, objective.base_margin) == (10.0, 1.5, margin)
    assert hparams["crop_seconds"] == crop
    assert hparams["embedding_model"].spec["architecture"] == "wespeaker"
    assert hparams["embedding_model"].frontend.kind == "kaldi"
    assert hparams["manifest_folder"] == str(tmp_path) and hparams["trial_lists"] == [f"{tmp_path}/trials.txt"]


def test_finetuning_names_its_missing_starting_model(tmp_path):
    with pytest.raises(HparamsError, match=r"qmargin.yaml: 'init_from' is a !PLACEHOLDER and must be replaced"):
        load(HPARAMS / "finetune" / "qmargin.yaml", _required("qmargin.yaml", tmp_path))


SSL_EXPERIMENTS = sorted(p.name for p in (HPARAMS / "ssl").glob("*.yaml") if not p.name.endswith("_recipe.yaml"))


@pytest.fixture(scope="module")
def ssl_folders(tmp_path_factory):
    from tests.layouts import write_tiny_w2vbert, write_tiny_wavlm

    root = tmp_path_factory.mktemp("hf")
    return {"wavlm": write_tiny_wavlm(root / "wavlm"), "w2vbert": write_tiny_w2vbert(root / "w2vbert")}


@pytest.mark.parametrize("name", SSL_EXPERIMENTS)
def test_the_ssl_experiments_follow_the_papers_schedules(name, tmp_path, ssl_folders):
    """WavLM + MHFA: 3 s crops, 30 epochs, 0.01 -> 4.4e-3 after 3 warm-up epochs, the margin ramped over epochs
    2-5, the encoder at 0.08x; then 5 epochs at a fixed margin, 8e-3 -> 5e-5. w2v-BERT + MFA: prototypes at 5x,
    2 s crops, 5 epochs at 1e-4 -> 5e-5, m = 0.2; then the large margin, m = 0.5 on 6 s crops."""
    family = "wavlm" if name.startswith("wavlm") else "w2vbert"
    values = {**_required(name, tmp_path), "ssl_folder": str(ssl_folders[family])}
    if "fixed_margin" in name or "large_margin" in name:
        values["init_from"] = str(tmp_path / "first_stage")
    hparams, _ = load(HPARAMS / "ssl" / name, values)
    schedule, objective, warmup = hparams["lr_schedule"], hparams["objective"], hparams["margin_warmup"]
    assert hparams["embedding_model"].spec["architecture"] == "ssl"
    expected_pair = (10.0, 1.5) if hparams["objective_name"] == "qmargin" else (32.0, 1.0)
    assert (objective.scale, objective.alpha) == expected_pair
    if name == "wavlm_fixed_margin.yaml":
        assert (schedule.peak, schedule.final, schedule.warmup, schedule.epochs) == (0.008, 5e-5, 0, 5)
        assert warmup.fraction(0.0) == 1.0
    elif family == "wavlm":
        assert (schedule.peak, schedule.final, schedule.warmup, schedule.epochs) == (0.01, 0.0044, 3, 30)
        assert (warmup.start_epoch, warmup.warmup_epochs) == (2, 3) and hparams["crop_seconds"] == 3.0
        assert hparams["lr_multipliers"] == {"encoder": 0.08} and hparams["embedding_model"].spec["backend"] == "mhfa"
        assert hparams["embedding_model"].backbone.att_head.out_features == 64
    else:
        assert (schedule.peak, schedule.final, schedule.warmup, schedule.epochs) == (1e-4, 5e-5, 0, 5)
        assert warmup.fraction(0.0) == 1.0 and hparams["embedding_model"].spec["backend"] == "mfa"
        assert hparams["embedding_model"].spec["lora"]["r"] == 64
        large = name == "w2vbert_large_margin.yaml"
        assert (objective.base_margin, hparams["crop_seconds"]) == ((0.5, 6.0) if large else (0.2, 2.0))
        assert hparams["lr_multipliers"] == ({} if large else {"prototypes": 5.0})
