"""Smoke tests of the training recipe: every objective trains, checkpoints and resumes."""
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "voxceleb" / "train.py"
OBJECTIVES = ["softmax", "cosface", "arcface", "alphadiv", "qmargin", "a3m", "a3m_i"]


def _arguments(corpus, output, objective="qmargin", epochs=3, batch_size=8, extra=()):
    return [str(ROOT / "hparams" / f"ecapa512_{objective}.yaml"), f"--data_folder={corpus}",
            f"--trial_lists=[{corpus}/trials.txt]", f"--output_folder={output}", f"--number_of_epochs={epochs}",
            "--channels=16", "--embedding_dim=16", f"--batch_size={batch_size}", "--num_workers=0",
            "--lr_warmup_epochs=1", "--margin_warmup_epochs=1", "--margin_warmup_start=0", "--crop_seconds=1.0",
            "--mean_utterances=10", "--peak_lr=0.05", *extra]


def _train_losses(output):
    return [float(x) for x in re.findall(r"train loss: ([0-9.e+-]+)", (Path(output) / "train_log.txt").read_text())]


def _run_in_process(arguments, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *arguments])
    runpy.run_path(str(RECIPE), run_name="__main__")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_recipe_trains_checkpoints_and_scores_with_every_objective(objective, tiny_corpus, tmp_path, monkeypatch):
    output = tmp_path / objective
    _run_in_process(_arguments(tiny_corpus, output, objective), monkeypatch)
    losses = _train_losses(output)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert list((output / "save").glob("CKPT+*"))
    results = json.loads((output / "results.json").read_text())
    row = results["after training"][0]
    assert row["name"] == "trials.txt" and 0.0 <= row["eer"] <= 1.0
    assert "| trials.txt |" in (output / "results.md").read_text()
    # Resuming with a longer schedule continues from the checkpoint instead of starting over.
    _run_in_process(_arguments(tiny_corpus, output, objective, epochs=4), monkeypatch)
    assert len(_train_losses(output)) == 4


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
    assert 0.0 <= results["after training"][0]["eer"] <= 1.0
    _run_in_process(_arguments(tiny_corpus, output, objective, epochs=4, extra=streaming), monkeypatch)
    assert len(_train_losses(output)) == 4


def test_an_unknown_head_or_a_dense_objective_on_the_streaming_head_is_a_clear_error(tiny_corpus, tmp_path,
                                                                                    monkeypatch):
    with pytest.raises(ValueError, match=r"ecapa512_qmargin.yaml: head must be 'dense' or 'streaming', got 'sparse'"):
        _run_in_process(_arguments(tiny_corpus, tmp_path / "a", extra=["--head=sparse"]), monkeypatch)
    with pytest.raises(ValueError, match=r"the sparse head needs alpha > 1 .* ArcFace with alpha=1.0"):
        _run_in_process(_arguments(tiny_corpus, tmp_path / "b", "arcface", extra=["--head=streaming"]), monkeypatch)


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
