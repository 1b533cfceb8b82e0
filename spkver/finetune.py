"""Fine-tuning from a trained extractor, and the sparsity diagnostic that should come first.

The papers fine-tune a CosFace-trained extractor with Q-Margin (ResNet34: 10
more epochs, learning rate 1e-4 to 5e-5) and warn that a model whose training
examples are already mostly *one-hot* under the target alpha (their posterior
is exactly :math:`e_y`, so their loss and gradient are exactly zero: about
90 % after 150 CosFace epochs for ResNet34) has little left to learn from.

* :func:`initialise_from` copies an extractor (and, when the speaker set is the
  same, its prototypes) from an experiment folder or an exported pretrained
  folder into a new experiment's modules;
* :func:`one_hot_fraction` measures the fraction of training examples whose
  posterior under an objective is one-hot, with
  :meth:`~spkver.losses.CosineMarginObjective.one_hot_rows` (exact, no solve).

``spkver sparsity --model FOLDER --alpha A --scale S --margin M`` runs the
diagnostic on its own.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from spkver.errors import UserError

__all__ = ["FineTuningError", "initialise_from", "one_hot_fraction", "prototypes_of", "speakers_of",
           "ONE_HOT_WARNING"]

logger = logging.getLogger(__name__)

#: Above this fraction of one-hot training examples, fine-tuning starves for gradient.
ONE_HOT_WARNING = 0.8


class FineTuningError(UserError, ValueError):
    """A starting model that cannot be used: names the folder and what is wrong."""


def speakers_of(folder) -> Optional[dict]:
    """The speaker -> class index map an experiment folder trained on (``None`` for an exported folder)."""
    path = Path(folder) / "manifests" / "speakers.json"
    return json.loads(path.read_text()) if path.exists() else None


def prototypes_of(folder) -> Optional[torch.Tensor]:
    """The prototypes (C, D) of an experiment folder's latest complete checkpoint (``None`` if it has none)."""
    save = Path(folder) / "save"
    if not save.is_dir():
        return None
    from spkver.checkpoints import AtomicCheckpointer, load_weights

    checkpoint = AtomicCheckpointer(save).find_checkpoint(
        ckpt_predicate=lambda candidate: "classifier" in candidate.paramfiles)
    if checkpoint is None:
        return None
    return load_weights(checkpoint.paramfiles["classifier"])["weight"]


def initialise_from(folder, extractor, classifier, speakers: dict) -> str:
    """Copy the extractor of ``folder`` into ``extractor``, and its prototypes into ``classifier``
    when it trained on exactly ``speakers``; return the line that says which.

    ``folder`` is an experiment folder (the recipe's ``output_folder``) or one
    written by ``spkver export``; its architecture must be the new experiment's.
    """
    from spkver.inference import SpeakerEmbedder

    folder = Path(folder)
    try:
        source = SpeakerEmbedder.from_pretrained(folder).extractor
    except (FileNotFoundError, OSError, KeyError) as error:
        raise FineTuningError(f"init_from: {folder}: cannot load a trained extractor ({error})") from None
    if source.spec != extractor.spec:
        raise FineTuningError(f"init_from: {folder} holds {source.spec}, but this experiment builds {extractor.spec}")
    extractor.load_state_dict(source.state_dict())
    prototypes = prototypes_of(folder)
    if prototypes is not None and speakers_of(folder) == speakers and prototypes.shape == classifier.weight.shape:
        with torch.no_grad():
            classifier.weight.copy_(prototypes)
        return f"fine-tuning from {folder}: extractor and the prototypes of its {len(speakers)} speakers"
    reason = ("it holds no prototypes" if prototypes is None
              else "its speakers differ from this experiment's")
    return f"fine-tuning from {folder}: extractor only; prototypes freshly initialised ({reason})"


@torch.no_grad()
def one_hot_fraction(extractor, prototypes: torch.Tensor, objective, loader, device="cpu",
                     max_examples: Optional[int] = None) -> float:
    """Fraction of the examples of ``loader`` whose posterior under ``objective`` is exactly one-hot.

    ``loader`` yields SpeechBrain batches with ``sig`` and ``speaker_index``
    (the recipe's training set); the extractor runs in evaluation mode, and
    at most ``max_examples`` examples are read.
    """
    training = extractor.training
    extractor.eval()
    weight = F.normalize(prototypes.to(device), dim=1)
    one_hot, seen = 0, 0
    try:
        for batch in loader:
            batch = batch.to(device)
            waveforms, lengths = batch.sig
            targets = batch.speaker_index.data.reshape(-1)
            cosine = F.normalize(extractor(waveforms, lengths), dim=1) @ weight.T
            one_hot += int(objective.one_hot_rows(cosine, targets).sum())
            seen += targets.shape[0]
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        extractor.train(training)
    if seen == 0:
        raise FineTuningError("no training examples to measure the one-hot fraction on")
    return one_hot / seen
