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

import difflib
import re
from pathlib import Path
from typing import List, Tuple

from spkver.errors import UserError

__all__ = ["HparamsError", "compose", "load", "path_list"]

_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", re.MULTILINE)
_INCLUDE = re.compile(r"^include:\s*\[([^\]]*)\]\s*$", re.MULTILINE)


class HparamsError(UserError, ValueError):
    """A malformed experiment file: names the file and the key."""


def compose(path) -> str:
    """The experiment's single YAML document (pieces first, then the file's own keys)."""
    path = Path(path)
    if not path.is_file() and path.parent.is_dir():
        raise HparamsError(f"{path}: no such hparams file{_suggestion(path.name, _yaml_names(path.parent))}")
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
            options = _yaml_names(piece_path.parent) if piece_path.parent.is_dir() else []
            raise HparamsError(f"{path}: included file {piece} does not exist{_suggestion(Path(piece).name, options)}")
        part = _drop_keys(compose(piece_path), own_keys)
        for key in _TOP_LEVEL_KEY.findall(part):
            if key in owners:
                raise HparamsError(f"{path}: key '{key}' is defined in both {owners[key]} and {piece}")
            owners[key] = piece
        parts.append((piece, part))
    parts.append((path.name, own))
    return "\n".join(f"# ---- {name}\n{part.strip()}\n" for name, part in parts)


def _yaml_names(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.glob("*.yaml"))


def _suggestion(name: str, options) -> str:
    """``" (did you mean X?)"`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


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
    """Compose and load the experiment file; return the hparams and the composed text.

    ``overrides`` is a dict or SpeechBrain's YAML string of command-line
    overrides; a key the experiment does not define (a misspelt ``--key``) is
    an :class:`HparamsError` naming it and the closest key, never a silently
    unused setting. A value an object refuses while the file is loaded (a
    ``ValueError``, such as a schedule of zero epochs) is an :class:`HparamsError`
    naming the file too.
    """
    from hyperpyyaml import load_hyperpyyaml

    text = compose(path)
    overrides = overrides or {}
    given = list(overrides) if isinstance(overrides, dict) else _TOP_LEVEL_KEY.findall(overrides)
    known = set(_TOP_LEVEL_KEY.findall(text))
    for key in given:
        if given.count(key) > 1:
            raise HparamsError(f"--{key} is given {given.count(key)} times on the command line; give it once")
        if key not in known:
            raise HparamsError(f"--{key}: {path} has no such key{_suggestion(key, sorted(known))}")
    try:
        return load_hyperpyyaml(text, overrides), text
    except ValueError as error:
        raise HparamsError(f"{path}: {error}") from None


def path_list(value, key: str) -> List[str]:
    """A list of paths from an hparam that holds one path or a list of them.

    ``--trial_lists=a.txt`` on the command line arrives as a string, which
    iterated character by character would name the files ``a``, ``.``, ...

    >>> path_list("lists/veri_test2.txt", "trial_lists")
    ['lists/veri_test2.txt']
    >>> path_list(["a.txt", "b.txt"], "trial_lists")
    ['a.txt', 'b.txt']
    """
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(item, (str, Path)) for item in value):
        return [str(item) for item in value]
    raise HparamsError(f"{key}: expected a path or a list of paths like [a.txt,b.txt], got {value!r}")
