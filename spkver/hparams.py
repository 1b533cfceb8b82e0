"""Composing HyperPyYAML hparams from shared pieces, without copying them.

An experiment file names its pieces in an ``include:`` list; the pieces and
the file's own keys form one YAML document, so every key is top level
(overridable from the command line, SpeechBrain's convention) and ``!ref``
works across pieces.  A key the file itself defines replaces the piece's
(that is how a small demo changes a shared schedule); a key defined in two
pieces is an error, never a silent override.  Paths are relative to the
experiment file.

.. code-block:: yaml

    # hparams/ecapa512_qmargin.yaml
    include: [recipe.yaml, models/ecapa512.yaml, objectives/qmargin.yaml]
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Tuple

__all__ = ["HparamsError", "compose", "load"]

_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", re.MULTILINE)
_INCLUDE = re.compile(r"^include:\s*\[([^\]]*)\]\s*$", re.MULTILINE)


class HparamsError(ValueError):
    """A malformed experiment file: names the file and the key."""


def compose(path) -> str:
    """The experiment's single YAML document (pieces first, then the file's own keys)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise HparamsError(f"{path}: cannot read hparams ({error.strerror})") from None
    match = _INCLUDE.search(text)
    if match is None:
        return text
    pieces = [piece.strip().strip("'\"") for piece in match.group(1).split(",") if piece.strip()]
    own = text[:match.start()] + text[match.end():]
    own_keys = set(_TOP_LEVEL_KEY.findall(own))
    parts, owners = [], {}
    for piece in pieces:
        piece_path = path.parent / piece
        if not piece_path.exists():
            raise HparamsError(f"{path}: included file {piece} does not exist")
        part = _drop_keys(compose(piece_path), own_keys)
        for key in _TOP_LEVEL_KEY.findall(part):
            if key in owners:
                raise HparamsError(f"{path}: key '{key}' is defined in both {owners[key]} and {piece}")
            owners[key] = piece
        parts.append((piece, part))
    parts.append((path.name, own))
    return "\n".join(f"# ---- {name}\n{part.strip()}\n" for name, part in parts)


def _drop_keys(text: str, keys) -> str:
    """Remove the blocks (a top-level key and its indented lines) of ``keys``."""
    kept, dropping = [], False
    for line in text.splitlines():
        match = _TOP_LEVEL_KEY.match(line)
        if match:
            dropping = match.group(1) in keys
        elif line and not line[0].isspace() and not line.startswith("#"):
            dropping = False
        if not dropping:
            kept.append(line)
    return "\n".join(kept)


def load(path, overrides=None) -> Tuple[dict, str]:
    """Compose and load the experiment file; return the hparams and the composed text."""
    from hyperpyyaml import load_hyperpyyaml

    text = compose(path)
    return load_hyperpyyaml(text, overrides or {}), text
