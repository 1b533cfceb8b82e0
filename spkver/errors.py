"""The one base of every error that names the user's input.

An error of this kind says what was wrong with a file, a line, an argument or
a value the user gave, and how to put it right; the ``spkver`` command line
and the recipe print it as one line and exit with status 2.  Anything else
(a bug, an out-of-memory error, a failed kernel) is not a :class:`UserError`
and propagates with its traceback (exit status 1), so that it can be
reported and fixed rather than mistaken for bad input.

Each module's own error class derives from :class:`UserError` and from the
built-in a Python caller would expect to catch (``ValueError`` for a bad
value, ``OSError`` for a file that cannot be read, ``ImportError`` for a
missing package), so ``except ValueError`` keeps working.

>>> class TrialListError(UserError, ValueError):
...     pass
>>> issubclass(TrialListError, ValueError) and issubclass(TrialListError, UserError)
True
"""

__all__ = ["UserError", "format_user_error"]


class UserError(Exception):
    """An error in the user's input, with a message that names it: one line, exit status 2."""


def format_user_error(program: str, error: UserError) -> str:
    """The one line a command prints for ``error``: ``program: error: message``.

    >>> format_user_error("spkver score", UserError("trials.txt, line 3: expected 3 fields"))
    'spkver score: error: trials.txt, line 3: expected 3 fields'
    """
    return f"{program}: error: {error}"
