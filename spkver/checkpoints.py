r"""Checkpoints that exist only once they are complete.

SpeechBrain's ``Checkpointer`` writes a checkpoint's ``CKPT.yaml`` first and
its parameter files after it; a run killed in between (pre-emption, out of
memory, ``kill -9``) leaves a folder that *looks* like the newest checkpoint
but lacks some parameters, and the next run fails to resume from it
(SpeechBrain 1.1 raises ``KeyError`` on the missing recoverable).

:class:`AtomicCheckpointer` commits a checkpoint the way databases commit a
transaction: the meta file is written under a staging name
(``CKPT.yaml.partial``) and renamed to ``CKPT.yaml`` with one atomic
``os.replace`` after every parameter file has been written.  A folder without
``CKPT.yaml`` is not a checkpoint to SpeechBrain, so a resumed run recovers
the last *complete* checkpoint; unfinished folders are removed (with a
warning naming them) at the next save.  Checkpoints from the stock
``Checkpointer`` load unchanged; a stock checkpoint that lacks a parameter
file is skipped with a warning instead of failing the run.

Example:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> checkpointer = AtomicCheckpointer(folder, recoverables={"model": torch.nn.Linear(2, 2)})
    >>> checkpoint = checkpointer.save_checkpoint()
    >>> sorted(path.name for path in checkpoint.path.iterdir())
    ['CKPT.yaml', 'model.ckpt']
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import if_main_process

from spkver.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load_weights", "AtomicCheckpointer", "STAGED_METAFNAME", "AVERAGED_MODEL",
           "average_state_dicts", "average_last_checkpoints", "write_average"]

STAGED_METAFNAME = METAFNAME + ".partial"
#: The averaged extractor in an experiment folder: what is evaluated, exported and reused when present.
AVERAGED_MODEL = "embedding_model.averaged.ckpt"


class CheckpointError(UserError, ValueError):
    """Checkpoints that cannot be averaged or found: names the folder and the entry."""


def load_weights(path):
    """The contents of a checkpoint file (tensors in plain containers), read with torch's weights-only unpickler.

    A file that holds anything else (a pickled object, whose loading would run code from the file) is
    refused with a :class:`CheckpointError` naming it, and nothing in it is executed; so is a file that
    is not a checkpoint at all.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if found is None:  # the unpickler stopped on something that is not a pickle of objects
            raise CheckpointError(f"{path}: not a readable checkpoint (torch's weights-only unpickler could not "
                                  "read it)") from None
        raise CheckpointError(f"{path}: refused: not a plain checkpoint of tensors; loading it would call "
                              f"{found.group(1)} from the file") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from None


class AtomicCheckpointer(Checkpointer):
    """A SpeechBrain ``Checkpointer`` whose checkpoints appear atomically (see the module docstring).

    Takes the same arguments as ``speechbrain.utils.checkpoints.Checkpointer``.
    """

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006
        if if_main_process():
            self.remove_unfinished_checkpoints()
        checkpoint = super().save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity)
        staged = None if checkpoint is None else checkpoint.path / STAGED_METAFNAME
        if staged is not None and staged.exists():  # the main process: every parameter file is written, commit.
            os.replace(staged, checkpoint.path / METAFNAME)
        return checkpoint

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):  # noqa: B006
        # SpeechBrain (1.1) writes the meta file through this hook before the parameters: stage it
        # until they are written. (Should a release stop calling it, saving still works, without
        # the atomicity; tests/test_checkpoints.py would say so.)
        return super()._save_checkpoint_metafile(fpath.with_name(STAGED_METAFNAME), meta_to_include, end_of_epoch)

    def remove_unfinished_checkpoints(self):
        """Delete checkpoint folders whose save never finished (a staged meta file and no ``CKPT.yaml``)."""
        if not self.checkpoints_dir.is_dir():
            return
        for folder in sorted(self.checkpoints_dir.iterdir()):
            if (folder.is_dir() and folder.name.startswith(CKPT_PREFIX)
                    and (folder / STAGED_METAFNAME).exists() and not (folder / METAFNAME).exists()):
                logger.warning("Removing %s: its save did not finish (the run was stopped while saving)", folder)
                shutil.rmtree(folder)

    def find_checkpoint(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        # Stock checkpoints can be incomplete: never recover one that lacks a required parameter file.
        # (Only the choice is filtered: SpeechBrain's clean-up still sees and deletes such folders.)
        def complete_and_chosen(checkpoint):
            missing = self.missing_recoverables(checkpoint)
            if missing:
                logger.warning("Skipping checkpoint %s: no parameter file for %s", checkpoint.path, ", ".join(missing))
                return False
            return ckpt_predicate is None or ckpt_predicate(checkpoint)

        return super().find_checkpoint(importance_key=importance_key, max_key=max_key, min_key=min_key,
                                       ckpt_predicate=complete_and_chosen)

    def missing_recoverables(self, checkpoint):
        """Names of the registered, non-optional recoverables that ``checkpoint`` has no ``.ckpt`` file for."""
        if self.allow_partial_load:
            return []
        return [name for name in self.recoverables
                if name not in checkpoint.paramfiles and not self.optional_recoverables.get(name, False)]


def average_state_dicts(states: Sequence[Dict[str, torch.Tensor]], names: Sequence[str] = ()
                        ) -> Dict[str, torch.Tensor]:
    """The element-wise mean of floating-point entries (weights and BatchNorm statistics, in float64).

    Integer entries (BatchNorm's ``num_batches_tracked``) are the last state's. Every state must have
    the same keys and shapes; a mismatch names the entry and the state (``names``, else its index).

    >>> average_state_dicts([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}])["w"]
    tensor([2., 4.])
    """
    if not states:
        raise CheckpointError("no checkpoints to average")
    names = list(names) or [f"state {i}" for i in range(len(states))]
    reference = states[-1]
    averaged = {}
    for key, last in reference.items():
        for name, state in zip(names, states):
            if key not in state or state[key].shape != last.shape:
                found = "no such entry" if key not in state else f"shape {tuple(state[key].shape)}"
                raise CheckpointError(f"{name}: cannot average {key!r} ({found}; the last has {tuple(last.shape)}): "
                                 "the checkpoints are of different models")
        if last.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(last.dtype)
        else:
            averaged[key] = last.clone()
    for name, state in zip(names, states):
        extra = sorted(set(state) - set(reference))
        if extra:
            raise CheckpointError(f"{name}: entries {extra[:3]} are not in the last checkpoint: different models")
    return averaged


def average_last_checkpoints(save_folder, last: int, recoverable: str = "embedding_model"
                             ) -> Tuple[Dict[str, torch.Tensor], List[Path]]:
    """Average ``recoverable`` over the ``last`` most recent complete checkpoints under ``save_folder``.

    Returns the averaged state and the checkpoint folders used, oldest first (fewer than ``last``
    when fewer exist).
    """
    if not isinstance(last, int) or last < 1:
        raise CheckpointError(f"the number of checkpoints to average must be an integer >= 1, got {last!r}")
    folder = Path(save_folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no checkpoint folder")
    checkpointer = AtomicCheckpointer(folder)
    checkpoints = [c for c in checkpointer.list_checkpoints() if recoverable in c.paramfiles]
    if not checkpoints:
        raise CheckpointError(f"{folder}: no complete checkpoint holds {recoverable!r}")
    chosen = sorted(checkpoints, key=lambda c: c.meta["unixtime"])[-last:]
    states = [load_weights(c.paramfiles[recoverable]) for c in chosen]
    return average_state_dicts(states, [str(c.path) for c in chosen]), [c.path for c in chosen]


def write_average(folder, last: int) -> Tuple[Dict[str, torch.Tensor], List[Path]]:
    """Average the experiment ``folder``'s last ``last`` checkpoints (under ``save/``) into
    ``embedding_model.averaged.ckpt`` beside them: what ``SpeakerEmbedder`` then loads. Returns the averaged
    state and the checkpoint folders used (see :func:`average_last_checkpoints`)."""
    state, used = average_last_checkpoints(Path(folder) / "save", last)
    torch.save(state, Path(folder) / AVERAGED_MODEL)
    return state, used
