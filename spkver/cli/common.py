"""What the command groups share: the error every command raises on bad arguments, and argument types."""
from __future__ import annotations

import argparse

from spkver.errors import UserError


class CommandError(UserError):
    """A command-line argument that cannot be used: printed without a traceback, exit status 2."""


def count_or_word(word: str, meaning, minimum: int):
    """An argument parser for a count >= ``minimum``, or ``word`` (returned as ``meaning``)."""
    def parse(text: str):
        if text == word:
            return meaning
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or '{word}', got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a count >= {minimum} or '{word}', got {value}")
        return value
    return parse


#: A positive count, or 'all' (``None``); a count >= 0, or 'auto'.
count_or_all = count_or_word("all", None, 1)
count_or_auto = count_or_word("auto", "auto", 0)


def rate(text: str) -> float:
    """An argument parser for a probability in (0, 1): a target prior, a false-acceptance rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value
