"""Specification of data-parallel training: the shard sampler, the backend choice, and the recipe under torchrun.

The launched tests (``-m slow``, a step of their own in ``.ci/run``) run the
recipe with two gloo ranks on the CPU through ``tests/ddp_probe.py``, which
records what each rank trained on and holds.
"""
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spkver.distributed import ShardedBatchSampler, choose_backend, sync_batchnorm_supported

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "voxceleb" / "train.py"
PROBE = ROOT / "tests" / "ddp_probe.py"


@pytest.mark.parametrize("items, batch, world", [(27, 8, 2), (21, 4, 2), (100, 7, 3), (16, 4, 4), (9, 2, 4),
                                                 (1001, 32, 2), (5, 5, 2)])
def test_every_item_goes_to_one_rank_each_epoch_in_equal_numbers_of_batches(items, batch, world):
    for epoch in (1, 2):
        shards = []
        for rank in range(world):
            sampler = ShardedBatchSampler(items, batch, world, rank, seed=3)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert all(len(b) >= 2 for b in batches)  # BatchNorm's minimum in training
            assert all(len(b) <= batch + 2 for b in batches)
            shards.append(batches)
        assert len({len(batches) for batches in shards}) == 1  # DDP's all-reduce needs as many steps
        seen = [i for batches in shards for b in batches for i in b]
        assert sorted(seen) == list(range(items))  # no overlap, nothing dropped


def test_the_order_is_the_same_on_every_rank_and_changes_with_the_epoch():
    def order(epoch, rank):
        sampler = ShardedBatchSampler(50, 5, 2, rank, seed=0)
        sampler.set_epoch(epoch)
        return [i for b in sampler for i in b]

    assert order(1, 0) == order(1, 0) and order(1, 0) != order(2, 0)
    assert not set(order(1, 0)) & set(order(1, 1))


@pytest.mark.parametrize("arguments, message", [((3, 1, 2, 0), "batch_size must be >= 2"),
                                                ((10, 4, 2, 2), r"rank must lie in \[0, 1\]"),
                                                ((3, 4, 2, 0), "3 training items cannot give each of 2 ranks")])
def test_a_sampler_that_cannot_shard_says_why(arguments, message):
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(*arguments)


def test_a_cpu_launch_takes_gloo_unless_a_backend_is_named():
    import speechbrain as sb
    from speechbrain.utils.run_opts import RunOptions

    options, note = choose_backend(RunOptions(), cuda_available=False)
    assert options.distributed_backend == "gloo" and options.device == "cpu" and "gloo" in note
    assert {"distributed_backend", "device"} <= options.overridden_args  # what SpeechBrain's Brain reads
    named = sb.parse_arguments(["hparams.yaml", "--distributed_backend=nccl"])[1]  # as the recipe parses
    options, note = choose_backend(named, cuda_available=False)
    assert options.distributed_backend == "nccl" and note is None
    assert choose_backend(RunOptions(), cuda_available=True)[1] is None
    assert sync_batchnorm_supported("nccl", "cuda:1") and not sync_batchnorm_supported("gloo", "cpu")
    assert not sync_batchnorm_supported("nccl", "cpu")


# ---------------------------------------------------------------------------------------------------
# The recipe under torchrun: two gloo ranks on the CPU.

def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(corpus, output, record, objective, epochs, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
            str(PROBE), str(record), str(RECIPE), str(ROOT / "hparams" / f"ecapa512_{objective}.yaml"),
            f"--data_folder={corpus}", f"--trial_lists=[{corpus}/trials.txt]", f"--output_folder={output}",
            f"--number_of_epochs={epochs}", "--channels=16", "--embedding_dim=16", "--batch_size=4",
            "--num_workers=0", "--lr_warmup_epochs=1", "--margin_warmup_epochs=1", "--margin_warmup_start=0",
            "--crop_seconds=1.0", "--mean_utterances=10", "--peak_lr=0.05", "--speed_perturb=null",
            "--valid_fraction=0.25", "--calibration_min_nontargets=10", *extra]  # a tiny corpus: few pairs


def _environment():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _launch(command, timeout=400):
    completed = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def _kill(launcher, record):
    ranks = [int(path.read_text()) for path in record.glob("pid.rank*")]
    for pid in [launcher.pid, *ranks]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    for pid in ranks:  # gone before the next run writes into the same folder
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.05)


def _state(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def _weights(record, rank):
    return torch.load(record / f"weights.rank{rank}.pt")


def _train_ids(output):
    return sorted(row["ID"] for row in csv.DictReader(open(output / "manifests" / "train.csv")))


@pytest.mark.slow
def test_two_ranks_train_one_model_on_disjoint_shards_and_rank_zero_writes(tiny_corpus, tmp_path):
    """A3M-I fires after epoch 1 (forced), on the dense head."""
    output, record = tmp_path / "exp", tmp_path / "record"
    record.mkdir()
    completed = _launch(_command(tiny_corpus, output, record, "a3m_i", 2, ["--reinit_epochs=[1]"]))
    log = (output / "log.txt").read_text()
    assert "BatchNorm per rank (SyncBatchNorm needs CUDA and NCCL)" in log
    assert "DDP over gloo on the CPU" in log
    # One model: every extractor and prototype entry equal on the two ranks.
    first, second = _weights(record, 0), _weights(record, 1)
    for part in ("extractor", "classifier"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), f"{part}.{key} differs between the ranks"
    # A3M-I's class means were reduced over the ranks: the same prototypes on both, right after it fired.
    reinit = [torch.load(record / f"reinit.rank{rank}.epoch1.pt") for rank in (0, 1)]
    assert torch.equal(reinit[0], reinit[1])
    assert "A3M-I: epoch 1" in log
    # Each epoch's items split between the ranks: none twice, none left out.
    for epoch in (1, 2):
        shards = [(record / f"ids.rank{rank}.epoch{epoch}").read_text().split() for rank in (0, 1)]
        assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == _train_ids(output)
    # Rank 0 alone wrote the checkpoints and the results: one set of each.
    assert not (record / "writers.rank1").exists()
    writes = (record / "writers.rank0").read_text().split()
    assert writes.count("write_results") == 1 and writes.count("checkpoint") == 2
    assert len(list((output / "save").glob("CKPT+*/CKPT.yaml"))) == 2
    assert len(list(output.rglob("results.json"))) == 1 and (output / "calibration.json").exists()
    assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_a_killed_run_with_sharded_streaming_prototypes_resumes_under_torchrun(tiny_corpus, tmp_path):
    """``--head=streaming``: each rank holds half the classes; checkpoints hold them all."""
    output, record = tmp_path / "exp", tmp_path / "record"
    record.mkdir()
    command = _command(tiny_corpus, output, record, "qmargin", 3, ["--head=streaming"])
    process = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:  # kill the launcher and both ranks once epoch 1's checkpoint is complete
        while time.time() < deadline and process.poll() is None:
            if list((output / "save").glob("CKPT+*/CKPT.yaml")):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be killed"
    finally:  # the launcher and both ranks, as a pre-empted machine loses them
        _kill(process, record)
    assert not (output / "results.json").exists()
    (checkpoint,) = [path.parent for path in (output / "save").glob("CKPT+*/CKPT.yaml")]
    full = torch.load(checkpoint / "classifier.ckpt")["weight"]
    assert full.shape == (7, 16)  # the 7 training speakers, gathered from both ranks

    for probe in [*record.glob("ids.*"), *record.glob("pid.*")]:  # of the killed run
        probe.unlink()
    _launch(command)
    assert len(re.findall(r"train loss: ", (output / "train_log.txt").read_text())) == 3
    assert (output / "results.json").exists()
    first, second = _weights(record, 0), _weights(record, 1)
    for key in first["extractor"]:
        assert torch.equal(first["extractor"][key], second["extractor"][key])
    # The ranks' shards (4 and 3 classes) are the rows of the last checkpoint's whole matrix.
    shards = [first["classifier"]["weight"], second["classifier"]["weight"]]
    assert [shard.shape[0] for shard in shards] == [4, 3]
    last = sorted((output / "save").glob("CKPT+*/classifier.ckpt"))[-1]
    assert torch.equal(torch.cat(shards), torch.load(last)["weight"])
    # The resumed epochs still split the items exactly.
    for epoch in (2, 3):
        shards = [(record / f"ids.rank{rank}.epoch{epoch}").read_text().split() for rank in (0, 1)]
        assert sorted(shards[0] + shards[1]) == _train_ids(output)
