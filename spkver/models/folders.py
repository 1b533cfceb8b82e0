"""What a model folder holds once read (:class:`StartingModel`), and the strict loading every reader uses.

The readers: :func:`spkver.models.layouts.read_spkver_folder` (spkver's experiment and exported
folders), :func:`spkver.models.speechbrain.read_hub_folder` and
:func:`spkver.models.wespeaker.read_wespeaker_folder`; :func:`spkver.models.load_model` recognises a
folder's layout and calls its reader. Every checkpoint goes through
:func:`spkver.checkpoints.load_weights` (torch's weights-only unpickler).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from spkver.errors import UserError
from spkver.models.extractors import EmbeddingExtractor

__all__ = ["ModelFolderError", "StartingModel", "load_strictly"]


class ModelFolderError(UserError, FileNotFoundError):
    """A model folder lacks what it must hold, or holds what spkver cannot read: the message names it."""


@dataclass
class StartingModel:
    """A model folder, read.

    ``classes`` names the rows of ``prototypes`` when the folder says (a SpeechBrain label encoder,
    spkver's ``speakers.json``); WeSpeaker folders carry prototypes (``projection.weight``) without names.
    ``mean``: the embedding mean subtracted before scoring (spkver's training mean, a SpeechBrain hub
    folder's ``mean_var_norm_emb``). ``card`` is spkver.json's content for spkver's folders, else empty.
    """

    extractor: EmbeddingExtractor
    layout: str
    folder: Path
    prototypes: Optional[torch.Tensor] = None
    classes: Optional[List[str]] = None
    mean: Optional[np.ndarray] = None
    card: dict = field(default_factory=dict)


def load_strictly(module: torch.nn.Module, weights: dict, path, ignored_prefixes=()) -> None:
    """``module.load_state_dict(weights, strict=True)`` after dropping ``ignored_prefixes``; a mismatch is one
    :class:`ModelFolderError` naming the file and the first differing keys, never a half-loaded model."""
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ModelFolderError(f"{path}: not a state dict of tensors")
    kept = {key: value for key, value in weights.items() if not key.startswith(tuple(ignored_prefixes))}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    wrong_shape = sorted(key for key in set(kept) & set(expected) if kept[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("keys of another shape", wrong_shape)) if names]
        raise ModelFolderError(f"{path}: does not fit {module.__class__.__name__}: {'; '.join(parts)}")
    module.load_state_dict(kept, strict=True)
