"""Smoke tests of the training recipe: every objective trains, checkpoints and resumes."""
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from spkver.scoring import read_trials

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "voxceleb" / "train.py"
OBJECTIVES = ["softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"]


def _arguments(corpus, output, objective="qmargin", epochs=3, batch_size=8, extra=()):
    """The recipe's command line for a tiny run; ``extra`` arguments replace the defaults of their keys."""
    defaults = [f"--data_folder={corpus}", f"--trial_lists=[{corpus}/trials.txt]", f"--output_folder={output}",
                f"--number_of_epochs={epochs}", "--channels=16", "--embedding_dim=16", f"--batch_size={batch_size}",
                "--num_workers=0", "--lr_warmup_epochs=1", "--margin_warmup_epochs=1", "--margin_warmup_start=0",
                "--crop_seconds=1.0", "--mean_utterances=10", "--peak_lr=0.05", "--speed_perturb=null",
                "--calibration_min_nontargets=10"]  # a tiny corpus has a few dozen development pairs
    replaced = {argument.split("=")[0] for argument in extra}
    return [str(ROOT / "hparams" / f"ecapa512_{objective}.yaml"),
            *(argument for argument in defaults if argument.split("=")[0] not in replaced), *extra]


def _train_losses(output):
    return [float(x) for x in re.findall(r"train loss: ([0-9.e+-]+)", (Path(output) / "train_log.txt").read_text())]


def _run_in_process(arguments, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *arguments])
    runpy.run_path(str(RECIPE), run_name="__main__")


def _after_training(results: dict, stage: str) -> list:
    """The rows of ``stage`` after training in a results.json (schema version 1)."""
    assert results["version"] == 1
    return results["stages"][stage]["after_training"]


def _user_error_line(arguments, monkeypatch, capsys) -> str:
    """The recipe's one-line message for a user error (status 2; the subprocess test below checks that no
    traceback is printed, which in-process capture cannot: SpeechBrain's log handler keeps an old stream)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _run_in_process(arguments, monkeypatch)
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_recipe_trains_checkpoints_and_scores_with_every_objective(objective, tiny_corpus, tmp_path, monkeypatch):
    output = tmp_path / objective
    # A quarter of the files held for validation: pairs of several speakers for the calibration.
    _run_in_process(_arguments(tiny_corpus, output, objective, extra=["--valid_fraction=0.25"]), monkeypatch)
    losses = _train_losses(output)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert list((output / "save").glob("CKPT+*"))
    results = json.loads((output / "results.json").read_text())
    row = _after_training(results, "cosine")[0]
    assert row["name"] == "trials.txt" and 0.0 <= row["eer"] <= 1.0
    assert "| trials.txt |" in (output / "results.md").read_text()
    # The staged table, as WeSpeaker's: cosine, AS-norm, AS-norm calibrated to LLRs on validation pairs.
    assert list(results["stages"]) == ["cosine", "asnorm", "calibrated"]
    assert re.findall(r"^### (.*)$", (output / "results.md").read_text(), re.M) == \
        ["after training: cosine", "after training: AS-norm", "after training: AS-norm + calibration"]
    calibrated = _after_training(results, "calibrated")[0]
    assert calibrated["eer"] == _after_training(results, "asnorm")[0]["eer"] and calibrated["cllr"] > 0
    assert calibrated["min_cllr"] <= calibrated["cllr"] + 1e-9
    assert (output / "cohort.npz").exists() and (output / "calibration.json").exists()
    # The evaluated extractor is the mean of the last average_last (10: here all 3) epochs' checkpoints.
    assert (output / "embedding_model.averaged.ckpt").exists() and len(list((output / "save").glob("CKPT+*"))) == 3
    assert "Cllr" in (output / "results.md").read_text()
    # Resuming with a longer schedule continues from the checkpoint instead of starting over.
    _run_in_process(_arguments(tiny_corpus, output, objective, epochs=4, extra=["--valid_fraction=0.25"]),
                    monkeypatch)
    assert len(_train_losses(output)) == 4


def test_spkver_evaluate_reruns_the_recipes_evaluation_and_embed_then_score_gives_the_same_figures(
        tiny_corpus, tmp_path, monkeypatch, capsys):
    """Evaluation is one stage: `spkver evaluate` on the experiment rewrites the same results.md (the
    before-training table kept), and the CLI road (embed, then score) subtracts the model's mean too."""
    from spkver import cli

    output = tmp_path / "run"
    _run_in_process(_arguments(tiny_corpus, output, "qmargin", epochs=2,
                               extra=["--valid_fraction=0.25", "--evaluate_before_training=True",
                                      "--average_last=2"]), monkeypatch)
    first = (output / "results.md").read_text()
    assert first.startswith("### before training: cosine")
    engine_lines = [line for line in (output / "log.txt").read_text().splitlines() if "loss engine:" in line]
    assert len(engine_lines) == 1 and "loss engine: 'cpu' (the compiled CPU kernel" in engine_lines[0]
    settings = json.loads((output / "evaluation.json").read_text())
    assert settings["trial_lists"] == [f"{tiny_corpus}/trials.txt"] and settings["average_last"] == 2
    (output / "results.md").unlink()
    assert cli.main(["evaluate", "--model", str(output)]) == 0
    assert (output / "results.md").read_text() == first
    results = json.loads((output / "results.json").read_text())
    assert list(results["stages"]["cosine"]) == ["before_training", "after_training"]
    # A subset of the stages, on the same folder.
    assert cli.main(["evaluate", "--model", str(output), "--stages", "cosine"]) == 0
    assert list(json.loads((output / "results.json").read_text())["stages"]) == ["cosine"]
    # The CLI road: the store records the model's mean embedding and `spkver score` subtracts it.
    listing = tmp_path / "files.txt"
    files = sorted({line.split()[i] for line in (tiny_corpus / "trials.txt").read_text().splitlines() for i in (1, 2)})
    listing.write_text("".join(f"{file}\n" for file in files))
    store = tmp_path / "trials.npz"
    assert cli.main(["embed", "--model", str(output), "--list", str(listing), "--root", str(tiny_corpus / "wav"),
                     "--out", str(store)]) == 0
    scores = tmp_path / "scores.json"
    capsys.readouterr()
    assert cli.main(["score", "--embeddings", str(store), "--trials", str(tiny_corpus / "trials.txt"),
                     "--json", str(scores)]) == 0
    recipe_eer = _after_training(results, "cosine")[0]["eer"]
    assert json.loads(scores.read_text())["lists"][0]["eer"] == pytest.approx(recipe_eer, abs=1e-12)
    assert cli.main(["score", "--embeddings", str(store), "--trials", str(tiny_corpus / "trials.txt"),
                     "--json", str(scores), "--no-mean"]) == 0
    assert json.loads(scores.read_text())["lists"][0]["trials"] == _after_training(results, "cosine")[0]["trials"]


def test_recipe_trains_with_speed_perturbation_on_three_times_the_classes(tiny_corpus, tmp_path, monkeypatch):
    """The VoxCeleb hparams' speed perturbation: the head holds speakers x 3 prototypes and trains."""
    output = tmp_path / "speed"
    arguments = [a for a in _arguments(tiny_corpus, output, "qmargin", epochs=2) if a != "--speed_perturb=null"]
    _run_in_process(arguments, monkeypatch)
    speakers = json.loads((output / "manifests" / "speakers.json").read_text())
    checkpoint = sorted((output / "save").glob("CKPT+*/classifier.ckpt"))[-1]
    prototypes = torch.load(checkpoint, map_location="cpu")["weight"]
    assert prototypes.shape[0] == 3 * len(speakers)
    losses = _train_losses(output)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_speakers_held_out_of_training_calibrate_the_scores_and_the_threshold(tiny_corpus, tmp_path, monkeypatch):
    """calibration_speakers: new speakers' pairs train the LLR map (training speakers' are over-confident)."""
    output = tmp_path / "held_out"
    _run_in_process(_arguments(tiny_corpus, output, "qmargin", epochs=1, extra=["--calibration_speakers=3"]),
                    monkeypatch)
    speakers = json.loads((output / "manifests" / "speakers.json").read_text())
    held_out = {line.split(",")[-1].strip() for line in
                (output / "manifests" / "calibration.csv").read_text().splitlines()[1:]}
    assert len(speakers) == 4 and len(held_out) == 3 and not held_out & set(speakers)
    calibration = json.loads((output / "calibration.json").read_text())
    assert "3 calibration speakers (never trained on)" in calibration["trained_on"]["source"]
    # Every pair of a speaker's 4 whole files (files of 1.2-1.6 s are too short for 2 s crops).
    assert calibration["trained_on"]["targets"] == 3 * (4 * 3 // 2)
    assert "calibration speakers" in json.loads((output / "spkver.json").read_text())["calibration"]


@pytest.mark.parametrize("objective", ["qmargin", "a3m_i"])
def test_recipe_trains_with_the_streaming_head(objective, tiny_corpus, tmp_path, monkeypatch):
    """The exact sparse head in place of the dense cosine head: it trains, checkpoints and resumes."""
    output = tmp_path / objective
    streaming = ["--head=streaming", "--streaming_chunk_size=3", "--streaming_candidates=1"]  # several chunks,
    if objective == "a3m_i":                                                                # failing certificates
        streaming.append("--reinit_epochs=[1]")  # A3M-I re-initialises the streaming head's prototypes
    _run_in_process(_arguments(tiny_corpus, output, objective, extra=streaming), monkeypatch)
    losses = _train_losses(output)
    assert len(losses) == 3 and losses[-1] < losses[0]
    log = (output / "train_log.txt").read_text()
    assert "train accuracy:" in log and "valid accuracy:" in log
    assert ("a3m_i_fired" in log) == (objective == "a3m_i")
    results = json.loads((output / "results.json").read_text())
    assert 0.0 <= _after_training(results, "cosine")[0]["eer"] <= 1.0
    _run_in_process(_arguments(tiny_corpus, output, objective, epochs=4, extra=streaming), monkeypatch)
    assert len(_train_losses(output)) == 4


def test_a_single_trial_list_may_be_given_as_a_plain_path(tiny_corpus, tmp_path, monkeypatch):
    arguments = [a for a in _arguments(tiny_corpus, tmp_path, epochs=1) if not a.startswith("--trial_lists")]
    _run_in_process([*arguments, "--trial_lists", f"{tiny_corpus}/trials.txt"], monkeypatch)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["name"] for row in _after_training(results, "cosine")] == ["trials.txt"]


USER_ERRORS = {  # argument replaced or added -> the one line that names it
    "misspelt key": ("--nubmer_of_epochs=3", r"--nubmer_of_epochs: .*ecapa512_qmargin.yaml has no such key "
                                             r"\(did you mean number_of_epochs\?\)"),
    "missing data folder": ("--data_folder=/no/such/corpus", r"data_folder: /no/such/corpus is not a folder"),
    "missing trial list": ("--trial_lists=/no/such/trials.txt",
                           r"trial_lists: /no/such/trials.txt: cannot read trial list \(No such file"),
    "a folder as trial list": ("--trial_lists={corpus}", r"trial_lists: .*: cannot read trial list \(Is a directory"),
    "trial lists not paths": ("--trial_lists=[1, 2]", r"trial_lists: expected a path or a list of paths like "
                                                      r"\[a.txt,b.txt\], got \[1, 2\]"),
    "a schedule of no epochs": ("--number_of_epochs=0", r".*ecapa512_qmargin.yaml: need 0 < final <= peak and "
                                                        r"0 <= warmup_epochs <= epochs; .* epochs=0"),
    "unknown head": ("--head=sparse", r".*ecapa512_qmargin.yaml: head must be 'dense' or 'streaming', got 'sparse'"),
    "an engine that cannot serve the objective": ("--loss_engine=dense", r"loss_engine: engine 'dense' cannot serve "
                                                                         r"this call: cross-entropy is the alpha = 1"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_a_user_error_is_one_line_naming_the_value_before_training(case, tiny_corpus, tmp_path, monkeypatch,
                                                                    capsys):
    argument, message = USER_ERRORS[case]
    argument = argument.format(corpus=tiny_corpus)
    key = argument.split("=")[0]
    arguments = [a for a in _arguments(tiny_corpus, tmp_path / "out") if not a.startswith(key + "=")]
    assert re.match(r"^train.py: error: " + message, _user_error_line([*arguments, argument], monkeypatch, capsys))
    assert not list((tmp_path / "out").glob("save/CKPT+*"))  # nothing trained


def test_an_unknown_experiment_file_or_a_dense_objective_on_the_streaming_head_is_one_line(tiny_corpus, tmp_path,
                                                                                          monkeypatch, capsys):
    arguments = _arguments(tiny_corpus, tmp_path / "a")
    line = _user_error_line([arguments[0].replace("qmargin", "qmargn"), *arguments[1:]], monkeypatch, capsys)
    assert re.search(r"ecapa512_qmargn.yaml: no such hparams file \(did you mean ecapa512_qmargin.yaml\?\)", line)
    line = _user_error_line(_arguments(tiny_corpus, tmp_path / "b", "arcface", extra=["--head=streaming"]),
                            monkeypatch, capsys)
    assert re.search(r"head: the sparse head needs alpha > 1 .* ArcFace with alpha=1.0", line)


def test_the_recipe_prints_a_user_error_as_one_line_with_status_2(tiny_corpus, tmp_path):
    completed = subprocess.run([sys.executable, str(RECIPE), *_arguments(tiny_corpus, tmp_path), "--bach_size=4"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == \
        f"train.py: error: --bach_size: {ROOT / 'hparams' / 'ecapa512_qmargin.yaml'} has no such key " \
        "(did you mean batch_size?)"
    assert "Traceback" not in completed.stderr


def test_a_killed_run_resumes_mid_epoch_and_finishes(tiny_corpus, tmp_path):
    output = tmp_path / "killed"
    command = [sys.executable, str(RECIPE), *_arguments(tiny_corpus, output, epochs=2, batch_size=2,
                                                        extra=["--ckpt_interval_steps=1"])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    try:
        # Wait for an intra-epoch checkpoint of epoch 1, then kill the run.
        while time.time() < deadline and process.poll() is None:
            checkpoints = list((output / "save").glob("CKPT+*/CKPT.yaml"))
            if any("end-of-epoch: false" in c.read_text() for c in checkpoints):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (output / "results.json").exists()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "torchvision" not in completed.stderr  # no alarming notice about figures we never save there
    # The resumed epoch's progress bar starts past step 0: the run continued inside the epoch.
    first_bar = re.search(r"(\d+)/(\d+) \[", completed.stderr)
    assert first_bar and 0 < int(first_bar.group(1)) < int(first_bar.group(2)), completed.stderr[:500]
    assert len(_train_losses(output)) == 2
    assert (output / "results.json").exists()


def _parameters(folder):
    from spkver.models import load_model

    model = load_model(folder)
    return [p.detach().clone() for p in model.extractor.parameters()], model.prototypes


def test_finetuning_starts_from_the_trained_extractor_and_prototypes_of_the_same_speakers(
        tiny_corpus, tmp_path, monkeypatch):
    source = tmp_path / "cosface"
    _run_in_process(_arguments(tiny_corpus, source, "cosface", epochs=2), monkeypatch)
    target = tmp_path / "finetuned"
    frozen = ["--peak_lr=1e-9", "--final_lr=1e-9", "--lr_warmup_epochs=0", f"--init_from={source}"]
    _run_in_process(_arguments(tiny_corpus, target, epochs=1, extra=frozen), monkeypatch)
    log = (target / "log.txt").read_text()
    assert f"fine-tuning from {source} (spkver experiment): extractor; the prototypes of its 7 speakers" in log
    assert re.search(r"[\d.]+ % of training examples are already one-hot \(zero loss, zero gradient\) under "
                     r"QMargin\(scale=10.0", log)
    (before, prototypes), (after, finetuned_prototypes) = _parameters(source), _parameters(target)
    for a, b in zip(before, after):  # a learning rate of 1e-9: the weights are the starting model's
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(prototypes, finetuned_prototypes, atol=1e-6, rtol=0)


def test_finetuning_on_other_speakers_starts_the_prototypes_at_class_means(tiny_corpus, tmp_path, monkeypatch):
    from spkver.data.synth import synthesize_corpus

    source = tmp_path / "cosface"
    _run_in_process(_arguments(tiny_corpus, source, "cosface", epochs=1), monkeypatch)
    other = tmp_path / "other_corpus"  # 6 training speakers instead of 7, all of other names
    synthesize_corpus(other, speakers=9, utterances=4, seed=8, min_seconds=1.2, max_seconds=1.6, test_speakers=3,
                      progress=False)
    for folder in sorted((other / "wav").iterdir()):
        folder.rename(folder.with_name("id2" + folder.name[3:]))
    (other / "trials.txt").write_text((other / "trials.txt").read_text().replace(" id1", " id2"))
    _run_in_process(_arguments(other, tmp_path / "finetuned", epochs=1, extra=[f"--init_from={source}"]),
                    monkeypatch)
    log = (tmp_path / "finetuned" / "log.txt").read_text()
    assert (f"fine-tuning from {source} (spkver experiment): extractor; prototypes start at the normalised "
            "class-mean embeddings under the starting model (6 of 6 classes seen") in log
    assert _after_training(json.loads((tmp_path / "finetuned" / "results.json").read_text()), "cosine")


@pytest.fixture(scope="module")
def prepared_folder(tiny_corpus, tmp_path_factory):
    """The tiny corpus as a user's folder of speakers (ROOT/<speaker>/<session>/<file>), prepared."""
    from spkver.cli import main

    root = tmp_path_factory.mktemp("own_data")
    for path in sorted((tiny_corpus / "wav").glob("*/*/*.wav")):
        target = root / "speakers" / path.relative_to(tiny_corpus / "wav")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    assert main(["prepare", "folder", str(root / "speakers"), "--out", str(root / "prepared"), "--test-speakers", "3",
                 "--min-seconds", "0.5", "--valid-fraction", "0.3"]) == 0
    return root / "prepared"


@pytest.mark.parametrize("layout", ["WeSpeaker folder", "SpeechBrain hub folder"])
def test_finetuning_a_public_model_on_a_prepared_folder_keeps_its_front_end_and_exports(layout, prepared_folder,
                                                                                      tmp_path, monkeypatch):
    from spkver.inference import SpeakerEmbedder
    from spkver.models import load_model
    from tests.layouts import write_speechbrain_hub_folder, write_wespeaker_folder

    if layout == "WeSpeaker folder":
        start = write_wespeaker_folder(tmp_path / "start", "ResNet18", {"feat_dim": 80, "embed_dim": 256,
                                                                        "pooling_func": "TSTP", "two_emb_layer": False},
                                       classes=20)
    else:
        start = write_speechbrain_hub_folder(tmp_path / "start", "ecapa", classes=20, channels=64)
    output = tmp_path / "finetuned"
    _run_in_process([str(ROOT / "hparams" / "finetune" / "qmargin.yaml"), f"--init_from={start}",
                     f"--data_folder={prepared_folder}", f"--output_folder={output}", "--number_of_epochs=1",
                     "--batch_size=8", "--num_workers=0", "--crop_seconds=1.0", "--mean_utterances=10",
                     "--average_last=1"], monkeypatch)
    log = (output / "log.txt").read_text()
    assert f"fine-tuning from {start} ({layout}): extractor; prototypes start at the normalised class-mean" in log
    assert "the zero-loss cosine lead is 0.33: reachable" in log
    assert _after_training(json.loads((output / "results.json").read_text()), "cosine")[0]["trials"] > 0
    finetuned = load_model(output).extractor
    assert finetuned.spec == load_model(start).extractor.spec  # the starting model's architecture and front-end
    exported = tmp_path / "exported"
    from spkver.cli import main

    assert main(["export", "--model", str(output), "--out", str(exported)]) == 0
    a, b = SpeakerEmbedder.from_pretrained(output), SpeakerEmbedder.from_pretrained(exported)
    wav = next(iter(sorted(prepared_folder.parent.rglob("*.wav"))))
    np.testing.assert_allclose(a.embed_file(wav), b.embed_file(wav), rtol=1e-5, atol=1e-5)


def test_spkver_evaluate_scores_a_public_folder_through_its_export_and_never_writes_into_it(prepared_folder, tmp_path,
                                                                                          capsys):
    from spkver.cli import main
    from tests.layouts import write_wespeaker_folder

    start = write_wespeaker_folder(tmp_path / "voxceleb_resnet34", "ResNet18", {"feat_dim": 80, "embed_dim": 256},
                                   classes=8)
    before = sorted(path.name for path in start.iterdir())
    arguments = ["evaluate", "--model", str(start), "--manifests", str(prepared_folder), "--trials",
                 str(prepared_folder / "trials.txt"), "--stages", "cosine"]
    assert main(arguments) == 2
    assert "is a WeSpeaker folder: give --out DIR" in capsys.readouterr().err
    assert main(arguments + ["--out", str(tmp_path / "evaluated")]) == 0
    assert sorted(path.name for path in start.iterdir()) == before
    results = json.loads((tmp_path / "evaluated" / "results.json").read_text())
    assert _after_training(results, "cosine")[0]["trials"] == len(read_trials(prepared_folder / "trials.txt"))


def test_pairs_too_few_to_calibrate_leave_the_model_uncalibrated_and_say_why(tiny_corpus, tmp_path, monkeypatch):
    output = tmp_path / "exp"
    _run_in_process(_arguments(tiny_corpus, output, epochs=1, extra=["--calibration_min_nontargets=300",
                                                                     "--valid_fraction=0.3"]), monkeypatch)
    log = (output / "log.txt").read_text()
    assert re.search(r"not calibrated: \d+ non-target pairs are too few for a calibration \(at least 300", log)
    assert re.search(r"no threshold: \d+ non-target pairs are too few for a threshold", log)
    card = json.loads((output / "spkver.json").read_text())
    assert card["threshold"] is None and "too few for a threshold" in card["calibration"]
    assert not (output / "calibration.json").exists()
    assert "calibrated" not in json.loads((output / "results.json").read_text())["stages"]


def test_finetuning_from_another_architecture_or_a_missing_folder_is_one_line(tiny_corpus, tmp_path, monkeypatch,
                                                                             capsys):
    source = tmp_path / "wide"
    _run_in_process(_arguments(tiny_corpus, source, "cosface", epochs=1, extra=["--channels=24"]), monkeypatch)
    line = _user_error_line(_arguments(tiny_corpus, tmp_path / "a", extra=[f"--init_from={source}"]), monkeypatch,
                            capsys)
    assert re.search(r"init_from: .*wide holds \{'architecture': 'ecapa_tdnn', 'channels': 24, "
                     r".*but this experiment builds \{'architecture': 'ecapa_tdnn', 'channels': 16", line)
    line = _user_error_line(_arguments(tiny_corpus, tmp_path / "b", extra=["--init_from=/no/such/model"]),
                            monkeypatch, capsys)
    assert re.search(r"init_from: /no/such/model is not a folder", line)


def test_spkver_sparsity_measures_the_one_hot_fraction_of_an_experiment(tiny_corpus, tmp_path, monkeypatch, capsys):
    from spkver.cli import main

    source = tmp_path / "cosface"
    _run_in_process(_arguments(tiny_corpus, source, "cosface", epochs=2), monkeypatch)
    capsys.readouterr()
    fractions = []
    for margin in ("0.0", "0.3"):
        assert main(["sparsity", "--model", str(source), "--alpha", "1.5", "--scale", "10", "--margin", margin,
                     "--examples", "16", "--crop-seconds", "1.0"]) == 0
        line = capsys.readouterr().out.strip()
        match = re.fullmatch(r"([\d.]+) % of 16 training examples are one-hot \(zero loss, zero gradient\) under "
                             rf"QMargin\(scale=10.0, margin={margin} .*\)", line)
        assert match, line
        fractions.append(float(match.group(1)))
    assert fractions[1] <= fractions[0]  # a larger margin leaves fewer examples with nothing to learn
    assert "(spkver experiment; the prototypes of its 7 speakers (matched by name))" in line
    assert main(["sparsity", "--model", str(tmp_path), "--alpha", "1.5", "--scale", "10"]) == 2
    assert "no prepared training manifests (train.csv): give --manifests" in capsys.readouterr().err
