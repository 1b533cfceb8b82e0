"""Runs the recipe under torchrun with probes: ``python tests/ddp_probe.py RECORD_FOLDER recipe.py ARGS...``.

Each rank writes into RECORD_FOLDER the IDs of every training batch it ran
(``ids.rank{R}.epoch{E}``), its extractor and classifier after training
(``weights.rank{R}.pt``), the prototypes right after each A3M-I
re-initialisation (``reinit.rank{R}.epoch{E}.pt``), and a line per call of the
functions that write results and checkpoints (``writers.rank{R}``), and its process ID
(``pid.rank{R}``: torchrun starts each rank in a session of its own, which killing the launcher
does not reach).  Test
instrumentation only: the recipe runs unchanged.
"""
import os
import runpy
import sys

import torch

import spkver.evaluation
from spkver.brain import SpeakerBrain, _unwrapped
from spkver.checkpoints import AtomicCheckpointer

rank = os.environ.get("RANK", "0")
record = None  # set by main()


def _note(line):
    with open(os.path.join(record, f"writers.rank{rank}"), "a") as file:
        file.write(line + "\n")


def _wrap(owner, name, before=None, after=None):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapped)


def _record_batch(brain, batch):
    with open(os.path.join(record, f"ids.rank{rank}.epoch{brain.hparams.epoch_counter.current}"), "a") as file:
        file.write("".join(f"{i}\n" for i in batch.id))


def _record_weights(result, brain, *args, **kwargs):
    torch.save({"extractor": brain.extractor.state_dict(),
                "classifier": _unwrapped(brain.modules.classifier).state_dict()},
               os.path.join(record, f"weights.rank{rank}.pt"))


def _record_reinit(result, brain):
    torch.save(_unwrapped(brain.modules.classifier).weight.detach().clone(),
               os.path.join(record, f"reinit.rank{rank}.epoch{brain.hparams.epoch_counter.current}.pt"))


def main():
    global record
    record, recipe, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(os.path.join(record, f"pid.rank{rank}"), "w") as pid_file:  # torchrun gives each rank a session
        pid_file.write(str(os.getpid()))
    _wrap(SpeakerBrain, "fit_batch", before=_record_batch)
    _wrap(SpeakerBrain, "fit", after=_record_weights)
    _wrap(SpeakerBrain, "reinitialise_prototypes", after=_record_reinit)
    _wrap(spkver.evaluation, "write_results", before=lambda *a, **k: _note("write_results"))
    _wrap(AtomicCheckpointer, "_save_checkpoint_metafile", before=lambda *a, **k: _note("checkpoint"))
    sys.argv = [recipe, *arguments]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
