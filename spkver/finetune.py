"""Fine-tuning from a trained extractor, and the sparsity diagnostic that should come first.

The papers fine-tune a CosFace-trained extractor with Q-Margin (ResNet34: 10
more epochs, learning rate 1e-4 to 5e-5) and warn that a model whose training
examples are already mostly *one-hot* under the target alpha (their posterior
is exactly :math:`e_y`, so their loss and gradient are exactly zero: about
90 % after 150 CosFace epochs for ResNet34) has little left to learn from.

* :func:`initialise_from` copies the extractor of any model folder spkver reads
  (:func:`spkver.models.load_model`: a spkver experiment or export, a SpeechBrain
  hub folder, a WeSpeaker folder) into a new experiment's extractor, and starts
  the prototypes (``init_prototypes``): from the starting model's own when it
  trained on the same speakers, else at the normalised class means of the
  training speakers' embeddings under the starting model (one pass over a
  sample), so that the first steps do not wreck the extractor with the
  gradients of random prototypes;
* :func:`one_hot_fraction` measures the fraction of training examples whose
  posterior under an objective is one-hot, with
  :meth:`~spkver.losses.CosineMarginObjective.one_hot_rows` (exact, no solve);
  :func:`zero_loss_lead` says whether Q-Margin's zero-loss lead is reachable at all.

``spkver sparsity --model FOLDER --alpha A --scale S --margin M`` runs the
diagnostic on its own.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from spkver.errors import UserError

__all__ = ["FineTuningError", "initialise_from", "start_prototypes", "one_hot_fraction", "speakers_of",
           "class_mean_prototypes",
           "zero_loss_lead", "ONE_HOT_WARNING", "PROTOTYPE_STARTS"]

logger = logging.getLogger(__name__)

#: Above this fraction of one-hot training examples, fine-tuning starves for gradient.
ONE_HOT_WARNING = 0.8
#: ``init_prototypes``: where a fine-tuning run's prototypes start.
PROTOTYPE_STARTS = ("auto", "starting_model", "class_means", "random")


class FineTuningError(UserError, ValueError):
    """A starting model that cannot be used: names the folder and what is wrong."""


def speakers_of(folder) -> Optional[dict]:
    """The speaker -> class index map an experiment folder trained on (``None`` for an exported folder)."""
    path = Path(folder) / "manifests" / "speakers.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rows_by_name(prototypes: torch.Tensor, classes: List[str], speakers: dict, rows: int) -> Optional[torch.Tensor]:
    """The starting model's prototypes re-ordered to this experiment's classes (speakers x speeds), matched by
    speaker name; ``None`` unless every training speaker is among the starting model's classes."""
    old_speeds, new_speeds = prototypes.shape[0] // len(classes), rows // len(speakers)
    if prototypes.shape[0] != old_speeds * len(classes) or rows != new_speeds * len(speakers):
        return None
    position = {name: index for index, name in enumerate(classes)}
    if any(name not in position for name in speakers):
        return None
    order = [position[name] + min(speed, old_speeds - 1) * len(classes)
             for speed in range(new_speeds) for name in sorted(speakers, key=speakers.get)]
    return prototypes[order]


def embedded_examples(extractor, loader, device="cpu", max_examples: Optional[int] = None):
    """``(embeddings, speaker indices)`` of each batch of ``loader`` (SpeechBrain batches with ``sig`` and
    ``speaker_index``) until ``max_examples`` examples are read, the extractor in evaluation mode meanwhile.

    Run it under ``torch.no_grad()``; the extractor's mode is restored when the iteration ends.
    """
    training = extractor.training
    extractor.eval()
    seen = 0
    try:
        for batch in loader:
            batch = batch.to(device)
            waveforms, lengths = batch.sig
            yield extractor(waveforms, lengths), batch.speaker_index.data.reshape(-1)
            seen += waveforms.shape[0]
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        extractor.train(training)


@torch.no_grad()
def class_mean_prototypes(extractor, loader, num_classes: int, device="cpu",
                          max_examples: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Normalised class means of the extractor's embeddings over (a sample of) ``loader``; and how many classes
    were seen (an unseen class's row is zero: the caller keeps its own start for it)."""
    from spkver.losses.reinit import ClassMeanAccumulator

    accumulator = ClassMeanAccumulator(num_classes, extractor.embedding_dim, device=device)
    for embeddings, targets in embedded_examples(extractor, loader, device, max_examples):
        accumulator.update(embeddings, targets)
    covered = int((accumulator.counts > 0).sum())
    return accumulator.prototypes(fallback=torch.zeros(num_classes, extractor.embedding_dim, device=device)), covered


def initialise_from(folder, extractor, classifier, speakers: dict, init_prototypes: str = "auto",
                    loader=None, device="cpu", max_examples: Optional[int] = 4000) -> str:
    """Start a fine-tuning run from ``folder``: copy its extractor into ``extractor``, start the prototypes
    (:func:`start_prototypes`); return the line that says what was done.

    ``folder``: any model folder spkver reads; its architecture must be the experiment's (the
    fine-tuning hparams in ``hparams/finetune/`` build the experiment's extractor from it).
    """
    from spkver.models import load_model

    folder = Path(folder)
    start = load_model(folder)
    if start.extractor.spec != extractor.spec:
        raise FineTuningError(f"init_from: {folder} holds {start.extractor.spec}, but this experiment builds "
                              f"{extractor.spec} (the hparams in hparams/finetune/ build it from init_from)")
    extractor.load_state_dict(start.extractor.state_dict())
    how = start_prototypes(start, extractor, classifier, speakers, init_prototypes, loader, device, max_examples)
    return f"fine-tuning from {folder} ({start.layout}): extractor; {how}"


def start_prototypes(start, extractor, classifier, speakers: dict, init_prototypes: str = "auto", loader=None,
                     device="cpu", max_examples: Optional[int] = 4000) -> str:
    """Set ``classifier.weight`` (speakers x speeds rows) for a run from the starting model ``start``; say how.

    ``init_prototypes``: ``starting_model`` -- the starting model's own, matched by speaker name, or row
    for row when it names no classes (WeSpeaker's ``projection.weight``) and the shapes agree;
    ``class_means`` -- the normalised class means under ``extractor`` over at most ``max_examples``
    training crops of ``loader``; ``random`` -- the classifier's own start; ``auto`` -- the starting
    model's when it names every training speaker, else class means.
    """
    if init_prototypes not in PROTOTYPE_STARTS:
        raise FineTuningError(f"init_prototypes must be one of {PROTOTYPE_STARTS}, got {init_prototypes!r}")
    rows = classifier.weight.shape[0]
    named = None
    if start.prototypes is not None and start.classes:
        named = _rows_by_name(start.prototypes, start.classes, speakers, rows)
    if init_prototypes in ("auto", "starting_model") and named is not None:
        with torch.no_grad():
            classifier.weight.copy_(named.to(classifier.weight))
        return f"the prototypes of its {len(speakers)} speakers (matched by name)"
    if init_prototypes == "starting_model":
        if start.prototypes is None or start.classes or tuple(start.prototypes.shape) != tuple(classifier.weight.shape):
            found = "none" if start.prototypes is None else tuple(start.prototypes.shape)
            other = " for other speakers" if start.classes else ""
            raise FineTuningError(f"init_prototypes: starting_model: {start.folder} holds prototypes {found}{other}; "
                                  f"this experiment has {tuple(classifier.weight.shape)}")
        with torch.no_grad():
            classifier.weight.copy_(start.prototypes.to(classifier.weight))
        return f"its prototypes row for row ({rows} classes; the folder names none)"
    if init_prototypes == "random" or loader is None:
        return "prototypes freshly initialised (random)"
    means, covered = class_mean_prototypes(extractor, loader, rows, device, max_examples)
    with torch.no_grad():
        seen = means.norm(dim=1) > 0
        classifier.weight[seen] = means[seen].to(classifier.weight)
    reason = "its speakers differ from this experiment's" if start.classes else "it names no speakers"
    return (f"prototypes start at the normalised class-mean embeddings under the starting model ({covered} of "
            f"{rows} classes seen in at most {max_examples} training crops; the rest random), as {reason}")


def zero_loss_lead(objective) -> Optional[Tuple[float, str]]:
    """For Q-Margin: the cosine lead at which a training example's loss becomes 0, and whether it is reachable.

    Cosines lie in [-1, 1], so a lead above 2 is never reached (every example keeps a loss and a
    gradient), and one above 1 only against prototypes at negative cosines; ``None`` for other
    objectives.
    """
    from spkver.losses import QMargin
    from spkver.losses.objectives import qmargin_zero_loss_gap

    if not isinstance(objective, QMargin):
        return None
    lead = qmargin_zero_loss_gap(objective.scale, objective.base_margin, objective.alpha, objective.form)
    setting = f"Q-Margin (s = {objective.scale:g}, alpha = {objective.alpha:g}, m = {objective.base_margin:g})"
    if math.isinf(lead) or lead > 2.0:
        return lead, (f"{setting}: the zero-loss cosine lead is {lead:.2f}, beyond any embedding (cosines lie in "
                      "[-1, 1]): no example ever reaches zero loss, every one keeps a gradient")
    if lead > 1.0:
        return lead, (f"{setting}: the zero-loss cosine lead is {lead:.2f}: reachable only against prototypes at "
                      "negative cosines")
    return lead, f"{setting}: the zero-loss cosine lead is {lead:.2f}: reachable"


@torch.no_grad()
def one_hot_fraction(extractor, prototypes: torch.Tensor, objective, loader, device="cpu",
                     max_examples: Optional[int] = None) -> float:
    """Fraction of the examples of ``loader`` whose posterior under ``objective`` is exactly one-hot.

    ``loader`` yields SpeechBrain batches with ``sig`` and ``speaker_index``
    (the recipe's training set); the extractor runs in evaluation mode, and
    at most ``max_examples`` examples are read.
    """
    weight = F.normalize(prototypes.to(device), dim=1)
    one_hot, seen = 0, 0
    for embeddings, targets in embedded_examples(extractor, loader, device, max_examples):
        cosine = F.normalize(embeddings, dim=1) @ weight.T
        one_hot += int(objective.one_hot_rows(cosine, targets).sum())
        seen += targets.shape[0]
    if seen == 0:
        raise FineTuningError("no training examples to measure the one-hot fraction on")
    return one_hot / seen
