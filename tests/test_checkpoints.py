"""Checkpoints survive a run killed while saving: only complete checkpoints are ever recovered."""
import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from speechbrain.utils.checkpoints import Checkpointer

from spkver.checkpoints import STAGED_METAFNAME, AtomicCheckpointer


def _models():
    torch.manual_seed(0)
    return {"embedding_model": torch.nn.Linear(3, 3), "classifier": torch.nn.Linear(3, 2)}


def _save_then_change(checkpointer, models, value):
    """Save the models holding ``value`` in every weight; return the checkpoint."""
    with torch.no_grad():
        for model in models.values():
            model.weight.fill_(value)
    checkpoint = checkpointer.save_checkpoint(end_of_epoch=False, meta={"value": value})
    time.sleep(1.05)  # SpeechBrain orders checkpoints by their time stamp
    return checkpoint


KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys, time, torch
    from spkver.checkpoints import AtomicCheckpointer
    models = {"embedding_model": torch.nn.Linear(3, 3), "classifier": torch.nn.Linear(3, 2)}
    checkpointer = AtomicCheckpointer(sys.argv[1], recoverables=models)
    for model in models.values():
        torch.nn.init.constant_(model.weight, 1.0)
    checkpointer.save_checkpoint(end_of_epoch=False)
    time.sleep(1.05)
    for model in models.values():
        torch.nn.init.constant_(model.weight, 2.0)
    def die(obj, path):  # the second recoverable's save: the process is killed half-way through the checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointer.custom_save_hooks["classifier"] = die
    checkpointer.save_checkpoint(end_of_epoch=False)
""")


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, caplog):
    process = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path)], capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2 and (folders[1] / "embedding_model.ckpt").exists()  # the killed save wrote a file
    assert not (folders[1] / "CKPT.yaml").exists() and (folders[1] / STAGED_METAFNAME).exists()

    models = _models()
    checkpointer = AtomicCheckpointer(tmp_path, recoverables=models)
    recovered = checkpointer.recover_if_possible()
    assert recovered.path == folders[0]
    assert all(torch.all(model.weight == 1.0) for model in models.values())

    with caplog.at_level(logging.WARNING, logger="spkver.checkpoints"):
        checkpointer.save_and_keep_only(end_of_epoch=False, num_to_keep=1)
    assert f"Removing {folders[1]}" in caplog.text  # the unfinished folder is cleaned up ...
    [saved] = tmp_path.iterdir()  # ... and only the new, complete checkpoint is left
    assert sorted(p.name for p in saved.iterdir()) == ["CKPT.yaml", "classifier.ckpt", "embedding_model.ckpt"]


def test_a_checkpoint_appears_only_after_its_last_parameter_file(tmp_path):
    models = _models()
    checkpointer = AtomicCheckpointer(tmp_path, recoverables=models)
    seen_while_saving = []
    checkpointer.custom_save_hooks["classifier"] = lambda obj, path: (
        seen_while_saving.append(checkpointer.list_checkpoints()), torch.save(obj.state_dict(), path))
    checkpointer.custom_load_hooks["classifier"] = lambda obj, path, end_of_epoch: obj.load_state_dict(torch.load(path))
    _save_then_change(checkpointer, models, 1.0)
    assert seen_while_saving == [[]]  # while the classifier was being saved, there was no checkpoint yet
    assert len(checkpointer.list_checkpoints()) == 1


def test_an_incomplete_stock_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    models = _models()
    stock = Checkpointer(tmp_path, recoverables=models)
    _save_then_change(stock, models, 1.0)
    broken = _save_then_change(stock, models, 2.0)
    (broken.path / "classifier.ckpt").unlink()  # as a stock save killed after writing CKPT.yaml leaves it
    with pytest.raises(KeyError):  # SpeechBrain 1.1 itself cannot resume from this folder
        Checkpointer(tmp_path, recoverables=_models()).recover_if_possible()

    with caplog.at_level(logging.WARNING, logger="spkver.checkpoints"):
        recovered = AtomicCheckpointer(tmp_path, recoverables=models).recover_if_possible()
    assert recovered.meta["value"] == 1.0 and all(torch.all(m.weight == 1.0) for m in models.values())
    assert broken.path.name in caplog.text and "classifier" in caplog.text


def test_checkpoints_written_by_the_stock_checkpointer_load_unchanged(tmp_path):
    models = _models()
    _save_then_change(Checkpointer(tmp_path, recoverables=models), models, 3.0)
    fresh = _models()
    assert AtomicCheckpointer(tmp_path, recoverables=fresh).recover_if_possible().meta["value"] == 3.0
    assert all(torch.all(m.weight == 3.0) for m in fresh.values())


def _batchnorm_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.train()
    for _ in range(seed + 1):  # different running statistics and batch counts per checkpoint
        model(torch.randn(8, 4) * (seed + 1))
    return model


def test_checkpoint_averaging_is_the_mean_of_weights_and_batchnorm_statistics(tmp_path):
    """The average of the last N checkpoints against one computed by hand; counts come from the last."""
    from spkver.checkpoints import AVERAGED_MODEL, average_last_checkpoints
    from spkver.cli import main

    states = []
    for seed in range(4):
        model = _batchnorm_model(seed)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        AtomicCheckpointer(tmp_path / "save", recoverables={"embedding_model": model}).save_checkpoint(
            end_of_epoch=True)
        time.sleep(0.02)
    averaged, used = average_last_checkpoints(tmp_path / "save", 3)
    assert len(used) == 3
    for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var", "1.weight"):
        expected = (states[1][key] + states[2][key] + states[3][key]) / 3
        torch.testing.assert_close(averaged[key], expected)
    assert averaged["1.num_batches_tracked"] == states[3]["1.num_batches_tracked"] == 4
    assert len(average_last_checkpoints(tmp_path / "save", 10)[1]) == 4  # all there are
    assert main(["average", "--model", str(tmp_path), "--last", "2"]) == 0
    written = torch.load(tmp_path / AVERAGED_MODEL)
    torch.testing.assert_close(written["0.weight"], (states[2]["0.weight"] + states[3]["0.weight"]) / 2)


def test_checkpoints_of_different_models_are_not_averaged(tmp_path):
    from spkver.checkpoints import average_last_checkpoints, average_state_dicts

    AtomicCheckpointer(tmp_path, recoverables={"embedding_model": torch.nn.Linear(4, 3)}).save_checkpoint()
    time.sleep(0.02)
    AtomicCheckpointer(tmp_path, recoverables={"embedding_model": torch.nn.Linear(4, 5)}).save_checkpoint()
    with pytest.raises(ValueError, match="CKPT.*different models"):
        average_last_checkpoints(tmp_path, 2)
    with pytest.raises(ValueError, match="no checkpoints"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="integer >= 1"):
        average_last_checkpoints(tmp_path, 0)
    with pytest.raises(ValueError, match="no checkpoint folder"):
        average_last_checkpoints(tmp_path / "missing", 2)


class _RunsCodeWhenLoaded:
    """A pickle whose loading would create ``marker``: what a hostile checkpoint file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_executed(tmp_path):
    from spkver.checkpoints import CheckpointError, load_weights

    marker = tmp_path / "executed"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCodeWhenLoaded(marker)}, tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match=r"hostile.ckpt: refused: not a plain checkpoint of tensors"):
        load_weights(tmp_path / "hostile.ckpt")
    assert not marker.exists()
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage.ckpt: not a readable checkpoint"):
        load_weights(tmp_path / "garbage.ckpt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.ckpt")
    assert torch.equal(load_weights(tmp_path / "plain.ckpt")["weight"], torch.ones(2))
